//! Per-instance SVIDs minted ahead, so a new process's first `FetchX509SVID` is answered
//! from memory instead of waiting on a `SignX509Svids` round trip.
//!
//! A pooled instance is what a new process would have got: a fresh random instance
//! segment and, for every per-instance entry of one *entry set* (the per-instance entries
//! a process matched), an SVID for `<entry ID>/<segment>` with its own key. Pools are kept
//! only for entry sets that a new process had within the last `idle_seconds`, at most
//! `max_sets` of them (the least recently used goes first) and `size` pooled instances
//! each, up to [`MAX_POOL_GROWTH`] times that while a burst of new processes outruns the
//! refill; so memory and the extra mints are bounded, and an idle node mints nothing. A
//! set is refilled once half of its pool is gone, back to full in one call.
//!
//! The rules that make it safe:
//! - A pooled instance is taken out of the pool under its lock when a process is given it
//!   and is never put back: its segment belongs to that process alone, as a freshly
//!   drawn one would.
//! - It is served only while it is fresh: younger than `max_age_seconds` and before its
//!   SVIDs' half-life (the renewal time), minted for the entries exactly as they are now,
//!   under the bundle sequence in force now, by an authority that is not tainted, and not
//!   covered by an entry revocation. Anything else is dropped, unused, when seen (at a
//!   take, at each sync and at each refill tick).
//! - Unassigned pooled SVIDs carry nothing the agent could not mint anyway: the agent may
//!   ask the server for any per-instance ID under its entries at any time.
//!
//! The pool's own age and idle decisions use the boot clock ([`BootInstant`]): a step of
//! the wall clock neither keeps a pooled instance past `max_age_seconds` (a step back)
//! nor drops the pool (a step forward), and a suspend counts towards the age. What the certificates say (the half-life) and the
//! revocations (the server's `revoked_at`) stay judged on the wall clock, as they are
//! wall-clock times.
//!
//! One refill has a budget of [`MAX_REFILL_CSRS`] CSRs. Sets are served least recently
//! served first (ties by key), so with more depleted sets than one budget covers, each
//! is served within a bounded number of refills whatever the others want.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::boot_clock::BootInstant;

use ztid_proto::node as pb;

use super::{EntryCache, HeldSvid, REVOCATION_CLOCK_TOLERANCE_SECONDS};

/// Most pooled instances per entry set.
pub const MAX_POOL_SIZE: usize = 16;
/// Most entry sets pooled.
pub const MAX_POOL_SETS: usize = 4096;
/// How far a burst may grow one set's pool: up to this many times its configured size
/// (never above [`MAX_POOL_SIZE`]).
pub const MAX_POOL_GROWTH: usize = 4;
/// Most CSRs one refill sends in one `SignX509Svids` call (the server's batch cap is
/// larger; a smaller batch keeps one refill short).
pub const MAX_REFILL_CSRS: usize = 100;

/// How the pool is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Pooled instances per entry set; 0 turns the pool off.
    pub size: usize,
    /// Most entry sets pooled at once.
    pub max_sets: usize,
    /// A pooled instance older than this is dropped unused (seconds).
    pub max_age_seconds: i64,
    /// An entry set no new process had for this long is no longer pooled (seconds).
    pub idle_seconds: i64,
}

impl PoolConfig {
    /// No pool: every new process waits for its mint.
    pub const OFF: Self = Self {
        size: 0,
        max_sets: 0,
        max_age_seconds: 0,
        idle_seconds: 0,
    };

    /// True when pooling is on.
    pub fn enabled(&self) -> bool {
        self.size > 0 && self.max_sets > 0 && self.max_age_seconds > 0 && self.idle_seconds > 0
    }
}

/// One pooled instance: a segment and an SVID for each entry of its set.
pub struct PooledInstance {
    /// The instance segment (32 lowercase hex).
    pub segment: String,
    /// When it was minted (Unix seconds, agent clock; taken before the CSRs were sent):
    /// compared with entry revocations, which are wall-clock times.
    pub minted_at: i64,
    /// The same moment on the boot clock: the pool's age of it.
    pub minted_monotonic: BootInstant,
    /// The bundle sequence in force when it was minted.
    pub bundle_sequence: u64,
    /// The entries it was minted for, ordered by id.
    pub entries: Vec<pb::Entry>,
    /// One SVID per entry, in the same order.
    pub svids: Vec<HeldSvid>,
}

/// Why a pooled instance was dropped unused (the `reason` of `pooled_svid_dropped`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Older than the pool's maximum age, or past its SVIDs' half-life.
    Expired,
    /// An entry of its set was changed or deleted since it was minted.
    EntryChanged,
    /// Its signing authority is tainted.
    Tainted,
    /// The trust bundle changed (an authority rotation) since it was minted.
    Rotated,
    /// An operator revoked its entry or its very identity.
    Revoked,
    /// No new process had its entry set for a while.
    Idle,
}

