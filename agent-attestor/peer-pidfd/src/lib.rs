//! `SO_PEERPIDFD`: a pidfd for the process at the other end of a Unix socket.
//!
//! The kernel records the connecting process (its `struct pid`) when `connect(2)` runs and
//! hands out a pidfd for *that* process on request (Linux 6.5+). Unlike the pid number
//! from `SO_PEERCRED`, a pidfd can never come to mean another process: once the peer has
//! exited, polling it reports readable, forever, even if its pid number is reused.
//!
//! Neither `nix` 0.29 nor `rustix` 1.1 wrap this option, so this crate holds the one
//! `getsockopt(2)` call, in the only `unsafe` block of ztid, behind a safe function.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

/// `SO_PEERPIDFD` from the kernel's `asm-generic/socket.h` (MIPS uses the same number;
/// SPARC its own). Linux is the only kernel with the option.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(any(target_arch = "sparc", target_arch = "sparc64"))
))]
const SO_PEERPIDFD: Option<libc::c_int> = Some(77);
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    any(target_arch = "sparc", target_arch = "sparc64")
))]
const SO_PEERPIDFD: Option<libc::c_int> = Some(0x56);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SO_PEERPIDFD: Option<libc::c_int> = None;

/// A pidfd for the process that connected (or, for a socketpair, created) `socket`.
///
/// - `Ok(Some(pidfd))`: the peer's pidfd. On recent kernels a peer that has already
///   exited still gets one, which polls readable at once.
/// - `Ok(None)`: this kernel does not know `SO_PEERPIDFD` (before 6.5); identify the
///   peer some other way.
/// - `Err(e)`: the kernel knows the option but gave no pidfd, e.g. `ESRCH`/`EINVAL`
///   when the peer has already been reaped on kernels that refuse pidfds of reaped tasks,
///   or `EMFILE`.
pub fn peer_pidfd(socket: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    let Some(option) = SO_PEERPIDFD else {
        return Ok(None);
    };
    getsockopt_fd(socket, option)
}

/// `getsockopt(socket, SOL_SOCKET, option)` for an option whose value is a new descriptor.
fn getsockopt_fd(socket: BorrowedFd<'_>, option: libc::c_int) -> io::Result<Option<OwnedFd>> {
    use std::os::fd::{AsRawFd, FromRawFd};

    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY:
    // - `socket` is a BorrowedFd, so the descriptor stays open for the whole call.
    // - `fd` and `len` are live, aligned locals; `len` holds the exact size of `fd`, so the
    //   kernel writes at most that many bytes into it and updates `len`.
    // - `from_raw_fd` only runs when the call succeeded and returned a full, non-negative
    //   int: the kernel has then just installed that descriptor in our table for us, and
    //   nothing else refers to it, so the OwnedFd is its sole owner and closes it once.
    #[allow(unsafe_code)]
    let result = unsafe {
        let rc = libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut fd as *mut libc::c_int).cast::<libc::c_void>(),
            &mut len,
        );
        if rc != 0 {
            Err(io::Error::last_os_error())
        } else if len as usize != std::mem::size_of::<libc::c_int>() || fd < 0 {
            Err(io::Error::other(
                "SO_PEERPIDFD returned no descriptor (unexpected answer from the kernel)",
            ))
        } else {
            Ok(OwnedFd::from_raw_fd(fd))
        }
    };
    match result {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    /// The `Pid:` line of a pidfd's fdinfo.
    fn pidfd_pid(fd: &OwnedFd) -> i64 {
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
            .expect("fdinfo")
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a Pid line")
    }

    #[test]
    fn socketpair_peer_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        match peer_pidfd(a.as_fd()).expect("getsockopt") {
            Some(fd) => assert_eq!(pidfd_pid(&fd), i64::from(std::process::id())),
            // A kernel before 6.5: nothing to check but the answer's shape.
            None => eprintln!("SO_PEERPIDFD not supported by this kernel"),
        }
    }

    #[test]
    fn not_a_socket_is_an_error() {
        let f = std::fs::File::open("/proc/self/stat").expect("open");
        let err = peer_pidfd(f.as_fd()).expect_err("not a socket");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
