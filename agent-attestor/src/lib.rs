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

/// Which class of check refused evidence: a stable, small set to count and to act on
/// (metrics label refusals with [`RefusalKind::label`]; tests assert the kind). The
/// detail of a [`Refusal`] says which check, in words for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalKind {
    /// The evidence, a message or a structure in it does not parse: truncated, too
    /// large, trailing bytes, wrong magic or type, bad PEM/DER/JSON, an empty or
    /// over-long join token, a duplicated or inconsistent field.
    Malformed,
    /// Well-formed, but in a form this verifier does not take: an algorithm, scheme,
    /// curve, key size, report or quote version, or TEE type it does not implement.
    Unsupported,
    /// The join token is unknown or was already used.
    TokenUnknown,
    /// The join token has expired.
    TokenExpired,
    /// A signature over the evidence by the attested key (TPM quote or certification,
    /// SEV-SNP report) does not verify, or the values sent are not the ones it signs
    /// (PCR values against the quote's digest).
    BadSignature,
    /// A certificate chain does not lead to a trusted root (EK CA, pinned AMD ARK,
    /// Intel root), or a certificate or CRL in it is not fit for its place (not a CA,
    /// key usage, SHA-1, wrong issuer). For TDX this is also every failure of dcap-qvl's
    /// verification of the quote up to Intel's root with its collateral (the quote and QE
    /// report signatures, the TCB info and QE identity, the TCB level match): dcap-qvl's
    /// errors are not typed, and the detail carries its message.
    UntrustedChain,
    /// A certificate, CRL or collateral item is outside its validity period (expired,
    /// or not yet valid at the verification time).
    Expired,
    /// A certificate in the chain is revoked by its CRL.
    Revoked,
    /// Collateral the check needs (VCEK, VLEK, certificate chain, CRL, TCB info) is
    /// neither in the evidence nor configured, and could not be fetched.
    CollateralUnavailable,
    /// The pieces of evidence are not bound to each other or to the key presented:
    /// the CSR key is not the attested key, the AK certified another key, an EK
    /// certificate or VCEK is for another key, chip, product or TCB, an SVSM vTPM is
    /// another TPM than the factor's, the agent key changed between challenge and answer.
    KeyMismatch,
    /// The answer does not belong to this attempt's challenge: answered too late, a
    /// credential secret other than the one sealed to the EK for this attempt (replayed,
    /// or guessed by an AK outside the EK's TPM), a quote or certification over another
    /// nonce, report_data that is not this challenge's binding, an answer for other
    /// factors (stale or replayed).
    Replay,
    /// The evidence verified, but what it shows is not allowed: by the operator's policy
    /// (PCR values, measurements, TCB level or status, advisories, allow-lists, required
    /// factors) or by fixed rules (debug guests, keys that could leave the TPM).
    PolicyMismatch,
}

impl RefusalKind {
    /// A stable snake_case name, for metric labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            RefusalKind::Malformed => "malformed",
            RefusalKind::Unsupported => "unsupported",
            RefusalKind::TokenUnknown => "token_unknown",
            RefusalKind::TokenExpired => "token_expired",
            RefusalKind::BadSignature => "bad_signature",
            RefusalKind::UntrustedChain => "untrusted_chain",
            RefusalKind::Expired => "expired",
            RefusalKind::Revoked => "revoked",
            RefusalKind::CollateralUnavailable => "collateral_unavailable",
            RefusalKind::KeyMismatch => "key_mismatch",
            RefusalKind::Replay => "replay",
            RefusalKind::PolicyMismatch => "policy_mismatch",
        }
    }

    /// Every kind, in declaration order (for metric registration and tests).
    pub const ALL: [RefusalKind; 12] = [
        RefusalKind::Malformed,
        RefusalKind::Unsupported,
        RefusalKind::TokenUnknown,
        RefusalKind::TokenExpired,
        RefusalKind::BadSignature,
        RefusalKind::UntrustedChain,
        RefusalKind::Expired,
        RefusalKind::Revoked,
        RefusalKind::CollateralUnavailable,
        RefusalKind::KeyMismatch,
        RefusalKind::Replay,
        RefusalKind::PolicyMismatch,
    ];
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Refused evidence: the class of the check that failed and, for operators, which check
/// and why. Displays as the detail alone.
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

