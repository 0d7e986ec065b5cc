//! The writer thread: it waits for records, ends each batch with a seal, writes and
//! `fdatasync`s the batch (records accepted meanwhile form the next one: group
//! commit), wakes the calls whose records it covers (only those), pushes a checkpoint
//! when the log has been idle past one, and moves the anchors (datastore, signed
//! `head.json`) after the log, at most [`HEAD_EVERY`] behind. A failed write fails the
//! log closed and every waiting call with it.
//!
//! It syncs on demand: when a call waits for a pending record (not at every record:
//! a call minting 100 SVIDs costs one sync, not 25), holding the batch open briefly
//! while other calls are still minting (see `group_window`); a record no call waits
//! for is synced within [`UNWAITED_MAX`].
//!
//! Measured and left out (docs/performance.md, "Audit log on and off"): `O_DSYNC`, and
//! preallocated zero-filled segments (faster syncs on a quiet disk, but zeros after the
//! last record in a file operators and tools read as JSON lines).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;

use super::anchor::{self, Anchor};
use super::chain::{Chain, CHECKPOINT_EVERY, FLUSH_BYTES, GROUP_WINDOW, UNWAITED_MAX};
use super::format::{head_message, HEAD_FILE};
use super::log::{io, AuditLog};

/// Syncs in flight at once (each on its own thread).
const SYNCS_IN_FLIGHT: usize = 2;

/// The hand-over from the writer to the sync threads. Two condition variables, so a
/// hand-over wakes one sync thread and a returned sync wakes only the writer: one
/// shared by all three woke every thread at every step, and each wake-up is a context
/// switch in this VM (the two sync threads switched about 6 times per batch, counted with
/// `perf stat --per-thread`).
#[derive(Default)]
struct Syncs {
    state: Mutex<SyncState>,
    /// A batch was written (sync threads wait on it).
    work: Condvar,
    /// A sync returned (the writer waits on it for a free slot).
    slot: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// The last batch written and not yet claimed by a sync thread (a later batch
    /// replaces it: one sync covers both).
    written: Option<Anchor>,
    /// Syncs running now.
    running: usize,
    /// Set when the log stops: the sync threads end.
    stopped: bool,
}

impl Syncs {
    /// Waits until a sync thread could take a new batch; false once stopped.
    fn wait_for_slot(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        while !s.stopped && s.running + usize::from(s.written.is_some()) >= SYNCS_IN_FLIGHT {
            s = match self.slot.wait(s) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
        !s.stopped
    }

    /// A batch is written up to `sealed`.
    fn hand_over(&self, sealed: Anchor) {
        if let Ok(mut s) = self.state.lock() {
            s.written = Some(sealed);
        }
        self.work.notify_one();
    }

    /// Waits for a written batch to sync; `None` once stopped.
    fn claim(&self) -> Option<Anchor> {
        let mut s = self.state.lock().ok()?;
        loop {
            if s.stopped {
                return None;
            }
            if let Some(sealed) = s.written.take() {
                s.running += 1;
                return Some(sealed);
            }
            s = self.work.wait(s).ok()?;
        }
    }

    /// A sync returned.
    fn release(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.running = s.running.saturating_sub(1);
        }
        self.slot.notify_one();
    }

