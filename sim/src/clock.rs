//! The simulated clock: real elapsed time multiplied by a scale factor, plus manual advances.
//!
//! Every time the simulator hands out is truncated to 100 ns, the precision of the wire format
//! (7 fraction digits), so that a timestamp a client read back compares exactly like the
//! internal one in `$filter` expressions.

use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};

/// Largest duration the clock helpers accept (100 years), so arithmetic never overflows.
const MAX_SECONDS: f64 = 100.0 * 365.0 * 86400.0;

/// The simulated clock. Monotonic: it only moves forward.
#[derive(Debug)]
pub struct SimClock {
    anchor_real: Instant,
    anchor_sim: DateTime<Utc>,
    scale: f64,
}

impl SimClock {
    /// A clock showing `start` now and running `scale` times faster than real time.
    pub fn new(start: DateTime<Utc>, scale: f64) -> Self {
        Self {
            anchor_real: Instant::now(),
            anchor_sim: truncate(start),
            scale,
        }
    }

    /// The current simulated time.
    pub fn now(&self) -> DateTime<Utc> {
        let real = self.anchor_real.elapsed().as_secs_f64();
        truncate(add_seconds(self.anchor_sim, real * self.scale))
    }

    /// Moves the clock forward by `secs` simulated seconds (negative values are ignored).
    pub fn advance(&mut self, secs: f64) {
        if secs > 0.0 {
            self.anchor_sim = add_seconds(self.anchor_sim, secs);
        }
    }

    /// Changes the speed from now on; re-anchoring keeps the clock continuous.
    pub fn set_scale(&mut self, scale: f64) {
        self.anchor_sim = self.now();
        self.anchor_real = Instant::now();
        self.scale = scale;
    }

    /// The current speed factor.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

/// `t + secs`, clamped instead of overflowing.
pub fn add_seconds(t: DateTime<Utc>, secs: f64) -> DateTime<Utc> {
    let secs = if secs.is_finite() {
        secs.clamp(-MAX_SECONDS, MAX_SECONDS)
    } else {
        0.0
    };
    let delta = TimeDelta::nanoseconds((secs * 1e9) as i64);
    t.checked_add_signed(delta).unwrap_or(t)
}

/// Seconds from `a` to `b` (negative when `b` is earlier).
pub fn seconds_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    let d = b - a;
    match d.num_nanoseconds() {
        Some(n) => n as f64 / 1e9,
        None => d.num_seconds() as f64,
    }
}

/// Drops everything below 100 ns.
pub fn truncate(t: DateTime<Utc>) -> DateTime<Utc> {
    let extra = i64::from(t.timestamp_subsec_nanos() % 100);
    t - TimeDelta::nanoseconds(extra)
}

/// ISO-8601 with 7 fraction digits and `Z`, as MDE writes timestamps.
pub fn fmt7(t: DateTime<Utc>) -> String {
    let ticks = t.timestamp_subsec_nanos().min(999_999_999) / 100;
    format!("{}.{:07}Z", t.format("%Y-%m-%dT%H:%M:%S"), ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_seven_digits() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(fmt7(truncate(t)), "2026-01-02T03:04:05.1234567Z");
        let whole = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(fmt7(whole), "2026-01-02T03:04:05.0000000Z");
    }

    #[test]
    fn frozen_clock_moves_only_by_advance() {
        let start = Utc::now();
        let mut c = SimClock::new(start, 0.0);
        let a = c.now();
        c.advance(60.0);
        assert_eq!(seconds_between(a, c.now()), 60.0);
    }
}
