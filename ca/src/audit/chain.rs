//! The in-memory end of the hash chain: the next sequence number, the hash the next
//! line links to, the batch not yet written, and how far the log is past its last
//! checkpoint (with the limits that call for the next one). [`Chain::push`] turns a
//! record's body into its line.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::format::{now_ms, sha256_hex_into};
use crate::AuditError;
use crate::Result;

/// A record no call waits for is written and synced within this time of the writer
/// seeing it (see `writer`)...
pub(super) const UNWAITED_MAX: Duration = Duration::from_millis(5);
/// ...or once this much is pending.
pub(super) const FLUSH_BYTES: usize = 1 << 20;
/// A record a call waits for, when no runtime worker went idle to lead its batch (the
/// CPU is saturated), is synced by the writer within this time of the wait, if the
/// writer sees the call waiting (a call starting to wait does not wake it: that would
/// cost two switches a batch); the writer looks at least every [`UNWAITED_MAX`], so
/// at worst the record is synced within that of its append.
pub(super) const LEAD_FALLBACK: Duration = Duration::from_millis(2);
/// Pending records at which a waiting call asks the writer thread to lead the batch at
/// once, instead of leaving it to the next runtime worker that goes idle: with this
/// many waiting, a worker may not go idle for a while (it finds more to sign), and the
/// sync, made on the writer's thread, runs beside the signing. Fewer would make batches
/// smaller and each sync's CPU count more per record; measured, docs/performance.md
/// ("Issue 16, ninth pass": 3 no gain, 6 and 8 better at 16 in flight). The last
/// batch's size raises it (see [`Chain::ask_writer_to_lead`]).
pub(super) const LEAD_AT_RECORDS: u64 = 6;

/// A checkpoint at least this often (by time)...
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// ...or by count...
pub(super) const CHECKPOINT_RECORDS: u64 = 10_000;
/// ...or by size, so a start finds the last certified session key in the last few
/// megabytes of the log (see `recovery`).
pub(super) const CHECKPOINT_BYTES: u64 = 16 << 20;

/// The largest buffer [`Chain::give_back`] keeps for a later batch.
const SPARE_ROOM_MAX: usize = 256 << 10;

/// What a line holds: its one key after `seq`, `time_ms` and `prev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LineKind {
    /// A security event.
    Event,
    /// The audit key certifies the chain so far and the session key.
    Checkpoint,
    /// The session key seals every record before it.
    Seal,
}

impl LineKind {
    /// The line's key.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Checkpoint => "checkpoint",
            Self::Seal => "seal",
        }
    }
}

/// The chain as the writer continues it (behind the lock callers and the writer share).
pub(super) struct Chain {
    /// The sequence number the next record gets.
    pub(super) next_seq: u64,
    /// The hash of the last line pushed (the next line's `prev`).
    pub(super) prev: String,
    /// Lines pushed but not yet written.
    pub(super) pending: Vec<u8>,
    /// The buffer of a batch already written, emptied, for the batch after the next:
    /// the two take turns, so no batch allocates one (glibc's `malloc` of a kilobyte
    /// or more first consolidates its fast bins, which cost the audited server more
    /// than the records' own formatting).
    spare: Vec<u8>,
    /// The sequence number of the last line in `pending`.
    pub(super) pending_last: u64,
    /// The last sequence number the writer took out of `pending` (on disk, or being
    /// written now).
    pub(super) taken: u64,
    /// When the first line now in `pending` was pushed (`None` while it is empty).
    pub(super) pending_since: Option<Instant>,
    /// The highest sequence number a call waits for ([`super::AuditLog::durable`]):
    /// the writer syncs when `pending` holds it, not at every record.
    pub(super) wanted: u64,
    /// When a call began to wait for a record in `pending` (`None` while none does).
    pub(super) wanted_since: Option<Instant>,
    /// Records since the last checkpoint (seals not counted).
    pub(super) since_checkpoint: u64,
    /// Bytes since the last checkpoint.
    pub(super) bytes_since_checkpoint: u64,
    /// When the last checkpoint was pushed.
    pub(super) last_checkpoint: Instant,
    /// Calls wait for at least [`LEAD_AT_RECORDS`] pending records: the writer thread
    /// leads the batch as soon as none is in flight (see [`Chain::ask_writer_to_lead`]).
    pub(super) lead_now: bool,
    /// How many records the last batch taken out held (its seal included).
    pub(super) last_batch: u64,
}

