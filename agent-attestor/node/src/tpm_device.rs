//! The node's TPM, through tss-esapi (ESAPI over a TCTI). Every transient object and
//! session this module creates is flushed before the call that created it returns, on
//! success and on error alike: without a resource manager (swtpm's TCTI) the TPM has only
//! three transient object slots and three session slots.
//!
//! # Which EK
//! The EK is recreated from the TCG EK Credential Profile's default template each time
//! (it is the same key for the same TPM): RSA-2048 (certificate at NV 0x01c00002),
//! ECC NIST P-256 (low range, 0x01c0000a) or ECC NIST P-384 (high range, 0x01c00016).
//! [`EkKind`] says which: by default the RSA-2048 EK when its certificate is in NV, else
//! the P-256 one, else the P-384 one. An AK remembers the EK it was created under, so its
//! activation always uses that EK.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot, Private,
    Public, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use crate::Error;
use ztid_attestation::tpm::wire;
pub use ztid_hsm::TpmKeyBlob;

/// NV index of the RSA-2048 EK certificate (TCG EK Credential Profile, low range).
pub const NV_EK_CERT_RSA2048: u32 = 0x01c0_0002;
/// NV index of the ECC NIST P-256 EK certificate (low range).
pub const NV_EK_CERT_ECC_P256: u32 = 0x01c0_000a;
/// NV index of the ECC NIST P-384 EK certificate (high range).
pub const NV_EK_CERT_ECC_P384: u32 = 0x01c0_0016;

/// Which EK the agent attests with (the choice; [`EkTemplate`] is the resolved EK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EkKind {
    /// The RSA-2048 EK if its certificate is in NV, else the ECC one (P-256, else P-384).
    #[default]
    Auto,
    /// The RSA-2048 EK.
    Rsa,
    /// An ECC EK: P-256 if its certificate is in NV, else P-384.
    Ecc,
    /// The ECC NIST P-256 EK.
    EccP256,
    /// The ECC NIST P-384 EK.
    EccP384,
}

impl EkKind {
    /// Every accepted spelling, for flag help texts.
    pub const NAMES: &'static str = "auto, rsa, ecc, ecc-p256, ecc-p384";
}

impl std::str::FromStr for EkKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "rsa" | "rsa2048" | "rsa-2048" => Ok(Self::Rsa),
            "ecc" => Ok(Self::Ecc),
            "ecc-p256" | "p256" | "p-256" => Ok(Self::EccP256),
            "ecc-p384" | "p384" | "p-384" => Ok(Self::EccP384),
            other => Err(Error::Config(format!(
                "unknown TPM EK kind {other:?} (known: {})",
                Self::NAMES
            ))),
        }
    }
}

impl std::fmt::Display for EkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Rsa => "rsa",
            Self::Ecc => "ecc",
            Self::EccP256 => "ecc-p256",
            Self::EccP384 => "ecc-p384",
        })
    }
}

/// A concrete EK: a TCG default template and the NV index of its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkTemplate {
    /// RSA-2048, SHA-256, AES-128-CFB (low range, template L-1).
    Rsa2048,
    /// ECC NIST P-256, SHA-256, AES-128-CFB (low range, template L-2).
    EccP256,
    /// ECC NIST P-384, SHA-384, AES-256-CFB (high range, template H-3).
    EccP384,
}

impl EkTemplate {
    /// NV index of its certificate.
    pub fn nv_index(self) -> u32 {
        match self {
            Self::Rsa2048 => NV_EK_CERT_RSA2048,
            Self::EccP256 => NV_EK_CERT_ECC_P256,
            Self::EccP384 => NV_EK_CERT_ECC_P384,
        }
    }

    /// Human name ("RSA-2048", "ECC P-256", "ECC P-384").
    pub fn name(self) -> &'static str {
        match self {
            Self::Rsa2048 => "RSA-2048",
            Self::EccP256 => "ECC P-256",
            Self::EccP384 => "ECC P-384",
        }
    }

    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            Self::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            Self::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            Self::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        }
    }

    /// High-range templates set userWithAuth (their empty authValue authorises USER
    /// use); low-range ones need PolicySecret(endorsement) in a SHA-256 policy session.
    fn user_with_auth(self) -> bool {
        matches!(self, Self::EccP384)
    }
}

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
    ek: EkTemplate,
}

impl AkBlob {
    /// The EK the AK was created under (and must be activated with).
    pub fn ek(&self) -> EkTemplate {
        self.ek
    }

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
    ek_kind: EkKind,
    ek: Option<EkTemplate>,
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
    /// Connects through a TCTI string (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`), with
    /// the EK chosen by [`EkKind::Auto`].
    pub fn open(tcti: &str) -> Result<Self, Error> {
        Self::open_with_ek(tcti, EkKind::Auto)
    }

