//! What the core's unit tests (and the node API's) share: a server on sled in a
//! temporary directory with one attested agent.

use std::sync::Arc;

use super::{AuthenticatedAgent, CaCore};

/// A server with one agent attested by join token (`spiffe://example.org/ztid/agent/
/// join_token/n1`): the directory (keep it alive), the core, the agent's leaf
/// certificate and the agent as the node API authenticates it.
pub(crate) fn core_with_agent() -> (tempfile::TempDir, Arc<CaCore>, Vec<u8>, AuthenticatedAgent) {
    core_with_agent_configured(|_| {})
}

/// [`core_with_agent`] on the default settings changed by `configure`.
pub(crate) fn core_with_agent_configured(
    configure: impl FnOnce(&mut crate::config::ServerConfig),
) -> (tempfile::TempDir, Arc<CaCore>, Vec<u8>, AuthenticatedAgent) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::config::ServerConfig {
        trust_domain: "example.org".into(),
        data_dir: dir.path().into(),
        ..Default::default()
    };
    configure(&mut config);
    let core = CaCore::open(config).unwrap();
    let csr = fresh_csr();
    let (_, leaf) = core.complete_attestation(&test_node(), &csr).unwrap();
    let leaf = leaf.chain.first().unwrap().clone();
    let agent = core.authenticate_agent(Some(&leaf)).unwrap();
    (dir, core, leaf, agent)
}

/// A server of `example.org` with default settings and nothing in it: the directory
/// (keep it alive) and the core.
pub(crate) fn empty_core() -> (tempfile::TempDir, Arc<CaCore>) {
    let dir = tempfile::tempdir().unwrap();
    let core = CaCore::open(crate::config::ServerConfig {
        trust_domain: "example.org".into(),
        data_dir: dir.path().into(),
        ..Default::default()
    })
    .unwrap();
    (dir, core)
}

/// The node [`core_with_agent`] attests (again, for a fresh agent SVID).
pub(crate) fn test_node() -> ztid_verifier::AttestedNode {
    ztid_verifier::AttestedNode {
        method: "join_token",
        node_id: "n1".into(),
        selectors: vec![ztid_spiffe::Selector::parse("join-token:id:n1").unwrap()],
        aliases: vec![],
        evidence_digest: [7; 32],
    }
}

/// A CSR (DER) for a fresh P-256 key, naming nothing: the server puts the identity in.
pub(crate) fn fresh_csr() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&kp)
        .unwrap()
        .der()
        .to_vec()
}
