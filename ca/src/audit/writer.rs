//! The writer thread: the timed work around the batches idle workers or waiting calls
//! lead (`lead`). It leads a batch itself for a record no call waits for, within
//! [`UNWAITED_MAX`] of seeing it (or once [`FLUSH_BYTES`] are pending), and for a
//! record a call has waited on for [`LEAD_FALLBACK`]; leads at once a batch calls wait
//! on once it holds as many records as the last batch, and at least
//! [`LEAD_AT_RECORDS`](super::chain::LEAD_AT_RECORDS) (or as soon as the batch in
//! flight is answered); pushes a checkpoint when the log
//! has been idle past one; and moves the anchors (datastore, signed `head.json`) after
//! the log, at most [`HEAD_EVERY`] behind. A failed write fails the log closed and
//! every waiting call with it.
//!
//! It sees a record at once when it was asleep with nothing to do; while anchors are
//! due it looks again within [`HEAD_EVERY`], so under load a record no call waits for
//! may wait up to that long (records a call waits for are led by the call's side).
//! Waking it for every first record would cost two context switches per batch.
//!
//! Measured and left out (docs/performance.md, "Audit log on and off"): `O_DSYNC`
//! appends, and `io_uring` (no cheaper per durable write on the virtio disk measured,
//! where each is a write and a flush: "Issue 16, eleventh pass"). The preallocated
//! file that won is the sync journal (`journal`), beside the log rather than the log
//! itself, which stays JSON lines with nothing after the last.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::anchor;
use super::chain::{Chain, CHECKPOINT_EVERY, FLUSH_BYTES, LEAD_FALLBACK, UNWAITED_MAX};
use super::format::{head_message, HEAD_FILE};
use super::log::{io, AuditLog};

/// When the writer leads the pending batch itself: [`UNWAITED_MAX`] after its first
/// record, or [`LEAD_FALLBACK`] after a call began to wait for it (no runtime worker
/// went idle to lead it meanwhile); `None` while nothing is pending.
fn lead_at(c: &Chain) -> Option<Instant> {
    let unwaited = c.pending_since? + UNWAITED_MAX;
    Some(match c.wanted_since.filter(|_| c.pending_wanted()) {
        Some(since) => unwaited.min(since + LEAD_FALLBACK),
        None => unwaited,
    })
}

/// Whether the writer leads the pending batch now: it is past [`lead_at`], or large.
fn lead_due(c: &Chain) -> bool {
    lead_at(c).is_some_and(|at| at <= Instant::now()) || c.pending.len() >= FLUSH_BYTES
}

/// How far the anchors (`head.json`, the datastore's) may trail the log.
const HEAD_EVERY: Duration = Duration::from_millis(50);

impl AuditLog {
    /// The writer thread: its loop, and then (however it ends, a panic included) no
    /// call is left waiting for a sync that will not come.
    pub(super) fn run_writer(self: Arc<Self>) {
        struct CloseWaiters(Arc<AuditLog>);
        impl Drop for CloseWaiters {
            fn drop(&mut self) {
                self.0.close_waiters();
            }
        }
        let _close = CloseWaiters(self.clone());
        self.write_loop();
    }

