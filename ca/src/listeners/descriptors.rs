//! The process's file descriptors as a shared budget: [`DescriptorBudget`] shrinks the
//! TCP listeners' caps in proportion when the `RLIMIT_NOFILE` soft limit (read at every
//! accept) is below their sum, and the helpers that read and raise that limit.

use std::sync::Mutex;

use crate::limits::RESERVED_DESCRIPTORS;

/// Smallest cap a listener is shrunk to under a low descriptor limit.
const MIN_CAP: usize = 4;

/// The TCP listeners' share of the process's descriptors.
#[derive(Default)]
pub struct DescriptorBudget {
    caps: Mutex<Vec<(&'static str, usize)>>,
}

impl DescriptorBudget {
    pub(super) fn register(&self, name: &'static str, cap: usize) {
        if let Ok(mut c) = self.caps.lock() {
            c.push((name, cap));
        }
    }

    /// `cap` shrunk in proportion when the listeners' caps together exceed the
    /// descriptors available.
    pub(super) fn effective(&self, cap: usize) -> usize {
        let available = nofile_soft_limit().saturating_sub(RESERVED_DESCRIPTORS) as usize;
        let sum: usize = self
            .caps
            .lock()
            .map(|c| c.iter().map(|(_, n)| n).sum())
            .unwrap_or(cap);
        if sum <= available {
            cap
        } else {
            (cap.saturating_mul(available) / sum.max(1)).max(MIN_CAP)
        }
    }
}

/// The soft `RLIMIT_NOFILE` now.
pub fn nofile_soft_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Raises the soft descriptor limit to the hard one (as Go programs do), so the caps
/// have the room the operator allowed.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the descriptor limit");
            }
        }
    }
}
