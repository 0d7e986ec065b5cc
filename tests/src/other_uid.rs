//! Running test programs as another uid, wherever the checkout lives.
//!
//! A test that acts as another user (a workload with no entry, a pid-reuse attacker)
//! must not execute `target/debug/…` in place: the checkout may sit in a directory
//! other users cannot traverse (root's home is 0700). [`Staging`] copies what that uid
//! runs into a fresh directory every uid can traverse, under a temporary directory that
//! is itself reachable, and checks once, by running a probe as that uid, that it can.
//! When that cannot be arranged it panics with one line saying what is wrong, instead of
//! failing deep inside a test with `PermissionDenied`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The uid and gid of `nobody`: a user with no entry anywhere.
pub const NOBODY: u32 = 65534;

/// True when this process may switch to another uid (it runs as root).
pub fn can_switch_uid() -> bool {
    crate::nix_uid() == 0
}

/// True when every directory from `/` down to `dir` lets other users traverse it.
fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// A temporary directory other uids can reach: `$TMPDIR` if its whole path is
/// traversable, else `/tmp`, `/var/tmp` or `/dev/shm`. Chosen once per test process.
fn reachable_temp_root() -> Result<&'static Path, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let candidates = [
            std::env::temp_dir(),
            PathBuf::from("/tmp"),
            PathBuf::from("/var/tmp"),
            PathBuf::from("/dev/shm"),
        ];
        candidates
            .iter()
            .find(|d| d.is_dir() && traversable_by_others(d))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "no temporary directory that other users can traverse ({} and /tmp, /var/tmp, /dev/shm are not): \
                     tests that run as another uid need one",
                    std::env::temp_dir().display()
                )
            })
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(Clone::clone)
}

/// A scratch directory (mode 0755) in a temporary directory other uids can traverse when
/// there is one, so sockets in it (an agent's Workload API) are reachable by other uids
/// whatever `$TMPDIR` is.
pub fn scratch_dir() -> tempfile::TempDir {
    let dir = match reachable_temp_root() {
        Ok(root) => tempfile::Builder::new()
            .prefix("ztid-test-")
            .tempdir_in(root),
        Err(_) => tempfile::tempdir(),
    }
    .expect("scratch directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("scratch directory mode");
    dir
}

/// A directory of programs and sockets another uid can reach; removed on drop.
pub struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    /// A fresh staging directory (mode 0755) checked to be reachable by `uid`. Panics
    /// with one line when this process is not root or no reachable place exists.
    pub fn new(uid: u32) -> Self {
        assert!(
            can_switch_uid(),
            "tests that run as another uid must run as root (they switch uid); this runs as uid {}",
            crate::nix_uid()
        );
        let root = reachable_temp_root().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("ztid-other-uid-")
            .tempdir_in(root)
            .unwrap_or_else(|e| {
                panic!("cannot make a staging directory in {}: {e}", root.display())
            });
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot open {} to other users: {e}", dir.path().display()));
        let staging = Self { dir };
        staging.check_reachable(uid);
        staging
    }

    /// The staging directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new subdirectory (mode 0755) for sockets or files that uid must reach.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).expect("staging subdirectory");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
            .expect("staging subdirectory mode");
        d
    }

    /// Copies the built binary `name` (see [`crate::bin`]) here, mode 0755, and returns
    /// its path. A later call for the same name returns the same copy.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.file(&crate::bin(name))
    }

    /// Copies any file (a script, a binary) here, mode 0755, and returns its path.
    pub fn file(&self, src: &Path) -> PathBuf {
        let name = src.file_name().expect("a file name");
        let dst = self.dir.path().join(name);
        if !dst.exists() {
            std::fs::copy(src, &dst)
                .unwrap_or_else(|e| panic!("cannot stage {}: {e}", src.display()));
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
                .expect("staged file mode");
        }
        dst
    }

    /// A command running `program` as `uid`:`gid`, from inside the staging directory.
    pub fn command_as(&self, program: &Path, uid: u32, gid: u32) -> Command {
        let mut c = Command::new(program);
        c.current_dir(self.dir.path()).uid(uid).gid(gid);
        c
    }

    /// Runs `test -r` on the staging directory as `uid`: the one check that says, in one
    /// line, why running as that uid cannot work here.
    fn check_reachable(&self, uid: u32) {
        let probe = self.dir.path().join(".probe");
        std::fs::write(&probe, b"").expect("probe file");
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644))
            .expect("probe mode");
        let ok = Command::new("/bin/sh")
            .args(["-c", "test -r \"$0\""])
            .arg(&probe)
            .uid(uid)
            .gid(uid)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "uid {uid} cannot reach {} (check the modes of its parent directories)",
            self.dir.path().display()
        );
    }
}

/// `cmd.spawn()`, tried again while the program is "text file busy" (ETXTBSY). A
/// program staged a moment ago was open for writing, and a child that another test
/// thread forked in that moment holds that descriptor until its own exec closes it
/// (close-on-exec); exec of the staged file fails until then. Bounded: 200 tries,
/// 5 ms apart (1 s), after which the error is returned.
pub fn spawn_staged(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    const ETXTBSY: i32 = 26;
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && tries < 200 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// `cmd.output()` through [`spawn_staged`]: stdout and stderr captured.
pub fn output_staged(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn_staged(cmd)?.wait_with_output()
}