    /// The writer's loop; returns when the log fails or its lock is poisoned.
    fn write_loop(&self) {
        let mut last_head = Instant::now()
            .checked_sub(HEAD_EVERY)
            .unwrap_or_else(Instant::now);
        loop {
            let lead = {
                let Ok(mut c) = self.shared.chain.lock() else {
                    return;
                };
                #[cfg(test)]
                self.shared.writer_looks.fetch_add(1, Ordering::Relaxed);
                // Asleep until a first record is pending (appends wake it only then,
                // and only while it sleeps long); awake, it looks again when the pending
                // batch is due (a call beginning to wait does not wake it: that would
                // cost a context switch per batch, and an idle worker leads it first).
                let idle = c.pending.is_empty() && self.anchors_current();
                let in_flight = self.batch_in_flight();
                let due = c.writer_asked_to_lead() || lead_due(&c);
                let wait = match lead_at(&c) {
                    // A lead is due (asked for, or timed): at once, or when the batch in
                    // flight is answered, which wakes it (`lead_now`; `answer` takes the
                    // chain's lock to see it, so the wake-up cannot come between this
                    // look and the wait). Looking again at once instead would spin until
                    // then: a whole journal wrap, or a slow disk's sync.
                    _ if due && in_flight => {
                        c.lead_now = true;
                        HEAD_EVERY
                    }
                    _ if due => Duration::ZERO,
                    Some(at) => at.saturating_duration_since(Instant::now()),
                    None if idle => CHECKPOINT_EVERY,
                    // Nothing pending, the anchors behind: a record appended meanwhile
                    // does not wake it (that would cost switches under load), so it
                    // looks again within `UNWAITED_MAX` (see `LEAD_FALLBACK`).
                    None => UNWAITED_MAX,
                };
                if !wait.is_zero() {
                    self.shared.writer_asleep.store(idle, Ordering::SeqCst);
                    c = match self.shared.wake.wait_timeout(c, wait) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                    self.shared.writer_asleep.store(false, Ordering::SeqCst);
                }
                if self.shared.failed.lock().map_or(true, |f| f.is_some()) {
                    return;
                }
                if c.pending.is_empty()
                    && c.since_checkpoint > 0
                    && c.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
                {
                    if let Err(e) = self.push_checkpoint(&mut c) {
                        tracing::error!(error = %e, "audit checkpoint failed");
                    }
                }
                c.writer_asked_to_lead() || lead_due(&c)
            };
            // A record no call waits for (or a large batch): lead a batch for it, unless
            // a call leads one now (which takes it, or passes the lead on).
            if lead && self.try_lead() {
                self.lead();
            }
            // Signing the head after every batch would cost more than the batch.
            if last_head.elapsed() >= HEAD_EVERY && !self.anchors_current() {
                self.write_anchors();
                last_head = Instant::now();
            }
        }
    }

    /// Whether the anchors name the last durable batch.
    fn anchors_current(&self) -> bool {
        self.sealed.lock().map_or(true, |s| {
            s.latest.as_ref().is_none_or(|a| a.seq == s.head_written)
        })
    }

    /// Fail closed: no further record is accepted, so nothing more is issued.
    pub(super) fn fail(&self, e: &str) {
        tracing::error!(event = "audit_write_failed", error = %e, "audit log write failed; refusing all issuance");
        if let Ok(mut f) = self.shared.failed.lock() {
            *f = Some(e.to_string());
        }
        self.close_waiters();
    }

    /// Nothing more will become durable: the waiting calls fail (their wake-ups dropped).
    fn close_waiters(&self) {
        let dropped = match self.shared.waiters.lock() {
            Ok(mut w) => {
                w.closed = true;
                std::mem::take(&mut w.queue)
            }
            Err(_) => return,
        };
        drop(dropped);
    }

    /// Moves the anchors (datastore, signed `head.json`) to the last sealed record.
    /// One caller at a time (the writer, `close`), so the anchors only move forward;
    /// `sealed` is not held while the key signs, as a leader answering its batch takes
    /// it (`note_sealed`) and would wait for the signature.
    pub(super) fn write_anchors(&self) {
        let Ok(_one_writer) = self.anchors_writing.lock() else {
            return;
        };
        let a = match self.sealed.lock() {
            Ok(s) => match &s.latest {
                Some(a) if a.seq != s.head_written => a.clone(),
                _ => return,
            },
            Err(_) => return,
        };
        if let Some(store) = &self.store {
            // An in-memory insert; the datastore makes it durable within its flush interval.
            if let Err(e) = store.advance_audit_anchor(a.seq, &anchor::datastore_record(&a)) {
                tracing::warn!(error = %e, "audit anchor update in the datastore failed");
            }
        }
        let result = self.sign(&head_message(a.seq, &a.hash)).and_then(|sig| {
            let head = json!({"seq": a.seq, "hash": a.hash, "key_id": self.key_id, "sig": sig});
            let tmp = self.dir.join("head.json.tmp");
            std::fs::write(&tmp, head.to_string()).map_err(io(&tmp))?;
            std::fs::rename(&tmp, self.dir.join(HEAD_FILE)).map_err(io(&tmp))
        });
        match result {
            Ok(()) => {
                if let Ok(mut s) = self.sealed.lock() {
                    s.head_written = a.seq;
                }
            }
            Err(e) => tracing::warn!(error = %e, "audit head update failed"),
        }
    }
}
