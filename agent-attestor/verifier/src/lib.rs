//! Node attestation, CA side: each method's [`NodeVerifier`] checks the evidence a node
//! sends and, when every check passes, returns an [`AttestedNode`]: the node's stable id
//! and the selectors the evidence proved. Only `ztid-server` links this crate.
//!
//! One cargo feature per hardware method (`tpm`, `sev-snp`, `tdx`), as trustee's
//! verifier does; `join-token` and `multi` are always there. Optional collateral
//! fetching for the TEE verifiers (AMD KDS, Intel PCS) lives in [`fetch`].
//!
//! The exchange rides on the node API's bidirectional `Attest` stream, so a method may
//! take as many round trips as it needs (TPM credential activation takes two). Every
//! method binds its evidence to the key in the agent's CSR ([`AttestationContext`]).
#![forbid(unsafe_code)]

#[cfg(any(feature = "sev-snp", feature = "tdx"))]
pub mod fetch;
pub mod join_token;
pub mod multi;
#[cfg(feature = "sev-snp")]
pub mod sev_snp;
#[cfg(feature = "tdx")]
pub mod tdx;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod tsm;

use std::time::SystemTime;

pub use ztid_attestation::{blocking, Error, Refusal, RefusalKind};
use ztid_spiffe::Selector;

/// What the CA knows about the attempt besides the evidence itself.
#[derive(Debug, Clone)]
pub struct AttestationContext<'a> {
    /// DER SubjectPublicKeyInfo of the key in the agent's CSR, so methods can bind
    /// evidence to the key that will carry the identity.
    pub agent_public_key: &'a [u8],
    /// The verification time (a parameter, so tests can pin it).
    pub now: SystemTime,
}

/// A node whose evidence passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// The method that attested it.
    pub method: &'static str,
    /// Stable id of the node within the method, used as the last path segment of
    /// `spiffe://TD/ztid/agent/<method>/<node id>`.
    pub node_id: String,
    /// Selectors proved by the evidence.
    pub selectors: Vec<Selector>,
    /// Node aliases (SPIFFE IDs) the evidence itself grants, e.g. a join token's alias.
    pub aliases: Vec<String>,
    /// A digest of the evidence, for the audit trail.
    pub evidence_digest: [u8; 32],
}

/// One step of the CA side.
pub enum VerifierStep {
    /// Send this challenge to the agent; feed its answer to the session.
    Challenge(Vec<u8>, Box<dyn VerificationSession>),
    /// Attestation passed.
    Attested(AttestedNode),
}

/// The CA-side state of an attestation waiting for the agent's answer.
pub trait VerificationSession: Send {
    /// Checks the answer to the last challenge.
    fn resume(
        self: Box<Self>,
        answer: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error>;
}

/// The CA side of one attestation method.
pub trait NodeVerifier: Send + Sync {
    /// The method name on the wire.
    fn method(&self) -> &'static str;
    /// Checks the initial evidence; may ask for more.
    fn start(&self, evidence: &[u8], ctx: &AttestationContext<'_>) -> Result<VerifierStep, Error>;
    /// [`NodeVerifier::start`] for a factor of a multi-factor attempt, where the
    /// combination checks more (the TPM method then accepts an EK without certificate if
    /// configured, since an SEV-SNP report must bind it). Default: the same as `start`.
    fn start_as_factor(
        &self,
        evidence: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        self.start(evidence, ctx)
    }
}