impl DropReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::EntryChanged => "entry changed or deleted",
            Self::Tainted => "authority tainted",
            Self::Rotated => "trust bundle changed",
            Self::Revoked => "revoked",
            Self::Idle => "entry set idle",
        }
    }
}

/// What a pooled instance is checked against.
pub struct PoolView<'a> {
    /// Unix seconds, agent clock: for the SVIDs' half-life and revocations.
    pub now: i64,
    /// Now on the boot clock: for the pool's age and idle decisions.
    pub monotonic_now: BootInstant,
    /// The bundle sequence in force.
    pub bundle_sequence: u64,
    /// Tainted authority ids.
    pub tainted: &'a [String],
}

struct EntrySet {
    /// The set's entries as last seen, ordered by id.
    entries: Vec<pb::Entry>,
    /// When a new process last had this set (monotonic).
    last_seen: BootInstant,
    /// The refill round this set was last given a deficit in (0: never): the least
    /// recently served set goes first when the budget runs short.
    served_round: u64,
    /// Oldest first.
    slots: VecDeque<PooledInstance>,
    /// How many instances to keep: the configured size, doubled when a take leaves the
    /// set empty (a burst of new processes would otherwise outrun the refill and wait
    /// for mints), halved back when a pooled instance expires unused.
    target: usize,
}

#[derive(Default)]
struct Inner {
    /// Ordered, so that every walk over the sets is deterministic.
    sets: BTreeMap<Vec<String>, EntrySet>,
    /// Refill rounds so far ([`SvidPool::deficits`] calls that found the pool on).
    refill_round: u64,
    /// Entry revocations in force (entry id → `revoked_at`, server clock), from the last sync.
    entry_revocations: HashMap<String, i64>,
    /// Instance segments revoked, from the last sync: a mint in flight when it came is
    /// dropped at insert, not served until the next sync.
    revoked_segments: HashSet<String>,
    /// The entry cache's generation at the last prune: a take computed from an older
    /// one neither takes nor changes anything.
    pruned_generation: u64,
}

/// What to mint next: an entry set and how many instances it lacks.
pub struct Deficit {
    /// The entries, ordered by id.
    pub entries: Vec<pb::Entry>,
    /// Instances to mint.
    pub count: usize,
}

/// The pool (see the module documentation).
pub struct SvidPool {
    config: PoolConfig,
    inner: Mutex<Inner>,
    /// Woken when a pooled instance was taken or a new entry set seen.
    pub wake: tokio::sync::Notify,
}

