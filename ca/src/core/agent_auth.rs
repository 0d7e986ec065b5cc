//! Authenticating agents on node API calls: the peer certificate must be one this
//! cluster's own X.509 authorities signed (remembered per bundle in `own_issued.rs`),
//! current for an attested, unbanned agent.
//!
//! Several servers on one database: an agent attested through server A calls server B
//! when A stops answering, so "own" means any server's authority in the shared
//! database. That is no wider trust: those rows are written only by servers holding
//! the database credentials, which could as well write the agent records themselves;
//! a CA that is merely under the same upstream root is still refused.
//!
//! Nothing about an agent is cached between calls: its record (eviction, ban, current
//! serial) is read from the datastore on every call, so an `agent evict` or `ban`
//! through any server refuses the agent's next call on every server, with no
//! invalidation to miss. The certificate cache in `own_issued.rs` says only which
//! authority signed a certificate, and starts over whenever the bundle changes (a
//! revoked authority, on any server, publishes a new bundle after the reload its
//! change notification triggers).

use std::collections::BTreeSet;

use super::{now, CaCore};
use crate::datastore::AgentRecord;
use crate::error::StoreError;
use crate::{Error, RefusalKind, Result};

/// Attempts of one agent update before giving up: each failed attempt means another
/// write to the same agent landed in between, which a handful of calls cannot do many
/// times in a row.
pub(super) const AGENT_UPDATE_TRIES: usize = 16;

/// The refusal of an agent that has no record (evicted, or never attested).
pub(super) fn unknown_agent(id: &str) -> Error {
    Error::refused(
        RefusalKind::UnknownAgent,
        format!("agent {id} is not attested (evicted or unknown)"),
    )
}

/// The refusal of a banned agent.
pub(super) fn banned_agent(id: &str) -> Error {
    Error::refused(RefusalKind::Banned, format!("agent {id} is banned"))
}

/// The error when an agent's record kept changing under an update.
pub(super) fn agent_update_contended(id: &str) -> Error {
    Error::Store(StoreError::Database(format!(
        "agent {id} changed under {AGENT_UPDATE_TRIES} attempts to update it; try again"
    )))
}

/// An agent that presented a current SVID.
#[derive(Debug, Clone)]
pub struct AuthenticatedAgent {
    /// Its record.
    pub record: AgentRecord,
    /// Its SVID was signed by a tainted X.509 authority, whose key may be in other
    /// hands: anyone holding it can sign an agent's ID and current serial. Such a
    /// caller may sync and renew (what the agent does once it sees the taint), and
    /// mints nothing.
    pub tainted_issuer: bool,
}

impl AuthenticatedAgent {
    /// The parents whose entries this agent may mint: itself and its aliases.
    pub fn parents(&self) -> BTreeSet<&str> {
        let mut p: BTreeSet<&str> = self.record.aliases.iter().map(String::as_str).collect();
        p.insert(&self.record.spiffe_id);
        p
    }
}

/// Refuses a certificate whose key is not the one the agent's record binds to its
/// serial. The handshake proved the caller holds the certificate's key, so this
/// refuses whoever made a certificate for the agent's ID and serial with an authority
/// key (stolen, or tainted and in other hands) without holding the agent's own key.
/// A record from before the binding (`bound` empty) is accepted, except under a
/// tainted authority: that is the very case the binding is for, and such an agent
/// attests or registers again.
fn check_bound_key(id: &str, bound: &str, presented: &str, tainted_issuer: bool) -> Result<()> {
    if bound.is_empty() {
        if tainted_issuer {
            return Err(Error::refused(
                RefusalKind::StaleCredential,
                format!(
                    "agent {id}'s record does not name its SVID's key (stored by an earlier \
                     version) and its SVID's authority is tainted: the agent must attest \
                     again (a join-token agent: a new join token)"
                ),
            ));
        }
        return Ok(());
    }
    if bound != presented {
        return Err(Error::refused(
            RefusalKind::BadCredential,
            format!(
                "agent {id} presented its serial in a certificate for another key than the \
                 one it was issued (sha256 {presented}): someone holds an authority key"
            ),
        ));
    }
    Ok(())
}

