//! The agent's own key, the one its agent SVID certifies and its mTLS handshakes to the
//! node API are signed with: either a software key (ECDSA P-256 generated with ring,
//! kept in memory and in the data directory as PKCS#8) or, for TPM-attested nodes, a key
//! created inside the node's TPM that never leaves it. The TPM key's private part exists
//! only wrapped by the TPM's storage key, so copying the agent's data directory to
//! another machine copies nothing that can sign.

use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use zeroize::Zeroizing;

use crate::tpm_device::{Tpm, TpmKeyBlob};
use crate::Error;

/// File name of a persisted software key (PKCS#8 DER).
pub const SOFTWARE_KEY_FILE: &str = "agent_key.pk8";
/// File name of a persisted TPM key (the SRK-wrapped blob; the TPM is the configured one).
pub const TPM_KEY_FILE: &str = "agent_key.tpmkey";

/// The agent's key.
#[derive(Clone)]
pub enum AgentKey {
    /// PKCS#8 DER, in memory.
    Software(Arc<Zeroizing<Vec<u8>>>),
    /// Resident in the node's TPM.
    Tpm(Arc<TpmAgentKey>),
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Software(_) => f.write_str("AgentKey::Software(..)"),
            Self::Tpm(k) => write!(f, "AgentKey::Tpm({})", k.tcti),
        }
    }
}

/// A key inside the node's TPM: the wrapped blob and where the TPM is.
pub struct TpmAgentKey {
    tcti: String,
    blob: TpmKeyBlob,
    /// The uncompressed P-256 point.
    point: Vec<u8>,
    spki: Vec<u8>,
}

impl TpmAgentKey {
    /// Wraps a blob made by the TPM at `tcti`.
    pub fn new(tcti: &str, blob: TpmKeyBlob) -> Result<Self, Error> {
        let public = blob
            .public_key("agent key")
            .map_err(|e| Error::Config(format!("TPM agent key: {e}")))?;
        Ok(Self {
            tcti: tcti.to_string(),
            blob,
            point: public.raw,
            spki: public.spki_der,
        })
    }

    /// The wrapped blob (public area and SRK-wrapped private area).
    pub fn blob(&self) -> &TpmKeyBlob {
        &self.blob
    }

    /// ECDSA P-256/SHA-256 over `message` by the TPM, DER-encoded.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let fixed = Tpm::open(&self.tcti)?.sign_with_agent_key(&self.blob, message)?;
        ztid_hsm::fixed_to_der(&fixed).map_err(|e| Error::Protocol(format!("TPM signature: {e}")))
    }
}

impl AgentKey {
    /// A new software key.
    pub fn generate_software() -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self::Software(Arc::new(Zeroizing::new(
            key.serialize_der(),
        ))))
    }

    /// A software key from PKCS#8 DER.
    pub fn from_pkcs8(der: Vec<u8>) -> Self {
        Self::Software(Arc::new(Zeroizing::new(der)))
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki(&self) -> Result<Vec<u8>, Error> {
        match self {
            Self::Software(der) => Ok(rcgen::PublicKeyData::subject_public_key_info(
                &software_keypair(der)?,
            )),
            Self::Tpm(k) => Ok(k.spki.clone()),
        }
    }

    /// A PKCS#10 request without subject or SANs (the server fills in the agent's ID),
    /// signed with this key.
    pub fn csr(&self) -> Result<Vec<u8>, Error> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = match self {
            Self::Software(der) => params.serialize_request(&software_keypair(der)?),
            Self::Tpm(k) => params.serialize_request(&CsrSigner(k)),
        };
        Ok(csr
            .map_err(|e| Error::Config(e.to_string()))?
            .der()
            .to_vec())
    }

    /// The key as rustls signs with it.
    pub fn rustls_key(&self) -> Result<Arc<dyn SigningKey>, Error> {
        match self {
            Self::Software(der) => {
                let der = PrivateKeyDer::Pkcs8(der.to_vec().into());
                rustls::crypto::ring::sign::any_ecdsa_type(&der)
                    .map_err(|e| Error::Config(format!("agent key: {e}")))
            }
            Self::Tpm(k) => Ok(Arc::new(TpmSigningKey(k.clone()))),
        }
    }

    /// The PKCS#8 DER of a software key (what workloads are handed); `None` for a
    /// TPM key, which has no exportable form.
    pub fn pkcs8(&self) -> Option<&[u8]> {
        match self {
            Self::Software(der) => Some(der),
            Self::Tpm(_) => None,
        }
    }

    /// The file the key persists to, and its contents.
    pub fn persisted(&self) -> Result<(&'static str, Zeroizing<Vec<u8>>), Error> {
        match self {
            Self::Software(der) => Ok((SOFTWARE_KEY_FILE, Zeroizing::new(der.to_vec()))),
            Self::Tpm(k) => {
                let blob = k
                    .blob
                    .encode()
                    .map_err(|e| Error::Config(format!("TPM agent key: {e}")))?;
                Ok((TPM_KEY_FILE, Zeroizing::new(blob)))
            }
        }
    }

    /// Reads a key [`AgentKey::persisted`] wrote into `dir`, if there is one; a TPM key
    /// is used through the TPM at `tcti` (the configured one: a blob only ever works in
    /// the TPM that made it).
    pub fn load(dir: &std::path::Path, tcti: &str) -> Option<Self> {
        if let Ok(der) = std::fs::read(dir.join(SOFTWARE_KEY_FILE)) {
            return Some(Self::from_pkcs8(der));
        }
        let bytes = std::fs::read(dir.join(TPM_KEY_FILE)).ok()?;
        let blob = TpmKeyBlob::decode("agent key", &bytes).ok()?;
        Some(Self::Tpm(Arc::new(TpmAgentKey::new(tcti, blob).ok()?)))
    }
}

/// The DER SubjectPublicKeyInfo of the key in a PKCS#10 request, encoded as the CA reads
/// it from the agent's CSR (the key its challenges name, [`crate::NodeAttestor::answer`]).
pub fn csr_spki(csr: &[u8]) -> Result<Vec<u8>, Error> {
    let parsed = rcgen::CertificateSigningRequestParams::from_der(
        &rustls::pki_types::CertificateSigningRequestDer::from(csr),
    )
    .map_err(|e| Error::Config(format!("agent CSR: {e}")))?;
    Ok(rcgen::PublicKeyData::subject_public_key_info(
        &parsed.public_key,
    ))
}

fn software_keypair(der: &[u8]) -> Result<rcgen::KeyPair, Error> {
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der);
    rcgen::KeyPair::try_from(&der).map_err(|e| Error::Config(format!("agent key: {e}")))
}

/// rcgen's view of the TPM key, for signing the CSR.
struct CsrSigner<'a>(&'a TpmAgentKey);

impl rcgen::PublicKeyData for CsrSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.0.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for CsrSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|e| {
            tracing::error!(error = %e, "the TPM did not sign the agent CSR");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// rustls's view of the TPM key: ECDSA P-256 with SHA-256 only.
#[derive(Debug)]
struct TpmSigningKey(Arc<TpmAgentKey>);

impl std::fmt::Debug for TpmAgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TpmAgentKey({})", self.tcti)
    }
}

impl SigningKey for TpmSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(TpmSigner(self.0.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct TpmSigner(Arc<TpmAgentKey>);

impl Signer for TpmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let sign = || {
            self.0
                .sign(message)
                .map_err(|e| rustls::Error::General(format!("TPM signing failed: {e}")))
        };
        // The TPM answers in milliseconds, but blocks.
        crate::blocking(sign)
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}
