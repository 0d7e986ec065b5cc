//! Who is calling on the Workload API socket, decided by the kernel, not by the caller.
//!
//! A connection is bound, when it is accepted, to the process that made it:
//!
//! - `SO_PEERCRED` gives the uid, gid and pid the kernel recorded at `connect(2)`;
//! - `SO_PEERPIDFD` (Linux 6.5+) gives a pidfd for that very process: it can never come to
//!   mean another one, and polls readable once that process has exited;
//! - `/proc/<pid>` gives its start time, its executable (device and inode, path, SHA-256)
//!   and so its selectors. The pidfd is polled *after* these reads: a process still
//!   running then held its pid throughout, so everything read was its own.
//!
//! Every request then re-checks, with [`PeerProcess::check`], that this process still runs
//! unchanged: not exited (pidfd), same start time, same executable (an exec changes it),
//! and still the effective uid and gid it connected with (a setuid exec or a privilege
//! drop changes them). Anything else gets the request nothing, with a [`PeerRefusal`]
//! saying why.
//!
//! Without `SO_PEERPIDFD` (kernels before 6.5) the binding is the pid and the start time
//! read at accept: a peer that exits and whose pid is taken by a new process before the
//! agent's accept-time read cannot be told apart from that new process.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use ring::digest;

use crate::{Error, Selector};

/// One process instance: a pid only means something together with its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessInstance {
    /// The process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// Reads a small `/proc` file whole. `/proc` files report a size of 0, so
/// [`fs::read_to_string`] asks for the size (`statx`), then starts with a 32-byte buffer
/// and doubles it: 6 `read` calls for a `stat` file, 8 for `status`. Here a 4 KiB buffer
/// from the start (and no size query: `take` hides the file) takes one `read` for the
/// content and one to see the end.
fn read_proc_file(path: &str) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut s = String::with_capacity(4096);
    (&mut f).take(u64::MAX).read_to_string(&mut s)?;
    Ok(s)
}

/// Reads the start time of `pid`, or an error if the process is gone.
pub fn process_start_time(pid: i32) -> Result<u64, Error> {
    let stat = read_proc_file(&format!("/proc/{pid}/stat"))
        .map_err(|e| Error::WorkloadAttestation(format!("process {pid} is gone: {e}")))?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| Error::WorkloadAttestation(format!("unreadable /proc/{pid}/stat")))?;
    // after ')' come fields 3.. ; start time is field 22, so index 22 - 3 = 19.
    after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::WorkloadAttestation(format!("unreadable /proc/{pid}/stat")))
}

/// The file a process runs: an exec replaces it (unless the same file is exec'd again,
/// which gives the same selectors). Renaming or deleting the file does not change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeIdentity {
    /// Device of the executable.
    pub dev: u64,
    /// Inode of the executable.
    pub ino: u64,
}

/// The executable `pid` runs now (through `/proc/<pid>/exe`, so a replaced path does not
/// matter).
///
/// `AT_STATX_DONT_SYNC`: an inode's device and number never change, so there is nothing
/// to ask the filesystem, and FUSE and network filesystems (NFS, CIFS, Ceph) then answer
/// from the inode in memory: a workload running its program from its own FUSE mount (or
/// a hung NFS server) cannot stall the check of its connection. The device is encoded as
/// `stat`'s `st_dev`, so it compares with [`fs::metadata`].
pub fn exe_identity(pid: i32) -> std::io::Result<ExeIdentity> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let x = statx(
        CWD,
        format!("/proc/{pid}/exe"),
        AtFlags::STATX_DONT_SYNC,
        StatxFlags::INO,
    )?;
    Ok(ExeIdentity {
        dev: rustix::fs::makedev(x.stx_dev_major, x.stx_dev_minor),
        ino: x.stx_ino,
    })
}

/// Filesystems the kernel serves itself, from local storage or memory (or, for
/// `virtiofs`, from the host), whose files the agent opens and reads to name an executable
/// (`unix:path`, `unix:sha256`). Any other (FUSE, NFS, CIFS, ...) is answered by a process
/// or a server that may never answer: an open or a lookup there could hold the attestation,
/// and its slot, for as long as that process likes. A workload's executable elsewhere gets
/// neither selector (a warning says why).
pub const READABLE_FILESYSTEMS: &[&str] = &[
    "bcachefs", "btrfs", "erofs", "exfat", "ext2", "ext3", "ext4", "f2fs", "hfsplus", "iso9660",
    "jfs", "msdos", "nilfs2", "ntfs3", "overlay", "ramfs", "squashfs", "tmpfs", "udf", "vfat",
    "virtiofs", "xfs", "zfs",
];

