//! The tamper-evident audit log.
//!
//! Every security event is one JSON line in `DATA_DIR/audit/audit.log`:
//! `{"seq":N,"time_ms":T,"prev":"<hex SHA-256 of the previous line>","event":{...}}`.
//! Changing, deleting or reordering any line breaks the hash chain. At intervals a
//! *checkpoint* line carries an ECDSA signature, by the audit key in the key manager,
//! over its own sequence number and `prev`, and after every write the signed *head*
//! (`audit/head.json`: last sequence number and line hash) is replaced, so cutting
//! the tail is caught too. `ztid-server audit verify` walks all of it and names the
//! first bad record.
//!
//! Durability: callers get a sequence number at once and wait (asynchronously) until
//! the writer thread has `fdatasync`ed past it; writes are batched, so many
//! concurrent mints share one sync. No SVID leaves the server before its record is
//! durable. The signed head trails the log by at most 50 ms (records after it are
//! reported by `verify` as not yet anchored). A torn last line (a crash mid-write) is cut at the next start, before
//! anything is appended; it was never acknowledged, so nothing was issued for it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::digest;
use serde_json::{json, Value};
use tokio::sync::watch;
use ztid_hsm::{KeyAlgorithm, KeyManager, SignatureFormat};

use crate::{Error, Result};

const LOG_FILE: &str = "audit.log";
const HEAD_FILE: &str = "head.json";
const KEY_ID_FILE: &str = "key_id";
/// A checkpoint at least this often (by time)...
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// ...or by count.
const CHECKPOINT_RECORDS: u64 = 10_000;
/// How far the signed head may trail the log.
const HEAD_EVERY: Duration = Duration::from_millis(50);

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, b).as_ref())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What a checkpoint or head signature covers.
fn signed_message(kind: &str, seq: u64, hash: &str) -> Vec<u8> {
    format!("ztid-audit-{kind}\n{seq}\n{hash}").into_bytes()
}

struct Chain {
    next_seq: u64,
    prev: String,
    pending: Vec<u8>,
    pending_last: u64,
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

struct Shared {
    chain: Mutex<Chain>,
    wake: Condvar,
    durable: watch::Sender<u64>,
    failed: Mutex<Option<String>>,
}

/// The audit log writer.
pub struct AuditLog {
    dir: PathBuf,
    shared: Arc<Shared>,
    key_manager: Arc<dyn KeyManager>,
    key_id: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("audit log {}", path.display()))(e)
}

/// Reads the log's last complete line, cutting a torn tail; returns (next seq, last hash).
fn recover(path: &Path) -> Result<(u64, String)> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((1, String::new())),
        Err(e) => return Err(io(path)(e)),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(io(path))?;
    let complete = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    if complete < bytes.len() {
        tracing::warn!(
            event = "audit_torn_tail",
            bytes = bytes.len() - complete,
            "cutting a torn, never-acknowledged last audit record"
        );
        f.set_len(complete as u64).map_err(io(path))?;
        f.sync_data().map_err(io(path))?;
    }
    let body = &bytes[..complete];
    let Some(last) = body[..body.len().saturating_sub(1)]
        .split(|b| *b == b'\n')
        .next_back()
        .filter(|l| !l.is_empty())
    else {
        return Ok((1, String::new()));
    };
    let v: Value = serde_json::from_slice(last)
        .map_err(|e| Error::Store(format!("audit log last record unreadable: {e}")))?;
    let seq = v["seq"]
        .as_u64()
        .ok_or_else(|| Error::Store("audit log last record has no seq".into()))?;
    Ok((seq + 1, sha256_hex(last)))
}

