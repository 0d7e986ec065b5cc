//! The audit log writer as callers hold it: [`AuditLog`] and the state it shares with
//! its writer thread, appending a record (and a checkpoint when one is due), the
//! checkpoint and seal lines the keys sign, waiting until a record is durable, and
//! closing. Opening is in `open`, the writer thread in `writer`.

use std::cell::Cell;
use std::fs::File;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use ztid_hsm::{KeyManager, SignatureFormat};

use super::anchor::Anchor;
use super::chain::{
    Chain, LineKind, CHECKPOINT_BYTES, CHECKPOINT_EVERY, CHECKPOINT_RECORDS, FLUSH_BYTES,
};
use super::format::{checkpoint_message, LOG_FILE};
use super::journal::Journal;
use super::recovery::Quarantined;
use super::session::SessionKey;
use crate::datastore::DataStore;
use crate::AuditError;
use crate::{Error, Result};

thread_local! {
    /// How many records this thread appended, and the sequence number of the last.
    static APPENDED_HERE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// The records one call appends, from [`AuditLog::begin_records`] to
/// [`OwnRecords::finish`] with no `.await` in between (so on one thread): `finish`
/// names the last of them, which is all the call's answer has to wait for (records
/// other calls append meanwhile go into their own batches).
pub struct OwnRecords<'a> {
    log: PhantomData<&'a AuditLog>,
    count_before: u64,
    /// The thread that began: an `.await` added in between later could move the call
    /// to another thread, whose count says nothing of this call's records.
    thread: std::thread::ThreadId,
}

impl OwnRecords<'_> {
    /// The sequence number of the last record this thread appended since
    /// [`AuditLog::begin_records`]; `None` when it appended none, or when the call is
    /// no longer on the thread that began (the caller then waits for every record so
    /// far, which is always safe).
    pub fn finish(self) -> Option<u64> {
        if std::thread::current().id() != self.thread {
            return None;
        }
        let (count, seq) = APPENDED_HERE.with(Cell::get);
        (count != self.count_before).then_some(seq)
    }
}

/// What the callers and the writer thread share.
pub(super) struct Shared {
    /// The chain, appended to by callers and drained by the writer.
    pub(super) chain: Mutex<Chain>,
    /// Wakes the writer: a first record is pending while it sleeps, or the batch is large.
    pub(super) wake: Condvar,
    /// Set while the writer sleeps with nothing pending: a first record wakes it.
    pub(super) writer_asleep: AtomicBool,
    /// The last sequence number on disk and sealed, and the calls waiting for more.
    pub(super) waiters: Mutex<Waiters>,
    /// Why the writer failed, once it has: no record is accepted after that.
    pub(super) failed: Mutex<Option<String>>,
    /// How many times the writer looked at the chain (a test counts its wake-ups).
    #[cfg(test)]
    pub(super) writer_looks: std::sync::atomic::AtomicU64,
}

/// The calls waiting for their records to be durable, each woken once, when the sync
/// covering its last record returns (not at every sync: a call whose records went
/// into a later batch sleeps on).
pub(super) struct Waiters {
    /// The last sequence number on disk and sealed.
    pub(super) durable: u64,
    /// Set when the writer stops: nothing more will become durable.
    pub(super) closed: bool,
    /// A batch is in flight (led by a worker, a call or the writer thread: see `lead`).
    pub(super) leading: bool,
    /// (sequence number awaited, its wake-up), in no particular order.
    pub(super) queue: Vec<(u64, oneshot::Sender<Turn>)>,
}

/// What a waiting call is woken for.
pub(super) enum Turn {
    /// A sync covered its records.
    Durable,
    /// It leads the next batch (its records are pending, and no batch is in flight).
    Lead,
}

impl Waiters {
    /// Fresh, with everything up to `durable` on disk.
    pub(super) fn new(durable: u64) -> Self {
        Self {
            durable,
            closed: false,
            leading: false,
            queue: Vec::new(),
        }
    }
}

/// The last sealed, durable record, and whether the anchors have caught up with it.
#[derive(Default)]
pub(super) struct Sealed {
    /// The last sealed, durable record.
    pub(super) latest: Option<Anchor>,
    /// The sequence number the anchors last named.
    pub(super) head_written: u64,
}

