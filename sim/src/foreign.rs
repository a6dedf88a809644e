//! Foreign load: another application spending calls of the same quota key as the tenant's
//! app(s), as a second tool using the same app registration does.
//!
//! The load is a schedule, not a task: entry `e` makes its call number `i` at
//! `origin + (i / n) minutes + (i % n) * 60 s / n` (`constant`) or at the start of minute `i / n`
//! (`burst`), `n` being its calls per minute and `origin` the simulated time the load was set.
//! `play` runs every scheduled call at or before a time, in time order, through the quota as a
//! real client's call: admitted calls consume quota, refused ones do not. The simulator plays
//! the schedule before every quota check and statistics read, so foreign calls interleave
//! exactly with real ones under a frozen clock moved by hand or under any time scale.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::calls::ApiName;
use crate::clock::fmt7;
use crate::quota::{Limits, QuotaBook};
use crate::tenant::App;

/// Most calls per minute one entry may make.
pub const MAX_PER_MINUTE: u32 = 10_000;

/// Most calls one `play` runs one by one; beyond that (a very long jump of the clock) the
/// calls older than `CATCH_UP_SECS` before now are skipped, counted as `skipped`.
const MAX_PLAYED: u64 = 2_000_000;

/// How far back a skipping `play` still runs calls (two quota hours).
const CATCH_UP_SECS: i64 = 7200;

/// 100 ns ticks in a minute.
const MINUTE_TICKS: i64 = 600_000_000;

/// How an entry spreads a minute's calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Evenly over the minute, the first at its start.
    #[default]
    Constant,
    /// All at the start of the minute.
    Burst,
}

/// One API the other application calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadEntry {
    /// The API (`unisolate`, `machineactions-list`, ...).
    pub api: ApiName,
    /// Calls per simulated minute (1..=10000).
    pub per_minute: u32,
    /// Spread over the minute.
    #[serde(default)]
    pub pattern: Pattern,
    /// Only the quota key of this app (client id); absent: every registered app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

/// The value of `--foreign-load`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSpec(pub Vec<LoadEntry>);

/// APIs that consume quota, hence that foreign load can call.
fn counted_apis() -> impl Iterator<Item = ApiName> {
    ApiName::ALL
        .into_iter()
        .filter(|a| !matches!(a, ApiName::Token | ApiName::Unknown))
}

fn check_api(api: ApiName) -> Result<(), String> {
    if counted_apis().any(|a| a == api) {
        return Ok(());
    }
    let names: Vec<&str> = counted_apis().map(ApiName::as_str).collect();
    Err(format!(
        "foreign load cannot call {:?}: use one of {}",
        api.as_str(),
        names.join(", ")
    ))
}

fn check_rate(per_minute: u32) -> Result<(), String> {
    if (1..=MAX_PER_MINUTE).contains(&per_minute) {
        Ok(())
    } else {
        Err(format!(
            "foreign load calls per minute must be 1..={MAX_PER_MINUTE}, got {per_minute}"
        ))
    }
}

/// Parses `<api>:<calls per minute>[:burst|:constant]`, comma separated; empty or `none` is
/// no load.
pub fn parse_spec(s: &str) -> Result<LoadSpec, String> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(LoadSpec::default());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let fields: Vec<&str> = part.split(':').collect();
        let shape = || format!("{part:?} is not <api>:<calls per minute>[:burst]");
        let (api, rate, pattern) = match fields.as_slice() {
            [api, rate] => (*api, *rate, Pattern::Constant),
            [api, rate, "burst"] => (*api, *rate, Pattern::Burst),
            [api, rate, "constant"] => (*api, *rate, Pattern::Constant),
            _ => return Err(shape()),
        };
        let api = ApiName::parse(api).ok_or_else(|| {
            let names: Vec<&str> = counted_apis().map(ApiName::as_str).collect();
            format!(
                "unknown api {api:?} in {part:?}: use one of {}",
                names.join(", ")
            )
        })?;
        check_api(api)?;
        let per_minute = rate.parse().map_err(|_| shape())?;
        check_rate(per_minute)?;
        out.push(LoadEntry {
            api,
            per_minute,
            pattern,
            app: None,
        });
    }
    Ok(LoadSpec(out))
}

/// Rejects entries the simulator cannot play (admin API).
pub fn validate(entries: &[LoadEntry], apps: &[App]) -> Result<(), String> {
    for e in entries {
        check_api(e.api)?;
        check_rate(e.per_minute)?;
        if let Some(app) = &e.app
            && !apps.iter().any(|a| &a.client_id == app)
        {
            return Err(format!("foreign load names an unknown app {app:?}"));
        }
    }
    Ok(())
}

