//! The clock of the SVID pool's age and idle decisions: `CLOCK_BOOTTIME`. It never
//! steps, as the wall clock may, and it keeps counting while the machine is suspended,
//! which [`std::time::Instant`] (`CLOCK_MONOTONIC` on Linux) does not: a pooled SVID
//! minted before a night's suspend is a night old at wake, not a few seconds.

use std::ops::Add;
use std::time::Duration;

/// A moment on the boot clock: the time since the machine booted, suspends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Now.
    pub fn now() -> Self {
        // Through libc (nix), not rustix's own vDSO parsing, which faults under valgrind
        // (the instruction-count benchmarks run the agent there). CLOCK_BOOTTIME exists
        // on every kernel the agent runs on (it needs pidfds); were it ever unreadable,
        // the monotonic clock stands in, as `Instant` would.
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .or_else(|_| nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC))
            .map_or(Duration::ZERO, |t| {
                // The kernel keeps both fields in range.
                Duration::new(
                    u64::try_from(t.tv_sec()).unwrap_or(0),
                    u32::try_from(t.tv_nsec()).unwrap_or(0),
                )
            });
        Self(t)
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn saturating_duration_since(self, earlier: Self) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// The moment `since_boot` after the boot (tests build their clocks with it).
    #[cfg(test)]
    pub fn since_boot(since_boot: Duration) -> Self {
        Self(since_boot)
    }
}

impl Add<Duration> for BootInstant {
    type Output = Self;

    fn add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boot clock runs with the monotonic one while the machine is awake (a
    /// suspend cannot be had in a test) and never goes back.
    #[test]
    fn it_runs_forward_with_the_monotonic_clock_while_awake() {
        let (b0, m0) = (BootInstant::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (b1, m1) = (BootInstant::now(), std::time::Instant::now());
        let boot = b1.saturating_duration_since(b0);
        let mono = m1.duration_since(m0);
        assert!(boot >= Duration::from_millis(20), "{boot:?}");
        assert!(
            boot.abs_diff(mono) < Duration::from_millis(5),
            "{boot:?} {mono:?}"
        );
        assert_eq!(b0.saturating_duration_since(b1), Duration::ZERO);
        // Since boot, suspends included: never less than the monotonic clock's reading.
        let mono_now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        assert!(BootInstant::now().0.as_secs() >= u64::try_from(mono_now.tv_sec()).unwrap());
    }
}
