//! Federated bundles: parsing, the per-trust-domain store (never merged with this
//! domain's bundle), the sequence rule, and the version agents sync against.

use serde::{Deserialize, Serialize};
use serde_json::json;
use ztid_spiffe::bundle::TrustBundle;
use ztid_spiffe::jwt::JwtKey;

use super::records::{Source, Stored};
use crate::core::{now, CaCore};
use crate::{Error, Result, StoreError};

/// How often a federated bundle store reads again after losing a compare-and-put to
/// another writer, before it gives up (`Unavailable`).
const STORE_ATTEMPTS: usize = 8;

/// A stored federated bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BundleRecord {
    trust_domain: String,
    x509_authorities: Vec<String>,
    jwt_authorities: Vec<(String, String)>,
    sequence: u64,
    refresh_hint_seconds: i64,
    updated_at: i64,
}

impl From<&TrustBundle> for BundleRecord {
    fn from(b: &TrustBundle) -> Self {
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b.x509_authorities.iter().map(hex::encode).collect(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| (k.kid.clone(), hex::encode(&k.spki)))
                .collect(),
            sequence: b.sequence,
            refresh_hint_seconds: b.refresh_hint_seconds,
            updated_at: now(),
        }
    }
}

impl BundleRecord {
    fn to_bundle(&self) -> Result<TrustBundle> {
        let bad = |_| {
            Error::Store(StoreError::Corrupt(
                "corrupt federated bundle record".into(),
            ))
        };
        Ok(TrustBundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: self
                .x509_authorities
                .iter()
                .map(|h| hex::decode(h).map_err(bad))
                .collect::<Result<_>>()?,
            jwt_authorities: self
                .jwt_authorities
                .iter()
                .map(|(kid, spki)| {
                    Ok(JwtKey {
                        kid: kid.clone(),
                        spki: hex::decode(spki).map_err(bad)?,
                    })
                })
                .collect::<Result<_>>()?,
            sequence: self.sequence,
            refresh_hint_seconds: self.refresh_hint_seconds,
            tainted: Vec::new(),
        })
    }
}

/// Parses a bundle file in `format` (`pem` or `spiffe`) for `td`; a PEM bundle gets
/// sequence `pem_sequence` (it has none of its own).
pub fn parse_bundle(td: &str, format: &str, data: &[u8], pem_sequence: u64) -> Result<TrustBundle> {
    let refused = |e: ztid_spiffe::Error| match e {
        ztid_spiffe::Error::Refused(r) => Error::InvalidInput(r.to_string()),
        other => Error::InvalidInput(other.to_string()),
    };
    match format {
        "spiffe" => {
            let text = std::str::from_utf8(data)
                .map_err(|_| Error::InvalidInput("bundle is not UTF-8".into()))?;
            TrustBundle::from_spiffe_json(td, text).map_err(refused)
        }
        "pem" => TrustBundle::from_pem(td, data, pem_sequence).map_err(refused),
        other => Err(Error::InvalidInput(format!(
            "unknown bundle format {other:?} (pem, spiffe)"
        ))),
    }
}

/// Sniffs the format of an initial trust bundle: JSON or PEM.
pub(super) fn sniff_format(data: &[u8]) -> &'static str {
    if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        "spiffe"
    } else {
        "pem"
    }
}

pub(super) fn check_trust_domain(core: &CaCore, td: &str) -> Result<String> {
    // One rule for names and IDs: canonical spelling only (ztid_spiffe::spiffe_id).
    let parsed = ztid_spiffe::spiffe_id::parse_trust_domain(td).map_err(|e| {
        Error::InvalidInput(format!("trust domain {}", crate::csr_policy::reason(e)))
    })?;
    if parsed == core.trust_domain {
        return Err(Error::InvalidInput(
            "cannot federate with this server's own trust domain".into(),
        ));
    }
    Ok(parsed.to_string())
}

/// A stable digest of every federated bundle (never 0).
fn version_of(bundles: &[TrustBundle]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for b in bundles {
        ctx.update(b.trust_domain.as_bytes());
        ctx.update(&[0]);
        ctx.update(&b.sequence.to_be_bytes());
        for der in &b.x509_authorities {
            ctx.update(&(der.len() as u64).to_be_bytes());
            ctx.update(der);
        }
        for k in &b.jwt_authorities {
            ctx.update(k.kid.as_bytes());
            ctx.update(&[0]);
            ctx.update(&k.spki);
        }
        ctx.update(&[0xff]);
    }
    let d = ctx.finish();
    // The first 8 of the digest's 32 bytes.
    let v = d
        .as_ref()
        .first_chunk::<8>()
        .map_or(0, |b| u64::from_be_bytes(*b));
    v.max(1)
}

impl CaCore {
    /// The stored bundle of a federated trust domain.
    pub fn federated_bundle(&self, td: &str) -> Result<Option<TrustBundle>> {
        match self.store.get_federated_bundle(td)? {
            Some(v) => Ok(Some(
                serde_json::from_slice::<BundleRecord>(&v)?.to_bundle()?,
            )),
            None => Ok(None),
        }
    }