/// Foreign calls of one app and API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Admitted: they consumed quota.
    pub admitted: u64,
    /// Refused by the quota (429 to the other application); they consumed nothing.
    pub refused: u64,
    /// Skipped without a quota check after a clock jump too long to play call by call.
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The load in force, where its schedule stands, and what it did so far.
#[derive(Debug)]
pub struct ForeignLoad {
    entries: Vec<LoadEntry>,
    origin: DateTime<Utc>,
    /// Per entry: the number of its calls already played.
    played: Vec<u64>,
    tally: BTreeMap<String, BTreeMap<ApiName, Tally>>,
}

impl ForeignLoad {
    /// `entries` from `origin` on, nothing played yet.
    pub fn new(entries: Vec<LoadEntry>, origin: DateTime<Utc>) -> Self {
        Self {
            played: vec![0; entries.len()],
            entries,
            origin,
            tally: BTreeMap::new(),
        }
    }

    /// Replaces the load from `now` on, keeping the tallies. Play up to `now` first.
    pub fn set(&mut self, entries: Vec<LoadEntry>, now: DateTime<Utc>) {
        let tally = std::mem::take(&mut self.tally);
        *self = Self::new(entries, now);
        self.tally = tally;
    }

    /// `{"load": [...], "since": time}`.
    pub fn describe(&self) -> Value {
        json!({"load": self.entries, "since": fmt7(self.origin)})
    }

    /// `describe` plus the tallies: `apis` sums every app (every quota-counted API, zeros
    /// included), `byApp` splits them.
    pub fn report(&self) -> Value {
        let mut apis: BTreeMap<&str, Tally> = counted_apis()
            .map(|a| (a.as_str(), Tally::default()))
            .collect();
        for per_api in self.tally.values() {
            for (api, t) in per_api {
                let sum = apis.entry(api.as_str()).or_default();
                sum.admitted += t.admitted;
                sum.refused += t.refused;
                sum.skipped += t.skipped;
            }
        }
        let by_app: BTreeMap<&str, BTreeMap<&str, Tally>> = self
            .tally
            .iter()
            .map(|(app, m)| {
                (
                    app.as_str(),
                    m.iter().map(|(a, t)| (a.as_str(), *t)).collect(),
                )
            })
            .collect();
        let mut v = self.describe();
        v["apis"] = json!(apis);
        v["byApp"] = json!(by_app);
        v
    }

    /// Ticks after `origin` of call `i` of entry `e`.
    fn offset(&self, e: usize, i: u64) -> i64 {
        let n = i64::from(self.entries[e].per_minute);
        let i = i as i64;
        let minute = i / n * MINUTE_TICKS;
        match self.entries[e].pattern {
            Pattern::Constant => minute + i % n * MINUTE_TICKS / n,
            Pattern::Burst => minute,
        }
    }