impl Chain {
    /// The chain of a log whose last record is `last_seq` with hash `prev`, nothing pending.
    pub(super) fn after(last_seq: u64, prev: String) -> Self {
        Self {
            next_seq: last_seq + 1,
            prev,
            pending: Vec::new(),
            spare: Vec::new(),
            pending_last: last_seq,
            taken: last_seq,
            pending_since: None,
            wanted: 0,
            wanted_since: None,
            since_checkpoint: 0,
            bytes_since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            lead_now: false,
            last_batch: 0,
        }
    }

    /// Whether a call waits for a line in `pending`.
    pub(super) fn pending_wanted(&self) -> bool {
        !self.pending.is_empty() && self.wanted > self.taken
    }

    /// Appends the line `{"seq":..,"time_ms":..,"prev":"..","<kind>":<body>}` to the
    /// pending batch; returns its sequence number. Written in place into the batch, and
    /// taken back out if `body` does not serialise (nothing changes then).
    pub(super) fn push<B: Serialize + ?Sized>(&mut self, kind: LineKind, body: &B) -> Result<u64> {
        let seq = self.next_seq;
        let start = self.pending.len();
        // seq, time and prev first, then the body; the hash covers the exact bytes. Put
        // together piece by piece: `write!` went through the formatting machinery for
        // each (numbers by serde_json, as in the body; prev is hex, kind a fixed word).
        let p = &mut self.pending;
        p.extend_from_slice(b"{\"seq\":");
        let written = serde_json::to_writer(&mut *p, &seq)
            .and_then(|()| {
                p.extend_from_slice(b",\"time_ms\":");
                serde_json::to_writer(&mut *p, &now_ms())
            })
            .and_then(|()| {
                p.extend_from_slice(b",\"prev\":\"");
                p.extend_from_slice(self.prev.as_bytes());
                p.extend_from_slice(b"\",\"");
                p.extend_from_slice(kind.as_str().as_bytes());
                p.extend_from_slice(b"\":");
                serde_json::to_writer(&mut *p, body)
            })
            .map_err(|e| e.to_string());
        if let Err(e) = written {
            self.pending.truncate(start);
            return Err(AuditError::Unavailable(format!("audit body: {e}")).into());
        }
        self.pending.push(b'}');
        // The record's hash covers the line without its line end.
        let line = self.pending.get(start..).unwrap_or_default();
        sha256_hex_into(&mut self.prev, line);
        self.pending.push(b'\n');
        if start == 0 {
            self.pending_since = Some(Instant::now());
        }
        self.pending_last = seq;
        self.next_seq += 1;
        self.since_checkpoint += 1;
        self.bytes_since_checkpoint += (self.pending.len() - start) as u64;
        Ok(seq)
    }

    /// Whether a call now waiting should wake the writer thread to lead: true once per
    /// batch, when as many records are pending as the last batch held, and at least
    /// [`LEAD_AT_RECORDS`]. So the writer never makes batches smaller than the idle
    /// workers did: with many calls in flight those run to tens of records, and leading
    /// at a fixed 6 cut them to 9 and cost 0.06-0.15 of on/off at 64 in flight.
    pub(super) fn ask_writer_to_lead(&mut self) -> bool {
        let at = self.last_batch.max(LEAD_AT_RECORDS);
        if self.lead_now || self.pending_last.saturating_sub(self.taken) < at {
            return false;
        }
        self.lead_now = true;
        true
    }

