//! Checkpoints exported for an off-host witness.
//!
//! `audit checkpoint` verifies the log and writes one JSON object naming its last
//! signed record: `{"ztid_audit_checkpoint":1,"seq","hash","time_ms","key_id",
//! "public_key","sig"}`, where `sig` is the audit key's ECDSA P-256 / SHA-256
//! signature (DER, base64) over the bytes
//! `ztid-audit-export\n<seq>\n<hash>\n<time_ms>\n<key_id>` and `public_key` is the
//! key's SubjectPublicKeyInfo (DER, base64), so the witness can check it with no ztid
//! code. Kept off the host, it proves later that the log still extends it:
//! `audit verify --checkpoint FILE` fails if the record at `seq` is gone (the log was
//! cut back) or hashes differently (rewritten or forked).

use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use ztid_hsm::{KeyManager, SignatureFormat};

use super::anchor::{Anchor, NamedAnchor};
use super::error::VerifyError;
use super::format::{export_message, now_ms};
use super::verify::{verify_with, VerifyOptions};

/// A checkpoint file is small; anything larger is not one.
const MAX_CHECKPOINT_FILE: u64 = 64 * 1024;

/// An exported, signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedCheckpoint {
    /// The last signed record when it was taken.
    pub seq: u64,
    /// That record's hash.
    pub hash: String,
    /// When it was taken, Unix milliseconds.
    pub time_ms: i64,
    /// The audit key's id.
    pub key_id: String,
    /// The audit key, DER SubjectPublicKeyInfo, base64.
    pub public_key: String,
    /// The signature, DER, base64.
    pub sig: String,
}

impl ExportedCheckpoint {
    /// The file's JSON.
    pub fn to_json(&self) -> Value {
        json!({"ztid_audit_checkpoint": 1, "seq": self.seq, "hash": self.hash,
            "time_ms": self.time_ms, "key_id": self.key_id,
            "public_key": self.public_key, "sig": self.sig})
    }

    /// Parses a checkpoint file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
        if v.get("ztid_audit_checkpoint").and_then(Value::as_u64) != Some(1) {
            return Err("not a ztid audit checkpoint (version 1)".into());
        }
        let text = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("no {k}"))
        };
        let hash = text("hash")?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("hash is not a hex SHA-256".into());
        }
        Ok(Self {
            seq: v
                .get("seq")
                .and_then(Value::as_u64)
                .filter(|s| *s > 0)
                .ok_or("no seq")?,
            hash,
            time_ms: v
                .get("time_ms")
                .and_then(Value::as_i64)
                .ok_or("no time_ms")?,
            key_id: text("key_id")?,
            public_key: text("public_key")?,
            sig: text("sig")?,
        })
    }

    /// What the signature covers.
    fn message(&self) -> Vec<u8> {
        export_message(self.seq, &self.hash, self.time_ms, &self.key_id)
    }
}

/// Verifies the log in `dir` and signs a checkpoint of its last signed record. What
/// follows that record (on a live server, the batch being written) is not covered, so
/// it is accepted here; `audit verify` is what fails on it.
pub fn export_checkpoint(
    dir: &Path,
    key_manager: &dyn KeyManager,
) -> Result<ExportedCheckpoint, VerifyError> {
    let options = VerifyOptions {
        allow_unsigned_tail: true,
        anchors: vec![],
    };
    let report = verify_with(dir, key_manager, &options)?;
    if report.signed_through == 0 {
        return Err(VerifyError::NothingSigned);
    }
    let (key_id, _, spki) = super::audit_key::existing_key(dir, key_manager)?;
    let mut cp = ExportedCheckpoint {
        seq: report.signed_through,
        hash: report.signed_hash,
        time_ms: now_ms(),
        key_id,
        public_key: B64.encode(spki),
        sig: String::new(),
    };
    let sig = key_manager
        .sign(&cp.key_id, &cp.message(), SignatureFormat::Der)
        .map_err(VerifyError::Sign)?;
    cp.sig = B64.encode(sig);
    Ok(cp)
}

/// Reads a checkpoint file and checks it was signed by this log's audit key; returns
/// it as an anchor for [`verify_with`].
pub fn read_checkpoint_file(
    path: &Path,
    dir: &Path,
    key_manager: &dyn KeyManager,
) -> Result<NamedAnchor, VerifyError> {
    let shown = path.display();
    let file_error = |detail: String| VerifyError::CheckpointFile {
        path: shown.to_string(),
        detail,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CHECKPOINT_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| file_error(e.to_string()))?;
    if bytes.len() as u64 > MAX_CHECKPOINT_FILE {
        return Err(file_error(format!(
            "larger than {MAX_CHECKPOINT_FILE} bytes"
        )));
    }
    let cp = ExportedCheckpoint::parse(&bytes).map_err(file_error)?;
    let (key_id, audit_key, spki) = super::audit_key::existing_key(dir, key_manager)?;
    if cp.key_id != key_id || B64.decode(&cp.public_key).ok().as_deref() != Some(&spki[..]) {
        return Err(VerifyError::CheckpointKey {
            path: shown.to_string(),
            taken_with: cp.key_id,
            log_key: key_id,
        });
    }
    if !audit_key.verifies(&cp.message(), &cp.sig) {
        return Err(VerifyError::CheckpointSignature {
            path: shown.to_string(),
        });
    }
    Ok(NamedAnchor {
        source: format!(
            "checkpoint {shown} (record {}, taken at {} ms)",
            cp.seq, cp.time_ms
        ),
        anchor: Anchor {
            seq: cp.seq,
            hash: cp.hash,
        },
    })
}