    /// Every federated bundle, ordered by trust domain.
    pub fn federated_bundles(&self) -> Result<Vec<TrustBundle>> {
        self.store
            .list_federated_bundles()?
            .iter()
            .map(|v| serde_json::from_slice::<BundleRecord>(v)?.to_bundle())
            .collect()
    }

    /// The version of every federated bundle together (what agents hold, see
    /// [`Self::federated_for_sync`]).
    pub fn federated_version(&self) -> Result<u64> {
        Ok(version_of(&self.federated_bundles()?))
    }

    /// For an agent's sync: every federated bundle and their version, unless the
    /// agent already holds that version.
    pub fn federated_for_sync(&self, held_version: u64) -> Result<Option<(Vec<TrustBundle>, u64)>> {
        let all = self.federated_bundles()?;
        let v = version_of(&all);
        Ok((v != held_version).then_some((all, v)))
    }

    pub(super) fn refuse_bundle(&self, td: &str, source: Source<'_>, reason: &str) {
        tracing::warn!(event = "federated_bundle_refused", trust_domain = td, source = %source.describe(), reason, "federated bundle refused; nothing changed");
        if let Err(e) = self.record(
            json!({"type": "federated_bundle_refused", "trust_domain": td,
            "source": source.describe(), "reason": reason}),
        ) {
            tracing::error!(error = %e, "could not audit a federated bundle refusal");
        }
    }

    /// Stores a federated bundle unless its sequence is lower than the stored one.
    /// Refusals are logged and audited with their reason and change nothing.
    pub fn set_federated_bundle(&self, bundle: TrustBundle, source: Source<'_>) -> Result<Stored> {
        match self.store_federated_bundle(bundle, source, None)? {
            Some(stored) => Ok(stored),
            // Only a store bound to a relationship finds it moved.
            None => Err(Error::Internal(
                "a federated bundle store without a relationship found it moved".into(),
            )),
        }
    }

    /// [`Self::set_federated_bundle`], and with `relationship` (its stored bytes) only
    /// while that relationship stands unchanged: `None` when it was changed or deleted
    /// (nothing stored). The check against the stored bundle and the write are one
    /// step on the datastore, so a bundle another writer stored meanwhile, on any
    /// server, is compared against instead of overwritten.
    pub(crate) fn store_federated_bundle(
        &self,
        bundle: TrustBundle,
        source: Source<'_>,
        relationship: Option<&[u8]>,
    ) -> Result<Option<Stored>> {
        let td = check_trust_domain(self, &bundle.trust_domain)?;
        let mut bundle = bundle;
        bundle.trust_domain = td.clone();
        let record = serde_json::to_vec(&BundleRecord::from(&bundle))?;
        // Each retry follows a write another writer made between this read and the
        // swap; a writer that keeps losing gives up rather than spin.
        for _ in 0..STORE_ATTEMPTS {
            let raw = self.store.get_federated_bundle(&td)?;
            let stored = match &raw {
                Some(v) => Some(serde_json::from_slice::<BundleRecord>(v)?.to_bundle()?),
                None => None,
            };
            if let Some(s) = &stored {
                if bundle.sequence < s.sequence {
                    let reason = format!(
                        "spiffe_sequence {} is lower than the stored {}; bundle ignored",
                        bundle.sequence, s.sequence
                    );
                    self.refuse_bundle(&td, source, &reason);
                    return Err(Error::Precondition(reason));
                }
                let same = s.x509_authorities == bundle.x509_authorities
                    && s.jwt_authorities == bundle.jwt_authorities;
                if bundle.sequence == s.sequence && same {
                    if s.refresh_hint_seconds == bundle.refresh_hint_seconds
                        || self.store.compare_and_put_federated_bundle(
                            &td,
                            raw.as_deref(),
                            relationship,
                            &record,
                        )?
                    {
                        return Ok(Some(Stored::Unchanged));
                    }
                    if self.relationship_moved(&td, relationship)? {
                        return Ok(None);
                    }
                    continue;
                }
                if bundle.sequence == s.sequence && bundle.sequence != 0 {
                    let reason = format!(
                        "content changed but spiffe_sequence stayed {}; bundle ignored",
                        bundle.sequence
                    );
                    self.refuse_bundle(&td, source, &reason);
                    return Err(Error::Precondition(reason));
                }
            }
            if !self.store.compare_and_put_federated_bundle(
                &td,
                raw.as_deref(),
                relationship,
                &record,
            )? {
                if self.relationship_moved(&td, relationship)? {
                    return Ok(None);
                }
                continue;
            }
            self.store.flush()?;
            self.record(
                json!({"type": "federated_bundle_updated", "trust_domain": td,
                "source": source.describe(), "sequence": bundle.sequence,
                "previous_sequence": stored.as_ref().map(|s| s.sequence),
                "x509_authorities": bundle.x509_authorities.len(),
                "jwt_authorities": bundle.jwt_authorities.iter().map(|k| &k.kid).collect::<Vec<_>>()}),
            )?;
            tracing::warn!(event = "federated_bundle_updated", trust_domain = %td, source = %source.describe(),
                sequence = bundle.sequence, x509_authorities = bundle.x509_authorities.len(),
                jwt_authorities = bundle.jwt_authorities.len(), "federated bundle updated");
            return Ok(Some(Stored::Updated));
        }
        let reason = format!(
            "the bundle of {td} kept changing while this one was stored ({STORE_ATTEMPTS} \
             tries); try again"
        );
        self.refuse_bundle(&td, source, &reason);
        Err(Error::Precondition(reason))
    }

