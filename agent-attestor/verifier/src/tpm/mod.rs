//! `tpm` node attestation: TPM 2.0 with an EK certificate, credential activation and a
//! PCR quote. The CA needs no TPM: everything on its side is software.
//!
//! # What a node proves
//! 1. **A genuine TPM**: its EK certificate chains to a manufacturer CA the operator
//!    trusts (`ek_ca_dir`), and certifies exactly the EK public key the node sent
//!    (see [`ekcert`] for the checks).
//! 2. **The AK lives in that TPM**: the CA runs `MakeCredential` in software
//!    ([`credential`]) for the EK, bound to the AK's name; only the TPM holding the EK's
//!    private key recovers the secret, and only for a loaded object with that name
//!    (`TPM2_ActivateCredential`). The AK must also be a restricted signing key that never
//!    left the TPM (fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign, not
//!    decrypt) and has no authPolicy: a public-only copy of an outside key, loaded with
//!    TPM2_LoadExternal, then has no authorisation the TPM would accept for activation.
//! 3. **Its boot state, now**: a quote by that same AK over the configured sha256 PCRs and
//!    a fresh CA nonce ([`quote`]), checked against the operator's PCR policy.
//! 4. **The agent's key cannot leave the TPM**: the key in the agent's CSR is made in the
//!    TPM (ECDSA P-256, fixedTPM, fixedParent, sensitiveDataOrigin, sign only, no
//!    authPolicy, under the owner SRK) and certified by that same AK over the same nonce (`TPM2_Certify`). The CA
//!    issues the agent SVID only for that key ([`check_agent_key`],
//!    [`verify_certification`]); the agent signs its CSR and every mTLS handshake to the
//!    node API with it ([`crate::agent_key`]). Its data directory holds only the
//!    SRK-wrapped blob, which no other TPM can load. Each attestation (so each renewal)
//!    makes a new key.
//!
//! # Protocol (one challenge round, JSON messages, binary fields in base64)
//! - initial evidence, node → CA ([`InitialEvidence`]): EK certificate (DER), EK, AK and
//!   agent key `TPMT_PUBLIC`. The CA computes the names itself.
//! - challenge, CA → node ([`Challenge`]): the credential (`TPM2B_ID_OBJECT` and
//!   `TPM2B_ENCRYPTED_SECRET` bodies) protecting a random 32-byte secret, a random
//!   32-byte nonce, and the PCR indices to quote.
//! - answer, node → CA ([`Answer`]): the activated secret, the quote (`TPMS_ATTEST` and
//!   `TPMT_SIGNATURE` exactly as the TPM produced them) over the nonce, the PCR values,
//!   and the AK's certification of the agent key over the nonce.
//!
//! The CA's session keeps the AK public key that the credential was bound to, the secret
//! and the nonce; the answer's secret must match (constant-time) and its quote must verify
//! with that AK, so the key that passed activation is the key that signed the quote. A
//! session answers once (resuming consumes it) and only within 60 s of the challenge
//! (by the context's clock); secret and nonce are fresh per attempt, so a replayed
//! activation or quote from an earlier attempt is refused.
//!
//! # Identity and selectors
//! node id = hex SHA-256 of the EK's DER SubjectPublicKeyInfo, so the agent is
//! `spiffe://TD/ztid/agent/tpm/<hex>`. Selectors: `tpm:ek-hash:<hex>`,
//! `tpm:pcr:<n>:<hex>` for each quoted PCR, `tpm:manufacturer:<tcg-at-tpmManufacturer>`
//! (e.g. `id:00001014`) and `tpm:ek-issuer:<issuer DN>` from the EK certificate.
//!
//! # Configuration (`[attestors.tpm]`)
//! ```toml
//! [attestors.tpm]
//! ek_ca_dir = "/etc/ztid/tpm-ca"      # required: manufacturer CA certificates (PEM/DER)
//! allowed_ek_hashes = ["<hex>", ...]  # optional: only these EKs (node ids) may attest
//! pcrs = [0, 1, 2, 3, 4, 5, 6, 7]     # sha256 PCRs to quote (default 0-7)
//! # uncertified_ek = "svsm-bound"     # accept an EK without certificate, only inside a
//! #                                   # tpm,sev-snp attempt whose SVSM report binds it
//!
//! # PCR policies. A policy named by an EK hash applies to that node; any other name
//! # (a node alias, e.g. "web") needs `ek_hashes`, where "*" means every node. A node must
//! # meet every policy that applies to it; each PCR lists one value or several allowed ones.
//! [attestors.tpm.pcr_policy.web]
//! ek_hashes = ["<hex>", "<hex>"]
//! pcrs = { 0 = "<hex>", 7 = ["<hex>", "<hex>"] }
//! [attestors.tpm.pcr_policy.<ek hash hex>]
//! pcrs = { 4 = "<hex>" }
//! ```
//! Every PCR a policy names must be in `pcrs`. The directory is read at start-up.
//!
//! # Offline evidence (`ztid-server evidence verify --kind tpm`)
//! [`capture_evidence`] writes an [`EvidenceFile`] (JSON: EK certificate, EK and AK
//! public, nonce, quote, signature, PCR values); [`verify_offline`] checks everything the
//! online path checks except credential activation: the EK certificate (against
//! `--collateral DIR`, else the config's `ek_ca_dir`), the AK attributes, the quote and the
//! PCR policy, and the nonce against `--report-data` when given. Offline verification
//! **cannot prove the AK is resident in the EK's TPM**: that needs the CA's fresh secret
//! round trip; a transcript of an activation does not help, since whoever captured the file
//! could have made that credential for any AK. The claims say so (`ak_residency`).
//!
//! # EKs
//! The CA accepts RSA EKs (2048 bits or more: RSA-2048, and RSA-3072/4096 with the
//! high-range templates' SHA-384/AES-256) and ECC EKs on NIST P-256 or P-384, each a
//! restricted decryption key (fixedTPM, fixedParent, sensitiveDataOrigin, restricted,
//! decrypt, not sign). `MakeCredential` uses the EK's own nameAlg and symmetric algorithm:
//! RSA-OAEP of the seed for an RSA EK, an ephemeral ECDH and KDFe for an ECC one
//! ([`credential`]). RSA and ECC EKs of one TPM are different keys, so they give
//! different node ids (and need their own `allowed_ek_hashes` entries and PCR policies).
//!
//! The agent recreates the EK from a TCG default template and reads its certificate from
//! NV ([`device`]): RSA-2048 (0x01c00002), ECC P-256 (0x01c0000a) or ECC P-384 (high
//! range, 0x01c00016; what swtpm_setup provisions). [`EkKind::Auto`] (the default)
//! takes the RSA-2048 EK if its certificate is present, else P-256, else P-384;
//! [`TpmAttestor::with_tcti_and_ek`] picks one explicitly. The agent does not use
//! RSA-3072/4096 or P-521 EKs.
//!
//! # Limits
//! The quote's `qualifiedSigner` is not checked (it depends on the hierarchy above the
//! EK); the AK is identified by its public key instead. Offline evidence files carry no
//! agent key certification (they are for debugging PCR and EK refusals).