/// Bytes of `/proc/<pid>/mountinfo` read, at most (about 25,000 mounts).
const MAX_MOUNTINFO_BYTES: u64 = 4 << 20;
/// Mount namespaces whose mount table is kept (each holds an open `mountinfo`); the one
/// used least recently makes room.
const MAX_CACHED_MOUNT_NAMESPACES: usize = 64;

/// One mount namespace's mount types by mount ID, read from a `mountinfo` file kept
/// open: the kernel marks it (`POLLPRI`) whenever that namespace's mounts change, so the
/// table is read again only then. Reading `mountinfo` costs tens of microseconds (more
/// with every mount), on every new connection otherwise.
struct NamespaceMounts {
    file: fs::File,
    types: HashMap<u64, String>,
    used: std::time::Instant,
}

impl NamespaceMounts {
    fn open(pid: i32) -> std::io::Result<Self> {
        let mut this = Self {
            file: fs::File::open(format!("/proc/{pid}/mountinfo"))?,
            types: HashMap::new(),
            used: std::time::Instant::now(),
        };
        this.read()?;
        Ok(this)
    }

    /// Reads the table again: after [`NamespaceMounts::changed`] said so (the poll that
    /// reports a change also clears the mark), or when a mount ID is missing.
    fn read(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        self.file.rewind()?;
        let mut text = String::with_capacity(8192);
        (&self.file)
            .take(MAX_MOUNTINFO_BYTES + 1)
            .read_to_string(&mut text)?;
        if text.len() as u64 > MAX_MOUNTINFO_BYTES {
            return Err(std::io::Error::other(format!(
                "mountinfo is larger than {MAX_MOUNTINFO_BYTES} bytes"
            )));
        }
        self.types = mount_types(&text);
        Ok(())
    }

    /// Whether the namespace's mounts changed since the table was read.
    fn changed(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLPRI)];
        // Unknown counts as changed: the table is read again.
        poll(&mut fds, PollTimeout::ZERO).map_or(true, |n| {
            n > 0
                && fds[0]
                    .revents()
                    .is_none_or(|r| r.intersects(PollFlags::POLLPRI | PollFlags::POLLERR))
        })
    }
}

static MOUNT_NAMESPACES: std::sync::Mutex<Option<HashMap<(u64, u64), NamespaceMounts>>> =
    std::sync::Mutex::new(None);

/// The type of the filesystem `pid`'s executable lives on: the mount ID `statx` gives
/// (from the mount, without asking the filesystem), looked up in the mount table of the
/// process's mount namespace (`/proc/<pid>/mountinfo`, which the kernel writes; kept per
/// namespace, read again when its mounts change). Mount IDs are unique among the mounts
/// that exist.
pub fn exe_filesystem(pid: i32) -> std::io::Result<String> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let x = statx(
        CWD,
        format!("/proc/{pid}/exe"),
        AtFlags::STATX_DONT_SYNC,
        StatxFlags::MNT_ID,
    )?;
    if x.stx_mask & StatxFlags::MNT_ID.bits() == 0 {
        return Err(std::io::Error::other(
            "the kernel gives no mount ID (before Linux 5.8)",
        ));
    }
    let namespace = namespace_identity(&format!("/proc/{pid}/ns/mnt"))?;
    let mut guard = MOUNT_NAMESPACES
        .lock()
        .map_err(|_| std::io::Error::other("mount table cache lock poisoned"))?;
    let cache = guard.get_or_insert_with(HashMap::new);
    let mounts = match cache.entry(namespace) {
        std::collections::hash_map::Entry::Occupied(e) => {
            let m = e.into_mut();
            // Checked again after the lookup below too: a mount made meanwhile is read.
            if m.changed() {
                m.read()?;
            }
            m
        }
        std::collections::hash_map::Entry::Vacant(e) => e.insert(NamespaceMounts::open(pid)?),
    };
    mounts.used = std::time::Instant::now();
    let mut found = mounts.types.get(&x.stx_mnt_id).cloned();
    if found.is_none() || mounts.changed() {
        mounts.read()?;
        found = mounts.types.get(&x.stx_mnt_id).cloned();
    }
    if cache.len() > MAX_CACHED_MOUNT_NAMESPACES {
        if let Some(oldest) = cache.iter().min_by_key(|(_, m)| m.used).map(|(k, _)| *k) {
            cache.remove(&oldest);
        }
    }
    found.ok_or_else(|| {
        std::io::Error::other(format!(
            "mount {} is not in /proc/{pid}/mountinfo",
            x.stx_mnt_id
        ))
    })
}

