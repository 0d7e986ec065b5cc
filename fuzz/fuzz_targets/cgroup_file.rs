//! The container attestor's `/proc/<pid>/cgroup` parsing (`agent/src/container/cgroup.rs`,
//! included by path: it is pure). A process names the cgroups below any it may write to
//! (a delegated subtree, its own container's), so the paths are untrusted text. Never
//! panics; a container it finds has a 64-hex ID that occurs in the input, and is at the
//! same place as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../../agent/src/container/cgroup.rs"]
mod cgroup;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(facts) = cgroup::parse(text) else {
        return;
    };
    if let Ok(Some(c)) = &facts.container {
        assert_eq!(c.id.len(), 64);
        assert!(c.id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(text.contains(c.id.as_str()));
        assert!(c.same_place(c));
        let _ = c.kind.is_kubelet_pod();
        let _ = c.to_string();
    }
    if let Some(unit) = &facts.systemd_unit {
        assert!(!unit.is_empty());
    }
});
