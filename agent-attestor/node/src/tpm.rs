//! `tpm` node attestation, node side (the TPM itself is [`crate::tpm_device`]): the TPM makes the agent key, a fresh AK, activates
//! the CA's credential and quotes its PCRs ([`TpmAttestor`]); also offline evidence
//! capture for `ztid-server evidence verify`. The CA side is `ztid_verifier::tpm`.

use std::collections::BTreeSet;

use zeroize::Zeroizing;

pub use ztid_attestation::tpm::{
    b64_encode, wire, Answer, Challenge, EvidenceFile, InitialEvidence, DEFAULT_PCRS,
    EVIDENCE_FORMAT, METHOD,
};
use ztid_attestation::Error;

use crate::agent_key::{AgentKey, TpmAgentKey};
use crate::tpm_device::{AkBlob, Tpm};
pub use crate::tpm_device::{EkKind, EkTemplate};
use crate::NodeAttestor;

// ---------------------------------------------------------------------------------------
// Node side

/// What the TPM attestor needs to know.
#[derive(Debug, Clone)]
pub struct TpmAttestorConfig {
    /// The TCTI of the TPM (`device:/dev/tpmrm0`, `swtpm:port=2321`).
    pub tcti: String,
    /// Which EK to attest with.
    pub ek: EkKind,
}

/// Agent side: the TPM is opened for each step and closed after it, so the agent holds
/// no TPM connection (nor any loaded object) between steps.
pub struct TpmAttestor {
    tcti: String,
    ek: EkKind,
    ak: Option<AkBlob>,
    agent_key: Option<std::sync::Arc<TpmAgentKey>>,
}

impl TpmAttestor {
    /// The attestor `config` describes.
    pub fn new(config: &TpmAttestorConfig) -> Self {
        Self::with_tcti_and_ek(&config.tcti, config.ek)
    }

    /// An attestor for the TPM at `tcti`, with the EK [`EkKind::Auto`] picks (RSA-2048 if
    /// its certificate is in NV, else ECC).
    pub fn with_tcti(tcti: &str) -> Self {
        Self::with_tcti_and_ek(tcti, EkKind::Auto)
    }

    /// An attestor for the TPM at `tcti` that attests with the EK `ek`.
    pub fn with_tcti_and_ek(tcti: &str, ek: EkKind) -> Self {
        Self {
            tcti: tcti.to_string(),
            ek,
            ak: None,
            agent_key: None,
        }
    }

    /// The EK choice.
    pub fn ek_kind(&self) -> EkKind {
        self.ek
    }
}

/// Checks a challenge's PCR list.
fn challenge_pcrs(pcrs: &[u8]) -> Result<BTreeSet<u8>, Error> {
    let set: BTreeSet<u8> = pcrs.iter().copied().collect();
    if set.is_empty() || set.iter().any(|&p| p >= 24) {
        return Err(Error::Protocol(
            "TPM challenge names no PCR or a PCR outside 0-23".into(),
        ));
    }
    Ok(set)
}

