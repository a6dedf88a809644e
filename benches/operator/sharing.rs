//! Issue 12's scenarios: the quota shared truthfully.
//!
//! - `restart-storm`: 1,000 devices released while the operator is SIGKILLed and started again
//!   every 20 simulated seconds until all are released.
//! - `restart-failover`: the same with two replicas under leader election, the leader killed
//!   twice in the middle of the burst (and started again, as a standby).
//! - `foreign`: another application spends 50 of the 100 unisolates a minute of the same quota
//!   key for the two simulated hours in which 2,000 devices are being released.
//! - `keyapp`: the N = 1,000 mix against a simulator whose quota key is the app (one budget for
//!   every API), once with the operator's default `--quota-key endpoint` (it must learn) and
//!   once with `--quota-key app`.
//!
//! Every figure comes from the simulator: its call log (429s, episodes, POST times), its
//! actions (ground truth of how many actions each device got), its machines (released or not)
//! and, for the foreign load, its `stats.foreign` tallies read at both ends of the run.

use super::*;

use k8s_openapi::api::coordination::v1::Lease;

/// Devices of the restart storm and of the failover.
const STORM_DEVICES: usize = 1000;

/// Simulated seconds between two kills of the restart storm.
const STORM_KILL_EVERY: f64 = 20.0;

/// Lease of the failover's replicas, real seconds (the operator does not scale it).
const FAILOVER_LEASE_SECONDS: u64 = 3;

/// The leader is killed once the simulator has received this many unisolate POSTs: in the
/// fourth and in the eighth minute's burst of 100.
const FAILOVER_KILL_AT_POSTS: [usize; 2] = [350, 750];

/// The leader-election Lease's name (the operator's default).
const LEASE_NAME: &str = "mde-isolation-operator";

/// Devices being released under the foreign load; more than two hours can release.
const FOREIGN_DEVICES: usize = 2000;

/// The other application's unisolates per simulated minute.
const FOREIGN_PER_MINUTE: u32 = 50;

/// Simulated seconds the foreign-load run lasts from the apply.
const FOREIGN_RUN: f64 = 7200.0;

/// The run's closing read of the tallies is aimed this many simulated seconds before the two
/// hours are over, so that the span is just under two hours: one a fraction of a second longer
/// would also hold the instant at which a greedy client's third hour opens (another 100 calls
/// at once), which nobody could use.
const FOREIGN_END_MARGIN: f64 = 5.0;

/// 100 ns ticks (the simulator's time unit) per second.
const TICKS_PER_SECOND: i64 = 10_000_000;

// ---------------------------------------------------------------------------------------------
// Results.

/// What issue 12's scenarios measure (one of `storm`, `foreign`, `keyapp` is set).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SharingMetrics {
    /// 429 episodes per API of the simulator (every API the operator called).
    episodes: BTreeMap<String, Episodes>,
    /// `keyapp`: every API as one, since the simulator's key is the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_episodes: Option<Episodes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    storm: Option<StormMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    foreign: Option<ForeignMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keyapp: Option<KeyAppMetrics>,
}

/// The 429s of one API in the call log, grouped in episodes: an episode is a run of 429s of
/// that API with no admitted call of that API between them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Episodes {
    /// Calls received.
    calls: usize,
    /// Answered 429.
    throttled: usize,
    /// 429s of each episode, in order.
    sizes: Vec<usize>,
    /// 429s after the first episode.
    after_first: usize,
    /// Simulated hours from the first episode's last 429 to the end of the measured span.
    hours_after_first: Option<f64>,
    /// `after_first / hours_after_first`.
    per_hour_after_first: Option<f64>,
}

impl Episodes {
    fn first(&self) -> usize {
        self.sizes.first().copied().unwrap_or(0)
    }

    fn max(&self) -> usize {
        self.sizes.iter().copied().max().unwrap_or(0)
    }

    fn max_after_first(&self) -> usize {
        self.sizes.iter().skip(1).copied().max().unwrap_or(0)
    }
}

/// The restart storm and the failover.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StormMetrics {
    /// SIGKILLs (of the leader, in the failover).
    kills: usize,
    /// Kills with POSTs received before and after them.
    kills_mid_burst: usize,
    /// Operator processes started in all (replicas and restarts included).
    processes: usize,
    /// Failover: real seconds from each kill until a live replica held the lease.
    takeover_seconds: Vec<f64>,
    /// Simulated seconds from each kill to the next POST (none: no POST came after it).
    post_gap_after_kill: Vec<Option<f64>>,
    /// Failover: replicas that exited on their own (e.g. a lost lease).
    unexpected_exits: usize,
    /// isolate + unisolate POSTs received (429s included).
    posts: usize,
    /// isolate and unisolate answers 429.
    post_429s: usize,
    /// Machine-action and machine reads answered 429.
    read_429s: usize,
    /// Machine-action and machine reads received.
    #[serde(default)]
    reads: usize,
    /// Of those, per-machine lookups (`machineactions` filtered on one `machineId`): a new
    /// process looks up every resource whose POST it finds intended but not recorded.
    #[serde(default)]
    lookups: usize,
    /// Simulated seconds from the last start (or kill) to the first MDE read of the process
    /// that finished the run (none: it made none).
    #[serde(default)]
    last_process_first_read: Option<f64>,
    /// Unisolate actions the simulator created (ground truth).
    unisolate_actions: usize,
    /// Other actions it created (none expected).
    other_actions: usize,
    /// Devices whose number of unisolate actions is not exactly one.
    devices_not_one_action: usize,
    /// Devices released (ground truth) at the end.
    released: usize,
    /// Simulated seconds from the apply start until the last device was released (as seen by
    /// the kill loop, which checks before every kill).
    released_after_apply: Option<f64>,
    /// Simulated seconds from the apply start until every resource was Ready.
    settled_after_apply: Option<f64>,
    /// Simulated seconds from the first POST to the last.
    first_to_last_post: Option<f64>,
    /// T(1,000).
    quota_bound: f64,
    /// `first_to_last_post / quota_bound`.
    ratio: Option<f64>,
}

/// Another application spending the same quota key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ForeignMetrics {
    /// The simulator's `--foreign-load`.
    load: String,
    /// Simulated seconds measured: from a read of `/sim/stats` just before the apply to one
    /// aimed `FOREIGN_END_MARGIN` before two simulated hours later.
    span_sim_seconds: f64,
    /// Foreign unisolates admitted before the span (the load runs from the simulator's start).
    foreign_before: usize,
    /// Foreign unisolates admitted in the span.
    foreign_admitted: usize,
    /// Foreign unisolates refused in the span.
    foreign_refused: usize,
    /// The operator's unisolates admitted in the span.
    operator_admitted: usize,
    /// The operator's unisolates refused (429) in the span.
    operator_refused: usize,
    /// Unisolates one greedy client could get admitted in the span, starting from the window
    /// state at its start (the foreign calls before it), under 100 per 60 s and 1,500 per
    /// 3,600 s exactly as the simulator counts.
    capacity: usize,
    /// The same from empty windows.
    capacity_empty: usize,
    /// `capacity - foreign_admitted`: what the other application left.
    remaining: usize,
    /// `operator_admitted / remaining`.
    utilization: Option<f64>,
    /// Devices released at the end of the span (ground truth).
    released: usize,
    /// Whether the foreign calls before the span could be placed exactly (all admitted, as
    /// many as the schedule says): the capacity is exact only then.
    seed_exact: bool,
}

