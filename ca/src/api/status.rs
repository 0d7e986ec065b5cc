//! The API edge: how an [`Error`] becomes the gRPC status a caller sees. The one place
//! that knows gRPC codes; the node API, the admin API and the admin authorization layer
//! all answer through it. The message is the error's text, unchanged.

use tonic::{Code, Status};

use crate::AuditError;
use crate::{Error, RefusalKind};

/// The gRPC code for a refusal of `kind`.
fn refusal_code(kind: RefusalKind) -> Code {
    use RefusalKind as K;
    match kind {
        K::NoCredential | K::UnknownAgent | K::StaleCredential | K::BadCredential => {
            Code::Unauthenticated
        }
        K::Banned
        | K::NotEntitled
        | K::UnusableEntry
        | K::CsrNotGranted
        | K::IssuancePolicy
        | K::CallNotAllowed
        | K::UntrustedEndpoint
        | K::Revoked => Code::PermissionDenied,
        K::BadCsr | K::UnknownMethod => Code::InvalidArgument,
        K::RenewByAttesting => Code::FailedPrecondition,
        K::RateExceeded => Code::ResourceExhausted,
    }
}

/// The gRPC code for `e`.
pub fn code(e: &Error) -> Code {
    use ztid_attestation::Error as A;
    match e {
        Error::Refused(r) => refusal_code(r.kind()),
        Error::InvalidInput(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::Precondition(_) | Error::Federation(_) => Code::FailedPrecondition,
        Error::Attestation(A::Refused(_)) => Code::PermissionDenied,
        Error::Attestation(
            A::InvalidSelector(_)
            | A::InvalidSpiffeId(_)
            | A::InvalidSvid(_)
            | A::InvalidJwt(_)
            | A::Protocol(_),
        ) => Code::InvalidArgument,
        Error::Audit(AuditError::RolledBack(_) | AuditError::Broken(_)) => Code::FailedPrecondition,
        Error::Store(crate::StoreError::Unreachable(_))
        | Error::Attestation(A::StoreUnavailable(_)) => Code::Unavailable,
        Error::Attestation(_)
        | Error::Audit(_)
        | Error::Store(_)
        | Error::Key(_)
        | Error::Certificate(_)
        | Error::CertificateBuild(_)
        | Error::Config(_)
        | Error::Io { .. }
        | Error::Internal(_) => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(code(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_domain_answers_with_its_code_and_its_text() {
        let s = Status::from(Error::refused(
            RefusalKind::UnknownAgent,
            "agent a is not attested (evicted or unknown)",
        ));
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), "agent a is not attested (evicted or unknown)");
        let s = Status::from(Error::refused(RefusalKind::RateExceeded, "slow down"));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            Status::from(Error::refused(RefusalKind::BadCsr, "CSR has no URI SAN")).code(),
            Code::InvalidArgument
        );
        let s = Status::from(Error::Attestation(ztid_attestation::Error::Protocol(
            "no step".into(),
        )));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "protocol error: no step")
        );
        assert_eq!(
            Status::from(Error::Audit(AuditError::Unavailable(
                "audit writer stopped".into()
            )))
            .code(),
            Code::Internal
        );
        assert_eq!(
            Status::from(Error::Precondition("run prepare first".into())).code(),
            Code::FailedPrecondition
        );
        // A database out of reach is worth trying elsewhere (agents fail over on
        // Unavailable); one that refused the request is not.
        let s = Status::from(Error::Store(crate::StoreError::Unreachable(
            "PostgreSQL: get_agent: no connection".into(),
        )));
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::Unavailable,
                "datastore: PostgreSQL: get_agent: no connection"
            )
        );
        assert_eq!(
            Status::from(Error::Store(crate::StoreError::Database("syntax".into()))).code(),
            Code::Internal
        );
    }
}
