//! The tamper-evident audit log.
//!
//! Every security event is one JSON line in `DATA_DIR/audit/audit.log`:
//! `{"seq":N,"time_ms":T,"prev":"<hex SHA-256 of the previous line>","event":{...}}`.
//! Changing, deleting or reordering any line breaks the hash chain. What makes the
//! chain the *server's* (see [`format`] for the bytes each signature covers):
//!
//! - At every start the server makes an in-memory Ed25519 *session key*, and a
//!   *checkpoint* line signed by the audit key (in the key manager) certifies it;
//!   further checkpoints follow every 10 s, 10,000 records or 16 MiB.
//! - Every batch the writer makes durable ends with a *seal* line signed by the
//!   session key, in the same write and the same `fdatasync`. A record is the
//!   server's only if a seal follows it; nothing acknowledged is ever unsealed, and
//!   no one can seal without the session key, which dies with the process.
//! - The last sealed record is *anchored* outside the log ([`anchor`]): in the
//!   datastore (only forward) and in the signed `head.json`, both every 50 ms and at
//!   shutdown, and in checkpoints exported for an off-host witness (`audit checkpoint`).
//!
//! At start ([`recovery`]) records after the last seal are never chained onto: they
//! go to `quarantine.log` (an error is logged, `ztid_audit_tamper_detected` is set
//! and the log records what was set aside), and a log that no longer reaches an
//! anchor (cut back, rewritten, removed) stops the server. `ztid-server audit verify`
//! walks all of it, names the first bad record, and fails on unsealed records unless
//! told `--allow-unsigned-tail`.
//!
//! Durability: callers get a sequence number at once and wait (asynchronously) until
//! the writer thread has `fdatasync`ed past it; writes are batched, so many
//! concurrent mints share one sync and one seal. No SVID leaves the server before its
//! record is durable and sealed.

mod anchor;
mod checkpoint;
mod error;
pub mod format;
mod recovery;
mod session;
mod verify;

pub use anchor::{Anchor, NamedAnchor};
pub use checkpoint::{export_checkpoint, read_checkpoint_file, ExportedCheckpoint};
pub use error::{AuditError, VerifyError};
pub use recovery::Quarantined;
pub use verify::{verify, verify_with, VerifyOptions, VerifyReport};

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::watch;
use ztid_hsm::{KeyAlgorithm, KeyManager, SignatureFormat};

use crate::datastore::DataStore;
use crate::{Error, Result};
use format::{checkpoint_message, head_message, now_ms, sha256_hex, AuditKeyVerifier};
use format::{HEAD_FILE, KEY_ID_FILE, LOG_FILE};
use session::SessionKey;

/// A checkpoint at least this often (by time)...
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// ...or by count...
const CHECKPOINT_RECORDS: u64 = 10_000;
/// ...or by size, so a start finds the last certified session key in the last few
/// megabytes of the log (see `recovery`).
const CHECKPOINT_BYTES: u64 = 16 << 20;
/// How far the anchors (`head.json`, the datastore's) may trail the log.
const HEAD_EVERY: Duration = Duration::from_millis(50);

struct Chain {
    next_seq: u64,
    prev: String,
    pending: Vec<u8>,
    pending_last: u64,
    since_checkpoint: u64,
    bytes_since_checkpoint: u64,
    last_checkpoint: Instant,
}

struct Shared {
    chain: Mutex<Chain>,
    wake: Condvar,
    durable: watch::Sender<u64>,
    failed: Mutex<Option<String>>,
}

/// The last sealed, durable record, and whether the anchors have caught up with it.
#[derive(Default)]
struct Sealed {
    latest: Option<Anchor>,
    head_written: u64,
}

/// How [`AuditLog::open_with`] anchors the log.
#[derive(Default, Clone)]
pub struct AuditOptions {
    /// The datastore to keep the anchor in (the server always gives it).
    pub store: Option<Arc<dyn DataStore>>,
    /// Continue although the log no longer reaches its anchors, recording this reason
    /// (`audit accept-rollback`); `None` refuses to open such a log.
    pub accept_rollback: Option<String>,
}