/// The one error type of node attestation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Evidence was checked and refused; the refusal says which check failed.
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
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The calling process could not be identified.
    #[error("workload attestation failed: {0}")]
    WorkloadAttestation(String),
    /// The datastore behind a verifier failed.
    #[error("store: {0}")]
    Store(String),
    /// The datastore behind a verifier is out of reach (a database that stopped
    /// answering): another server may succeed.
    #[error("store: {0}")]
    StoreUnavailable(String),
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
    /// A refusal of `kind`; `detail` says which check failed.
    pub fn refused(kind: RefusalKind, detail: impl Into<String>) -> Error {
        Error::Refused(Refusal {
            kind,
            detail: detail.into(),
        })
    }

    /// The refusal, if this is one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Error::Refused(r) => Some(r),
            _ => None,
        }
    }

    /// The kind of the refusal, if this is one.
    pub fn refusal_kind(&self) -> Option<RefusalKind> {
        self.refusal().map(Refusal::kind)
    }

    /// Rewords an error as a refusal: a refusal keeps its kind and gets the detail
    /// `f(detail)`; any other error becomes a refusal of `otherwise` with the detail
    /// `f(its message)`.
    pub fn reworded(self, otherwise: RefusalKind, f: impl FnOnce(&str) -> String) -> Error {
        match self {
            Error::Refused(r) => Error::refused(r.kind, f(&r.detail)),
            other => Error::refused(otherwise, f(&other.to_string())),
        }
    }

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
            S::Refused(r) => Error::refused(
                match r.kind {
                    ztid_spiffe::RefusalKind::Malformed => RefusalKind::Malformed,
                    ztid_spiffe::RefusalKind::TrustDomainMismatch => RefusalKind::UntrustedChain,
                    _ => RefusalKind::Malformed,
                },
                r.detail,
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_before_and_labels_are_distinct_snake_case() {
        let e = Error::refused(RefusalKind::TokenExpired, "join token has expired");
        assert_eq!(e.to_string(), "attestation refused: join token has expired");
        assert_eq!(e.refusal_kind(), Some(RefusalKind::TokenExpired));
        assert_eq!(Error::Config("x".into()).refusal_kind(), None);
        let labels: std::collections::BTreeSet<&str> =
            RefusalKind::ALL.iter().map(RefusalKind::label).collect();
        assert_eq!(labels.len(), RefusalKind::ALL.len());
        assert!(labels
            .iter()
            .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        // Rewording keeps the kind; another error becomes a refusal of the given kind.
        let r = e.reworded(RefusalKind::Malformed, |d| format!("factor: {d}"));
        assert_eq!(r.refusal_kind(), Some(RefusalKind::TokenExpired));
        assert_eq!(
            r.to_string(),
            "attestation refused: factor: join token has expired"
        );
        let r = Error::Protocol("p".into()).reworded(RefusalKind::Malformed, |d| d.to_string());
        assert_eq!(r.refusal_kind(), Some(RefusalKind::Malformed));
        assert_eq!(r.to_string(), "attestation refused: protocol error: p");
        // Bundle refusals keep their text and map onto attestation kinds.
        let b: Error = ztid_spiffe::Error::refused(
            ztid_spiffe::RefusalKind::TrustDomainMismatch,
            "certificate 0 claims trust domain c.test, not b.test",
        )
        .into();
        assert_eq!(b.refusal_kind(), Some(RefusalKind::UntrustedChain));
        assert_eq!(
            b.to_string(),
            "attestation refused: certificate 0 claims trust domain c.test, not b.test"
        );
    }
}
