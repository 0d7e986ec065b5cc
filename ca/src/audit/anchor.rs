//! Anchors: where the log's last sealed record is remembered *outside* the log, so
//! cutting the log back (and putting back an old `head.json`) is caught.
//!
//! - `head.json` in the audit directory, signed by the audit key: catches an
//!   accidental or careless cut, but whoever can edit the directory can restore an
//!   old one.
//! - The datastore (`DATA_DIR/datastore`, outside the audit directory): every
//!   deployment has it; the writer advances it every 50 ms and at shutdown, and it
//!   only moves forward. Rolling it back means rolling back the whole datastore (entries,
//!   agents, authorities) too.
//! - Exported checkpoints (`audit checkpoint`) kept off the host by a witness, checked
//!   with `audit verify --checkpoint FILE`.
//!
//! All three hold a sequence number and the hash of the record at it; the log must
//! contain that record, sealed, with that hash.

use std::path::Path;

use serde_json::{json, Value};

use super::format::{head_message, now_ms, AuditKeyVerifier, HEAD_FILE};

/// A record the log must still contain: its sequence number and line hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// Sequence number.
    pub seq: u64,
    /// Hex SHA-256 of the line.
    pub hash: String,
}

/// An anchor and where it came from, for the error that names it.
#[derive(Debug, Clone)]
pub struct NamedAnchor {
    /// E.g. "the datastore anchor".
    pub source: String,
    /// The record.
    pub anchor: Anchor,
}

/// What `head.json` holds.
#[derive(Debug)]
pub(crate) enum Head {
    /// No file (a new log).
    Absent,
    /// Empty or not JSON (e.g. a crash between write and rename without a sync).
    Unreadable(String),
    /// Readable, but the audit key did not sign it.
    BadSignature,
    /// Signed by the audit key.
    Valid(Anchor),
}

/// Reads and checks `dir/head.json`.
pub(crate) fn read_head(dir: &Path, audit_key: &AuditKeyVerifier) -> Head {
    let bytes = match std::fs::read(dir.join(HEAD_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Head::Absent,
        Err(e) => return Head::Unreadable(e.to_string()),
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return Head::Unreadable("not JSON".into());
    };
    let (Some(seq), Some(hash)) = (
        v.get("seq").and_then(Value::as_u64),
        v.get("hash").and_then(Value::as_str),
    ) else {
        return Head::Unreadable("no seq or hash".into());
    };
    if !audit_key.verifies(
        &head_message(seq, hash),
        v.get("sig").and_then(Value::as_str).unwrap_or_default(),
    ) {
        return Head::BadSignature;
    }
    Head::Valid(Anchor {
        seq,
        hash: hash.to_string(),
    })
}

/// The datastore's record of an anchor.
pub(crate) fn datastore_record(a: &Anchor) -> Vec<u8> {
    json!({"seq": a.seq, "hash": a.hash, "time_ms": now_ms()})
        .to_string()
        .into_bytes()
}

/// Parses [`datastore_record`]'s output.
pub(crate) fn parse_datastore_record(bytes: &[u8]) -> Result<Anchor, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("audit anchor unreadable: {e}"))?;
    match (
        v.get("seq").and_then(Value::as_u64),
        v.get("hash").and_then(Value::as_str),
    ) {
        (Some(seq), Some(hash)) if hash.len() == 64 => Ok(Anchor {
            seq,
            hash: hash.to_string(),
        }),
        _ => Err("audit anchor has no seq or hash".into()),
    }
}

/// The datastore's anchor, named for errors.
pub(crate) fn from_datastore(
    store: &dyn crate::datastore::DataStore,
) -> crate::Result<Option<NamedAnchor>> {
    match store.audit_anchor()? {
        None => Ok(None),
        Some(bytes) => {
            let anchor = parse_datastore_record(&bytes)
                .map_err(|e| crate::Error::Store(crate::StoreError::Corrupt(e)))?;
            // Seq 0: an operator accepted a rollback to an empty log; nothing to reach.
            Ok((anchor.seq > 0).then(|| NamedAnchor {
                source: "the datastore anchor".into(),
                anchor,
            }))
        }
    }
}

impl NamedAnchor {
    /// The datastore's anchor (see [`from_datastore`]).
    pub fn from_store(store: &dyn crate::datastore::DataStore) -> crate::Result<Option<Self>> {
        from_datastore(store)
    }
}