impl AuditLog {
    /// Opens (creating) the log in `dir`, with its signing key in `key_manager`.
    pub fn open(dir: &Path, key_manager: Arc<dyn KeyManager>) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key_file = dir.join(KEY_ID_FILE);
        let key_id = match std::fs::read_to_string(&key_file) {
            Ok(id) => id.trim().to_string(),
            Err(_) => {
                let id = format!("audit-{}", crate::authority::random_hex(8)?);
                key_manager.generate(&id, KeyAlgorithm::EcdsaP256)?;
                std::fs::write(&key_file, &id).map_err(io(&key_file))?;
                id
            }
        };
        key_manager.public_key(&key_id)?;
        let path = dir.join(LOG_FILE);
        let (next_seq, prev) = recover(&path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let (durable, _) = watch::channel(next_seq - 1);
        let shared = Arc::new(Shared {
            chain: Mutex::new(Chain {
                next_seq,
                prev,
                pending: Vec::new(),
                pending_last: next_seq - 1,
                since_checkpoint: 0,
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
        });
        let writer = log.clone();
        std::thread::Builder::new()
            .name("ztid-audit".into())
            .spawn(move || writer.run_writer(file))
            .map_err(io(dir))?;
        Ok(log)
    }

    /// Appends `event`; returns its sequence number (await [`AuditLog::durable`] before acting on it).
    pub fn append(&self, event: Value) -> Result<u64> {
        if let Some(e) = self.shared.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(Error::Store(format!("audit log unavailable: {e}")));
        }
        let mut c = self
            .shared
            .chain
            .lock()
            .map_err(|_| Error::Store("audit lock poisoned".into()))?;
        let seq = self.push(&mut c, json!({"event": event}))?;
        if c.since_checkpoint >= CHECKPOINT_RECORDS
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
            .ok_or_else(|| Error::Store("audit body".into()))?;
        let rest = serde_json::to_string(obj).map_err(|e| Error::Store(e.to_string()))?;
        let line = format!(
            "{{\"seq\":{seq},\"time_ms\":{},\"prev\":\"{}\",{}\n",
            now_ms(),
            c.prev,
            &rest[1..]
        );
        c.prev = sha256_hex(&line.as_bytes()[..line.len() - 1]);
        c.pending.extend_from_slice(line.as_bytes());
        c.pending_last = seq;
        c.next_seq += 1;
        c.since_checkpoint += 1;
        Ok(seq)
    }

    fn sign(&self, msg: &[u8]) -> Result<String> {
        Ok(B64.encode(
            self.key_manager
                .sign(&self.key_id, msg, SignatureFormat::Der)?,
        ))
    }

    fn push_checkpoint(&self, c: &mut Chain) -> Result<()> {
        let sig = self.sign(&signed_message("checkpoint", c.next_seq, &c.prev))?;
        self.push(
            c,
            json!({"checkpoint": {"key_id": self.key_id, "sig": sig}}),
        )?;
        c.since_checkpoint = 0;
        c.last_checkpoint = Instant::now();
        Ok(())
    }

    fn run_writer(self: Arc<Self>, mut file: File) {
        // The signed head trails the log by at most HEAD_EVERY: signing and renaming it
        // after every batch would cost more than the batch's own fdatasync.
        let mut head_at: Option<(u64, String)> = None;
        let mut last_head = Instant::now()
            .checked_sub(HEAD_EVERY)
            .unwrap_or_else(Instant::now);
        loop {
            let next = {
                let Ok(mut c) = self.shared.chain.lock() else {
                    return;
                };
                while c.pending.is_empty() {
                    let wait = if head_at.is_some() {
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
                    if timeout && c.pending.is_empty() && head_at.is_some() {
                        break;
                    }
                }
                (!c.pending.is_empty()).then(|| {
                    (
                        std::mem::take(&mut c.pending),
                        c.pending_last,
                        c.prev.clone(),
                    )
                })
            };
            if let Some((batch, last, hash)) = next {
                let result = file.write_all(&batch).and_then(|_| file.sync_data());
                if let Err(e) = result {
                    // Fail closed: no further record is accepted, so nothing more is issued.
                    tracing::error!(event = "audit_write_failed", error = %e, "audit log write failed; refusing all issuance");
                    if let Ok(mut f) = self.shared.failed.lock() {
                        *f = Some(e.to_string());
                    }
                    return;
                }
                // Durable: answer the waiting calls before anything else.
                self.shared.durable.send_replace(last);
                head_at = Some((last, hash));
            }
            if last_head.elapsed() >= HEAD_EVERY {
                if let Some((seq, hash)) = head_at.take() {
                    if let Err(e) = self.write_head(seq, &hash) {
                        tracing::warn!(error = %e, "audit head update failed");
                    }
                    last_head = Instant::now();
                }
            }
        }
    }

    fn write_head(&self, seq: u64, hash: &str) -> Result<()> {
        let sig = self.sign(&signed_message("head", seq, hash))?;
        let head = json!({"seq": seq, "hash": hash, "key_id": self.key_id, "sig": sig});
        let tmp = self.dir.join("head.json.tmp");
        std::fs::write(&tmp, head.to_string()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, self.dir.join(HEAD_FILE)).map_err(io(&tmp))
    }

    /// The sequence number of the last record appended.
    pub fn last_seq(&self) -> u64 {
        self.shared
            .chain
            .lock()
            .map(|c| c.next_seq - 1)
            .unwrap_or(0)
    }

    /// Resolves once every record up to `seq` is on disk.
    pub async fn durable(&self, seq: u64) -> Result<()> {
        let mut rx = self.shared.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(e) = self.shared.failed.lock().ok().and_then(|f| f.clone()) {
                return Err(Error::Store(format!("audit log unavailable: {e}")));
            }
            if tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return Err(Error::Store("audit writer stopped".into()));
            }
        }
    }
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The signed head's sequence number.
    pub head_seq: u64,
    /// Records after the signed head (written after its last update; not anchored).
    pub unanchored_tail: u64,
}

