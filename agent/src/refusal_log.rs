//! Refusal log lines, bounded per uid: a local process that asks again and again for
//! what it is refused (or an Envoy that rejects every answer) must not flood the agent's
//! log, where journald's rate limit would then drop the agent's real security events.
//!
//! Each uid may log [`LINES_PER_WINDOW`] refusal lines of each kind (its `event`) per
//! [`WINDOW`]; the lines it would have logged beyond that are counted, and its next line
//! of that kind says how many were left out (`suppressed`). Every refusal still counts in
//! the metrics.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusal lines one uid may log per window.
pub const LINES_PER_WINDOW: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Uids and kinds tracked one by one; beyond them, uids share one count per kind.
const MAX_TRACKED: usize = 4096;

#[derive(Clone, Copy)]
struct UidWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

type Key = (u32, &'static str);

static WINDOWS: Mutex<Option<HashMap<Key, UidWindow>>> = Mutex::new(None);

/// Whether a refusal line of `kind` (its `event`) for `uid` may be logged now: `Some(n)`,
/// with how many such lines were left out since its last one, or `None` (counted, not
/// logged).
pub fn admit(uid: u32, kind: &'static str) -> Option<u64> {
    let mut guard = WINDOWS.lock().ok()?;
    let windows = guard.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    let key = (uid, kind);
    if windows.len() >= MAX_TRACKED && !windows.contains_key(&key) {
        windows.retain(|_, w| now.duration_since(w.started) < WINDOW || w.suppressed > 0);
    }
    // Past the bound, every untracked uid counts as one (u32::MAX is no uid).
    let key = if windows.len() < MAX_TRACKED || windows.contains_key(&key) {
        key
    } else {
        (u32::MAX, kind)
    };
    let w = windows.entry(key).or_insert(UidWindow {
        started: now,
        logged: 0,
        suppressed: 0,
    });
    if now.duration_since(w.started) >= WINDOW {
        w.started = now;
        w.logged = 0;
    }
    if w.logged < LINES_PER_WINDOW {
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    } else {
        w.suppressed += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_logs_a_few_lines_a_window_and_then_says_how_many_it_left_out() {
        let uid = 4_000_123;
        let logged: Vec<_> = (0..100)
            .filter_map(|_| admit(uid, "test_refused"))
            .collect();
        assert_eq!(logged, vec![0; LINES_PER_WINDOW as usize]);
        assert_eq!(
            admit(4_000_124, "test_refused"),
            Some(0),
            "another uid has its own lines"
        );
        assert_eq!(
            admit(uid, "test_other"),
            Some(0),
            "another kind has its own lines"
        );
        if let Ok(mut g) = WINDOWS.lock() {
            if let Some(w) = g.as_mut().and_then(|m| m.get_mut(&(uid, "test_refused"))) {
                w.started -= WINDOW;
            }
        }
        assert_eq!(
            admit(uid, "test_refused"),
            Some(100 - u64::from(LINES_PER_WINDOW))
        );
    }
}
