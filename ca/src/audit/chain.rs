//! The in-memory end of the hash chain: the next sequence number, the hash the next
//! line links to, the batch not yet written, and how far the log is past its last
//! checkpoint (with the limits that call for the next one). [`Chain::push`] turns a
//! record's body into its line.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::format::{now_ms, sha256_hex};
use crate::AuditError;
use crate::Result;

/// A record no call waits for is written and synced within this time of the writer
/// seeing it (see `writer`)...
pub(super) const UNWAITED_MAX: Duration = Duration::from_millis(5);
/// ...or once this much is pending.
pub(super) const FLUSH_BYTES: usize = 1 << 20;
/// A record a call waits for, when no runtime worker went idle to lead its batch (the
/// CPU is saturated), is synced by the writer within this time.
pub(super) const LEAD_FALLBACK: Duration = Duration::from_millis(2);

/// A checkpoint at least this often (by time)...
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// ...or by count...
pub(super) const CHECKPOINT_RECORDS: u64 = 10_000;
/// ...or by size, so a start finds the last certified session key in the last few
/// megabytes of the log (see `recovery`).
pub(super) const CHECKPOINT_BYTES: u64 = 16 << 20;

/// The chain as the writer continues it (behind the lock callers and the writer share).
pub(super) struct Chain {
    /// The sequence number the next record gets.
    pub(super) next_seq: u64,
    /// The hash of the last line pushed (the next line's `prev`).
    pub(super) prev: String,
    /// Lines pushed but not yet written.
    pub(super) pending: Vec<u8>,
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
}

impl Chain {
    /// Whether a call waits for a line in `pending`.
    pub(super) fn pending_wanted(&self) -> bool {
        !self.pending.is_empty() && self.wanted > self.taken
    }

    /// Appends the line for `body` (a JSON object) to the pending batch; returns its
    /// sequence number.
    pub(super) fn push(&mut self, mut body: Value) -> Result<u64> {
        let seq = self.next_seq;
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
            self.prev,
            &rest[1..]
        );
        self.prev = sha256_hex(line.as_bytes());
        line.push('\n');
        if self.pending.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        self.pending.extend_from_slice(line.as_bytes());
        self.pending_last = seq;
        self.next_seq += 1;
        self.since_checkpoint += 1;
        self.bytes_since_checkpoint += line.len() as u64;
        Ok(seq)
    }
}
