//! Token-exchange grants (issue 14, docs/token-exchange.md "Grants"): what an identity
//! may obtain at the token endpoint, deny by default.
//!
//! The token endpoint asks [`CaCore::grants_for`] on every request, so grants (and
//! revocations, see `revocations.rs`) are served from an in-memory copy of the store,
//! [`AccessCache`]. It is HA-correct by time, not by notification: a copy older than
//! [`ACCESS_REFRESH_SECONDS`] is re-read from the store before it is used, so a grant or
//! revocation written through any server of a cluster counts on every other server
//! within that bound (below an agent's default sync interval, 5 s). A write through
//! this server drops its own copy at once. When the store cannot be read, a copy is
//! used until it is [`ACCESS_STALE_LIMIT_SECONDS`] old; after that every call fails
//! (the token endpoint refuses) rather than answer from an old copy, so a revocation is
//! never ignored for longer than that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::json;
use spiffe::TrustDomain;

use super::{now, CaCore};
use crate::datastore::{DataStore, GrantRecord, RevocationKind, RevocationRecord};
use crate::{Error, Result};

/// A copy of the grants and revocations older than this is re-read before use.
pub const ACCESS_REFRESH_SECONDS: u64 = 2;
/// A copy older than this is never used: the store could not be read for that long.
pub const ACCESS_STALE_LIMIT_SECONDS: u64 = 5;

/// Longest grant audience, bytes.
pub const MAX_AUDIENCE_BYTES: usize = 512;
/// Most scopes in one grant.
pub const MAX_SCOPES_PER_GRANT: usize = 64;
/// Longest scope, bytes.
pub const MAX_SCOPE_BYTES: usize = 128;
/// Longest a grant's scopes may be together, space-separated: the token endpoint reads
/// no longer `scope` (`sts::scope::MAX_SCOPE_TEXT_LEN`), so a token of a grant past it
/// would be refused wherever it is presented back.
pub const MAX_SCOPE_TEXT_BYTES: usize = 4096;
/// Highest `max_per_minute`.
pub const MAX_PER_MINUTE: u32 = 1_000_000;
/// Most node selectors in one grant.
pub const MAX_NODE_SELECTORS_PER_GRANT: usize = 32;
/// Longest node selector (`type:value`), bytes.
pub const MAX_NODE_SELECTOR_BYTES: usize = 512;

/// Whether a grant for `grant_id` (an entry's SPIFFE ID) covers `spiffe_id`: equal, or
/// `spiffe_id` is it plus one per-instance segment in the one form agents mint (32
/// lowercase hex characters, [`ztid_spiffe::spiffe_id::is_instance_segment`]): that ID
/// and every instance of it, never another entry below it (`<ID>/reports`). The same
/// rule as the token endpoint's `may_act` (`sts::chain::covers`).
pub fn grant_covers(grant_id: &str, spiffe_id: &str) -> bool {
    ztid_spiffe::spiffe_id::is_id_or_instance_of(grant_id, spiffe_id)
}

/// Whether an entry revocation of `revoked_id` reaches `spiffe_id`: equal, or it plus
/// one non-empty path segment of any form. Wider than [`grant_covers`] on purpose: a
/// revocation that reaches too far fails safe (it refuses), a grant that does would not.
pub fn covers(revoked_id: &str, spiffe_id: &str) -> bool {
    if revoked_id == spiffe_id {
        return true;
    }
    spiffe_id
        .strip_prefix(revoked_id)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|segment| !segment.is_empty() && !segment.contains('/'))
}

/// The IDs that may cover `spiffe_id`: itself and, when it has one more segment than
/// its parent, that parent.
pub(super) fn covering_ids(spiffe_id: &str) -> impl Iterator<Item = &str> {
    let parent = spiffe_id
        .rsplit_once('/')
        .filter(|(parent, segment)| !segment.is_empty() && !parent.ends_with('/'))
        .map(|(parent, _)| parent);
    std::iter::once(spiffe_id).chain(parent)
}