/// Mount types by mount ID, from a `mountinfo` text: each line is "ID PARENT MAJ:MIN
/// ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPEROPTIONS", its paths with
/// spaces escaped (so " - " only ever separates).
fn mount_types(mountinfo: &str) -> HashMap<u64, String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let id: u64 = head.split(' ').next()?.parse().ok()?;
            Some((id, tail.split(' ').next()?.to_string()))
        })
        .collect()
}

/// Why the agent does not open `pid`'s executable, if it may not.
fn exe_unreadable(pid: i32) -> Option<String> {
    match exe_filesystem(pid) {
        Ok(fs) if READABLE_FILESYSTEMS.contains(&fs.as_str()) => None,
        Ok(fs) => Some(format!(
            "its executable is on a {fs} filesystem, which a process or a server answers              (the agent opens executables only on filesystems the kernel serves itself)"
        )),
        Err(e) => Some(format!(
            "the filesystem of its executable is unknown ({e})"
        )),
    }
}

/// The effective uid and gid `pid` runs with now (`/proc/<pid>/status`).
pub fn effective_ids(pid: i32) -> std::io::Result<(u32, u32)> {
    let status = read_proc_file(&format!("/proc/{pid}/status"))?;
    // "Uid:\treal\teffective\tsaved\tfs"
    let effective = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    match (effective("Uid:"), effective("Gid:")) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(std::io::Error::other(format!(
            "no Uid/Gid lines in /proc/{pid}/status"
        ))),
    }
}

/// Why a connection's requests get nothing: its process is not the one that connected,
/// or could not be identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRefusal {
    /// The connecting process has exited (its pid may belong to another process by now).
    Exited,
    /// The connecting process has exec'd another program since it connected.
    Execd,
    /// The connecting process runs with another effective uid or gid than it connected
    /// with (a setuid or setgid exec, or a privilege change).
    CredentialsChanged,
    /// The connecting process could not be attested at all.
    Unattestable(String),
}

impl PeerRefusal {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Exited => "peer_exited",
            Self::Execd => "peer_execd",
            Self::CredentialsChanged => "peer_credentials_changed",
            Self::Unattestable(_) => "attestation_failed",
        }
    }
}

impl fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited => f.write_str("the process that opened this connection has exited"),
            Self::Execd => {
                f.write_str("the process that opened this connection has exec'd since it connected")
            }
            Self::CredentialsChanged => f.write_str(
                "the process that opened this connection has changed its uid or gid since it connected",
            ),
            Self::Unattestable(why) => write!(f, "workload attestation failed: {why}"),
        }
    }
}

/// The process at the other end of a Workload API connection, bound at accept time.
#[derive(Debug)]
pub struct PeerProcess {
    /// pid + start time, read at accept.
    pub instance: ProcessInstance,
    /// Effective uid at `connect(2)` (SO_PEERCRED).
    pub uid: u32,
    /// Effective gid at `connect(2)` (SO_PEERCRED).
    pub gid: u32,
    /// The executable at accept (`None`: unreadable, as for an agent without the rights).
    pub exe: Option<ExeIdentity>,
    /// Unique for the boot when the kernel's pidfds are pidfs files (6.9+): the pidfd's
    /// inode number, the same for every pidfd of one process, never reused.
    pub pidfs_id: Option<u64>,
    /// The peer's pidfd from SO_PEERPIDFD; `None` on kernels without it.
    pidfd: Option<OwnedFd>,
}

