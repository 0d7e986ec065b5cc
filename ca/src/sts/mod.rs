//! The OAuth 2.0 token endpoint (issue 14, docs/token-exchange.md): agents trade their
//! SVID for a scoped, short, key-bound access token (RFC 8693, RFC 9068, RFC 8705), with
//! delegation chains that only narrow. One role per module:
//!
//! - [`error`]: the RFC's error codes, typed;
//! - [`form`]: the form-encoded requests, parsed and bounded;
//! - [`scope`]: scope sets (RFC 6749 syntax), subset and intersection;
//! - [`token`]: the access token (RFC 9068 `at+jwt`): claims, encoding, verification;
//! - [`chain`]: `act` chains, `may_act`, and which identities a grant covers;
//! - [`exchange`]: `POST /token`: who is asking, what they may obtain, the receipt;
//! - [`introspect`]: `POST /introspect` (RFC 7662);
//! - [`listener`]: the HTTPS listener, its certificate, routes, metadata and JWKS.

pub mod chain;
pub mod error;
pub mod exchange;
pub mod form;
pub mod introspect;
pub mod listener;
pub mod scope;
pub mod token;

pub use error::{OAuthError, OAuthErrorCode};
