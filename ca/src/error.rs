//! The one error type of `ztid-ca`, and how each kind maps to a gRPC status.

/// Everything that can go wrong in the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the text says what is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller presented no identity, or one the server no longer knows.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request cannot be honoured in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Store(String),
    /// A key manager operation failed.
    #[error("key manager: {0}")]
    Key(#[from] ztid_hsm::Error),
    /// Building or signing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
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
    /// Node attestation refused the evidence or failed.
    #[error(transparent)]
    Attestation(#[from] ztid_attestation::Error),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Store(e.to_string())
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
        Error::Store(format!("record encoding: {e}"))
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::Certificate(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use ztid_attestation::Error as A;
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::Attestation(A::Refused(_)) => tonic::Status::permission_denied(msg),
            Error::Attestation(
                A::InvalidSelector(_)
                | A::InvalidSpiffeId(_)
                | A::InvalidSvid(_)
                | A::InvalidJwt(_)
                | A::Protocol(_),
            ) => tonic::Status::invalid_argument(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