impl PeerProcess {
    /// The peer's pidfd (readable once the peer has exited), if the kernel gave one.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|f| f.as_fd())
    }

    /// Ok while the process that connected has neither exited nor exec'd: with a pidfd,
    /// a `statx` of the executable and a poll (no `/proc` text is read); without one,
    /// the whole [`PeerProcess::check`]. Not the uid check: for deciding whether to make
    /// something for the process at all, where every answer is still checked whole.
    pub fn still_runs(&self) -> Result<(), PeerRefusal> {
        let Some(fd) = &self.pidfd else {
            return self.check();
        };
        let exe = exe_identity(self.instance.pid).ok();
        if pidfd_exited(fd.as_fd())? {
            return Err(PeerRefusal::Exited);
        }
        match (self.exe, exe) {
            (Some(then), Some(now)) if then != now => Err(PeerRefusal::Execd),
            (Some(_), None) => Err(PeerRefusal::Exited),
            (None, Some(_)) => Err(PeerRefusal::Execd),
            _ => Ok(()),
        }
    }

    /// Ok while the process that connected still runs the program it connected with.
    ///
    /// `/proc` is read first and the pidfd polled last: a process still running at the
    /// end held its pid all along, so the reads were of it and not of a successor.
    pub fn check(&self) -> Result<(), PeerRefusal> {
        let pid = self.instance.pid;
        // With a pidfd, the poll below proves the process held its pid from before these
        // reads to after them, so its start time is the one read at accept: reading
        // /proc/<pid>/stat again (the costliest file here) could only confirm it. Without
        // one, the start time is what tells a recycled pid.
        let start_time = match &self.pidfd {
            Some(_) => self.instance.start_time,
            None => process_start_time(pid).map_err(|_| PeerRefusal::Exited)?,
        };
        let exe = exe_identity(pid).ok();
        let ids = effective_ids(pid).map_err(|_| PeerRefusal::Exited)?;
        if let Some(fd) = &self.pidfd {
            if pidfd_exited(fd.as_fd())? {
                return Err(PeerRefusal::Exited);
            }
        }
        if start_time != self.instance.start_time {
            // Without a pidfd this is how a recycled pid shows.
            return Err(PeerRefusal::Exited);
        }
        match (self.exe, exe) {
            (Some(then), Some(now)) if then != now => return Err(PeerRefusal::Execd),
            // Readable at accept and not now: an exiting process (zombie).
            (Some(_), None) => return Err(PeerRefusal::Exited),
            (None, Some(_)) => return Err(PeerRefusal::Execd),
            _ => {}
        }
        // SO_PEERCRED holds the effective ids at connect(); the process must still run
        // with them, or a setuid exec right after connect() would be attested as entitled.
        if ids != (self.uid, self.gid) {
            return Err(PeerRefusal::CredentialsChanged);
        }
        Ok(())
    }

    /// A binding to arbitrary values, for tests of [`PeerProcess::check`].
    #[doc(hidden)]
    pub fn for_tests(
        instance: ProcessInstance,
        exe: Option<ExeIdentity>,
        (uid, gid): (u32, u32),
    ) -> Self {
        Self {
            instance,
            uid,
            gid,
            exe,
            pidfs_id: None,
            pidfd: None,
        }
    }
}

/// True once the process behind `pidfd` has exited (a zombie counts as exited).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> Result<bool, PeerRefusal> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(PeerRefusal::Unattestable(format!(
                    "cannot poll the peer's pidfd: {e}"
                )))
            }
        }
    }
    Ok(fds[0]
        .revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP)))
}

/// The pid a pidfd refers to in the agent's pid namespace, from its fdinfo: `None` once the
/// process has been reaped (the kernel then says -1) or when it is outside that namespace.
fn pidfd_pid(pidfd: BorrowedFd<'_>) -> Result<Option<i32>, PeerRefusal> {
    let info = read_proc_file(&format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| PeerRefusal::Unattestable(format!("cannot read the pidfd's fdinfo: {e}")))?;
    let pid: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| PeerRefusal::Unattestable("the pidfd's fdinfo has no pid".into()))?;
    Ok(i32::try_from(pid).ok().filter(|p| *p > 0))
}

/// `PIDFS_MAGIC`: pidfds are files of this filesystem from Linux 6.9 on.
const PIDFS_MAGIC: i64 = 0x5049_4446;

/// The pidfd's inode when it is a pidfs file (unique per process for the boot).
fn pidfs_id(pidfd: BorrowedFd<'_>) -> Option<u64> {
    let fs = nix::sys::statfs::fstatfs(pidfd).ok()?;
    #[allow(clippy::unnecessary_cast)] // the field's width differs between libcs
    let magic = fs.filesystem_type().0 as i64;
    if magic != PIDFS_MAGIC {
        return None;
    }
    let stat = nix::sys::stat::fstat(pidfd.as_raw_fd()).ok()?;
    #[allow(clippy::unnecessary_cast)] // ino_t is narrower on some targets
    Some(stat.st_ino as u64)
}

/// How the agent follows its peers: by pidfd when the kernel has `SO_PEERPIDFD`, by pid and
/// start time otherwise. Probed once on a socketpair.
pub fn peer_pidfd_supported() -> bool {
    std::os::unix::net::UnixStream::pair()
        .ok()
        .and_then(|(a, _b)| ztid_peer_pidfd::peer_pidfd(a.as_fd()).ok().flatten())
        .is_some()
}

/// The selectors of a caller and the process they were read from.
#[derive(Debug)]
pub struct AttestedPeer {
    /// The process, as bound at accept.
    pub process: PeerProcess,
    /// `unix:*` selectors, and `container:*`, `k8s:*`, `systemd:unit` ones when those
    /// attestors are on; sorted.
    pub selectors: Vec<Selector>,
}

/// The peer credentials of an accepted connection and its pidfd.
pub struct ConnectTimePeer {
    /// SO_PEERCRED pid (`None` or 0: not visible in the agent's pid namespace).
    pub pid: Option<i32>,
    /// SO_PEERCRED uid.
    pub uid: u32,
    /// SO_PEERCRED gid.
    pub gid: u32,
    /// SO_PEERPIDFD: `Ok(None)` when the kernel lacks it, `Err` when it refused one.
    pub pidfd: std::io::Result<Option<OwnedFd>>,
}