    /// The log stops: every thread waiting here returns.
    fn stop(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.stopped = true;
        }
        self.work.notify_all();
        self.slot.notify_all();
    }
}

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
        let syncs = Arc::new(Syncs::default());
        // However the writer ends (a panic included), the sync threads end with it.
        struct StopSyncs(Arc<Syncs>);
        impl Drop for StopSyncs {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        let _stop = StopSyncs(syncs.clone());
        let mut threads = Vec::new();
        for i in 0..SYNCS_IN_FLIGHT {
            // Its own open file, not a dup: a failed writeback is then reported to
            // every sync thread's next `fdatasync` (the kernel reports it once per
            // open file), so no thread can answer over a batch another lost.
            let path = super::log::log_path(&self.dir);
            let own = match std::fs::OpenOptions::new().append(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    self.fail(&format!("audit sync thread: {e}"));
                    syncs.stop();
                    return;
                }
            };
            let (log, sync_syncs) = (self.clone(), syncs.clone());
            match std::thread::Builder::new()
                .name(format!("ztid-audit-sync-{i}"))
                .spawn(move || log.sync_loop(&own, &sync_syncs))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.fail(&format!("audit sync thread: {e}"));
                    syncs.stop();
                    return;
                }
            }
        }
        self.write_loop(&file, &syncs);
        syncs.stop();
        for t in threads {
            let _ = t.join();
        }
    }

    /// A sync thread: syncs the file once a batch is written to it, then answers the
    /// calls whose records that batch (and every batch before it) covers. With
    /// [`SYNCS_IN_FLIGHT`] of them, a batch written while another syncs starts its own
    /// sync at once instead of waiting for the first to return (the disk overlaps
    /// them); `fdatasync` covers everything written to the file before it began, so
    /// whichever returns first answers up to its own batch.
    fn sync_loop(&self, file: &File, syncs: &Syncs) {
        while let Some(sealed) = syncs.claim() {
            let result = file.sync_data();
            syncs.release();
            if let Err(e) = result {
                self.fail(&e.to_string());
                syncs.stop();
                return;
            }
            if self.shared.failed.lock().map_or(true, |f| f.is_some()) {
                return;
            }
            let seq = sealed.seq;
            if let Ok(mut s) = self.sealed.lock() {
                if s.latest.as_ref().is_none_or(|l| l.seq < seq) {
                    s.latest = Some(sealed);
                }
            }
            self.publish(seq);
        }
    }

    /// The writer's loop; returns when the log fails or its lock is poisoned.
    fn write_loop(self: &Arc<Self>, file: &File, syncs: &Syncs) {
        let mut last_head = Instant::now()
            .checked_sub(HEAD_EVERY)
            .unwrap_or_else(Instant::now);
        let mut head_due = false;
        loop {
            let next = {
                let Ok(mut c) = self.shared.chain.lock() else {
                    return;
                };
                // Wait until a call waits for a pending record, the batch is large,
                // or a record no one waits for has been pending long enough.
                loop {
                    let wait = match c.pending_since {
                        Some(since) => {
                            if c.pending_wanted() || c.pending.len() >= FLUSH_BYTES {
                                break;
                            }
                            match UNWAITED_MAX.checked_sub(since.elapsed()) {
                                Some(left) if !left.is_zero() => left,
                                _ => break,
                            }
                        }
                        None if head_due => HEAD_EVERY,
                        None => CHECKPOINT_EVERY,
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
                if !c.pending.is_empty() {
                    // Every sync busy: the batch grows until one is free.
                    drop(c);
                    if !syncs.wait_for_slot() {
                        return;
                    }
                    c = match self.shared.chain.lock() {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                    c = match self.group_window(c) {
                        Some(c) => c,
                        None => return,
                    };
                }
                if c.pending.is_empty() {
                    None
                } else {
                    // The seal goes out in the same write and sync as what it covers.
                    match self.push_seal(&mut c) {
                        Ok(sealed) => {
                            c.taken = sealed.seq;
                            c.pending_since = None;
                            Some((std::mem::take(&mut c.pending), sealed))
                        }
                        Err(e) => {
                            self.fail(&e.to_string());
                            return;
                        }
                    }
                }
            };
            if let Some((batch, sealed)) = next {
                // Into the page cache; a sync thread makes it durable and answers.
                if let Err(e) = (&*file).write_all(&batch) {
                    self.fail(&e.to_string());
                    return;
                }
                syncs.hand_over(sealed);
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

    /// Group commit: while calls are minting (each appends within microseconds and
    /// then waits), holds the batch open for at most [`GROUP_WINDOW`], so one sync
    /// answers them all instead of each paying its own. A lone call (none other
    /// minting) is written at once, so one call in flight waits for no window.
    fn group_window<'a>(&self, mut c: MutexGuard<'a, Chain>) -> Option<MutexGuard<'a, Chain>> {
        let shared = &self.shared;
        shared.window_open.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + GROUP_WINDOW;
        while shared.minting.load(Ordering::SeqCst) > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            c = match shared.wake.wait_timeout(c, left) {
                Ok((g, _)) => g,
                Err(_) => return None,
            };
        }
        shared.window_open.store(false, Ordering::SeqCst);
        Some(c)
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
                // Syncs may return out of order; durable only moves forward.
                w.durable = w.durable.max(seq);
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
