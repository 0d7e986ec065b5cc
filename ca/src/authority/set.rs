//! The lifecycle of the trust domain's authorities, X.509 and JWT alike:
//! prepared → active → old, with taint and revoke.
//!
//! - A *prepared* authority is in the bundle but signs nothing yet, so every
//!   relying party learns it before the first SVID it signs appears.
//! - *Activation* makes it the signer; the previous active one becomes *old* and
//!   stays in the bundle while SVIDs it signed may live.
//! - *Taint* marks an old authority as compromised or retiring: agents replace every
//!   SVID it signed (theirs included) at their next sync.
//! - *Revoke* removes a tainted authority from the bundle and destroys its key, but
//!   only once no agent reports anything live that depends on it.
//!
//! Rotation is automatic too: prepare when less than min(TTL/2, 30 days) of the
//! active authority's life is left, activate at min(TTL/6, 7 days). Every change is
//! persisted before it takes effect, so a restart resumes at the same step, and
//! every change of the bundle's contents increments `spiffe_sequence`.
//!
//! Several servers on one database (issue 13): each server has its own authorities
//! (its own CA state, under its server id, whose keys only its key manager holds) and
//! changes only those; the bundle it serves is the union of every server's
//! authorities. The other servers' states ("peers") are read with
//! [`DataStore::cluster_ca_states`] at open and by [`AuthoritySet::reload_cluster`]
//! (on every `Authorities` change notification, and on a slow timer).
//!
//! The union's `spiffe_sequence` is the SUM of every server's own `bundle_sequence`.
//! Why: agents take a bundle only when its sequence is higher than the one they hold,
//! so a bundle with new contents must never carry a sequence an agent has already
//! taken with other contents. Each server's own sequence only grows (drawn from
//! [`DataStore::next_bundle_sequence`] at each change of its contents), and a server
//! reads peers' rows monotonically (reloads are serialised), so every view a server
//! publishes is, row by row, at or below the fully converged one; a view that lacks
//! any change has a strictly smaller sum than the view that has it. A maximum would
//! not do: with out-of-order commits (A draws 7, B draws 8 and commits first) the
//! views {A:old, B:8} and {A:7, B:8} share the maximum 8, and an agent holding the
//! first would never take the second. Two servers may briefly publish different
//! partial views with one sum while notifications are in flight; both then converge
//! on the full view, whose sum is higher than either, so every agent gets it at its
//! next sync. With one server the sum is its own sequence, as before.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use spiffe::TrustDomain;
use ztid_hsm::KeyManager;
use ztid_spiffe::bundle::TrustBundle;
use ztid_spiffe::jwt::JwtKey;
use ztid_spiffe::tls::{shared_roots, SharedRoots};

use super::jwt::JwtAuthority;
use super::upstream::Upstream;
use super::x509::X509Authority;
use crate::datastore::{AuthorityRecord, AuthorityState, CaState, DataStore};
use crate::{Error, Result};

/// Which family of authorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// X.509 CAs.
    X509,
    /// JWT signing keys.
    Jwt,
}

impl Kind {
    /// Parses `x509` or `jwt`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "x509" => Ok(Kind::X509),
            "jwt" => Ok(Kind::Jwt),
            other => Err(Error::InvalidInput(format!(
                "authority kind must be x509 or jwt, not {other:?}"
            ))),
        }
    }

    /// `x509` or `jwt`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::X509 => "x509",
            Kind::Jwt => "jwt",
        }
    }
}

/// Lifetimes the set creates authorities with.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// X.509 CA lifetime, seconds.
    pub x509: i64,
    /// JWT key lifetime, seconds.
    pub jwt: i64,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint: i64,
}

/// What changed, for the caller to log and act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The kind.
    pub kind: Kind,
    /// What happened (`prepared`, `activated`, `tainted`, `revoked`, `expired`).
    pub action: &'static str,
    /// The authority id.
    pub id: String,
}

