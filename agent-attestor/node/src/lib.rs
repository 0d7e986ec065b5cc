//! Node attestation, node side: each method's [`NodeAttestor`] makes evidence on the
//! node (TPM 2.0 through tss-esapi, SEV-SNP and TDX through configfs-tsm, a join
//! token), and the agent key the evidence binds ([`agent_key`]). Nothing here verifies
//! evidence: that is `ztid-verifier`, which only the CA links.
#![forbid(unsafe_code)]

pub mod agent_key;
pub mod join_token;
pub mod multi;
pub mod sev_snp;
pub mod tdx;
pub mod tpm;
pub mod tpm_device;
pub mod tsm;

pub use ztid_attestation::{blocking, Error};

use agent_key::AgentKey;

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
    /// Checks, without making any evidence, that `challenge` asks for evidence this
    /// agent may give: evidence bound to a key must be bound to `agent_spki`, the DER
    /// SubjectPublicKeyInfo of the CSR this attempt sent. A challenge that names another
    /// key is refused ([`ztid_attestation::RefusalKind::KeyMismatch`]): it was issued on
    /// another client's stream (relayed by a man in the middle when the agent does not
    /// verify the server, `--insecure-bootstrap`), and evidence for it would let that
    /// client's key carry this node's identity.
    fn check_challenge(&self, challenge: &[u8], agent_spki: &[u8]) -> Result<(), Error>;
    /// The answer to one challenge from the CA, for the CSR key `agent_spki`; refuses
    /// what [`NodeAttestor::check_challenge`] refuses, before any evidence is made.
    fn answer(&mut self, challenge: &[u8], agent_spki: &[u8]) -> Result<Vec<u8>, Error>;
}

#[cfg(test)]
mod tests;
