//! The audit log end to end: a writer that seals and anchors what it writes,
//! `audit verify` naming each kind of tampering, the start-time recovery setting
//! aside what nobody signed and refusing a log cut back or changed, and exported
//! checkpoints.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use ztid_hsm::{KeyManager, SignatureFormat, SoftwareKeyManager};

use super::audit_key::audit_key_id;
use super::format::{self, head_message, sha256_hex, HEAD_FILE};
use super::{
    export_checkpoint, log_path, read_checkpoint_file, verify, verify_with, AuditLog, AuditOptions,
    VerifyError, VerifyOptions, VerifyReport,
};
use crate::datastore::{DataStore, SledStore};
use crate::{AuditError, Error, Result};

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

/// A log whose `key_id` file went missing is refused at start with what to restore, and
/// nothing is made: no new audit key in the key manager, no new `key_id` (found by the
/// rev-blackbox review: a refused start made a key).
#[test]
fn a_log_without_its_key_id_is_refused_and_no_key_is_made() {
    let f = Fixture::new();
    drop(f.run(3));
    let keys = || {
        std::fs::read_dir(f.dir.path().join("keys"))
            .unwrap()
            .count()
    };
    let before = keys();
    std::fs::remove_file(f.audit().join(super::format::KEY_ID_FILE)).unwrap();
    match f.open() {
        Err(crate::Error::Precondition(why)) => {
            assert!(why.contains("is missing while the audit log"), "{why}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(keys(), before, "a key was made");
    assert!(!f.audit().join(super::format::KEY_ID_FILE).exists());
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
    // The tail cut: read back from the sync journal, which holds this run's batches...
    let l = orig[..i].to_vec();
    f.put(&l);
    let r = f.verify().unwrap();
    assert!(r.completed_from_journal > 0 && r.records == orig.len() as u64);
    // ...and named once the journal is gone too.
    let journal = std::fs::read(f.audit().join(format::JOURNAL_FILE)).unwrap();
    std::fs::remove_file(f.audit().join(format::JOURNAL_FILE)).unwrap();
    let e = check(&l);
    std::fs::write(f.audit().join(format::JOURNAL_FILE), journal).unwrap();
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
    let old_journal = std::fs::read(f.audit().join(format::JOURNAL_FILE)).unwrap();
    f.run(3);
    let full = f.lines();
    // Cut back to the earlier point and restore the head.json and journal of that point
    // (the journal of the later run would complete the log again).
    f.put(&old_lines);
    std::fs::write(f.audit().join(HEAD_FILE), &old_head).unwrap();
    std::fs::write(f.audit().join(format::JOURNAL_FILE), &old_journal).unwrap();
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
fn records_the_machine_lost_from_the_log_are_completed_from_the_journal_at_start() {
    let f = Fixture::new();
    f.run(3);
    f.run(4);
    let full = f.lines();
    // The machine stopped before the last pages of the log were written back: the
    // file ends early...
    f.put(&full[..full.len() - 3]);
    let log = f.open().unwrap();
    assert_eq!(f.lines()[..full.len()], full[..], "the log is whole again");
    f.rt.block_on(log.close()).unwrap();
    drop(log);
    // ...or the size reached the disk and the data did not (the last seal's bytes).
    let bytes = std::fs::read(log_path(&f.audit())).unwrap();
    let mut zeroed = bytes.clone();
    let n = zeroed.len();
    zeroed[n - 100..].fill(0);
    std::fs::write(log_path(&f.audit()), &zeroed).unwrap();
    let r = f.verify().unwrap();
    assert_eq!(r.completed_from_journal, 100);
    let log = f.open().unwrap();
    assert_eq!(std::fs::read(log_path(&f.audit())).unwrap(), bytes);
    // The chain goes on from there, and the whole log verifies.
    let seq = log.append(json!({"type": "after"})).unwrap();
    f.rt.block_on(log.durable(seq)).unwrap();
    f.rt.block_on(log.close()).unwrap();
    let r = f.verify().unwrap();
    // The seal that closed the log is the last record.
    assert_eq!((r.records, r.completed_from_journal), (seq + 1, 0));
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
        let l =
            format!("{{\"seq\":{i},\"time_ms\":1,\"prev\":\"{prev}\",\"event\":{{\"n\":{i}}}}}");
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

#[test]
fn a_call_waits_for_its_own_records_not_for_those_appended_after_them() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    let own = log.begin_records();
    let a = log
        .append(json!({"type": "x509_svid_issued", "serial": "a"}))
        .unwrap();
    let b = log
        .append(json!({"type": "x509_svid_issued", "serial": "b"}))
        .unwrap();
    assert_eq!(own.finish(), Some(b), "the last record this call appended");
    assert!(a < b);
    assert_eq!(
        log.begin_records().finish(),
        None,
        "a call that appended nothing has no record of its own to wait for"
    );
    // A call that moved to another thread (an `.await` in between) cannot name its own
    // records from there: it waits for everything instead.
    let moved = log.begin_records();
    log.append(json!({"type": "x509_svid_issued", "serial": "moved"}))
        .unwrap();
    assert_eq!(
        std::thread::scope(|s| s.spawn(move || moved.finish()).join().unwrap()),
        None,
        "finished on another thread"
    );
    f.rt.block_on(log.durable(b)).unwrap();
    // A wait for a record not yet appended is not woken by the syncs before it.
    f.rt.block_on(async {
        // Seals take sequence numbers too: far enough that one more batch is short of it.
        let later = b + 50;
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.durable(later).await }
        });
        tokio::task::yield_now().await; // the later wait is queued
        let c = log
            .append(json!({"type": "x509_svid_issued", "serial": "c"}))
            .unwrap();
        log.durable(c).await.unwrap();
        assert!(c < later);
        assert!(
            !waiting.is_finished(),
            "woken by a sync that does not cover it"
        );
        assert_eq!(
            log.shared.waiters.lock().unwrap().queue.len(),
            1,
            "only the later wait is left in the queue"
        );
        for i in 0..50 {
            log.append(json!({"type": "x509_svid_issued", "serial": format!("d{i}")}))
                .unwrap();
        }
        waiting.await.unwrap().unwrap();
    });
    f.rt.block_on(log.close()).unwrap();
    let r = f.verify().unwrap();
    assert_eq!(r.unsigned_tail, 0);
}

#[test]
fn a_failed_writer_wakes_every_waiting_call_with_the_reason() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    let last = log.last_seq();
    f.rt.block_on(log.durable(last)).unwrap();
    let err = f.rt.block_on(async {
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.durable(last + 10).await }
        });
        tokio::task::yield_now().await;
        log.fail("the disk went away");
        waiting.await.unwrap().unwrap_err()
    });
    assert!(
        matches!(&err, Error::Audit(AuditError::Unavailable(m)) if m.contains("the disk went away")),
        "{err:?}"
    );
    // Nothing is accepted after that, and a new wait fails at once.
    assert!(log.append(json!({"type": "x"})).is_err());
    assert!(f.rt.block_on(log.durable(last + 10)).is_err());
    assert!(
        f.rt.block_on(log.durable(last)).is_ok(),
        "what was durable stays so"
    );
}