    /// Whether the writer thread was asked to lead and calls still wait.
    pub(super) fn writer_asked_to_lead(&self) -> bool {
        self.lead_now && self.pending_wanted()
    }

    /// Takes the pending batch out for writing; the next batch goes into the spare
    /// buffer (see [`Chain::give_back`]).
    pub(super) fn take_pending(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.pending, std::mem::take(&mut self.spare))
    }

    /// A written batch's buffer, kept (emptied) for a later batch unless it is large.
    pub(super) fn give_back(&mut self, mut written: Vec<u8>) {
        if written.capacity() <= SPARE_ROOM_MAX {
            written.clear();
            self.spare = written;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::format::sha256_hex;
    use serde_json::json;

    fn chain_after(seq: u64, prev: &str) -> Chain {
        Chain::after(seq, prev.to_string())
    }

    #[test]
    fn the_writer_is_asked_to_lead_once_per_batch_when_it_is_large() {
        let mut c = chain_after(0, "ab12");
        let event = json!({"type": "x509_svid_issued"});
        for _ in 1..LEAD_AT_RECORDS {
            c.push(LineKind::Event, &event).unwrap();
            assert!(!c.ask_writer_to_lead(), "below the size");
        }
        c.push(LineKind::Event, &event).unwrap();
        assert!(!c.writer_asked_to_lead());
        assert!(c.ask_writer_to_lead());
        assert!(!c.ask_writer_to_lead(), "asked once per batch");
        // Asked, but only while a call waits for a pending record.
        assert!(!c.writer_asked_to_lead());
        c.wanted = c.pending_last;
        assert!(c.writer_asked_to_lead());
        // After a batch of 10 (as `lead` takes it), the next is asked for at 10.
        c.lead_now = false;
        c.last_batch = 10;
        c.taken = c.pending_last;
        c.take_pending();
        for _ in 1..10 {
            c.push(LineKind::Event, &event).unwrap();
            assert!(!c.ask_writer_to_lead(), "smaller than the last batch");
        }
        c.push(LineKind::Event, &event).unwrap();
        assert!(c.ask_writer_to_lead());
    }

    /// The line's bytes are the format `format` documents (and the one earlier servers
    /// wrote): the body's key after seq, time and prev; `prev` of the next line is the
    /// SHA-256 of this one without its line end.
    #[test]
    fn a_pushed_line_is_the_documented_format_and_chains_by_its_hash() {
        let mut c = chain_after(6, "ab12");
        let event = json!({"type": "x509_svid_issued", "spiffe_id": "spiffe://td/a\"b", "ttl": 60});
        assert_eq!(c.push(LineKind::Event, &event).unwrap(), 7);
        assert_eq!(c.push(LineKind::Seal, &json!({"sig": "c2ln"})).unwrap(), 8);
        let text = String::from_utf8(c.take_pending()).unwrap();
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 2);
        let time = |l: &str| {
            l.split("\"time_ms\":")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            lines[0],
            format!(
                "{{\"seq\":7,\"time_ms\":{},\"prev\":\"ab12\",\"event\":{{\"type\":\"x509_svid_issued\",\"spiffe_id\":\"spiffe://td/a\\\"b\",\"ttl\":60}}}}",
                time(lines[0])
            )
        );
        let first_hash = sha256_hex(lines[0].as_bytes());
        assert_eq!(
            lines[1],
            format!(
                "{{\"seq\":8,\"time_ms\":{},\"prev\":\"{first_hash}\",\"seal\":{{\"sig\":\"c2ln\"}}}}",
                time(lines[1])
            )
        );
        assert_eq!(c.prev, sha256_hex(lines[1].as_bytes()));
        assert_eq!(c.bytes_since_checkpoint, text.len() as u64);
        assert_eq!((c.next_seq, c.pending_last), (9, 8));
        // The written batch's buffer comes back for the batch after the next, emptied.
        let written = text.into_bytes();
        let room = written.capacity();
        c.give_back(written);
        c.take_pending();
        assert!(c.pending.is_empty() && c.pending.capacity() == room);
    }
}