/// The audit log writer.
pub struct AuditLog {
    pub(super) dir: PathBuf,
    /// The log, open for appending; written only by whoever leads a batch.
    pub(super) file: File,
    /// Where the leader makes each batch durable before appending it to `file`.
    pub(super) journal: Mutex<Journal>,
    /// Batches are led by runtime workers about to go idle (the server's runtime has
    /// the hook), not by the waiting calls themselves.
    pub(super) lead_when_idle: AtomicBool,
    pub(super) shared: Arc<Shared>,
    pub(super) key_manager: Arc<dyn KeyManager>,
    pub(super) key_id: String,
    pub(super) session: SessionKey,
    pub(super) store: Option<Arc<dyn DataStore>>,
    pub(super) sealed: Mutex<Sealed>,
    /// Held while the anchors are written (see `write_anchors`).
    pub(super) anchors_writing: Mutex<()>,
    pub(super) quarantined: Option<Quarantined>,
    pub(super) accepted_rollback: Vec<String>,
}

/// Maps an I/O error on `path` (in an audit directory) to the crate's error.
pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("audit log {}", path.display()))(e)
}

impl AuditLog {
    /// The chain, locked (an error once a holder of the lock panicked).
    pub(super) fn lock_chain(&self) -> Result<std::sync::MutexGuard<'_, Chain>> {
        self.shared
            .chain
            .lock()
            .map_err(|_| AuditError::Unavailable("audit lock poisoned".into()).into())
    }

    /// Starts a call that records events and then waits for them: see [`OwnRecords`].
    pub fn begin_records(&self) -> OwnRecords<'_> {
        OwnRecords {
            log: PhantomData,
            count_before: APPENDED_HERE.with(|c| c.get().0),
            thread: std::thread::current().id(),
        }
    }

    /// Appends `event`; returns its sequence number (await [`AuditLog::durable`] before acting on it).
    pub fn append(&self, event: Value) -> Result<u64> {
        self.append_event(&event)
    }

    /// [`Self::append`] for an event serialised straight into the log's line (a hot
    /// path's typed event skips building a `Value`); it must serialise as a JSON object.
    pub fn append_event<E: serde::Serialize + ?Sized>(&self, event: &E) -> Result<u64> {
        if let Some(e) = self.shared.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(AuditError::Unavailable(format!("audit log unavailable: {e}")).into());
        }
        let mut c = self.lock_chain()?;
        let first = c.pending.is_empty();
        let seq = c.push(LineKind::Event, event)?;
        if c.since_checkpoint >= CHECKPOINT_RECORDS
            || c.bytes_since_checkpoint >= CHECKPOINT_BYTES
            || c.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
        {
            self.push_checkpoint(&mut c)?;
        }
        let large = c.pending.len() >= FLUSH_BYTES;
        drop(c);
        APPENDED_HERE.with(|c| c.set((c.get().0.wrapping_add(1), seq)));
        // The writer syncs when a call waits for a record (see `durable`); it hears of
        // a first pending record only to bound how long a record no one waits for
        // stays in memory, and of a large batch to write it out.
        if (first && self.shared.writer_asleep.load(Ordering::SeqCst)) || large {
            self.shared.wake.notify_one();
        }
        Ok(seq)
    }

    /// The audit key's signature (base64 DER) over `msg`.
    pub(super) fn sign(&self, msg: &[u8]) -> Result<String> {
        Ok(B64.encode(
            self.key_manager
                .sign(&self.key_id, msg, SignatureFormat::Der)?,
        ))
    }

    /// Pushes a checkpoint: the audit key certifies the chain so far and this
    /// session's key.
    pub(super) fn push_checkpoint(&self, c: &mut Chain) -> Result<()> {
        let session_key = self.session.public_b64();
        let sig = self.sign(&checkpoint_message(c.next_seq, &c.prev, session_key))?;
        c.push(
            LineKind::Checkpoint,
            &json!({"key_id": self.key_id, "session_key": session_key, "sig": sig}),
        )?;
        c.since_checkpoint = 0;
        c.bytes_since_checkpoint = 0;
        c.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Ends the pending batch with a seal; returns (its sequence number, its hash).
    pub(super) fn push_seal(&self, c: &mut Chain) -> Result<Anchor> {
        let sig = self.session.seal(c.next_seq, &c.prev);
        let seq = c.push(LineKind::Seal, &json!({"sig": sig}))?;
        c.since_checkpoint -= 1; // seals do not count towards the next checkpoint
        Ok(Anchor {
            seq,
            hash: c.prev.clone(),
        })
    }

    /// Drains the writer and brings every anchor up to the last record (at shutdown:
    /// a cleanly stopped log ends with a seal, and its anchors name that seal).
    pub async fn close(&self) -> Result<()> {
        self.durable(self.last_seq()).await?;
        // A cleanly stopped log needs nothing from the journal. A failed sync fails the
        // log closed, as the writer's do: nothing more is issued on it.
        if let Err(e) = self.file.sync_data() {
            self.fail(&e.to_string());
            return Err(io(&self.dir)(e));
        }
        self.write_anchors();
        if let Some(store) = &self.store {
            store.flush()?;
        }
        Ok(())
    }

    /// What this start set aside (records after the last signed one), if anything.
    pub fn quarantined(&self) -> Option<&Quarantined> {
        self.quarantined.as_ref()
    }

    /// The anchors this start found out of reach and accepted (`accept_rollback`).
    pub fn accepted_rollback(&self) -> &[String] {
        &self.accepted_rollback
    }

    /// The sequence number of the last record appended.
    pub fn last_seq(&self) -> u64 {
        self.shared
            .chain
            .lock()
            .map(|c| c.next_seq - 1)
            .unwrap_or(0)
    }

    /// Resolves once every record up to `seq` is on disk and sealed. Who syncs it: a
    /// runtime worker about to go idle (`on_runtime_idle`, where the server installs it),
    /// or else the call itself when no batch is in flight (see `lead`); a call that
    /// does not lead waits to be answered or handed the lead.
    pub async fn durable(&self, seq: u64) -> Result<()> {
        loop {
            // Only a call whose record exists leads: it has something to sync.
            let (appended, notify) = {
                let mut c = self.lock_chain()?;
                let appended = c.next_seq > seq;
                let mut notify = false;
                if appended {
                    if !c.pending_wanted() {
                        c.wanted_since = Some(Instant::now());
                    }
                    c.wanted = c.wanted.max(seq);
                    // Where idle workers lead, a batch that has grown large is led by
                    // the writer at once (see `LEAD_AT_RECORDS`).
                    notify = self.lead_when_idle.load(Ordering::Relaxed) && c.ask_writer_to_lead();
                }
                (appended, notify)
            };
            if notify {
                self.shared.wake.notify_one();
            }
            let rx = {
                let mut w = self
                    .shared
                    .waiters
                    .lock()
                    .map_err(|_| AuditError::Unavailable("audit lock poisoned".into()))?;
                if w.durable >= seq {
                    return Ok(());
                }
                if w.closed {
                    return Err(self.stopped());
                }
                if appended && !w.leading && !self.lead_when_idle.load(Ordering::Relaxed) {
                    w.leading = true;
                    None
                } else {
                    let (tx, rx) = oneshot::channel();
                    w.queue.push((seq, tx));
                    Some(rx)
                }
            };
            if let Some(rx) = rx {
                let mut waiting = Waiting { log: self, rx };
                // Dropped (failed, or gone) when nothing more becomes durable.
                match (&mut waiting.rx).await {
                    Ok(Turn::Durable) => return Ok(()),
                    Ok(Turn::Lead) => {}
                    Err(_) => return Err(self.stopped()),
                }
            }
            self.lead();
        }
    }

    /// Why waiting is over without the record being durable.
    fn stopped(&self) -> Error {
        match self.shared.failed.lock().ok().and_then(|f| f.clone()) {
            Some(e) => AuditError::Unavailable(format!("audit log unavailable: {e}")).into(),
            None => AuditError::Unavailable("audit writer stopped".into()).into(),
        }
    }
}

/// A call waiting to be answered or handed the lead; if it goes away (its request
/// cancelled) holding a lead it did not take, the lead goes on to another call.
struct Waiting<'a> {
    log: &'a AuditLog,
    rx: oneshot::Receiver<Turn>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Closed first: a lead handed over after this fails to send (and goes to the
        // next call) instead of landing, unread, in a receiver about to be dropped.
        self.rx.close();
        if let Ok(Turn::Lead) = self.rx.try_recv() {
            self.log.pass_lead_on();
        }
    }
}

/// The log file inside an audit directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join(LOG_FILE)
}