    /// Number of calls of entry `e` scheduled at or before `ticks` after `origin`.
    fn due(&self, e: usize, ticks: i64) -> u64 {
        if ticks < 0 {
            return 0;
        }
        let n = u64::from(self.entries[e].per_minute);
        // Call `hi` is in the minute after `ticks`, hence later.
        let (mut lo, mut hi) = (0u64, (ticks / MINUTE_TICKS) as u64 * n + n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.offset(e, mid) <= ticks {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Per entry, the client ids whose quota key it spends.
    fn targets(&self, apps: &[App]) -> Vec<Vec<String>> {
        let all: Vec<String> = apps.iter().map(|a| a.client_id.clone()).collect();
        self.entries
            .iter()
            .map(|e| match &e.app {
                Some(app) => vec![app.clone()],
                None => all.clone(),
            })
            .collect()
    }

    fn count(&mut self, app: &str, api: ApiName, f: impl FnOnce(&mut Tally)) {
        if !self.tally.contains_key(app) {
            self.tally.insert(app.to_string(), BTreeMap::new());
        }
        if let Some(per_api) = self.tally.get_mut(app) {
            f(per_api.entry(api).or_default());
        }
    }

    /// Runs every scheduled call at or before `now`, in time order (ties: entry order), each
    /// for every app it targets, through the quota.
    pub fn play(
        &mut self,
        now: DateTime<Utc>,
        quota: &mut QuotaBook,
        apps: &[App],
        limits: Limits,
    ) {
        let Some(now_ticks) = ticks_between(self.origin, now) else {
            return;
        };
        let targets = self.targets(apps);
        let pending: u64 = (0..self.entries.len())
            .map(|e| (self.due(e, now_ticks) - self.played[e]) * targets[e].len() as u64)
            .sum();
        if pending > MAX_PLAYED {
            self.skip_to(now_ticks - CATCH_UP_SECS * 10_000_000, &targets);
        }
        loop {
            let next = (0..self.entries.len())
                .map(|e| (self.offset(e, self.played[e]), e))
                .filter(|(t, _)| *t <= now_ticks)
                .min();
            let Some((t, e)) = next else {
                break;
            };
            let at = self.origin + TimeDelta::nanoseconds(t * 100);
            let api = self.entries[e].api;
            for app in &targets[e] {
                let admitted = quota.check(app, api, at, limits).is_ok();
                if admitted {
                    quota.consume(app, api, at);
                }
                self.count(app, api, |t| {
                    if admitted {
                        t.admitted += 1;
                    } else {
                        t.refused += 1;
                    }
                });
            }
            self.played[e] += 1;
        }
    }

    /// Marks every call scheduled at or before `ticks` as played without a quota check.
    fn skip_to(&mut self, ticks: i64, targets: &[Vec<String>]) {
        for (e, apps) in targets.iter().enumerate() {
            let due = self.due(e, ticks);
            if due <= self.played[e] {
                continue;
            }
            let skipped = due - self.played[e];
            self.played[e] = due;
            let api = self.entries[e].api;
            for app in apps {
                self.count(app, api, |t| t.skipped += skipped);
            }
        }
    }
}

/// 100 ns ticks from `a` to `b`; `None` when `b` is before `a`.
fn ticks_between(a: DateTime<Utc>, b: DateTime<Utc>) -> Option<i64> {
    let d = (b - a).num_nanoseconds()? / 100;
    (d >= 0).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::add_seconds;
    use crate::config::QuotaKey;

    fn app(id: &str) -> App {
        App {
            client_id: id.into(),
            client_secret: None,
            roles: Vec::new(),
            display_name: id.into(),
            allow_assertion: false,
            certificates: Vec::new(),
            federated: Vec::new(),
        }
    }

    fn limits(per_minute: u32, key: QuotaKey) -> Limits {
        Limits {
            per_minute,
            per_hour: 0,
            key,
        }
    }

    fn entry(api: ApiName, per_minute: u32, pattern: Pattern) -> LoadEntry {
        LoadEntry {
            api,
            per_minute,
            pattern,
            app: None,
        }
    }

    fn tally(f: &ForeignLoad, app: &str, api: ApiName) -> Tally {
        f.tally
            .get(app)
            .and_then(|m| m.get(&api))
            .copied()
            .unwrap_or_default()
    }

    #[test]
    fn spec_parses_and_rejects_clearly() {
        let s = parse_spec("unisolate:50, machineactions-list:80:burst").unwrap();
        assert_eq!(
            s.0,
            vec![
                entry(ApiName::Unisolate, 50, Pattern::Constant),
                entry(ApiName::ActionsList, 80, Pattern::Burst),
            ]
        );
        assert_eq!(parse_spec("").unwrap(), LoadSpec::default());
        assert_eq!(parse_spec("none").unwrap(), LoadSpec::default());
        for (bad, says) in [
            ("unisolate", "is not <api>:<calls per minute>[:burst]"),
            ("unisolate:x", "is not <api>:<calls per minute>[:burst]"),
            (
                "unisolate:5:spiky",
                "is not <api>:<calls per minute>[:burst]",
            ),
            ("release:5", "unknown api \"release\""),
            ("token:5", "cannot call \"token\""),
            ("unisolate:0", "must be 1..=10000"),
            ("isolate:5,", "is not <api>"),
        ] {
            let e = parse_spec(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn schedule_spreads_or_bursts_each_minute() {
        let t0 = Utc::now();
        let f = ForeignLoad::new(
            vec![
                entry(ApiName::Unisolate, 4, Pattern::Constant),
                entry(ApiName::Isolate, 3, Pattern::Burst),
            ],
            t0,
        );
        let secs = |e, i| f.offset(e, i) as f64 / 1e7;
        assert_eq!(
            (0..6).map(|i| secs(0, i)).collect::<Vec<_>>(),
            [0.0, 15.0, 30.0, 45.0, 60.0, 75.0]
        );
        assert_eq!(
            (0..4).map(|i| secs(1, i)).collect::<Vec<_>>(),
            [0.0, 0.0, 0.0, 60.0]
        );
        let at = |s: i64| s * 10_000_000;
        assert_eq!(f.due(0, -1), 0);
        assert_eq!(f.due(0, 0), 1);
        assert_eq!(f.due(0, at(44)), 3);
        assert_eq!(f.due(0, at(45)), 4);
        assert_eq!(f.due(0, at(60)), 5);
        assert_eq!(f.due(1, 0), 3);
        assert_eq!(f.due(1, at(59)), 3);
        assert_eq!(f.due(1, at(120)), 9);
    }

    #[test]
    fn played_calls_consume_quota_and_refused_ones_do_not() {
        let t0 = Utc::now();
        let apps = [app("a")];
        let l = limits(10, QuotaKey::Endpoint);
        let mut q = QuotaBook::default();
        // The app made 8 unisolates at t0; the other app starts one second later.
        for _ in 0..8 {
            q.consume("a", ApiName::Unisolate, t0);
        }
        let mut f = ForeignLoad::new(
            vec![entry(ApiName::Unisolate, 4, Pattern::Constant)],
            add_seconds(t0, 1.0),
        );
        // Due at 1, 16, 31, 46: two fit, two are refused.
        let at59 = add_seconds(t0, 59.0);
        f.play(at59, &mut q, &apps, l);
        let t = tally(&f, "a", ApiName::Unisolate);
        assert_eq!((t.admitted, t.refused), (2, 2));
        assert!(q.check("a", ApiName::Unisolate, at59, l).is_err());
        assert!(q.check("a", ApiName::Isolate, at59, l).is_ok());
        // At 60 the app's 8 leave the window; at 61 the call from 1 leaves too and the one due
        // at 61 is admitted: the refused ones took no room, so 8 slots are free.
        let at61 = add_seconds(t0, 61.0);
        f.play(at61, &mut q, &apps, l);
        let t = tally(&f, "a", ApiName::Unisolate);
        assert_eq!((t.admitted, t.refused), (3, 2));
        for _ in 0..8 {
            assert!(q.check("a", ApiName::Unisolate, at61, l).is_ok());
            q.consume("a", ApiName::Unisolate, at61);
        }
        assert!(q.check("a", ApiName::Unisolate, at61, l).is_err());
    }

    #[test]
    fn burst_takes_what_is_left_at_the_minute_start() {
        let t0 = Utc::now();
        let apps = [app("a"), app("b")];
        let l = limits(10, QuotaKey::App);
        let mut q = QuotaBook::default();
        q.consume("a", ApiName::MachinesList, t0);
        let mut f = ForeignLoad::new(vec![entry(ApiName::Isolate, 12, Pattern::Burst)], t0);
        f.play(t0, &mut q, &apps, l);
        // One budget per app: a had used one (a read), b none.
        assert_eq!(
            tally(&f, "a", ApiName::Isolate),
            Tally {
                admitted: 9,
                refused: 3,
                skipped: 0
            }
        );
        assert_eq!(
            tally(&f, "b", ApiName::Isolate),
            Tally {
                admitted: 10,
                refused: 2,
                skipped: 0
            }
        );
        assert!(q.check("b", ApiName::Unisolate, t0, l).is_err());
        let report = f.report();
        assert_eq!(report["apis"]["isolate"]["admitted"], 19);
        assert_eq!(report["apis"]["isolate"]["refused"], 5);
        assert_eq!(report["apis"]["unisolate"]["admitted"], 0);
        assert_eq!(report["byApp"]["b"]["isolate"]["refused"], 2);
    }

    #[test]
    fn set_restarts_the_schedule_and_keeps_tallies() {
        let t0 = Utc::now();
        let apps = [app("a")];
        let l = limits(0, QuotaKey::Endpoint);
        let mut q = QuotaBook::default();
        let mut f = ForeignLoad::new(vec![entry(ApiName::Unisolate, 2, Pattern::Constant)], t0);
        let t1 = add_seconds(t0, 40.0);
        f.play(t1, &mut q, &apps, l);
        f.set(vec![entry(ApiName::Isolate, 60, Pattern::Constant)], t1);
        f.play(add_seconds(t1, 9.5), &mut q, &apps, l);
        assert_eq!(tally(&f, "a", ApiName::Unisolate).admitted, 2);
        assert_eq!(tally(&f, "a", ApiName::Isolate).admitted, 10);
        assert_eq!(f.describe()["load"][0]["api"], "isolate");
        assert_eq!(f.describe()["since"], fmt7(t1));
    }

    #[test]
    fn a_huge_clock_jump_skips_old_calls_instead_of_hanging() {
        let t0 = Utc::now();
        let apps = [app("a")];
        let l = limits(100, QuotaKey::Endpoint);
        let mut q = QuotaBook::default();
        let mut f = ForeignLoad::new(vec![entry(ApiName::Unisolate, 2000, Pattern::Constant)], t0);
        f.play(add_seconds(t0, 30.0 * 86400.0), &mut q, &apps, l);
        let t = tally(&f, "a", ApiName::Unisolate);
        assert!(t.skipped > 0);
        // Every scheduled call is accounted for exactly once.
        assert_eq!(t.admitted + t.refused + t.skipped, 30 * 1440 * 2000 + 1);
        // The two hours played were judged by the quota: 100 per minute admitted.
        assert_eq!(t.admitted, 120 * 100);
    }
}
