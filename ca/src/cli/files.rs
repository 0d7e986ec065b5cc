//! Files the CLI writes (`admin credential issue --write`, `audit checkpoint --out`):
//! always a fresh file (`O_CREAT|O_EXCL`, so never through a symlink nor into a file
//! someone else made) with the mode asked for, renamed over the old name once complete.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a file could not be written.
#[derive(Debug)]
pub(super) enum FileError {
    /// The path names no file in a directory (`/`, `..`, empty).
    NoFileName(PathBuf),
    /// Creating, writing or renaming failed.
    Io { path: PathBuf, err: std::io::Error },
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoFileName(p) => write!(f, "{}: not a file path", p.display()),
            Self::Io { path, err } => write!(f, "writing {}: {err}", path.display()),
        }
    }
}

impl From<FileError> for String {
    fn from(e: FileError) -> Self {
        e.to_string()
    }
}

/// Writes `data` to `dir/name` with `mode`: a new file next to it, renamed over
/// `name` once complete (an old file, its mode, owner or symlink, does not carry over).
pub(super) fn write_new(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| FileError::Io { path, err }
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // The mode asked for, whatever the umask.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(data))
        .and_then(|_| f.sync_all())
        .map_err(io(&tmp))?;
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FileError::Io { path: dest, err: e }
    })
}

/// [`write_new`] for a full path.
pub(super) fn replace_file(path: &Path, data: &[u8], mode: u32) -> Result<(), FileError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| FileError::NoFileName(path.to_path_buf()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    write_new(dir, name, data, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    #[test]
    fn replace_file_never_writes_through_a_symlink_nor_into_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let link = dir.path().join("cp.json");
        symlink(&victim, &link).unwrap();
        replace_file(&link, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.file_type().is_file(), "the symlink itself is replaced");
        assert_eq!(std::fs::read(&link).unwrap(), b"new");

        // An existing loose-mode file is replaced by a new one with the mode asked for.
        let loose = dir.path().join("loose");
        std::fs::write(&loose, "old").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o666)).unwrap();
        let before = std::fs::metadata(&loose).unwrap().ino();
        replace_file(&loose, b"secret", 0o600).unwrap();
        let after = std::fs::metadata(&loose).unwrap();
        assert_ne!(after.ino(), before, "a new file, not the old one rewritten");
        assert_eq!(after.mode() & 0o777, 0o600);
    }

    #[test]
    fn replace_file_refuses_a_path_without_a_file_name() {
        let e = replace_file(Path::new("/"), b"x", 0o644).unwrap_err();
        assert!(matches!(e, FileError::NoFileName(_)), "{e}");
    }
}