impl ConnectTimePeer {
    /// Reads the connect-time credentials and the pidfd of an accepted Unix connection.
    pub fn of(socket: BorrowedFd<'_>) -> Result<Self, PeerRefusal> {
        let cred =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| {
                    PeerRefusal::Unattestable(format!("no peer credentials on the connection: {e}"))
                })?;
        Ok(Self {
            pid: Some(cred.pid()),
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd: ztid_peer_pidfd::peer_pidfd(socket),
        })
    }
}

/// Attests the process that made a connection: binds it (pidfd or start time), reads its
/// selectors, and checks it was the same process from the first read to the last.
///
/// `require_pidfd` is set when the kernel supports `SO_PEERPIDFD`: a connection without a
/// pidfd is then refused instead of falling back to the pid.
pub fn attest_peer(
    peer: ConnectTimePeer,
    require_pidfd: bool,
) -> Result<AttestedPeer, PeerRefusal> {
    let ConnectTimePeer {
        pid,
        uid,
        gid,
        pidfd,
    } = peer;
    let pid = pid.filter(|p| *p > 0).ok_or_else(|| {
        PeerRefusal::Unattestable(
            "the connecting process is not visible in the agent's pid namespace".into(),
        )
    })?;
    let pidfd = match pidfd {
        Ok(Some(fd)) => Some(fd),
        Ok(None) if !require_pidfd => None,
        Ok(None) => {
            return Err(PeerRefusal::Unattestable(
                "the kernel gave no pidfd for the peer".into(),
            ))
        }
        // Kernels that refuse pidfds of reaped processes say ESRCH or EINVAL.
        Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ESRCH | nix::libc::EINVAL)) => {
            return Err(PeerRefusal::Exited)
        }
        Err(e) => {
            return Err(PeerRefusal::Unattestable(format!(
                "cannot get the peer's pidfd: {e}"
            )))
        }
    };
    let pidfs_id = match &pidfd {
        Some(fd) => {
            match pidfd_pid(fd.as_fd())? {
                None => return Err(PeerRefusal::Exited),
                Some(p) if p != pid => {
                    return Err(PeerRefusal::Unattestable(format!(
                        "the peer's pidfd names pid {p}, its credentials pid {pid}"
                    )))
                }
                Some(_) => {}
            }
            if pidfd_exited(fd.as_fd())? {
                return Err(PeerRefusal::Exited);
            }
            pidfs_id(fd.as_fd())
        }
        None => None,
    };
    let start_time = process_start_time(pid).map_err(|_| PeerRefusal::Exited)?;
    let exe = exe_identity(pid).ok();
    // Read before the final check, so this too is bound to the process by its pidfd.
    let exe_trust = exe_trust(pid);
    let mut selectors = read_selectors(pid, uid, gid, exe, &exe_trust)?;
    // Container and systemd selectors, when configured: from the cgroup the process is in
    // and its runtime's answer. Before the final check, which refuses a process that
    // exited meanwhile (its container stopped mid-attestation), so those are its own too.
    if let Some(containers) = crate::container::installed() {
        selectors.extend(containers.selectors(pid));
        selectors.sort();
        selectors.dedup();
    }
    let process = PeerProcess {
        instance: ProcessInstance { pid, start_time },
        uid,
        gid,
        exe,
        pidfs_id,
        pidfd,
    };
    // The same process from the first read to the last: still running (pidfd), same start
    // time, same executable. An exec in between is an exec after connect().
    process.check()?;
    Ok(AttestedPeer { process, selectors })
}

/// Whether `/proc/<pid>/exe` can name what the process runs: `Err(why)` when it cannot.
///
/// `prctl(PR_SET_MM, PR_SET_MM_MAP)` with an `exe_fd` re-points a process's own
/// `/proc/<pid>/exe` at any file it may execute, once the file's old mappings are gone.
/// The kernel asks for `CAP_CHECKPOINT_RESTORE` (or `CAP_SYS_ADMIN`) in the caller's *own*
/// user namespace, which any user holds in a namespace it creates
/// (`unshare --user`). A process in a user namespace other than the agent's may therefore
/// show any executable: its path and hash say nothing. Its uid and gid, which the kernel
/// translates to the agent's namespace, still do.
///
/// Not covered: a child sharing the process's memory (`CLONE_VM`) made in a new user
/// namespace re-points the shared exe, and the process itself never leaves the agent's
/// namespace (see the README, "What remains").
fn exe_trust(pid: i32) -> Result<(), String> {
    let theirs = namespace_identity(&format!("/proc/{pid}/ns/user"))
        .map_err(|e| format!("its user namespace is unreadable ({e})"))?;
    let ours = namespace_identity("/proc/self/ns/user")
        .map_err(|e| format!("the agent's user namespace is unreadable ({e})"))?;
    if theirs != ours {
        return Err(
            "it runs in a user namespace other than the agent's, where it may re-point \
             its /proc/<pid>/exe at any file (PR_SET_MM_MAP)"
                .into(),
        );
    }
    Ok(())
}

