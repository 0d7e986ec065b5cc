//! The server's state and every operation the node and admin APIs expose, free of
//! gRPC types where it can be, so each rule lives in one place.
//!
//! [`CaCore`] and its constructor are here; each group of operations is in the file
//! named after it: [`agent_auth`] (who is calling), [`attestation`] (node attestation
//! and agent SVIDs), [`minting`] (workload and admin SVIDs), [`sync`] (entry sync),
//! [`registration`] (join tokens, entries, evict, ban), [`rotation`] (authorities),
//! [`policy`] (the issuance policy), [`server_svid`] (the server's own SVID),
//! [`grants`] and [`revocations`] (token exchange, issue 14),
//! [`store`] (opening the configured datastore, the server id), `cluster.rs`
//! (following the other servers on one database). The two
//! helpers the struct holds, `own_issued.rs` and `join_tokens.rs`, depend on nothing
//! here, so `mod.rs` imports no file that imports it back.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use serde_json::Value;
use spiffe::TrustDomain;
use ztid_hsm::KeyManager;
use ztid_spiffe::bundle::TrustBundle;
use ztid_spiffe::tls::SharedRoots;
use ztid_spiffe::unix_seconds;
use ztid_verifier::join_token::JoinTokenVerifier;
use ztid_verifier::multi::MultiVerifier;
use ztid_verifier::NodeVerifier;

use crate::audit::AuditLog;
use crate::authority::{AuthoritySet, Lifetimes};
use crate::config::ServerConfig;
use crate::datastore::DataStore;
use crate::{Error, Result};

pub mod agent_auth;
pub mod attestation;
mod cluster;
pub mod grants;
mod join_tokens;
pub mod minting;
mod own_issued;
pub mod policy;
pub mod registration;
pub mod revocations;
pub mod rotation;
pub mod server_svid;
pub mod store;
pub mod sync;
#[cfg(test)]
pub(crate) mod testing;

pub use agent_auth::AuthenticatedAgent;
pub use cluster::CLUSTER_RELOAD_FALLBACK_SECONDS;
use join_tokens::StoreTokens;
use own_issued::OwnIssuedCache;
pub use sync::SyncResult;

/// Now, in Unix seconds.
pub fn now() -> i64 {
    unix_seconds(SystemTime::now())
}

/// The server core.
pub struct CaCore {
    /// The configuration in effect.
    pub config: ServerConfig,
    /// The DNS names of the server's own certificate
    /// ([`ServerConfig::server_dns_names`]), which no entry may name: worked out once,
    /// as every mint checks them.
    pub(crate) server_dns_names: Vec<String>,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Persistent state.
    pub store: Arc<dyn DataStore>,
    /// Where the authorities' keys live.
    pub key_manager: Arc<dyn KeyManager>,
    /// The X.509 and JWT authorities and the bundle.
    pub authorities: AuthoritySet,
    /// The issuance policy, if configured.
    pub policy: Option<crate::policy::IssuancePolicy>,
    /// The tamper-evident audit log (absent only when disabled in config).
    pub audit: Option<Arc<AuditLog>>,
    verifiers: Vec<Arc<dyn NodeVerifier>>,
    multi: Option<Arc<MultiVerifier>>,
    server_svid: ArcSwap<CertifiedKey>,
    server_svid_expiry: std::sync::atomic::AtomicI64,
    /// Agent certificates already found signed by one of our authorities.
    own_issued: OwnIssuedCache,
    /// This server's liveness role on the datastore (see `cluster.rs`): held while it
    /// runs, so no other process under its id starts and it cannot be retired.
    liveness: std::sync::Mutex<Option<crate::datastore::LeaderGuard>>,
    /// Token-exchange grants and revocations in memory, re-read every few seconds
    /// (see `grants.rs`): the token endpoint reads them on every request.
    access: grants::AccessCache,
    /// Serialises this server's writes of federation relationships and federated
    /// bundles with a poll's check that the relationship it fetched for still stands
    /// (`federation::poller`).
    federation_writes: std::sync::Mutex<()>,
}