pub mod credential;
pub mod ekcert;
pub mod quote;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use ztid_attestation::tpm::wire::{attr, Public, PublicKey};
pub use ztid_attestation::tpm::{
    b64_encode, ek_hash, wire, Answer, Challenge, EvidenceFile, InitialEvidence, CHALLENGE_TTL,
    DEFAULT_PCRS, EVIDENCE_FORMAT, MAX_MESSAGE, METHOD,
};
use ztid_attestation::tpm::{parse_json, refused, to_json};

use crate::{AttestationContext, AttestedNode, NodeVerifier, VerificationSession, VerifierStep};
use ekcert::{EkCaStore, EkInfo};
use ztid_attestation::RefusalKind::{
    BadSignature, KeyMismatch, Malformed, PolicyMismatch, Replay, Unsupported,
};
use ztid_attestation::{unix_seconds, Error};
use ztid_spiffe::Selector;

// ---------------------------------------------------------------------------------------
// Policy

/// Expected PCR values for some nodes.
#[derive(Debug, Clone)]
pub struct PcrPolicy {
    /// Its name (an EK hash or an alias).
    pub name: String,
    /// Node ids it applies to; `None` = every node.
    pub nodes: Option<BTreeSet<String>>,
    /// Allowed values per PCR.
    pub expected: BTreeMap<u8, Vec<Vec<u8>>>,
}

/// The CA-side settings of the method.
#[derive(Debug, Clone)]
pub struct TpmPolicy {
    /// Trusted manufacturer CAs.
    pub ek_cas: EkCaStore,
    /// If set, only these node ids.
    pub allowed_ek_hashes: Option<BTreeSet<String>>,
    /// PCRs to quote.
    pub pcrs: BTreeSet<u8>,
    /// PCR policies.
    pub pcr_policies: Vec<PcrPolicy>,
    /// Accept an EK without a certificate (`uncertified_ek = "svsm-bound"`): such a node
    /// is marked `tpm:ek-cert:none` and only ever attested inside a multi-factor attempt
    /// whose SEV-SNP report names this EK as its SVSM vTPM's.
    pub uncertified_ek: bool,
}

fn is_ek_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn pcr_value(v: &toml::Value, what: &str) -> Result<Vec<u8>, Error> {
    let s = v
        .as_str()
        .ok_or_else(|| Error::Config(format!("{what}: expected a hex string")))?;
    let b = hex::decode(s.trim()).map_err(|e| Error::Config(format!("{what}: {e}")))?;
    if b.len() != 32 {
        return Err(Error::Config(format!(
            "{what}: a sha256 PCR value is 32 bytes (64 hex digits)"
        )));
    }
    Ok(b)
}

