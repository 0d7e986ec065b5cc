//! Who is calling on the Workload API socket, decided by the kernel, not by the caller.
//!
//! The socket's SO_PEERCRED gives the caller's pid, uid and gid; `/proc/<pid>` gives
//! its executable and start time. A process instance is identified by (pid, start
//! time): after collecting the selectors, the start time is read again, so a pid that
//! was recycled while we looked is refused instead of getting the dead process's identity.

use std::fs;
use std::io::Read;

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

/// Reads the start time of `pid`, or an error if the process is gone.
pub fn process_start_time(pid: i32) -> Result<u64, Error> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
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

/// True while the instance still runs (same pid, same start time).
pub fn is_alive(instance: &ProcessInstance) -> bool {
    process_start_time(instance.pid).is_ok_and(|t| t == instance.start_time)
}

/// The selectors of a caller and the instance they were read from.
#[derive(Debug, Clone)]
pub struct AttestedWorkload {
    /// The process instance.
    pub instance: ProcessInstance,
    /// `unix:*` selectors, sorted.
    pub selectors: Vec<Selector>,
}

/// Attests the process `pid` whose socket credentials were `uid`/`gid`.
pub fn attest_unix(pid: i32, uid: u32, gid: u32) -> Result<AttestedWorkload, Error> {
    if pid <= 0 {
        return Err(Error::WorkloadAttestation("caller pid unknown".into()));
    }
    let start_time = process_start_time(pid)?;
    let mut selectors = vec![
        Selector::new("unix", &format!("uid:{uid}"))?,
        Selector::new("unix", &format!("gid:{gid}"))?,
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
    let exe_link = format!("/proc/{pid}/exe");
    if let Ok(path) = fs::read_link(&exe_link) {
        if let Some(p) = path.to_str() {
            if let Ok(s) = Selector::new("unix", &format!("path:{p}")) {
                selectors.push(s);
            }
        }
        // Hash through /proc/<pid>/exe, the inode the process really runs, even if the
        // path has since been replaced.
        if let Ok(hash) = sha256_file(&exe_link) {
            selectors.push(Selector::new("unix", &format!("sha256:{hash}"))?);
        }
    }
    selectors.sort();
    if process_start_time(pid)? != start_time {
        return Err(Error::WorkloadAttestation(format!(
            "process {pid} was replaced during attestation"
        )));
    }
    Ok(AttestedWorkload {
        instance: ProcessInstance { pid, start_time },
        selectors,
    })
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

/// SHA-256 of an executable, cached by file identity: hashing a large binary for
/// every new process would dominate the cost of a first fetch.
fn sha256_file(path: &str) -> Result<String, std::io::Error> {
    use std::os::unix::fs::MetadataExt;
    let mut f = fs::File::open(path)?;
    let m = f.metadata()?;
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

fn sha256_reader(f: &mut fs::File) -> Result<String, std::io::Error> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attests_this_process() {
        let pid = std::process::id() as i32;
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let w = attest_unix(pid, uid, gid).unwrap();
        assert!(w
            .selectors
            .contains(&Selector::parse(&format!("unix:uid:{uid}")).unwrap()));
        let exe = std::env::current_exe().unwrap();
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
        assert!(is_alive(&w.instance));
        assert!(!is_alive(&ProcessInstance {
            pid,
            start_time: w.instance.start_time + 1
        }));
    }

    #[test]
    fn gone_process_is_refused() {
        let err = attest_unix(i32::MAX - 1, 0, 0).unwrap_err().to_string();
        assert!(err.contains("is gone"), "{err}");
    }
}
