//! Prometheus metrics. Labels are bounded: API names, outcomes, windows, reconcile results;
//! never object names or machine ids.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::mde::client::CallObserver;
use crate::quota::{Api, QuotaGate, Span};

/// Labels of an MDE call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// API name (quota bucket).
    pub api: String,
    /// Outcome class, e.g. `ok`, `rate_limited`, `not_found`.
    pub outcome: String,
}

/// Labels naming one API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// API name (quota bucket).
    pub api: String,
}

/// Labels of a quota window.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabels {
    /// API name (quota bucket).
    pub api: String,
    /// `minute` or `hour`.
    pub window: String,
}

/// Labels of a resource count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `ready`, `reconciling`, `stalled` or `unknown` (no status yet).
    pub phase: String,
}

/// Labels of a per-resource owner.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OwnerLabels {
    /// `memory` (per-resource process memory), `view` (interest in a machine) or `quota`
    /// (reservations and priority classes).
    pub owner: String,
}

/// Labels of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// MDE calls by API and outcome (429s have outcome `rate_limited`).
    pub mde_calls: Family<CallLabels, Counter>,
    /// MDE call latency by API.
    pub mde_call_seconds: Family<ApiLabels, Histogram>,
    /// Calls left in each quota window.
    pub quota_remaining: Family<WindowLabels, Gauge>,
    /// Calls allowed per window in force: the budget, or below it what MDE was learned to allow
    /// (other tools spend the same quota key).
    pub quota_limit: Family<WindowLabels, Gauge>,
    /// 429 episodes (a first 429 after a time without one) per API.
    pub quota_throttle_episodes: Family<ApiLabels, Counter>,
    /// Seconds that requests were told to wait for a quota slot.
    pub quota_wait_seconds: Family<ApiLabels, Counter<f64, AtomicU64>>,
    /// Open Isolate/Unisolate actions in the tenant (anyone's).
    pub open_actions: Gauge,
    /// Age of the oldest open action, in seconds.
    pub oldest_open_action_age_seconds: Gauge<f64, AtomicU64>,
    /// Current interval of the batch poller, in seconds.
    pub poll_interval_seconds: Gauge<f64, AtomicU64>,
    /// Watched DeviceIsolations by phase (from their conditions).
    pub resources: Family<PhaseLabels, Gauge>,
    /// Resources each per-resource owner holds state for; back to 0 once they are deleted.
    pub tracked_resources: Family<OwnerLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mde_isolation");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        let mde_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "mde_calls",
            "MDE API calls by API and outcome",
            mde_calls.clone(),
        );
        let mde_call_seconds = Family::<ApiLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 12))
        });
        registry.register(
            "mde_call_duration_seconds",
            "MDE API call latency",
            mde_call_seconds.clone(),
        );
        let quota_remaining = Family::<WindowLabels, Gauge>::default();
        registry.register(
            "quota_remaining",
            "Calls left in the operator's quota window, per API",
            quota_remaining.clone(),
        );
        let quota_limit = Family::<WindowLabels, Gauge>::default();
        registry.register(
            "quota_limit",
            "Calls per window the operator allows itself per API: the budget, or the lower limit learned from MDE's 429s",
            quota_limit.clone(),
        );
        let quota_throttle_episodes = Family::<ApiLabels, Counter>::default();
        registry.register(
            "quota_throttle_episodes",
            "Episodes of 429 answers per API (a first 429 after a time without one)",
            quota_throttle_episodes.clone(),
        );
        let quota_wait_seconds = Family::<ApiLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "quota_wait_seconds",
            "Seconds requests were deferred waiting for a quota slot",
            quota_wait_seconds.clone(),
        );
        let open_actions = Gauge::default();
        registry.register(
            "open_actions",
            "Open Isolate/Unisolate actions in the tenant",
            open_actions.clone(),
        );
        let oldest_open_action_age_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_open_action_age_seconds",
            "Age of the oldest open Isolate/Unisolate action",
            oldest_open_action_age_seconds.clone(),
        );
        let poll_interval_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "poll_interval_seconds",
            "Current interval of the batch poller",
            poll_interval_seconds.clone(),
        );
        let resources = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "resources",
            "Watched DeviceIsolations by phase: ready, reconciling, stalled, unknown",
            resources.clone(),
        );
        let tracked_resources = Family::<OwnerLabels, Gauge>::default();
        registry.register(
            "tracked_resources",
            "DeviceIsolations the process holds state for, per owner: memory, requeue, view, quota",
            tracked_resources.clone(),
        );
        // Series that alerts watch with increase() exist from the start at 0, so the first
        // 429 or the first failed reconcile is an increase, not a series appearing at 1.
        for api in Api::all() {
            mde_calls
                .get_or_create(&CallLabels {
                    api: api.as_str().into(),
                    outcome: "rate_limited".into(),
                })
                .inc_by(0);
        }
        for result in ["ok", "error"] {
            reconciles
                .get_or_create(&ReconcileLabels {
                    result: result.into(),
                })
                .inc_by(0);
        }
        Metrics {
            registry,
            resources,
            tracked_resources,
            reconciles,
            mde_calls,
            mde_call_seconds,
            quota_remaining,
            quota_limit,
            quota_throttle_episodes,
            quota_wait_seconds,
            open_actions,
            oldest_open_action_age_seconds,
            poll_interval_seconds,
        }
    }

    /// Counts one reconcile.
    pub fn reconciled(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ReconcileLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Sets the per-owner tracked-resource counts.
    pub fn set_tracked(&self, counts: &[(&str, usize)]) {
        for (owner, n) in counts {
            self.tracked_resources
                .get_or_create(&OwnerLabels {
                    owner: (*owner).into(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// Sets the per-phase resource counts.
    pub fn set_phase_counts(&self, counts: &[(&str, i64)]) {
        for (phase, n) in counts {
            self.resources
                .get_or_create(&PhaseLabels {
                    phase: (*phase).into(),
                })
                .set(*n);
        }
    }

    /// Adds time a request was told to wait for quota.
    pub fn quota_waited(&self, api: Api, wait: Duration) {
        self.quota_wait_seconds
            .get_or_create(&ApiLabels {
                api: api.as_str().into(),
            })
            .inc_by(wait.as_secs_f64());
    }

    /// Refreshes the quota gauges from the gate.
    pub fn observe_quota(&self, gate: &QuotaGate, now: tokio::time::Instant) {
        for api in Api::all() {
            let labels = ApiLabels {
                api: api.as_str().into(),
            };
            let episodes = self.quota_throttle_episodes.get_or_create(&labels);
            episodes.inc_by(gate.episodes(api).saturating_sub(episodes.get()));
            for (window, span) in [("minute", Span::Minute), ("hour", Span::Hour)] {
                self.quota_limit
                    .get_or_create(&WindowLabels {
                        api: api.as_str().into(),
                        window: window.into(),
                    })
                    .set(i64::from(gate.limit(api, span)));
            }
            let (minute, hour) = gate.remaining(api, now);
            for (window, left) in [("minute", minute), ("hour", hour)] {
                self.quota_remaining
                    .get_or_create(&WindowLabels {
                        api: api.as_str().into(),
                        window: window.into(),
                    })
                    .set(i64::from(left));
            }
        }
    }

    /// Text exposition for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl CallObserver for Metrics {
    fn observe(&self, api: Api, outcome: &str, elapsed: Duration) {
        self.mde_calls
            .get_or_create(&CallLabels {
                api: api.as_str().into(),
                outcome: outcome.into(),
            })
            .inc();
        self.mde_call_seconds
            .get_or_create(&ApiLabels {
                api: api.as_str().into(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_with_the_prefix() {
        let m = Metrics::new();
        m.reconciled(true);
        m.observe(Api::Unisolate, "ok", Duration::from_millis(20));
        m.quota_waited(Api::Unisolate, Duration::from_secs(3));
        m.set_phase_counts(&[("stalled", 2)]);
        m.set_tracked(&[("memory", 0)]);
        let text = m.encode();
        for name in [
            "mde_isolation_reconciles_total",
            "mde_isolation_mde_calls_total",
            "mde_isolation_mde_call_duration_seconds",
            "mde_isolation_quota_wait_seconds_total",
            "mde_isolation_open_actions",
            "mde_isolation_poll_interval_seconds",
            "mde_isolation_resources",
            "mde_isolation_tracked_resources",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains(r#"api="unisolate",outcome="ok""#));
        assert!(text.contains(r#"mde_isolation_resources{phase="stalled"} 2"#));
        assert!(
            text.contains(
                r#"mde_isolation_mde_calls_total{api="isolate",outcome="rate_limited"} 0"#
            )
        );
        assert!(text.contains(r#"mde_isolation_reconciles_total{result="error"} 0"#));
    }
}
