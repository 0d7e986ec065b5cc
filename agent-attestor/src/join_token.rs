//! Join tokens: a one-time secret the operator hands to a node out of band.
//!
//! The CA stores only the SHA-256 of each token; redeeming removes the record
//! atomically, so a token attests exactly one node, once, before it expires.
//! The token never appears in logs or error messages, and the node's id is a
//! random id minted with the token, not the token itself.

use ring::digest;

/// The method name on the wire.
pub const METHOD: &str = "join-token";

/// SHA-256 of a token: the only form in which the CA keeps it.
pub fn token_hash(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
