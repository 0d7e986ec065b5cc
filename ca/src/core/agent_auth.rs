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
use crate::{Error, RefusalKind, Result};

/// An agent that presented a current SVID.
#[derive(Debug, Clone)]
pub struct AuthenticatedAgent {
    /// Its record.
    pub record: AgentRecord,
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
    /// True if one of the cluster's X.509 authorities (prepared, active or old, of any
    /// server) signed `leaf`; a revoked authority is no longer listed.
    fn issued_by_own_authority(&self, leaf: &[u8]) -> bool {
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
        let record = self.store.get_agent(&id)?.ok_or_else(|| {
            Error::refused(
                RefusalKind::UnknownAgent,
                format!("agent {id} is not attested (evicted or unknown)"),
            )
        })?;
        if record.banned {
            return Err(Error::refused(
                RefusalKind::Banned,
                format!("agent {id} is banned"),
            ));
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
        Ok(AuthenticatedAgent { record })
    }
}