/// What the token endpoint reads on every request, indexed.
#[derive(Default)]
pub(super) struct AccessSnapshot {
    /// Grants by their SPIFFE ID, each list ordered by grant id.
    pub(super) grants: HashMap<String, Vec<GrantRecord>>,
    /// Every revocation read (expired ones too: expiry is checked at use).
    pub(super) revocations: Vec<RevocationRecord>,
    /// Instance, entry and admin revocations by their SPIFFE ID (indexes into
    /// `revocations`).
    pub(super) revocations_by_id: HashMap<String, Vec<usize>>,
    /// Node revocations by agent ID (indexes into `revocations`).
    pub(super) revocations_by_node: HashMap<String, Vec<usize>>,
}

impl AccessSnapshot {
    pub(super) fn build(grants: Vec<GrantRecord>, revocations: Vec<RevocationRecord>) -> Self {
        let mut by_id: HashMap<String, Vec<GrantRecord>> = HashMap::new();
        for g in grants {
            by_id.entry(g.spiffe_id.clone()).or_default().push(g);
        }
        for list in by_id.values_mut() {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let mut revocations_by_id: HashMap<String, Vec<usize>> = HashMap::new();
        let mut revocations_by_node: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in revocations.iter().enumerate() {
            match r.kind {
                RevocationKind::Instance | RevocationKind::Entry | RevocationKind::Admin => {
                    revocations_by_id
                        .entry(r.spiffe_id.clone())
                        .or_default()
                        .push(i)
                }
                RevocationKind::Node => revocations_by_node
                    .entry(r.target.clone())
                    .or_default()
                    .push(i),
            }
        }
        Self {
            grants: by_id,
            revocations,
            revocations_by_id,
            revocations_by_node,
        }
    }

    /// The grants for `audience` whose SPIFFE ID covers `spiffe_id`, ordered by id.
    pub(super) fn grants_for(&self, spiffe_id: &str, audience: &str) -> Vec<GrantRecord> {
        let mut found: Vec<GrantRecord> = covering_ids(spiffe_id)
            .filter_map(|id| self.grants.get(id))
            .flatten()
            .filter(|g| g.audience == audience && grant_covers(&g.spiffe_id, spiffe_id))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }
}

struct Loaded {
    snapshot: Arc<AccessSnapshot>,
    /// When it was read; `None`: never.
    at: Option<Instant>,
    /// The cache's generation when the read began: a local write since (a higher
    /// generation) makes it stale at once, even when the read ended after the write.
    generation: u64,
}

/// The in-memory copy of the grants and revocations (see the module docs).
pub struct AccessCache {
    loaded: ArcSwap<Loaded>,
    /// Raised by every write through this server.
    generation: AtomicU64,
    /// Held by the one caller re-reading the store; the others use the copy meanwhile.
    refreshing: Mutex<()>,
}

impl Default for AccessCache {
    fn default() -> Self {
        Self {
            loaded: ArcSwap::from_pointee(Loaded {
                snapshot: Arc::new(AccessSnapshot::default()),
                at: None,
                generation: 0,
            }),
            generation: AtomicU64::new(0),
            refreshing: Mutex::new(()),
        }
    }
}

impl AccessCache {
    /// Drops the copy: the next use re-reads the store (after a write through this
    /// server, so its own writes count at once).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// How old `loaded` is; `None` if never read, or a local write came after its read.
    fn age(&self, loaded: &Loaded) -> Option<Duration> {
        if loaded.generation != self.generation.load(Ordering::SeqCst) {
            return None;
        }
        loaded.at.map(|at| at.elapsed())
    }

