//! `tdx` node attestation: scaffolding only, so the server, agent and CLI can be
//! wired; every entry point refuses until the method is implemented.

use std::path::Path;
use std::time::SystemTime;

use super::{AttestationContext, NodeAttestor, NodeVerifier, VerifierStep};
use crate::Error;

/// The method name on the wire.
pub const METHOD: &str = "tdx";

fn not_built() -> Error {
    Error::Config(format!(
        "the {METHOD} attestor is not available in this build"
    ))
}

/// CA side.
pub struct TdxVerifier;

impl TdxVerifier {
    /// Builds the verifier from its TOML table (`[attestors.tdx]` in the server config).
    pub fn from_config(_config: &toml::Table) -> Result<Self, Error> {
        Err(not_built())
    }
}

impl NodeVerifier for TdxVerifier {
    fn method(&self) -> &'static str {
        METHOD
    }
    fn start(
        &self,
        _evidence: &[u8],
        _ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        Err(not_built())
    }
}

/// Agent side.
pub struct TdxAttestor;

impl TdxAttestor {
    /// Builds the attestor from the agent's config.
    pub fn new(_config: &crate::agent::config::AgentConfig) -> Result<Self, Error> {
        Err(not_built())
    }
}

impl NodeAttestor for TdxAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }
    fn initial_evidence(&mut self) -> Result<Vec<u8>, Error> {
        Err(not_built())
    }
    fn answer(&mut self, _challenge: &[u8]) -> Result<Vec<u8>, Error> {
        Err(not_built())
    }
}

/// Verifies captured evidence offline (`ztid-server evidence verify`): the claims as JSON,
/// or the first failed check.
pub fn verify_offline(
    _evidence: &[u8],
    _collateral: Option<&Path>,
    _report_data: Option<&[u8]>,
    _at: SystemTime,
    _config: &toml::Table,
) -> Result<serde_json::Value, Error> {
    Err(not_built())
}