    /// Whether the relationship a store is bound to (its stored bytes) no longer is.
    fn relationship_moved(&self, td: &str, relationship: Option<&[u8]>) -> Result<bool> {
        let Some(want) = relationship else {
            return Ok(false);
        };
        Ok(match self.federation_with_bytes(td) {
            Ok((raw, _)) => raw != want,
            Err(Error::NotFound(_)) => true,
            Err(e) => return Err(e),
        })
    }

    /// `bundle set`: parses and stores an out-of-band bundle.
    pub fn set_federated_bundle_from(
        &self,
        td: &str,
        format: &str,
        data: &[u8],
        caller: &str,
    ) -> Result<(TrustBundle, Stored)> {
        let td = check_trust_domain(self, td)?;
        // A PEM bundle has no sequence: it takes the next one. A peer's endpoint may
        // have sent the largest there is.
        let pem_seq = match self.federated_bundle(&td)? {
            None => Some(1),
            Some(b) => b.sequence.checked_add(1),
        };
        let pem_seq = match pem_seq {
            Some(s) => s,
            None if format == "pem" => {
                let reason = format!(
                    "the stored bundle of {td} has the largest spiffe_sequence; \
                     delete it (`bundle delete {td}`) before setting a PEM bundle"
                );
                self.refuse_bundle(&td, Source::Operator(caller), &reason);
                return Err(Error::Precondition(reason));
            }
            // Only a PEM bundle uses it.
            None => 0,
        };
        let bundle = match parse_bundle(&td, format, data, pem_seq) {
            Ok(b) => b,
            Err(e) => {
                self.refuse_bundle(&td, Source::Operator(caller), &e.to_string());
                return Err(e);
            }
        };
        let stored = {
            let _writes = self.federation_writes();
            self.set_federated_bundle(bundle, Source::Operator(caller))?
        };
        Ok((self.federated_bundle(&td)?.unwrap_or_default(), stored))
    }

    /// Deletes a federated bundle.
    pub fn delete_federated_bundle(&self, td: &str, caller: &str) -> Result<TrustBundle> {
        let td = check_trust_domain(self, td)?;
        let _writes = self.federation_writes();
        let b = self
            .federated_bundle(&td)?
            .ok_or_else(|| Error::NotFound(format!("no bundle of {td} is stored")))?;
        self.store.delete_federated_bundle(&td)?;
        self.store.flush()?;
        self.record(
            json!({"type": "federated_bundle_deleted", "trust_domain": td, "caller": caller}),
        )?;
        tracing::warn!(event = "federated_bundle_deleted", trust_domain = %td, caller, "federated bundle deleted");
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's endpoint may send `spiffe_sequence` 2^64-1 (the spec sets no upper
    /// bound). An operator's PEM bundle then has no next sequence: refused with what to
    /// do, not an arithmetic overflow (a panic in debug builds, and in release a
    /// sequence of 0 "lower than the stored one").
    #[test]
    fn a_pem_bundle_after_the_largest_sequence_is_refused_with_what_to_do() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = ca.self_signed(&key).unwrap();
        let doc = json!({"keys": [], "spiffe_sequence": u64::MAX}).to_string();
        core.set_federated_bundle_from("b.test", "spiffe", doc.as_bytes(), "test")
            .unwrap();
        let err = core
            .set_federated_bundle_from("b.test", "pem", cert.pem().as_bytes(), "test")
            .unwrap_err();
        assert!(matches!(err, Error::Precondition(_)), "{err:?}");
        assert!(
            err.to_string().contains(
                "the stored bundle of b.test has the largest spiffe_sequence; \
                 delete it (`bundle delete b.test`) before setting a PEM bundle"
            ),
            "{err}"
        );
        assert_eq!(
            core.federated_bundle("b.test").unwrap().unwrap().sequence,
            u64::MAX
        );
    }

    #[test]
    fn versions_differ() {
        let a = TrustBundle {
            trust_domain: "a.test".into(),
            sequence: 1,
            ..Default::default()
        };
        let mut b = a.clone();
        b.sequence = 2;
        assert_ne!(version_of(std::slice::from_ref(&a)), version_of(&[b]));
        assert_ne!(version_of(&[]), 0);
    }
}