/// The N = 1,000 mix under one budget for every API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct KeyAppMetrics {
    /// The operator's `--quota-key`.
    operator_quota_key: String,
    /// Resources settled when the wait ended.
    settled: usize,
    /// Every resource settled.
    converged: bool,
    /// Simulated seconds from the apply start until every resource settled.
    settled_after_apply: Option<f64>,
    /// Simulated seconds from the first POST to the last device's first POST.
    last_first_post_after_first: Option<f64>,
    /// isolate + unisolate POSTs (429s included).
    posts: usize,
    /// Online and offline devices without exactly one admitted POST.
    devices_not_one_post: usize,
    /// Most admitted calls of the key (every API) in any 60 s / 3,600 s.
    key_max_per_minute: usize,
    /// See `key_max_per_minute`.
    key_max_per_hour: usize,
    /// Online devices released (ground truth).
    online_released: usize,
}

// ---------------------------------------------------------------------------------------------
// Measuring.

/// Calls in simulated-time order (the log's order, kept for ties).
fn in_time_order(log: &[Call]) -> Vec<&Call> {
    let mut v: Vec<&Call> = log.iter().collect();
    v.sort_by_key(|c| c.sim());
    v
}

/// Episodes of `calls` (one API, or several counted as one), in time order; the rate after the
/// first episode runs to `span_end`.
fn episodes<'a>(calls: impl Iterator<Item = &'a Call>, span_end: DateTime<Utc>) -> Episodes {
    let mut e = Episodes::default();
    let mut open = false;
    let mut first_end: Option<DateTime<Utc>> = None;
    for c in calls {
        e.calls += 1;
        if c.status == 429 {
            e.throttled += 1;
            if open {
                if let Some(last) = e.sizes.last_mut() {
                    *last += 1;
                }
            } else {
                e.sizes.push(1);
                open = true;
            }
            if e.sizes.len() == 1 {
                first_end = Some(c.sim());
            }
        } else {
            open = false;
        }
    }
    e.after_first = e.throttled - e.first();
    e.hours_after_first = first_end.map(|t| (seconds_between(t, span_end) / 3600.0).max(0.0));
    e.per_hour_after_first = e
        .hours_after_first
        .filter(|h| *h > 0.0)
        .map(|h| e.after_first as f64 / h);
    e
}

/// Episodes per API (token requests left out).
fn episodes_per_api(ordered: &[&Call], span_end: DateTime<Utc>) -> BTreeMap<String, Episodes> {
    let apis: std::collections::BTreeSet<&str> = ordered
        .iter()
        .map(|c| c.api.as_str())
        .filter(|a| *a != "token")
        .collect();
    apis.into_iter()
        .map(|api| {
            (
                api.to_string(),
                episodes(ordered.iter().copied().filter(|c| c.api == api), span_end),
            )
        })
        .collect()
}