/// The audit log writer.
pub struct AuditLog {
    dir: PathBuf,
    shared: Arc<Shared>,
    key_manager: Arc<dyn KeyManager>,
    key_id: String,
    session: SessionKey,
    store: Option<Arc<dyn DataStore>>,
    sealed: Mutex<Sealed>,
    quarantined: Option<Quarantined>,
    accepted_rollback: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("audit log {}", path.display()))(e)
}

/// The audit key's id in `dir`, created (with the key) on first use when `create`.
fn audit_key_id(dir: &Path, key_manager: &dyn KeyManager, create: bool) -> Result<String> {
    let key_file = dir.join(KEY_ID_FILE);
    match std::fs::read_to_string(&key_file) {
        Ok(id) => Ok(id.trim().to_string()),
        Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("audit-{}", crate::authority::random_hex(8)?);
            key_manager.generate(&id, KeyAlgorithm::EcdsaP256)?;
            std::fs::write(&key_file, &id).map_err(io(&key_file))?;
            Ok(id)
        }
        Err(e) => Err(io(&key_file)(e)),
    }
}

impl AuditLog {
    /// Opens (creating) the log in `dir`, with its signing key in `key_manager` and no
    /// anchor outside the directory (tests; the server uses [`AuditLog::open_with`]).
    pub fn open(dir: &Path, key_manager: Arc<dyn KeyManager>) -> Result<Arc<Self>> {
        Self::open_with(dir, key_manager, AuditOptions::default())
    }

    /// Opens (creating) the log in `dir`: checks it against its anchors, sets aside
    /// records nobody signed, starts a session and the writer thread.
    pub fn open_with(
        dir: &Path,
        key_manager: Arc<dyn KeyManager>,
        options: AuditOptions,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key_id = audit_key_id(dir, key_manager.as_ref(), true)?;
        let verifier = AuditKeyVerifier::new(key_manager.public_key(&key_id)?.raw);
        let mut anchors = Vec::new();
        let head = match anchor::read_head(dir, &verifier) {
            anchor::Head::Valid(a) => {
                anchors.push(NamedAnchor {
                    source: "the signed head (head.json)".into(),
                    anchor: a.clone(),
                });
                Some(a)
            }
            anchor::Head::Absent => None,
            anchor::Head::Unreadable(e) => {
                tracing::warn!(event = "audit_head_unreadable", error = %e, "audit head.json unreadable; ignored (the datastore anchor still applies)");
                None
            }
            anchor::Head::BadSignature => {
                tracing::error!(
                    event = "audit_tamper_detected",
                    "audit head.json is not signed by the audit key; ignored"
                );
                crate::metrics::audit_tamper_detected(0);
                None
            }
        };
        if let Some(store) = &options.store {
            if let Some(a) = anchor::from_datastore(store.as_ref())? {
                anchors.push(a);
            }
        }
        let path = dir.join(LOG_FILE);
        let recovered = recovery::recover(
            &path,
            &verifier,
            head.as_ref(),
            &anchors,
            options.accept_rollback.is_some(),
        )?;
        if !recovered.accepted_rollback.is_empty() {
            // The operator's decision: the anchors restart from the log as it is.
            let at = recovered.trusted.clone().unwrap_or(Anchor {
                seq: 0,
                hash: "0".repeat(64),
            });
            if let Some(store) = &options.store {
                store.replace_audit_anchor(at.seq, &anchor::datastore_record(&at))?;
            }
            let _ = std::fs::remove_file(dir.join(HEAD_FILE));
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let next_seq = recovered.next_seq;
        let (durable, _) = watch::channel(next_seq - 1);
        let shared = Arc::new(Shared {
            chain: Mutex::new(Chain {
                next_seq,
                prev: recovered.prev.clone(),
                pending: Vec::new(),
                pending_last: next_seq - 1,
                since_checkpoint: 0,
                bytes_since_checkpoint: 0,
                last_checkpoint: Instant::now(),
            }),
            wake: Condvar::new(),
            durable,
            failed: Mutex::new(None),
        });
        let log = Arc::new(Self {
            dir: dir.to_path_buf(),
            shared,
            key_manager,
            key_id,
            session: SessionKey::generate()?,
            store: options.store.clone(),
            sealed: Mutex::new(Sealed {
                latest: recovered.trusted.clone(),
                head_written: 0,
            }),
            quarantined: recovered.quarantined.clone(),
            accepted_rollback: recovered.accepted_rollback.clone(),
        });
        {
            let mut c = log.lock_chain()?;
            // The session starts with a checkpoint that certifies its key.
            log.push_checkpoint(&mut c)?;
            if let Some(q) = &recovered.quarantined {
                tracing::error!(
                    event = "audit_tamper_detected",
                    records = q.records,
                    bytes = q.bytes,
                    after_seq = recovered.trusted.as_ref().map_or(0, |t| t.seq),
                    file = %dir.join(format::QUARANTINE_FILE).display(),
                    "audit log: records after the last one the server signed were set aside, not chained onto (appended while the server was stopped, or left by a crash before they were acknowledged)"
                );
                crate::metrics::audit_tamper_detected(q.records);
                log.push(
                    &mut c,
                    json!({"event": {"type": "audit_unsigned_records_quarantined",
                        "records": q.records, "bytes": q.bytes, "sha256": q.sha256,
                        "claimed_first_seq": q.first_seq, "claimed_last_seq": q.last_seq,
                        "file": format::QUARANTINE_FILE}}),
                )?;
            }
            if !recovered.accepted_rollback.is_empty() {
                tracing::error!(
                    event = "audit_rollback_accepted",
                    reason = options.accept_rollback.as_deref().unwrap_or_default(),
                    anchors = ?recovered.accepted_rollback,
                    "audit log: continuing from a log that no longer reaches its anchors, on the operator's word"
                );
                crate::metrics::audit_tamper_detected(0);
                log.push(
                    &mut c,
                    json!({"event": {"type": "audit_rollback_accepted",
                        "reason": options.accept_rollback.clone().unwrap_or_default(),
                        "anchors_not_reached": recovered.accepted_rollback}}),
                )?;
            }
        }
        let writer = log.clone();
        std::thread::Builder::new()
            .name("ztid-audit".into())
            .spawn(move || writer.run_writer(file))
            .map_err(io(dir))?;
        log.shared.wake.notify_one();
        Ok(log)
    }

    fn lock_chain(&self) -> Result<std::sync::MutexGuard<'_, Chain>> {
        self.shared
            .chain
            .lock()
            .map_err(|_| AuditError::Unavailable("audit lock poisoned".into()).into())
    }

