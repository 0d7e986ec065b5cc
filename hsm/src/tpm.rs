//! TPM-resident keys: ECDSA P-256 signing keys created inside a TPM 2.0 through
//! `tss-esapi`, under the owner hierarchy's storage primary key (SRK).
//!
//! The SRK is recreated from the standard ECC P-256 storage template for every
//! operation (the TPM derives it deterministically from the owner seed) and flushed
//! afterwards, so nothing has to be made persistent in the TPM. Each key is created
//! `sign`, not `decrypt`, not `restricted`, `fixedTPM`, `fixedParent`,
//! `sensitiveDataOrigin`, `userWithAuth` with an empty auth value; the TPM returns its
//! public area and its private area *encrypted under the SRK*, and both are stored in
//! `dir/<key_id>.tpmkey` (mode 0600). The blob is useless off this TPM (or after the
//! owner hierarchy is cleared).
//!
//! Signing loads the blob under the SRK, asks for `TPM2_Sign` (ECDSA/SHA-256) over a
//! SHA-256 digest computed here (with a null hash-check ticket: the key is not
//! restricted), and flushes the key and the SRK. Without a resource manager (swtpm)
//! the TPM has only three transient object slots, so every object and session is
//! flushed before the call that created it returns, on success and on error alike.
//!
//! Threads: one ESAPI context per manager, behind a mutex (contexts are not `Sync`,
//! and a TPM runs one command at a time anyway).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;

use crate::{
    fixed_to_der, p256_spki_from_point, validate_key_id, Error, KeyAlgorithm, KeyManager,
    PublicKey, Result, SignatureFormat,
};

const SUFFIX: &str = ".tpmkey";
/// File magic and format version of a `.tpmkey` file.
const MAGIC: &[u8; 8] = b"ZTIDTPM1";

use crate::key_files::io_err;

fn tpm_err(operation: &'static str) -> impl FnOnce(tss_esapi::Error) -> Error {
    move |e| Error::Tpm {
        operation,
        reason: e.to_string(),
    }
}

/// A TPM-resident key as stored: the TPM's public area and its private area wrapped
/// by the SRK (usable only by the TPM that made it).
#[derive(Debug, Clone)]
pub struct TpmKeyBlob {
    public: Public,
    private: Private,
}

/// The historical name inside this module.
type Blob = TpmKeyBlob;

impl TpmKeyBlob {
    /// The `.tpmkey` encoding (magic, public area, wrapped private area).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let public = self
            .public
            .marshall()
            .map_err(tpm_err("marshalling a key's public area"))?;
        let private = self.private.value();
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + public.len() + private.len());
        out.extend_from_slice(MAGIC);
        for part in [&public[..], private] {
            let len = u16::try_from(part.len()).map_err(|_| Error::Crypto("TPM blob too long"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    /// Parses [`TpmKeyBlob::encode`]'s output; `key_id` names the key in errors.
    pub fn decode(key_id: &str, bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: &str| Error::Corrupt {
            id: key_id.to_string(),
            reason: reason.to_string(),
        };
        let rest = bytes
            .strip_prefix(&MAGIC[..])
            .ok_or_else(|| corrupt("not a ztid TPM key file"))?;
        /// One part: a big-endian u16 length and that many bytes; None if truncated.
        fn take_part(rest: &[u8]) -> Option<(&[u8], &[u8])> {
            let (len, rest) = rest.split_first_chunk::<2>()?;
            rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))
        }
        let (public, rest) = take_part(rest).ok_or_else(|| corrupt("truncated"))?;
        let (private, rest) = take_part(rest).ok_or_else(|| corrupt("truncated"))?;
        if !rest.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        let public =
            Public::unmarshall(public).map_err(|e| corrupt(&format!("bad public area: {e}")))?;
        let private = Private::try_from(private.to_vec())
            .map_err(|e| corrupt(&format!("bad private area: {e}")))?;
        Ok(Self { public, private })
    }

    /// The key's marshalled `TPMT_PUBLIC` (what a TPM name is computed over).
    pub fn public_area(&self) -> Result<Vec<u8>> {
        self.public
            .marshall()
            .map_err(tpm_err("marshalling a key's public area"))
    }

    /// The key's public half; `key_id` names the key in errors.
    pub fn public_key(&self, key_id: &str) -> Result<PublicKey> {
        let Public::Ecc { unique, .. } = &self.public else {
            return Err(Error::Corrupt {
                id: key_id.to_string(),
                reason: "not an ECC key".into(),
            });
        };
        let mut raw = Vec::with_capacity(65);
        raw.push(0x04);
        for coord in [unique.x().value(), unique.y().value()] {
            raw.extend_from_slice(&left_pad_32(coord).ok_or_else(|| Error::Corrupt {
                id: key_id.to_string(),
                reason: "not a P-256 point".into(),
            })?);
        }
        Ok(PublicKey {
            algorithm: KeyAlgorithm::EcdsaP256,
            spki_der: p256_spki_from_point(&raw)?,
            raw,
        })
    }
}