#[test]
fn concurrent_calls_share_batches_and_every_answered_record_is_sealed() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut answered = Vec::new();
                for i in 0..40 {
                    let own = log.begin_records();
                    for k in 0..1 + (t + i) % 3 {
                        log.append(
                            json!({"type": "x509_svid_issued", "serial": format!("{t}-{i}-{k}")}),
                        )
                        .unwrap();
                    }
                    let seq = own.finish().unwrap();
                    rt.block_on(log.durable(seq)).unwrap();
                    answered.push(seq);
                }
                answered
            })
        })
        .collect();
    let answered: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    // Every answered record was on disk and sealed when its call was answered: the
    // log as it is now (before close) has a seal at or after each.
    let lines = f.lines();
    let last_seal = lines
        .iter()
        .filter(|l| l.contains("\"seal\":"))
        .map(|l| seq_of(l))
        .max()
        .unwrap();
    assert!(answered.iter().all(|s| *s < last_seal));
    let r = f.verify().unwrap();
    assert_eq!(r.unsigned_tail, 0);
    let events = lines.iter().filter(|l| l.contains("\"event\":")).count();
    assert!(
        (r.seals as usize) < events,
        "concurrent calls shared batches: {} seals for {events} events",
        r.seals
    );
    f.rt.block_on(log.close()).unwrap();
}

