//! The node's TPM, through tss-esapi (ESAPI over a TCTI). Every transient object and
//! session this module creates is flushed before the call that created it returns, on
//! success and on error alike: without a resource manager (swtpm's TCTI) the TPM has only
//! three transient object slots and three session slots.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot, Private, Public,
    SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::wire;
use crate::Error;
pub use ztid_hsm::TpmKeyBlob;

/// NV index of the RSA-2048 EK certificate (TCG EK Credential Profile, low range).
pub const NV_EK_CERT_RSA2048: u32 = 0x01c0_0002;

fn tpm_err(what: &str) -> impl FnOnce(tss_esapi::Error) -> Error + '_ {
    move |e| Error::Io {
        context: format!("TPM {what}"),
        source: std::io::Error::other(e.to_string()),
    }
}

/// An attestation key created under the EK: its wrapped private part and its public part.
#[derive(Debug, Clone)]
pub struct AkBlob {
    private: Private,
    public: Public,
}

impl AkBlob {
    /// The AK's `TPMT_PUBLIC`.
    pub fn public_bytes(&self) -> Result<Vec<u8>, Error> {
        self.public
            .marshall()
            .map_err(tpm_err("marshalling the AK public"))
    }
}

/// A connection to a TPM. Only one per TCTI exists in a process at a time (the
/// connection holds a per-TCTI lock): swtpm serves one client at a time, and a TPM
/// without a resource manager has three transient slots to share.
pub struct Tpm {
    ctx: Context,
    _exclusive: std::sync::MutexGuard<'static, ()>,
}

/// The lock for one TCTI string (leaked once per distinct TCTI; a process uses few).
fn tcti_lock(tcti: &str) -> &'static std::sync::Mutex<()> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static LOCKS: OnceLock<Mutex<HashMap<String, &'static Mutex<()>>>> = OnceLock::new();
    let mut map = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry(tcti.to_string())
        .or_insert_with(|| Box::leak(Box::new(Mutex::new(()))))
}

impl Tpm {
    /// Connects through a TCTI string (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`).
    pub fn open(tcti: &str) -> Result<Self, Error> {
        let conf = TctiNameConf::from_str(tcti)
            .map_err(|e| Error::Config(format!("bad TPM TCTI {tcti:?}: {e}")))?;
        // A panic while holding the lock leaves no TPM state behind (the context closed).
        let exclusive = tcti_lock(tcti)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ctx = Context::new(conf).map_err(|e| Error::Io {
            context: format!("opening the TPM at {tcti}"),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            ctx,
            _exclusive: exclusive,
        })
    }

    /// Creates the agent's key in this TPM: ECDSA P-256, unrestricted signing,
    /// fixedTPM/fixedParent/sensitiveDataOrigin, under the owner SRK. The returned blob
    /// is useless to any other TPM.
    pub fn create_agent_key(&mut self) -> Result<TpmKeyBlob, Error> {
        ztid_hsm::tpm::create_key(&mut self.ctx).map_err(hsm_err)
    }

    /// Signs SHA-256(`message`) with the agent key; fixed-size `r || s`.
    pub fn sign_with_agent_key(
        &mut self,
        key: &TpmKeyBlob,
        message: &[u8],
    ) -> Result<Vec<u8>, Error> {
        ztid_hsm::tpm::sign_with_blob(&mut self.ctx, key, "agent key", message).map_err(hsm_err)
    }

    /// The RSA-2048 EK certificate from NV, as DER (NV padding after the DER trimmed).
    pub fn ek_cert(&mut self) -> Result<Vec<u8>, Error> {
        let raw = ek::retrieve_ek_pubcert(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .map_err(tpm_err(&format!(
            "reading the RSA-2048 EK certificate (NV 0x{NV_EK_CERT_RSA2048:08x})"
        )))?;
        Ok(trim_der(raw))
    }

    /// Runs `f` with the RSA-2048 EK (recreated from the TCG default template) loaded,
    /// and flushes it afterwards.
    fn with_ek<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let ek = ek::create_ek_object_2(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        )
        .map_err(tpm_err("creating the EK from its template"))?;
        let r = f(&mut self.ctx, ek);
        let flushed = self
            .ctx
            .flush_context(ObjectHandle::from(ek))
            .map_err(tpm_err("flushing the EK"));
        let v = r?;
        flushed?;
        Ok(v)
    }