/// The authorities and the bundle built from them.
pub struct AuthoritySet {
    trust_domain: TrustDomain,
    key_manager: Arc<dyn KeyManager>,
    store: Arc<dyn DataStore>,
    lifetimes: Lifetimes,
    upstream: Option<Arc<Upstream>>,
    /// This server's id: its CA state in the datastore.
    server_id: String,
    state: Mutex<CaState>,
    /// Every other server's CA state, by server id. Lock order: `state`, then `peers`.
    peers: Mutex<Vec<(String, CaState)>>,
    /// Serialises [`AuthoritySet::reload_cluster`], so an older read never replaces a
    /// newer one.
    reload: Mutex<()>,
    /// Unix seconds of the last successful cluster read.
    reloaded_at: std::sync::atomic::AtomicI64,
    x509: ArcSwap<X509Authority>,
    jwt: ArcSwap<JwtAuthority>,
    bundle: ArcSwap<TrustBundle>,
    roots: SharedRoots,
}

fn records(state: &mut CaState, kind: Kind) -> &mut Vec<AuthorityRecord> {
    match kind {
        Kind::X509 => &mut state.x509,
        Kind::Jwt => &mut state.jwt,
    }
}

fn active_of(list: &[AuthorityRecord], kind: Kind) -> Result<&AuthorityRecord> {
    list.iter()
        .rev()
        .find(|a| a.state == AuthorityState::Active)
        .ok_or_else(|| {
            Error::Config(format!(
                "no active {} authority in the datastore",
                kind.as_str()
            ))
        })
}

/// Every server's state, ordered by server id, so every server builds the same bundle
/// from the same states.
fn cluster_of<'a>(
    own_id: &'a str,
    own: &'a CaState,
    peers: &'a [(String, CaState)],
) -> Vec<(&'a str, &'a CaState)> {
    let mut all: Vec<(&str, &CaState)> = peers.iter().map(|(id, s)| (id.as_str(), s)).collect();
    all.push((own_id, own));
    all.sort_by(|a, b| a.0.cmp(b.0));
    all
}

/// The bundle: the live authorities of every state in `states` (or, under an upstream
/// authority, its roots for X.509), with the sum of their sequences (see the module
/// documentation for why a sum).
fn bundle_of(
    td: &TrustDomain,
    states: &[&CaState],
    refresh_hint: i64,
    now: i64,
    upstream_roots: Option<&[Vec<u8>]>,
) -> TrustBundle {
    let live = |a: &&AuthorityRecord| a.not_after > now;
    TrustBundle {
        trust_domain: td.to_string(),
        x509_authorities: match upstream_roots {
            Some(roots) => roots.to_vec(),
            None => states
                .iter()
                .flat_map(|s| &s.x509)
                .filter(live)
                .map(|a| a.cert_der.clone())
                .collect(),
        },
        jwt_authorities: states
            .iter()
            .flat_map(|s| &s.jwt)
            .filter(live)
            .map(|a| JwtKey {
                kid: a.id.clone(),
                spki: a.public_key.clone(),
            })
            .collect(),
        sequence: states
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.bundle_sequence)),
        refresh_hint_seconds: refresh_hint,
        tainted: states
            .iter()
            .flat_map(|s| s.x509.iter().chain(&s.jwt))
            .filter(|a| a.tainted && live(a))
            .map(|a| a.id.clone())
            .collect(),
    }
}

