//! Datastore housekeeping, by one server of a cluster at a time: entry changes older
//! than the retention leave the change log, expired join tokens the store, and so do
//! expired revocations (token exchange's kill switch).
//!
//! Without it both grow with every change and every token ever made. What compaction
//! costs is bounded and safe: an agent that has not synced for longer than the
//! retention gets its whole entry set once (see [`DataStore::change_log_floor`]); an
//! expired token is refused either way, as unknown instead of expired.
//!
//! The store keeps no time per change, so each server samples (time, current
//! revision) on every round and compacts below the newest revision sampled at least
//! the retention ago: every change up to it was made before then. A server that just
//! started has no old sample and leaves compaction to later rounds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::CaCore;
use crate::datastore::{DataStore, LeaderGuard};

/// The cluster-wide role ([`DataStore::try_leader`]) of the server that compacts.
pub const MAINTENANCE_ROLE: &str = "maintenance";

/// How often a round runs: a fraction of the retention, at most every 5 minutes.
fn round_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// (time, revision) samples, oldest first.
#[derive(Default)]
struct Samples(VecDeque<(Instant, u64)>);

impl Samples {
    /// Records `revision` at `now` and returns the revision every change up to which
    /// is older than `retention`, if a sample is that old (older samples are dropped).
    fn record(&mut self, now: Instant, revision: u64, retention: Duration) -> Option<u64> {
        self.0.push_back((now, revision));
        let old_enough = |t: &Instant| now.saturating_duration_since(*t) >= retention;
        while self.0.get(1).is_some_and(|(t, _)| old_enough(t)) {
            self.0.pop_front();
        }
        self.0
            .front()
            .filter(|(t, _)| old_enough(t))
            .map(|(_, r)| *r)
    }
}

/// Runs the rounds until the process ends.
pub fn spawn(core: Arc<CaCore>) {
    let retention = core.config.datastore.change_log_retention();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(round_interval(retention));
        let mut samples = Samples::default();
        let mut role: Option<LeaderGuard> = None;
        loop {
            tick.tick().await;
            if let Err(e) = round(core.store.as_ref(), &mut samples, &mut role, retention) {
                tracing::warn!(error = %e, "datastore maintenance failed; will retry");
            }
        }
    });
}

/// One round: sample, and if this server holds the role, compact and prune.
fn round(
    store: &dyn DataStore,
    samples: &mut Samples,
    role: &mut Option<LeaderGuard>,
    retention: Duration,
) -> crate::Result<()> {
    let old = samples.record(Instant::now(), store.current_revision()?, retention);
    if !role.as_ref().is_some_and(LeaderGuard::is_held) {
        *role = store.try_leader(MAINTENANCE_ROLE)?;
    }
    if role.is_none() {
        return Ok(());
    }
    if let Some(revision) = old {
        let removed = store.compact_change_log(revision.saturating_add(1))?;
        if removed > 0 {
            tracing::info!(
                removed,
                up_to_revision = revision,
                "compacted the entry change log"
            );
        }
    }
    let before =
        crate::core::now().saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
    let pruned = store.prune_join_tokens(before)?;
    if pruned > 0 {
        tracing::info!(
            pruned,
            "removed join tokens that expired more than the retention ago"
        );
    }
    // An expired revocation kills nothing: every credential issued before it expired.
    let pruned = store.prune_revocations(crate::core::now())?;
    if pruned > 0 {
        tracing::info!(pruned, "removed expired revocations");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_stops_at_the_newest_revision_at_least_the_retention_old() {
        let retention = Duration::from_secs(100);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Samples::default();
        assert_eq!(s.record(at(0), 10, retention), None, "nothing is old yet");
        assert_eq!(s.record(at(60), 20, retention), None);
        assert_eq!(s.record(at(100), 30, retention), Some(10));
        assert_eq!(
            s.record(at(170), 40, retention),
            Some(20),
            "the newest old-enough sample"
        );
        assert_eq!(s.0.len(), 3, "older samples are dropped");
        assert_eq!(s.record(at(1000), 50, retention), Some(40));
        assert_eq!(s.0.len(), 2);
    }

    #[test]
    fn rounds_run_often_enough_for_short_retentions_and_at_most_every_five_minutes() {
        assert_eq!(
            round_interval(Duration::from_secs(60)),
            Duration::from_secs(15)
        );
        assert_eq!(
            round_interval(Duration::from_secs(86_400)),
            Duration::from_secs(300)
        );
    }
}