    /// [`Tpm::open`] with the EK chosen by `ek`.
    pub fn open_with_ek(tcti: &str, ek: EkKind) -> Result<Self, Error> {
        let conf = TctiNameConf::from_str(tcti)
            .map_err(|e| Error::Config(format!("bad TPM TCTI {tcti:?}: {e}")))?;
        // A panic while holding the lock leaves no TPM state behind (the context closed).
        let exclusive = tcti_lock(tcti).lock().unwrap_or_else(|p| p.into_inner());
        let ctx = Context::new(conf).map_err(|e| Error::Io {
            context: format!("opening the TPM at {tcti}"),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            ctx,
            ek_kind: ek,
            ek: None,
            _exclusive: exclusive,
        })
    }

    /// The EK this connection uses: [`EkKind`] resolved against the EK certificates in NV
    /// (once per connection).
    pub fn ek_template(&mut self) -> Result<EkTemplate, Error> {
        if let Some(t) = self.ek {
            return Ok(t);
        }
        let candidates: &[EkTemplate] = match self.ek_kind {
            EkKind::Rsa => &[EkTemplate::Rsa2048],
            EkKind::EccP256 => &[EkTemplate::EccP256],
            EkKind::EccP384 => &[EkTemplate::EccP384],
            EkKind::Ecc => &[EkTemplate::EccP256, EkTemplate::EccP384],
            EkKind::Auto => &[
                EkTemplate::Rsa2048,
                EkTemplate::EccP256,
                EkTemplate::EccP384,
            ],
        };
        let t = if let [only] = candidates {
            // An explicit choice: a missing certificate is reported when it is read.
            *only
        } else {
            let mut found = None;
            for &t in candidates {
                if nv_index_defined(&mut self.ctx, t.nv_index())? {
                    found = Some(t);
                    break;
                }
            }
            // No certificate at all (an SVSM vTPM): `auto` uses the RSA-2048 EK, the one
            // the SVSM's vTPM manifest names; the CA accepts it only as bound.
            if found.is_none() && self.ek_kind == EkKind::Auto {
                found = Some(EkTemplate::Rsa2048);
            }
            found.ok_or_else(|| Error::Io {
                context: format!(
                    "TPM: no EK certificate in NV for EK choice {:?} (looked for {})",
                    self.ek_kind.to_string(),
                    candidates
                        .iter()
                        .map(|t| format!("{} at 0x{:08x}", t.name(), t.nv_index()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?
        };
        self.ek = Some(t);
        Ok(t)
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

    /// The EK certificate from NV (of the EK [`Tpm::ek_template`] picks), as DER (NV
    /// padding after the DER trimmed).
    pub fn ek_cert(&mut self) -> Result<Vec<u8>, Error> {
        let t = self.ek_template()?;
        let raw =
            ek::retrieve_ek_pubcert(&mut self.ctx, t.selection()).map_err(tpm_err(&format!(
                "reading the {} EK certificate (NV 0x{:08x})",
                t.name(),
                t.nv_index()
            )))?;
        Ok(trim_der(raw))
    }

    /// Runs `f` with this connection's EK loaded; flushes it afterwards.
    fn with_ek<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle, EkTemplate) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let t = self.ek_template()?;
        self.with_ek_template(t, f)
    }

    /// Runs `f` with the EK `t` (recreated from its TCG default template) loaded, and
    /// flushes it afterwards.
    fn with_ek_template<T>(
        &mut self,
        t: EkTemplate,
        f: impl FnOnce(&mut Context, KeyHandle, EkTemplate) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let ek = ek::create_ek_object_2(&mut self.ctx, t.selection(), None).map_err(tpm_err(
            &format!("creating the {} EK from its template", t.name()),
        ))?;
        let r = f(&mut self.ctx, ek, t);
        let flushed = self
            .ctx
            .flush_context(ObjectHandle::from(ek))
            .map_err(tpm_err("flushing the EK"));
        let v = r?;
        flushed?;
        Ok(v)
    }

    /// Runs `f` with the AK loaded under the EK it was created under; flushes both
    /// afterwards.
    fn with_ak<T>(
        &mut self,
        ak_blob: &AkBlob,
        f: impl FnOnce(&mut Context, KeyHandle, KeyHandle, EkTemplate) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.with_ek_template(ak_blob.ek, |ctx, ek, t| {
            let ak = ak::load_ak(
                ctx,
                ek,
                None,
                ak_blob.private.clone(),
                ak_blob.public.clone(),
            )
            .map_err(tpm_err("loading the AK"))?;
            let r = f(ctx, ek, ak, t);
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
        self.with_ek(|ctx, ek, _| ek_public_in(ctx, ek))
    }

    /// Creates a restricted ECDSA P-256/SHA-256 signing AK under the EK (fixedTPM,
    /// fixedParent, sensitiveDataOrigin, userWithAuth).
    pub fn create_ak(&mut self) -> Result<AkBlob, Error> {
        self.with_ek(create_ak_in)
    }

    /// [`Tpm::ek_public`] and [`Tpm::create_ak`] with one EK creation.
    pub fn ek_public_and_new_ak(&mut self) -> Result<(Vec<u8>, AkBlob), Error> {
        self.with_ek(|ctx, ek, t| Ok((ek_public_in(ctx, ek)?, create_ak_in(ctx, ek, t)?)))
    }

    /// TPM2_ActivateCredential: recovers the secret the CA sealed to the EK for the AK's name.
    pub fn activate_credential(
        &mut self,
        ak_blob: &AkBlob,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.with_ak(ak_blob, |ctx, ek, ak, t| {
            activate_in(ctx, ek, t, ak, credential_blob, encrypted_secret)
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
        self.with_ak(ak_blob, |ctx, _ek, ak, _| quote_in(ctx, ak, nonce, pcrs))
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
        self.with_ak(ak_blob, |ctx, ek, ak, t| {
            let secret = activate_in(ctx, ek, t, ak, credential_blob, encrypted_secret)?;
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
    ) -> Result<(Vec<u8>, Quote, Certification), Error> {
        self.with_agent_key_and_ak(ak_blob, key, |ctx, ek, ak, t, agent_key| {
            let secret = activate_in(ctx, ek, t, ak, credential_blob, encrypted_secret)?;
            let quote = quote_in(ctx, ak, nonce, pcrs)?;
            let certified = certify_in(ctx, agent_key, ak, nonce)?;
            Ok((secret, quote, certified))
        })
    }

    /// Runs `f` with the agent key loaded (its SRK flushed at once), then the AK under
    /// its EK, so key, EK and AK fit the three transient slots; flushes all three.
    fn with_agent_key_and_ak<T>(
        &mut self,
        ak_blob: &AkBlob,
        key: &TpmKeyBlob,
        f: impl FnOnce(&mut Context, KeyHandle, KeyHandle, EkTemplate, KeyHandle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let handle = ztid_hsm::tpm::load_key(&mut self.ctx, key, "agent key").map_err(hsm_err)?;
        let r = self.with_ak(ak_blob, |ctx, ek, ak, t| f(ctx, ek, ak, t, handle));
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
    ) -> Result<Certification, Error> {
        self.with_agent_key_and_ak(ak_blob, key, |ctx, _ek, ak, _, agent_key| {
            certify_in(ctx, agent_key, ak, nonce)
        })
    }

    /// Reads sha256 PCRs.
    pub fn read_pcrs(&mut self, pcrs: &BTreeSet<u8>) -> Result<BTreeMap<u8, Vec<u8>>, Error> {
        read_pcrs(&mut self.ctx, pcrs)
    }
}

/// A certification: raw `TPMS_ATTEST` and raw `TPMT_SIGNATURE`.
pub type Certification = (Vec<u8>, Vec<u8>);

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

fn create_ak_in(ctx: &mut Context, ek: KeyHandle, t: EkTemplate) -> Result<AkBlob, Error> {
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
        ek: t,
    })
}

fn activate_in(
    ctx: &mut Context,
    ek: KeyHandle,
    t: EkTemplate,
    ak: KeyHandle,
    credential_blob: &[u8],
    encrypted_secret: &[u8],
) -> Result<Vec<u8>, Error> {
    let id_object = IdObject::try_from(credential_blob.to_vec())
        .map_err(tpm_err("reading the credential blob"))?;
    let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
        .map_err(tpm_err("reading the encrypted secret"))?;
    // Session 1 authorises the AK (empty auth, HMAC session). The EK's USER role: a
    // high-range EK (userWithAuth) takes its empty authValue (password session); a
    // low-range one needs its policy, PolicySecret on the endorsement hierarchy.
    let hmac = start_session(ctx, SessionType::Hmac)?;
    if t.user_with_auth() {
        ctx.set_sessions((Some(hmac), Some(AuthSession::Password), None));
        let out = ctx.activate_credential(ak, ek, id_object, secret);
        ctx.clear_sessions();
        let f = flush_session(ctx, hmac);
        let v = out
            .map(|d| d.value().to_vec())
            .map_err(tpm_err("ActivateCredential"))?;
        f?;
        return Ok(v);
    }
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
            (
                Some(AuthSession::Password),
                Some(AuthSession::Password),
                None,
            ),
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

/// True if the NV index `index` is defined (TPM2_GetCapability, handles from `index`).
fn nv_index_defined(ctx: &mut Context, index: u32) -> Result<bool, Error> {
    let (data, _) = ctx
        .execute_without_session(|c| c.get_capability(CapabilityType::Handles, index, 1))
        .map_err(tpm_err("listing NV indices"))?;
    Ok(match data {
        CapabilityData::Handles(list) => list.iter().next().is_some_and(|h| u32::from(*h) == index),
        _ => false,
    })
}

/// Trims NV padding after a DER SEQUENCE (EK certificate NV indices may be larger than
/// the certificate).
fn trim_der(mut b: Vec<u8>) -> Vec<u8> {
    let (len, hdr) = match b.as_slice() {
        [0x30, n, ..] if *n < 0x80 => (usize::from(*n), 2),
        [0x30, 0x81, n, ..] => (usize::from(*n), 3),
        [0x30, 0x82, hi, lo, ..] => ((usize::from(*hi) << 8) | usize::from(*lo), 4),
        _ => return b,
    };
    if hdr + len < b.len() {
        b.truncate(hdr + len);
    }
    b
}
