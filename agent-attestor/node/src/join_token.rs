//! Join tokens: a one-time secret the operator hands to a node out of band.
//!
//! The CA stores only the SHA-256 of each token; redeeming removes the record
//! atomically, so a token attests exactly one node, once, before it expires.
//! The token never appears in logs or error messages, and the node's id is a
//! random id minted with the token, not the token itself.

use zeroize::Zeroizing;

pub use ztid_attestation::join_token::METHOD;
use ztid_attestation::Error;

use crate::NodeAttestor;

/// Agent side: sends the token.
pub struct JoinTokenAttestor {
    token: Zeroizing<String>,
}

impl JoinTokenAttestor {
    /// An attestor that will present `token`.
    pub fn new(token: String) -> Self {
        Self {
            token: Zeroizing::new(token),
        }
    }
}

impl NodeAttestor for JoinTokenAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }
    fn initial_evidence(&mut self) -> Result<Vec<u8>, Error> {
        Ok(self.token.as_bytes().to_vec())
    }
    fn check_challenge(&self, _challenge: &[u8], _agent_spki: &[u8]) -> Result<(), Error> {
        Err(Error::Protocol(
            "join-token attestation has no challenges".into(),
        ))
    }
    fn answer(&mut self, _challenge: &[u8], _agent_spki: &[u8]) -> Result<Vec<u8>, Error> {
        Err(Error::Protocol(
            "join-token attestation has no challenges".into(),
        ))
    }
}
