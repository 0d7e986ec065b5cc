//! Node attestation: how a node proves what it is before the CA gives its agent an identity.
//!
//! Each method (join token, TPM, SEV-SNP, TDX, and `multi`, which runs several of the
//! hardware methods as one) is one module with two halves behind two traits:
//! - [`NodeAttestor`] runs on the node and produces evidence, first unprompted and then
//!   in answer to each challenge the CA sends;
//! - [`NodeVerifier`] runs in the CA, checks the evidence and, when every check passes,
//!   returns an [`AttestedNode`]: the node's stable id and the selectors the evidence proved.
//!
//! The exchange rides on the node API's bidirectional `Attest` stream, so a method may
//! take as many round trips as it needs (TPM credential activation takes two).
//!
//! Every method binds its evidence to the key in the agent's CSR ([`AttestationContext`]):
//! TEE methods hash it into report_data, and the TPM method makes the key itself, in the
//! TPM, and has the AK certify it ([`NodeAttestor::agent_key`]). Optional collateral
//! fetching for the TEE verifiers lives in [`fetch`].

pub mod fetch;
pub mod join_token;
pub mod multi;
pub mod sev_snp;
pub mod tdx;
pub mod tpm;
pub mod tsm;

use std::time::SystemTime;

use crate::agent_key::AgentKey;
use crate::{Error, Selector};

/// The agent side of one attestation method.
pub trait NodeAttestor: Send {
    /// The method name on the wire (`join-token`, `tpm`, ...).
    fn method(&self) -> &'static str;
    /// The key the agent SVID will certify, when the method keeps it in hardware and
    /// proves so in its evidence (TPM: made in the TPM, certified by the AK). Called
    /// once per attempt, before [`NodeAttestor::initial_evidence`]. `None` (the
    /// default): the agent makes a software key.
    fn agent_key(&mut self) -> Result<Option<AgentKey>, Error> {
        Ok(None)
    }
    /// Evidence sent with the first message, before any challenge.
    fn initial_evidence(&mut self) -> Result<Vec<u8>, Error>;
    /// The answer to one challenge from the CA.
    fn answer(&mut self, challenge: &[u8]) -> Result<Vec<u8>, Error>;
}

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

/// Serde for binary fields of JSON messages: standard base64.
pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}
