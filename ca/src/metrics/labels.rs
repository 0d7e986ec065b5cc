//! Reasons: short, stable labels derived from errors (one `match` on the error's kind),
//! and the attestation method label.

use crate::AuditError;
use crate::{Error, RefusalKind};
use ztid_attestation::RefusalKind as AttestationRefusal;

/// Known node attestation methods; anything else a client names is `unknown`.
const METHODS: &[&str] = &["join-token", "tpm", "sev-snp", "tdx"];

pub(super) fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// Why a node attestation by `method` was refused, as one of a fixed set of labels:
/// one `match` on the error's kind.
pub fn attestation_reason(method: &str, e: &Error) -> &'static str {
    use ztid_attestation::Error as A;
    use RefusalKind as K;
    match e {
        Error::Attestation(A::Refused(r)) => attestation_refusal_label(method, r.kind()),
        Error::Attestation(
            A::Protocol(_)
            | A::InvalidSelector(_)
            | A::InvalidSpiffeId(_)
            | A::InvalidSvid(_)
            | A::InvalidJwt(_),
        ) => "protocol",
        Error::Refused(r) => match r.kind() {
            K::Banned => "banned",
            K::UnknownMethod => "unknown_method",
            K::BadCsr | K::CsrNotGranted => "csr_invalid",
            K::NotEntitled
            | K::UnusableEntry
            | K::IssuancePolicy
            | K::CallNotAllowed
            | K::UntrustedEndpoint
            | K::Revoked => "permission_denied",
            K::NoCredential
            | K::UnknownAgent
            | K::StaleCredential
            | K::BadCredential
            | K::RenewByAttesting
            | K::RateExceeded => "other",
        },
        Error::InvalidInput(_) => "invalid_request",
        _ => "other",
    }
}

/// The label of a verifier's refusal. The values are those this server has always
/// used (dashboards and alerts name them), so several kinds share one;
/// `collateral_unavailable` is new: a KDS/PCS outage is not evidence of an attack.
fn attestation_refusal_label(method: &str, kind: AttestationRefusal) -> &'static str {
    use AttestationRefusal as R;
    match kind {
        R::TokenUnknown => "token_unknown",
        R::TokenExpired => "token_expired",
        R::Malformed if method == "join-token" => "token_malformed",
        R::Malformed | R::Unsupported => "malformed_evidence",
        R::Expired => "evidence_expired",
        R::BadSignature => "bad_signature",
        R::UntrustedChain | R::Revoked => "untrusted_chain",
        R::CollateralUnavailable => "collateral_unavailable",
        R::KeyMismatch | R::Replay => "challenge_failed",
        R::PolicyMismatch => "policy_mismatch",
        _ => "evidence_refused",
    }
}

/// Why the node API refused a call or one request in it, as one of a fixed set of
/// labels: one `match` on the error's kind.
pub fn refusal_reason(e: &Error) -> &'static str {
    use RefusalKind as K;
    match e {
        Error::Refused(r) => match r.kind() {
            K::NoCredential => "no_svid",
            K::UnknownAgent => "unknown_agent",
            K::StaleCredential => "stale_svid",
            K::BadCredential => "bad_svid",
            K::Banned => "banned",
            K::NotEntitled => "not_entitled",
            K::BadCsr | K::CsrNotGranted => "csr_refused",
            K::UnknownMethod => "invalid_request",
            K::UnusableEntry | K::IssuancePolicy | K::CallNotAllowed | K::UntrustedEndpoint => {
                "permission_denied"
            }
            K::Revoked => "revoked",
            K::RenewByAttesting | K::RateExceeded => "other",
        },
        Error::NotFound(_) => "no_entry",
        Error::InvalidInput(_) => "invalid_request",
        Error::Audit(AuditError::Unavailable(_)) => "audit_unavailable",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_attestation::Error as A;

    #[test]
    fn reasons_are_short_and_stable() {
        use ztid_attestation::RefusalKind as R;
        let r = |method: &str, kind: R| {
            attestation_reason(method, &Error::Attestation(A::refused(kind, "any text")))
        };
        for (kind, label) in [
            (R::TokenExpired, "token_expired"),
            (R::TokenUnknown, "token_unknown"),
            (R::BadSignature, "bad_signature"),
            (R::PolicyMismatch, "policy_mismatch"),
            (R::Expired, "evidence_expired"),
            (R::Replay, "challenge_failed"),
            (R::KeyMismatch, "challenge_failed"),
            (R::UntrustedChain, "untrusted_chain"),
            (R::Revoked, "untrusted_chain"),
            (R::Unsupported, "malformed_evidence"),
            (R::CollateralUnavailable, "collateral_unavailable"),
        ] {
            assert_eq!(r("tpm", kind), label, "{kind:?}");
        }
        assert_eq!(r("join-token", R::Malformed), "token_malformed");
        assert_eq!(r("tpm", R::Malformed), "malformed_evidence");
        assert_eq!(
            attestation_reason("tpm", &Error::Attestation(A::Protocol("x".into()))),
            "protocol"
        );
        let refused = |k: RefusalKind| Error::refused(k, "any text: the kind decides");
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::Banned)),
            "banned"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::BadCsr)),
            "csr_invalid"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::CsrNotGranted)),
            "csr_invalid"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::UnknownMethod)),
            "unknown_method"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::IssuancePolicy)),
            "permission_denied"
        );
        assert_eq!(
            attestation_reason("tpm", &Error::InvalidInput("x".into())),
            "invalid_request"
        );
        assert_eq!(
            attestation_reason("tpm", &Error::Internal("disk".into())),
            "other"
        );
        for (kind, label) in [
            (RefusalKind::NoCredential, "no_svid"),
            (RefusalKind::UnknownAgent, "unknown_agent"),
            (RefusalKind::StaleCredential, "stale_svid"),
            (RefusalKind::BadCredential, "bad_svid"),
            (RefusalKind::Banned, "banned"),
            (RefusalKind::NotEntitled, "not_entitled"),
            (RefusalKind::BadCsr, "csr_refused"),
            (RefusalKind::CsrNotGranted, "csr_refused"),
            (RefusalKind::IssuancePolicy, "permission_denied"),
            (RefusalKind::RateExceeded, "other"),
        ] {
            assert_eq!(refusal_reason(&refused(kind)), label, "{kind:?}");
        }
        assert_eq!(refusal_reason(&Error::NotFound("e".into())), "no_entry");
        assert_eq!(
            refusal_reason(&Error::Audit(AuditError::Unavailable(
                "audit writer stopped".into()
            ))),
            "audit_unavailable"
        );
        assert_eq!(method_label("join-token"), "join-token");
        assert_eq!(method_label("../../etc"), "unknown");
    }
}