/// A namespace, as the kernel names it: the device and inode of its `/proc/*/ns/*` file.
fn namespace_identity(ns_file: &str) -> std::io::Result<(u64, u64)> {
    let m = fs::metadata(ns_file)?;
    Ok((m.dev(), m.ino()))
}

/// The `unix:*` selectors of `pid`, sorted. `uid`/`gid` are the connect-time credentials;
/// the executable's selectors are read only if `exe_trust` is `Ok`.
fn read_selectors(
    pid: i32,
    uid: u32,
    gid: u32,
    exe: Option<ExeIdentity>,
    exe_trust: &Result<(), String>,
) -> Result<Vec<Selector>, PeerRefusal> {
    let bad = |e: ztid_spiffe::Error| PeerRefusal::Unattestable(e.to_string());
    let mut selectors = vec![
        Selector::new("unix", &format!("uid:{uid}")).map_err(bad)?,
        Selector::new("unix", &format!("gid:{gid}")).map_err(bad)?,
    ];
    if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        if let Ok(s) = Selector::new("unix", &format!("user:{}", user.name)) {
            selectors.push(s);
        }
    }
    if let Ok(Some(group)) = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        if let Ok(s) = Selector::new("unix", &format!("group:{}", group.name)) {
            selectors.push(s);
        }
    }
    // Checked only once the executable is trusted (the filesystem is read through it).
    let exe_trust = match exe_trust {
        Ok(()) => exe.and_then(|_| exe_unreadable(pid)).map_or(Ok(()), Err),
        Err(why) => Err(why.clone()),
    };
    if let (Some(_), Err(why)) = (exe, &exe_trust) {
        tracing::warn!(
            pid,
            uid,
            reason = %why,
            "no unix:path or unix:sha256 selector for this workload"
        );
    }
    if let (Some(exe), Ok(())) = (exe, &exe_trust) {
        let exe_link = format!("/proc/{pid}/exe");
        if let Some(p) = exe_path_seen_by_agent(&exe_link, exe) {
            if let Ok(s) = Selector::new("unix", &format!("path:{p}")) {
                selectors.push(s);
            }
        }
        // Hash through /proc/<pid>/exe, the inode the process really runs, even if the
        // path has since been replaced; and only if it is still the file identified above.
        if let Ok(hash) = sha256_file(&exe_link, exe) {
            selectors.push(Selector::new("unix", &format!("sha256:{hash}")).map_err(bad)?);
        }
    }
    selectors.sort();
    Ok(selectors)
}

/// The path of the executable behind `exe_link` (`/proc/<pid>/exe`), only if that path,
/// opened from the agent's own root, is that very file (`exe`).
///
/// The link prints the path in the *process's* mount namespace: a process with a mount
/// namespace of its own (any user, where unprivileged user namespaces are allowed) can
/// mount its own file at an entry's path and run it there, while that path holds another
/// program for everyone else. A deleted file reads "<path> (deleted)". Neither names the
/// file the agent would find at the path, so neither gives a `unix:path` selector.
fn exe_path_seen_by_agent(exe_link: &str, exe: ExeIdentity) -> Option<String> {
    let path = fs::read_link(exe_link)
        .ok()?
        .into_os_string()
        .into_string()
        .ok()?;
    let here = fs::metadata(&path).ok()?;
    ((here.dev(), here.ino()) == (exe.dev, exe.ino)).then_some(path)
}

/// File identity for the hash cache: device, inode, size, and change time (which no
/// caller can set back), so a replaced or modified executable is hashed again.
type FileKey = (u64, u64, u64, i64, i64);

fn hash_cache() -> &'static std::sync::Mutex<std::collections::HashMap<FileKey, String>> {
    static CACHE: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<FileKey, String>>,
    > = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Largest executable hashed for a `unix:sha256` selector. An executable may end in any
/// amount of sparse padding the kernel never reads (a 100 GB file costs nothing to make):
/// unbounded, hashing it would hold an attestation slot for as long as that takes.
pub const MAX_HASHED_EXECUTABLE_BYTES: u64 = 1 << 30;

