//! What the writer does at start, before it appends anything: find the last record
//! the server itself signed, check that the log still reaches every anchor, and set
//! aside whatever follows that record.
//!
//! The *trust point* is the last seal whose signature verifies under a session key
//! that a checkpoint signed by the audit key certified, with every link between that
//! checkpoint and the seal intact (or, for a log written before seals existed, the
//! record `head.json` names). Records after it were signed by no one: appended while
//! the server was stopped, or written by a crash before they were acknowledged (a
//! batch and its seal share one `fdatasync`, so nothing acknowledged is ever unsealed).
//! Either way they are not chained onto: they are moved to `quarantine.log` (never
//! deleted), and the chain continues from the trust point.
//!
//! Only the end of the log is read (backwards, in growing chunks) until the trust
//! point, its certifying checkpoint and every anchor are in view, so a start costs
//! the same for a small log and a large one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::json;

use super::anchor::{Anchor, NamedAnchor};
use super::format::{now_ms, sha256_hex, AuditKeyVerifier, Kind, Line, QUARANTINE_FILE};
use crate::AuditError;
use crate::{Error, Result};

/// First chunk read from the end of the log; it grows fourfold while more is needed.
const FIRST_CHUNK: u64 = 1 << 20;
/// How much of the end of the log a start reads at most. A log written by the server
/// has a signed checkpoint at least every 10,000 records, so its trust point and the
/// anchors are in the last few megabytes; more means megabytes appended by someone else.
const MAX_SCAN: u64 = 256 << 20;

/// Records set aside at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Complete lines set aside (a torn last line is counted in `bytes` only).
    pub records: u64,
    /// Sequence numbers they claimed, when readable.
    pub first_seq: Option<u64>,
    /// Last claimed sequence number, when readable.
    pub last_seq: Option<u64>,
    /// Bytes moved.
    pub bytes: u64,
    /// Hex SHA-256 of the bytes moved.
    pub sha256: String,
}

/// Where the chain continues.
#[derive(Debug, Clone)]
pub(crate) struct Recovered {
    /// The next record's sequence number.
    pub next_seq: u64,
    /// The hash of the last trusted record ("" for an empty log).
    pub prev: String,
    /// The last trusted record, if any.
    pub trusted: Option<Anchor>,
    /// What was set aside.
    pub quarantined: Option<Quarantined>,
    /// Anchors the log no longer reaches, accepted by the operator (`accept_rollback`).
    pub accepted_rollback: Vec<String>,
}

struct Entry {
    /// Offset of the line's first byte.
    offset: u64,
    /// Offset after its line end.
    end: u64,
    line: std::result::Result<Line, String>,
}

impl Entry {
    fn seq(&self) -> Option<u64> {
        self.line.as_ref().ok().map(|l| l.seq)
    }
}

enum Decision {
    NeedMore,
    /// Index of the trust point in the entries, if any.
    Trusted(Option<usize>),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("audit log {}", path.display()))(e)
}

/// The complete lines of `bytes`, which start at `base` in the file and at a line start
/// (bytes after the last line end are left out).
fn entries(bytes: &[u8], base: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut offset = base;
    for chunk in bytes.split_inclusive(|b| *b == b'\n') {
        let Some(body) = chunk.strip_suffix(b"\n") else {
            break; // the incomplete last line
        };
        let end = offset + chunk.len() as u64;
        out.push(Entry {
            offset,
            end,
            line: Line::parse(body),
        });
        offset = end;
    }
    out
}

