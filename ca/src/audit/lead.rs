//! Who syncs a batch: a runtime worker that has run out of work *leads* it. It seals
//! everything pending, makes it durable in the sync journal and appends it to the log
//! (`journal`) on its own thread, and answers every call the sync covers. One batch is
//! in flight at a time, so batches reach the files in chain order and records that
//! arrive during a sync form the next batch.
//!
//! Why an idle worker: the server's runtime calls [`lead_on_runtime_idle`]'s hook when
//! a worker is about to sleep, which is exactly when every call it could run is waiting
//! (for the disk, or for its client), so the batch is as large as it can get without
//! holding anyone back, and the thread was going to sleep anyway. The earlier design (a
//! writer thread handing batches to two sync threads, which then woke the parked
//! workers) cost about 14 context switches per batch and made batches of 3-4 SVIDs at
//! 16 calls in flight; led by idle workers they hold about 7, and the audited server
//! spends about 25 µs less CPU per SVID (docs/performance.md, "Issue 16, seventh
//! pass"). The cost: the leading worker blocks for one `fdatasync` (p50 about
//! 80 µs here, of the journal) while the others keep serving; only one leads at a time.
//!
//! A batch need not wait for an idle worker once it is large: when calls wait for
//! [`LEAD_AT_RECORDS`](super::chain::LEAD_AT_RECORDS) pending records, the writer thread
//! leads it (after the batch in flight, if any; never a batch smaller than the last),
//! so its sync runs beside the signing on the workers; at 1 CSR × 16 calls in flight
//! that raised audit on/off by about 0.03 ("Issue 16, ninth pass").
//!
//! Where no runtime has the hook (a library user, the unit tests) a waiting call leads
//! the batch itself when none is in flight, and hands the lead to a call still waiting
//! when its sync returns. Either way the writer thread leads a batch a call has waited
//! for longer than [`super::chain::LEAD_FALLBACK`] (a runtime too busy to go idle).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::anchor::Anchor;
use super::log::{AuditLog, Turn, Waiters};

/// Set once a runtime has the hook: logs opened after that leave their batches to it.
static HOOKED: AtomicBool = AtomicBool::new(false);
/// The logs the hooked runtime's idle workers lead batches for (one per server).
static IDLE_LEADERS: Mutex<Vec<Weak<AuditLog>>> = Mutex::new(Vec::new());

/// Makes `builder`'s workers lead the audit log's batches when they run out of work:
/// the server's runtime. Call it before opening the log.
pub fn lead_on_runtime_idle(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    HOOKED.store(true, Ordering::SeqCst);
    builder.on_thread_park(on_runtime_idle)
}

/// A worker of the hooked runtime has nothing left to run: it leads a batch for the
/// calls waiting, if any wait and none is in flight. No lock is held while it leads
/// (another worker going idle meanwhile must not block on it: it could not be woken).
fn on_runtime_idle() {
    for i in 0.. {
        let log = match IDLE_LEADERS.lock() {
            Ok(logs) => match logs.get(i) {
                Some(log) => log.upgrade(),
                None => return,
            },
            Err(_) => return,
        };
        if let Some(log) = log {
            log.lead_if_waited();
        }
    }
}

/// Whether logs opened now leave their batches to idle runtime workers.
pub(super) fn runtime_leads() -> bool {
    HOOKED.load(Ordering::SeqCst)
}

/// Adds `log` to those the idle workers lead batches for.
pub(super) fn register_idle_leader(log: &Arc<AuditLog>) {
    if let Ok(mut logs) = IDLE_LEADERS.lock() {
        logs.retain(|l| l.strong_count() > 0);
        logs.push(Arc::downgrade(log));
    }
}

impl AuditLog {
    /// Takes the lead if no batch is in flight; the caller must then [`AuditLog::lead`].
    pub(super) fn try_lead(&self) -> bool {
        match self.shared.waiters.lock() {
            Ok(mut w) if !w.leading && !w.closed => {
                w.leading = true;
                true
            }
            _ => false,
        }
    }

    /// Whether a batch is being written and synced (its leader has not answered yet).
    pub(super) fn batch_in_flight(&self) -> bool {
        self.shared.waiters.lock().map_or(true, |w| w.leading)
    }