impl CaCore {
    /// Updates an attested, unbanned agent's record with `f`, applied to the record as
    /// stored now (not as read when the call was authenticated), with a compare-and-swap:
    /// when another write (an eviction, a ban, a renewal, another sync, on any server)
    /// lands in between, the record is read again and `f` applied again, so that write
    /// is never undone. Refused as an unknown agent once evicted, as banned once banned.
    pub(super) fn modify_agent(
        &self,
        id: &str,
        mut f: impl FnMut(&AgentRecord) -> Result<AgentRecord>,
    ) -> Result<AgentRecord> {
        for _ in 0..AGENT_UPDATE_TRIES {
            let current = self.store.get_agent(id)?.ok_or_else(|| unknown_agent(id))?;
            if current.banned {
                return Err(banned_agent(id));
            }
            let new = f(&current)?;
            if self
                .store
                .compare_and_swap_agent(id, Some(&current), Some(&new))?
            {
                return Ok(new);
            }
        }
        Err(agent_update_contended(id))
    }

    /// True if one of the cluster's X.509 authorities (prepared, active or old, of any
    /// server) signed `leaf`; a revoked authority is no longer listed.
    pub(crate) fn issued_by_own_authority(&self, leaf: &[u8]) -> bool {
        // The bundle is read before the authorities: if they change in between, the
        // result is filed under the older bundle, which is no longer current.
        let bundle = self.authorities.bundle();
        let digest: [u8; 32] = match ring::digest::digest(&ring::digest::SHA256, leaf)
            .as_ref()
            .try_into()
        {
            Ok(d) => d,
            Err(_) => return false,
        };
        if self.own_issued.contains(&bundle, &digest) {
            return true;
        }
        let signed = self.chain_to_own_authority(leaf);
        if signed {
            self.own_issued.insert(bundle, digest);
        }
        signed
    }

    fn chain_to_own_authority(&self, leaf: &[u8]) -> bool {
        let Ok(own) = self.authorities.cluster_x509_certs() else {
            return false;
        };
        let own: Vec<rustls_pki_types::CertificateDer<'static>> =
            own.into_iter().map(Into::into).collect();
        ztid_spiffe::svid::verify_chain(
            &[rustls_pki_types::CertificateDer::from(leaf)],
            &own,
            rustls_pki_types::UnixTime::now(),
            ztid_spiffe::svid::Usage::Client,
        )
        .is_ok()
    }

    /// Checks the peer certificate of a node API call and returns the agent.
    /// The TLS layer has already validated the chain against the bundle.
    pub fn authenticate_agent(&self, leaf_der: Option<&[u8]>) -> Result<AuthenticatedAgent> {
        let leaf = leaf_der.ok_or_else(|| {
            Error::refused(
                RefusalKind::NoCredential,
                "node API call without an agent SVID",
            )
        })?;
        let facts = ztid_spiffe::svid::leaf_facts(leaf).map_err(|e| {
            Error::refused(RefusalKind::BadCredential, format!("peer certificate: {e}"))
        })?;
        let id = facts.spiffe_id.to_string();
        let serial = facts.serial_hex;
        // TLS accepted any chain to the bundle: under an upstream root, any CA under the
        // organisation's root. An agent's ID and serial are no secret, so only a
        // certificate the cluster's own X.509 authorities signed can be the agent's.
        if !self.issued_by_own_authority(leaf) {
            return Err(Error::refused(
                RefusalKind::BadCredential,
                // The wording predates clusters ("this server" = this cluster); scripts
                // and tests match it.
                format!("{id} is not in a certificate this server's X.509 authorities signed"),
            ));
        }
        let record = self
            .store
            .get_agent(&id)?
            .ok_or_else(|| unknown_agent(&id))?;
        if record.banned {
            return Err(banned_agent(&id));
        }
        let t = now();
        // TLS checked validity at the handshake only; a connection can outlive the
        // certificate, so check it on every call.
        if t >= facts.not_after {
            return Err(Error::refused(
                RefusalKind::BadCredential,
                format!("agent {id} presented an expired SVID"),
            ));
        }
        let bound_key = if serial == record.serial {
            &record.key_sha256
        } else if record.previous_serial.as_deref() == Some(serial.as_str())
            && t < record.previous_expires_at
        {
            record.previous_key_sha256.as_deref().unwrap_or_default()
        } else {
            return Err(Error::refused(
                RefusalKind::StaleCredential,
                format!("agent {id} presented an SVID that is no longer current"),
            ));
        };
        let tainted_issuer = self.issued_by_tainted_authority(leaf);
        check_bound_key(&id, bound_key, &facts.key_sha256, tainted_issuer)?;
        Ok(AuthenticatedAgent {
            record,
            tainted_issuer,
        })
    }