    /// The copy, re-read from `store` first when it is older than
    /// [`ACCESS_REFRESH_SECONDS`].
    pub(super) fn snapshot(&self, store: &dyn DataStore) -> Result<Arc<AccessSnapshot>> {
        let refresh = Duration::from_secs(ACCESS_REFRESH_SECONDS);
        let stale_limit = Duration::from_secs(ACCESS_STALE_LIMIT_SECONDS);
        let current = self.loaded.load_full();
        let age = self.age(&current);
        if age.is_some_and(|a| a < refresh) {
            return Ok(current.snapshot.clone());
        }
        // After a local write the old copy is not used: the writer's next call sees
        // its write.
        let usable_meanwhile = age.is_some_and(|a| a < stale_limit);
        let _guard = if usable_meanwhile {
            match self.refreshing.try_lock() {
                Ok(g) => g,
                // Another caller is re-reading: the copy is still within its bound.
                Err(_) => return Ok(current.snapshot.clone()),
            }
        } else {
            self.refreshing
                .lock()
                .map_err(|_| Error::Internal("grant cache lock poisoned".into()))?
        };
        // Someone may have refreshed while this caller waited.
        let current = self.loaded.load_full();
        if self.age(&current).is_some_and(|a| a < refresh) {
            return Ok(current.snapshot.clone());
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let read = store
            .list_grants()
            .and_then(|g| Ok((g, store.list_revocations()?)));
        match read {
            Ok((grants, revocations)) => {
                let snapshot = Arc::new(AccessSnapshot::build(grants, revocations));
                self.loaded.store(Arc::new(Loaded {
                    snapshot: snapshot.clone(),
                    at: Some(Instant::now()),
                    generation,
                }));
                Ok(snapshot)
            }
            Err(e) if usable_meanwhile => {
                tracing::warn!(error = %e, "could not re-read grants and revocations; using the copy read moments ago");
                Ok(current.snapshot.clone())
            }
            Err(e) => Err(e),
        }
    }
}

/// Checks a grant an operator asks for and turns it into a record (id and time
/// assigned). `max_ttl` is the `[sts] max_ttl_seconds` in effect.
pub fn validate_new_grant(
    td: &TrustDomain,
    req: &GrantRecord,
    max_ttl: i64,
    now: i64,
) -> Result<GrantRecord> {
    crate::limits::check_len(
        "spiffe_id (bytes)",
        &req.spiffe_id,
        crate::limits::MAX_SPIFFE_ID_BYTES,
    )?;
    let spiffe_id = crate::entries::parse_claimable_id(td, "spiffe_id", &req.spiffe_id)?;
    if req.audience.is_empty() {
        return Err(Error::InvalidInput("audience must not be empty".into()));
    }
    crate::limits::check_len("audience (bytes)", &req.audience, MAX_AUDIENCE_BYTES)?;
    if !req.audience.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(Error::InvalidInput(
            "audience must be printable ASCII without spaces".into(),
        ));
    }
    if req.scopes.is_empty() {
        return Err(Error::InvalidInput(
            "a grant needs at least one scope".into(),
        ));
    }
    crate::limits::check_count("scopes", req.scopes.len(), MAX_SCOPES_PER_GRANT)?;
    let mut scopes = Vec::with_capacity(req.scopes.len());
    for s in &req.scopes {
        crate::limits::check_len("scope (bytes)", s, MAX_SCOPE_BYTES)?;
        // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(Error::InvalidInput(format!(
                "scope {s:?} is not an RFC 6749 scope token (printable ASCII, no space, quote or backslash)"
            )));
        }
        if !scopes.contains(s) {
            scopes.push(s.clone());
        }
    }
    let text_len = scopes
        .iter()
        .map(|s| s.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    if text_len > MAX_SCOPE_TEXT_BYTES {
        return Err(Error::InvalidInput(format!(
            "the scopes together are {text_len} bytes (space-separated); at most {MAX_SCOPE_TEXT_BYTES}"
        )));
    }
    if req.ttl_seconds < 0 || req.ttl_seconds > max_ttl {
        return Err(Error::InvalidInput(format!(
            "ttl_seconds must be 0 (the [sts] default) or 1..={max_ttl} ([sts] max_ttl_seconds), not {}",
            req.ttl_seconds
        )));
    }
    if req.max_per_minute > MAX_PER_MINUTE {
        return Err(Error::InvalidInput(format!(
            "max_per_minute must be at most {MAX_PER_MINUTE}, not {}",
            req.max_per_minute
        )));
    }
    crate::limits::check_count(
        "node_selectors",
        req.node_selectors.len(),
        MAX_NODE_SELECTORS_PER_GRANT,
    )?;
    let mut node_selectors = Vec::with_capacity(req.node_selectors.len());
    for s in &req.node_selectors {
        crate::limits::check_len("node selector (bytes)", s, MAX_NODE_SELECTOR_BYTES)?;
        match s.split_once(':') {
            Some((kind, value)) if !kind.is_empty() && !value.is_empty() => {}
            _ => {
                return Err(Error::InvalidInput(format!(
                    "node selector {s:?} is not TYPE:VALUE"
                )))
            }
        }
        if s.chars().any(char::is_control) {
            return Err(Error::InvalidInput(format!(
                "node selector {s:?} holds a control character"
            )));
        }
        if !node_selectors.contains(s) {
            node_selectors.push(s.clone());
        }
    }
    Ok(GrantRecord {
        id: crate::authority::random_hex(16)?,
        spiffe_id: spiffe_id.to_string(),
        audience: req.audience.clone(),
        scopes,
        ttl_seconds: req.ttl_seconds,
        max_per_minute: req.max_per_minute,
        node_selectors,
        may_delegate: req.may_delegate,
        created_at: now,
    })
}

