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
//!    node API with it (`ztid_attestor::agent_key`). Its data directory holds only the
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
//! `ztid_attestor::tpm::capture_evidence` writes an [`EvidenceFile`] (JSON: EK
//! certificate, EK and AK public, nonce, quote, signature, PCR values); [`verify_offline`]
//! checks everything the online path checks except credential activation: the EK certificate (against
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
//! NV (`ztid_attestor::tpm_device`): RSA-2048 (0x01c00002), ECC P-256 (0x01c0000a) or ECC P-384 (high
//! range, 0x01c00016; what swtpm_setup provisions). `EkKind::Auto` (the default)
//! takes the RSA-2048 EK if its certificate is present, else P-256, else P-384;
//! `TpmAttestor::with_tcti_and_ek` picks one explicitly. The agent does not use
//! RSA-3072/4096 or P-521 EKs.
//!
//! # Limits
//! The quote's `qualifiedSigner` is not checked (it depends on the hierarchy above the
//! EK); the AK is identified by its public key instead. Offline evidence files carry no
//! agent key certification (they are for debugging PCR and EK refusals).

pub mod credential;
pub mod ekcert;
pub mod quote;

mod keys;
mod offline;
mod policy;
mod verifier;

pub use ztid_attestation::tpm::{
    b64_encode, ek_hash, wire, Answer, Challenge, EvidenceFile, InitialEvidence, CHALLENGE_TTL,
    DEFAULT_PCRS, EVIDENCE_FORMAT, MAX_MESSAGE, METHOD,
};

pub use keys::{check_agent_key, check_keys, verify_certification, CheckedKeys};
pub use offline::verify_offline;
pub use policy::{PcrPolicy, TpmPolicy};
pub use verifier::{selectors_for, TpmVerifier};