#[test]
fn a_call_appending_many_records_costs_one_sync_not_one_per_record() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    let seals_before = f.lines().iter().filter(|l| l.contains("\"seal\":")).count();
    let own = log.begin_records();
    for i in 0..100 {
        log.append(json!({"type": "x509_svid_issued", "serial": format!("m{i}")}))
            .unwrap();
    }
    let seq = own.finish().unwrap();
    f.rt.block_on(log.durable(seq)).unwrap();
    let lines = f.lines();
    assert!(lines.iter().any(|l| l.contains("\"m99\"")));
    let seals = lines.iter().filter(|l| l.contains("\"seal\":")).count() - seals_before;
    // One batch, or two when the unwaited-record bound (5 ms) cut it on a slow machine.
    assert!(
        (1..=2).contains(&seals),
        "100 records of one call: {seals} seals"
    );
    f.rt.block_on(log.close()).unwrap();
}

#[test]
fn a_record_no_call_waits_for_still_reaches_the_disk_sealed() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    log.append(json!({"type": "x509_svid_refused", "reason": "unwaited"}))
        .unwrap();
    // Nobody calls `durable`: the writer still writes and seals it within its bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let lines = f.lines();
        if let Some(at) = lines.iter().position(|l| l.contains("\"unwaited\"")) {
            if lines[at..].iter().any(|l| l.contains("\"seal\":")) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "record not sealed on disk"
        );
        std::thread::yield_now();
    }
    f.rt.block_on(log.close()).unwrap();
}

#[test]
fn a_record_no_idle_worker_leads_is_synced_by_the_writer() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    // As in the server, the calls leave the batch to idle runtime workers; this runtime
    // has no such hook (a runtime too busy ever to go idle looks the same), so only the
    // writer thread's fallback can sync it.
    log.lead_when_idle.store(true, Ordering::SeqCst);
    let own = log.begin_records();
    log.append(json!({"type": "x509_svid_issued", "serial": "fallback"}))
        .unwrap();
    let seq = own.finish().unwrap();
    f.rt.block_on(log.durable(seq)).unwrap();
    f.rt.block_on(log.close()).unwrap();
    let r = f.verify().unwrap();
    assert_eq!(r.unsigned_tail, 0);
    assert!(f.lines().iter().any(|l| l.contains("\"fallback\"")));
}

#[test]
fn a_large_batch_no_idle_worker_leads_is_synced_by_the_writer() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    // As in the server (batches left to idle workers), on a runtime with no such hook:
    // enough waiting records make the writer lead it (without waiting for its fallback).
    log.lead_when_idle.store(true, Ordering::SeqCst);
    let own = log.begin_records();
    for i in 0..super::chain::LEAD_AT_RECORDS {
        log.append(json!({"type": "x509_svid_issued", "serial": format!("large-{i}")}))
            .unwrap();
    }
    let seq = own.finish().unwrap();
    f.rt.block_on(log.durable(seq)).unwrap();
    assert!(log
        .lock_chain()
        .is_ok_and(|c| !c.lead_now && c.taken >= seq));
    f.rt.block_on(log.close()).unwrap();
    let r = f.verify().unwrap();
    assert_eq!(r.unsigned_tail, 0);
    let lines = f.lines();
    assert!((0..super::chain::LEAD_AT_RECORDS)
        .all(|i| lines.iter().any(|l| l.contains(&format!("\"large-{i}\"")))));
}

#[test]
fn the_writer_sleeps_while_a_batch_it_is_due_to_lead_waits_for_the_one_in_flight() {
    let f = Fixture::new();
    let log = f.open().unwrap();
    let seq = log
        .append(json!({"type": "x509_svid_issued", "serial": "first"}))
        .unwrap();
    f.rt.block_on(log.durable(seq)).unwrap();
    // A batch in flight (a slow disk's sync, a journal wrap), and a record the writer
    // is due to lead after it (no call waits for it: due within `UNWAITED_MAX`).
    log.shared.waiters.lock().unwrap().leading = true;
    log.append(json!({"type": "x509_svid_refused", "reason": "after"}))
        .unwrap();
    let looks = || log.shared.writer_looks.load(Ordering::Relaxed);
    let before = looks();
    std::thread::sleep(std::time::Duration::from_millis(600));
    // Waiting for the answer it sleeps (`HEAD_EVERY` at most, so about a dozen looks);
    // looking again at once, it would have looked hundreds of thousands of times.
    let used = looks() - before;
    assert!(used < 100, "the writer looked {used} times while it waited");
    // The batch in flight is answered: the writer, woken, leads the one it was due to.
    log.answer(None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f.lines().iter().any(|l| l.contains("\"after\"")) {
        assert!(std::time::Instant::now() < deadline, "record never written");
        std::thread::yield_now();
    }
    f.rt.block_on(log.close()).unwrap();
    assert_eq!(f.verify().unwrap().unsigned_tail, 0);
}