impl CaCore {
    /// The grants for `audience` whose SPIFFE ID covers `spiffe_id` (equal, or
    /// `spiffe_id` is an instance of it, see [`grant_covers`]), ordered by grant id.
    /// Served from memory; a grant written through any server counts here within
    /// [`ACCESS_REFRESH_SECONDS`] (see the module docs).
    pub fn grants_for(&self, spiffe_id: &str, audience: &str) -> Result<Vec<GrantRecord>> {
        Ok(self
            .access
            .snapshot(self.store.as_ref())?
            .grants_for(spiffe_id, audience))
    }

    /// The longest lifetime a grant may name: `[sts] max_ttl_seconds`, or its default
    /// when the endpoint is not configured (a grant may be created before it is).
    pub fn grant_max_ttl(&self) -> i64 {
        self.config
            .sts
            .as_ref()
            .map_or(crate::config::StsConfig::DEFAULT_MAX_TTL_SECONDS, |s| {
                s.max_ttl_seconds
            })
    }

    /// Validates and stores a new grant (`req`'s id and creation time are assigned),
    /// and records `grant_created`.
    pub fn create_grant(&self, req: &GrantRecord, caller: &str) -> Result<GrantRecord> {
        let grant = validate_new_grant(&self.trust_domain, req, self.grant_max_ttl(), now())?;
        self.store.put_grant(&grant)?;
        self.access.invalidate();
        self.store.flush()?;
        self.record(json!({"type": "grant_created", "caller": caller, "grant": grant}))?;
        tracing::info!(event = "grant_created", caller, grant = %grant.id, spiffe_id = %grant.spiffe_id,
            audience = %grant.audience, "grant created");
        Ok(grant)
    }

    /// Every grant, ordered by id; only those for `spiffe_id` when given (exact match).
    pub fn list_grants(&self, spiffe_id: Option<&str>) -> Result<Vec<GrantRecord>> {
        let mut grants = self.store.list_grants()?;
        if let Some(id) = spiffe_id {
            grants.retain(|g| g.spiffe_id == id);
        }
        Ok(grants)
    }

    /// A grant by id (`NotFound` if there is none).
    pub fn get_grant(&self, id: &str) -> Result<GrantRecord> {
        self.store
            .get_grant(id)?
            .ok_or_else(|| Error::NotFound(format!("grant {id} does not exist")))
    }

    /// Deletes a grant, returning it (`NotFound` if there is none), and records
    /// `grant_deleted`.
    pub fn delete_grant(&self, id: &str, caller: &str) -> Result<GrantRecord> {
        let grant = self
            .store
            .delete_grant(id)?
            .ok_or_else(|| Error::NotFound(format!("grant {id} does not exist")))?;
        self.access.invalidate();
        self.store.flush()?;
        self.record(json!({"type": "grant_deleted", "caller": caller, "grant": grant}))?;
        tracing::info!(event = "grant_deleted", caller, grant = %grant.id, "grant deleted");
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, spiffe_id: &str, audience: &str) -> GrantRecord {
        GrantRecord {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            audience: audience.into(),
            scopes: vec!["tools.read".into()],
            ttl_seconds: 0,
            max_per_minute: 0,
            node_selectors: Vec::new(),
            may_delegate: false,
            created_at: 0,
        }
    }

    /// An instance of `spiffe://example.org/app`: one per-instance segment.
    const APP_INSTANCE: &str = "spiffe://example.org/app/0123456789abcdef0123456789abcdef";