impl AuthoritySet {
    /// Loads the authorities, creating the first X.509 CA and JWT key on first start.
    pub fn open(
        trust_domain: TrustDomain,
        key_manager: Arc<dyn KeyManager>,
        store: Arc<dyn DataStore>,
        lifetimes: Lifetimes,
        upstream: Option<Arc<Upstream>>,
        now: i64,
    ) -> Result<Self> {
        let server_id = store.server_id().to_string();
        let state = match store.load_ca_state()? {
            Some(CaState {
                retired_at: Some(at),
                ..
            }) => return Err(crate::datastore::retired_refusal(&server_id, at)),
            Some(s) => s,
            None => {
                let x509 = X509Authority::create(
                    key_manager.clone(),
                    trust_domain.as_str(),
                    lifetimes.x509,
                    now,
                    AuthorityState::Active,
                    upstream.as_deref(),
                )?;
                let jwt = JwtAuthority::create(
                    key_manager.clone(),
                    lifetimes.jwt,
                    now,
                    AuthorityState::Active,
                )?;
                let s = CaState {
                    x509: vec![x509.record().clone()],
                    jwt: vec![jwt.record().clone()],
                    // Above every sequence the cluster has used (1 on a new store).
                    bundle_sequence: store.next_bundle_sequence()?,
                    retired_at: None,
                };
                store.store_ca_state(&s)?;
                tracing::info!(event = "authority_created", trust_domain = %trust_domain, x509_authority = %x509.record().id, jwt_authority = %jwt.record().id, key_backend = key_manager.backend_name(), "created the trust domain's first authorities");
                s
            }
        };
        let x509 = X509Authority::load(
            key_manager.clone(),
            active_of(&state.x509, Kind::X509)?.clone(),
        )?;
        let jwt = JwtAuthority::load(
            key_manager.clone(),
            active_of(&state.jwt, Kind::Jwt)?.clone(),
        )?;
        let peers: Vec<(String, CaState)> = store
            .cluster_ca_states()?
            .into_iter()
            .filter(|(id, _)| *id != server_id)
            .collect();
        let states: Vec<&CaState> = cluster_of(&server_id, &state, &peers)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let bundle = bundle_of(
            &trust_domain,
            &states,
            lifetimes.refresh_hint,
            now,
            upstream.as_ref().map(|u| u.roots.as_slice()),
        );
        let roots = shared_roots(bundle.x509_authorities.clone());
        Ok(Self {
            trust_domain,
            key_manager,
            store,
            lifetimes,
            upstream,
            server_id,
            peers: Mutex::new(peers),
            reload: Mutex::new(()),
            reloaded_at: now.into(),
            state: Mutex::new(state),
            x509: ArcSwap::from_pointee(x509),
            jwt: ArcSwap::from_pointee(jwt),
            bundle: ArcSwap::from_pointee(bundle),
            roots,
        })
    }

    fn upstream_roots(&self) -> Option<&[Vec<u8>]> {
        self.upstream.as_ref().map(|u| u.roots.as_slice())
    }

    /// The active X.509 authority.
    pub fn x509(&self) -> Arc<X509Authority> {
        self.x509.load_full()
    }

    /// The active JWT authority.
    pub fn jwt(&self) -> Arc<JwtAuthority> {
        self.jwt.load_full()
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// The bundle's X.509 authorities, for TLS verification.
    pub fn roots(&self) -> SharedRoots {
        self.roots.clone()
    }

    /// The key manager's backend name.
    pub fn key_backend(&self) -> &'static str {
        self.key_manager.backend_name()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, CaState>> {
        self.state
            .lock()
            .map_err(|_| Error::Internal("authority state lock poisoned".into()))
    }

    fn lock_peers(&self) -> Result<std::sync::MutexGuard<'_, Vec<(String, CaState)>>> {
        self.peers
            .lock()
            .map_err(|_| Error::Internal("cluster authority state lock poisoned".into()))
    }

    /// This server's id: the owner of the authorities [`list`](Self::list) returns.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Every authority of a kind, oldest first.
    pub fn list(&self, kind: Kind) -> Result<Vec<AuthorityRecord>> {
        let mut guard = self.lock()?;
        Ok(records(&mut guard, kind).clone())
    }

    /// Every server's authorities of a kind, with the id of the server that owns each,
    /// ordered by server id, then oldest first (as of the last cluster reload).
    pub fn cluster_list(&self, kind: Kind) -> Result<Vec<(String, AuthorityRecord)>> {
        let guard = self.lock()?;
        let peers = self.lock_peers()?;
        Ok(cluster_of(&self.server_id, &guard, &peers)
            .into_iter()
            .flat_map(|(id, s)| {
                let list = match kind {
                    Kind::X509 => &s.x509,
                    Kind::Jwt => &s.jwt,
                };
                list.iter().map(move |a| (id.to_string(), a.clone()))
            })
            .collect())
    }