    /// Whether `leaf` chains to one of the cluster's tainted X.509 authorities (none is
    /// tainted most of the time, and then nothing is verified).
    pub(crate) fn issued_by_tainted_authority(&self, leaf: &[u8]) -> bool {
        let tainted: Vec<rustls_pki_types::CertificateDer<'static>> =
            match self.authorities.cluster_list(crate::authority::Kind::X509) {
                Ok(all) => all
                    .into_iter()
                    .filter(|(_, a)| a.tainted)
                    .map(|(_, a)| a.cert_der.into())
                    .collect(),
                // Unreadable: as if tainted (it refuses mints, never admits more).
                Err(_) => return true,
            };
        !tainted.is_empty()
            && ztid_spiffe::svid::verify_chain(
                &[rustls_pki_types::CertificateDer::from(leaf)],
                &tainted,
                rustls_pki_types::UnixTime::now(),
                ztid_spiffe::svid::Usage::Client,
            )
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{Kind, LeafTemplate};
    use crate::core::testing::{core_with_agent, fresh_csr};

    fn join_token_node() -> ztid_verifier::AttestedNode {
        ztid_verifier::AttestedNode {
            method: "join-token",
            node_id: "t1".into(),
            selectors: vec![ztid_spiffe::Selector::parse("join-token:id:t1").unwrap()],
            aliases: vec![],
            evidence_digest: [7; 32],
        }
    }

    /// What a thief of the active X.509 authority's key can make: a certificate for
    /// the agent's ID and `serial`, for a key of the thief's.
    fn forged(core: &CaCore, agent: &AgentRecord, serial: &str) -> Vec<u8> {
        let thief = rcgen::KeyPair::generate().unwrap();
        let leaf = core
            .authorities
            .x509()
            .forge_leaf(
                &thief,
                &LeafTemplate {
                    spiffe_id: agent.spiffe_id.clone(),
                    dns_names: vec![],
                    ip_addresses: vec![],
                    node: None,
                    ttl_seconds: 3600,
                },
                now(),
                &hex::decode(serial).unwrap(),
            )
            .unwrap();
        assert_eq!(leaf.serial, serial);
        leaf.chain[0].clone()
    }

    fn refused(core: &CaCore, leaf: &[u8]) -> Error {
        core.authenticate_agent(Some(leaf))
            .expect_err("a forged agent certificate was accepted")
    }

    /// The finding: anyone holding an authority key (a tainted authority's, or one
    /// stolen unnoticed) could sign the agent's ID and current serial and act as the
    /// agent. The record binds the serial to the agent's key, which the TLS handshake
    /// proves the caller holds.
    #[test]
    fn a_certificate_for_the_agents_serial_with_another_key_is_refused() {
        let (_dir, core, leaf, agent) = core_with_agent();
        assert_eq!(
            agent.record.key_sha256,
            ztid_spiffe::svid::key_sha256(&leaf).unwrap()
        );
        let fake = forged(&core, &agent.record, &agent.record.serial);
        let e = refused(&core, &fake);
        assert_eq!(e.refusal_kind(), Some(RefusalKind::BadCredential), "{e}");
        assert!(e.to_string().contains("for another key"), "{e}");
        // Tainted, the same: the thief of a tainted key cannot even sync or renew.
        let id = core.authorities.x509().record().id.clone();
        core.prepare_authority(Kind::X509, "test").unwrap();
        core.activate_authority(Kind::X509, "test").unwrap();
        core.taint_authority(Kind::X509, &id, "test").unwrap();
        let e = refused(&core, &fake);
        assert_eq!(e.refusal_kind(), Some(RefusalKind::BadCredential), "{e}");
        // The agent itself, with its own key, still syncs and renews.
        assert!(core.authenticate_agent(Some(&leaf)).unwrap().tainted_issuer);
    }

    /// A renewal binds the new SVID's key; the previous SVID stays accepted with its
    /// own key only, until it expires.
    #[test]
    fn renewal_binds_the_new_key_and_keeps_the_previous_one_for_its_serial() {
        let (_dir, core, _, _) = core_with_agent();
        let (record, first) = core
            .complete_attestation(&join_token_node(), &fresh_csr())
            .unwrap();
        let first = first.chain[0].clone();
        let agent = core.authenticate_agent(Some(&first)).unwrap();
        let renewed = core.renew_agent(&agent, &fresh_csr()).unwrap();
        let renewed_leaf = renewed.chain[0].clone();
        let stored = core.store.get_agent(&record.spiffe_id).unwrap().unwrap();
        assert_eq!(
            stored.key_sha256,
            ztid_spiffe::svid::key_sha256(&renewed_leaf).unwrap()
        );
        assert_eq!(stored.previous_key_sha256, Some(record.key_sha256.clone()));
        core.authenticate_agent(Some(&renewed_leaf)).unwrap();
        core.authenticate_agent(Some(&first)).unwrap();
        for serial in [&stored.serial, stored.previous_serial.as_ref().unwrap()] {
            let e = refused(&core, &forged(&core, &stored, serial));
            assert_eq!(e.refusal_kind(), Some(RefusalKind::BadCredential), "{e}");
            assert!(e.to_string().contains("for another key"), "{e}");
        }
    }

    /// A record stored before the binding: accepted as before, except under a tainted
    /// authority (the case the binding is for); a renewal binds it.
    #[test]
    fn a_record_from_before_the_binding_is_bound_at_renewal_and_refused_when_tainted() {
        let (_dir, core, _, _) = core_with_agent();
        let (record, leaf) = core
            .complete_attestation(&join_token_node(), &fresh_csr())
            .unwrap();
        let leaf = leaf.chain[0].clone();
        let mut old = record.clone();
        old.key_sha256.clear();
        core.store.put_agent(&old).unwrap();
        let agent = core.authenticate_agent(Some(&leaf)).unwrap();
        let renewed = core.renew_agent(&agent, &fresh_csr()).unwrap();
        let stored = core.store.get_agent(&record.spiffe_id).unwrap().unwrap();
        assert_eq!(
            stored.key_sha256,
            ztid_spiffe::svid::key_sha256(&renewed.chain[0]).unwrap()
        );
        // The previous SVID had no bound key: accepted while nothing is tainted...
        assert_eq!(stored.previous_key_sha256, None);
        core.authenticate_agent(Some(&leaf)).unwrap();
        // ...and refused once its authority is tainted.
        let id = core.authorities.x509().record().id.clone();
        core.prepare_authority(Kind::X509, "test").unwrap();
        core.activate_authority(Kind::X509, "test").unwrap();
        core.taint_authority(Kind::X509, &id, "test").unwrap();
        let e = refused(&core, &leaf);
        assert_eq!(e.refusal_kind(), Some(RefusalKind::StaleCredential), "{e}");
        assert!(
            e.to_string().contains("does not name its SVID's key"),
            "{e}"
        );
        // The bound current SVID, of the same tainted authority, still renews.
        let agent = core.authenticate_agent(Some(&renewed.chain[0])).unwrap();
        assert!(agent.tainted_issuer);
        core.renew_agent(&agent, &fresh_csr()).unwrap();
    }

    #[test]
    fn the_binding_check_itself() {
        let k = "ab".repeat(32);
        let other = "cd".repeat(32);
        check_bound_key("a", &k, &k, false).unwrap();
        check_bound_key("a", &k, &k, true).unwrap();
        check_bound_key("a", "", &k, false).unwrap();
        for (bound, tainted, kind) in [
            (k.as_str(), false, RefusalKind::BadCredential),
            (k.as_str(), true, RefusalKind::BadCredential),
            ("", true, RefusalKind::StaleCredential),
        ] {
            let e = check_bound_key("a", bound, &other, tainted).unwrap_err();
            assert_eq!(e.refusal_kind(), Some(kind), "{e}");
        }
    }
}
