//! Sliding-window quotas: at most `per_minute` calls in any 60 s window and `per_hour` in any
//! 3600 s window of simulated time, per quota key. The key is (app, API) with
//! `--quota-key endpoint` and the app alone with `--quota-key app`; both are recorded, so the
//! key can change at run time. Rejected (429) calls do not consume quota, so a client that waits
//! `Retry-After` is admitted, unless another client of the same key takes the slot first.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::calls::ApiName;
use crate::clock::{add_seconds, seconds_between};
use crate::config::{QuotaKey, RetryAfterMode};
use crate::errors::ApiError;

/// Quota rules; a limit of 0 means unlimited.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls per 60 s.
    pub per_minute: u32,
    /// Calls per 3600 s.
    pub per_hour: u32,
    /// What a budget belongs to.
    pub key: QuotaKey,
}

/// Why a call was refused: the wait and the limit of the window that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Whole simulated seconds until the call would be admitted (≥ 1), if nobody else of the
    /// same key calls meanwhile.
    pub retry_after: u64,
    /// The limit that refused it.
    pub limit: u32,
    /// Its window, seconds (60 or 3600).
    pub window: u32,
}

impl Throttle {
    /// The 429 a client sees, worded like MDE's ("Maximum allowed 30 per 00:01:00 for the key
    /// Destination+TenantID+AppID. You can send requests again in 8 seconds").
    pub fn error(&self, mode: RetryAfterMode) -> ApiError {
        let w = self.window;
        let head = format!(
            "Maximum allowed {} per {:02}:{:02}:{:02} for the key Destination+TenantID+AppID.",
            self.limit,
            w / 3600,
            w / 60 % 60,
            w % 60
        );
        let n = self.retry_after;
        let full = format!("{head} You can send requests again in {n} seconds");
        match mode {
            RetryAfterMode::Header => ApiError::too_many(Some(n), full),
            RetryAfterMode::BodyOnly => ApiError::too_many(None, full),
            RetryAfterMode::None => ApiError::too_many(None, head),
            RetryAfterMode::Long => ApiError::too_many(Some(n + u64::from(w)), full),
        }
    }
}

/// Admitted call times of one app: all of them, and per API.
#[derive(Debug, Default)]
struct AppWindows {
    all: VecDeque<DateTime<Utc>>,
    per_api: HashMap<ApiName, VecDeque<DateTime<Utc>>>,
}

/// Admitted call times per app.
#[derive(Debug, Default)]
pub struct QuotaBook {
    apps: HashMap<String, AppWindows>,
}

/// Forgets entries at or before `now - 3600`: they can never matter again.
fn prune(times: &mut VecDeque<DateTime<Utc>>, now: DateTime<Utc>) {
    let horizon = add_seconds(now, -3600.0);
    while times.front().is_some_and(|t| *t <= horizon) {
        times.pop_front();
    }
}

impl QuotaBook {
    /// Whether a call at `now` is admitted; `Err` says how long to wait. Records nothing.
    pub fn check(
        &mut self,
        app: &str,
        api: ApiName,
        now: DateTime<Utc>,
        limits: Limits,
    ) -> Result<(), Throttle> {
        let Some(w) = self.apps.get_mut(app) else {
            return Ok(());
        };
        let times = match limits.key {
            QuotaKey::App => &mut w.all,
            QuotaKey::Endpoint => match w.per_api.get_mut(&api) {
                Some(t) => t,
                None => return Ok(()),
            },
        };
        prune(times, now);
        let mut worst: Option<(f64, Throttle)> = None;
        for (limit, window) in [(limits.per_minute, 60), (limits.per_hour, 3600)] {
            if limit == 0 {
                continue;
            }
            let start = add_seconds(now, -f64::from(window));
            let first_in = times.partition_point(|t| *t <= start);
            let in_window = times.len() - first_in;
            if in_window < limit as usize {
                continue;
            }
            // Admitted once fewer than `limit` remain: the (in_window - limit)-th oldest entry
            // of the window must leave it.
            let must_expire = times[first_in + (in_window - limit as usize)];
            let wait = seconds_between(now, add_seconds(must_expire, f64::from(window)));
            if worst.is_none_or(|(w, _)| wait > w) {
                let t = Throttle {
                    retry_after: (wait.ceil() as u64).max(1),
                    limit,
                    window,
                };
                worst = Some((wait, t));
            }
        }
        match worst {
            Some((_, t)) => Err(t),
            None => Ok(()),
        }
    }

