//! The writer thread: it waits for records, ends each batch with a seal, writes and
//! `fdatasync`s the batch (records accepted meanwhile form the next one: group
//! commit), wakes the calls whose records it covers (only those), pushes a checkpoint
//! when the log has been idle past one, and moves the anchors (datastore, signed
//! `head.json`) after the log, at most [`HEAD_EVERY`] behind. A failed write fails the
//! log closed and every waiting call with it.
//!
//! Tried or measured and left out (docs/performance.md, "Audit log on and off"): a
//! window holding a batch open while calls are still minting (no effect beyond the
//! noise), `O_DSYNC`, and preallocated zero-filled segments (faster syncs on a quiet
//! disk, but zeros after the last record in a file operators and tools read as JSON
//! lines).

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::anchor;
use super::chain::CHECKPOINT_EVERY;
use super::format::{head_message, HEAD_FILE};
use super::log::{io, AuditLog};

/// How far the anchors (`head.json`, the datastore's) may trail the log.
const HEAD_EVERY: Duration = Duration::from_millis(50);

impl AuditLog {
    /// The writer thread: its loop, and then (however it ends, a panic included) no
    /// call is left waiting for a sync that will not come.
    pub(super) fn run_writer(self: Arc<Self>, file: File) {
        struct CloseWaiters(Arc<AuditLog>);
        impl Drop for CloseWaiters {
            fn drop(&mut self) {
                self.0.close_waiters();
            }
        }
        let _close = CloseWaiters(self.clone());
        self.write_loop(file);
    }

    /// The writer's loop; returns when the log fails or its lock is poisoned.
    fn write_loop(self: &Arc<Self>, mut file: File) {
        let mut last_head = Instant::now()
            .checked_sub(HEAD_EVERY)
            .unwrap_or_else(Instant::now);
        let mut head_due = false;
        loop {
            let next = {
                let Ok(mut c) = self.shared.chain.lock() else {
                    return;
                };
                while c.pending.is_empty() {
                    let wait = if head_due {
                        HEAD_EVERY
                    } else {
                        CHECKPOINT_EVERY
                    };
                    let (g, timeout) = match self.shared.wake.wait_timeout(c, wait) {
                        Ok((g, t)) => (g, t.timed_out()),
                        Err(_) => return,
                    };
                    c = g;
                    if c.pending.is_empty()
                        && c.since_checkpoint > 0
                        && c.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
                    {
                        if let Err(e) = self.push_checkpoint(&mut c) {
                            tracing::error!(error = %e, "audit checkpoint failed");
                        }
                    }
                    if timeout && c.pending.is_empty() && head_due {
                        break;
                    }
                }
                if c.pending.is_empty() {
                    None
                } else {
                    // The seal goes out in the same write and sync as what it covers.
                    match self.push_seal(&mut c) {
                        Ok(sealed) => Some((std::mem::take(&mut c.pending), sealed)),
                        Err(e) => {
                            self.fail(&e.to_string());
                            return;
                        }
                    }
                }
            };
            if let Some((batch, sealed)) = next {
                let result = file.write_all(&batch).and_then(|_| file.sync_data());
                if let Err(e) = result {
                    self.fail(&e.to_string());
                    return;
                }
                // Durable and sealed: answer the waiting calls before anything else.
                let seq = sealed.seq;
                if let Ok(mut s) = self.sealed.lock() {
                    s.latest = Some(sealed);
                }
                self.publish(seq);
                head_due = true;
            }
            // The anchors trail the log by at most HEAD_EVERY: signing the head and
            // writing the datastore after every batch would cost more than the batch.
            if head_due && last_head.elapsed() >= HEAD_EVERY {
                self.write_anchors();
                head_due = false;
                last_head = Instant::now();
            }
        }
    }

    /// Fail closed: no further record is accepted, so nothing more is issued.
    pub(super) fn fail(&self, e: &str) {
        tracing::error!(event = "audit_write_failed", error = %e, "audit log write failed; refusing all issuance");
        if let Ok(mut f) = self.shared.failed.lock() {
            *f = Some(e.to_string());
        }
        self.close_waiters();
    }

    /// Everything up to `seq` is durable and sealed: wakes the calls waiting for it.
    pub(super) fn publish(&self, seq: u64) {
        let ready: Vec<_> = match self.shared.waiters.lock() {
            Ok(mut w) => {
                w.durable = seq;
                w.queue
                    .extract_if(.., |(awaited, _)| *awaited <= seq)
                    .map(|(_, wake)| wake)
                    .collect()
            }
            Err(_) => return,
        };
        for wake in ready {
            let _ = wake.send(());
        }
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
    pub(super) fn write_anchors(&self) {
        let Ok(mut s) = self.sealed.lock() else {
            return;
        };
        let Some(a) = s.latest.clone() else { return };
        if a.seq == s.head_written {
            return;
        }
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
            Ok(()) => s.head_written = a.seq,
            Err(e) => tracing::warn!(error = %e, "audit head update failed"),
        }
    }
}