impl CaCore {
    /// Opens the data directory, creating the CA on first start.
    pub fn open(config: ServerConfig) -> Result<Arc<Self>> {
        let trust_domain = config.validate()?;
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(Error::io(format!("restricting {}", dir.display())))?;
        }
        // The key manager first: a wrong PIN or a missing token must leave nothing behind.
        let key_manager = crate::keys::key_manager(&config)?;
        let store = store::open_datastore(&config)?;
        let liveness = Self::take_liveness_at_start(store.as_ref())?;
        let t = now();
        let upstream = match &config.upstream {
            Some(u) => Some(Arc::new(crate::authority::Upstream::load(u, &key_manager)?)),
            None => None,
        };
        let authorities = AuthoritySet::open(
            trust_domain.clone(),
            key_manager.clone(),
            store.clone(),
            Lifetimes {
                x509: config.ca_ttl_seconds,
                jwt: config.jwt_key_ttl_seconds,
                refresh_hint: config.bundle_refresh_hint_seconds,
            },
            upstream,
            t,
        )?;
        let audit = if config.audit_enabled {
            // The datastore anchors the log outside its directory (rollback detection).
            Some(AuditLog::open_with(
                &dir.join("audit"),
                key_manager.clone(),
                crate::audit::AuditOptions {
                    store: Some(store.clone()),
                    accept_rollback: None,
                },
            )?)
        } else {
            tracing::warn!("the audit log is disabled by configuration");
            None
        };
        let policy = match &config.issuance_policy {
            Some(p) => Some(crate::policy::IssuancePolicy::load(p)?),
            None => None,
        };
        let mut verifiers: Vec<Arc<dyn NodeVerifier>> =
            vec![Arc::new(JoinTokenVerifier::new(StoreTokens(store.clone())))];
        let crate::attestors::Verifiers {
            single: hardware,
            multi,
        } = crate::attestors::configured_verifiers(&config)?;
        verifiers.extend(hardware);
        if let Some(m) = &multi {
            verifiers.push(m.clone());
        }
        let server_dns_names = config.server_dns_names();
        name_unusable_entries(&store, &trust_domain, server_dns_names.clone());
        let (svid, expiry) =
            Self::issue_server_svid(&authorities.x509(), &trust_domain, &config, t)?;
        let core = Arc::new(Self {
            config,
            server_dns_names,
            trust_domain,
            store,
            key_manager,
            authorities,
            policy,
            audit,
            verifiers,
            multi,
            server_svid: ArcSwap::from_pointee(svid),
            server_svid_expiry: expiry.into(),
            own_issued: OwnIssuedCache::default(),
            liveness: std::sync::Mutex::new(Some(liveness)),
            access: grants::AccessCache::default(),
            federation_writes: std::sync::Mutex::new(()),
        });
        core.watch_cluster()?;
        Ok(core)
    }

    /// Held while federation relationships or federated bundles are written (see
    /// [`Self::federation_writes`]'s field).
    pub(crate) fn federation_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.federation_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.authorities.bundle()
    }

    /// The X.509 authorities as shared roots for TLS verification.
    pub fn roots(&self) -> SharedRoots {
        self.authorities.roots()
    }

    /// Appends a security event to the audit log.
    pub fn record(&self, event: Value) -> Result<()> {
        self.record_event(&event)
    }

    /// [`Self::record`] for a typed event (serialised as a JSON object).
    pub fn record_event<E: serde::Serialize + ?Sized>(&self, event: &E) -> Result<()> {
        if let Some(a) = &self.audit {
            a.append_event(event)?;
            crate::metrics::audit_appended();
        }
        Ok(())
    }

    /// Waits until every event recorded so far is durable: call before answering.
    pub async fn audit_barrier(&self) -> Result<()> {
        match &self.audit {
            Some(a) => a.durable(a.last_seq()).await,
            None => Ok(()),
        }
    }
}

/// Entries stored before IDs had one spelling and the reserved names were closed can
/// mint nothing now (every mint refuses them): names them once, at start, in the
/// background and a page at a time, so a large store neither delays the start nor
/// is held in memory whole (a full listing at 1,000,000 entries did both).
fn name_unusable_entries(
    store: &Arc<dyn DataStore>,
    trust_domain: &TrustDomain,
    server_dns_names: Vec<String>,
) {
    const PAGE: usize = 1000;
    let store = store.clone();
    let trust_domain = trust_domain.clone();
    let spawned = std::thread::Builder::new()
        .name("ztid-entry-check".into())
        .spawn(move || {
            let filter = crate::datastore::EntryFilter::default();
            let mut after: Option<String> = None;
            loop {
                let page = match store.list_entries_page(&filter, after.as_deref(), PAGE) {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(event = "entry_check_failed", error = %e, "could not list the stored entries to name unusable ones");
                        return;
                    }
                };
                for e in &page {
                    if let Some(why) =
                        crate::entries::unusable_reason(&trust_domain, e, &server_dns_names)
                    {
                        tracing::warn!(event = "entry_unusable", entry = %e.id, spiffe_id = %e.spiffe_id, reason = %why,
                            "stored entry is refused at every mint; update it (or delete it and create it again) within the entry rules");
                    }
                }
                match page.last() {
                    Some(last) if page.len() == PAGE => after = Some(last.id.clone()),
                    _ => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(event = "entry_check_failed", error = %e, "could not start the stored-entry check");
    }
}