/// Finds the trust point among `es` (the last lines of the log; `at_start` when they
/// begin at the start of the file).
fn trust_point(
    es: &[Entry],
    at_start: bool,
    audit_key: &AuditKeyVerifier,
    head: Option<&Anchor>,
) -> Result<Decision> {
    // For each line, the nearest checkpoint at or before it that the audit key signed
    // and that names a session key.
    let mut certified: Vec<Option<(usize, &str)>> = Vec::with_capacity(es.len());
    let mut current = None;
    for (i, e) in es.iter().enumerate() {
        if let Ok(l) = &e.line {
            if let Kind::Checkpoint {
                session_key: Some(k),
                ..
            } = &l.kind
            {
                if l.checkpoint_verifies(audit_key) {
                    current = Some((i, k.as_str()));
                }
            }
        }
        certified.push(current);
    }
    for (idx, (entry, &certified)) in es.iter().zip(&certified).enumerate().rev() {
        let Ok(line) = &entry.line else { continue };
        if !matches!(line.kind, Kind::Seal { .. }) {
            // A log from before seals: its signed head is its signature. (A head on a
            // seal, as the writer makes now, is checked as a seal below, links and all.)
            if head.is_some_and(|h| h.seq == line.seq && h.hash == line.hash) {
                return Ok(Decision::Trusted(Some(idx)));
            }
            continue;
        }
        let Some((cp, key)) = certified else {
            if at_start {
                continue; // no certified session key anywhere before it: not the server's
            }
            return Ok(Decision::NeedMore);
        };
        if !line.seal_verifies(key) {
            continue;
        }
        // A genuine seal: every line from its checkpoint to it must chain. (The
        // checkpoint is at or before the seal, so the range is never empty.)
        let Some(signed) = es.get(cp..=idx) else {
            return Err(refuse_broken(format!(
                "the checkpoint certifying the seal at record {} is not before it",
                line.seq
            )));
        };
        for (prev_entry, entry) in signed.iter().zip(signed.iter().skip(1)) {
            let (Ok(before), Ok(l)) = (&prev_entry.line, &entry.line) else {
                return Err(refuse_broken(format!(
                    "the record after record {} is unreadable, inside the signed part of the log (sealed at record {})",
                    prev_entry.seq().map_or("?".into(), |s| s.to_string()),
                    line.seq
                )));
            };
            if l.seq != before.seq + 1 || l.prev != before.hash {
                return Err(refuse_broken(format!(
                    "record {} does not chain to record {} inside the signed part of the log (sealed at record {}): signed records were changed, removed or inserted",
                    l.seq, before.seq, line.seq
                )));
            }
        }
        return Ok(Decision::Trusted(Some(idx)));
    }
    Ok(if at_start {
        Decision::Trusted(None)
    } else {
        Decision::NeedMore
    })
}

/// The log does not reach an anchor: an operator may accept that (`accept-rollback`).
fn refuse(why: String) -> Error {
    AuditError::RolledBack(why).into()
}

/// Signed records were changed: nothing can continue this chain.
fn refuse_broken(why: String) -> Error {
    AuditError::Broken(why).into()
}

/// Checks one anchor against the trust point; `Ok(None)` when more of the log is needed.
fn check_anchor(
    es: &[Entry],
    at_start: bool,
    trusted: Option<&Line>,
    a: &NamedAnchor,
) -> Option<std::result::Result<(), String>> {
    let last = trusted.map_or(0, |l| l.seq);
    if a.anchor.seq > last {
        return Some(Err(format!(
            "{} is at record {} but the last record the server signed is {last}: signed records were cut from the log (rolled back)",
            a.source, a.anchor.seq
        )));
    }
    match es.iter().find(|e| e.seq() == Some(a.anchor.seq)) {
        Some(e) => Some(match &e.line {
            Ok(l) if l.hash == a.anchor.hash => Ok(()),
            _ => Err(format!(
                "record {} differs from {}: the log was rewritten from there on",
                a.anchor.seq, a.source
            )),
        }),
        None if !at_start
            && es
                .first()
                .and_then(Entry::seq)
                .is_none_or(|s| s > a.anchor.seq) =>
        {
            None
        }
        None => Some(Err(format!(
            "record {} named by {} is missing from the log",
            a.anchor.seq, a.source
        ))),
    }
}

