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
        let id = ztid_spiffe::svid::spiffe_id_of_leaf(leaf)
            .map_err(|e| {
                Error::refused(RefusalKind::BadCredential, format!("peer certificate: {e}"))
            })?
            .to_string();
        let serial = ztid_spiffe::svid::serial_hex(leaf)
            .map_err(|e| Error::refused(RefusalKind::BadCredential, e.to_string()))?;
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
        let not_after = ztid_spiffe::svid::not_after(leaf)
            .map_err(|e| Error::refused(RefusalKind::BadCredential, e.to_string()))?;
        if t >= not_after {
            return Err(Error::refused(
                RefusalKind::BadCredential,
                format!("agent {id} presented an expired SVID"),
            ));
        }
        let current = serial == record.serial;
        let previous = record.previous_serial.as_deref() == Some(serial.as_str())
            && t < record.previous_expires_at;
        if !current && !previous {
            return Err(Error::refused(
                RefusalKind::StaleCredential,
                format!("agent {id} presented an SVID that is no longer current"),
            ));
        }
        Ok(AuthenticatedAgent {
            record,
            tainted_issuer: self.issued_by_tainted_authority(leaf),
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
