//! The audit key: its id, kept in the audit directory's `key_id` file (the key itself
//! is in the key manager), made on the first start, and looked up with its verifier
//! by the offline verbs (`audit verify`, checkpoints).

use std::path::Path;

use ztid_hsm::{KeyAlgorithm, KeyManager};

use super::error::VerifyError;
use super::format::{AuditKeyVerifier, KEY_ID_FILE};
use super::log::io;
use crate::Result;

/// The audit key's id in `dir`, created (with the key) on first use when `create`.
pub(super) fn audit_key_id(
    dir: &Path,
    key_manager: &dyn KeyManager,
    create: bool,
) -> Result<String> {
    let key_file = dir.join(KEY_ID_FILE);
    match std::fs::read_to_string(&key_file) {
        Ok(id) => Ok(id.trim().to_string()),
        Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("audit-{}", crate::authority::random_hex(8)?);
            key_manager.generate(&id, KeyAlgorithm::EcdsaP256)?;
            std::fs::write(&key_file, &id).map_err(io(&key_file))?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(crate::Error::Precondition(format!(
                "{} is missing while the audit log in {} exists: restore it (it names the \
                 audit key in the key manager); a new key would verify none of the log",
                key_file.display(),
                dir.display()
            )))
        }
        Err(e) => Err(io(&key_file)(e)),
    }
}

/// The audit key's id and verifier for an existing audit directory (offline verbs).
pub(super) fn existing_key(
    dir: &Path,
    key_manager: &dyn KeyManager,
) -> std::result::Result<(String, AuditKeyVerifier, Vec<u8>), VerifyError> {
    let key_id = audit_key_id(dir, key_manager, false)
        .map_err(|e| VerifyError::AuditKey(format!("no audit key id in {}: {e}", dir.display())))?;
    let public = key_manager
        .public_key(&key_id)
        .map_err(|e| VerifyError::AuditKey(format!("audit key {key_id}: {e}")))?;
    Ok((key_id, AuditKeyVerifier::new(public.raw), public.spki_der))
}