/// Walks the whole log in `dir`: every hash link, every checkpoint signature, the
/// signed head. `Err` names the first bad record.
pub fn verify(
    dir: &Path,
    key_manager: &dyn KeyManager,
) -> std::result::Result<VerifyReport, String> {
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
    let key_id = std::fs::read_to_string(dir.join(KEY_ID_FILE))
        .map_err(|e| format!("no audit key id in {}: {e}", dir.display()))?;
    let key_id = key_id.trim();
    let public = key_manager
        .public_key(key_id)
        .map_err(|e| format!("audit key {key_id}: {e}"))?;
    let check_sig = |msg: &[u8], sig_b64: &str| -> bool {
        B64.decode(sig_b64).ok().is_some_and(|sig| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &public.raw)
                .verify(msg, &sig)
                .is_ok()
        })
    };
    let head: Value = serde_json::from_slice(
        &std::fs::read(dir.join(HEAD_FILE)).map_err(|e| format!("no signed head: {e}"))?,
    )
    .map_err(|e| format!("signed head unreadable: {e}"))?;
    let head_seq = head["seq"].as_u64().ok_or("signed head has no seq")?;
    let head_hash = head["hash"].as_str().ok_or("signed head has no hash")?;
    if !check_sig(
        &signed_message("head", head_seq, head_hash),
        head["sig"].as_str().unwrap_or_default(),
    ) {
        return Err("signed head: signature does not verify".into());
    }
    let f = File::open(dir.join(LOG_FILE)).map_err(|e| format!("audit log: {e}"))?;
    let mut reader = BufReader::new(f);
    let mut prev = String::new();
    let mut expected = 1u64;
    let mut checkpoints = 0;
    let mut head_found = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("audit log: {e}"))?;
        if n == 0 {
            break;
        }
        let at = format!("record {expected}");
        if line.last() != Some(&b'\n') {
            return Err(format!("{at}: truncated (no line end)"));
        }
        let body = &line[..line.len() - 1];
        let v: Value =
            serde_json::from_slice(body).map_err(|e| format!("{at}: not valid JSON ({e})"))?;
        let seq = v["seq"].as_u64().ok_or_else(|| format!("{at}: no seq"))?;
        if seq != expected {
            return Err(format!(
                "{at}: sequence number is {seq} (a record was deleted, inserted or moved)"
            ));
        }
        if v["prev"].as_str() != Some(prev.as_str()) {
            return Err(format!(
                "{at}: does not chain to the record before it (changed, deleted or reordered)"
            ));
        }
        if let Some(cp) = v.get("checkpoint") {
            if !check_sig(
                &signed_message("checkpoint", seq, &prev),
                cp["sig"].as_str().unwrap_or_default(),
            ) {
                return Err(format!("{at}: checkpoint signature does not verify"));
            }
            checkpoints += 1;
        }
        prev = sha256_hex(body);
        if seq == head_seq {
            if prev != head_hash {
                return Err(format!("{at}: differs from the signed head"));
            }
            head_found = true;
        }
        expected += 1;
    }
    if !head_found {
        return Err(format!(
            "the log ends at record {} but the signed head is at record {head_seq}: records were cut from the end",
            expected - 1
        ));
    }
    Ok(VerifyReport {
        records: expected - 1,
        checkpoints,
        head_seq,
        unanchored_tail: expected - 1 - head_seq,
    })
}

