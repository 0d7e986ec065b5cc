//! `tpm` node attestation: the messages both sides exchange (JSON, binary fields in
//! base64) and the TPM 2.0 structures they carry ([`wire`]). The node side is
//! `ztid_attestor::tpm`, the CA side `ztid_verifier::tpm`.

pub mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::RefusalKind::Malformed;
use crate::{b64, Error, RefusalKind};

/// The method name on the wire.
pub const METHOD: &str = "tpm";
/// How long a challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// PCRs quoted when the config does not say.
pub const DEFAULT_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
/// Largest message accepted from a node.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Format tag of [`EvidenceFile`].
pub const EVIDENCE_FORMAT: &str = "ztid-tpm-evidence/1";

/// A refusal of `kind` with this reason.
pub fn refused(kind: RefusalKind, s: impl Into<String>) -> Error {
    Error::refused(kind, s)
}

mod hexmap {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        v: &BTreeMap<u8, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|(k, v)| (k.to_string(), hex::encode(v)))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u8, Vec<u8>>, D::Error> {
        let m = BTreeMap::<String, String>::deserialize(d)?;
        m.into_iter()
            .map(|(k, v)| {
                let i: u8 = k.parse().map_err(serde::de::Error::custom)?;
                let v = hex::decode(v).map_err(serde::de::Error::custom)?;
                Ok((i, v))
            })
            .collect()
    }
}

/// Node → CA, first message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitialEvidence {
    /// EK certificate, DER.
    #[serde(with = "b64")]
    pub ek_cert: Vec<u8>,
    /// EK `TPMT_PUBLIC`.
    #[serde(with = "b64")]
    pub ek_pub: Vec<u8>,
    /// AK `TPMT_PUBLIC`.
    #[serde(with = "b64")]
    pub ak_pub: Vec<u8>,
    /// `TPMT_PUBLIC` of the agent key: made in this TPM, the key of the agent's CSR.
    #[serde(with = "b64")]
    pub agent_key_pub: Vec<u8>,
}

/// CA → node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// `TPM2B_ID_OBJECT` body.
    #[serde(with = "b64")]
    pub credential_blob: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET` body.
    #[serde(with = "b64")]
    pub encrypted_secret: Vec<u8>,
    /// Quote nonce (`qualifyingData`).
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// sha256 PCRs to quote.
    pub pcrs: Vec<u8>,
}

/// Node → CA, the answer to the challenge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// The secret ActivateCredential released.
    #[serde(with = "b64")]
    pub secret: Vec<u8>,
    /// `TPMS_ATTEST` as the TPM signed it.
    #[serde(with = "b64")]
    pub quote: Vec<u8>,
    /// `TPMT_SIGNATURE`.
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    /// sha256 PCR values, by index.
    #[serde(with = "hexmap")]
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// `TPMS_ATTEST` of TPM2_Certify: the AK certifying the agent key, over the nonce.
    #[serde(with = "b64")]
    pub certify: Vec<u8>,
    /// Its `TPMT_SIGNATURE`.
    #[serde(with = "b64")]
    pub certify_signature: Vec<u8>,
}

/// Captured evidence for offline verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceFile {
    /// [`EVIDENCE_FORMAT`].
    pub format: String,
    /// EK certificate, DER.
    #[serde(with = "b64")]
    pub ek_cert: Vec<u8>,
    /// EK `TPMT_PUBLIC`.
    #[serde(with = "b64")]
    pub ek_pub: Vec<u8>,
    /// AK `TPMT_PUBLIC`.
    #[serde(with = "b64")]
    pub ak_pub: Vec<u8>,
    /// The nonce quoted, hex.
    pub nonce: String,
    /// `TPMS_ATTEST`.
    #[serde(with = "b64")]
    pub quote: Vec<u8>,
    /// `TPMT_SIGNATURE`.
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    /// sha256 PCR values, by index.
    #[serde(with = "hexmap")]
    pub pcrs: BTreeMap<u8, Vec<u8>>,
}

/// Parses a JSON message from a node, bounded to [`MAX_MESSAGE`] bytes.
pub fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, Error> {
    if bytes.len() > MAX_MESSAGE {
        return Err(refused(
            Malformed,
            format!("{what} is larger than {MAX_MESSAGE} bytes"),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| refused(Malformed, format!("malformed {what}: {e}")))
}

/// Encodes a message as JSON.
pub fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|e| Error::Protocol(e.to_string()))
}

/// The node id of an EK `TPMT_PUBLIC`: hex SHA-256 of its DER SubjectPublicKeyInfo.
pub fn ek_hash(ek_pub: &[u8]) -> Result<String, Error> {
    let ek = wire::Public::parse(ek_pub)?;
    Ok(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &ek.spki_der()?,
    )))
}

/// Base64 (standard) of `b`, for tools and tests that build messages by hand.
pub fn b64_encode(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}