    /// The refusal for an authority `id` this server does not own: which server owns
    /// it, if one does (each server changes only its own authorities: their keys are
    /// in its key manager, and its CA state is written by it alone, so no write of
    /// another server can be lost under its own), else `NotFound`.
    fn not_own(&self, kind: Kind, id: &str) -> Error {
        let owner = self.lock_peers().ok().and_then(|peers| {
            peers.iter().find_map(|(server, s)| {
                let list = match kind {
                    Kind::X509 => &s.x509,
                    Kind::Jwt => &s.jwt,
                };
                list.iter().any(|a| a.id == id).then(|| server.clone())
            })
        });
        let retired = owner.as_ref().is_some_and(|server| {
            self.lock_peers().is_ok_and(|p| {
                p.iter()
                    .any(|(id, s)| id == server && s.retired_at.is_some())
            })
        });
        match owner {
            Some(server) if retired => Error::Precondition(format!(
                "{} authority {id} belongs to server {server}, which is retired: its \
                 authorities were tainted then; revoke it through any server",
                kind.as_str()
            )),
            Some(server) => Error::Precondition(format!(
                "{} authority {id} belongs to server {server}: change it through that \
                 server's admin API (each server changes only its own authorities, whose \
                 keys only it holds)",
                kind.as_str()
            )),
            None => Error::NotFound(format!("no {} authority {id}", kind.as_str())),
        }
    }

    /// The DER certificates of every server's X.509 authorities (not only the live
    /// ones: a chain check applies validity itself).
    pub fn cluster_x509_certs(&self) -> Result<Vec<Vec<u8>>> {
        let guard = self.lock()?;
        let peers = self.lock_peers()?;
        Ok(cluster_of(&self.server_id, &guard, &peers)
            .into_iter()
            .flat_map(|(_, s)| s.x509.iter().map(|a| a.cert_der.clone()))
            .collect())
    }

    /// Re-reads every other server's CA state and, if any changed, publishes the new
    /// bundle (a new bundle object: what caches keyed on it start over). Returns
    /// whether anything changed. Reloads are serialised, so the states only move
    /// forward (see the module documentation for why that matters).
    pub fn reload_cluster(&self, now: i64) -> Result<bool> {
        let _serial = self
            .reload
            .lock()
            .map_err(|_| Error::Internal("cluster reload lock poisoned".into()))?;
        let all = self.store.cluster_ca_states()?;
        self.reloaded_at
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let guard = self.lock()?;
        let mut peers = self.lock_peers()?;
        let mut fresh = Vec::with_capacity(all.len());
        for (id, s) in all {
            if id != self.server_id {
                fresh.push((id, s));
            } else if s.bundle_sequence > guard.bundle_sequence {
                // Only this server writes its row: a newer one there means another
                // process runs under the same id (a copied data directory).
                tracing::error!(server_id = %id, stored = s.bundle_sequence, held = guard.bundle_sequence,
                    "this server's CA state was changed by another process: two servers share the id in DATA_DIR/server-id");
            }
        }
        if *peers == fresh {
            return Ok(false);
        }
        *peers = fresh;
        self.publish(&guard, &peers, now);
        tracing::info!(
            servers = peers.len() + 1,
            bundle_sequence = self.bundle.load().sequence,
            "cluster authorities reloaded"
        );
        Ok(true)
    }

