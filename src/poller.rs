//! The batch poller: one task keeps the shared [`ActionView`] fresh with O(1) list calls per cycle
//! whatever the number of resources, and wakes the resources whose machines changed.
//!
//! One cycle is one `GET /api/machineactions` whose filter asks for every Isolate/Unisolate action
//! that is open *or* was created recently (young actions finish within minutes, so their final
//! state arrives in the same call; anyone's new action shows up for drift detection). Only actions
//! that leave the open set when older than that window need a second call, `id in (...)`, in pages.
//! The interval is short while young actions are open and grows with their age, so a crowd of
//! offline devices, pending for days, costs a few reads an hour.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::http::Health;
use crate::mde::client::MdeClient;
use crate::mde::error::ErrorClass;
use crate::mde::odata::{Filter, ListQuery};
use crate::metrics::Metrics;
use crate::quota::{Api, Priority};
use crate::recall;
use crate::reconcile::{ResourceRef, failure_of};
use crate::view::{ActionView, fact_of};

/// Quota key of the poller's reads while young actions are open (served first).
pub const POLLER_KEY: &str = "batch-poller";

/// Quota key of the poller's reads otherwise: old open actions and drift checks (served last).
pub const DRIFT_KEY: &str = "drift-poller";

/// Largest `id in (...)` list per call (keeps URLs short).
const IDS_PER_CALL: usize = 40;

/// Poll timings, already scaled to the operator's clock.
#[derive(Clone, Debug, PartialEq)]
pub struct PollTiming {
    /// Shortest interval: while a young action is open, and the first look after a POST.
    pub fast: Duration,
    /// Longest interval while actions are open. It is the drift interval, so that a foreign
    /// action is still seen within one drift interval while old (offline) actions are pending.
    pub max_open: Duration,
    /// Interval while nothing is open: how often anyone's new actions are read for drift
    /// detection. Also the delay before the first load when no resource asks for the view sooner,
    /// so that a restart over converged resources makes no call at all for that long.
    pub idle: Duration,
    /// Actions younger than this come back whatever their status.
    pub young_window: Duration,
    /// Overlap between consecutive "created since" windows (slow writes on MDE's side).
    pub overlap: Duration,
    /// How many of MDE's seconds pass in one of this clock's: 1 against MDE, the time scale
    /// against `mde-sim`. The "created since" bound is computed on MDE's clock (from its own
    /// stamps), so the young window and the overlap are stretched by this factor there.
    pub mde_clock_rate: f64,
}

impl PollTiming {
    /// Production timings divided by `time_scale`, with the given drift interval (unscaled).
    ///
    /// The fast interval is 20 s: MDE actions on online devices take about a minute, so a young
    /// action is seen finished at most 20 s late after about three reads, and a burst of
    /// N POSTs (paced by the quota at 100 a minute) costs about three reads a minute for the
    /// whole tenant, not one per device.
    pub fn scaled(time_scale: f64, drift_interval: Duration) -> Self {
        let s = |secs: u64| Duration::from_secs(secs).div_f64(time_scale);
        let drift = drift_interval.div_f64(time_scale);
        PollTiming {
            fast: s(20),
            max_open: drift.max(s(20)),
            idle: drift,
            young_window: s(300),
            overlap: s(60),
            mde_clock_rate: time_scale,
        }
    }
}

/// The interval after a cycle: a quarter of the youngest open action's age, clamped to
/// `[fast, max_open]`; `idle` when nothing is open. Growing with age keeps the reads an action
/// costs logarithmic in how long it stays open, whatever the number of open actions.
pub fn next_interval(youngest_open_age: Option<Duration>, t: &PollTiming) -> Duration {
    match youngest_open_age {
        None => t.idle,
        Some(age) => (age / 4).clamp(t.fast, t.max_open),
    }
}

