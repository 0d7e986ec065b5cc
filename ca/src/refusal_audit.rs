//! Audit records of refused calls, bounded so that a flood of refusals cannot become
//! a flood of fdatasync'ed records.
//!
//! Every refusal is counted (metrics and logs see all of them). Within each interval,
//! the first `per_peer` refusals of each peer, and no more than `per_interval` from all
//! peers together, are audited one by one with the peer's address; the rest are counted
//! per peer and reason and written as one summary record when the interval ends. So an
//! interval costs at most `per_interval + 1` records, whoever floods.
//!
//! A peer is a network address (refusals before authentication), an agent's SPIFFE
//! ID (refusals of an authenticated agent's requests), or an admin caller (a remote
//! caller's SPIFFE ID, a local uid) refused by the admin authorization layer.
//!
//! The same bounds serve other records a peer can make the server write at will (an
//! agent's reports of the delegated identity calls it served): there each record weighs
//! what it holds (in KiB), so the bounds are on bytes, and the summary has its own type
//! ([`RefusalAudit::bounded`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::audit::AuditLog;
use crate::core::CaCore;

/// Where refusal records are written: the CA core's audit (node API), or the audit log
/// itself (the admin authorization layer, which holds only the log).
pub trait RefusalSink: Send + Sync + 'static {
    /// Appends one record.
    fn write_refusal(&self, event: Value) -> crate::Result<()>;
}

impl RefusalSink for CaCore {
    fn write_refusal(&self, event: Value) -> crate::Result<()> {
        self.record(event)
    }
}

impl RefusalSink for AuditLog {
    fn write_refusal(&self, event: Value) -> crate::Result<()> {
        self.append(event).map(|_| ())
    }
}

impl<S: RefusalSink + ?Sized> RefusalSink for Arc<S> {
    fn write_refusal(&self, event: Value) -> crate::Result<()> {
        (**self).write_refusal(event)
    }
}

/// Peers tracked one by one per interval; more are counted together as "other".
const MAX_TRACKED_PEERS: usize = 4096;
/// Peers named in a summary record (the busiest); the rest are summed.
const MAX_PEERS_IN_SUMMARY: usize = 64;

#[derive(Default)]
struct PeerCount {
    recorded: u32,
    suppressed: u64,
    reasons: BTreeMap<&'static str, u64>,
}

struct Window {
    started: Instant,
    started_unix: i64,
    recorded: u32,
    peers: HashMap<String, PeerCount>,
}

impl Window {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            started_unix: crate::core::now(),
            recorded: 0,
            peers: HashMap::new(),
        }
    }
}

/// What to do with one refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Audit it one by one.
    Record,
    /// Counted into the interval's summary.
    Summarised,
}

/// The bounded refusal audit.
pub struct RefusalAudit {
    per_peer: u32,
    per_interval: u32,
    interval: Duration,
    summary_type: &'static str,
    window: Mutex<Window>,
}

impl RefusalAudit {
    /// A refusal audit with these bounds.
    pub fn new(per_peer: u32, per_interval: u32, interval: Duration) -> Self {
        Self::bounded("refusals_summarised", per_peer, per_interval, interval)
    }

    /// Bounds on records of another kind, whose summaries are of `summary_type`; the
    /// bounds count the records' weights ([`RefusalAudit::note_weighing`]).
    pub fn bounded(
        summary_type: &'static str,
        per_peer: u32,
        per_interval: u32,
        interval: Duration,
    ) -> Self {
        Self {
            per_peer,
            per_interval,
            interval,
            summary_type,
            window: Mutex::new(Window::new()),
        }
    }

    /// From the `[limits]` config.
    pub fn from_config(l: &crate::limits::LimitsConfig) -> Self {
        Self::new(
            l.refusals_audited_per_peer,
            l.refusals_audited_per_interval,
            Duration::from_secs(l.refusal_audit_interval_seconds),
        )
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Notes one refusal of `peer` with a short stable `reason` label; returns whether
    /// to audit it one by one, and the summary of an interval that just ended, if any.
    pub fn note(&self, peer: &str, reason: &'static str) -> (Decision, Option<Value>) {
        self.note_weighing(peer, reason, 1)
    }

    /// [`RefusalAudit::note`] of a record that counts as `weight` against the bounds.
    pub fn note_weighing(
        &self,
        peer: &str,
        reason: &'static str,
        weight: u32,
    ) -> (Decision, Option<Value>) {
        let Ok(mut w) = self.window.lock() else {
            return (Decision::Summarised, None);
        };
        let summary = self.roll(&mut w);
        let tracked = w.peers.len() < MAX_TRACKED_PEERS || w.peers.contains_key(peer);
        let key = if tracked { peer } else { "other" };
        let room = w.recorded.saturating_add(weight) <= self.per_interval;
        let p = w.peers.entry(key.to_string()).or_default();
        if tracked && room && p.recorded.saturating_add(weight) <= self.per_peer {
            p.recorded += weight;
            w.recorded += weight;
            (Decision::Record, summary)
        } else {
            p.suppressed += 1;
            *p.reasons.entry(reason).or_default() += 1;
            (Decision::Summarised, summary)
        }
    }

    /// The summary of the interval if it has ended (and starts a new one); call
    /// periodically so a flood that stopped is still summarised.
    pub fn flush_if_due(&self) -> Option<Value> {
        let mut w = self.window.lock().ok()?;
        self.roll(&mut w)
    }

    /// Audits one refusal within the bounds: `key` is what the bounds count by (a peer's
    /// IP address, an agent's SPIFFE ID), `peer` (the full address, when known) goes
    /// into the record, `reason` is a short stable label for the summary.
    pub fn record<S: RefusalSink + ?Sized>(
        &self,
        sink: &S,
        key: &str,
        peer: Option<&str>,
        reason: &'static str,
        event: Value,
    ) {
        self.record_weighing(sink, key, peer, reason, 1, event);
    }

    /// [`RefusalAudit::record`] of a record that counts as `weight` against the bounds.
    pub fn record_weighing<S: RefusalSink + ?Sized>(
        &self,
        sink: &S,
        key: &str,
        peer: Option<&str>,
        reason: &'static str,
        weight: u32,
        mut event: Value,
    ) {
        let (decision, summary) = self.note_weighing(key, reason, weight);
        if let Some(s) = summary {
            write(sink, s);
        }
        if decision == Decision::Record {
            if let (Some(p), Some(obj)) = (peer, event.as_object_mut()) {
                obj.insert("peer".into(), json!(p));
            }
            write(sink, event);
        }
    }

    /// Writes each interval's summary when it ends, for as long as `sink` lives.
    pub fn spawn_flusher<S: RefusalSink>(self: &Arc<Self>, sink: &Arc<S>) {
        let this = self.clone();
        let sink = Arc::downgrade(sink);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.interval / 4);
            loop {
                tick.tick().await;
                let Some(sink) = sink.upgrade() else { return };
                if let Some(s) = this.flush_if_due() {
                    write(sink.as_ref(), s);
                }
            }
        });
    }

    fn roll(&self, w: &mut Window) -> Option<Value> {
        if w.started.elapsed() < self.interval {
            return None;
        }
        let ended = std::mem::replace(w, Window::new());
        summarise(self.summary_type, ended, w.started_unix)
    }
}