/// The key of an entry set: its entry ids, sorted.
fn set_key(entries: &[pb::Entry]) -> Vec<String> {
    let mut ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

fn sorted(entries: &[pb::Entry]) -> Vec<pb::Entry> {
    let mut v = entries.to_vec();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v.dedup_by(|a, b| a.id == b.id);
    v
}

/// Whether something minted at `minted_at` falls under a revocation at `revoked_at`
/// (server clock, so with a tolerance; saturating, as `revoked_at` is the server's).
fn revoked_since(minted_at: i64, revoked_at: i64) -> bool {
    minted_at < revoked_at.saturating_add(REVOCATION_CLOCK_TOLERANCE_SECONDS)
}

/// `seconds` of configuration as a duration (a negative value as none).
fn config_duration(seconds: i64) -> Duration {
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

fn log_drop(slot: &PooledInstance, reason: DropReason) {
    tracing::info!(
        event = "pooled_svid_dropped",
        instance = %slot.segment,
        spiffe_ids = ?slot.svids.iter().map(|s| s.spiffe_id.as_str()).collect::<Vec<_>>(),
        reason = reason.as_str(),
        "pre-minted workload SVIDs dropped unused; they expire unused"
    );
}

impl Inner {
    /// Why `slot` may not be served to a process of `entries` now, if it may not.
    fn unusable(
        &self,
        slot: &PooledInstance,
        entries: &[pb::Entry],
        view: &PoolView<'_>,
        config: &PoolConfig,
    ) -> Option<DropReason> {
        if slot.entries.as_slice() != entries {
            return Some(DropReason::EntryChanged);
        }
        if self.revoked_segments.contains(&slot.segment)
            || slot
                .entries
                .iter()
                .filter_map(|e| self.entry_revocations.get(&e.id))
                .any(|&at| revoked_since(slot.minted_at, at))
        {
            return Some(DropReason::Revoked);
        }
        if slot.svids.iter().any(|s| {
            s.authority
                .as_ref()
                .is_some_and(|a| view.tainted.contains(a))
        }) {
            return Some(DropReason::Tainted);
        }
        if slot.bundle_sequence != view.bundle_sequence {
            return Some(DropReason::Rotated);
        }
        let age = view
            .monotonic_now
            .saturating_duration_since(slot.minted_monotonic);
        if age >= config_duration(config.max_age_seconds)
            || slot.svids.iter().any(|s| view.now >= s.renew_at)
        {
            return Some(DropReason::Expired);
        }
        None
    }

    /// Drops the slots of `key` that are not usable now.
    fn sweep(&mut self, key: &[String], view: &PoolView<'_>, config: &PoolConfig) {
        let Some(mut set) = self.sets.remove(key) else {
            return;
        };
        let slots = std::mem::take(&mut set.slots);
        for slot in slots {
            match self.unusable(&slot, &set.entries, view, config) {
                Some(reason) => {
                    if reason == DropReason::Expired {
                        // Minted ahead and never needed: the burst is over.
                        set.target = (set.target / 2).max(config.size);
                    }
                    log_drop(&slot, reason)
                }
                None => set.slots.push_back(slot),
            }
        }
        self.sets.insert(key.to_vec(), set);
    }
}

impl SvidPool {
    /// A pool sized by `config` (no pooling when it is off).
    pub fn new(config: PoolConfig) -> Self {
        Self {
            config: PoolConfig {
                size: config.size.min(MAX_POOL_SIZE),
                max_sets: config.max_sets.min(MAX_POOL_SETS),
                ..config
            },
            inner: Mutex::new(Inner::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Its settings.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// The most instances one set's pool may grow to in a burst.
    fn max_target(&self) -> usize {
        (self.config.size * MAX_POOL_GROWTH)
            .min(MAX_POOL_SIZE)
            .max(self.config.size)
    }

    /// For a new process whose per-instance entries are `entries`: a pooled instance
    /// minted for exactly those entries and still fresh, taken out of the pool for good.
    /// Notes the entry set as wanted either way, and wakes the refill.
    ///
    /// `seen_generation` is the entry cache's generation read before `entries` were
    /// worked out: when the pool was pruned after a later sync, `entries` may be an
    /// entry's old version or a deleted one, which must neither be served nor become
    /// the set's entries (a mint of the old version in flight would then be pooled):
    /// nothing is taken or changed, and the process's SVIDs are minted on demand.
    pub fn take(
        &self,
        entries: &[pb::Entry],
        view: &PoolView<'_>,
        seen_generation: u64,
    ) -> Option<PooledInstance> {
        if !self.config.enabled() || entries.is_empty() {
            return None;
        }
        let key = set_key(entries);
        let entries = sorted(entries);
        let taken = {
            let Ok(mut inner) = self.inner.lock() else {
                return None;
            };
            if seen_generation < inner.pruned_generation {
                return None;
            }
            if !inner.sets.contains_key(&key) && inner.sets.len() >= self.config.max_sets {
                // Bounded: the entry set no process had for longest makes room.
                let oldest = inner
                    .sets
                    .iter()
                    .min_by_key(|(_, s)| s.last_seen)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    if let Some(set) = inner.sets.remove(&k) {
                        set.slots.iter().for_each(|s| log_drop(s, DropReason::Idle));
                    }
                }
            }
            let known = inner.sets.contains_key(&key);
            let set = inner.sets.entry(key.clone()).or_insert_with(|| EntrySet {
                entries: entries.clone(),
                last_seen: view.monotonic_now,
                served_round: 0,
                slots: VecDeque::new(),
                target: self.config.size,
            });
            set.last_seen = view.monotonic_now;
            set.entries = entries;
            inner.sweep(&key, view, &self.config);
            inner.sets.get_mut(&key).and_then(|s| {
                let taken = s.slots.pop_front();
                // The set's first process finds nothing by design; later ones that take
                // the last instance, or find none, are outrunning the refill.
                if known && s.slots.is_empty() {
                    s.target = (s.target * 2).min(self.max_target());
                }
                taken
            })
        };
        self.wake.notify_one();
        taken
    }

    /// The entry sets that lack pooled instances, after dropping stale instances and idle
    /// sets; at most [`MAX_REFILL_CSRS`] CSRs' worth, the sets least recently served
    /// first. Sets with an entry revoked so recently that a mint now would still fall
    /// under the revocation are skipped.
    pub fn deficits(&self, view: &PoolView<'_>) -> Vec<Deficit> {
        self.deficits_within(view, MAX_REFILL_CSRS)
    }

    /// [`SvidPool::deficits`] with a budget of `max_csrs` CSRs.
    fn deficits_within(&self, view: &PoolView<'_>, max_csrs: usize) -> Vec<Deficit> {
        if !self.config.enabled() {
            return Vec::new();
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Vec::new();
        };
        let idle_for = config_duration(self.config.idle_seconds);
        let idle: Vec<Vec<String>> = inner
            .sets
            .iter()
            .filter(|(_, s)| view.monotonic_now.saturating_duration_since(s.last_seen) > idle_for)
            .map(|(k, _)| k.clone())
            .collect();
        for k in idle {
            if let Some(set) = inner.sets.remove(&k) {
                set.slots.iter().for_each(|s| log_drop(s, DropReason::Idle));
            }
        }
        for k in inner.sets.keys().cloned().collect::<Vec<_>>() {
            inner.sweep(&k, view, &self.config);
        }
        inner.refill_round += 1;
        let round = inner.refill_round;
        // Least recently served first, then by key: a budget smaller than what all sets
        // lack serves the others next time instead of the same sets every time.
        let mut order: Vec<(u64, Vec<String>)> = inner
            .sets
            .iter()
            .map(|(k, s)| (s.served_round, k.clone()))
            .collect();
        order.sort();
        let mut out = Vec::new();
        let mut csrs = 0;
        for (_, k) in order {
            let Some(set) = inner.sets.get(&k) else {
                continue;
            };
            let recently_revoked = set.entries.iter().any(|e| {
                inner
                    .entry_revocations
                    .get(&e.id)
                    .is_some_and(|&at| revoked_since(view.now, at))
            });
            let per = set.entries.len().max(1);
            let room = max_csrs.saturating_sub(csrs) / per;
            // Refilled once half the target is gone, then to the target: a refill is
            // mostly the call's fixed cost (TLS, HTTP/2, the audit sync; about 550 µs of
            // server CPU for one CSR), so pools of 3 or more refill every other take or
            // less often, each call minting several, and fewer refills compete with the
            // new processes they serve.
            let count = if set.slots.len() * 2 > set.target {
                0
            } else {
                set.target.saturating_sub(set.slots.len()).min(room)
            };
            if count > 0 && !recently_revoked {
                csrs += count * per;
                out.push(Deficit {
                    entries: set.entries.clone(),
                    count,
                });
                if let Some(set) = inner.sets.get_mut(&k) {
                    set.served_round = round;
                }
            }
        }
        out
    }

    /// Adds a freshly minted instance, if its entry set is still wanted, unchanged and
    /// short of instances, and the instance is usable; otherwise drops it.
    pub fn insert(&self, slot: PooledInstance, view: &PoolView<'_>) -> bool {
        let key = set_key(&slot.entries);
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        let reason = match inner.sets.get(&key) {
            None => Some(DropReason::Idle),
            Some(set) => inner.unusable(&slot, &set.entries, view, &self.config),
        };
        match (reason, inner.sets.get_mut(&key)) {
            (None, Some(set)) if set.slots.len() < set.target => {
                tracing::info!(
                    event = "svid_pooled",
                    instance = %slot.segment,
                    spiffe_ids = ?slot.svids.iter().map(|s| s.spiffe_id.as_str()).collect::<Vec<_>>(),
                    "workload SVIDs pre-minted for the next new process"
                );
                set.slots.push_back(slot);
                true
            }
            (reason, _) => {
                log_drop(&slot, reason.unwrap_or(DropReason::Idle));
                false
            }
        }
    }

    /// After a sync: drops the sets of which an entry was deleted, takes the others'
    /// entries as they are now, and drops every instance no longer usable (changed
    /// entries, tainted authority, new bundle, age).
    pub fn prune(&self, cache: &EntryCache, view: &PoolView<'_>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.pruned_generation = inner.pruned_generation.max(cache.generation);
        let keys: Vec<Vec<String>> = inner.sets.keys().cloned().collect();
        for k in keys {
            let current: Option<Vec<pb::Entry>> =
                k.iter().map(|id| cache.entries.get(id).cloned()).collect();
            match current {
                Some(entries) => {
                    if let Some(set) = inner.sets.get_mut(&k) {
                        set.entries = entries;
                    }
                    inner.sweep(&k, view, &self.config);
                }
                None => {
                    if let Some(set) = inner.sets.remove(&k) {
                        set.slots
                            .iter()
                            .for_each(|s| log_drop(s, DropReason::EntryChanged));
                    }
                }
            }
        }
    }

    /// Applies the revocations in force (every sync answer lists them all): drops the
    /// pooled instances whose identity is listed (by segment) or whose entry was revoked
    /// after they were minted.
    pub fn revoke(&self, revoked_segments: &HashSet<&str>, revoked_entries: &[pb::RevokedEntry]) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.entry_revocations = revoked_entries
            .iter()
            .take(super::MAX_REVOCATIONS)
            .map(|r| (r.entry_id.clone(), r.revoked_at))
            .collect();
        inner.revoked_segments = revoked_segments
            .iter()
            .take(super::MAX_REVOCATIONS)
            .map(|s| s.to_string())
            .collect();
        let Inner {
            sets,
            entry_revocations,
            ..
        } = &mut *inner;
        for set in sets.values_mut() {
            let slots = std::mem::take(&mut set.slots);
            for slot in slots {
                let revoked = revoked_segments.contains(slot.segment.as_str())
                    || slot
                        .entries
                        .iter()
                        .filter_map(|e| entry_revocations.get(&e.id))
                        .any(|&at| revoked_since(slot.minted_at, at));
                if revoked {
                    log_drop(&slot, DropReason::Revoked);
                } else {
                    set.slots.push_back(slot);
                }
            }
        }
    }

    /// Pooled instances held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|i| i.sets.values().map(|s| s.slots.len()).sum())
            .unwrap_or(0)
    }

    /// True when nothing is pooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    const CONFIG: PoolConfig = PoolConfig {
        size: 2,
        max_sets: 3,
        max_age_seconds: 60,
        idle_seconds: 300,
    };

    fn entry(id: &str) -> pb::Entry {
        pb::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://td/{id}"),
            ..Default::default()
        }
    }

    /// The boot clock in these tests: times are seconds after an origin.
    fn monotonic(seconds: i64) -> BootInstant {
        BootInstant::since_boot(Duration::from_secs(1000)) + config_duration(seconds)
    }

    /// Wall and monotonic clocks in step, `now` seconds after the origin.
    fn view(now: i64) -> PoolView<'static> {
        stepped(now, now)
    }

    /// The wall clock at `wall`, the monotonic one at `monotonic_seconds`.
    fn stepped(wall: i64, monotonic_seconds: i64) -> PoolView<'static> {
        PoolView {
            now: wall,
            monotonic_now: monotonic(monotonic_seconds),
            bundle_sequence: 1,
            tainted: &[],
        }
    }

    fn slot(entries: &[pb::Entry], segment: &str, minted_at: i64) -> PooledInstance {
        PooledInstance {
            segment: segment.into(),
            minted_at,
            minted_monotonic: monotonic(minted_at),
            bundle_sequence: 1,
            entries: sorted(entries),
            svids: sorted(entries)
                .iter()
                .map(|e| HeldSvid {
                    entry_id: e.id.clone(),
                    spiffe_id: format!("{}/{segment}", e.spiffe_id),
                    chain: vec![vec![1]],
                    key: Zeroizing::new(vec![2]),
                    not_after: minted_at + 3600,
                    renew_at: minted_at + 1800,
                    hint: String::new(),
                    authority: Some("ca1".into()),
                    entry_revision: e.revision,
                })
                .collect(),
        }
    }

    fn filled(entries: &[pb::Entry]) -> SvidPool {
        let pool = SvidPool::new(CONFIG);
        assert!(
            pool.take(entries, &view(100), 0).is_none(),
            "empty at first"
        );
        let d = pool.deficits(&view(100));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].count, 2);
        assert!(pool.insert(slot(entries, "s1", 100), &view(100)));
        assert!(pool.insert(slot(entries, "s2", 100), &view(100)));
        assert!(
            !pool.insert(slot(entries, "s3", 100), &view(100)),
            "no more than the pool size"
        );
        pool
    }

    #[test]
    fn each_pooled_instance_is_taken_once_and_never_returned() {
        let e = [entry("a")];
        let pool = filled(&e);
        let first = pool.take(&e, &view(101), 0).map(|s| s.segment);
        let second = pool.take(&e, &view(101), 0).map(|s| s.segment);
        assert_eq!(first.as_deref(), Some("s1"));
        assert_eq!(second.as_deref(), Some("s2"));
        assert!(
            pool.take(&e, &view(101), 0).is_none(),
            "empty until refilled"
        );
        assert!(pool.is_empty());
    }

    #[test]
    fn a_set_is_refilled_once_half_its_target_is_gone_and_then_to_the_target() {
        let e = [entry("a")];
        let pool = SvidPool::new(PoolConfig { size: 4, ..CONFIG });
        let count = |now| pool.deficits(&view(now)).first().map_or(0, |d| d.count);
        assert!(pool.take(&e, &view(100), 0).is_none(), "empty at first");
        assert_eq!(count(100), 4);
        for i in 0..4 {
            assert!(pool.insert(slot(&e, &format!("s{i}"), 100), &view(100)));
        }
        assert_eq!(count(100), 0, "full");
        assert!(pool.take(&e, &view(101), 0).is_some());
        assert_eq!(count(101), 0, "three of four left: no refill yet");
        assert!(pool.take(&e, &view(101), 0).is_some());
        assert_eq!(count(101), 2, "half gone: one call mints both");
    }

    #[test]
    fn a_burst_grows_the_set_and_unused_instances_shrink_it_back() {
        let e = [entry("a")];
        let count = |pool: &SvidPool, now| pool.deficits(&view(now)).first().map_or(0, |d| d.count);
        let pool = filled(&e);
        // Taking the last pooled instance (a burst outrunning the refill) doubles the set.
        assert!(pool.take(&e, &view(101), 0).is_some());
        assert_eq!(count(&pool, 101), 1, "one taken, one left: no growth yet");
        assert!(pool.take(&e, &view(101), 0).is_some());
        assert_eq!(count(&pool, 101), 4, "the last one taken: target 4");
        // Finding none doubles it again, up to MAX_POOL_GROWTH times the size.
        assert!(pool.take(&e, &view(101), 0).is_none());
        assert_eq!(count(&pool, 101), 8);
        assert!(pool.take(&e, &view(101), 0).is_none());
        assert_eq!(count(&pool, 101), 2 * MAX_POOL_GROWTH, "capped");
        for i in 0..2 * MAX_POOL_GROWTH {
            assert!(pool.insert(slot(&e, &format!("b{i}"), 102), &view(102)));
        }
        assert!(
            !pool.insert(slot(&e, "extra", 102), &view(102)),
            "no more than the target"
        );
        // Left unused past the maximum age: each expired instance halves the target, back
        // to the configured size, never below.
        let later = 102 + CONFIG.max_age_seconds;
        assert_eq!(
            count(&pool, later),
            2,
            "all expired: back to the configured size"
        );
    }

    #[test]
    fn concurrent_takes_never_share_an_instance() {
        let e = [entry("a")];
        let pool = std::sync::Arc::new(SvidPool::new(PoolConfig {
            size: MAX_POOL_SIZE,
            ..CONFIG
        }));
        assert!(pool.take(&e, &view(100), 0).is_none());
        for i in 0..MAX_POOL_SIZE {
            assert!(pool.insert(slot(&e, &format!("s{i}"), 100), &view(100)));
        }
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                let e = e.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(s) = pool.take(&e, &view(101), 0) {
                        got.push(s.segment);
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(all.len(), MAX_POOL_SIZE);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), MAX_POOL_SIZE, "no segment handed out twice");
    }

    #[test]
    fn only_an_exact_entry_set_matches() {
        let (a, b) = (entry("a"), entry("b"));
        let pool = filled(std::slice::from_ref(&a));
        assert!(pool.take(&[a.clone(), b.clone()], &view(101), 0).is_none());
        assert!(pool.take(&[b], &view(101), 0).is_none());
        assert!(pool.take(&[a], &view(101), 0).is_some());
    }

    #[test]
    fn stale_instances_are_never_served() {
        let e = [entry("a")];
        // Too old for the pool.
        let pool = filled(&e);
        assert!(pool.take(&e, &view(160), 0).is_none());
        assert!(pool.is_empty(), "dropped when seen");
        // Past its half-life.
        let pool = SvidPool::new(PoolConfig {
            max_age_seconds: 10_000,
            ..CONFIG
        });
        pool.take(&e, &view(100), 0);
        assert!(pool.insert(slot(&e, "s1", 100), &view(100)));
        assert!(pool.take(&e, &view(1900), 0).is_none());
        // Changed entry.
        let pool = filled(&e);
        let mut changed = entry("a");
        changed.x509_ttl_seconds = 5;
        assert!(pool.take(&[changed], &view(101), 0).is_none());
        assert!(pool.is_empty());
        // New bundle (rotation), tainted authority.
        let pool = filled(&e);
        let rotated = PoolView {
            bundle_sequence: 2,
            ..view(101)
        };
        assert!(pool.take(&e, &rotated, 0).is_none());
        let pool = filled(&e);
        let tainted = ["ca1".to_string()];
        let v = PoolView {
            tainted: &tainted,
            ..view(101)
        };
        assert!(pool.take(&e, &v, 0).is_none());
    }

    #[test]
    fn sync_drops_deleted_changed_and_tainted() {
        let (a, b) = (entry("a"), entry("b"));
        let pool = SvidPool::new(CONFIG);
        pool.take(std::slice::from_ref(&a), &view(100), 0);
        pool.take(std::slice::from_ref(&b), &view(100), 0);
        for (e, s) in [(&a, "a1"), (&a, "a2"), (&b, "b1")] {
            assert!(pool.insert(slot(std::slice::from_ref(e), s, 100), &view(100)));
        }
        let mut cache = EntryCache::default();
        cache.entries.insert("a".into(), a.clone());
        pool.prune(&cache, &view(101));
        assert_eq!(pool.len(), 2, "b was deleted: its instance is dropped");
        let mut a2 = a.clone();
        a2.dns_names = vec!["x.example".into()];
        cache.entries.insert("a".into(), a2);
        pool.prune(&cache, &view(101));
        assert!(pool.is_empty(), "a changed: minted for the old entry");

        let pool = filled(std::slice::from_ref(&a));
        cache.entries.insert("a".into(), a.clone());
        let tainted = ["ca1".to_string()];
        pool.prune(
            &cache,
            &PoolView {
                tainted: &tainted,
                ..view(101)
            },
        );
        assert!(pool.is_empty(), "tainted authority");
    }

    #[test]
    fn revocations_drop_and_hold_back_minting() {
        let e = [entry("a")];
        let pool = filled(&e);
        pool.revoke(&HashSet::from(["s1"]), &[]);
        assert_eq!(pool.len(), 1, "the listed identity is dropped");
        let rev = pb::RevokedEntry {
            entry_id: "a".into(),
            revoked_at: 100,
        };
        pool.revoke(&HashSet::new(), std::slice::from_ref(&rev));
        assert!(pool.is_empty(), "minted before the entry revocation");
        assert!(
            pool.deficits(&view(105)).is_empty(),
            "no mint while a new one would still be covered"
        );
        assert_eq!(pool.deficits(&view(111)).len(), 1);
        assert!(!pool.insert(slot(&e, "old", 105), &view(111)));
        assert!(pool.insert(slot(&e, "new", 111), &view(111)));
    }

    #[test]
    fn sets_are_bounded_and_idle_ones_forgotten() {
        let pool = SvidPool::new(PoolConfig {
            max_sets: 2,
            ..CONFIG
        });
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            pool.take(&[entry(id)], &view(100 + i as i64), 0);
        }
        let d = pool.deficits(&view(103));
        let mut ids: Vec<_> = d.iter().map(|d| d.entries[0].id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["b", "c"], "the least recently used set made room");
        assert!(
            pool.deficits(&view(500)).is_empty(),
            "idle sets are dropped"
        );
        let off = SvidPool::new(PoolConfig { size: 0, ..CONFIG });
        assert!(off.take(&[entry("a")], &view(100), 0).is_none());
        assert!(off.deficits(&view(100)).is_empty());
    }

    #[test]
    fn a_refill_is_bounded() {
        let pool = SvidPool::new(PoolConfig {
            size: MAX_POOL_SIZE,
            max_sets: 100,
            ..CONFIG
        });
        let many: Vec<pb::Entry> = (0..30).map(|i| entry(&format!("e{i}"))).collect();
        for e in &many {
            pool.take(std::slice::from_ref(e), &view(100), 0);
        }
        let csrs: usize = pool
            .deficits(&view(100))
            .iter()
            .map(|d| d.count * d.entries.len())
            .sum();
        assert!(csrs <= MAX_REFILL_CSRS, "{csrs}");
        assert!(csrs > 0);
    }

    #[test]
    fn a_take_from_before_the_last_prune_neither_serves_nor_changes_the_set() {
        let v1 = entry("a");
        let mut v2 = entry("a");
        v2.spiffe_id = "spiffe://td/renamed".into();
        v2.revision = 2;
        let pool = SvidPool::new(CONFIG);
        assert!(pool
            .take(std::slice::from_ref(&v1), &view(100), 0)
            .is_none());
        // A refill for v1 is in flight when a sync (generation 1) replaces a by v2.
        assert_eq!(pool.deficits(&view(100))[0].entries, vec![v1.clone()]);
        let mut cache = EntryCache::default();
        cache.entries.insert("a".into(), v2.clone());
        cache.generation = 1;
        pool.prune(&cache, &view(101));
        // A process whose entitlement was read before that sync: nothing taken, and the
        // set keeps v2, so the mint for v1 is not pooled.
        assert!(pool
            .take(std::slice::from_ref(&v1), &view(101), 0)
            .is_none());
        assert!(!pool.insert(slot(std::slice::from_ref(&v1), "old", 100), &view(101)));
        assert!(pool
            .take(std::slice::from_ref(&v1), &view(101), 1)
            .is_none());
        // A deleted entry's set is not made again by such a take either.
        let gone = EntryCache {
            generation: 2,
            ..Default::default()
        };
        pool.prune(&gone, &view(102));
        assert!(pool
            .take(std::slice::from_ref(&v2), &view(102), 1)
            .is_none());
        assert!(pool.deficits(&view(102)).is_empty());
    }

    #[test]
    fn a_mint_in_flight_when_its_segment_was_revoked_is_not_pooled() {
        let a = entry("a");
        let pool = SvidPool::new(CONFIG);
        pool.take(std::slice::from_ref(&a), &view(100), 0);
        pool.revoke(&HashSet::from(["inflight"]), &[]);
        assert!(!pool.insert(slot(std::slice::from_ref(&a), "inflight", 100), &view(101)));
        assert!(pool.insert(slot(std::slice::from_ref(&a), "other", 100), &view(101)));
        assert_eq!(
            pool.take(std::slice::from_ref(&a), &view(101), 0)
                .map(|s| s.segment)
                .as_deref(),
            Some("other")
        );
    }

    #[test]
    fn a_wall_clock_step_back_does_not_keep_a_pooled_instance_past_its_max_age() {
        let e = [entry("a")];
        let pool = filled(&e);
        // Minted at 100 on both clocks; the wall clock then steps back an hour while
        // max_age (60 s) passes on the monotonic clock.
        let later = stepped(100 - 3600, 100 + CONFIG.max_age_seconds);
        let held = pool.inner.lock().unwrap();
        let set = held.sets.values().next().unwrap();
        let reason = held.unusable(&set.slots[0], &set.entries, &later, &CONFIG);
        assert_eq!(reason, Some(DropReason::Expired));
        drop(held);
        assert!(pool.take(&e, &later, 0).is_none(), "not served");
        assert!(pool.is_empty(), "dropped as expired");
    }

    #[test]
    fn a_wall_clock_step_forward_does_not_drop_the_pool() {
        let e = [entry("a")];
        let pool = filled(&e);
        // One monotonic second later the wall clock jumped 1000 s ahead: past the
        // pool's max age and idle time on the wall clock, still before the SVIDs'
        // half-life (minted at 100, renewal at 1900).
        let later = stepped(100 + 1000, 101);
        assert!(pool.deficits(&later).is_empty(), "full, and not idle");
        assert_eq!(pool.len(), 2, "nothing dropped");
        assert_eq!(
            pool.take(&e, &later, 0).map(|s| s.segment).as_deref(),
            Some("s1")
        );
        // The half-life stays judged on the wall clock against the certificate's times.
        let past_half_life = stepped(1900, 102);
        assert!(pool.take(&e, &past_half_life, 0).is_none());
        assert!(pool.is_empty());
    }

    #[test]
    fn an_idle_set_is_judged_on_the_monotonic_clock() {
        let e = [entry("a")];
        let pool = filled(&e);
        let wall_back = stepped(100 - 3600, 100 + CONFIG.idle_seconds + 1);
        assert!(pool.deficits(&wall_back).is_empty());
        assert!(
            pool.is_empty(),
            "idle for longer than idle_seconds: dropped"
        );
    }

    /// The sets named in one refill round, by their first entry's id.
    fn served(pool: &SvidPool, now: i64, budget: usize) -> Vec<String> {
        pool.deficits_within(&view(now), budget)
            .iter()
            .map(|d| d.entries[0].id.clone())
            .collect()
    }

    #[test]
    fn a_short_refill_budget_serves_every_set_within_a_bounded_number_of_rounds() {
        const SETS: usize = 10;
        // Each set lacks 2 instances of one entry; a round may send 4 CSRs: 2 sets.
        const BUDGET: usize = 4;
        let pool = SvidPool::new(PoolConfig {
            max_sets: SETS,
            ..CONFIG
        });
        for i in 0..SETS {
            pool.take(&[entry(&format!("e{i}"))], &view(100), 0);
        }
        // The mints never arrive (the worst case: every set stays depleted), and still
        // each set's turn comes within SETS / 2 rounds, then again, in the same order.
        let rounds = SETS.div_ceil(BUDGET / 2);
        let mut seen: Vec<String> = Vec::new();
        for round in 0..rounds {
            let got = served(&pool, 100 + round as i64, BUDGET);
            assert_eq!(got.len(), BUDGET / 2, "round {round}: {got:?}");
            seen.extend(got);
        }
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), SETS, "every set served once: {seen:?}");
        let next: Vec<String> = (0..rounds)
            .flat_map(|r| served(&pool, 110 + r as i64, BUDGET))
            .collect();
        assert_eq!(next, seen, "deterministic round-robin");

        // Refilled sets make way as well: one set's mint arrives and it is served no
        // sooner than the others.
        let pool = SvidPool::new(PoolConfig {
            max_sets: SETS,
            ..CONFIG
        });
        for i in 0..SETS {
            pool.take(&[entry(&format!("e{i}"))], &view(100), 0);
        }
        let mut refilled = std::collections::BTreeSet::new();
        for round in 0..rounds {
            let now = 100 + round as i64;
            for d in pool.deficits_within(&view(now), BUDGET) {
                for n in 0..d.count {
                    let segment = format!("{}-{round}-{n}", d.entries[0].id);
                    assert!(pool.insert(slot(&d.entries, &segment, now), &view(now)));
                }
                refilled.insert(d.entries[0].id.clone());
            }
        }
        assert_eq!(refilled.len(), SETS, "{refilled:?}");
        assert_eq!(pool.len(), SETS * CONFIG.size);
    }
}