/// Longest time spent hashing one executable; past it, no `unix:sha256` selector.
pub const MAX_HASH_TIME: std::time::Duration = std::time::Duration::from_secs(3);

/// SHA-256 of an executable, cached by file identity: hashing a large binary for
/// every new process would dominate the cost of a first fetch. Fails if the opened file
/// is not `expected` (the process exec'd meanwhile), or is larger or slower to hash than
/// the bounds above.
fn sha256_file(path: &str, expected: ExeIdentity) -> Result<String, std::io::Error> {
    let mut f = fs::File::open(path)?;
    let m = f.metadata()?;
    if (m.dev(), m.ino()) != (expected.dev, expected.ino) {
        return Err(std::io::Error::other(
            "the executable changed while hashing",
        ));
    }
    if m.size() > MAX_HASHED_EXECUTABLE_BYTES {
        return Err(std::io::Error::other(format!(
            "the executable is larger than {MAX_HASHED_EXECUTABLE_BYTES} bytes"
        )));
    }
    let key = (m.dev(), m.ino(), m.size(), m.ctime(), m.ctime_nsec());
    if let Some(h) = hash_cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(h);
    }
    let hash = sha256_reader(&mut f)?;
    // Keep the cache bounded: executables on a node are few; a flood of distinct
    // files only costs re-hashing.
    if let Ok(mut c) = hash_cache().lock() {
        if c.len() >= 4096 {
            c.clear();
        }
        c.insert(key, hash.clone());
    }
    Ok(hash)
}