/// A big-endian P-256 field element padded to 32 bytes (TPMs may drop leading zeros).
fn left_pad_32(mut v: &[u8]) -> Option<[u8; 32]> {
    while let [0, rest @ ..] = v {
        v = rest;
    }
    let mut out = [0u8; 32];
    // None when v is longer than 32 bytes.
    out.get_mut(32usize.checked_sub(v.len())?..)?
        .copy_from_slice(v);
    Some(out)
}

/// The standard ECC P-256 storage primary key template (TCG TPM v2.0 Provisioning
/// Guidance, SRK): restricted decryption, AES-128-CFB, SHA-256 name, noDA, empty auth.
fn srk_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .with_sign_encrypt(false)
        .build()
        .map_err(tpm_err("building the SRK attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(tpm_err("building the SRK parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tpm_err("building the SRK template"))
}

/// The template of a signing key: ECDSA P-256 with SHA-256, unrestricted, sign only.
fn signing_key_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(false)
        .with_decrypt(false)
        .with_sign_encrypt(true)
        .build()
        .map_err(tpm_err("building the key attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .map_err(tpm_err("building the key parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tpm_err("building the key template"))
}

/// Runs `f` with the SRK created; flushes it afterwards (also when `f` fails).
pub fn with_srk<T>(
    ctx: &mut Context,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T>,
) -> Result<T> {
    let template = srk_template()?;
    let srk = ctx
        .execute_with_nullauth_session(|c| {
            c.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .map_err(tpm_err("creating the storage primary key"))?
        .key_handle;
    let r = f(ctx, srk);
    let flushed = ctx
        .flush_context(ObjectHandle::from(srk))
        .map_err(tpm_err("flushing the storage primary key"));
    let v = r?;
    flushed?;
    Ok(v)
}

/// Creates an unrestricted ECDSA P-256 signing key (fixedTPM, fixedParent,
/// sensitiveDataOrigin) under the SRK of the TPM behind `ctx`.
pub fn create_key(ctx: &mut Context) -> Result<TpmKeyBlob> {
    let template = signing_key_template()?;
    let r = with_srk(ctx, |c, srk| {
        c.execute_with_nullauth_session(|c| c.create(srk, template, None, None, None, None))
            .map_err(tpm_err("creating the signing key"))
    })?;
    Ok(TpmKeyBlob {
        public: r.out_public,
        private: r.out_private,
    })
}

/// Loads `blob` under the SRK and flushes the SRK, so the key takes one transient slot.
/// The caller flushes the returned handle. `key_id` names the key in errors.
pub fn load_key(ctx: &mut Context, blob: &TpmKeyBlob, key_id: &str) -> Result<KeyHandle> {
    with_srk(ctx, |c, srk| {
        c.execute_with_nullauth_session(|c| c.load(srk, blob.private.clone(), blob.public.clone()))
            .map_err(|e| Error::Corrupt {
                id: key_id.to_string(),
                reason: format!(
                    "this TPM cannot load the key (made by another TPM, or the owner hierarchy was cleared?): {e}"
                ),
            })
    })
}

/// Signs SHA-256(`message`) with a loaded key; returns the fixed-size `r || s`.
pub fn sign_loaded(ctx: &mut Context, key: KeyHandle, message: &[u8]) -> Result<Vec<u8>> {
    let hash = ring::digest::digest(&ring::digest::SHA256, message);
    let digest =
        Digest::try_from(hash.as_ref().to_vec()).map_err(tpm_err("preparing the digest"))?;
    let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
    .map_err(tpm_err("preparing the null hash-check ticket"))?;
    let signature = ctx
        .execute_with_nullauth_session(|c| c.sign(key, digest, SignatureScheme::Null, ticket))
        .map_err(tpm_err("signing"))?;
    let Signature::EcDsa(sig) = signature else {
        return Err(Error::Crypto("the TPM returned a non-ECDSA signature"));
    };
    let bad = || Error::Crypto("the TPM returned a malformed ECDSA signature");
    let mut fixed = Vec::with_capacity(64);
    fixed.extend_from_slice(&left_pad_32(sig.signature_r().value()).ok_or_else(bad)?);
    fixed.extend_from_slice(&left_pad_32(sig.signature_s().value()).ok_or_else(bad)?);
    Ok(fixed)
}

/// Loads `blob`, signs SHA-256(`message`) with it and flushes it (also on error).
pub fn sign_with_blob(
    ctx: &mut Context,
    blob: &TpmKeyBlob,
    key_id: &str,
    message: &[u8],
) -> Result<Vec<u8>> {
    let key = load_key(ctx, blob, key_id)?;
    let r = sign_loaded(ctx, key, message);
    let flushed = ctx
        .flush_context(ObjectHandle::from(key))
        .map_err(tpm_err("flushing the signing key"));
    let v = r?;
    flushed?;
    Ok(v)
}

/// Keys created in one TPM, their wrapped blobs in one directory.
pub struct TpmKeyManager {
    dir: PathBuf,
    ctx: Mutex<Context>,
}

impl TpmKeyManager {
    /// Connects to the TPM through a TCTI string (`device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`, `mssim:…`) and opens (creating it
    /// owner-only if needed) the blob directory.
    pub fn open(tcti: &str, dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let conf = TctiNameConf::from_str(tcti).map_err(|e| Error::Tpm {
            operation: "parsing the TCTI",
            reason: format!("{tcti:?}: {e}"),
        })?;
        let ctx = Context::new(conf).map_err(|e| Error::Tpm {
            operation: "opening the TPM",
            reason: format!("{tcti}: {e}"),
        })?;
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        Ok(Self {
            dir,
            ctx: Mutex::new(ctx),
        })
    }

    fn path_of(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}{SUFFIX}"))
    }

    fn read_blob(&self, key_id: &str) -> Result<Blob> {
        validate_key_id(key_id)?;
        let path = self.path_of(key_id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(key_id.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        Blob::decode(key_id, &bytes)
    }

    fn ctx(&self) -> Result<std::sync::MutexGuard<'_, Context>> {
        self.ctx.lock().map_err(|_| Error::Crypto("lock poisoned"))
    }
}

impl KeyManager for TpmKeyManager {
    fn generate(&self, key_id: &str, algorithm: KeyAlgorithm) -> Result<PublicKey> {
        validate_key_id(key_id)?;
        let KeyAlgorithm::EcdsaP256 = algorithm;
        let path = self.path_of(key_id);
        // create_new: never overwrite a key; mode 0600 from the first byte written.
        // The file is claimed before the TPM works, and removed if that fails.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::AlreadyExists(key_id.to_string())
                } else {
                    io_err(&path)(e)
                }
            })?;
        let created = (|| {
            let blob = create_key(&mut *self.ctx()?)?;
            let public = blob.public_key(key_id)?;
            file.write_all(&blob.encode()?).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            Ok(public)
        })();
        if created.is_err() {
            let _ = fs::remove_file(&path);
        }
        let public = created?;
        tracing::info!(key_id, backend = "tpm", "generated signing key");
        Ok(public)
    }

    fn public_key(&self, key_id: &str) -> Result<PublicKey> {
        self.read_blob(key_id)?.public_key(key_id)
    }

    fn sign(&self, key_id: &str, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>> {
        let blob = self.read_blob(key_id)?;
        let fixed = sign_with_blob(&mut *self.ctx()?, &blob, key_id, message)?;
        match format {
            SignatureFormat::Fixed => Ok(fixed),
            SignatureFormat::Der => fixed_to_der(&fixed),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        crate::key_files::list(&self.dir, SUFFIX)
    }

    fn destroy(&self, key_id: &str) -> Result<()> {
        validate_key_id(key_id)?;
        let path = self.path_of(key_id);
        crate::key_files::shred(&path, key_id)?;
        tracing::info!(key_id, backend = "tpm", "destroyed signing key");
        Ok(())
    }

    fn backend_name(&self) -> &'static str {
        "tpm"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manager_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TpmKeyManager>();
    }

    #[test]
    fn pads_and_rejects_field_elements() {
        assert_eq!(left_pad_32(&[1, 2]).unwrap()[30..], [1, 2]);
        let mut long = vec![0u8];
        long.extend([9u8; 32]);
        assert_eq!(left_pad_32(&long).unwrap(), [9u8; 32]);
        assert!(left_pad_32(&[1u8; 33]).is_none());
    }

    #[test]
    fn corrupt_files_are_rejected() {
        assert!(matches!(
            Blob::decode("k", b"garbage"),
            Err(Error::Corrupt { .. })
        ));
        let mut b = MAGIC.to_vec();
        b.extend([0, 5, 1]);
        assert!(matches!(Blob::decode("k", &b), Err(Error::Corrupt { .. })));
    }
}