/// Lower bound of a cycle's "created since" window, on MDE's clock: the newest creation time MDE
/// stamped on any action seen so far, less the young window and the overlap. Computing it from
/// MDE's own stamps, not from this clock, keeps the window right whatever the skew between the
/// two clocks: a bound from this clock would miss new actions when MDE's clock is behind, and
/// return the whole history on every cycle when it runs ahead (as `mde-sim`'s does at a time
/// scale). Without any stamp (an empty tenant), `fallback` (this clock's bound) is used.
pub fn created_since(
    newest_stamp: Option<DateTime<Utc>>,
    t: &PollTiming,
    fallback: DateTime<Utc>,
) -> DateTime<Utc> {
    match newest_stamp {
        Some(newest) => {
            let back = (t.young_window + t.overlap).mul_f64(t.mde_clock_rate.max(1.0));
            newest - chrono::Duration::from_std(back).unwrap_or_default()
        }
        None => fallback,
    }
}

/// The cycle's filter: Isolate/Unisolate actions that are open or were created at or after `since`.
pub fn cycle_filter(since: DateTime<Utc>) -> Filter {
    isolation_types().and(
        Filter::is_in("status", ["Pending", "InProgress"])
            .or(Filter::ge("creationDateTimeUtc", since)),
    )
}

fn isolation_types() -> Filter {
    Filter::is_in("type", ["Isolate", "Unisolate"])
}

/// Query of the first load: the tenant's isolation actions, newest first, in pages of 10,000.
pub fn initial_query() -> ListQuery {
    ListQuery {
        filter: Some(isolation_types()),
        top: Some(10_000),
        orderby: Some("creationDateTimeUtc desc".into()),
        ..ListQuery::default()
    }
}

/// Delivers wake-ups to the controllers.
pub trait Wake: Send + Sync {
    /// Asks for `resource` to be reconciled soon.
    fn wake(&self, resource: &ResourceRef);
    /// Asks for a DeviceIsolationSet to be reconciled soon (its connection changed).
    fn wake_set(&self, _set: &kube::runtime::reflector::ObjectRef<crate::crd::DeviceIsolationSet>) {
    }
}

/// The poller task.
pub struct Poller {
    /// MDE client (reads only).
    pub client: MdeClient,
    /// Shared view to fill.
    pub view: Arc<ActionView>,
    /// Where wake-ups go.
    pub waker: Arc<dyn Wake>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Liveness heartbeat.
    pub health: Arc<Health>,
    /// Timings.
    pub timing: PollTiming,
    /// Signalled when a new action was created or a resource needs the view loaded, so the next
    /// cycle comes soon.
    pub nudge: Arc<Notify>,
}