    /// Appends `event`; returns its sequence number (await [`AuditLog::durable`] before acting on it).
    pub fn append(&self, event: Value) -> Result<u64> {
        if let Some(e) = self.shared.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(AuditError::Unavailable(format!("audit log unavailable: {e}")).into());
        }
        let mut c = self.lock_chain()?;
        let seq = self.push(&mut c, json!({"event": event}))?;
        if c.since_checkpoint >= CHECKPOINT_RECORDS
            || c.bytes_since_checkpoint >= CHECKPOINT_BYTES
            || c.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
        {
            self.push_checkpoint(&mut c)?;
        }
        drop(c);
        self.shared.wake.notify_one();
        Ok(seq)
    }

    fn push(&self, c: &mut Chain, mut body: Value) -> Result<u64> {
        let seq = c.next_seq;
        // seq, time and prev first, then the body's fields; the hash covers the exact bytes.
        let obj = body
            .as_object_mut()
            .ok_or_else(|| AuditError::Unavailable("audit body".into()))?;
        let rest =
            serde_json::to_string(obj).map_err(|e| AuditError::Unavailable(e.to_string()))?;
        // The record's hash covers the line without its line end.
        let mut line = format!(
            "{{\"seq\":{seq},\"time_ms\":{},\"prev\":\"{}\",{}",
            now_ms(),
            c.prev,
            &rest[1..]
        );
        c.prev = sha256_hex(line.as_bytes());
        line.push('\n');
        c.pending.extend_from_slice(line.as_bytes());
        c.pending_last = seq;
        c.next_seq += 1;
        c.since_checkpoint += 1;
        c.bytes_since_checkpoint += line.len() as u64;
        Ok(seq)
    }

    fn sign(&self, msg: &[u8]) -> Result<String> {
        Ok(B64.encode(
            self.key_manager
                .sign(&self.key_id, msg, SignatureFormat::Der)?,
        ))
    }

    fn push_checkpoint(&self, c: &mut Chain) -> Result<()> {
        let session_key = self.session.public_b64();
        let sig = self.sign(&checkpoint_message(c.next_seq, &c.prev, session_key))?;
        self.push(
            c,
            json!({"checkpoint": {"key_id": self.key_id, "session_key": session_key, "sig": sig}}),
        )?;
        c.since_checkpoint = 0;
        c.bytes_since_checkpoint = 0;
        c.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Ends the pending batch with a seal; returns (its sequence number, its hash).
    fn push_seal(&self, c: &mut Chain) -> Result<Anchor> {
        let sig = self.session.seal(c.next_seq, &c.prev);
        let seq = self.push(c, json!({"seal": {"sig": sig}}))?;
        c.since_checkpoint -= 1; // seals do not count towards the next checkpoint
        Ok(Anchor {
            seq,
            hash: c.prev.clone(),
        })
    }

    fn run_writer(self: Arc<Self>, mut file: File) {
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
                self.shared.durable.send_replace(seq);
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
    fn fail(&self, e: &str) {
        tracing::error!(event = "audit_write_failed", error = %e, "audit log write failed; refusing all issuance");
        if let Ok(mut f) = self.shared.failed.lock() {
            *f = Some(e.to_string());
        }
    }

    /// Moves the anchors (datastore, signed `head.json`) to the last sealed record.
    fn write_anchors(&self) {
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

    /// Drains the writer and brings every anchor up to the last record (at shutdown:
    /// a cleanly stopped log ends with a seal, and its anchors name that seal).
    pub async fn close(&self) -> Result<()> {
        self.durable(self.last_seq()).await?;
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

    /// Resolves once every record up to `seq` is on disk and sealed.
    pub async fn durable(&self, seq: u64) -> Result<()> {
        let mut rx = self.shared.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(e) = self.shared.failed.lock().ok().and_then(|f| f.clone()) {
                return Err(AuditError::Unavailable(format!("audit log unavailable: {e}")).into());
            }
            if tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return Err(AuditError::Unavailable("audit writer stopped".into()).into());
            }
        }
    }
}

/// The log file inside an audit directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join(LOG_FILE)
}