/// SHA-256 of what `f` holds, within [`MAX_HASHED_EXECUTABLE_BYTES`] and
/// [`MAX_HASH_TIME`] (the file may grow while it is read).
fn sha256_reader(f: &mut fs::File) -> Result<String, std::io::Error> {
    let deadline = std::time::Instant::now() + MAX_HASH_TIME;
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_HASHED_EXECUTABLE_BYTES || std::time::Instant::now() > deadline {
            return Err(std::io::Error::other(
                "the executable is too large or too slow to hash",
            ));
        }
        // Read guarantees n <= buf.len().
        let chunk = buf
            .get(..n)
            .ok_or_else(|| std::io::Error::other("read returned more bytes than it was given"))?;
        ctx.update(chunk);
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process, seen through one end of a socketpair (the kernel records the creator).
    fn attest_self() -> AttestedPeer {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = ConnectTimePeer::of(a.as_fd()).unwrap();
        attest_peer(peer, peer_pidfd_supported()).unwrap()
    }

    #[test]
    fn attests_this_process() {
        let w = attest_self();
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(w.process.instance.pid, std::process::id() as i32);
        assert!(w
            .selectors
            .contains(&Selector::parse(&format!("unix:uid:{uid}")).unwrap()));
        let exe = std::env::current_exe().unwrap();
        // statx's device, encoded as stat's, so it compares with fs::metadata (the path
        // selector and the hash cache rely on it).
        let m = fs::metadata(&exe).unwrap();
        assert_eq!(
            exe_identity(std::process::id() as i32).unwrap(),
            ExeIdentity {
                dev: m.dev(),
                ino: m.ino()
            }
        );
        assert!(w
            .selectors
            .iter()
            .any(|s| s.value() == format!("path:{}", exe.display())));
        let bytes = fs::read(&exe).unwrap();
        let want = hex::encode(digest::digest(&digest::SHA256, &bytes).as_ref());
        assert!(w
            .selectors
            .iter()
            .any(|s| s.value() == format!("sha256:{want}")));
        assert_eq!(w.process.check(), Ok(()));
        if peer_pidfd_supported() {
            assert!(w.process.pidfd().is_some(), "bound by pidfd");
        }
    }

    #[test]
    fn mount_type_is_read_by_the_mounts_id() {
        let info = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
                    36 22 98:0 / /mnt/a\\040-\\040b rw master:1 shared:3 - ext4 /dev/vda rw\n\
                    40 36 0:50 / /home/u/f rw - fuse.sshfs host: rw\n";
        let types = mount_types(info);
        assert_eq!(types.get(&36).map(String::as_str), Some("ext4"));
        assert_eq!(types.get(&40).map(String::as_str), Some("fuse.sshfs"));
        assert_eq!(types.get(&3), None);
        let me = std::process::id() as i32;
        let fs = exe_filesystem(me).unwrap();
        assert!(READABLE_FILESYSTEMS.contains(&fs.as_str()), "{fs}");
        assert_eq!(exe_unreadable(me), None);
    }

    /// The kept mount table is marked changed by the kernel when a mount comes or goes,
    /// and read again then (a mount ID can be reused by a mount of another type).
    #[test]
    fn the_kept_mount_table_is_read_again_when_mounts_change() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let me = std::process::id() as i32;
        let mut table = NamespaceMounts::open(me).unwrap();
        assert!(!table.changed());
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "none"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(mounted.success());
        let changed = table.changed();
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
        assert!(changed, "a new mount marks the table");
        table.read().unwrap();
        // The unmount marked it again; read, it is clean.
        assert!(table.changed());
        table.read().unwrap();
        assert!(!table.changed());
    }

    /// A workload running its program from a FUSE file system whose daemon never answers
    /// the agent: attested at once, without `unix:path` or `unix:sha256`, and nothing is
    /// asked of the daemon (an open or a lookup there would hold the attestation, and its
    /// slot, forever). A real FUSE mount: needs root and /dev/fuse.
    #[test]
    fn an_executable_on_fuse_is_never_opened() {
        use std::io::BufRead;
        use std::time::{Duration, Instant};
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/fuse").exists() {
            eprintln!("skipped: needs root and /dev/fuse to mount a FUSE file system");
            return;
        }
        let work = tempfile::tempdir().unwrap();
        let mnt = work.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/hung_fuse.py");
        let mut fuse = std::process::Command::new("python3")
            .arg(script)
            .arg(&mnt)
            .arg("/bin/sleep")
            .arg(std::process::id().to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let wait_for = |what: &str, ready: &mut dyn FnMut() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !ready() {
                assert!(Instant::now() < deadline, "{what} did not happen");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let prog = mnt.join("prog");
        wait_for("the FUSE mount", &mut || {
            fs::symlink_metadata(&prog).is_ok()
        });
        let mut workload = std::process::Command::new(&prog).arg("60").spawn().unwrap();
        let pid = workload.id() as i32;
        wait_for("the exec from FUSE", &mut || {
            exe_filesystem(pid).is_ok_and(|f| f.starts_with("fuse"))
        });
        assert!(exe_unreadable(pid).is_some_and(|why| why.contains("fuse")));
        let exe = exe_identity(pid).unwrap();
        let (uid, gid) = effective_ids(pid).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_selectors(pid, uid, gid, Some(exe), &Ok(())));
        });
        let attested = rx.recv_timeout(Duration::from_secs(10));
        // Unmounting fails whatever the daemon holds, so a hung attestation ends too.
        let _ = workload.kill();
        let _ = workload.wait();
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&mnt)
            .status();
        let _ = fuse.kill();
        let held: Vec<String> = std::io::BufReader::new(fuse.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = fuse.wait();
        let selectors = attested
            .expect("the attestation waited on the FUSE daemon")
            .unwrap();
        assert!(held.is_empty(), "the agent asked the FUSE daemon: {held:?}");
        assert!(selectors.iter().any(|s| s.value() == format!("uid:{uid}")));
        assert!(
            !selectors
                .iter()
                .any(|s| s.value().starts_with("path:") || s.value().starts_with("sha256:")),
            "{selectors:?}"
        );
    }

    #[test]
    fn another_start_time_or_executable_is_refused() {
        let w = attest_self();
        let instance = w.process.instance;
        let exe = w.process.exe;
        let ids = (w.process.uid, w.process.gid);
        // The same pid with another start time: a recycled pid.
        let recycled = PeerProcess::for_tests(
            ProcessInstance {
                pid: instance.pid,
                start_time: instance.start_time + 1,
            },
            exe,
            ids,
        );
        assert_eq!(recycled.check(), Err(PeerRefusal::Exited));
        // The same process running another file: an exec.
        let other = exe.map(|e| ExeIdentity {
            dev: e.dev,
            ino: e.ino + 1,
        });
        let execd = PeerProcess::for_tests(instance, other, ids);
        assert_eq!(execd.check(), Err(PeerRefusal::Execd));
        // The same process with other effective ids than it connected with.
        let setuid = PeerProcess::for_tests(instance, exe, (ids.0 + 1, ids.1));
        assert_eq!(setuid.check(), Err(PeerRefusal::CredentialsChanged));
        assert_eq!(PeerProcess::for_tests(instance, exe, ids).check(), Ok(()));
        assert_eq!(
            execd.check().unwrap_err().to_string(),
            "the process that opened this connection has exec'd since it connected"
        );
    }

    #[test]
    fn gone_process_is_refused() {
        let gone = PeerProcess::for_tests(
            ProcessInstance {
                pid: i32::MAX - 1,
                start_time: 1,
            },
            None,
            (0, 0),
        );
        assert_eq!(gone.check(), Err(PeerRefusal::Exited));
        assert_eq!(
            PeerRefusal::Exited.to_string(),
            "the process that opened this connection has exited"
        );
    }
}
