//! What `audit verify` and checkpoints fail with: [`VerifyError`]. The live log's
//! error, [`crate::AuditError`], sits with the crate's other error types (the
//! crate's `Error` wraps it, and metrics label it, without depending on the log).
//! Each displays the text operators have always read; code decides on the variant.

use super::format::MAX_LINE;

/// Why `audit verify` (or a checkpoint) failed: the first thing wrong with the log.
/// `record` is the sequence number the record should have (its line's position).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The audit key's id or public key could not be found.
    #[error("{0}")]
    AuditKey(String),
    /// `head.json` exists but cannot be read or parsed.
    #[error("signed head unreadable: {0}")]
    HeadUnreadable(String),
    /// `head.json` is not signed by the audit key.
    #[error("signed head: signature does not verify")]
    HeadSignature,
    /// Reading the log failed.
    #[error("audit log: {0}")]
    Io(#[source] std::io::Error),
    /// A line longer than any record the server writes.
    #[error("record {record}: longer than {MAX_LINE} bytes")]
    LineTooLong {
        /// Its position.
        record: u64,
    },
    /// The last line has no line end: torn by a crash, or being written right now.
    #[error("record {record}: truncated (no line end)")]
    TruncatedTail {
        /// Its position.
        record: u64,
    },
    /// A line that is not a record.
    #[error("record {record}: {detail}")]
    Malformed {
        /// Its position.
        record: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// A record's sequence number is not its position.
    #[error(
        "record {record}: sequence number is {found} (a record was deleted, inserted or moved)"
    )]
    Sequence {
        /// Its position.
        record: u64,
        /// The number it claims.
        found: u64,
    },
    /// A record does not hash-link to the one before it.
    #[error(
        "record {record}: does not chain to the record before it (changed, deleted or reordered)"
    )]
    ChainBreak {
        /// Its position.
        record: u64,
    },
    /// A record differs from an anchor at the same position (the log was forked).
    #[error(
        "record {record}: differs from {anchor}: the log was rewritten (forked) from there on"
    )]
    Forked {
        /// Its position.
        record: u64,
        /// The anchor, named.
        anchor: String,
    },
    /// A checkpoint's audit-key signature does not verify.
    #[error("record {record}: checkpoint signature does not verify")]
    BadCheckpoint {
        /// Its position.
        record: u64,
    },
    /// A seal with no certified session key before it.
    #[error("record {record}: a seal, but no checkpoint before it certifies a session key")]
    UncertifiedSeal {
        /// Its position.
        record: u64,
    },
    /// A seal's session-key signature does not verify.
    #[error("record {record}: seal signature does not verify")]
    BadSeal {
        /// Its position.
        record: u64,
    },
    /// The record the signed head names hashes differently.
    #[error("record {record}: differs from the signed head")]
    HeadMismatch {
        /// Its position.
        record: u64,
    },
    /// The log ends before the signed head.
    #[error(
        "the log ends at record {last} but the signed head is at record {head}: records were cut from the end"
    )]
    CutBeforeHead {
        /// The last record in the log.
        last: u64,
        /// The record the head names.
        head: u64,
    },
    /// The log ends before an anchor (the datastore's, an exported checkpoint).
    #[error(
        "the log ends at record {last} but {anchor} is at record {at}: records were cut from the end (the log was rolled back)"
    )]
    RolledBack {
        /// The last record in the log.
        last: u64,
        /// The anchor, named.
        anchor: String,
        /// The record it names.
        at: u64,
    },
    /// Records after the last seal (refused unless `allow_unsigned_tail`).
    #[error(
        "records {} to {last} come after the last signature (record {signed_through}): nothing signed them, so they were appended by something other than the server, or left by a crash before they were acknowledged (the server sets them aside at its next start); --allow-unsigned-tail accepts them, e.g. for the batch a live server is writing",
        signed_through + 1
    )]
    UnsignedTail {
        /// The last record a signature covers.
        signed_through: u64,
        /// The last record in the log.
        last: u64,
    },
    /// Nothing to export a checkpoint of.
    #[error("the log has no signed record yet")]
    NothingSigned,
    /// The key manager could not sign an exported checkpoint.
    #[error("signing the checkpoint: {0}")]
    Sign(#[source] ztid_hsm::Error),
    /// A checkpoint file is unreadable, too large or not a checkpoint.
    #[error("checkpoint {path}: {detail}")]
    CheckpointFile {
        /// The file, as given.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A checkpoint file was taken with another audit key.
    #[error("checkpoint {path}: taken with audit key {taken_with}, but this log's audit key is {log_key}")]
    CheckpointKey {
        /// The file, as given.
        path: String,
        /// The key id it names.
        taken_with: String,
        /// This log's key id.
        log_key: String,
    },
    /// A checkpoint file's signature does not verify.
    #[error("checkpoint {path}: signature does not verify")]
    CheckpointSignature {
        /// The file, as given.
        path: String,
    },
}

impl VerifyError {
    /// Whether this is only the batch a live server is appending right now (a last line
    /// without its line end, or records not yet followed by their seal): a reader that
    /// raced the writer, worth reading again, not tampering.
    pub fn is_live_tail(&self) -> bool {
        matches!(
            self,
            VerifyError::TruncatedTail { .. } | VerifyError::UnsignedTail { .. }
        )
    }
}