impl Poller {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        // Reads are served in this order when quota is short: the status of young actions that
        // people are watching, then per-resource lookups (Normal), then background drift reads.
        let gate = self.client.gate();
        gate.set_priority(POLLER_KEY, Priority::High);
        gate.set_priority(DRIFT_KEY, Priority::Low);
        // Becoming leader: a previous process may have just used the budget. Mutating calls are
        // rebuilt from MDE's record with the first load (`recall`); of the others MDE keeps no
        // record, so assume the last short window was used at an even pace.
        let start = tokio::time::Instant::now();
        for api in Api::all() {
            if recall::recorded(api) {
                gate.await_record(api);
            } else {
                gate.assume_recent_use(api, start);
            }
        }
        // Load the view only when a resource needs it, or for the first drift check.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(self.timing.idle) => {}
            _ = self.nudge.notified() => {}
        }
        let mut last_start: Option<DateTime<Utc>> = None;
        loop {
            self.health.poller_beat();
            let started = Utc::now();
            let wait = match self.cycle(last_start).await {
                Ok(()) => {
                    last_start = Some(started);
                    next_interval(self.view.youngest_open_age(Utc::now()), &self.timing)
                }
                Err(wait) => wait,
            };
            self.publish_gauges(wait);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.nudge.notified() => {
                    // A new action: come back after the fast interval, not the long one.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(self.timing.fast.min(wait)) => {}
                    }
                }
            }
        }
    }

    /// One cycle. On failure returns how long to wait before the next try.
    async fn cycle(&self, last_start: Option<DateTime<Utc>>) -> Result<(), Duration> {
        let first = !self.view.is_synced();
        let query = match last_start {
            Some(last) if !first => {
                let young = Utc::now()
                    - chrono::Duration::from_std(self.timing.young_window).unwrap_or_default();
                let fallback = young.min(
                    last - chrono::Duration::from_std(self.timing.overlap).unwrap_or_default(),
                );
                let since = created_since(self.view.newest_created_at(), &self.timing, fallback);
                ListQuery {
                    filter: Some(cycle_filter(since)),
                    top: Some(10_000),
                    ..ListQuery::default()
                }
            }
            _ => initial_query(),
        };
        let previously_open: HashSet<String> = self.view.open_action_ids().into_iter().collect();
        let actions = self.list(&query).await?;
        let returned: HashSet<String> = actions.iter().map(|a| a.id.clone()).collect();
        let mut changed = self.view.upsert(actions.iter().filter_map(fact_of));

        // Open actions that left the open set while older than the window: fetch their end.
        let left: Vec<String> = previously_open
            .into_iter()
            .filter(|id| !returned.contains(id))
            .collect();
        for chunk in left.chunks(IDS_PER_CALL) {
            let query = ListQuery {
                filter: Some(Filter::is_in("id", chunk.iter().map(String::as_str))),
                top: Some(10_000),
                ..ListQuery::default()
            };
            let ended = self.list(&query).await?;
            changed.extend(self.view.upsert(ended.iter().filter_map(fact_of)));
        }
        if first {
            // Before any request can go (requests wait for the view): the calls a previous
            // process made in the last hour, from MDE's record.
            self.recall_quota(&actions);
            self.view.mark_synced();
            tracing::info!(
                actions = actions.len(),
                "loaded the tenant's isolation actions"
            );
        }
        for resource in self.view.watchers_of(changed.iter()) {
            self.waker.wake(&resource);
        }
        Ok(())
    }

    /// Rebuilds the gate's record of this application's mutating calls from MDE's, and lets
    /// them go (the gate held them since this process became leader).
    fn recall_quota(&self, actions: &[crate::mde::model::MachineAction]) {
        // MDE's clock: its `Date`, else (no `Date` header) its newest action, a lower bound.
        let mde_now = self
            .client
            .mde_now()
            .or_else(|| actions.iter().filter_map(|a| a.created_at).max());
        let now = tokio::time::Instant::now();
        let calls = mde_now.map_or_else(Vec::new, |mde_now| {
            recall::calls_of_app(actions, mde_now, self.timing.mde_clock_rate, now)
        });
        let gate = self.client.gate();
        for api in Api::all().into_iter().filter(|a| recall::recorded(*a)) {
            let times: Vec<_> = calls.iter().filter(|c| c.0 == api).map(|c| c.1).collect();
            tracing::info!(
                api = api.as_str(),
                calls = times.len(),
                "recalled this application's calls of the last hour from MDE's record"
            );
            gate.recall(api, times, now);
        }
    }

    async fn list(
        &self,
        query: &ListQuery,
    ) -> Result<Vec<crate::mde::model::MachineAction>, Duration> {
        let young = self
            .view
            .youngest_open_age(Utc::now())
            .is_some_and(|age| age < self.timing.young_window);
        let key = if young { POLLER_KEY } else { DRIFT_KEY };
        match self.client.list_actions(query, key).await {
            Ok(actions) => Ok(actions),
            Err(e) => {
                let wait = match e.class() {
                    ErrorClass::QuotaWait { until } => {
                        until.saturating_duration_since(tokio::time::Instant::now())
                    }
                    ErrorClass::RateLimited { retry_after } => retry_after,
                    _ => self.timing.fast,
                };
                tracing::warn!(error = %e, retry_in = ?wait, "batch poll failed");
                // Resources waiting for the first load say why it fails (a refused credential).
                self.view.set_load_failure(failure_of(&e));
                Err(wait.max(Duration::from_millis(10)))
            }
        }
    }

    fn publish_gauges(&self, interval: Duration) {
        let (open, oldest) = self.view.open_summary(Utc::now());
        self.metrics.open_actions.set(open as i64);
        self.metrics
            .oldest_open_action_age_seconds
            .set(oldest.map(|d| d.as_secs_f64()).unwrap_or(0.0));
        self.metrics
            .poll_interval_seconds
            .set(interval.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_fast_for_young_actions_and_grows_with_age() {
        let t = PollTiming::scaled(1.0, Duration::from_secs(360));
        assert_eq!(next_interval(None, &t), Duration::from_secs(360));
        assert_eq!(next_interval(Some(Duration::from_secs(5)), &t), t.fast);
        assert_eq!(t.fast, Duration::from_secs(20));
        assert_eq!(
            next_interval(Some(Duration::from_secs(600)), &t),
            Duration::from_secs(150)
        );
        assert_eq!(
            next_interval(Some(Duration::from_secs(86_400)), &t),
            Duration::from_secs(360)
        );
    }

    #[test]
    fn old_open_actions_are_polled_at_the_drift_interval_at_most() {
        // Drift must be seen within one drift interval even while offline devices are pending.
        let t = PollTiming::scaled(1.0, Duration::from_secs(120));
        assert_eq!(
            next_interval(Some(Duration::from_secs(86_400)), &t),
            Duration::from_secs(120)
        );
    }

    #[test]
    fn a_crowd_of_old_offline_actions_costs_a_few_reads_an_hour() {
        // The youngest pending action is an hour old or more: at most 10 cycles an hour with the
        // default drift interval, however many actions are pending (one call reads them all).
        let t = PollTiming::scaled(1.0, Duration::from_secs(360));
        let per_hour = 3600.0 / next_interval(Some(Duration::from_secs(3600)), &t).as_secs_f64();
        assert!(per_hour <= 10.0, "{per_hour} cycles per hour");
    }

    #[test]
    fn one_action_that_ends_in_a_minute_costs_about_three_cycles() {
        // Cycles after a POST at age 0: the first after `fast`, then every max(fast, age / 4).
        let t = PollTiming::scaled(1.0, Duration::from_secs(360));
        let (mut age, mut cycles) = (t.fast, 1);
        while age < Duration::from_secs(60) {
            age += next_interval(Some(age), &t);
            cycles += 1;
        }
        assert_eq!(cycles, 3, "cycles until an action of 60 s is seen ended");
    }

    #[test]
    fn timings_scale_with_the_time_scale() {
        let t = PollTiming::scaled(60.0, Duration::from_secs(360));
        assert_eq!(t.idle, Duration::from_secs(6));
        assert_eq!(
            t.fast,
            Duration::from_millis(333) + Duration::from_nanos(333_333)
        );
    }

    #[test]
    fn created_since_follows_mdes_clock_not_this_one() {
        let t = PollTiming::scaled(1.0, Duration::from_secs(360));
        let newest = DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let ours = newest + chrono::Duration::hours(3);
        // Six minutes (young window and overlap) before MDE's newest stamp, whatever our clock says.
        assert_eq!(
            created_since(Some(newest), &t, ours),
            newest - chrono::Duration::minutes(6)
        );
        // Against the simulator at scale 60, six of its (simulated) minutes.
        let sim = PollTiming::scaled(60.0, Duration::from_secs(360));
        let since = created_since(Some(newest), &sim, ours);
        assert!(
            (newest - since - chrono::Duration::minutes(6))
                .num_milliseconds()
                .abs()
                < 10
        );
        // No stamp yet: this clock's bound.
        assert_eq!(created_since(None, &t, ours), ours);
    }

    #[test]
    fn cycle_filter_asks_for_open_or_recent_isolation_actions_in_one_call() {
        let since = DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let s = cycle_filter(since).to_string();
        assert!(s.contains("type in ('Isolate','Unisolate')"), "{s}");
        assert!(s.contains("status in ('Pending','InProgress')"), "{s}");
        assert!(
            s.contains("creationDateTimeUtc ge 2026-11-28T10:00:00Z"),
            "{s}"
        );
        assert!(s.contains(" or "), "{s}");
    }
}
