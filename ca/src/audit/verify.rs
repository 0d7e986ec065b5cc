//! `audit verify`: walks the whole log and names the first thing wrong.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use ztid_hsm::KeyManager;

use super::anchor::{read_head, Head, NamedAnchor};
use super::error::VerifyError;
use super::format::{Kind, Line, LOG_FILE, MAX_LINE};
use super::journal;

/// What to check besides the log itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Accept records after the last seal, and a last line without its line end (the
    /// batch a live server is writing).
    pub allow_unsigned_tail: bool,
    /// Records the log must still contain: the datastore anchor, exported checkpoints.
    pub anchors: Vec<NamedAnchor>,
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// Seals whose signature verified.
    pub seals: u64,
    /// The last record a signature covers (a seal, or for logs written before seals
    /// existed, the signed head).
    pub signed_through: u64,
    /// The hash of record `signed_through` ("" when 0).
    pub signed_hash: String,
    /// The signed head's sequence number, if there is a head.
    pub head_seq: Option<u64>,
    /// Records after `signed_through` (accepted only with `allow_unsigned_tail`).
    pub unsigned_tail: u64,
    /// The last line had no line end yet (accepted only with `allow_unsigned_tail`).
    pub torn_tail: bool,
    /// The anchors the log was found to extend.
    pub anchors_reached: Vec<String>,
    /// Bytes the log lacked (or held as zeros) that the sync journal (`audit.wal`) holds,
    /// read from there: the machine stopped before the log's pages were written back
    /// (the server's next start writes them into the log), or the log was cut back
    /// while the journal was not.
    pub completed_from_journal: u64,
}

/// Walks the whole log in `dir`, strictly: every hash link, every checkpoint and seal
/// signature, the signed head, and no unsigned records at the end.
pub fn verify(dir: &Path, key_manager: &dyn KeyManager) -> Result<VerifyReport, VerifyError> {
    verify_with(dir, key_manager, &VerifyOptions::default())
}

/// [`verify`] with options. `Err` names the first bad record or the anchor not reached.
pub fn verify_with(
    dir: &Path,
    key_manager: &dyn KeyManager,
    options: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let (_, audit_key, _) = super::audit_key::existing_key(dir, key_manager)?;
    let head = match read_head(dir, &audit_key) {
        Head::Absent => None,
        Head::Unreadable(e) => return Err(VerifyError::HeadUnreadable(e)),
        Head::BadSignature => return Err(VerifyError::HeadSignature),
        Head::Valid(a) => Some(a),
    };
    let f = File::open(dir.join(LOG_FILE)).map_err(VerifyError::Io)?;
    let log_len = f.metadata().map_err(VerifyError::Io)?.len();
    let completion = match journal::completion(dir, &f, log_len) {
        Ok(c) => c,
        // An auditor may read the log without the server's journal (mode 0600): the
        // log is then judged as it is, and a log the machine cut short says so itself.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                error = %e,
                "audit.wal is unreadable: the log is judged without the sync journal"
            );
            None
        }
        Err(e) => return Err(VerifyError::Io(e)),
    };
    let completed_from_journal = completion.as_ref().map_or(0, |c| c.missing);
    // The log as the journal completes it: up to the frames, the frames, then whatever
    // the log holds after them.
    let log: Box<dyn Read> = match completion {
        Some(c) => {
            let mut after = File::open(dir.join(LOG_FILE)).map_err(VerifyError::Io)?;
            after
                .seek(SeekFrom::Start(c.at + c.bytes.len() as u64))
                .map_err(VerifyError::Io)?;
            Box::new(f.take(c.at).chain(Cursor::new(c.bytes)).chain(after))
        }
        None => Box::new(f),
    };
    let mut reader = BufReader::new(log);
    let mut prev = String::new();
    let mut expected = 1u64;
    let (mut checkpoints, mut seals) = (0, 0);
    let mut session_key: Option<String> = None;
    let (mut signed_through, mut signed_hash) = (0u64, String::new());
    let mut head_found = false;
    let mut torn_tail = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(VerifyError::Io)?;
        if n == 0 {
            break;
        }
        let record = expected;
        if line.len() > MAX_LINE {
            return Err(VerifyError::LineTooLong { record });
        }
        let Some(body) = line.strip_suffix(b"\n") else {
            if options.allow_unsigned_tail {
                // The line a live server is writing right now (signed by no one yet).
                torn_tail = true;
                break;
            }
            return Err(VerifyError::TruncatedTail { record });
        };
        let l = Line::parse(body).map_err(|detail| VerifyError::Malformed { record, detail })?;
        if l.seq != expected {
            return Err(VerifyError::Sequence {
                record,
                found: l.seq,
            });
        }
        if l.prev != prev {
            return Err(VerifyError::ChainBreak { record });
        }
        for a in &options.anchors {
            if a.anchor.seq == l.seq && a.anchor.hash != l.hash {
                return Err(VerifyError::Forked {
                    record,
                    anchor: a.source.clone(),
                });
            }
        }
        match &l.kind {
            Kind::Event => {}
            Kind::Checkpoint {
                session_key: key, ..
            } => {
                if !l.checkpoint_verifies(&audit_key) {
                    return Err(VerifyError::BadCheckpoint { record });
                }
                checkpoints += 1;
                if key.is_some() {
                    session_key.clone_from(key);
                }
            }
            Kind::Seal { .. } => {
                let Some(key) = &session_key else {
                    return Err(VerifyError::UncertifiedSeal { record });
                };
                if !l.seal_verifies(key) {
                    return Err(VerifyError::BadSeal { record });
                }
                seals += 1;
                signed_through = l.seq;
                signed_hash.clone_from(&l.hash);
            }
        }
        if let Some(h) = &head {
            if h.seq == l.seq {
                if h.hash != l.hash {
                    return Err(VerifyError::HeadMismatch { record });
                }
                head_found = true;
                if h.seq > signed_through {
                    // A log written before seals existed: the head is its signature.
                    signed_through = h.seq;
                    signed_hash.clone_from(&l.hash);
                }
            }
        }
        prev = l.hash;
        expected += 1;
    }
    let last = expected - 1;
    if let Some(h) = &head {
        if !head_found {
            return Err(VerifyError::CutBeforeHead { last, head: h.seq });
        }
    }
    let mut anchors_reached = Vec::new();
    for a in &options.anchors {
        if a.anchor.seq > last {
            return Err(VerifyError::RolledBack {
                last,
                anchor: a.source.clone(),
                at: a.anchor.seq,
            });
        }
        anchors_reached.push(a.source.clone());
    }
    let unsigned_tail = last - signed_through;
    if unsigned_tail > 0 && !options.allow_unsigned_tail {
        return Err(VerifyError::UnsignedTail {
            signed_through,
            last,
        });
    }
    Ok(VerifyReport {
        records: last,
        checkpoints,
        seals,
        signed_through,
        signed_hash,
        head_seq: head.map(|h| h.seq),
        unsigned_tail,
        torn_tail,
        anchors_reached,
        completed_from_journal,
    })
}