/// The log file inside an audit directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join(LOG_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_hsm::SoftwareKeyManager;

    fn write(dir: &Path, n: usize) -> Arc<dyn KeyManager> {
        let km: Arc<dyn KeyManager> = Arc::new(SoftwareKeyManager::open(dir.join("keys")).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let log = AuditLog::open(&dir.join("audit"), km.clone()).unwrap();
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
        rt.block_on(log.durable(last)).unwrap();
        // The signed head trails the log by up to HEAD_EVERY.
        std::thread::sleep(HEAD_EVERY * 3);
        km
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(log_path(&dir.join("audit")))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn put(dir: &Path, lines: &[String]) {
        std::fs::write(
            log_path(&dir.join("audit")),
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    #[test]
    fn intact_log_verifies_and_reopens_where_it_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let km = write(dir.path(), 10);
        let r = verify(&dir.path().join("audit"), km.as_ref()).unwrap();
        assert_eq!(
            (r.records, r.checkpoints, r.head_seq, r.unanchored_tail),
            (11, 1, 11, 0)
        );
        // Reopen and append: the chain continues.
        let km2 = write(dir.path(), 3);
        let r = verify(&dir.path().join("audit"), km2.as_ref()).unwrap();
        assert_eq!(r.records, 15);
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let km = write(dir.path(), 10);
        let orig = lines(dir.path());
        let audit = dir.path().join("audit");
        let check = |l: &[String]| {
            put(dir.path(), l);
            verify(&audit, km.as_ref()).unwrap_err()
        };
        // One byte changed in record 4.
        let mut l = orig.clone();
        l[3] = l[3].replace("0003", "0903");
        assert_eq!(
            check(&l),
            "record 5: does not chain to the record before it (changed, deleted or reordered)"
        );
        // Record 4 deleted.
        let mut l = orig.clone();
        l.remove(3);
        assert!(check(&l).starts_with("record 4: sequence number is 5"));
        // Records 3 and 4 swapped.
        let mut l = orig.clone();
        l.swap(2, 3);
        assert!(check(&l).starts_with("record 3: sequence number is 4"));
        // Tail cut after the last checkpoint.
        let l = orig[..7].to_vec();
        assert!(check(&l).contains("records were cut from the end"));
        // A forged checkpoint signature.
        let mut l = orig.clone();
        let i = l.iter().position(|x| x.contains("checkpoint")).unwrap();
        let mut v: Value = serde_json::from_str(&l[i]).unwrap();
        v["checkpoint"]["sig"] = json!(B64.encode([1u8; 70]));
        l[i] = v.to_string();
        let e = check(&l);
        assert!(
            e.contains("checkpoint signature does not verify") || e.contains("does not chain"),
            "{e}"
        );
        put(dir.path(), &orig);
        assert!(verify(&audit, km.as_ref()).is_ok());
    }

    #[test]
    fn torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let km = write(dir.path(), 5);
        let path = log_path(&dir.path().join("audit"));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":7,\"time_ms\":1,\"pr").unwrap();
        drop(f);
        let _ = km;
        let km = write(dir.path(), 2);
        let r = verify(&dir.path().join("audit"), km.as_ref()).unwrap();
        assert_eq!(r.records, 9, "6 + 3 records, the torn one gone");
    }
}
