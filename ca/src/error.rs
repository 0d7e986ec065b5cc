//! The one error type of `ztid-ca`, by domain: what went wrong, not which gRPC code a
//! caller sees. The API layer turns it into a status in one place
//! ([`crate::api::status`]); metrics label it with one `match` ([`crate::metrics`]).
//!
//! The text of every error is what operators and callers read (status messages, CLI
//! output, logs, audit records): each variant displays its detail as it always has.

/// Everything that can go wrong in the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy refused a well-formed request: who the caller is, what it may have,
    /// what the request asks for. The kind says which check; the detail says why.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The request is malformed or out of its bounds; the text says what is wrong.
    #[error("{0}")]
    InvalidInput(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the server's state does not allow it now (an
    /// authority's lifecycle, an expired authority, a federated bundle that would roll
    /// back); the text says what to do first.
    #[error("{0}")]
    Precondition(String),
    /// A federated trust domain's bundle endpoint could not be reached or read.
    #[error("{0}")]
    Federation(String),
    /// Node attestation refused the evidence or failed.
    #[error(transparent)]
    Attestation(#[from] ztid_attestation::Error),
    /// The audit log cannot take records, or was found cut back or changed at start.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    /// A key manager operation failed.
    #[error("key manager: {0}")]
    Key(#[from] ztid_hsm::Error),
    /// Building or signing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate library refused to build or sign a certificate.
    #[error("certificate: {0}")]
    CertificateBuild(#[from] rcgen::Error),
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
    /// A bug or a broken invariant (a poisoned lock, an encoding that cannot fail).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// A policy refusal of `kind`, with its detail.
    pub fn refused(kind: RefusalKind, detail: impl Into<String>) -> Error {
        Error::Refused(Refusal::new(kind, detail))
    }

    /// The refusal kind, if a policy refused the request.
    pub fn refusal_kind(&self) -> Option<RefusalKind> {
        match self {
            Error::Refused(r) => Some(r.kind()),
            _ => None,
        }
    }
}

/// A policy refusal: which check said no, and why in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Refusal {
    kind: RefusalKind,
    detail: String,
}

impl Refusal {
    /// A refusal of `kind`; `detail` is the text callers and operators see.
    pub fn new(kind: RefusalKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    /// Which check refused.
    pub fn kind(&self) -> RefusalKind {
        self.kind
    }

    /// Why, in words.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

/// Which check refused a request. New kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalKind {
    /// A node API call came without an agent SVID.
    NoCredential,
    /// The SVID names an agent that is not attested (evicted or never known).
    UnknownAgent,
    /// The agent's SVID was replaced by a later one (renewal or re-attestation).
    StaleCredential,
    /// The SVID is unusable: unparsable, expired, or not signed by this server.
    BadCredential,
    /// The agent, or the node it attests as, is banned.
    Banned,
    /// The agent is not a parent of the entry it asks for.
    NotEntitled,
    /// The entry cannot issue anything (stored before a rule it breaks).
    UnusableEntry,
    /// A CSR is malformed, too large, badly signed, or of an unusable key.
    BadCsr,
    /// A well-formed CSR asks for more than the caller is entitled to.
    CsrNotGranted,
    /// The issuance policy (Cedar) refused.
    IssuancePolicy,
    /// The attestation method is not one the server accepts.
    UnknownMethod,
    /// The agent's method renews by attesting again, not by `RenewAgent`.
    RenewByAttesting,
    /// A per-agent rate bound was reached.
    RateExceeded,
    /// The caller may not make this admin call (transport, uid, role, local-only).
    CallNotAllowed,
    /// A federated bundle endpoint did not authenticate as the relationship says.
    UntrustedEndpoint,
    /// The identity was revoked by an operator (`ztid-server instance revoke`).
    Revoked,
}

/// A datastore failure, with its source where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database engine failed.
    #[error(transparent)]
    Engine(#[from] sled::Error),
    /// The database could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The database directory.
        path: String,
        /// What the engine said.
        source: sled::Error,
    },
    /// A record could not be encoded or decoded.
    #[error("record encoding: {0}")]
    Encoding(#[from] serde_json::Error),
    /// A stored record or key is not what this server writes.
    #[error("{0}")]
    Corrupt(String),
    /// The database server (PostgreSQL) failed, refused the request, or could not be
    /// reached in time; the text says what was being done and what it answered.
    #[error("{0}")]
    Database(String),
    /// The database server (PostgreSQL) could not be reached, dropped the connection,
    /// is shutting down or did not answer in time: another server of the cluster may
    /// well succeed, so callers are told `Unavailable` (agents fail over on it).
    #[error("{0}")]
    Unreachable(String),
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Store(e.into())
    }
}

impl From<sled::transaction::TransactionError<Error>> for Error {
    fn from(e: sled::transaction::TransactionError<Error>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => e.into(),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Store(e.into())
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The live audit log failed, or refused to continue its chain at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The log cannot take a record now (its writer failed or stopped, a session key
    /// could not be made): no answer leaves without its record.
    #[error("datastore: {0}")]
    Unavailable(String),
    /// At start the log no longer reaches an anchor (cut back, rewritten, removed);
    /// `audit accept-rollback` records an operator's decision to continue from it.
    #[error(
        "audit log: {0}; refusing to continue the chain (`ztid-server audit verify` names what is wrong; `ztid-server audit accept-rollback --reason TEXT` records an operator's decision to continue from the log as it is)"
    )]
    RolledBack(String),
    /// At start, records inside the signed part of the log were found changed,
    /// unreadable or missing: nothing can continue this chain.
    #[error(
        "audit log: {0}; refusing to continue the chain (`ztid-server audit verify` names the first bad record; keep the log for investigation and move it aside to start a new one, then `ztid-server audit accept-rollback --reason TEXT`)"
    )]
    Broken(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_the_details_operators_read() {
        let e = Error::refused(RefusalKind::Banned, "agent a is banned");
        assert_eq!(e.to_string(), "agent a is banned");
        assert_eq!(e.refusal_kind(), Some(RefusalKind::Banned));
        assert_eq!(
            Error::from(serde_json::from_str::<u8>("x").unwrap_err())
                .to_string()
                .split(':')
                .take(2)
                .collect::<Vec<_>>(),
            ["datastore", " record encoding"]
        );
        assert_eq!(
            Error::Store(StoreError::Corrupt("corrupt entry log key".into())).to_string(),
            "datastore: corrupt entry log key"
        );
        assert_eq!(Error::NotFound("x".into()).refusal_kind(), None);
    }
}
