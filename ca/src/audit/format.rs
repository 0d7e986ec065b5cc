//! The audit log's on-disk format: file names, line kinds, exactly which bytes
//! each signature covers, and the checks of both kinds of signature (audit key,
//! session key). Every signed message starts with its own kind string, so no
//! signature can stand in for another kind.
//!
//! A line is `{"seq":N,"time_ms":T,"prev":"<hex SHA-256 of the line before>",<body>}`
//! where the body is one of:
//! - `"event":{...}`: a security event;
//! - `"checkpoint":{"key_id","session_key","sig"}`: the audit key (in the key
//!   manager) signs the sequence number, `prev` and the *session key*, the ephemeral
//!   Ed25519 key of the running server that seals its batches. Written at every start
//!   and then every 10 s, 10,000 records or 16 MiB. Logs written before sessions existed carry
//!   checkpoints without `session_key` (the legacy message);
//! - `"seal":{"sig"}`: the session key signs the sequence number and `prev`: every
//!   record before it is the server's. The writer ends every batch with a seal, in
//!   the same write and the same `fdatasync`, so every acknowledged record is sealed.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::digest;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ED25519};
use serde_json::Value;

/// The log, one JSON line per record.
pub const LOG_FILE: &str = "audit.log";
/// The signed head: the last sealed record the writer anchored (sequence and hash).
pub const HEAD_FILE: &str = "head.json";
/// The key manager's id of the audit key.
pub const KEY_ID_FILE: &str = "key_id";
/// The sync journal: each batch is durable here before it is appended to the log.
pub const JOURNAL_FILE: &str = "audit.wal";
/// Records found after the last signature at start, kept aside, never deleted.
pub const QUARANTINE_FILE: &str = "quarantine.log";
/// No record is longer than this (a longer line is refused, never read whole).
pub const MAX_LINE: usize = 16 << 20;

/// Hex SHA-256.
pub fn sha256_hex(b: &[u8]) -> String {
    let mut out = String::with_capacity(64);
    sha256_hex_into(&mut out, b);
    out
}

/// Hex SHA-256 into `out` (replacing what it held, reusing its buffer). The audit chain
/// hashes every record it appends: `hex::encode` builds its `String` a char at a time,
/// growing it four times, which showed in the audited mint path's profile.
pub fn sha256_hex_into(out: &mut String, b: &[u8]) {
    let mut text = [0u8; 64];
    // 32 bytes of digest fill the 64 hex digits exactly, so this cannot fail.
    let _ = hex::encode_to_slice(digest::digest(&digest::SHA256, b).as_ref(), &mut text);
    out.clear();
    out.extend(text.iter().map(|&c| char::from(c)));
}

/// Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A checkpoint written before session keys existed.
pub fn legacy_checkpoint_message(seq: u64, prev: &str) -> Vec<u8> {
    format!("ztid-audit-checkpoint\n{seq}\n{prev}").into_bytes()
}

/// A checkpoint: the audit key vouches for the chain so far and for the session key.
pub fn checkpoint_message(seq: u64, prev: &str, session_key: &str) -> Vec<u8> {
    format!("ztid-audit-checkpoint-v2\n{seq}\n{prev}\n{session_key}").into_bytes()
}

/// A seal: the session key vouches for every record before `seq`.
pub fn seal_message(seq: u64, prev: &str) -> Vec<u8> {
    format!("ztid-audit-seal\n{seq}\n{prev}").into_bytes()
}

/// `head.json`: the audit key vouches that record `seq` hashes to `hash`.
pub fn head_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("ztid-audit-head\n{seq}\n{hash}").into_bytes()
}

/// An exported checkpoint (for an off-host witness).
pub fn export_message(seq: u64, hash: &str, time_ms: i64, key_id: &str) -> Vec<u8> {
    format!("ztid-audit-export\n{seq}\n{hash}\n{time_ms}\n{key_id}").into_bytes()
}

/// Whether `sig_b64` seals (`seq`, `prev`) under the base64 Ed25519 key `public_b64`.
pub(crate) fn seal_verifies(public_b64: &str, seq: u64, prev: &str, sig_b64: &str) -> bool {
    let (Ok(public), Ok(sig)) = (B64.decode(public_b64), B64.decode(sig_b64)) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&seal_message(seq, prev), &sig)
        .is_ok()
}

/// Checks audit-key signatures (ECDSA P-256, DER, base64).
pub struct AuditKeyVerifier {
    public: Vec<u8>,
}

impl AuditKeyVerifier {
    /// From the key's uncompressed point.
    pub fn new(raw_public: Vec<u8>) -> Self {
        Self { public: raw_public }
    }

    /// Whether `sig_b64` is the audit key's signature over `msg`.
    pub fn verifies(&self, msg: &[u8], sig_b64: &str) -> bool {
        B64.decode(sig_b64).ok().is_some_and(|sig| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.public)
                .verify(msg, &sig)
                .is_ok()
        })
    }
}

/// What a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A security event.
    Event,
    /// Signed by the audit key; `session_key` is `None` in legacy checkpoints.
    Checkpoint {
        /// Base64 Ed25519 public key of the session that wrote it.
        session_key: Option<String>,
        /// Base64 DER ECDSA signature.
        sig: String,
    },
    /// Signed by the session key.
    Seal {
        /// Base64 Ed25519 signature.
        sig: String,
    },
}

/// One parsed line.
#[derive(Debug, Clone)]
pub struct Line {
    /// Its sequence number.
    pub seq: u64,
    /// The hash of the line before it, as the line claims.
    pub prev: String,
    /// The hash of this line (without its line end).
    pub hash: String,
    /// What it is.
    pub kind: Kind,
}

impl Line {
    /// Parses one line (without its line end).
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("not valid JSON ({e})"))?;
        let seq = v.get("seq").and_then(Value::as_u64).ok_or("no seq")?;
        let prev = v
            .get("prev")
            .and_then(Value::as_str)
            .ok_or("no prev")?
            .to_string();
        let text = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
        let kind = if let Some(cp) = v.get("checkpoint") {
            Kind::Checkpoint {
                session_key: text(cp, "session_key"),
                sig: text(cp, "sig").ok_or("checkpoint without sig")?,
            }
        } else if let Some(seal) = v.get("seal") {
            Kind::Seal {
                sig: text(seal, "sig").ok_or("seal without sig")?,
            }
        } else if v.get("event").is_some() {
            Kind::Event
        } else {
            return Err("neither event, checkpoint nor seal".into());
        };
        Ok(Self {
            seq,
            prev,
            hash: sha256_hex(body),
            kind,
        })
    }

    /// Whether the audit key signed this checkpoint (false for any other line).
    pub fn checkpoint_verifies(&self, audit_key: &AuditKeyVerifier) -> bool {
        match &self.kind {
            Kind::Checkpoint {
                session_key: Some(k),
                sig,
            } => audit_key.verifies(&checkpoint_message(self.seq, &self.prev, k), sig),
            Kind::Checkpoint {
                session_key: None,
                sig,
            } => audit_key.verifies(&legacy_checkpoint_message(self.seq, &self.prev), sig),
            _ => false,
        }
    }

    /// Whether this is a seal by `session_key` (base64 Ed25519 public key).
    pub fn seal_verifies(&self, session_key: &str) -> bool {
        match &self.kind {
            Kind::Seal { sig } => seal_verifies(session_key, self.seq, &self.prev, sig),
            _ => false,
        }
    }
}
