//! Per-agent mint rates, bounded: one small record per active agent, no label per agent.
//! "One node minting far above its usual rate" is detected here, against each agent's own
//! baseline.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

/// Weight of the last minute in an agent's usual rate (an EWMA over about an hour).
const BASELINE_ALPHA: f64 = 1.0 / 60.0;
/// Minutes an agent is watched before its rate can be called unusual.
const WARMUP_MINUTES: i64 = 10;
/// "Far above": this many times the usual per-minute rate...
const HIGH_FACTOR: f64 = 10.0;
/// ...and at least this many SVIDs in the minute.
const HIGH_FLOOR: u32 = 60;
/// One warning per agent at most this often, in minutes.
const WARN_EVERY_MINUTES: i64 = 5;
/// Agents idle this long are forgotten, in minutes.
const FORGET_AFTER_MINUTES: i64 = 180;

pub(crate) static START: LazyLock<Instant> = LazyLock::new(Instant::now);

pub(crate) fn minute_now() -> i64 {
    (START.elapsed().as_secs() / 60) as i64
}

#[derive(Debug, Clone)]
struct AgentRate {
    first_minute: i64,
    minute: i64,
    current: u32,
    previous: u32,
    /// EWMA of per-minute counts, biased towards 0 until enough minutes are folded in.
    baseline: f64,
    /// Minutes folded into `baseline`.
    folded: i64,
    warned_minute: i64,
}

#[derive(Default)]
pub(crate) struct Rates(Mutex<HashMap<String, AgentRate>>);

pub(crate) static RATES: LazyLock<Rates> = LazyLock::new(Rates::default);

impl AgentRate {
    fn new(minute: i64) -> Self {
        Self {
            first_minute: minute,
            minute,
            current: 0,
            previous: 0,
            baseline: 0.0,
            folded: 0,
            warned_minute: i64::MIN / 2,
        }
    }

    /// Moves the window to `minute`, folding finished minutes into the baseline.
    fn roll(&mut self, minute: i64) {
        if minute <= self.minute {
            return;
        }
        let gap = minute - self.minute;
        self.baseline =
            self.baseline * (1.0 - BASELINE_ALPHA) + self.current as f64 * BASELINE_ALPHA;
        if gap > 1 {
            let idle = (gap - 1).min(10_000) as i32;
            self.baseline *= (1.0 - BASELINE_ALPHA).powi(idle);
        }
        self.folded = self.folded.saturating_add(gap);
        self.previous = if gap == 1 { self.current } else { 0 };
        self.current = 0;
        self.minute = minute;
    }

    /// The usual SVIDs per minute: the EWMA corrected for its start at 0.
    fn usual(&self) -> f64 {
        let weight = 1.0 - (1.0 - BASELINE_ALPHA).powi(self.folded.min(10_000) as i32);
        if weight > 0.0 {
            self.baseline / weight
        } else {
            0.0
        }
    }

    /// SVIDs over the last 60 s, interpolating the previous minute.
    fn last_minute(&self, minute: i64, into_minute: f64) -> f64 {
        match minute - self.minute {
            0 => self.previous as f64 * (1.0 - into_minute) + self.current as f64,
            1 => self.current as f64 * (1.0 - into_minute),
            _ => 0.0,
        }
    }
}

impl Rates {
    /// Counts one mint; returns `(this minute, usual per minute)` when it is far above usual
    /// (at most once per agent per few minutes).
    pub(crate) fn note(&self, agent: &str, minute: i64) -> Option<(u32, f64)> {
        let mut map = self.0.lock().ok()?;
        let r = match map.get_mut(agent) {
            Some(r) => r,
            None => map
                .entry(agent.to_string())
                .or_insert_with(|| AgentRate::new(minute)),
        };
        r.roll(minute);
        r.current = r.current.saturating_add(1);
        let high = minute - r.first_minute >= WARMUP_MINUTES
            && r.current >= HIGH_FLOOR
            && r.current as f64 > HIGH_FACTOR * r.usual()
            && minute - r.warned_minute >= WARN_EVERY_MINUTES;
        if high {
            r.warned_minute = minute;
            return Some((r.current, r.usual()));
        }
        None
    }

    /// The highest last-minute count over all agents; forgets long-idle agents.
    pub(crate) fn max_last_minute(&self) -> f64 {
        let Ok(mut map) = self.0.lock() else {
            return 0.0;
        };
        let minute = minute_now();
        let into = (START.elapsed().as_secs() % 60) as f64 / 60.0;
        map.retain(|_, r| minute - r.minute < FORGET_AFTER_MINUTES);
        map.values()
            .map(|r| r.last_minute(minute, into))
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_far_above_the_usual_rate_is_flagged_once() {
        let rates = Rates::default();
        // Ten minutes at 5 per minute: the usual rate.
        for minute in 0..12 {
            for _ in 0..5 {
                assert_eq!(rates.note("a", minute), None);
            }
        }
        // Then a burst in minute 12: flagged once, when it crosses the floor.
        let flagged: Vec<_> = (0..500).filter_map(|_| rates.note("a", 12)).collect();
        assert_eq!(flagged.len(), 1);
        assert_eq!(flagged[0].0, HIGH_FLOOR);
        // A new agent bursting at once is not flagged (no baseline yet).
        assert!((0..500).all(|_| rates.note("b", 12).is_none()));
        // A steady heavy minter is not flagged either.
        for minute in 0..30 {
            for _ in 0..200 {
                assert_eq!(rates.note("c", minute), None);
            }
        }
    }

    #[test]
    fn last_minute_interpolates() {
        let mut r = AgentRate::new(0);
        r.current = 100;
        r.roll(1);
        r.current = 10;
        assert_eq!(r.last_minute(1, 0.5), 60.0);
        assert_eq!(r.last_minute(2, 0.5), 5.0);
        assert_eq!(r.last_minute(3, 0.5), 0.0);
    }
}