impl NodeAttestor for TpmAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }

    /// A new key in the TPM for each attestation (so each renewal rotates it).
    fn agent_key(&mut self) -> Result<Option<AgentKey>, Error> {
        let blob = Tpm::open(&self.tcti)?.create_agent_key()?;
        let key = std::sync::Arc::new(TpmAgentKey::new(&self.tcti, blob)?);
        self.agent_key = Some(key.clone());
        Ok(Some(AgentKey::Tpm(key)))
    }

    fn initial_evidence(&mut self) -> Result<Vec<u8>, Error> {
        let agent_key_pub = match &self.agent_key {
            Some(k) => k
                .blob()
                .public_area()
                .map_err(|e| Error::Config(format!("TPM agent key: {e}")))?,
            None => {
                return Err(Error::Protocol(
                    "TPM attestation needs the agent key made first".into(),
                ))
            }
        };
        let mut tpm = Tpm::open_with_ek(&self.tcti, self.ek)?;
        // An SVSM vTPM has no EK certificate: send none and let the CA decide.
        let ek_cert = tpm.ek_cert().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no EK certificate in the TPM; attesting without one");
            Vec::new()
        });
        let (ek_pub, ak) = tpm.ek_public_and_new_ak()?;
        let ak_pub = ak.public_bytes()?;
        self.ak = Some(ak);
        ztid_attestation::tpm::to_json(&InitialEvidence {
            ek_cert,
            ek_pub,
            ak_pub,
            agent_key_pub,
        })
    }

    /// A TPM challenge names no key: the evidence certifies the TPM-resident agent key
    /// itself (TPM2_Certify by the AK), and the CA certifies only a CSR whose key is that
    /// one, so evidence for a relayed challenge cannot serve another client's key.
    fn check_challenge(&self, challenge: &[u8], _agent_spki: &[u8]) -> Result<(), Error> {
        let c: Challenge = serde_json::from_slice(challenge)
            .map_err(|e| Error::Protocol(format!("malformed TPM challenge: {e}")))?;
        challenge_pcrs(&c.pcrs).map(|_| ())
    }

    fn answer(&mut self, challenge: &[u8], _agent_spki: &[u8]) -> Result<Vec<u8>, Error> {
        let c: Challenge = serde_json::from_slice(challenge)
            .map_err(|e| Error::Protocol(format!("malformed TPM challenge: {e}")))?;
        let pcrs = challenge_pcrs(&c.pcrs)?;
        let ak = self
            .ak
            .as_ref()
            .ok_or_else(|| Error::Protocol("TPM challenge before the initial evidence".into()))?;
        let key = self
            .agent_key
            .as_ref()
            .ok_or_else(|| Error::Protocol("TPM challenge before the agent key".into()))?;
        let mut tpm = Tpm::open(&self.tcti)?;
        let (secret, (quote, signature, values), (certify, certify_signature)) = tpm
            .activate_quote_and_certify(
                ak,
                key.blob(),
                &c.credential_blob,
                &c.encrypted_secret,
                &c.nonce,
                &pcrs,
            )?;
        let secret = Zeroizing::new(secret);
        ztid_attestation::tpm::to_json(&Answer {
            secret: secret.to_vec(),
            quote,
            signature,
            pcrs: values,
            certify,
            certify_signature,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Offline evidence

/// Captures offline evidence from the TPM at `tcti`: a new AK's quote over `nonce` of the
/// default PCRs (0-7).
pub fn capture_evidence(tcti: &str, nonce: &[u8]) -> Result<Vec<u8>, Error> {
    capture_evidence_with(tcti, nonce, &DEFAULT_PCRS.into_iter().collect())
}

/// [`capture_evidence`] for chosen sha256 PCRs.
pub fn capture_evidence_with(
    tcti: &str,
    nonce: &[u8],
    pcrs: &BTreeSet<u8>,
) -> Result<Vec<u8>, Error> {
    capture_evidence_with_ek(tcti, EkKind::Auto, nonce, pcrs)
}

/// [`capture_evidence_with`] with the EK `ek`.
pub fn capture_evidence_with_ek(
    tcti: &str,
    ek: EkKind,
    nonce: &[u8],
    pcrs: &BTreeSet<u8>,
) -> Result<Vec<u8>, Error> {
    let mut tpm = Tpm::open_with_ek(tcti, ek)?;
    let ek_cert = tpm.ek_cert()?;
    let (ek_pub, ak) = tpm.ek_public_and_new_ak()?;
    let (quote, signature, values) = tpm.quote(&ak, nonce, pcrs)?;
    let file = EvidenceFile {
        format: EVIDENCE_FORMAT.into(),
        ek_cert,
        ek_pub,
        ak_pub: ak.public_bytes()?,
        nonce: hex::encode(nonce),
        quote,
        signature,
        pcrs: values,
    };
    serde_json::to_vec_pretty(&file).map_err(|e| Error::Protocol(e.to_string()))
}