fn write<S: RefusalSink + ?Sized>(sink: &S, event: Value) {
    if let Err(e) = sink.write_refusal(event) {
        tracing::error!(error = %e, "could not audit a refusal");
    }
}

fn summarise(summary_type: &str, w: Window, until: i64) -> Option<Value> {
    let mut peers: Vec<(String, PeerCount)> = w
        .peers
        .into_iter()
        .filter(|(_, p)| p.suppressed > 0)
        .collect();
    if peers.is_empty() {
        return None;
    }
    let total: u64 = peers.iter().map(|(_, p)| p.suppressed).sum();
    peers.sort_by(|a, b| b.1.suppressed.cmp(&a.1.suppressed).then(a.0.cmp(&b.0)));
    let rest = peers.split_off(peers.len().min(MAX_PEERS_IN_SUMMARY));
    Some(json!({
        "type": summary_type,
        "from": w.started_unix,
        "until": until,
        "count": total,
        "peers": peers.iter().map(|(peer, p)| json!({
            "peer": peer, "count": p.suppressed, "reasons": p.reasons,
        })).collect::<Vec<_>>(),
        "other_peers": rest.len(),
        "other_count": rest.iter().map(|(_, p)| p.suppressed).sum::<u64>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighed_records_are_bounded_by_their_weight_and_summarised_as_their_kind() {
        let a = RefusalAudit::bounded("reports_summarised", 10, 25, Duration::from_millis(50));
        // 4 KiB records: two fit an agent's 10, the third would pass it.
        let agent = |a: &RefusalAudit, who: &str| {
            (0..5)
                .filter(|_| a.note_weighing(who, "report", 4).0 == Decision::Record)
                .count()
        };
        assert_eq!(agent(&a, "spiffe://td/ztid/agent/x/1"), 2);
        assert_eq!(agent(&a, "spiffe://td/ztid/agent/x/2"), 2);
        // 16 of the interval's 25 are taken: a third agent gets two more, then none.
        assert_eq!(agent(&a, "spiffe://td/ztid/agent/x/3"), 2);
        assert_eq!(agent(&a, "spiffe://td/ztid/agent/x/4"), 0);
        std::thread::sleep(Duration::from_millis(60));
        let s = a.flush_if_due().expect("a summary");
        assert_eq!(s["type"], "reports_summarised");
        assert_eq!(s["count"], 3 + 3 + 3 + 5);
    }

    #[test]
    fn a_flood_is_recorded_up_to_the_bounds_then_summarised() {
        let a = RefusalAudit::new(3, 5, Duration::from_millis(50));
        let recorded = (0..100)
            .filter(|_| a.note("10.0.0.1", "token_unknown").0 == Decision::Record)
            .count();
        assert_eq!(recorded, 3, "per peer");
        let others = (0..10)
            .filter(|i| a.note(&format!("10.0.0.{}", 2 + i), "csr_invalid").0 == Decision::Record)
            .count();
        assert_eq!(others, 2, "per interval, all peers together");
        assert!(a.flush_if_due().is_none(), "the interval has not ended");
        std::thread::sleep(Duration::from_millis(60));
        let s = a.flush_if_due().expect("a summary");
        assert_eq!(s["type"], "refusals_summarised");
        assert_eq!(s["count"], 97 + 8);
        assert_eq!(s["peers"][0]["peer"], "10.0.0.1");
        assert_eq!(s["peers"][0]["count"], 97);
        assert_eq!(s["peers"][0]["reasons"]["token_unknown"], 97);
        assert!(a.flush_if_due().is_none(), "nothing refused since");
        assert_eq!(
            a.note("10.0.0.1", "x").0,
            Decision::Record,
            "a new interval"
        );
    }
}