    /// Runs `f` with the AK loaded under the EK; flushes both afterwards.
    fn with_ak<T>(
        &mut self,
        ak_blob: &AkBlob,
        f: impl FnOnce(&mut Context, KeyHandle, KeyHandle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.with_ek(|ctx, ek| {
            let ak = ak::load_ak(
                ctx,
                ek,
                None,
                ak_blob.private.clone(),
                ak_blob.public.clone(),
            )
            .map_err(tpm_err("loading the AK"))?;
            let r = f(ctx, ek, ak);
            let flushed = ctx
                .flush_context(ObjectHandle::from(ak))
                .map_err(tpm_err("flushing the AK"));
            let v = r?;
            flushed?;
            Ok(v)
        })
    }

    /// The EK's `TPMT_PUBLIC`.
    pub fn ek_public(&mut self) -> Result<Vec<u8>, Error> {
        self.with_ek(ek_public_in)
    }

    /// Creates a restricted ECDSA P-256/SHA-256 signing AK under the EK (fixedTPM,
    /// fixedParent, sensitiveDataOrigin, userWithAuth).
    pub fn create_ak(&mut self) -> Result<AkBlob, Error> {
        self.with_ek(create_ak_in)
    }

    /// [`Tpm::ek_public`] and [`Tpm::create_ak`] with one EK creation.
    pub fn ek_public_and_new_ak(&mut self) -> Result<(Vec<u8>, AkBlob), Error> {
        self.with_ek(|ctx, ek| Ok((ek_public_in(ctx, ek)?, create_ak_in(ctx, ek)?)))
    }

    /// TPM2_ActivateCredential: recovers the secret the CA sealed to the EK for the AK's name.
    pub fn activate_credential(
        &mut self,
        ak_blob: &AkBlob,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.with_ak(ak_blob, |ctx, ek, ak| {
            activate_in(ctx, ek, ak, credential_blob, encrypted_secret)
        })
    }

    /// Quotes the sha256 PCRs `pcrs` over `nonce` with the AK; returns the raw
    /// `TPMS_ATTEST`, the raw `TPMT_SIGNATURE` and the PCR values the quote covers (read
    /// after the quote and checked against its digest; retried if a PCR moved between).
    pub fn quote(
        &mut self,
        ak_blob: &AkBlob,
        nonce: &[u8],
        pcrs: &BTreeSet<u8>,
    ) -> Result<Quote, Error> {
        self.with_ak(ak_blob, |ctx, _ek, ak| quote_in(ctx, ak, nonce, pcrs))
    }

    /// [`Tpm::activate_credential`] then [`Tpm::quote`], loading the EK and AK once.
    pub fn activate_and_quote(
        &mut self,
        ak_blob: &AkBlob,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
        nonce: &[u8],
        pcrs: &BTreeSet<u8>,
    ) -> Result<(Vec<u8>, Quote), Error> {
        self.with_ak(ak_blob, |ctx, ek, ak| {
            let secret = activate_in(ctx, ek, ak, credential_blob, encrypted_secret)?;
            Ok((secret, quote_in(ctx, ak, nonce, pcrs)?))
        })
    }

    /// [`Tpm::activate_and_quote`], and TPM2_Certify of `key` by the AK over `nonce`
    /// (raw `TPMS_ATTEST` and `TPMT_SIGNATURE`). The key is loaded first (its SRK
    /// flushed at once), so key, EK and AK fit the three transient slots.
    pub fn activate_quote_and_certify(
        &mut self,
        ak_blob: &AkBlob,
        key: &TpmKeyBlob,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
        nonce: &[u8],
        pcrs: &BTreeSet<u8>,
    ) -> Result<(Vec<u8>, Quote, (Vec<u8>, Vec<u8>)), Error> {
        let handle = ztid_hsm::tpm::load_key(&mut self.ctx, key, "agent key").map_err(hsm_err)?;
        let r = self.with_ak(ak_blob, |ctx, ek, ak| {
            let secret = activate_in(ctx, ek, ak, credential_blob, encrypted_secret)?;
            let quote = quote_in(ctx, ak, nonce, pcrs)?;
            let certified = certify_in(ctx, handle, ak, nonce)?;
            Ok((secret, quote, certified))
        });
        let flushed = self
            .ctx
            .flush_context(ObjectHandle::from(handle))
            .map_err(tpm_err("flushing the agent key"));
        let v = r?;
        flushed?;
        Ok(v)
    }

    /// TPM2_Certify of `key` by a new AK over `nonce`, with the AK: for tests that need a
    /// certification by an AK the CA never activated.
    pub fn certify_with(
        &mut self,
        ak_blob: &AkBlob,
        key: &TpmKeyBlob,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let handle = ztid_hsm::tpm::load_key(&mut self.ctx, key, "agent key").map_err(hsm_err)?;
        let r = self.with_ak(ak_blob, |ctx, _ek, ak| certify_in(ctx, handle, ak, nonce));
        let flushed = self
            .ctx
            .flush_context(ObjectHandle::from(handle))
            .map_err(tpm_err("flushing the agent key"));
        let v = r?;
        flushed?;
        Ok(v)
    }

    /// Reads sha256 PCRs.
    pub fn read_pcrs(&mut self, pcrs: &BTreeSet<u8>) -> Result<BTreeMap<u8, Vec<u8>>, Error> {
        read_pcrs(&mut self.ctx, pcrs)
    }
}

/// A quote: raw `TPMS_ATTEST`, raw `TPMT_SIGNATURE`, and the PCR values it covers.
pub type Quote = (Vec<u8>, Vec<u8>, BTreeMap<u8, Vec<u8>>);

fn ek_public_in(ctx: &mut Context, ek: KeyHandle) -> Result<Vec<u8>, Error> {
    let (public, _, _) = ctx
        .read_public(ek)
        .map_err(tpm_err("reading the EK public"))?;
    public
        .marshall()
        .map_err(tpm_err("marshalling the EK public"))
}

fn create_ak_in(ctx: &mut Context, ek: KeyHandle) -> Result<AkBlob, Error> {
    let r = ak::create_ak_2(
        ctx,
        ek,
        HashingAlgorithm::Sha256,
        AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        SignatureSchemeAlgorithm::EcDsa,
        None,
        None,
    )
    .map_err(tpm_err("creating the AK"))?;
    Ok(AkBlob {
        private: r.out_private,
        public: r.out_public,
    })
}

fn activate_in(
    ctx: &mut Context,
    ek: KeyHandle,
    ak: KeyHandle,
    credential_blob: &[u8],
    encrypted_secret: &[u8],
) -> Result<Vec<u8>, Error> {
    let id_object = IdObject::try_from(credential_blob.to_vec())
        .map_err(tpm_err("reading the credential blob"))?;
    let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
        .map_err(tpm_err("reading the encrypted secret"))?;
    // Session 1 authorises the AK (empty auth, HMAC session); session 2 satisfies the
    // EK's policy (PolicySecret on the endorsement hierarchy).
    let hmac = start_session(ctx, SessionType::Hmac)?;
    let policy = match start_session(ctx, SessionType::Policy) {
        Ok(p) => p,
        Err(e) => {
            let _ = flush_session(ctx, hmac);
            return Err(e);
        }
    };
    let r = (|| {
        let ps =
            PolicySession::try_from(policy).map_err(tpm_err("starting the EK policy session"))?;
        ctx.execute_with_session(Some(hmac), |c| {
            c.policy_secret(
                ps,
                AuthHandle::Endorsement,
                Default::default(),
                Default::default(),
                Default::default(),
                None,
            )
        })
        .map_err(tpm_err("PolicySecret(endorsement) for the EK"))?;
        ctx.set_sessions((Some(hmac), Some(policy), None));
        let out = ctx.activate_credential(ak, ek, id_object, secret);
        ctx.clear_sessions();
        out.map(|d| d.value().to_vec())
            .map_err(tpm_err("ActivateCredential"))
    })();
    let f1 = flush_session(ctx, hmac);
    let f2 = flush_session(ctx, policy);
    let v = r?;
    f1?;
    f2?;
    Ok(v)
}

fn quote_in(
    ctx: &mut Context,
    ak: KeyHandle,
    nonce: &[u8],
    pcrs: &BTreeSet<u8>,
) -> Result<Quote, Error> {
    let data = Data::try_from(nonce.to_vec()).map_err(tpm_err("nonce too long for a quote"))?;
    let selection = selection_list(pcrs)?;
    let mut last = None;
    for _ in 0..3 {
        let (attest, sig) = ctx
            .execute_with_nullauth_session(|c| {
                c.quote(ak, data.clone(), SignatureScheme::Null, selection.clone())
            })
            .map_err(tpm_err("Quote"))?;
        let attest = attest
            .marshall()
            .map_err(tpm_err("marshalling the quote"))?;
        let sig = sig
            .marshall()
            .map_err(tpm_err("marshalling the signature"))?;
        let values = read_pcrs(ctx, pcrs)?;
        let parsed = wire::Attest::parse(&attest)?;
        if let wire::Attested::Quote { digest, .. } = &parsed.attested {
            let mut h = ring::digest::Context::new(&ring::digest::SHA256);
            values.values().for_each(|v| h.update(v));
            if h.finish().as_ref() == digest.as_slice() {
                return Ok((attest, sig, values));
            }
        }
        last = Some((attest, sig, values));
    }
    // PCRs kept moving: send the last try and let the CA say what differs.
    last.ok_or_else(|| Error::Protocol("no quote".into()))
}

fn certify_in(
    ctx: &mut Context,
    key: KeyHandle,
    ak: KeyHandle,
    nonce: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let data = Data::try_from(nonce.to_vec()).map_err(tpm_err("nonce too long to certify"))?;
    // Both objects have empty auth: two password sessions (they take no session slot).
    let (attest, sig) = ctx
        .execute_with_sessions(
            (Some(AuthSession::Password), Some(AuthSession::Password), None),
            |c| c.certify(ObjectHandle::from(key), ak, data, SignatureScheme::Null),
        )
        .map_err(tpm_err("Certify"))?;
    Ok((
        attest
            .marshall()
            .map_err(tpm_err("marshalling the certification"))?,
        sig.marshall()
            .map_err(tpm_err("marshalling the certification signature"))?,
    ))
}

fn hsm_err(e: ztid_hsm::Error) -> Error {
    Error::Io {
        context: "TPM agent key".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn start_session(ctx: &mut Context, t: SessionType) -> Result<AuthSession, Error> {
    ctx.start_auth_session(
        None,
        None,
        None,
        t,
        SymmetricDefinition::AES_128_CFB,
        HashingAlgorithm::Sha256,
    )
    .map_err(tpm_err("starting a session"))?
    .ok_or_else(|| Error::Protocol("TPM returned no session".into()))
}

fn flush_session(ctx: &mut Context, s: AuthSession) -> Result<(), Error> {
    ctx.flush_context(ObjectHandle::from(SessionHandle::from(s)))
        .map_err(tpm_err("flushing a session"))
}

fn slots(pcrs: &[u8]) -> Result<Vec<PcrSlot>, Error> {
    pcrs.iter()
        .map(|&p| {
            if p >= 24 {
                return Err(Error::Protocol(format!("PCR {p} does not exist")));
            }
            PcrSlot::try_from(1u32 << p).map_err(tpm_err("PCR slot"))
        })
        .collect()
}

fn selection_list(pcrs: &BTreeSet<u8>) -> Result<tss_esapi::structures::PcrSelectionList, Error> {
    let v: Vec<u8> = pcrs.iter().copied().collect();
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots(&v)?)
        .build()
        .map_err(tpm_err("PCR selection"))
}

fn read_pcrs(ctx: &mut Context, pcrs: &BTreeSet<u8>) -> Result<BTreeMap<u8, Vec<u8>>, Error> {
    let all: Vec<u8> = pcrs.iter().copied().collect();
    let mut out = BTreeMap::new();
    // PCR_Read returns at most 8 digests per call.
    for chunk in all.chunks(8) {
        let set: BTreeSet<u8> = chunk.iter().copied().collect();
        let sel = selection_list(&set)?;
        let (_, _, digests) = ctx
            .execute_without_session(|c| c.pcr_read(sel))
            .map_err(tpm_err("PCR_Read"))?;
        if digests.len() != chunk.len() {
            return Err(Error::Protocol(format!(
                "the TPM returned {} of {} sha256 PCRs (is the sha256 bank active?)",
                digests.len(),
                chunk.len()
            )));
        }
        for (p, d) in chunk.iter().zip(digests.value()) {
            out.insert(*p, d.value().to_vec());
        }
    }
    Ok(out)
}

/// Trims NV padding after a DER SEQUENCE (EK certificate NV indices may be larger than
/// the certificate).
fn trim_der(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() < 2 || b[0] != 0x30 {
        return b;
    }
    let (len, hdr) = match b[1] {
        n if n < 0x80 => (n as usize, 2),
        0x81 if b.len() >= 3 => (b[2] as usize, 3),
        0x82 if b.len() >= 4 => (((b[2] as usize) << 8) | b[3] as usize, 4),
        _ => return b,
    };
    if hdr + len < b.len() {
        b.truncate(hdr + len);
    }
    b
}