    #[test]
    fn a_grant_covers_its_id_and_its_instances_only() {
        let g = "spiffe://example.org/app";
        assert!(grant_covers(g, "spiffe://example.org/app"));
        assert!(grant_covers(g, APP_INSTANCE));
        assert!(!grant_covers(g, "spiffe://example.org/app/"));
        assert!(!grant_covers(g, "spiffe://example.org/app/a/b"));
        assert!(!grant_covers(g, &format!("{APP_INSTANCE}/x")));
        assert!(!grant_covers(g, "spiffe://example.org/apple"));
        assert!(!grant_covers(g, "spiffe://example.org/ap"));
        assert!(!grant_covers(g, "spiffe://example.org"));
    }

    #[test]
    fn a_grant_does_not_cover_another_entry_below_its_id() {
        let g = "spiffe://example.org/app";
        for other in [
            "spiffe://example.org/app/reports",
            "spiffe://example.org/app/0123abcd",
            "spiffe://example.org/app/0123456789ABCDEF0123456789ABCDEF",
            "spiffe://example.org/app/0123456789abcdef0123456789abcdef0",
        ] {
            assert!(!grant_covers(g, other), "{other}");
        }
        // An entry revocation reaches further: refusing too much fails safe.
        assert!(covers(g, "spiffe://example.org/app/reports"));
        assert!(!covers(g, "spiffe://example.org/app/a/b"));
    }