    /// Records an admitted call.
    pub fn consume(&mut self, app: &str, api: ApiName, now: DateTime<Utc>) {
        let w = match self.apps.get_mut(app) {
            Some(w) => w,
            None => self.apps.entry(app.to_string()).or_default(),
        };
        for times in [&mut w.all, w.per_api.entry(api).or_default()] {
            prune(times, now);
            // Keep the deque sorted even if calls record out of order.
            let pos = times.partition_point(|t| *t <= now);
            times.insert(pos, now);
        }
    }

    /// Forgets every call.
    pub fn clear(&mut self) {
        self.apps.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_minute: u32, per_hour: u32, key: QuotaKey) -> Limits {
        Limits {
            per_minute,
            per_hour,
            key,
        }
    }

    fn minute(limit: u32, retry_after: u64) -> Throttle {
        Throttle {
            retry_after,
            limit,
            window: 60,
        }
    }

    #[test]
    fn minute_window_and_retry_after() {
        let t0 = Utc::now();
        let mut q = QuotaBook::default();
        let l = limits(3, 5, QuotaKey::Endpoint);
        for i in 0..3 {
            let t = add_seconds(t0, i as f64);
            assert!(q.check("a", ApiName::Isolate, t, l).is_ok());
            q.consume("a", ApiName::Isolate, t);
        }
        // Oldest entry (t0) leaves the window at t0+60; at t0+3 that is 57 s away.
        let at3 = add_seconds(t0, 3.0);
        assert_eq!(q.check("a", ApiName::Isolate, at3, l), Err(minute(3, 57)));
        assert!(q.check("b", ApiName::Isolate, at3, l).is_ok());
        assert!(q.check("a", ApiName::Unisolate, at3, l).is_ok());
        assert!(
            q.check("a", ApiName::Isolate, add_seconds(t0, 60.0), l)
                .is_ok()
        );
        q.consume("a", ApiName::Isolate, add_seconds(t0, 60.0));
        q.consume("a", ApiName::Isolate, add_seconds(t0, 61.0));
        // 5 in the hour now: the first leaves at t0+3600, and the hour window refused it.
        let hour = Throttle {
            retry_after: 3400,
            limit: 5,
            window: 3600,
        };
        assert_eq!(
            q.check("a", ApiName::Isolate, add_seconds(t0, 200.0), l),
            Err(hour)
        );
    }

    #[test]
    fn app_key_shares_one_budget_across_apis() {
        let t0 = Utc::now();
        let mut q = QuotaBook::default();
        let shared = limits(3, 0, QuotaKey::App);
        q.consume("a", ApiName::MachinesList, t0);
        q.consume("a", ApiName::ActionsGet, t0);
        q.consume("a", ApiName::Isolate, t0);
        for api in [ApiName::Unisolate, ApiName::MachinesGet, ApiName::Isolate] {
            assert_eq!(q.check("a", api, t0, shared), Err(minute(3, 60)));
        }
        assert!(q.check("b", ApiName::Isolate, t0, shared).is_ok());
        // The same history, counted per endpoint: one call each, far from the limit.
        let separate = limits(3, 0, QuotaKey::Endpoint);
        assert!(q.check("a", ApiName::Isolate, t0, separate).is_ok());
        assert!(q.check("a", ApiName::Unisolate, t0, separate).is_ok());
    }

    #[test]
    fn error_wording_follows_the_mode() {
        let body = |e: &ApiError| e.message.clone();
        let t = minute(30, 8);
        let real = "Maximum allowed 30 per 00:01:00 for the key Destination+TenantID+AppID. \
                    You can send requests again in 8 seconds";
        let h = t.error(RetryAfterMode::Header);
        assert_eq!((h.retry_after, body(&h).as_str()), (Some(8), real));
        let b = t.error(RetryAfterMode::BodyOnly);
        assert_eq!((b.retry_after, body(&b).as_str()), (None, real));
        let n = t.error(RetryAfterMode::None);
        assert_eq!(n.retry_after, None);
        assert!(!body(&n).contains("again in"), "{}", body(&n));
        assert!(body(&n).starts_with("Maximum allowed 30 per 00:01:00 "));
        let l = t.error(RetryAfterMode::Long);
        assert_eq!((l.retry_after, body(&l).as_str()), (Some(68), real));
        let hour = Throttle {
            retry_after: 2700,
            limit: 1500,
            window: 3600,
        };
        assert!(
            body(&hour.error(RetryAfterMode::Header))
                .starts_with("Maximum allowed 1500 per 01:00:00 ")
        );
        assert_eq!(hour.error(RetryAfterMode::Long).retry_after, Some(6300));
        assert_eq!(h.code, "TooManyRequests");
        assert_eq!(h.status.as_u16(), 429);
    }
}
