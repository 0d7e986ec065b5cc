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

/// Which class of check refused a trust bundle: stable, to count and to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalKind {
    /// The bundle does not parse: not JSON or PEM, a member missing or of the wrong
    /// type, a key or certificate that does not decode, duplicates, no certificate.
    Malformed,
    /// An authority in the bundle names another trust domain than the bundle's.
    TrustDomainMismatch,
}

impl RefusalKind {
    /// A stable snake_case name, for metric labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            RefusalKind::Malformed => "malformed",
            RefusalKind::TrustDomainMismatch => "trust_domain_mismatch",
        }
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A refused trust bundle: the class of the check that failed and, for operators, which
/// check and why. Displays as the detail alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The class of the check that failed.
    pub kind: RefusalKind,
    /// Which check failed and why.
    pub detail: String,
}

impl Refusal {
    /// The class of the check that failed.
    pub fn kind(&self) -> RefusalKind {
        self.kind
    }
    /// Which check failed and why.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Why a SPIFFE ID, selector, bundle or SVID was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A trust bundle was refused; the refusal says which check failed.
    #[error("attestation refused: {0}")]
    Refused(Refusal),
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

impl Error {
    /// A refusal of `kind`; `detail` says which check failed.
    pub fn refused(kind: RefusalKind, detail: impl Into<String>) -> Error {
        Error::Refused(Refusal {
            kind,
            detail: detail.into(),
        })
    }

    /// The kind of the refusal, if this is one.
    pub fn refusal_kind(&self) -> Option<RefusalKind> {
        match self {
            Error::Refused(r) => Some(r.kind),
            _ => None,
        }
    }
}

/// Seconds since the Unix epoch for a `SystemTime` (0 before the epoch).
pub fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