    #[test]
    fn grants_for_matches_audience_and_covering_id() {
        let s = AccessSnapshot::build(
            vec![
                grant("b", "spiffe://example.org/app", "https://mcp.example"),
                grant("a", "spiffe://example.org/app", "https://mcp.example"),
                grant("c", "spiffe://example.org/app", "other"),
                grant("d", "spiffe://example.org/app/x", "https://mcp.example"),
                grant("e", "spiffe://example.org/ap", "https://mcp.example"),
            ],
            Vec::new(),
        );
        let ids = |v: Vec<GrantRecord>| v.into_iter().map(|g| g.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.grants_for("spiffe://example.org/app", "https://mcp.example")),
            ["a", "b"]
        );
        // An instance: the entry's grants.
        assert_eq!(
            ids(s.grants_for(APP_INSTANCE, "https://mcp.example")),
            ["a", "b"]
        );
        assert_eq!(ids(s.grants_for(APP_INSTANCE, "other")), ["c"]);
        // Another entry below app: its own grant only (d), none of app's.
        assert_eq!(
            ids(s.grants_for("spiffe://example.org/app/x", "https://mcp.example")),
            ["d"]
        );
        assert!(s
            .grants_for("spiffe://example.org/app/x", "other")
            .is_empty());
        // Two segments below: not covered.
        assert!(s
            .grants_for("spiffe://example.org/app/x/y", "other")
            .is_empty());
        assert!(s
            .grants_for("spiffe://example.org/app", "https://nowhere")
            .is_empty());
        assert!(s
            .grants_for("spiffe://example.org/apple", "https://mcp.example")
            .is_empty());
    }

    #[test]
    fn the_cache_sees_local_writes_at_once_and_peer_writes_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::datastore::SledStore::open(dir.path()).unwrap();
        let cache = AccessCache::default();
        let aud = "https://mcp.example";
        let app = "spiffe://example.org/app";
        assert!(cache
            .snapshot(&store)
            .unwrap()
            .grants_for(app, aud)
            .is_empty());
        // A write through this server: seen by the next call.
        store.put_grant(&grant("a", app, aud)).unwrap();
        cache.invalidate();
        assert_eq!(
            cache.snapshot(&store).unwrap().grants_for(app, aud).len(),
            1
        );
        // A write through another server (no invalidation here): seen once the copy is
        // older than the refresh bound, and not later.
        let written = Instant::now();
        store.put_grant(&grant("b", app, aud)).unwrap();
        while cache.snapshot(&store).unwrap().grants_for(app, aud).len() < 2 {
            assert!(
                written.elapsed()
                    <= Duration::from_secs(ACCESS_REFRESH_SECONDS) + Duration::from_millis(500),
                "a peer's grant not seen within the refresh bound"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn invalid(req: &GrantRecord) -> String {
        match validate_new_grant(&td(), req, 3600, 7) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_grant_gets_an_id_and_a_time() {
        let mut req = grant(
            "ignored",
            "spiffe://example.org/app",
            "https://mcp.example/x",
        );
        req.scopes = vec!["a".into(), "b:c".into(), "a".into()];
        req.node_selectors = vec!["tpm:ek".into()];
        req.ttl_seconds = 3600;
        req.max_per_minute = MAX_PER_MINUTE;
        req.may_delegate = true;
        let g = validate_new_grant(&td(), &req, 3600, 7).unwrap();
        assert_eq!(g.id.len(), 32);
        assert_ne!(g.id, "ignored");
        assert_eq!(g.created_at, 7);
        assert_eq!(g.scopes, ["a", "b:c"]);
        assert!(g.may_delegate);
        assert_eq!(g.node_selectors, ["tpm:ek"]);
    }

    #[test]
    fn grants_out_of_bounds_are_refused() {
        let ok = grant("", "spiffe://example.org/app", "aud");
        let with = |f: &dyn Fn(&mut GrantRecord)| {
            let mut g = ok.clone();
            f(&mut g);
            g
        };
        assert!(
            invalid(&with(&|g| g.spiffe_id = "spiffe://other.org/app".into()))
                .contains("trust domain")
        );
        assert!(invalid(&with(
            &|g| g.spiffe_id = "spiffe://example.org/ztid/agent/x".into()
        ))
        .contains("reserved"));
        assert!(invalid(&with(&|g| g.spiffe_id = "not an id".into())).contains("spiffe_id"));
        assert!(invalid(&with(&|g| g.audience = String::new())).contains("audience"));
        assert!(invalid(&with(&|g| g.audience = "a b".into())).contains("audience"));
        assert!(
            invalid(&with(&|g| g.audience = "a".repeat(MAX_AUDIENCE_BYTES + 1)))
                .contains("audience")
        );
        validate_new_grant(
            &td(),
            &with(&|g| g.audience = "a".repeat(MAX_AUDIENCE_BYTES)),
            3600,
            0,
        )
        .unwrap();
        assert!(invalid(&with(&|g| g.scopes.clear())).contains("scope"));
        assert!(invalid(&with(
            &|g| g.scopes = vec!["s".into(); MAX_SCOPES_PER_GRANT + 1]
        ))
        .contains("scopes"));
        // Each scope short enough, together too long for a token's scope claim.
        let long: Vec<String> = (0..MAX_SCOPES_PER_GRANT)
            .map(|i| format!("{i:0>width$}", width = MAX_SCOPE_BYTES))
            .collect();
        assert!(invalid(&with(&|g| g.scopes = long.clone())).contains("scopes together"));
        for bad in ["", "a b", "a\"b", "a\\b", "é", "a\u{7f}"] {
            assert!(
                invalid(&with(&|g| g.scopes = vec![bad.into()])).contains("scope"),
                "{bad:?}"
            );
        }
        assert!(
            invalid(&with(&|g| g.scopes = vec!["s".repeat(MAX_SCOPE_BYTES + 1)])).contains("scope")
        );
        assert!(invalid(&with(&|g| g.ttl_seconds = -1)).contains("ttl_seconds"));
        assert!(invalid(&with(&|g| g.ttl_seconds = 3601)).contains("ttl_seconds"));
        assert!(
            invalid(&with(&|g| g.max_per_minute = MAX_PER_MINUTE + 1)).contains("max_per_minute")
        );
        assert!(
            invalid(&with(&|g| g.node_selectors = vec!["novalue".into()])).contains("TYPE:VALUE")
        );
        assert!(invalid(&with(&|g| g.node_selectors = vec![":v".into()])).contains("TYPE:VALUE"));
        assert!(invalid(&with(
            &|g| g.node_selectors = vec!["t:v".into(); MAX_NODE_SELECTORS_PER_GRANT + 1]
        ))
        .contains("node_selectors"));
        assert!(invalid(&with(
            &|g| g.node_selectors = vec![format!("t:{}", "v".repeat(MAX_NODE_SELECTOR_BYTES))]
        ))
        .contains("node selector"));
    }
}