/// Recovers the log at `path` (see the module docs). `head` is a `head.json` whose
/// signature verified; `anchors` are checked (and, with `accept_rollback`, a log that
/// no longer reaches them is accepted and reported instead of refused).
pub(crate) fn recover(
    path: &Path,
    audit_key: &AuditKeyVerifier,
    head: Option<&Anchor>,
    anchors: &[NamedAnchor],
    accept_rollback: bool,
) -> Result<Recovered> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return finish(path, None, Vec::new(), None, anchors, accept_rollback);
        }
        Err(e) => return Err(io(path)(e)),
    };
    let len = f.metadata().map_err(io(path))?.len();
    let mut want = FIRST_CHUNK;
    loop {
        let start = len.saturating_sub(want);
        let mut bytes = Vec::with_capacity((len - start) as usize);
        f.seek(SeekFrom::Start(start)).map_err(io(path))?;
        (&mut f)
            .take(len - start)
            .read_to_end(&mut bytes)
            .map_err(io(path))?;
        // Begin at a line start: after the first line end, or nothing if there is none.
        let body: &[u8] = if start == 0 {
            &bytes
        } else {
            bytes.splitn(2, |b| *b == b'\n').nth(1).unwrap_or_default()
        };
        let skip = bytes.len() - body.len();
        let at_start = start == 0;
        // entries() leaves out the incomplete last line.
        let es = entries(body, start + skip as u64);
        let decided = match trust_point(&es, at_start, audit_key, head)? {
            Decision::NeedMore => None,
            Decision::Trusted(idx) => {
                let trusted = idx
                    .and_then(|i| es.get(i))
                    .and_then(|e| e.line.as_ref().ok());
                let mut results = Vec::new();
                let mut need_more = false;
                for a in anchors {
                    match check_anchor(&es, at_start, trusted, a) {
                        Some(r) => results.push(r),
                        None => need_more = true,
                    }
                }
                (!need_more).then_some((idx, results))
            }
        };
        let Some((idx, results)) = decided else {
            if want >= MAX_SCAN {
                return Err(refuse_broken(format!(
                    "no record signed by the server, or not every anchor, within the last {} MiB of the log ({} MiB): that much was written by something else",
                    MAX_SCAN >> 20,
                    len >> 20
                )));
            }
            want = want.saturating_mul(4).min(MAX_SCAN);
            continue;
        };
        let violations: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
        if !violations.is_empty() && !accept_rollback {
            return Err(refuse(violations.join("; ")));
        }
        let (trusted, keep_to) = match idx {
            Some(i) => {
                // The trust point is a line that parsed.
                let e = es
                    .get(i)
                    .ok_or_else(|| Error::Internal("audit trust point out of range".into()))?;
                let l = e.line.as_ref().map_err(|e| Error::Internal(e.clone()))?;
                (
                    Some(Anchor {
                        seq: l.seq,
                        hash: l.hash.clone(),
                    }),
                    e.end,
                )
            }
            None => (None, 0),
        };
        let after: Vec<&Entry> = es.iter().filter(|e| e.offset >= keep_to).collect();
        let quarantined = if keep_to < len {
            Some(quarantine(
                path,
                &mut f,
                keep_to,
                len,
                &after,
                trusted.as_ref(),
            )?)
        } else {
            None
        };
        return finish(path, trusted, violations, quarantined, &[], true);
    }
}

fn finish(
    path: &Path,
    trusted: Option<Anchor>,
    accepted_rollback: Vec<String>,
    quarantined: Option<Quarantined>,
    anchors: &[NamedAnchor],
    accept_rollback: bool,
) -> Result<Recovered> {
    // An absent log must still reach its anchors (a deleted log is a cut log).
    let mut accepted_rollback = accepted_rollback;
    for a in anchors {
        let why = format!(
            "{} is at record {} but there is no audit log at {}: it was removed",
            a.source,
            a.anchor.seq,
            path.display()
        );
        if !accept_rollback {
            return Err(refuse(why));
        }
        accepted_rollback.push(why);
    }
    Ok(Recovered {
        next_seq: trusted.as_ref().map_or(1, |t| t.seq + 1),
        prev: trusted.as_ref().map(|t| t.hash.clone()).unwrap_or_default(),
        trusted,
        quarantined,
        accepted_rollback,
    })
}

/// Moves bytes `from..len` of the log to the quarantine file (synced), then cuts them
/// from the log (synced). A crash in between leaves them in both places, never in none.
fn quarantine(
    path: &Path,
    log: &mut File,
    from: u64,
    len: u64,
    lines: &[&Entry],
    after: Option<&Anchor>,
) -> Result<Quarantined> {
    let mut bytes = Vec::with_capacity((len - from) as usize);
    log.seek(SeekFrom::Start(from)).map_err(io(path))?;
    log.take(len - from)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    let seqs: Vec<u64> = lines.iter().filter_map(|e| e.seq()).collect();
    let q = Quarantined {
        records: lines.len() as u64,
        first_seq: seqs.first().copied(),
        last_seq: seqs.last().copied(),
        bytes: bytes.len() as u64,
        sha256: sha256_hex(&bytes),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let qpath = dir.join(QUARANTINE_FILE);
    let header = json!({
        "quarantined_at_ms": now_ms(),
        "after_seq": after.map_or(0, |a| a.seq),
        "after_hash": after.map(|a| a.hash.clone()).unwrap_or_default(),
        "records": q.records,
        "bytes": q.bytes,
        "sha256": q.sha256,
        "reason": "after the last record the server signed: appended while it was stopped, or left by a crash before they were acknowledged",
    });
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut qf = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&qpath)
            .map_err(io(&qpath))?;
        let mut out = header.to_string().into_bytes();
        out.push(b'\n');
        out.extend_from_slice(&bytes);
        if bytes.last() != Some(&b'\n') {
            out.push(b'\n');
        }
        qf.write_all(&out)
            .and_then(|_| qf.sync_all())
            .map_err(io(&qpath))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    log.set_len(from).map_err(io(path))?;
    log.sync_all().map_err(io(path))?;
    Ok(q)
}
