//! SPIFFE primitives shared by `ztid-server` and `ztid-agent`.
//!
//! - [`spiffe_id`]: the one rule for SPIFFE IDs (canonical spelling only) and ztid's
//!   reserved names (`/ztid/...`: the server, agents, admins, instance segments).
//! - [`selector`]: the facts attestation proves, as `type:value` selectors.
//! - [`bundle`]: trust bundles (X.509 authorities and JWT keys), SPIFFE bundle JSON.
//! - [`svid`] and [`jwt`]: X509-SVID and JWT-SVID checks.
//! - [`tls`]: rustls verifiers that pin SPIFFE IDs on both ends of the node API.
//! - [`limits`]: bounds on requests that both sides enforce.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod jwt;
pub mod limits;
pub mod selector;
pub mod spiffe_id;
pub mod svid;
pub mod tls;

pub use selector::Selector;

/// Why a SPIFFE ID, selector, bundle or SVID was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A trust bundle (or a chain checked against it) was refused; the text says why.
    #[error("attestation refused: {0}")]
    Refused(String),
    /// A selector is malformed or of an unknown type.
    #[error("invalid selector: {0}")]
    InvalidSelector(String),
    /// A SPIFFE ID is malformed or not allowed here.
    #[error("invalid SPIFFE ID: {0}")]
    InvalidSpiffeId(String),
    /// An X509-SVID or certificate chain failed a check.
    #[error("invalid X509-SVID: {0}")]
    InvalidSvid(String),
    /// A JWT-SVID failed a check.
    #[error("invalid JWT-SVID: {0}")]
    InvalidJwt(String),
    /// A document could not be encoded.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Input given as configuration (PEM files) is unusable, or the OS failed us.
    #[error("config: {0}")]
    Config(String),
}

/// Seconds since the Unix epoch for a `SystemTime` (0 before the epoch).
pub fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