impl TpmPolicy {
    /// Reads `[attestors.tpm]`; `ek_ca_override` replaces `ek_ca_dir`.
    pub fn from_table(config: &toml::Table, ek_ca_override: Option<&Path>) -> Result<Self, Error> {
        const T: &str = "[attestors.tpm]";
        for k in config.keys() {
            if !matches!(
                k.as_str(),
                "ek_ca_dir" | "allowed_ek_hashes" | "pcrs" | "pcr_policy" | "uncertified_ek"
            ) {
                return Err(Error::Config(format!(
                    "unknown key {k:?} in {T} (known: ek_ca_dir, allowed_ek_hashes, pcrs, pcr_policy, uncertified_ek)"
                )));
            }
        }
        let uncertified_ek = match config.get("uncertified_ek") {
            None => false,
            Some(toml::Value::String(v)) if v == "svsm-bound" => true,
            Some(_) => {
                return Err(Error::Config(format!(
                    "{T} uncertified_ek takes only \"svsm-bound\" (an EK without certificate is accepted only when an SEV-SNP report binds it)"
                )))
            }
        };
        let dir: Option<PathBuf> = match ek_ca_override {
            Some(d) => Some(d.to_path_buf()),
            None => config
                .get("ek_ca_dir")
                .map(|v| {
                    v.as_str()
                        .map(PathBuf::from)
                        .ok_or_else(|| Error::Config(format!("{T} ek_ca_dir must be a string")))
                })
                .transpose()?,
        };
        // An all-SVSM fleet has no manufacturer CA to trust: its EKs are vouched for by
        // SEV-SNP reports only.
        let ek_cas = match dir {
            Some(d) => EkCaStore::load_dir(&d)?,
            None if uncertified_ek => EkCaStore::default(),
            None => {
                return Err(Error::Config(format!(
                    "{T} needs ek_ca_dir (the directory of TPM manufacturer CA certificates; flag --tpm-ek-ca)"
                )))
            }
        };
        let allowed_ek_hashes = match config.get("allowed_ek_hashes") {
            None => None,
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| {
                    Error::Config(format!("{T} allowed_ek_hashes must be an array of strings"))
                })?;
                let mut set = BTreeSet::new();
                for h in arr {
                    let h = h.as_str().filter(|h| is_ek_hash(h)).ok_or_else(|| {
                        Error::Config(format!(
                            "{T} allowed_ek_hashes: each entry is 64 hex digits (SHA-256 of the EK public key)"
                        ))
                    })?;
                    set.insert(h.to_ascii_lowercase());
                }
                Some(set)
            }
        };
        let pcrs: BTreeSet<u8> = match config.get("pcrs") {
            None => DEFAULT_PCRS.into_iter().collect(),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| Error::Config(format!("{T} pcrs must be an array")))?;
                let mut set = BTreeSet::new();
                for p in arr {
                    let p = p
                        .as_integer()
                        .filter(|p| (0..24).contains(p))
                        .ok_or_else(|| Error::Config(format!("{T} pcrs: indices are 0-23")))?;
                    set.insert(p as u8);
                }
                if set.is_empty() {
                    return Err(Error::Config(format!("{T} pcrs must not be empty")));
                }
                set
            }
        };
        let mut pcr_policies = Vec::new();
        if let Some(v) = config.get("pcr_policy") {
            let t = v
                .as_table()
                .ok_or_else(|| Error::Config(format!("{T} pcr_policy must be a table")))?;
            for (name, p) in t {
                let what = format!("{T} pcr_policy.{name}");
                let p = p
                    .as_table()
                    .ok_or_else(|| Error::Config(format!("{what} must be a table")))?;
                for k in p.keys() {
                    if !matches!(k.as_str(), "ek_hashes" | "pcrs") {
                        return Err(Error::Config(format!(
                            "unknown key {k:?} in {what} (known: ek_hashes, pcrs)"
                        )));
                    }
                }
                let nodes = match p.get("ek_hashes") {
                    None if is_ek_hash(name) => Some([name.to_ascii_lowercase()].into()),
                    None => {
                        return Err(Error::Config(format!(
                            "{what} needs ek_hashes (or name the policy by an EK hash)"
                        )))
                    }
                    Some(v) => {
                        let arr = v.as_array().ok_or_else(|| {
                            Error::Config(format!("{what}.ek_hashes must be an array"))
                        })?;
                        let mut set = BTreeSet::new();
                        let mut all = false;
                        for h in arr {
                            match h.as_str() {
                                Some("*") => all = true,
                                Some(h) if is_ek_hash(h) => {
                                    set.insert(h.to_ascii_lowercase());
                                }
                                _ => {
                                    return Err(Error::Config(format!(
                                        "{what}.ek_hashes: each entry is \"*\" or 64 hex digits"
                                    )))
                                }
                            }
                        }
                        (!all).then_some(set)
                    }
                };
                let pt = p
                    .get("pcrs")
                    .and_then(|v| v.as_table())
                    .ok_or_else(|| Error::Config(format!("{what} needs a pcrs table")))?;
                let mut expected = BTreeMap::new();
                for (idx, vals) in pt {
                    let i: u8 = idx.parse().ok().filter(|i| *i < 24).ok_or_else(|| {
                        Error::Config(format!("{what}.pcrs: {idx:?} is not a PCR index 0-23"))
                    })?;
                    if !pcrs.contains(&i) {
                        return Err(Error::Config(format!(
                            "{what} names PCR {i}, which is not in {T} pcrs (it would never be quoted)"
                        )));
                    }
                    let w = format!("{what}.pcrs.{i}");
                    let list = match vals {
                        toml::Value::Array(a) => a
                            .iter()
                            .map(|v| pcr_value(v, &w))
                            .collect::<Result<Vec<_>, _>>()?,
                        v => vec![pcr_value(v, &w)?],
                    };
                    if list.is_empty() {
                        return Err(Error::Config(format!("{w} allows no value")));
                    }
                    expected.insert(i, list);
                }
                pcr_policies.push(PcrPolicy {
                    name: name.clone(),
                    nodes,
                    expected,
                });
            }
        }
        Ok(Self {
            ek_cas,
            allowed_ek_hashes,
            pcrs,
            pcr_policies,
            uncertified_ek,
        })
    }

    /// Checks the PCR policies that apply to `node_id`; returns their names, or a refusal
    /// naming every PCR that failed.
    pub fn check_pcrs(
        &self,
        node_id: &str,
        values: &BTreeMap<u8, Vec<u8>>,
    ) -> Result<Vec<String>, Error> {
        let mut applied = Vec::new();
        let mut failures = Vec::new();
        for p in &self.pcr_policies {
            if let Some(nodes) = &p.nodes {
                if !nodes.contains(node_id) {
                    continue;
                }
            }
            applied.push(p.name.clone());
            for (i, allowed) in &p.expected {
                match values.get(i) {
                    None => failures.push(format!("PCR {i} was not quoted (policy {})", p.name)),
                    Some(v) if allowed.iter().any(|a| a == v) => {}
                    Some(v) => failures.push(format!(
                        "PCR {i} is {} but policy {} allows {}",
                        hex::encode(v),
                        p.name,
                        allowed
                            .iter()
                            .map(hex::encode)
                            .collect::<Vec<_>>()
                            .join(" or ")
                    )),
                }
            }
        }
        if failures.is_empty() {
            Ok(applied)
        } else {
            Err(refused(
                PolicyMismatch,
                format!("PCR policy not met: {}", failures.join("; ")),
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// CA side

/// An EK and AK that passed the static checks.
#[derive(Debug, Clone)]
pub struct CheckedKeys {
    /// The EK.
    pub ek: Public,
    /// What its certificate says.
    pub ek_info: EkInfo,
    /// hex SHA-256 of the EK's DER SubjectPublicKeyInfo.
    pub node_id: String,
    /// The AK.
    pub ak: Public,
    /// The AK's TPM name.
    pub ak_name: Vec<u8>,
}

/// EK certificate, EK and AK checks (everything before the challenge).
pub fn check_keys(
    policy: &TpmPolicy,
    ek_cert: &[u8],
    ek_pub: &[u8],
    ak_pub: &[u8],
    now: SystemTime,
) -> Result<CheckedKeys, Error> {
    let ek =
        Public::parse(ek_pub).map_err(|e| e.reworded(Malformed, |r| format!("EK public: {r}")))?;
    match &ek.key {
        PublicKey::Rsa { key_bits, .. } if *key_bits >= 2048 => {}
        PublicKey::Rsa { key_bits, .. } => {
            return Err(refused(
                Unsupported,
                format!("EK is RSA-{key_bits}: RSA EKs must be 2048 bits or more"),
            ))
        }
        PublicKey::Ecc { curve, .. }
            if matches!(*curve, wire::curve::NIST_P256 | wire::curve::NIST_P384) => {}
        PublicKey::Ecc { curve, .. } => {
            return Err(refused(
                Unsupported,
                format!(
                    "EK curve 0x{curve:04x} is not supported (ECC EKs must be NIST P-256 or P-384)"
                ),
            ))
        }
    }
    let spki = ek.spki_der()?;
    let node_id = hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki));
    if let Some(allowed) = &policy.allowed_ek_hashes {
        if !allowed.contains(&node_id) {
            return Err(refused(
                PolicyMismatch,
                format!("EK {node_id} is not in allowed_ek_hashes"),
            ));
        }
    }
    let ek_attrs = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::RESTRICTED
        | attr::DECRYPT;
    if !ek.has(ek_attrs) || ek.has(attr::SIGN_ENCRYPT) {
        return Err(refused(
            PolicyMismatch,
            "EK is not a restricted decryption key (fixedTPM, fixedParent, sensitiveDataOrigin, restricted, decrypt, not sign)",
        ));
    }
    let ek_info = if ek_cert.is_empty() {
        if !policy.uncertified_ek {
            return Err(refused(
                PolicyMismatch,
                "the node sent no EK certificate (set uncertified_ek = \"svsm-bound\" to accept an SVSM vTPM's EK that an SEV-SNP report binds)",
            ));
        }
        EkInfo::uncertified()
    } else {
        policy.ek_cas.verify(ek_cert, &ek, unix_seconds(now))?
    };
    let ak =
        Public::parse(ak_pub).map_err(|e| e.reworded(Malformed, |r| format!("AK public: {r}")))?;
    // With an authPolicy, a copy of a *software* key's public area loaded into the TPM
    // (TPM2_LoadExternal, public only) could be authorised by a policy session and pass
    // activation; without one it has no usable authorisation at all.
    check_resident_signing_key(&ak, "AK", true, "", "activated")?;
    match &ak.key {
        PublicKey::Rsa { key_bits, .. } if *key_bits >= 2048 => {}
        PublicKey::Ecc { curve, .. }
            if matches!(*curve, wire::curve::NIST_P256 | wire::curve::NIST_P384) => {}
        _ => {
            return Err(refused(
                Unsupported,
                "AK is not RSA-2048+ or ECC P-256/P-384",
            ))
        }
    }
    let ak_name = ak.name()?;
    Ok(CheckedKeys {
        ek,
        ek_info,
        node_id,
        ak,
        ak_name,
    })
}

/// Checks that `key` (named `who` in refusals) is a signing key that never left its TPM:
/// fixedTPM, fixedParent, sensitiveDataOrigin, sign (and restricted if `restricted`), not
/// decrypt, a SHA-2 nameAlg, and no authPolicy, so that a public-only copy of an outside
/// key loaded into the TPM has no authorisation to be `used_for` (activated, certified).
fn check_resident_signing_key(
    key: &Public,
    who: &str,
    restricted: bool,
    missing_note: &str,
    used_for: &str,
) -> Result<(), Error> {
    let mut required = vec![
        (attr::FIXED_TPM, "fixedTPM"),
        (attr::FIXED_PARENT, "fixedParent"),
        (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    ];
    if restricted {
        required.push((attr::RESTRICTED, "restricted"));
    }
    required.push((attr::SIGN_ENCRYPT, "sign"));
    if let Some((_, name)) = required.iter().find(|(bit, _)| !key.has(*bit)) {
        return Err(refused(
            PolicyMismatch,
            format!("{who} is not {name}{missing_note}"),
        ));
    }
    if key.has(attr::DECRYPT) {
        return Err(refused(
            PolicyMismatch,
            format!("{who} is a decryption key (decrypt is set)"),
        ));
    }
    if !key.auth_policy.is_empty() {
        return Err(refused(PolicyMismatch, format!(
            "{who} has an authPolicy (a public-only copy of an outside key could then be {used_for})"
        )));
    }
    if !matches!(
        key.name_alg,
        wire::alg::SHA256 | wire::alg::SHA384 | wire::alg::SHA512
    ) {
        return Err(refused(
            Unsupported,
            format!(
                "{who} nameAlg 0x{:04x} is not SHA-256/384/512",
                key.name_alg
            ),
        ));
    }
    Ok(())
}

/// Checks the agent key's public area: a signing key that cannot leave its TPM
/// (fixedTPM, fixedParent, sensitiveDataOrigin, sign, not decrypt) whose public key is
/// the one in the agent's CSR (`csr_spki`). Returns its TPM name, which the AK's
/// certification must carry.
pub fn check_agent_key(agent_key_pub: &[u8], csr_spki: &[u8]) -> Result<Vec<u8>, Error> {
    let key = Public::parse(agent_key_pub)
        .map_err(|e| e.reworded(Malformed, |r| format!("agent key public: {r}")))?;
    // As for the AK; TPM2_Certify takes the ADMIN role, which a policy session can fill.
    check_resident_signing_key(
        &key,
        "agent key",
        false,
        ": it could exist outside the TPM",
        "certified",
    )?;
    let spki = key.spki_der()?;
    if csr_spki.is_empty() || !bool::from(spki.as_slice().ct_eq(csr_spki)) {
        return Err(refused(
            KeyMismatch,
            "the agent CSR's key is not the TPM agent key in the evidence \
             (an agent SVID is only issued for a key made in the attested TPM)",
        ));
    }
    key.name()
}

/// Verifies TPM2_Certify by `ak` over `nonce` of the object named `key_name`: the
/// signature over the raw `TPMS_ATTEST` first, then its type, nonce and certified name.
pub fn verify_certification(
    ak: &Public,
    attest_raw: &[u8],
    sig_raw: &[u8],
    nonce: &[u8],
    key_name: &[u8],
) -> Result<(), Error> {
    if attest_raw.len() > MAX_MESSAGE {
        return Err(refused(Malformed, "agent key certification is too large"));
    }
    quote::verify_signature(ak, attest_raw, sig_raw).map_err(|e| {
        e.reworded(BadSignature, |r| {
            format!(
                "agent key certification signature check failed (not certified by the attested AK): {r}"
            )
        })
    })?;
    let attest = wire::Attest::parse(attest_raw)?;
    let wire::Attested::Certify { name, .. } = &attest.attested else {
        return Err(refused(
            Malformed,
            "agent key certification is not a TPM2_Certify (type is not TPM_ST_ATTEST_CERTIFY)",
        ));
    };
    if attest.extra_data.len() != nonce.len()
        || !bool::from(attest.extra_data.as_slice().ct_eq(nonce))
    {
        return Err(refused(
            Replay,
            "agent key certification extraData does not match this attempt's nonce (stale or replayed)",
        ));
    }
    if name.as_slice() != key_name {
        return Err(refused(
            KeyMismatch,
            format!(
                "the AK certified another key (name {}), not the agent key in the CSR (name {})",
                hex::encode(name),
                hex::encode(key_name)
            ),
        ));
    }
    Ok(())
}

/// The selectors a passed attestation proves.
pub fn selectors_for(
    keys: &CheckedKeys,
    pcrs: &BTreeMap<u8, Vec<u8>>,
) -> Result<Vec<Selector>, Error> {
    let mut out = vec![Selector::new(METHOD, &format!("ek-hash:{}", keys.node_id))?];
    for (i, v) in pcrs {
        out.push(Selector::new(
            METHOD,
            &format!("pcr:{i}:{}", hex::encode(v)),
        )?);
    }
    if let Some(m) = &keys.ek_info.manufacturer {
        if let Ok(s) = Selector::new(METHOD, &format!("manufacturer:{m}")) {
            out.push(s);
        }
    }
    if keys.ek_info.chain.is_empty() {
        out.push(Selector::new(METHOD, "ek-cert:none")?);
    } else if let Ok(s) = Selector::new(METHOD, &format!("ek-issuer:{}", keys.ek_info.issuer)) {
        out.push(s);
    }
    Ok(out)
}

fn random(n: usize) -> Result<Vec<u8>, Error> {
    let mut v = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut v)
        .map_err(|_| Error::Config("no system randomness".into()))?;
    Ok(v)
}

/// CA side.
pub struct TpmVerifier {
    policy: std::sync::Arc<TpmPolicy>,
}

impl TpmVerifier {
    /// Builds the verifier from its TOML table (`[attestors.tpm]` in the server config).
    pub fn from_config(config: &toml::Table) -> Result<Self, Error> {
        Ok(Self::new(TpmPolicy::from_table(config, None)?))
    }

    /// A verifier for `policy`.
    pub fn new(policy: TpmPolicy) -> Self {
        Self {
            policy: std::sync::Arc::new(policy),
        }
    }
}

impl NodeVerifier for TpmVerifier {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn start(&self, evidence: &[u8], ctx: &AttestationContext<'_>) -> Result<VerifierStep, Error> {
        self.begin(evidence, ctx, false)
    }

    fn start_as_factor(
        &self,
        evidence: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        self.begin(evidence, ctx, true)
    }
}

impl TpmVerifier {
    /// `as_factor`: part of a multi-factor attempt, where an EK without certificate may
    /// pass (if `uncertified_ek` allows) because the combination must bind it.
    fn begin(
        &self,
        evidence: &[u8],
        ctx: &AttestationContext<'_>,
        as_factor: bool,
    ) -> Result<VerifierStep, Error> {
        let ev: InitialEvidence = parse_json(evidence, "TPM initial evidence")?;
        if ev.ek_cert.is_empty() && !as_factor {
            return Err(refused(
                PolicyMismatch,
                "a TPM whose EK has no certificate attests only together with an SEV-SNP report that binds it (--attestor tpm,sev-snp)",
            ));
        }
        let keys = check_keys(&self.policy, &ev.ek_cert, &ev.ek_pub, &ev.ak_pub, ctx.now)?;
        let agent_key_name = check_agent_key(&ev.agent_key_pub, ctx.agent_public_key)?;
        let secret = Zeroizing::new(random(32)?);
        let nonce = random(32)?;
        let cred = credential::make_credential(&keys.ek, &keys.ak_name, &secret)?;
        let challenge = to_json(&Challenge {
            credential_blob: cred.blob,
            encrypted_secret: cred.encrypted_secret,
            nonce: nonce.clone(),
            pcrs: self.policy.pcrs.iter().copied().collect(),
        })?;
        let mut transcript = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [evidence, &challenge] {
            transcript.update(&(part.len() as u64).to_be_bytes());
            transcript.update(part);
        }
        Ok(VerifierStep::Challenge(
            challenge,
            Box::new(TpmSession {
                policy: self.policy.clone(),
                keys,
                agent_key_name,
                secret,
                nonce,
                issued_at: ctx.now,
                transcript,
            }),
        ))
    }
}

/// The CA's state between the challenge and the answer.
struct TpmSession {
    policy: std::sync::Arc<TpmPolicy>,
    keys: CheckedKeys,
    agent_key_name: Vec<u8>,
    secret: Zeroizing<Vec<u8>>,
    nonce: Vec<u8>,
    issued_at: SystemTime,
    transcript: ring::digest::Context,
}

impl VerificationSession for TpmSession {
    fn resume(
        self: Box<Self>,
        answer: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        let s = *self;
        match ctx.now.duration_since(s.issued_at) {
            Ok(d) if d > CHALLENGE_TTL => {
                return Err(refused(
                    Replay,
                    format!(
                        "TPM challenge expired (answered after {} s, limit {} s)",
                        d.as_secs(),
                        CHALLENGE_TTL.as_secs()
                    ),
                ))
            }
            _ => {}
        }
        let a: Answer = parse_json(answer, "TPM challenge answer")?;
        if a.secret.len() != s.secret.len() || !bool::from(a.secret.as_slice().ct_eq(&s.secret)) {
            return Err(refused(
                Replay,
                "credential activation failed: the secret returned is not the one sealed to the EK for this AK \
                 (the AK is not in the TPM that holds the EK, or the answer is from another attempt)",
            ));
        }
        let q = quote::verify_quote(
            &s.keys.ak,
            &a.quote,
            &a.signature,
            &s.nonce,
            &s.policy.pcrs,
            &a.pcrs,
        )?;
        verify_certification(
            &s.keys.ak,
            &a.certify,
            &a.certify_signature,
            &s.nonce,
            &s.agent_key_name,
        )?;
        s.policy.check_pcrs(&s.keys.node_id, &q.pcrs)?;
        let mut transcript = s.transcript;
        transcript.update(&(answer.len() as u64).to_be_bytes());
        transcript.update(answer);
        let mut evidence_digest = [0u8; 32];
        evidence_digest.copy_from_slice(transcript.finish().as_ref());
        Ok(VerifierStep::Attested(AttestedNode {
            method: METHOD,
            node_id: s.keys.node_id.clone(),
            selectors: selectors_for(&s.keys, &q.pcrs)?,
            aliases: Vec::new(),
            evidence_digest,
        }))
    }
}

/// Verifies captured evidence offline (`ztid-server evidence verify`): the claims as JSON,
/// or the first failed check. `collateral` is a directory of EK CA certificates (default:
/// the config's `ek_ca_dir`); `report_data` is the nonce the quote must carry.
pub fn verify_offline(
    evidence: &[u8],
    collateral: Option<&Path>,
    report_data: Option<&[u8]>,
    at: SystemTime,
    config: &toml::Table,
) -> Result<serde_json::Value, Error> {
    let policy = TpmPolicy::from_table(config, collateral)?;
    let ev: EvidenceFile = serde_json::from_slice(evidence)
        .map_err(|e| refused(Malformed, format!("malformed TPM evidence file: {e}")))?;
    if ev.format != EVIDENCE_FORMAT {
        return Err(refused(
            Unsupported,
            format!(
                "TPM evidence format is {:?}, expected {EVIDENCE_FORMAT:?}",
                ev.format
            ),
        ));
    }
    let nonce =
        hex::decode(&ev.nonce).map_err(|e| refused(Malformed, format!("evidence nonce: {e}")))?;
    if let Some(rd) = report_data {
        if rd != nonce.as_slice() {
            return Err(refused(
                Replay,
                "evidence nonce differs from the expected --report-data",
            ));
        }
    }
    if ev.ek_cert.is_empty() {
        return Err(refused(
            PolicyMismatch,
            "the evidence has no EK certificate: only an SVSM SEV-SNP report can vouch for such an EK, which offline TPM evidence does not carry",
        ));
    }
    let keys = check_keys(&policy, &ev.ek_cert, &ev.ek_pub, &ev.ak_pub, at)?;
    let selection: BTreeSet<u8> = ev.pcrs.keys().copied().collect();
    let q = quote::verify_quote(
        &keys.ak,
        &ev.quote,
        &ev.signature,
        &nonce,
        &selection,
        &ev.pcrs,
    )?;
    let policies = policy.check_pcrs(&keys.node_id, &q.pcrs)?;
    let selectors: Vec<String> = selectors_for(&keys, &q.pcrs)?
        .iter()
        .map(|s| s.to_string())
        .collect();
    Ok(serde_json::json!({
        "method": METHOD,
        "node_id": keys.node_id,
        "agent_path": format!("/ztid/agent/{METHOD}/{}", keys.node_id),
        "ek_issuer": keys.ek_info.issuer,
        "ek_ca_chain": keys.ek_info.chain,
        "manufacturer": keys.ek_info.manufacturer,
        "model": keys.ek_info.model,
        "tpm_version": keys.ek_info.version,
        "ak_name": hex::encode(&keys.ak_name),
        "nonce": ev.nonce,
        "nonce_checked": report_data.is_some(),
        "pcrs": q.pcrs.iter().map(|(k, v)| (k.to_string(), hex::encode(v))).collect::<BTreeMap<_, _>>(),
        "pcr_policies_met": policies,
        "clock_ms": q.attest.clock.clock,
        "reset_count": q.attest.clock.reset_count,
        "restart_count": q.attest.clock.restart_count,
        "firmware_version": format!("{:016x}", q.attest.firmware_version),
        "selectors": selectors,
        "ak_residency": "not proven offline: credential activation needs the CA's live challenge",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Test TPM CA");
        std::fs::write(d.path().join("ca.pem"), p.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        d
    }

    fn table(dir: &Path, extra: &str) -> toml::Table {
        toml::from_str(&format!(
            "ek_ca_dir = {:?}\n{extra}",
            dir.display().to_string()
        ))
        .unwrap()
    }

    fn config_err(dir: &Path, extra: &str) -> String {
        match TpmPolicy::from_table(&table(dir, extra), None) {
            Err(Error::Config(s)) => s,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("config accepted: {extra}"),
        }
    }

    #[test]
    fn config_is_checked() {
        let d = ca_dir();
        let p = TpmPolicy::from_table(&table(d.path(), ""), None).unwrap();
        assert_eq!(p.ek_cas.len(), 1);
        assert_eq!(p.pcrs, DEFAULT_PCRS.into_iter().collect());
        assert!(p.allowed_ek_hashes.is_none());
        let h = "ab".repeat(32);
        let z = "00".repeat(32);
        assert!(config_err(d.path(), "pcr = [1]").contains("unknown key \"pcr\""));
        assert!(config_err(d.path(), "pcrs = [24]").contains("indices are 0-23"));
        assert!(config_err(d.path(), "pcrs = []").contains("must not be empty"));
        assert!(config_err(d.path(), "allowed_ek_hashes = [\"xyz\"]").contains("64 hex digits"));
        assert!(config_err(
            d.path(),
            &format!("[pcr_policy.web]\npcrs = {{ 7 = \"{z}\" }}")
        )
        .contains("pcr_policy.web needs ek_hashes"));
        assert!(config_err(
            d.path(),
            &format!("[pcr_policy.{h}]\npcrs = {{ 9 = \"{z}\" }}")
        )
        .contains("names PCR 9, which is not in [attestors.tpm] pcrs"));
        assert!(config_err(
            d.path(),
            &format!("[pcr_policy.{h}]\npcrs = {{ 7 = \"00\" }}")
        )
        .contains("32 bytes"));
        let empty = tempfile::tempdir().unwrap();
        assert!(config_err(empty.path(), "").contains("holds no certificate"));
        assert!(matches!(
            TpmPolicy::from_table(&toml::Table::new(), None),
            Err(Error::Config(s)) if s.contains("needs ek_ca_dir")
        ));
        // An all-SVSM fleet: no manufacturer CA, EKs only bound by SEV-SNP reports.
        let svsm: toml::Table = toml::from_str("uncertified_ek = \"svsm-bound\"").unwrap();
        let p = TpmPolicy::from_table(&svsm, None).unwrap();
        assert!(p.uncertified_ek && p.ek_cas.len() == 0);
        assert!(config_err(d.path(), "uncertified_ek = true").contains("takes only \"svsm-bound\""));
        // The override (evidence verify --collateral) replaces the configured directory.
        assert!(TpmPolicy::from_table(&table(empty.path(), ""), Some(d.path())).is_ok());
    }

    #[test]
    fn pcr_policies_apply_by_node_and_name_every_failure() {
        let d = ca_dir();
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        let (z, o) = ("00".repeat(32), "11".repeat(32));
        let p = TpmPolicy::from_table(
            &table(
                d.path(),
                &format!(
                    "[pcr_policy.{a}]\npcrs = {{ 7 = \"{z}\" }}\n\
                     [pcr_policy.fleet]\nek_hashes = [\"*\"]\npcrs = {{ 0 = [\"{o}\", \"{z}\"], 1 = \"{z}\" }}\n"
                ),
            ),
            None,
        )
        .unwrap();
        let vals = |v0: &str, v1: &str, v7: &str| -> BTreeMap<u8, Vec<u8>> {
            [(0u8, v0), (1, v1), (7, v7)]
                .into_iter()
                .map(|(i, h)| (i, hex::decode(h).unwrap()))
                .collect()
        };
        assert_eq!(
            p.check_pcrs(&a, &vals(&o, &z, &z)).unwrap(),
            vec![a.clone(), "fleet".to_string()]
        );
        // Node b is only under the fleet policy.
        assert_eq!(
            p.check_pcrs(&b, &vals(&z, &z, &o)).unwrap(),
            vec!["fleet".to_string()]
        );
        match p.check_pcrs(&a, &vals(&z, &o, &o)) {
            Err(Error::Refused(r)) => assert_eq!(
                (r.kind, r.detail),
                (
                    PolicyMismatch,
                    format!(
                        "PCR policy not met: PCR 7 is {o} but policy {a} allows {z}; \
                         PCR 1 is {o} but policy fleet allows {z}"
                    )
                )
            ),
            other => panic!("{other:?}"),
        }
    }
}
