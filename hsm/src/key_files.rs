//! Key managers that keep one file per key in a directory (software keys, TPM blobs):
//! listing them and destroying one.

use std::fs;
use std::path::Path;

use crate::{validate_key_id, Error, Result};

/// Maps an I/O error on `path` to the crate's error.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The key ids of the `<id><suffix>` files in `dir`, sorted; other files are ignored.
pub(crate) fn list(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(suffix))
        {
            if validate_key_id(id).is_ok() {
                ids.push(id.to_string());
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// Overwrites `path` with zeros, then unlinks it, so the key does not linger in the
/// file's old blocks (best effort: journaling file systems may keep copies).
pub(crate) fn shred(path: &Path, key_id: &str) -> Result<()> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len() as usize,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(key_id.to_string()))
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    fs::write(path, vec![0u8; len]).map_err(io_err(path))?;
    fs::remove_file(path).map_err(io_err(path))
}