    /// Seconds since the other servers' states were last read.
    pub fn seconds_since_reload(&self, now: i64) -> i64 {
        now - self.reloaded_at.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the bundle of `own` and `peers` current (bundle and TLS roots).
    fn publish(&self, own: &CaState, peers: &[(String, CaState)], now: i64) {
        let states: Vec<&CaState> = cluster_of(&self.server_id, own, peers)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let bundle = bundle_of(
            &self.trust_domain,
            &states,
            self.lifetimes.refresh_hint,
            now,
            self.upstream_roots(),
        );
        self.roots.store(Arc::new(
            bundle
                .x509_authorities
                .iter()
                .cloned()
                .map(Into::into)
                .collect(),
        ));
        self.bundle.store(Arc::new(bundle));
    }

    /// Persists `next`, then makes it current: a crash between the two leaves the
    /// persisted state, which is what a restart loads.
    fn commit(&self, guard: &mut CaState, mut next: CaState, now: i64) -> Result<()> {
        // This server's own contents decide whether its sequence moves.
        let before = bundle_of(
            &self.trust_domain,
            &[&*guard],
            self.lifetimes.refresh_hint,
            now,
            self.upstream_roots(),
        );
        let after = bundle_of(
            &self.trust_domain,
            &[&next],
            self.lifetimes.refresh_hint,
            now,
            self.upstream_roots(),
        );
        if (
            &before.x509_authorities,
            &before.jwt_authorities,
            &before.tainted,
        ) != (
            &after.x509_authorities,
            &after.jwt_authorities,
            &after.tainted,
        ) {
            // Cluster-wide and above every stored sequence; never below our own + 1.
            next.bundle_sequence = self
                .store
                .next_bundle_sequence()?
                .max(guard.bundle_sequence.saturating_add(1));
        }
        self.store.store_ca_state(&next)?;
        let x509 = active_of(&next.x509, Kind::X509)?;
        if x509.id != self.x509.load().record().id {
            self.x509.store(Arc::new(X509Authority::load(
                self.key_manager.clone(),
                x509.clone(),
            )?));
        }
        let jwt = active_of(&next.jwt, Kind::Jwt)?;
        if jwt.id != self.jwt.load().record().id {
            self.jwt.store(Arc::new(JwtAuthority::load(
                self.key_manager.clone(),
                jwt.clone(),
            )?));
        }
        {
            let peers = self.lock_peers()?;
            self.publish(&next, &peers, now);
        }
        *guard = next;
        Ok(())
    }

    fn create(&self, kind: Kind, now: i64) -> Result<AuthorityRecord> {
        Ok(match kind {
            Kind::X509 => X509Authority::create(
                self.key_manager.clone(),
                self.trust_domain.as_str(),
                self.lifetimes.x509,
                now,
                AuthorityState::Prepared,
                self.upstream.as_deref(),
            )?
            .record()
            .clone(),
            Kind::Jwt => JwtAuthority::create(
                self.key_manager.clone(),
                self.lifetimes.jwt,
                now,
                AuthorityState::Prepared,
            )?
            .record()
            .clone(),
        })
    }

    /// Creates a prepared authority and publishes it in the bundle.
    pub fn prepare(&self, kind: Kind, now: i64) -> Result<AuthorityRecord> {
        let mut guard = self.lock()?;
        if let Some(p) = records(&mut guard, kind)
            .iter()
            .find(|a| a.state == AuthorityState::Prepared)
        {
            return Err(Error::Precondition(format!(
                "{} authority {} is prepared already; activate it first",
                kind.as_str(),
                p.id
            )));
        }
        let record = self.create(kind, now)?;
        let mut next = guard.clone();
        records(&mut next, kind).push(record.clone());
        self.commit(&mut guard, next, now)?;
        Ok(record)
    }

    /// Makes the prepared authority the signer; the active one becomes old.
    pub fn activate(&self, kind: Kind, now: i64) -> Result<AuthorityRecord> {
        let mut guard = self.lock()?;
        let mut next = guard.clone();
        let list = records(&mut next, kind);
        // On the copy `next`: nothing is kept unless it is committed.
        for a in list.iter_mut() {
            if a.state == AuthorityState::Active {
                a.state = AuthorityState::Old;
            }
        }
        let Some(prepared) = list
            .iter_mut()
            .find(|a| a.state == AuthorityState::Prepared)
        else {
            return Err(Error::Precondition(format!(
                "no prepared {} authority: run prepare first",
                kind.as_str()
            )));
        };
        prepared.state = AuthorityState::Active;
        let record = prepared.clone();
        self.commit(&mut guard, next, now)?;
        Ok(record)
    }

    /// Taints an old authority: every SVID it signed is to be replaced.
    pub fn taint(&self, kind: Kind, id: &str, now: i64) -> Result<AuthorityRecord> {
        let mut guard = self.lock()?;
        let mut next = guard.clone();
        let a = records(&mut next, kind)
            .iter_mut()
            .find(|a| a.id == id)
            .ok_or_else(|| self.not_own(kind, id))?;
        match (a.state, a.tainted) {
            (_, true) => {
                return Err(Error::Precondition(format!(
                    "{} authority {id} is tainted already",
                    kind.as_str()
                )))
            }
            (AuthorityState::Active, _) => {
                return Err(Error::Precondition(format!(
                "{} authority {id} is active: prepare and activate a successor before tainting it",
                kind.as_str()
            )))
            }
            (AuthorityState::Prepared, _) => {
                return Err(Error::Precondition(format!(
                    "{} authority {id} is only prepared; nothing to taint",
                    kind.as_str()
                )))
            }
            (AuthorityState::Old, false) => {}
        }
        a.tainted = true;
        a.tainted_at = now;
        let record = a.clone();
        self.commit(&mut guard, next, now)?;
        Ok(record)
    }

    /// Revokes a tainted authority: out of the bundle, key destroyed. `still_used`
    /// names a holder that still depends on it (an agent that reported it in use, or
    /// has not synced since the taint); while there is one, nothing changes.
    pub fn revoke(
        &self,
        kind: Kind,
        id: &str,
        now: i64,
        still_used: impl Fn(&AuthorityRecord) -> Option<String>,
    ) -> Result<AuthorityRecord> {
        let mut guard = self.lock()?;
        let mut next = guard.clone();
        let list = records(&mut next, kind);
        let Some((i, record)) = list
            .iter()
            .enumerate()
            .find(|(_, a)| a.id == id)
            .map(|(i, a)| (i, a.clone()))
        else {
            drop(guard);
            return self.revoke_retired(kind, id, now, still_used);
        };
        if !record.tainted {
            return Err(Error::Precondition(format!(
                "{} authority {id} is not tainted: taint it first",
                kind.as_str()
            )));
        }
        if let Some(holder) = still_used(&record) {
            return Err(Error::Precondition(format!(
                "{} authority {id} is still in use: {holder}",
                kind.as_str()
            )));
        }
        list.remove(i);
        self.commit(&mut guard, next, now)?;
        if let Err(e) = self.key_manager.destroy(&record.key_id) {
            tracing::warn!(key_id = %record.key_id, error = %e, "could not destroy the revoked authority's key");
        }
        Ok(record)
    }

    /// The servers retired (as last read), with when.
    pub fn retired_servers(&self) -> Result<Vec<(String, i64)>> {
        Ok(self
            .lock_peers()?
            .iter()
            .filter_map(|(id, s)| s.retired_at.map(|at| (id.clone(), at)))
            .collect())
    }

    /// Retires server `server_id`, which an operator says is gone for good (the caller
    /// checked that it does not run): every authority of it is tainted, so agents and
    /// workloads move off what it signed, and its state is marked so that it never
    /// signs again. Returns its authorities as they are now.
    pub fn retire_peer(&self, server_id: &str, now: i64) -> Result<Vec<(Kind, AuthorityRecord)>> {
        if server_id == self.server_id {
            return Err(Error::Precondition(format!(
                "server {server_id} is the server you are talking to: stop it and retire it \
                 through another server of the cluster"
            )));
        }
        let current = self
            .store
            .cluster_ca_states()?
            .into_iter()
            .find_map(|(id, s)| (id == server_id).then_some(s))
            .ok_or_else(|| Error::NotFound(format!("no server {server_id} in this cluster")))?;
        if let Some(at) = current.retired_at {
            return Err(Error::Precondition(format!(
                "server {server_id} was retired already, at {at} (Unix seconds)"
            )));
        }
        let mut next = current.clone();
        next.retired_at = Some(now);
        for a in next.x509.iter_mut().chain(next.jwt.iter_mut()) {
            if !a.tainted {
                a.tainted = true;
                a.tainted_at = now;
            }
        }
        self.replace_peer(server_id, &current, next, now)
    }

    /// Revokes authority `id` of a retired server (see [`Self::revoke`]); its key is in
    /// that server's key manager, out of reach here.
    fn revoke_retired(
        &self,
        kind: Kind,
        id: &str,
        now: i64,
        still_used: impl Fn(&AuthorityRecord) -> Option<String>,
    ) -> Result<AuthorityRecord> {
        let (server, current, record) = self
            .store
            .cluster_ca_states()?
            .into_iter()
            .filter(|(server, _)| *server != self.server_id)
            .find_map(|(server, s)| {
                let list = match kind {
                    Kind::X509 => &s.x509,
                    Kind::Jwt => &s.jwt,
                };
                let record = list.iter().find(|a| a.id == id)?.clone();
                Some((server, s, record))
            })
            .ok_or_else(|| Error::NotFound(format!("no {} authority {id}", kind.as_str())))?;
        if current.retired_at.is_none() {
            return Err(self.not_own(kind, id));
        }
        if let Some(holder) = still_used(&record) {
            return Err(Error::Precondition(format!(
                "{} authority {id} is still in use: {holder}",
                kind.as_str()
            )));
        }
        let mut next = current.clone();
        records(&mut next, kind).retain(|a| a.id != id);
        self.replace_peer(&server, &current, next, now)?;
        tracing::warn!(server_id = %server, key_id = %record.key_id,
            "revoked an authority of a retired server: its private key is wherever that server kept it; destroy it there");
        Ok(record)
    }

    /// Writes `next` over another server's `current` state with a new bundle sequence
    /// (so agents fetch the changed bundle), then reloads the cluster.
    fn replace_peer(
        &self,
        server_id: &str,
        current: &CaState,
        mut next: CaState,
        now: i64,
    ) -> Result<Vec<(Kind, AuthorityRecord)>> {
        next.bundle_sequence = self
            .store
            .next_bundle_sequence()?
            .max(current.bundle_sequence.saturating_add(1));
        if !self
            .store
            .compare_and_swap_peer_ca_state(server_id, current, &next)?
        {
            return Err(Error::Precondition(format!(
                "the state of server {server_id} changed meanwhile: try again"
            )));
        }
        self.reload_cluster(now)?;
        Ok(next
            .x509
            .iter()
            .map(|a| (Kind::X509, a.clone()))
            .chain(next.jwt.iter().map(|a| (Kind::Jwt, a.clone())))
            .collect())
    }

    /// Automatic rotation and pruning; returns what changed.
    pub fn tick(&self, now: i64) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        for kind in [Kind::X509, Kind::Jwt] {
            let (active, prepared) = {
                let mut g = self.lock()?;
                let list = records(&mut g, kind);
                (
                    active_of(list, kind)?.clone(),
                    list.iter().any(|a| a.state == AuthorityState::Prepared),
                )
            };
            let lifetime = (active.not_after - active.not_before).max(1);
            let left = active.not_after - now;
            if !prepared && left < (lifetime / 2).min(30 * 86400) {
                let r = self.prepare(kind, now)?;
                changes.push(Change {
                    kind,
                    action: "prepared",
                    id: r.id,
                });
            } else if prepared && left < (lifetime / 6).min(7 * 86400) {
                let r = self.activate(kind, now)?;
                changes.push(Change {
                    kind,
                    action: "activated",
                    id: r.id,
                });
            }
            // Old authorities past their end can vouch for nothing: drop them.
            let mut guard = self.lock()?;
            let expired: Vec<AuthorityRecord> = records(&mut guard, kind)
                .iter()
                .filter(|a| a.state == AuthorityState::Old && a.not_after <= now)
                .cloned()
                .collect();
            if !expired.is_empty() {
                let mut next = guard.clone();
                records(&mut next, kind).retain(|a| !expired.iter().any(|e| e.id == a.id));
                self.commit(&mut guard, next, now)?;
                for e in expired {
                    let _ = self.key_manager.destroy(&e.key_id);
                    changes.push(Change {
                        kind,
                        action: "expired",
                        id: e.id,
                    });
                }
            }
        }
        Ok(changes)
    }
}
