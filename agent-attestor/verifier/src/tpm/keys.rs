//! The static checks of the keys a node presents: the EK certificate, EK and AK before
//! the challenge ([`check_keys`]), the agent key's public area against the CSR
//! ([`check_agent_key`]), and the AK's certification of that key in the answer
//! ([`verify_certification`]).

use std::time::SystemTime;

use subtle::ConstantTimeEq;

use ztid_attestation::tpm::refused;
use ztid_attestation::tpm::wire::{self, attr, Public, PublicKey};
use ztid_attestation::RefusalKind::{
    BadSignature, KeyMismatch, Malformed, PolicyMismatch, Replay, Unsupported,
};
use ztid_attestation::{unix_seconds, Error};

use super::ekcert::EkInfo;
use super::{quote, TpmPolicy, MAX_MESSAGE};

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
