//! Per-(app, API) sliding-window quotas: at most `per_minute` calls in any 60 s window and
//! `per_hour` in any 3600 s window of simulated time. Rejected (429) calls do not consume
//! quota, so a client that waits `Retry-After` is admitted.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::calls::ApiName;
use crate::clock::{add_seconds, seconds_between};

/// Quota limits; 0 means unlimited.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls per 60 s.
    pub per_minute: u32,
    /// Calls per 3600 s.
    pub per_hour: u32,
}

/// Admitted call times per (client id, API).
#[derive(Debug, Default)]
pub struct QuotaBook {
    windows: HashMap<(String, ApiName), VecDeque<DateTime<Utc>>>,
}

impl QuotaBook {
    /// Whether a call at `now` is admitted; `Err(retry_after)` in whole simulated seconds (≥ 1)
    /// otherwise. Does not record anything.
    pub fn check(
        &mut self,
        app: &str,
        api: ApiName,
        now: DateTime<Utc>,
        limits: Limits,
    ) -> Result<(), u64> {
        let Some(times) = self.windows.get_mut(&(app.to_string(), api)) else {
            return Ok(());
        };
        // Entries at or before now-3600 can never matter again.
        let horizon = add_seconds(now, -3600.0);
        while times.front().is_some_and(|t| *t <= horizon) {
            times.pop_front();
        }
        let mut wait: f64 = 0.0;
        for (limit, window) in [(limits.per_minute, 60.0), (limits.per_hour, 3600.0)] {
            if limit == 0 {
                continue;
            }
            let start = add_seconds(now, -window);
            let first_in = times.partition_point(|t| *t <= start);
            let in_window = times.len() - first_in;
            let limit = limit as usize;
            if in_window >= limit {
                // The call is admitted once enough entries left the window that fewer than
                // `limit` remain: the (in_window - limit)-th oldest one must expire.
                let must_expire = times[first_in + (in_window - limit)];
                wait = wait.max(seconds_between(now, add_seconds(must_expire, window)));
            }
        }
        if wait > 0.0 {
            Err((wait.ceil() as u64).max(1))
        } else {
            Ok(())
        }
    }

    /// Records an admitted call.
    pub fn consume(&mut self, app: &str, api: ApiName, now: DateTime<Utc>) {
        let times = self.windows.entry((app.to_string(), api)).or_default();
        // Keep the deque sorted even if calls record out of order.
        let pos = times.partition_point(|t| *t <= now);
        times.insert(pos, now);
    }

    /// Forgets every call.
    pub fn clear(&mut self) {
        self.windows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_window_and_retry_after() {
        let t0 = Utc::now();
        let mut q = QuotaBook::default();
        let l = Limits {
            per_minute: 3,
            per_hour: 5,
        };
        for i in 0..3 {
            let t = add_seconds(t0, i as f64);
            assert!(q.check("a", ApiName::Isolate, t, l).is_ok());
            q.consume("a", ApiName::Isolate, t);
        }
        // Oldest entry (t0) leaves the window at t0+60; at t0+3 that is 57 s away.
        assert_eq!(
            q.check("a", ApiName::Isolate, add_seconds(t0, 3.0), l),
            Err(57)
        );
        assert!(
            q.check("b", ApiName::Isolate, add_seconds(t0, 3.0), l)
                .is_ok()
        );
        assert!(
            q.check("a", ApiName::Unisolate, add_seconds(t0, 3.0), l)
                .is_ok()
        );
        assert!(
            q.check("a", ApiName::Isolate, add_seconds(t0, 60.0), l)
                .is_ok()
        );
        q.consume("a", ApiName::Isolate, add_seconds(t0, 60.0));
        q.consume("a", ApiName::Isolate, add_seconds(t0, 61.0));
        // 5 in the hour now: the first leaves at t0+3600.
        assert_eq!(
            q.check("a", ApiName::Isolate, add_seconds(t0, 200.0), l),
            Err(3400)
        );
    }
}