/// Most of `times` (sorted) in any window of `width` seconds (a call at `x` and one at
/// `x - width` are in no common window, as the simulator counts).
fn max_in_window(times: &[DateTime<Utc>], width: f64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while seconds_between(times[lo], times[hi]) >= width {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Unisolate actions per device (ground truth) and the number of other actions.
async fn actions_per_device(sim: &Sim, devices: &[Device]) -> (HashMap<String, usize>, usize) {
    let all = sim.admin_get("actions").await;
    let mut per: HashMap<String, usize> = devices.iter().map(|d| (d.id.clone(), 0)).collect();
    let mut other = 0;
    for a in all["value"].as_array().into_iter().flatten() {
        let machine = a["machineId"].as_str().unwrap_or_default();
        match per.get_mut(machine) {
            Some(n) if a["type"] == "Unisolate" => *n += 1,
            _ => other += 1,
        }
    }
    (per, other)
}

/// Devices released now (ground truth).
async fn released(sim: &Sim, devices: &[Device]) -> usize {
    let truth = isolated_now(sim).await;
    devices
        .iter()
        .filter(|d| truth.get(&d.id) == Some(&false))
        .count()
}

/// isolate + unisolate POSTs received so far.
async fn posts_so_far(sim: &Sim) -> usize {
    let per_api = calls_per_api(sim).await;
    ["isolate", "unisolate"]
        .iter()
        .filter_map(|a| per_api.get(*a))
        .sum()
}

/// Everything the two restart scenarios report, from the log and the ground truth.
async fn storm_metrics(
    bed: &Bed,
    log: &[Call],
    kills: &[DateTime<Utc>],
    apply_start: DateTime<Utc>,
) -> StormMetrics {
    let posts: Vec<&Call> = log.iter().filter(|c| c.is_post()).collect();
    let first = posts.iter().map(|c| c.sim()).min();
    let last = posts.iter().map(|c| c.sim()).max();
    let (per_device, other_actions) = actions_per_device(&bed.sim, &bed.devices).await;
    let bound = quota_bound(bed.devices.len());
    let first_to_last = match (first, last) {
        (Some(a), Some(b)) => Some(seconds_between(a, b)),
        _ => None,
    };
    let settled = bed
        .tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .all_settled_at
        .map(|t| seconds_between(apply_start, bed.clock.sim_at(t)));
    StormMetrics {
        kills: kills.len(),
        kills_mid_burst: kills
            .iter()
            .filter(|k| first.is_some_and(|f| f < **k) && last.is_some_and(|l| l > **k))
            .count(),
        processes: 0,
        takeover_seconds: Vec::new(),
        post_gap_after_kill: kills
            .iter()
            .map(|k| {
                posts
                    .iter()
                    .map(|c| c.sim())
                    .filter(|t| t > k)
                    .min()
                    .map(|t| seconds_between(*k, t))
            })
            .collect(),
        unexpected_exits: 0,
        posts: posts.len(),
        post_429s: posts.iter().filter(|c| c.status == 429).count(),
        read_429s: log
            .iter()
            .filter(|c| c.is_read() && c.status == 429)
            .count(),
        reads: log.iter().filter(|c| c.is_read()).count(),
        lookups: log
            .iter()
            .filter(|c| {
                c.is_action_read()
                    && c.query
                        .as_deref()
                        .is_some_and(|q| q.contains("machineId%20eq"))
            })
            .count(),
        last_process_first_read: kills.last().and_then(|k| {
            log.iter()
                .filter(|c| c.is_read() && c.sim() > *k)
                .map(|c| seconds_between(*k, c.sim()))
                .reduce(f64::min)
        }),
        unisolate_actions: per_device.values().sum(),
        other_actions,
        devices_not_one_action: per_device.values().filter(|n| **n != 1).count(),
        released: released(&bed.sim, &bed.devices).await,
        released_after_apply: None,
        settled_after_apply: settled,
        first_to_last_post: first_to_last,
        quota_bound: bound,
        ratio: first_to_last.filter(|_| bound > 0.0).map(|t| t / bound),
    }
}

/// What is surprising in a storm's figures, said next to them.
fn storm_notes(notes: &mut Vec<String>, st: &StormMetrics, calls: &BTreeMap<String, ApiCalls>) {
    if st.lookups > 0 {
        let most = calls
            .get("machineactions-list")
            .map_or(0, |c| c.max_per_minute);
        notes.push(format!(
            "{} per-machine lookups (machineactions filtered on one machineId) for {} devices: a \
             new process looks up each resource whose status records a POST intent without an \
             action (the intent is written before the POST waits for the quota); machine-action \
             reads reached {most} in 60 simulated s",
            st.lookups,
            thousands(STORM_DEVICES)
        ));
    }
    if let (Some(released), Some(ready)) = (st.released_after_apply, st.settled_after_apply)
        && ready - released > 120.0
    {
        notes.push(format!(
            "every device was released {released:.0} simulated s after the apply, but the last \
             resource was Ready only at {ready:.0} s: the process started by the last kill made \
             its first MDE read {} s after its start (the resources left were following actions \
             already created, which does not ask for the view's first load; it came with the \
             poller's idle timer)",
            opt(st.last_process_first_read, 0)
        ));
    }
}

/// A scenario's result with the figures every scenario has.
#[allow(clippy::too_many_arguments)]
fn result(
    name: String,
    title: String,
    run: RunInfo,
    scale: f64,
    mix: Mix,
    apply: ApplyInfo,
    calls: (BTreeMap<String, ApiCalls>, usize),
    operator: ProcUsage,
    sharing: SharingMetrics,
    notes: Vec<String>,
) -> ScenarioResult {
    ScenarioResult {
        name,
        title,
        run,
        time_scale: scale,
        mix,
        apply: Some(apply),
        calls: calls.0,
        throttled: calls.1,
        operator,
        burst: None,
        restart: None,
        offline: None,
        latency: None,
        churn: None,
        sharing: Some(sharing),
        fleet: None,
        tenants: None,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// Restart storm.

/// 1,000 online devices, all isolated, each released by its DeviceIsolation, against a simulator
/// that creates a second action for a repeated POST (`--duplicate-mode allow`). From the apply
/// on, the operator is SIGKILLed and started again every 20 simulated seconds until the ground
/// truth shows every device released; then the last process runs until all are Ready.
pub(super) async fn restart_storm() -> ScenarioResult {
    let name = "restart-storm";
    let scale = time_scale(name);
    let mix = Mix {
        online: STORM_DEVICES,
        ..Mix::default()
    };
    let mut bed = Bed::with(
        name,
        fleet(mix, 1),
        scale,
        &["--duplicate-mode", "allow"],
        &[],
    )
    .await;
    let n = bed.devices.len();
    let clock = bed.clock;
    // Released (by the simulator's clock) in about T(N) plus the restarts' cost; the limit only
    // ends a run that does not converge.
    let limit = Duration::from_secs_f64((4.0 * quota_bound(n) + 600.0) / scale + 60.0);
    let apply_start = clock.sim_at(Utc::now());
    let mut kills: Vec<DateTime<Utc>> = Vec::new();
    let mut all_released_at = None;
    let mut timed_out = false;
    let applied = {
        let Bed {
            kube,
            namespace,
            devices,
            sim,
            op,
            ..
        } = &mut bed;
        let apply = create_all(kube, namespace, devices);
        let storm = async {
            let started = Instant::now();
            let mut next = apply_start;
            let mut last_report = Instant::now();
            loop {
                next += chrono::Duration::milliseconds((STORM_KILL_EVERY * 1000.0) as i64);
                tokio::time::sleep(clock.real_until(next)).await;
                let done = released(sim, devices).await;
                if done == devices.len() {
                    all_released_at = Some(clock.sim_at(Utc::now()));
                    break;
                }
                if started.elapsed() > limit {
                    timed_out = true;
                    break;
                }
                op.kill();
                op.spawn();
                kills.push(clock.sim_at(Utc::now()));
                if last_report.elapsed() > Duration::from_secs(10) {
                    eprintln!(
                        "[{name}] {} kills, {done}/{} released after {:.0} s",
                        kills.len(),
                        devices.len(),
                        started.elapsed().as_secs_f64()
                    );
                    last_report = Instant::now();
                }
            }
        };
        let (applied, ()) = futures::join!(apply, storm);
        applied
    };
    let apply = bed.apply_info(&applied);
    if timed_out {
        bed.notes.push(format!(
            "not every device was released within {limit:?}: the kills stopped there"
        ));
    }
    eprintln!(
        "[{name}] {} kills; waiting for the last process to settle everything",
        kills.len()
    );
    // The last process must see every action Succeeded (a poll) and write the statuses.
    let _ = bed.settle(name, timeout_for(600.0, scale, 0.0)).await;
    let log = calls(&bed.sim).await;
    let all: Vec<&Call> = log.iter().collect();
    let calls_by_api = call_summary(&bed.sim, &all, n).await;
    let end = clock.sim_at(Utc::now());
    let ordered = in_time_order(&log);
    let mut storm = storm_metrics(&bed, &log, &kills, apply_start).await;
    storm.processes = kills.len() + 1;
    storm.released_after_apply = all_released_at.map(|t| seconds_between(apply_start, t));
    storm_notes(&mut bed.notes, &storm, &calls_by_api.0);
    let sharing = SharingMetrics {
        episodes: episodes_per_api(&ordered, end),
        storm: Some(storm),
        ..SharingMetrics::default()
    };
    let (run, operator, notes) = bed.finish().await;
    result(
        name.into(),
        format!(
            "Restart storm: {} releases, SIGKILL every {STORM_KILL_EVERY:.0} simulated seconds",
            thousands(n)
        ),
        run,
        scale,
        mix,
        apply,
        calls_by_api,
        operator,
        sharing,
        notes,
    )
}

// ---------------------------------------------------------------------------------------------
// Leader failover.

/// The Lease's holder identity.
async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// The live process of the two whose identity (`hostname_pid`) holds the Lease.
async fn leader_of(leases: &Api<Lease>, replicas: [&OperatorProcess; 2]) -> Option<usize> {
    let holder = lease_holder(leases).await?;
    replicas.iter().position(|r| {
        r.child
            .as_ref()
            .is_some_and(|c| holder.ends_with(&format!("_{}", c.id())))
    })
}

/// Waits until one of the two live processes holds the Lease.
async fn wait_leader(
    leases: &Api<Lease>,
    replicas: [&OperatorProcess; 2],
    timeout: Duration,
) -> Option<usize> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(i) = leader_of(leases, replicas).await {
            return Some(i);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same 1,000 devices with two replicas under leader election (a 3-second lease, both
/// signing in as the same app, so they share its quota). The leader is SIGKILLed when the
/// simulator has received 350 POSTs and again at 750, each time in the middle of a minute's
/// burst, and started again (as a standby) once the other replica has taken over.
pub(super) async fn restart_failover() -> ScenarioResult {
    let name = "restart-failover";
    let scale = time_scale(name);
    let mix = Mix {
        online: STORM_DEVICES,
        ..Mix::default()
    };
    let lease = FAILOVER_LEASE_SECONDS.to_string();
    let op_args = [
        "--leader-election",
        "--lease-duration-seconds",
        lease.as_str(),
    ];
    let mut bed = Bed::with(
        name,
        fleet(mix, 1),
        scale,
        &["--duplicate-mode", "allow"],
        &op_args,
    )
    .await;
    let n = bed.devices.len();
    let clock = bed.clock;
    let mut second = OperatorProcess::start(
        &bed.sim,
        &cluster().kubeconfig,
        &bed.namespace,
        scale,
        bed._dir.path(),
        &op_args,
        "operator-b.log",
    );
    if !second.wait_synced(1, Duration::from_secs(60)).await {
        bed.notes
            .push("the second replica did not report synced caches within 60 s".into());
    }
    let leases: Api<Lease> = Api::namespaced(bed.kube.clone(), &bed.namespace);
    if wait_leader(&leases, [&bed.op, &second], Duration::from_secs(60))
        .await
        .is_none()
    {
        bed.notes
            .push("no replica held the Lease within 60 s of the start".into());
    }
    let (applied, apply) = bed.apply().await;
    let apply_start = clock.sim_at(applied.start);
    let mut kills = Vec::new();
    let mut takeovers = Vec::new();
    for threshold in FAILOVER_KILL_AT_POSTS {
        let wait_end = Instant::now() + timeout_for(quota_bound(n) + 300.0, scale, 0.0);
        let mut reached = false;
        while Instant::now() < wait_end {
            if posts_so_far(&bed.sim).await >= threshold {
                reached = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !reached {
            bed.notes
                .push(format!("the simulator never received {threshold} POSTs"));
            break;
        }
        let Some(leader) = leader_of(&leases, [&bed.op, &second]).await else {
            bed.notes.push(format!(
                "at {threshold} POSTs no live replica held the Lease: nobody was killed"
            ));
            continue;
        };
        let killed_at = Instant::now();
        if leader == 0 {
            bed.op.kill();
        } else {
            second.kill();
        }
        kills.push(clock.sim_at(Utc::now()));
        eprintln!(
            "[{name}] killed the leader (replica {}) at {threshold} POSTs",
            ["a", "b"][leader]
        );
        // The other replica takes over; only then does the killed one start again, as a
        // standby (started at once, it could win the race for the expired lease itself).
        match wait_leader(&leases, [&bed.op, &second], Duration::from_secs(30)).await {
            Some(_) => takeovers.push(killed_at.elapsed().as_secs_f64()),
            None => bed.notes.push(format!(
                "no replica took the Lease over within 30 s of kill {}",
                kills.len()
            )),
        }
        if leader == 0 {
            bed.op.spawn();
        } else {
            second.spawn();
        }
    }
    let settled = bed
        .settle(
            name,
            timeout_for(quota_bound(n) + 300.0, scale, apply.real_seconds),
        )
        .await;
    let log = calls(&bed.sim).await;
    let all: Vec<&Call> = log.iter().collect();
    let calls_by_api = call_summary(&bed.sim, &all, n).await;
    let end = clock.sim_at(Utc::now());
    let ordered = in_time_order(&log);
    let mut storm = storm_metrics(&bed, &log, &kills, apply_start).await;
    storm.processes = 2 + kills.len();
    storm.takeover_seconds = takeovers;
    // A replica that exited by itself (a lost lease) is no longer running.
    storm.unexpected_exits = [&mut bed.op, &mut second]
        .into_iter()
        .filter_map(|op| op.child.as_mut())
        .filter_map(|c| c.try_wait().ok().flatten())
        .count();
    if storm.unexpected_exits > 0 {
        bed.notes.push(format!(
            "{} replica(s) exited on their own (see target/bench-logs/{name}*.log)",
            storm.unexpected_exits
        ));
    }
    if settled.is_some() {
        storm.released_after_apply = storm.settled_after_apply;
    }
    storm_notes(&mut bed.notes, &storm, &calls_by_api.0);
    let sharing = SharingMetrics {
        episodes: episodes_per_api(&ordered, end),
        storm: Some(storm),
        ..SharingMetrics::default()
    };
    second.kill();
    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    if std::fs::create_dir_all(&logs).is_ok() {
        let _ = std::fs::copy(&second.log, logs.join(format!("{name}-b.log")));
    }
    let other = second.total_usage();
    let (run, mut operator, notes) = bed.finish().await;
    operator.peak_rss_mib = operator.peak_rss_mib.max(other.peak_rss_mib);
    operator.cpu_seconds += other.cpu_seconds;
    result(
        name.into(),
        format!(
            "Leader failover: {} releases, two replicas, the leader SIGKILLed twice",
            thousands(n)
        ),
        run,
        scale,
        mix,
        apply,
        calls_by_api,
        operator,
        sharing,
        notes,
    )
}

// ---------------------------------------------------------------------------------------------
// Foreign load.

/// Ticks from `origin` to `t`.
fn ticks(origin: DateTime<Utc>, t: DateTime<Utc>) -> i64 {
    (t - origin).num_nanoseconds().unwrap_or(i64::MAX) / 100
}

/// Calls one greedy client gets admitted in `(from, to]` (ticks), each as early as the windows
/// allow, with `history` (sorted ticks at or before `from`) already in the windows: a call at
/// `x` is admitted while fewer than 100 admitted calls lie in `(x - 60 s, x]` and fewer than
/// 1,500 in `(x - 3,600 s, x]`. Admitting as early as possible maximises the count.
fn greedy_capacity(history: &[i64], from: i64, to: i64) -> usize {
    let windows = [
        (PER_MINUTE as usize, 60 * TICKS_PER_SECOND),
        (PER_HOUR as usize, 3600 * TICKS_PER_SECOND),
    ];
    let mut times: Vec<i64> = history.to_vec();
    let mut cursor = from + 1;
    let mut admitted = 0;
    loop {
        let mut t = cursor;
        for (limit, width) in windows {
            if times.len() >= limit {
                // The limit-th most recent call must leave the window first.
                t = t.max(times[times.len() - limit] + width);
            }
        }
        if t > to {
            return admitted;
        }
        times.push(t);
        admitted += 1;
        cursor = t;
    }
}

/// Ticks after the load's origin of call `i` of a constant load of `n` a minute (the
/// simulator's schedule).
fn foreign_offset(i: i64, n: i64) -> i64 {
    let minute = 60 * TICKS_PER_SECOND;
    i / n * minute + i % n * minute / n
}

/// `stats.foreign.apis.unisolate.{admitted, refused}`.
fn foreign_tally(stats: &Value) -> (usize, usize) {
    let u = &stats["foreign"]["apis"]["unisolate"];
    let n = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
    (n("admitted"), n("refused"))
}

/// 2,000 online devices released while another application spends 50 unisolates a minute of
/// the same key (`--foreign-load unisolate:50`, from the simulator's start), for two simulated
/// hours from the apply. The foreign tallies are read at both ends of the span.
pub(super) async fn foreign() -> ScenarioResult {
    let name = "foreign";
    let scale = time_scale(name);
    let mix = Mix {
        online: FOREIGN_DEVICES,
        ..Mix::default()
    };
    let load = format!("unisolate:{FOREIGN_PER_MINUTE}");
    let mut bed = Bed::with(name, fleet(mix, 1), scale, &["--foreign-load", &load], &[]).await;
    let n = bed.devices.len();
    let clock = bed.clock;
    let before = bed.sim.admin_stats().await;
    let s0 = parse_time(before["now"].as_str().expect("now"));
    let since = parse_time(before["foreign"]["since"].as_str().expect("foreign since"));
    let (admitted0, refused0) = foreign_tally(&before);
    let (_, apply) = bed.apply().await;
    eprintln!(
        "[{name}] created {} objects in {:.1} s real; running {FOREIGN_RUN} simulated seconds ({:.0} s real)",
        apply.objects,
        apply.real_seconds,
        FOREIGN_RUN / scale
    );
    let end =
        s0 + chrono::Duration::milliseconds(((FOREIGN_RUN - FOREIGN_END_MARGIN) * 1000.0) as i64);
    loop {
        let left = clock.real_until(end);
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_secs(30))).await;
        let stats = bed.sim.admin_stats().await;
        let u = &stats["apis"]["unisolate"];
        eprintln!(
            "[{name}] {:.0} simulated s: unisolate {} calls ({} × 429), foreign admitted {} refused {}",
            seconds_between(s0, parse_time(stats["now"].as_str().unwrap_or_default())),
            u["calls"],
            u["throttled"],
            foreign_tally(&stats).0 - admitted0,
            foreign_tally(&stats).1 - refused0
        );
    }
    let after = bed.sim.admin_stats().await;
    let s1 = parse_time(after["now"].as_str().expect("now"));
    let (admitted1, refused1) = foreign_tally(&after);
    let log = calls(&bed.sim).await;
    let done = released(&bed.sim, &bed.devices).await;
    let ordered = in_time_order(&log);
    let in_span: Vec<&Call> = ordered
        .iter()
        .copied()
        .filter(|c| c.sim() > s0 && c.sim() <= s1)
        .collect();
    let calls_by_api = call_summary(&bed.sim, &in_span, n).await;
    let unisolates: Vec<&&Call> = in_span.iter().filter(|c| c.api == "unisolate").collect();

    // The windows at the span's start: the foreign calls before it (the simulator's schedule,
    // all admitted while nothing else spent the key) and any of ours.
    let per_minute = i64::from(FOREIGN_PER_MINUTE);
    let scheduled_before = (0..)
        .take_while(|i| foreign_offset(*i, per_minute) <= ticks(since, s0))
        .count();
    let seed_exact = refused0 == 0 && scheduled_before == admitted0;
    if !seed_exact {
        bed.notes.push(format!(
            "the foreign tallies before the run ({admitted0} admitted, {refused0} refused) do not \
             match its schedule ({scheduled_before} calls): the capacity's starting windows are \
             approximate"
        ));
    }
    let mut history: Vec<i64> = (0..admitted0 as i64)
        .map(|i| foreign_offset(i, per_minute))
        .chain(
            ordered
                .iter()
                .filter(|c| c.api == "unisolate" && c.status != 429 && c.sim() <= s0)
                .map(|c| ticks(since, c.sim())),
        )
        .collect();
    history.sort_unstable();
    let (from, to) = (ticks(since, s0), ticks(since, s1));
    let capacity = greedy_capacity(&history, from, to);
    let capacity_empty = greedy_capacity(&[], from, to);
    let foreign_admitted = admitted1 - admitted0;
    let operator_admitted = unisolates.iter().filter(|c| c.status != 429).count();
    let remaining = capacity.saturating_sub(foreign_admitted);
    let metrics = ForeignMetrics {
        load,
        span_sim_seconds: seconds_between(s0, s1),
        foreign_before: admitted0,
        foreign_admitted,
        foreign_refused: refused1 - refused0,
        operator_admitted,
        operator_refused: unisolates.len() - operator_admitted,
        capacity,
        capacity_empty,
        remaining,
        utilization: (remaining > 0).then(|| operator_admitted as f64 / remaining as f64),
        released: done,
        seed_exact,
    };
    if operator_admitted + foreign_admitted > capacity {
        bed.notes.push(format!(
            "more unisolates admitted ({operator_admitted} + {foreign_admitted}) than the computed \
             capacity {capacity}: the capacity model is wrong"
        ));
    }
    let sharing = SharingMetrics {
        episodes: episodes_per_api(&in_span, s1),
        foreign: Some(metrics),
        ..SharingMetrics::default()
    };
    let (run, operator, notes) = bed.finish().await;
    result(
        name.into(),
        format!(
            "Foreign load: another app spends {FOREIGN_PER_MINUTE} unisolates a minute while {} devices are released",
            thousands(n)
        ),
        run,
        scale,
        mix,
        apply,
        calls_by_api,
        operator,
        sharing,
        notes,
    )
}

// ---------------------------------------------------------------------------------------------
// Quota key `app`.

/// The two rows: the operator with its default `--quota-key endpoint` (it has to learn that
/// every API shares one budget) and with `--quota-key app`.
pub(super) async fn keyapp() -> Vec<ScenarioResult> {
    vec![keyapp_row("endpoint").await, keyapp_row("app").await]
}

/// The N = 1,000 mix against `--quota-key app`, measured until every resource settled.
async fn keyapp_row(operator_key: &str) -> ScenarioResult {
    let label = format!("keyapp-{operator_key}");
    let scale = time_scale("keyapp");
    let mix = mix_for(1000);
    let op_args: &[&str] = if operator_key == "app" {
        &["--quota-key", "app"]
    } else {
        &[]
    };
    let mut bed = Bed::with(
        &label,
        fleet(mix, 1),
        scale,
        &["--quota-key", "app"],
        op_args,
    )
    .await;
    let n = bed.devices.len();
    let clock = bed.clock;
    let (applied, apply) = bed.apply().await;
    eprintln!(
        "[{label}] created {} objects in {:.1} s real ({:.0} simulated)",
        apply.objects, apply.real_seconds, apply.sim_seconds
    );
    // Every call of the app shares 100 a minute: the POSTs, the reads, and the failing devices'
    // retries (about 20 simulated minutes after their first POST).
    let settled = bed
        .settle(&label, timeout_for(3600.0, scale, apply.real_seconds))
        .await;
    let settled_count = bed
        .tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .settled_count;
    let log = calls(&bed.sim).await;
    let truth = isolated_now(&bed.sim).await;
    let apply_start = clock.sim_at(applied.start);
    let settled_sim = settled.map(|t| clock.sim_at(t));
    let end = settled_sim.unwrap_or_else(|| clock.sim_at(Utc::now()));
    let ordered = in_time_order(&log);
    let until: Vec<&Call> = ordered.iter().copied().filter(|c| c.sim() <= end).collect();
    let calls_by_api = call_summary(&bed.sim, &until, n).await;
    let burst = burst_metrics(&bed.devices, &log, &truth, apply_start, settled_sim, &until);
    let admitted: Vec<DateTime<Utc>> = ordered
        .iter()
        .filter(|c| c.api != "token" && c.status != 429)
        .map(|c| c.sim())
        .collect();
    let metrics = KeyAppMetrics {
        operator_quota_key: operator_key.into(),
        settled: settled_count,
        converged: settled.is_some(),
        settled_after_apply: burst.settled_after_apply,
        last_first_post_after_first: burst.last_first_post_after_first,
        posts: burst.posts,
        devices_not_one_post: {
            // Admitted POSTs only: a 429 created nothing.
            let mut per: HashMap<&str, usize> = HashMap::new();
            for c in log.iter().filter(|c| c.is_post() && c.status != 429) {
                if let Some(m) = c.machine() {
                    *per.entry(m).or_default() += 1;
                }
            }
            bed.devices
                .iter()
                .filter(|d| d.behaviour != Behaviour::Failing)
                .filter(|d| per.get(d.id.as_str()).copied().unwrap_or(0) != 1)
                .count()
        },
        key_max_per_minute: max_in_window(&admitted, 60.0),
        key_max_per_hour: max_in_window(&admitted, 3600.0),
        online_released: burst.online_released,
    };
    let per_api = episodes_per_api(&until, end);
    let key_wide = episodes(until.iter().copied().filter(|c| c.api != "token"), end);
    let big_first: Vec<String> = per_api
        .iter()
        .filter(|(_, e)| e.first() > 1)
        .map(|(api, e)| format!("{api}: {}", e.first()))
        .collect();
    if !big_first.is_empty() {
        bed.notes.push(format!(
            "the first 429 episode of an API held more than one 429 ({}): calls already sent \
             when the first 429 came back",
            big_first.join("; ")
        ));
    }
    if key_wide.first() > 1 {
        // The APIs of the key's first episode, in order.
        let mut apis: Vec<&str> = Vec::new();
        let mut seen_429 = false;
        for c in until.iter().filter(|c| c.api != "token") {
            if c.status == 429 {
                seen_429 = true;
                if !apis.contains(&c.api.as_str()) {
                    apis.push(&c.api);
                }
            } else if seen_429 {
                break;
            }
        }
        bed.notes.push(format!(
            "the key's first 429 episode (every API as one) held {} 429s, of {}{}",
            key_wide.first(),
            apis.join(" and "),
            if operator_key == "endpoint" && apis.len() > 1 {
                ": with --quota-key endpoint the operator keeps each API's limit apart and \
                 learns each from its own 429"
            } else {
                ""
            }
        ));
    }
    let sharing = SharingMetrics {
        episodes: per_api,
        key_episodes: Some(key_wide),
        keyapp: Some(metrics),
        ..SharingMetrics::default()
    };
    let (run, operator, notes) = bed.finish().await;
    result(
        label,
        format!(
            "Quota key app: N = {n} ({} online, {} offline, {} failing), operator --quota-key {operator_key}",
            mix.online, mix.offline, mix.failing
        ),
        run,
        scale,
        mix,
        apply,
        calls_by_api,
        operator,
        sharing,
        notes,
    )
}

// ---------------------------------------------------------------------------------------------
// Targets and the Markdown section.

fn sharing_of<'a>(r: &'a Report, name: &str) -> Option<(&'a ScenarioResult, &'a SharingMetrics)> {
    let s = find(r, name)?;
    Some((s, s.sharing.as_ref()?))
}

/// `isolate 0, unisolate 0`.
fn post_429s(m: &SharingMetrics) -> (usize, String) {
    let of = |api: &str| m.episodes.get(api).map_or(0, |e| e.throttled);
    let (i, u) = (of("isolate"), of("unisolate"));
    (i + u, format!("isolate {i}, unisolate {u}"))
}

/// Issue 12's rows of the Targets table.
pub(super) fn targets(r: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    let missing = |what: &str, limit: &str| Target {
        what: what.into(),
        measured: "not measured".into(),
        limit: limit.into(),
        pass: None,
    };
    match sharing_of(r, "restart-storm") {
        Some((_, m)) if m.storm.is_some() => {
            let st = m.storm.as_ref().expect("storm");
            let (posts, shown) = post_429s(m);
            out.push(Target {
                what: format!(
                    "restart storm (SIGKILL every 20 simulated s, {} kills): 429s on POSTs",
                    st.kills
                ),
                measured: shown,
                limit: "0".into(),
                pass: Some(posts == 0 && st.kills > 0),
            });
            out.push(Target {
                what: "restart storm: read 429s per restart".into(),
                measured: format!("{} over {} restarts", st.read_429s, st.kills),
                limit: "≤ 1 per restart".into(),
                pass: Some(st.read_429s <= st.kills),
            });
            out.push(Target {
                what: "restart storm: devices without exactly one unisolate action".into(),
                measured: format!(
                    "{} ({} unisolate actions; {} of {} released)",
                    st.devices_not_one_action,
                    thousands(st.unisolate_actions),
                    thousands(st.released),
                    thousands(STORM_DEVICES)
                ),
                limit: "0".into(),
                pass: Some(
                    st.devices_not_one_action == 0
                        && st.other_actions == 0
                        && st.released == STORM_DEVICES,
                ),
            });
        }
        _ => {
            out.push(missing("restart storm: 429s on POSTs", "0"));
            out.push(missing(
                "restart storm: read 429s per restart",
                "≤ 1 per restart",
            ));
            out.push(missing(
                "restart storm: devices without exactly one unisolate action",
                "0",
            ));
        }
    }
    match sharing_of(r, "restart-failover") {
        Some((_, m)) if m.storm.is_some() => {
            let st = m.storm.as_ref().expect("storm");
            let (posts, shown) = post_429s(m);
            out.push(Target {
                what: format!(
                    "leader failover (two replicas, the leader SIGKILLed {}): 429s on POSTs",
                    match st.kills {
                        1 => "once".to_string(),
                        2 => "twice".to_string(),
                        n => format!("{n} times"),
                    }
                ),
                measured: shown,
                limit: "0".into(),
                pass: Some(posts == 0 && st.kills == FAILOVER_KILL_AT_POSTS.len()),
            });
            out.push(Target {
                what: "leader failover: devices without exactly one unisolate action".into(),
                measured: format!(
                    "{} ({} unisolate actions; {} of {} released)",
                    st.devices_not_one_action,
                    thousands(st.unisolate_actions),
                    thousands(st.released),
                    thousands(STORM_DEVICES)
                ),
                limit: "0".into(),
                pass: Some(
                    st.devices_not_one_action == 0
                        && st.other_actions == 0
                        && st.released == STORM_DEVICES,
                ),
            });
        }
        _ => {
            out.push(missing("leader failover: 429s on POSTs", "0"));
            out.push(missing(
                "leader failover: devices without exactly one unisolate action",
                "0",
            ));
        }
    }
    match sharing_of(r, "foreign") {
        Some((_, m)) if m.foreign.is_some() => {
            let f = m.foreign.as_ref().expect("foreign");
            let throttled: Vec<(&String, &Episodes)> =
                m.episodes.iter().filter(|(_, e)| e.throttled > 0).collect();
            let most = throttled.iter().map(|(_, e)| e.max()).max().unwrap_or(0);
            out.push(Target {
                what: "foreign load (50 of 100 unisolates a minute, 2 simulated hours): most 429s \
                       in one episode"
                    .into(),
                measured: if throttled.is_empty() {
                    "no 429".into()
                } else {
                    throttled
                        .iter()
                        .map(|(api, e)| format!("{api}: {}", first_and_later(e)))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
                limit: "≤ 1".into(),
                pass: Some(most <= 1),
            });
            let worst = throttled
                .iter()
                .filter_map(|(api, e)| Some((*api, e.per_hour_after_first?)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            out.push(Target {
                what:
                    "foreign load: 429s per simulated hour once learned (after the first episode)"
                        .into(),
                measured: match worst {
                    Some((api, rate)) => format!("{rate:.2} ({api})"),
                    None if throttled.is_empty() => "no 429".into(),
                    None => "—".into(),
                },
                limit: "≤ 3".into(),
                pass: Some(worst.is_none_or(|(_, rate)| rate <= 3.0)),
            });
            out.push(Target {
                what: "foreign load: operator's unisolates ÷ what the other app left".into(),
                measured: format!(
                    "{} ({} of {} − {})",
                    f.utilization
                        .map_or("—".into(), |u| format!("{:.1} %", u * 100.0)),
                    f.operator_admitted,
                    f.capacity,
                    f.foreign_admitted
                ),
                limit: "≥ 85 %".into(),
                pass: Some(f.utilization.is_some_and(|u| u >= 0.85)),
            });
        }
        _ => {
            out.push(missing("foreign load: most 429s in one episode", "≤ 1"));
            out.push(missing(
                "foreign load: 429s per simulated hour once learned",
                "≤ 3",
            ));
            out.push(missing(
                "foreign load: operator's unisolates ÷ what the other app left",
                "≥ 85 %",
            ));
        }
    }
    for key in ["endpoint", "app"] {
        let name = format!("keyapp-{key}");
        let what = format!(
            "quota key app, N = 1,000, operator --quota-key {key}: converged, most 429s in one \
             episode after the first"
        );
        match sharing_of(r, &name) {
            Some((_, m)) if m.keyapp.is_some() => {
                let k = m.keyapp.as_ref().expect("keyapp");
                let throttled: Vec<(&String, &Episodes)> =
                    m.episodes.iter().filter(|(_, e)| e.throttled > 0).collect();
                let later = throttled
                    .iter()
                    .map(|(_, e)| e.max_after_first())
                    .max()
                    .unwrap_or(0);
                out.push(Target {
                    what,
                    measured: format!(
                        "{}; {}",
                        if k.converged {
                            "converged".to_string()
                        } else {
                            format!("NOT converged ({} of 1,000 settled)", k.settled)
                        },
                        if throttled.is_empty() {
                            "no 429".to_string()
                        } else {
                            throttled
                                .iter()
                                .map(|(api, e)| format!("{api}: {}", first_and_later(e)))
                                .collect::<Vec<_>>()
                                .join("; ")
                        }
                    ),
                    limit: "converged, ≤ 1".into(),
                    pass: Some(k.converged && later <= 1),
                });
            }
            _ => out.push(missing(&what, "converged, ≤ 1")),
        }
    }
    out
}

/// `first episode 2, later ones at most 1 (4 episodes)`.
fn first_and_later(e: &Episodes) -> String {
    match e.sizes.len() {
        0 => "no 429".into(),
        1 => format!("first episode {}, no later one", e.first()),
        n => format!(
            "first episode {}, later ones at most {} ({n} episodes)",
            e.first(),
            e.max_after_first()
        ),
    }
}

/// `3 × 429 in 2 episodes (2, 1)`, or `0`.
fn show_episodes(e: &Episodes) -> String {
    if e.throttled == 0 {
        return "0".into();
    }
    let sizes: Vec<String> = e.sizes.iter().map(usize::to_string).collect();
    let shown = if sizes.len() > 12 {
        format!("{}, …", sizes[..12].join(", "))
    } else {
        sizes.join(", ")
    };
    format!(
        "{} in {} episode{} ({shown})",
        e.throttled,
        e.sizes.len(),
        if e.sizes.len() == 1 { "" } else { "s" }
    )
}

/// Every API's 429s, e.g. `unisolate: 3 in 2 episodes (2, 1)`; `none` without any.
fn show_all_episodes(m: &SharingMetrics) -> String {
    let parts: Vec<String> = m
        .episodes
        .iter()
        .filter(|(_, e)| e.throttled > 0)
        .map(|(api, e)| format!("{api}: {}", show_episodes(e)))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

/// One cell of a sharing table.
type Cell = dyn Fn(&ScenarioResult, &SharingMetrics) -> String;

/// A table with one column per scenario (those of `names` that ran).
fn table(r: &Report, names: &[&str], rows: Vec<(&str, Box<Cell>)>, line: &mut dyn FnMut(&str)) {
    let cols: Vec<(&ScenarioResult, &SharingMetrics)> =
        names.iter().filter_map(|n| sharing_of(r, n)).collect();
    let mut header = String::from("| |");
    let mut rule = String::from("|---|");
    for (s, _) in &cols {
        header.push_str(&format!(" {} |", s.name));
        rule.push_str("---|");
    }
    line(&header);
    line(&rule);
    for (label, f) in &rows {
        let mut l = format!("| {label} |");
        for (s, m) in &cols {
            l.push_str(&format!(" {} |", f(s, m)));
        }
        line(&l);
    }
    line("");
}

/// Issue 12's section of docs/benchmarks.md.
pub(super) fn render(r: &Report, line: &mut dyn FnMut(&str)) {
    let storms = ["restart-storm", "restart-failover"];
    let keyapps = ["keyapp-endpoint", "keyapp-app"];
    let any = storms
        .iter()
        .chain(&keyapps)
        .chain(&["foreign"])
        .any(|n| sharing_of(r, n).is_some());
    if !any {
        return;
    }
    line("## Sharing the quota (issue 12)");
    line("");
    line(
        "A 429 episode is a run of 429s of one API in the simulator's call log with no admitted \
         call of that API between them. Times are simulated seconds.",
    );
    line("");

    if storms.iter().any(|n| sharing_of(r, n).is_some()) {
        line("### Restarts and failover in the middle of a burst");
        line("");
        line(&format!(
            "{} online devices, all isolated, each released by its DeviceIsolation; the \
             simulator creates a second action for a repeated POST (`--duplicate-mode allow`), \
             so a blind re-POST would show in the ground truth. `restart-storm`: the operator \
             is SIGKILLed and started again every {STORM_KILL_EVERY:.0} simulated seconds from \
             the apply until every device is released; the last process then runs until all \
             are Ready. `restart-failover`: two replicas with `--leader-election` and a \
             {FAILOVER_LEASE_SECONDS}-second lease, signing in as the same app (one quota); the \
             leader is SIGKILLed when the simulator has received {} and {} POSTs (in the middle \
             of a minute's burst) and started again, as a standby, once the other replica has \
             taken the Lease over.",
            thousands(STORM_DEVICES),
            FAILOVER_KILL_AT_POSTS[0],
            FAILOVER_KILL_AT_POSTS[1]
        ));
        line("");
        let st = |m: &SharingMetrics| m.storm.clone().unwrap_or_default();
        let rows: Vec<(&str, Box<Cell>)> = vec![
            ("time scale", Box::new(|s, _| format!("{}", s.time_scale))),
            (
                "kills (with POSTs before and after)",
                Box::new(move |_, m| {
                    let x = st(m);
                    format!("{} ({})", x.kills, x.kills_mid_burst)
                }),
            ),
            (
                "operator processes started",
                Box::new(move |_, m| st(m).processes.to_string()),
            ),
            (
                "takeover after a kill (real s)",
                Box::new(move |_, m| {
                    let x = st(m);
                    if x.takeover_seconds.is_empty() {
                        "—".into()
                    } else {
                        x.takeover_seconds
                            .iter()
                            .map(|t| format!("{t:.1}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                }),
            ),
            (
                "kill to next POST (sim s): median / max",
                Box::new(move |_, m| {
                    let mut gaps: Vec<f64> = st(m)
                        .post_gap_after_kill
                        .iter()
                        .flatten()
                        .copied()
                        .collect();
                    gaps.sort_by(f64::total_cmp);
                    if gaps.is_empty() {
                        "—".into()
                    } else {
                        format!("{:.1} / {:.1}", gaps[gaps.len() / 2], gaps[gaps.len() - 1])
                    }
                }),
            ),
            (
                "POSTs received",
                Box::new(move |_, m| st(m).posts.to_string()),
            ),
            (
                "**429s on POSTs**",
                Box::new(move |_, m| st(m).post_429s.to_string()),
            ),
            (
                "**429s on reads**",
                Box::new(move |_, m| st(m).read_429s.to_string()),
            ),
            (
                "reads (per-machine lookups; most machine-action reads in 60 s)",
                Box::new(move |s, m| {
                    let x = st(m);
                    let most = s
                        .calls
                        .get("machineactions-list")
                        .map_or(0, |c| c.max_per_minute);
                    format!("{} ({}; {most})", x.reads, x.lookups)
                }),
            ),
            (
                "last kill to the next process's first read",
                Box::new(move |_, m| opt(st(m).last_process_first_read, 1)),
            ),
            ("429s by API", Box::new(|_, m| show_all_episodes(m))),
            (
                "unisolate actions (other actions)",
                Box::new(move |_, m| {
                    let x = st(m);
                    format!("{} ({})", x.unisolate_actions, x.other_actions)
                }),
            ),
            (
                "**devices without exactly one unisolate action**",
                Box::new(move |_, m| st(m).devices_not_one_action.to_string()),
            ),
            (
                "devices released (ground truth)",
                Box::new(move |s, m| format!("{}/{}", st(m).released, s.mix.total())),
            ),
            (
                "first POST → last POST",
                Box::new(move |_, m| opt(st(m).first_to_last_post, 1)),
            ),
            (
                "ratio to T(1,000) = 540 (restarts cost time)",
                Box::new(move |_, m| opt(st(m).ratio, 3)),
            ),
            (
                "all released after apply start",
                Box::new(move |_, m| opt(st(m).released_after_apply, 1)),
            ),
            (
                "all Ready after apply start",
                Box::new(move |_, m| opt(st(m).settled_after_apply, 1)),
            ),
            (
                "operator CPU seconds (all processes)",
                Box::new(|s, _| format!("{:.1}", s.operator.cpu_seconds)),
            ),
        ];
        table(r, &storms, rows, line);
    }

    if let Some((s, m)) = sharing_of(r, "foreign")
        && let Some(f) = &m.foreign
    {
        line("### Foreign load");
        line("");
        line(&format!(
            "{} online devices released while another application spends the same quota key \
             (`--foreign-load {}`: calls spread evenly over each minute, from the simulator's \
             start; refused ones are not retried), measured from just before the apply for {:.1} \
             simulated seconds (aimed {FOREIGN_END_MARGIN:.0} s short of two hours: a span a \
             moment longer than two hours would also hold the instant at which a greedy \
             client's third hour opens), time scale {}. Capacity: the unisolates one greedy client could get \
             admitted in that span under 100 per 60 s and 1,500 per 3,600 s exactly as the \
             simulator counts, starting from the windows as they were (the {} foreign calls \
             made before the apply); from empty windows it would be {}. The other application \
             left capacity − its admitted calls; utilization is the operator's admitted \
             unisolates divided by that. Not every device can be released in two hours: that \
             is expected.",
            thousands(s.mix.total()),
            f.load,
            f.span_sim_seconds,
            s.time_scale,
            f.foreign_before,
            f.capacity_empty
        ));
        line("");
        line("| | |");
        line("|---|---|");
        for (label, value) in [
            (
                "foreign unisolates admitted / refused",
                format!("{} / {}", f.foreign_admitted, f.foreign_refused),
            ),
            (
                "operator's unisolates admitted / refused (429)",
                format!("{} / {}", f.operator_admitted, f.operator_refused),
            ),
            ("capacity of the key in the span", f.capacity.to_string()),
            ("left by the other application", f.remaining.to_string()),
            (
                "**utilization of what was left**",
                f.utilization
                    .map_or("—".into(), |u| format!("{:.1} %", u * 100.0)),
            ),
            ("429s by API", show_all_episodes(m)),
            ("429s per simulated hour after the first episode", {
                let parts: Vec<String> = m
                    .episodes
                    .iter()
                    .filter(|(_, e)| e.throttled > 0)
                    .map(|(api, e)| {
                        format!(
                            "{api}: {} over {} h = {}",
                            e.after_first,
                            opt(e.hours_after_first, 2),
                            opt(e.per_hour_after_first, 2)
                        )
                    })
                    .collect();
                if parts.is_empty() {
                    "—".into()
                } else {
                    parts.join("; ")
                }
            }),
            (
                "devices released (ground truth)",
                format!("{}/{}", f.released, s.mix.total()),
            ),
        ] {
            line(&format!("| {label} | {value} |"));
        }
        line("");
    }

    if keyapps.iter().any(|n| sharing_of(r, n).is_some()) {
        line("### One budget for every API (`--quota-key app`)");
        line("");
        line(
            "The N = 1,000 mix (890 online, 100 offline, 10 failing) against a simulator whose \
             quota key is the app: reads, isolates and unisolates share 100 calls a minute and \
             1,500 an hour. `keyapp-endpoint` runs the operator with its default \
             `--quota-key endpoint` (it does not know and must learn from the 429s); \
             `keyapp-app` tells it. Measured until every resource settled.",
        );
        line("");
        let k = |m: &SharingMetrics| m.keyapp.clone().unwrap_or_default();
        let rows: Vec<(&str, Box<Cell>)> = vec![
            ("time scale", Box::new(|s, _| format!("{}", s.time_scale))),
            (
                "operator --quota-key",
                Box::new(move |_, m| k(m).operator_quota_key),
            ),
            (
                "**converged** (settled / resources)",
                Box::new(move |s, m| {
                    let x = k(m);
                    format!(
                        "{} ({}/{})",
                        if x.converged { "yes" } else { "no" },
                        x.settled,
                        s.mix.total()
                    )
                }),
            ),
            (
                "all settled after apply start",
                Box::new(move |_, m| opt(k(m).settled_after_apply, 1)),
            ),
            (
                "last device's first POST after the first POST",
                Box::new(move |_, m| opt(k(m).last_first_post_after_first, 1)),
            ),
            ("POSTs", Box::new(move |_, m| k(m).posts.to_string())),
            (
                "online/offline devices without exactly one admitted POST",
                Box::new(move |_, m| k(m).devices_not_one_post.to_string()),
            ),
            (
                "online devices released (ground truth)",
                Box::new(move |s, m| format!("{}/{}", k(m).online_released, s.mix.online)),
            ),
            ("429s", Box::new(|s, _| s.throttled.to_string())),
            (
                "**429s by API** (episodes)",
                Box::new(|_, m| show_all_episodes(m)),
            ),
            (
                "429s of the key, every API as one (episodes)",
                Box::new(|_, m| m.key_episodes.as_ref().map_or("—".into(), show_episodes)),
            ),
            (
                "most admitted calls of the key in 60 s / 3,600 s",
                Box::new(move |_, m| {
                    let x = k(m);
                    format!("{} / {}", x.key_max_per_minute, x.key_max_per_hour)
                }),
            ),
        ];
        table(r, &keyapps, rows, line);
    }
}
