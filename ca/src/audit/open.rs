//! Opening the audit log at start: [`AuditOptions`] (where the log is anchored), the
//! check against its anchors (the signed head, the datastore's), setting aside
//! records nobody signed, a new session certified by a first checkpoint, and the
//! writer thread started.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};

use serde_json::json;
use ztid_hsm::KeyManager;

use super::anchor::{self, Anchor, NamedAnchor};
use super::audit_key::audit_key_id;
use super::chain::{Chain, LineKind};
use super::format::{self, AuditKeyVerifier, HEAD_FILE, LOG_FILE};
use super::journal::{self, Journal};
use super::log::{io, AuditLog, Sealed, Shared, Waiters};
use super::recovery;
use super::session::SessionKey;
use crate::datastore::DataStore;
use crate::Result;

/// How [`AuditLog::open_with`] anchors the log.
#[derive(Default, Clone)]
pub struct AuditOptions {
    /// The datastore to keep the anchor in (the server always gives it).
    pub store: Option<Arc<dyn DataStore>>,
    /// Continue although the log no longer reaches its anchors, recording this reason
    /// (`audit accept-rollback`); `None` refuses to open such a log.
    pub accept_rollback: Option<String>,
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
        // A key is made only for a log that does not exist yet: one whose `key_id` went
        // missing is refused with nothing made (a new key would verify none of it).
        let fresh = [LOG_FILE, HEAD_FILE, format::JOURNAL_FILE]
            .iter()
            .all(|f| !dir.join(f).exists());
        let key_id = audit_key_id(dir, key_manager.as_ref(), fresh)?;
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
        // Records the machine lost from the log's page cache, before anything reads it.
        journal::complete_log(dir, &path).map_err(io(&path))?;
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
        // Recovery may have cut or moved records: the journal starts from a synced log,
        // whose directory entry is synced too (a log made just now, beside a journal
        // that already existed, would otherwise rely on the file system's ordering).
        file.sync_data().map_err(io(&path))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        let log_len = file.metadata().map_err(io(&path))?.len();
        let journal_path = dir.join(format::JOURNAL_FILE);
        let journal = Journal::open(dir, log_len, journal::CAPACITY).map_err(io(&journal_path))?;
        let next_seq = recovered.next_seq;
        let shared = Arc::new(Shared {
            chain: Mutex::new(Chain::after(next_seq - 1, recovered.prev.clone())),
            wake: Condvar::new(),
            writer_asleep: AtomicBool::new(false),
            waiters: Mutex::new(Waiters::new(next_seq - 1)),
            failed: Mutex::new(None),
            #[cfg(test)]
            writer_looks: std::sync::atomic::AtomicU64::new(0),
        });
        let log = Arc::new(Self {
            dir: dir.to_path_buf(),
            file,
            journal: Mutex::new(journal),
            lead_when_idle: AtomicBool::new(super::lead::runtime_leads()),
            shared,
            key_manager,
            key_id,
            session: SessionKey::generate()?,
            store: options.store.clone(),
            sealed: Mutex::new(Sealed {
                latest: recovered.trusted.clone(),
                head_written: 0,
            }),
            anchors_writing: Mutex::new(()),
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
                c.push(
                    LineKind::Event,
                    &json!({"type": "audit_unsigned_records_quarantined",
                        "records": q.records, "bytes": q.bytes, "sha256": q.sha256,
                        "claimed_first_seq": q.first_seq, "claimed_last_seq": q.last_seq,
                        "file": format::QUARANTINE_FILE}),
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
                c.push(
                    LineKind::Event,
                    &json!({"type": "audit_rollback_accepted",
                        "reason": options.accept_rollback.clone().unwrap_or_default(),
                        "anchors_not_reached": recovered.accepted_rollback}),
                )?;
            }
        }
        if super::lead::runtime_leads() {
            super::lead::register_idle_leader(&log);
        }
        let writer = log.clone();
        std::thread::Builder::new()
            .name("ztid-audit".into())
            .spawn(move || writer.run_writer())
            .map_err(io(dir))?;
        log.shared.wake.notify_one();
        Ok(log)
    }
}