    /// Leads a batch when a call waits for a pending record and none is in flight.
    pub(super) fn lead_if_waited(&self) {
        let wanted = self.lock_chain().is_ok_and(|c| c.pending_wanted());
        if wanted && self.try_lead() {
            self.lead();
        }
    }

    /// Leads one batch: seals what is pending, writes and syncs it, answers the calls it
    /// covers and gives up the lead (or, when calls lead themselves, hands it to one).
    pub(super) fn lead(&self) {
        let batch = match self.lock_chain() {
            Ok(mut c) if !c.pending.is_empty() => match self.push_seal(&mut c) {
                Ok(sealed) => {
                    c.last_batch = sealed.seq.saturating_sub(c.taken);
                    c.taken = sealed.seq;
                    c.lead_now = false;
                    c.pending_since = None;
                    c.wanted_since = None;
                    Ok(Some((c.take_pending(), sealed)))
                }
                Err(e) => Err(e.to_string()),
            },
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let durable = match batch {
            Ok(Some((bytes, sealed))) => {
                let written = match self.journal.lock() {
                    Ok(mut j) => j.write(&self.file, &bytes),
                    Err(_) => Err(std::io::Error::other("audit journal lock poisoned")),
                };
                if let Ok(mut c) = self.lock_chain() {
                    c.give_back(bytes);
                }
                if let Err(e) = written {
                    self.fail(&e.to_string());
                    return;
                }
                let seq = sealed.seq;
                self.note_sealed(sealed);
                Some(seq)
            }
            Ok(None) => None,
            Err(e) => {
                self.fail(&e);
                return;
            }
        };
        self.answer(durable);
    }

    /// The batch synced up to `durable` (if one was written): wakes the calls it
    /// covers, then gives up the lead or hands it on.
    pub(super) fn answer(&self, durable: Option<u64>) {
        let idle_leads = self.lead_when_idle.load(Ordering::Relaxed);
        // Which records exist, for handing the lead on: the chain's lock is taken before
        // the waiters' everywhere.
        let appended = if idle_leads { 0 } else { self.last_seq() };
        let ready: Vec<_> = match self.shared.waiters.lock() {
            Ok(mut w) => {
                if let Some(seq) = durable {
                    w.durable = w.durable.max(seq);
                }
                let upto = w.durable;
                let ready = w
                    .queue
                    .extract_if(.., |(awaited, _)| *awaited <= upto)
                    .map(|(_, wake)| wake)
                    .collect();
                if idle_leads {
                    // The next worker to go idle leads the next batch.
                    w.leading = false;
                } else {
                    pass_lead(&mut w, appended);
                }
                ready
            }
            Err(_) => return,
        };
        for wake in ready {
            let _ = wake.send(Turn::Durable);
        }
        // The writer, asked or due to lead the next batch while this one was in flight,
        // waits for this answer (see `LEAD_AT_RECORDS` and the writer's loop).
        if self.lock_chain().is_ok_and(|c| c.lead_now) {
            self.shared.wake.notify_one();
        }
    }

    /// A call handed the lead went away before it could lead: the lead goes on.
    pub(super) fn pass_lead_on(&self) {
        let appended = self.last_seq();
        if let Ok(mut w) = self.shared.waiters.lock() {
            pass_lead(&mut w, appended);
        }
    }

    /// A batch up to `sealed` is durable: the anchors may name it.
    fn note_sealed(&self, sealed: Anchor) {
        if let Ok(mut s) = self.sealed.lock() {
            if s.latest.as_ref().is_none_or(|l| l.seq < sealed.seq) {
                s.latest = Some(sealed);
            }
        }
    }
}

/// Hands the lead to a waiting call whose record is appended (so it has something to
/// sync), or gives it up.
fn pass_lead(w: &mut Waiters, appended: u64) {
    while let Some(i) = w
        .queue
        .iter()
        .position(|(awaited, _)| *awaited > w.durable && *awaited <= appended)
    {
        let (_, wake) = w.queue.swap_remove(i);
        if wake.send(Turn::Lead).is_ok() {
            return;
        }
    }
    w.leading = false;
}
