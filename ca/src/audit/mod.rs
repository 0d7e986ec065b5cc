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
//! a sync has covered it; writes are batched, so many concurrent mints share one sync
//! and one seal (group commit). In the server a runtime worker about to go idle leads
//! each batch ([`lead`]: seal, make it durable in the sync journal ([`journal`]) and
//! append it to the log, answer), one batch in flight at a
//! time. A call waits only for its own records ([`OwnRecords`]) and is woken once,
//! when the sync covering them returns. No SVID leaves the server before its record is
//! durable and sealed.

mod anchor;
mod audit_key;
mod chain;
mod checkpoint;
mod error;
pub mod format;
mod journal;
mod lead;
mod log;
mod open;
mod recovery;
mod session;
#[cfg(test)]
mod tests;
mod verify;
mod writer;

pub use anchor::{Anchor, NamedAnchor};
pub use checkpoint::{export_checkpoint, read_checkpoint_file, ExportedCheckpoint};
pub use error::VerifyError;
pub use lead::lead_on_runtime_idle;
pub use log::{log_path, AuditLog, OwnRecords};
pub use open::AuditOptions;
pub use recovery::Quarantined;
pub use verify::{verify, verify_with, VerifyOptions, VerifyReport};