/// The audit key's id and verifier for an existing audit directory (offline verbs).
fn existing_key(
    dir: &Path,
    key_manager: &dyn KeyManager,
) -> std::result::Result<(String, AuditKeyVerifier, Vec<u8>), VerifyError> {
    let key_id = audit_key_id(dir, key_manager, false)
        .map_err(|e| VerifyError::AuditKey(format!("no audit key id in {}: {e}", dir.display())))?;
    let public = key_manager
        .public_key(&key_id)
        .map_err(|e| VerifyError::AuditKey(format!("audit key {key_id}: {e}")))?;
    Ok((key_id, AuditKeyVerifier::new(public.raw), public.spki_der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::SledStore;
    use ztid_hsm::SoftwareKeyManager;

    struct Fixture {
        dir: tempfile::TempDir,
        km: Arc<dyn KeyManager>,
        store: Arc<dyn DataStore>,
        rt: tokio::runtime::Runtime,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let km: Arc<dyn KeyManager> =
                Arc::new(SoftwareKeyManager::open(dir.path().join("keys")).unwrap());
            let store: Arc<dyn DataStore> =
                Arc::new(SledStore::open(&dir.path().join("datastore")).unwrap());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            Self { dir, km, store, rt }
        }

        fn audit(&self) -> PathBuf {
            self.dir.path().join("audit")
        }

        fn open(&self) -> Result<Arc<AuditLog>> {
            AuditLog::open_with(
                &self.audit(),
                self.km.clone(),
                AuditOptions {
                    store: Some(self.store.clone()),
                    accept_rollback: None,
                },
            )
        }

        /// A server run: open, `n` events (a checkpoint in the middle), clean stop.
        fn run(&self, n: usize) -> Arc<AuditLog> {
            let log = self.open().unwrap();
            let mut last = 0;
            for i in 0..n {
                last = log
                    .append(json!({"type": "x509_svid_issued", "serial": format!("{i:04}")}))
                    .unwrap();
                if i == n / 2 {
                    let mut c = log.shared.chain.lock().unwrap();
                    log.push_checkpoint(&mut c).unwrap();
                }
            }
            self.rt.block_on(log.durable(last)).unwrap();
            self.rt.block_on(log.close()).unwrap();
            log
        }

        fn verify(&self) -> std::result::Result<VerifyReport, VerifyError> {
            verify(&self.audit(), self.km.as_ref())
        }

        fn verify_allowing_unsigned_tail(&self) -> VerifyReport {
            verify_with(
                &self.audit(),
                self.km.as_ref(),
                &VerifyOptions {
                    allow_unsigned_tail: true,
                    ..Default::default()
                },
            )
            .unwrap()
        }

        fn lines(&self) -> Vec<String> {
            std::fs::read_to_string(log_path(&self.audit()))
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }

        fn put(&self, lines: &[String]) {
            std::fs::write(
                log_path(&self.audit()),
                lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
            )
            .unwrap();
        }

        /// Appends a correctly hash-linked event, as anyone who can write the file can.
        fn append_linked(&self, event: Value) -> String {
            let lines = self.lines();
            let last = lines.last().unwrap();
            let seq = serde_json::from_str::<Value>(last).unwrap()["seq"]
                .as_u64()
                .unwrap();
            let forged = format!(
                "{{\"seq\":{},\"time_ms\":1,\"prev\":\"{}\",\"event\":{event}}}",
                seq + 1,
                sha256_hex(last.as_bytes())
            );
            let mut all = lines.clone();
            all.push(forged.clone());
            self.put(&all);
            forged
        }

        fn quarantine(&self) -> String {
            std::fs::read_to_string(self.audit().join(format::QUARANTINE_FILE)).unwrap_or_default()
        }
    }

    fn seq_of(line: &str) -> u64 {
        serde_json::from_str::<Value>(line).unwrap()["seq"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn a_clean_stop_leaves_a_fully_signed_log_that_reopens_where_it_left_off() {
        let f = Fixture::new();
        f.run(10);
        let r = f.verify().unwrap();
        let n = f.lines().len() as u64;
        assert_eq!((r.records, r.signed_through, r.unsigned_tail), (n, n, 0));
        assert_eq!(
            r.checkpoints, 2,
            "the session's own and the one in the middle"
        );
        assert!(r.seals >= 1);
        assert_eq!(
            r.head_seq,
            Some(n),
            "close() anchors the head on the last seal"
        );
        f.run(3);
        let r = f.verify().unwrap();
        assert_eq!(r.records, f.lines().len() as u64);
        assert_eq!(r.unsigned_tail, 0);
        assert!(
            f.quarantine().is_empty(),
            "nothing set aside after a clean stop"
        );
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let f = Fixture::new();
        f.run(10);
        let orig = f.lines();
        let check = |l: &[String]| {
            f.put(l);
            f.verify().unwrap_err()
        };
        let at = |serial: &str| orig.iter().position(|l| l.contains(serial)).unwrap();
        // One byte changed in a record: the next one no longer chains to it.
        let mut l = orig.clone();
        let i = at("\"0003\"");
        l[i] = l[i].replace("0003", "0903");
        let e = check(&l);
        assert!(matches!(e, VerifyError::ChainBreak { record } if record == i as u64 + 2));
        assert_eq!(
            e.to_string(),
            format!(
                "record {}: does not chain to the record before it (changed, deleted or reordered)",
                i + 2
            )
        );
        let out_of_place = |e: VerifyError| {
            let (record, found) = (i as u64 + 1, i as u64 + 2);
            assert!(
                matches!(e, VerifyError::Sequence { record: r, found: s } if (r, s) == (record, found)),
                "{e}"
            );
            assert!(e
                .to_string()
                .starts_with(&format!("record {record}: sequence number is {found}")));
        };
        // A record deleted.
        let mut l = orig.clone();
        l.remove(i);
        out_of_place(check(&l));
        // Two records swapped.
        let mut l = orig.clone();
        l.swap(i, i + 1);
        out_of_place(check(&l));
        // The tail cut.
        let l = orig[..i].to_vec();
        let e = check(&l);
        assert!(matches!(e, VerifyError::CutBeforeHead { .. }), "{e}");
        assert!(e.to_string().contains("records were cut from the end"));
        // A forged signature: the record at `at` gets `sig_len` bytes of ones as its
        // `kind` signature.
        let forged = |at: usize, kind: &str, sig_len: usize| {
            let mut l = orig.clone();
            let mut v: Value = serde_json::from_str(&l[at]).unwrap();
            v[kind]["sig"] = json!(B64.encode(vec![1u8; sig_len]));
            l[at] = v.to_string();
            let e = check(&l);
            assert!(
                matches!(
                    (kind, &e),
                    ("checkpoint", VerifyError::BadCheckpoint { .. })
                        | ("seal", VerifyError::BadSeal { .. })
                        | (_, VerifyError::ChainBreak { .. })
                ),
                "{e}"
            );
            let e = e.to_string();
            assert!(
                e.contains(&format!("{kind} signature does not verify"))
                    || e.contains("does not chain"),
                "{e}"
            );
        };
        let last_checkpoint = orig.iter().rposition(|x| x.contains("checkpoint")).unwrap();
        forged(last_checkpoint, "checkpoint", 70);
        let first_seal = orig.iter().position(|x| x.contains("\"seal\"")).unwrap();
        forged(first_seal, "seal", 64);
        f.put(&orig);
        assert!(f.verify().is_ok());
    }

    #[test]
    fn a_hash_linked_record_nobody_signed_fails_verify_unless_allowed() {
        let f = Fixture::new();
        f.run(4);
        let n = f.lines().len() as u64;
        f.append_linked(json!({"type": "forged"}));
        let e = f.verify().unwrap_err();
        assert!(
            matches!(e, VerifyError::UnsignedTail { signed_through, last } if (signed_through, last) == (n, n + 1))
                && e.is_live_tail(),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("records {} to {} come after the last signature (record {n}): nothing signed them, so they were appended by something other than the server, or left by a crash before they were acknowledged (the server sets them aside at its next start); --allow-unsigned-tail accepts them, e.g. for the batch a live server is writing", n + 1, n + 1)
        );
        let r = f.verify_allowing_unsigned_tail();
        assert_eq!(
            (r.signed_through, r.unsigned_tail, r.torn_tail),
            (n, 1, false)
        );
        // A line still being written: only the live reading accepts it.
        let mut file = OpenOptions::new()
            .append(true)
            .open(log_path(&f.audit()))
            .unwrap();
        file.write_all(b"{\"seq\":").unwrap();
        let e = f.verify().unwrap_err();
        assert!(
            matches!(e, VerifyError::TruncatedTail { .. }) && e.is_live_tail(),
            "{e}"
        );
        assert!(e.to_string().contains("truncated (no line end)"));
        let r = f.verify_allowing_unsigned_tail();
        assert_eq!((r.unsigned_tail, r.torn_tail), (1, true));
    }

    #[test]
    fn records_nobody_signed_are_set_aside_at_start_not_chained_onto() {
        let f = Fixture::new();
        f.run(4);
        let signed = f.lines();
        let forged = f.append_linked(json!({"type": "forged", "who": "attacker"}));
        // A forged seal and checkpoint after it: no key of the server's, so no trust.
        let mut l = f.lines();
        let last = l.last().unwrap().clone();
        l.push(format!(
            "{{\"seq\":{},\"time_ms\":1,\"prev\":\"{}\",\"seal\":{{\"sig\":\"{}\"}}}}",
            seq_of(&last) + 1,
            sha256_hex(last.as_bytes()),
            B64.encode([2u8; 64])
        ));
        f.put(&l);
        let log = f.run(2);
        let q = log.quarantined().unwrap().clone();
        assert_eq!(q.records, 2);
        assert_eq!(q.first_seq, Some(signed.len() as u64 + 1));
        let now = f.lines();
        assert_eq!(
            &now[..signed.len()],
            &signed[..],
            "the signed part is untouched"
        );
        assert!(
            !now.iter().any(|x| x.contains("attacker")),
            "never chained onto"
        );
        assert!(now
            .iter()
            .any(|x| x.contains("audit_unsigned_records_quarantined")));
        assert!(f.quarantine().contains(&forged), "kept aside, not deleted");
        f.verify().unwrap();
    }

    #[test]
    fn a_torn_last_line_is_set_aside_and_the_chain_continues() {
        let f = Fixture::new();
        f.run(5);
        let before = f.lines().len();
        let mut file = OpenOptions::new()
            .append(true)
            .open(log_path(&f.audit()))
            .unwrap();
        file.write_all(b"{\"seq\":99,\"time_ms\":1,\"pr").unwrap();
        drop(file);
        let log = f.run(2);
        let q = log.quarantined().unwrap();
        assert_eq!((q.records, q.bytes), (0, 25));
        assert!(f.quarantine().contains("{\"seq\":99,\"time_ms\":1,\"pr\n"));
        assert!(f.lines().len() > before + 2);
        f.verify().unwrap();
    }

    #[test]
    fn a_log_cut_back_with_its_old_head_restored_is_refused_at_start() {
        let f = Fixture::new();
        f.run(3);
        let old_lines = f.lines();
        let old_head = std::fs::read(f.audit().join(HEAD_FILE)).unwrap();
        f.run(3);
        let full = f.lines();
        // Cut back to the earlier point and restore the head.json of that point.
        f.put(&old_lines);
        std::fs::write(f.audit().join(HEAD_FILE), &old_head).unwrap();
        assert!(f.verify().is_ok(), "the directory alone cannot tell");
        let e = f.open().err().unwrap();
        assert!(matches!(e, Error::Audit(AuditError::RolledBack(_))), "{e}");
        let e = e.to_string();
        assert!(
            e.contains(&format!(
                "the datastore anchor is at record {} but the last record the server signed is {}: signed records were cut from the log (rolled back)",
                full.len(),
                old_lines.len()
            )) && e.contains("refusing to continue the chain"),
            "{e}"
        );
        assert_eq!(f.lines(), old_lines, "a refused start changes nothing");
        // Rewritten from the anchor on (same length, different content): refused too.
        let mut forked = full.clone();
        let last = forked.len() - 1;
        forked[last] = forked[last].replace("\"sig\":\"", "\"sig\":\"A");
        f.put(&forked);
        let e = f.open().err().unwrap();
        assert!(matches!(e, Error::Audit(AuditError::RolledBack(_))), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("cut from the log") || e.contains("differs from the datastore anchor"),
            "{e}"
        );
        // A log removed outright.
        std::fs::remove_file(log_path(&f.audit())).unwrap();
        let e = f.open().err().unwrap();
        assert!(matches!(e, Error::Audit(AuditError::RolledBack(_))), "{e}");
        let e = e.to_string();
        assert!(e.contains("there is no audit log"), "{e}");
        // The operator's explicit decision is recorded, and the chain goes on.
        f.put(&old_lines);
        let log = AuditLog::open_with(
            &f.audit(),
            f.km.clone(),
            AuditOptions {
                store: Some(f.store.clone()),
                accept_rollback: Some("restored from backup".into()),
            },
        )
        .unwrap();
        f.rt.block_on(log.close()).unwrap();
        assert_eq!(
            log.accepted_rollback().len(),
            1,
            "{:?}",
            log.accepted_rollback()
        );
        assert!(f
            .lines()
            .iter()
            .any(|l| l.contains("audit_rollback_accepted") && l.contains("restored from backup")));
        f.run(1);
        f.verify().unwrap();
    }

    #[test]
    fn a_signed_record_changed_in_place_is_refused_at_start() {
        let f = Fixture::new();
        f.run(6);
        let mut l = f.lines();
        let i = l.iter().position(|x| x.contains("\"0004\"")).unwrap();
        l[i] = l[i].replace("0004", "0404");
        f.put(&l);
        let e = f.open().err().unwrap();
        assert!(matches!(e, Error::Audit(AuditError::Broken(_))), "{e}");
        let e = e.to_string();
        assert!(e.contains("inside the signed part of the log"), "{e}");
    }

    #[test]
    fn a_log_from_before_seals_trusts_its_signed_head_and_sets_aside_the_rest() {
        // The old format: legacy checkpoints, no seals, a head.json over record 2.
        let f = Fixture::new();
        std::fs::create_dir_all(f.audit()).unwrap();
        let key_id = audit_key_id(&f.audit(), f.km.as_ref(), true).unwrap();
        let mut lines: Vec<String> = Vec::new();
        let mut prev = String::new();
        for i in 1..=3u64 {
            let l = format!(
                "{{\"seq\":{i},\"time_ms\":1,\"prev\":\"{prev}\",\"event\":{{\"n\":{i}}}}}"
            );
            prev = sha256_hex(l.as_bytes());
            lines.push(l);
        }
        f.put(&lines);
        let hash2 = sha256_hex(lines[1].as_bytes());
        let sig = B64.encode(
            f.km.sign(&key_id, &head_message(2, &hash2), SignatureFormat::Der)
                .unwrap(),
        );
        std::fs::write(
            f.audit().join(HEAD_FILE),
            json!({"seq": 2, "hash": hash2, "key_id": key_id, "sig": sig}).to_string(),
        )
        .unwrap();
        let r = f.verify_allowing_unsigned_tail();
        assert_eq!((r.signed_through, r.unsigned_tail), (2, 1));
        let log = f.run(1);
        assert_eq!(log.quarantined().unwrap().first_seq, Some(3));
        assert_eq!(&f.lines()[..2], &lines[..2]);
        f.verify().unwrap();
    }

    #[test]
    fn an_exported_checkpoint_proves_the_log_extends_it_or_not() {
        let f = Fixture::new();
        f.run(3);
        let cp = export_checkpoint(&f.audit(), f.km.as_ref()).unwrap();
        assert_eq!(cp.seq, f.lines().len() as u64);
        let file = f.dir.path().join("cp.json");
        std::fs::write(&file, cp.to_json().to_string()).unwrap();
        let with_cp = || {
            let a = read_checkpoint_file(&file, &f.audit(), f.km.as_ref())?;
            verify_with(
                &f.audit(),
                f.km.as_ref(),
                &VerifyOptions {
                    allow_unsigned_tail: false,
                    anchors: vec![a],
                },
            )
        };
        f.run(3);
        assert_eq!(
            with_cp().unwrap().anchors_reached.len(),
            1,
            "a later log extends it"
        );
        let full = f.lines();
        // Cut back before the checkpoint.
        f.put(&full[..cp.seq as usize - 2]);
        std::fs::remove_file(f.audit().join(HEAD_FILE)).unwrap();
        let e = with_cp().unwrap_err();
        assert!(matches!(e, VerifyError::RolledBack { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("records were cut from the end (the log was rolled back)"),
            "{e}"
        );
        // A fork: the record at the checkpoint rewritten.
        let mut forked = full.clone();
        let i = cp.seq as usize - 1;
        forked[i] = forked[i].replace("\"sig\":\"", "\"sig\":\"A");
        f.put(&forked[..=i]);
        let e = with_cp().unwrap_err();
        assert!(matches!(e, VerifyError::Forked { .. }), "{e}");
        assert!(e.to_string().contains("differs from checkpoint"), "{e}");
        // A checkpoint changed by hand no longer verifies.
        let mut v = cp.to_json();
        v["seq"] = json!(1);
        std::fs::write(&file, v.to_string()).unwrap();
        let e = with_cp().unwrap_err();
        assert!(matches!(e, VerifyError::CheckpointSignature { .. }), "{e}");
        assert!(e.to_string().contains("signature does not verify"));
    }
}
