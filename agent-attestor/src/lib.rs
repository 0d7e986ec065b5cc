//! Node attestation for ztid: what both sides share.
//!
//! A node proves what it is before the CA gives its agent an identity. Each method (join
//! token, TPM, SEV-SNP, TDX, and `multi`, several hardware methods as one) has two halves
//! in two crates, so no CA code ships on nodes:
//! - `ztid-attestor` (`agent-attestor/node/`) runs on the node and produces evidence,
//!   first unprompted and then in answer to each challenge the CA sends;
//! - `ztid-verifier` (`agent-attestor/verifier/`) runs in the CA, checks the evidence
//!   and returns the node's stable id and the selectors the evidence proved; one cargo
//!   feature per hardware method.
//!
//! This crate holds what both halves must agree on: the method names, the messages and
//! evidence framing each method sends ([`tpm`], [`sev_snp`], [`tdx`], [`multi`],
//! [`join_token`]), the configfs-tsm challenge ([`tsm`]), and the error type.
#![forbid(unsafe_code)]

pub mod join_token;
pub mod multi;
pub mod sev_snp;
pub mod tdx;
pub mod tpm;
pub mod tsm;

pub use ztid_spiffe::{unix_seconds, Selector};

/// Serde for binary fields of JSON messages: standard base64.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as standard base64.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    /// Deserializes standard base64 into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// The one error type of node attestation.
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


impl From<ztid_spiffe::Error> for Error {
    fn from(e: ztid_spiffe::Error) -> Self {
        use ztid_spiffe::Error as S;
        match e {
            S::Refused(m) => Error::Refused(m),
            S::InvalidSelector(m) => Error::InvalidSelector(m),
            S::InvalidSpiffeId(m) => Error::InvalidSpiffeId(m),
            S::InvalidSvid(m) => Error::InvalidSvid(m),
            S::InvalidJwt(m) => Error::InvalidJwt(m),
            S::Protocol(m) => Error::Protocol(m),
            S::Config(m) => Error::Config(m),
            other => Error::Protocol(other.to_string()),
        }
    }
}
