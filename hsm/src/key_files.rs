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

/// Overwrites `path` with zeros in place, then unlinks it, so the key does not linger
/// in the file's old blocks (best effort: journaling or copy-on-write file systems
/// may keep copies). The file is not truncated first: truncation would free the
/// key's blocks and the zeros would land in new ones. A symlink is unlinked, never
/// followed.
pub(crate) fn shred(path: &Path, key_id: &str) -> Result<()> {
    use std::io::Write;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(key_id.to_string()))
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    if meta.file_type().is_file() {
        let len = usize::try_from(meta.len()).map_err(|_| Error::Corrupt {
            id: key_id.to_string(),
            reason: "key file too large".into(),
        })?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        file.write_all(&vec![0u8; len]).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
    }
    fs::remove_file(path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The physical offset of a file's first extent, from `filefrag -v` (FIEMAP); None
    /// where the tool or the file system cannot say (tmpfs, no e2fsprogs).
    fn first_physical_block(path: &Path) -> Option<String> {
        let out = std::process::Command::new("filefrag")
            .arg("-v")
            .arg(path)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let line = text.lines().find(|l| l.trim_start().starts_with("0:"))?;
        line.split_whitespace().nth(3).map(str::to_string)
    }

    #[test]
    fn shred_overwrites_the_key_blocks_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.p256.pk8");
        let key = [0x5au8; 138];
        fs::write(&path, key).unwrap();
        fs::File::open(&path).unwrap().sync_all().unwrap();
        let Some(before) = first_physical_block(&path) else {
            eprintln!("skipped: filefrag cannot map files here");
            return;
        };
        // Keep a hard link, so the inode (and its blocks) can be inspected after the unlink.
        let link = dir.path().join("inspect");
        fs::hard_link(&path, &link).unwrap();
        shred(&path, "k").unwrap();
        assert!(!path.exists());
        assert_eq!(fs::read(&link).unwrap(), vec![0u8; 138]);
        assert_eq!(
            first_physical_block(&link).as_deref(),
            Some(before.as_str()),
            "the zeros must land on the key's own blocks, not on newly allocated ones"
        );
        assert!(matches!(shred(&path, "k"), Err(Error::NotFound(_))));
    }

    #[test]
    fn shred_unlinks_a_symlink_without_touching_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("not-a-key");
        fs::write(&target, b"precious").unwrap();
        let path = dir.path().join("k.p256.pk8");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        shred(&path, "k").unwrap();
        assert!(fs::symlink_metadata(&path).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"precious");
    }
}
