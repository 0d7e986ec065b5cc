//! Files the CLI writes (`admin credential issue --write`, `audit checkpoint --out`):
//! always a fresh file (`O_CREAT|O_EXCL`, so never through a symlink nor into a file
//! someone else made) with the mode asked for, renamed over the old name once complete.
//! Files it reads (bundles, entries) are read up to a bound, whatever the path names
//! (a huge file, `/dev/zero`, a FIFO that never ends).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a file could not be written, or read within its bound.
#[derive(Debug)]
pub(super) enum FileError {
    /// The path names no file in a directory (`/`, `..`, empty).
    NoFileName(PathBuf),
    /// A directory the files go into, or one above it, is writable by another user (or
    /// belongs to one): they could replace the files once written.
    UnsafeDirectory { dir: PathBuf, owner: u32, mode: u32 },
    /// The directory is a symlink (it could be pointed elsewhere between check and use).
    SymlinkDirectory(PathBuf),
    /// Creating, writing or renaming failed.
    Io { path: PathBuf, err: std::io::Error },
    /// Opening or reading a file the admin named failed.
    Unreadable { path: PathBuf, err: std::io::Error },
    /// A file the admin named holds more than the command reads.
    TooLarge { path: PathBuf, max: u64 },
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoFileName(p) => write!(f, "{}: not a file path", p.display()),
            Self::UnsafeDirectory { dir, owner, mode } => write!(
                f,
                "{}: belongs to uid {owner} with mode {mode:04o}; another user could replace the files written there: use a directory only you (or root) can write",
                dir.display()
            ),
            Self::SymlinkDirectory(p) => write!(
                f,
                "{}: is a symlink; name the directory itself",
                p.display()
            ),
            Self::Io { path, err } => write!(f, "writing {}: {err}", path.display()),
            Self::Unreadable { path, err } => write!(f, "cannot read {}: {err}", path.display()),
            Self::TooLarge { path, max } => write!(
                f,
                "{} holds more than {max} bytes, the most this command reads",
                path.display()
            ),
        }
    }
}

impl From<FileError> for String {
    fn from(e: FileError) -> Self {
        e.to_string()
    }
}

/// The most an entries file (`entry create|delete --data`) may hold: a million
/// entries of SPIRE's JSON shape fit.
pub(super) const MAX_ENTRIES_FILE_BYTES: u64 = 256 << 20;

/// Reads `path` whole if it holds at most `max` bytes; refuses it otherwise, before
/// reading more than `max + 1` bytes of it.
pub(super) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    let unreadable = |err| FileError::Unreadable {
        path: path.to_path_buf(),
        err,
    };
    let f = std::fs::File::open(path).map_err(unreadable)?;
    let mut data = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(unreadable)?;
    if data.len() as u64 > max {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(data)
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

/// Checks that `dir` and every directory above it can be written only by this user or
/// root (a world-writable sticky directory such as /tmp is fine above it), and that
/// `dir` itself is no symlink: nobody else can replace what is written into it.
pub(super) fn check_private_dir(dir: &Path) -> Result<(), FileError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| FileError::Io { path, err }
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if meta.file_type().is_symlink() {
        return Err(FileError::SymlinkDirectory(dir.to_path_buf()));
    }
    let me = nix::unistd::geteuid().as_raw();
    let abs = std::fs::canonicalize(dir).map_err(io(dir))?;
    for (i, d) in abs.ancestors().enumerate() {
        let m = std::fs::metadata(d).map_err(io(d))?;
        let mode = m.mode() & 0o7777;
        let trusted_owner = m.uid() == me || m.uid() == 0;
        let others_write = mode & 0o022 != 0;
        // Above the directory itself, a sticky directory lets nobody else rename or
        // remove what this user made in it.
        let sticky = i > 0 && mode & 0o1000 != 0;
        if !trusted_owner || (others_write && !sticky) {
            return Err(FileError::UnsafeDirectory {
                dir: d.to_path_buf(),
                owner: m.uid(),
                mode,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

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

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("creds");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_private_dir(&d).unwrap();

        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_private_dir(&d).unwrap_err();
        assert!(
            matches!(&e, FileError::UnsafeDirectory { dir, mode: 0o777, .. } if dir.ends_with("creds")),
            "{e}"
        );
        // Sticky on the directory itself does not help: others could still add files.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(matches!(
            check_private_dir(&d),
            Err(FileError::UnsafeDirectory { .. })
        ));
    }

    #[test]
    fn a_directory_another_user_owns_or_a_symlinked_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("creds");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.path().join("link");
        symlink(&d, &link).unwrap();
        assert!(matches!(
            check_private_dir(&link),
            Err(FileError::SymlinkDirectory(_))
        ));
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
            let e = check_private_dir(&d).unwrap_err();
            assert!(
                matches!(e, FileError::UnsafeDirectory { owner: 4242, .. }),
                "{e}"
            );
        }
    }

    #[test]
    fn a_file_over_the_bound_is_refused_before_it_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"12345").unwrap();
        assert_eq!(read_bounded(&small, 5).unwrap(), b"12345");
        let e = read_bounded(&small, 4).unwrap_err();
        assert!(matches!(e, FileError::TooLarge { max: 4, .. }), "{e}");
        assert!(e.to_string().contains("holds more than 4 bytes"), "{e}");
        // A device that never ends is refused at the bound, not read forever.
        let e = read_bounded(Path::new("/dev/zero"), 1 << 10).unwrap_err();
        assert!(matches!(e, FileError::TooLarge { max: 1024, .. }), "{e}");
        let e = read_bounded(&dir.path().join("missing"), 5).unwrap_err();
        assert!(
            matches!(&e, FileError::Unreadable { err, .. } if err.kind() == std::io::ErrorKind::NotFound),
            "{e}"
        );
        assert!(e.to_string().starts_with("cannot read"), "{e}");
    }
}
