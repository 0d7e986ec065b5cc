//! Node attestation for ztid, and the `ztid-agent` that serves the SPIFFE Workload API.
//!
//! - [`node_attestation`]: one trait for the node side and one for the CA side, with one
//!   module per method (join token now; TPM, SEV-SNP and TDX behind the same traits).
//! - [`selector`]: the facts attestation proves, as selectors.
//! - [`spiffe_id`]: the one rule for SPIFFE IDs (canonical spelling only) and ztid's reserved names.
//! - [`svid`] and [`jwt`]: X509-SVID and JWT-SVID checks shared by the CA and the agent.
//! - [`workload_attestation`]: who is calling on the Workload API socket, from the kernel.
//! - [`agent`]: the node agent itself.
#![forbid(unsafe_code)]

pub mod agent;
pub mod agent_key;
pub mod bundle;
pub mod jwt;
pub mod limits;
pub mod node_attestation;
pub mod selector;
pub mod spiffe_id;
pub mod svid;
pub mod tls;
pub mod workload_attestation;

pub use selector::Selector;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Evidence was checked and refused; the text says which check failed.
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
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The calling process could not be identified.
    #[error("workload attestation failed: {0}")]
    WorkloadAttestation(String),
    /// The datastore behind a verifier failed.
    #[error("store: {0}")]
    Store(String),
    /// Configuration is unusable.
    #[error("config: {0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The node API refused or failed a call.
    #[error("server: {0}")]
    Server(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// Runs blocking work (a TPM command, an HTTP fetch) from async code: on a multi-thread
/// tokio runtime the worker hands its other tasks off meanwhile; elsewhere it just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Seconds since the Unix epoch for a `SystemTime` (0 before the epoch).
pub fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
