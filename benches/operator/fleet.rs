//! Issue 13's scenarios: a fleet released through one `DeviceIsolationSet`.
//!
//! - `fleet3000`: 3,000 online devices, isolated and tagged `incident-4711`, among 500 others
//!   (isolated too; every other one tagged `incident-4712`, the rest untagged). One set selects
//!   the tag (`isolated: false`, `maxDevices: 3000`, not paused, no canary); the operator resolves
//!   the selection with `GET /api/machines` reads, records it in `status.selection` and creates
//!   one child DeviceIsolation per selected device, which sends the device's unisolate through
//!   the quota gate.
//! - `fleet10000`: the same with 10,000 tagged devices (T(10,000) = 22,140 simulated seconds), at
//!   time scale 30 (see `time_scale`).
//!
//! Measured, from the simulator's call log unless said otherwise (simulated seconds): the first
//! and the last unisolate POST; the selection time (from the start of the apply to the first
//! POST, and to the last selection read, to `status.selection.resolvedAt` and to the moment a
//! watch on the set saw the selection); (last POST − first POST) / T(N) and (last POST − apply) /
//! (T(N) + selection time), judged against last POST ≤ 1.01 × T(N) + the selection time; the
//! selection reads (`GET /api/machines`); 429s; reads of every read API per selected device until
//! the set was Converged; the ground truth (`--duplicate-mode allow`, so a second action on a
//! device would be created and counted): every selected device released by exactly one action,
//! no other device touched; the operator's peak RSS (VmHWM) and CPU seconds; the time until a
//! watch saw the set Ready=True with reason Converged.
//!
//! Environment: `MDE_BENCH_FLEET_DEVICES=N` shrinks both scenarios to N selected devices (and
//! min(500, N / 2) others), for a smoke run; such a row says so in its title and notes and is
//! not a measurement of the scenario. With `MDE_BENCH_NO_WRITE=1` nothing is written:
//!
//! ```sh
//! cargo build --release -p mde-sim
//! MDE_BENCH_NO_WRITE=1 MDE_BENCH_FLEET_DEVICES=200 cargo bench --bench operator -- fleet3000
//! ```

use super::*;

use kube::api::{Patch, PatchParams};
use mde_isolation_operator::crd::{COMMENT_ANNOTATION, DeviceCounts, DeviceIsolationSet};

/// The set of both scenarios (its children are `<set>-<machine id>`).
const SET_NAME: &str = "release-inc-4711";

/// The tag the set selects, and the tag some of the other devices carry.
const TAG: &str = "incident-4711";
const OTHER_TAG: &str = "incident-4712";

/// Devices the set must not select.
const OTHERS: usize = 500;

/// Last POST ≤ `BOUND_FACTOR` × T(N) + the selection time.
const BOUND_FACTOR: f64 = 1.01;

/// Reads of every read API per selected device, until Converged.
const READS_PER_DEVICE_LIMIT: f64 = 0.05;

/// `GET /api/machines` calls of the selection.
const SELECTION_READS_LIMIT: usize = 3;

/// Peak RSS with the 10,000 children.
const RSS_LIMIT_MIB: f64 = 64.0;

/// Machines per `POST /sim/machines` (the simulator reads bodies up to 1 MiB).
const SEED_CHUNK: usize = 2000;

/// The two scenarios and their nominal sizes.
const ROWS: [(&str, usize); 2] = [("fleet3000", 3000), ("fleet10000", 10_000)];

// ---------------------------------------------------------------------------------------------
// Results.

/// What issue 13's scenarios measure.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FleetMetrics {
    /// Devices carrying the selected tag (isolated at the start).
    tagged: usize,
    /// Other devices (isolated at the start; half of them carry another tag).
    others: usize,
    /// `MDE_BENCH_FLEET_DEVICES` made the scenario smaller than its name says.
    shrunk: bool,
    /// `status.selection.count` (none: no selection seen).
    selection_count: Option<u32>,
    /// `GET /api/machines` calls (list) over the whole run.
    selection_reads: usize,
    /// Their query strings, in order.
    selection_queries: Vec<String>,
    /// Distinct `status.selection.resolvedAt` values the watch saw (one resolution each).
    resolutions_seen: usize,
    /// Simulated seconds from the apply start to the last selection read.
    last_selection_read_after_apply: Option<f64>,
    /// Simulated seconds from the apply start to `status.selection.resolvedAt` (first seen;
    /// written by the operator in real time, truncated to the second: up to one second times the
    /// scale early).
    resolved_after_apply: Option<f64>,
    /// Simulated seconds from the apply start until the watch saw `status.selection`.
    selection_seen_after_apply: Option<f64>,
    /// The selection time: simulated seconds from the apply start to the first POST.
    first_post_after_apply: Option<f64>,
    /// Simulated seconds from the apply start to the last POST.
    last_post_after_apply: Option<f64>,
    /// Simulated seconds from the first POST to the last.
    last_post_after_first: Option<f64>,
    /// T(N) of the selected devices.
    quota_bound: f64,
    /// Simulated seconds from the first POST to POST number min(N, 1,500), whose T is
    /// `first_hour_bound`: later than that, creating the children (not the quota) paced the
    /// first hour, and every later hour inherits the delay.
    #[serde(default)]
    first_hour_last_post: Option<f64>,
    /// T(min(N, 1,500)).
    #[serde(default)]
    first_hour_bound: f64,
    /// `last_post_after_first / quota_bound`.
    ratio: Option<f64>,
    /// `last_post_after_apply / (quota_bound + first_post_after_apply)`.
    ratio_with_selection: Option<f64>,
    /// `BOUND_FACTOR × quota_bound + first_post_after_apply`: the limit of
    /// `last_post_after_apply`.
    bound_limit: Option<f64>,
    /// isolate + unisolate POSTs received (every answer).
    posts: usize,
    /// POSTs not answered 2xx.
    posts_rejected: usize,
    /// Tagged devices whose POST count is not exactly one.
    devices_not_one_post: usize,
    /// POSTs on devices without the tag.
    other_posts: usize,
    /// Unisolate actions the simulator created on tagged devices (ground truth).
    unisolate_actions: usize,
    /// Tagged devices without exactly one unisolate action.
    devices_not_one_action: usize,
    /// Every other action (other types on tagged devices, any action on the others).
    other_actions: usize,
    /// Tagged devices released at the end (ground truth).
    released: usize,
    /// Other devices still isolated at the end (ground truth).
    others_isolated: usize,
    /// Reads of every read API (machine actions and machines, the selection's included) from
    /// the operator's start until the set was Converged (the whole run if it never was).
    reads_until_converged: usize,
    /// Of those, `GET /api/machineactions` (list and get).
    action_reads_until_converged: usize,
    /// `reads_until_converged` per tagged device.
    reads_per_device: f64,
    /// Simulated seconds from the apply start until every child was Ready (a watch on the
    /// children).
    children_settled_after_apply: Option<f64>,
    /// Simulated seconds from the apply start until the watch saw the set Ready=True with reason
    /// Converged (for its generation).
    converged_after_apply: Option<f64>,
    /// The set's last Ready condition: `status/reason`.
    final_ready: Option<String>,
    /// The set's last `status.devices`.
    final_devices: Option<DeviceCounts>,
    /// Changes of the set a watch saw (its status writes).
    set_changes_seen: usize,
}

impl FleetMetrics {
    /// Every selected device released by exactly one action; nothing else touched.
    fn ground_truth_exact(&self) -> bool {
        self.devices_not_one_post == 0
            && self.posts_rejected == 0
            && self.other_posts == 0
            && self.devices_not_one_action == 0
            && self.other_actions == 0
            && self.released == self.tagged
            && self.others_isolated == self.others
            && self.selection_count == Some(self.tagged as u32)
    }

    /// Last POST within `BOUND_FACTOR` × T(N) + the selection time.
    fn within_bound(&self) -> Option<bool> {
        Some(self.last_post_after_apply? <= self.bound_limit?)
    }
}

// ---------------------------------------------------------------------------------------------
// The set as a watch sees it.

#[derive(Default)]
struct SetSeen {
    changes: usize,
    selection_at: Option<DateTime<Utc>>,
    resolved_at: Vec<String>,
    selection_count: Option<u32>,
    converged_at: Option<DateTime<Utc>>,
    ready: Option<String>,
    devices: Option<DeviceCounts>,
}

impl SetSeen {
    fn observe(&mut self, set: &DeviceIsolationSet) {
        self.changes += 1;
        let now = Utc::now();
        let Some(status) = set.status.as_ref() else {
            return;
        };
        if let Some(sel) = &status.selection {
            self.selection_at.get_or_insert(now);
            if !self.resolved_at.contains(&sel.resolved_at) {
                self.resolved_at.push(sel.resolved_at.clone());
            }
            self.selection_count = Some(sel.count);
        }
        self.devices = Some(status.devices.clone());
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.observed_generation == set.metadata.generation);
        self.ready = ready.map(|c| format!("{}/{}", c.status, c.reason));
        if ready.is_some_and(|c| c.status == "True" && c.reason == "Converged") {
            self.converged_at.get_or_insert(now);
        } else {
            self.converged_at = None;
        }
    }
}

fn watch_set(
    kube: &kube::Client,
    namespace: &str,
) -> (Arc<Mutex<SetSeen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(SetSeen::default()));
    let api: Api<DeviceIsolationSet> = Api::namespaced(kube.clone(), namespace);
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(set) | watcher::Event::InitApply(set)) = ev {
                s.lock().unwrap_or_else(|e| e.into_inner()).observe(&set);
            }
        }
    });
    (seen, task)
}

// ---------------------------------------------------------------------------------------------
// The scenario.

/// Selected devices of a scenario: its nominal size, or `MDE_BENCH_FLEET_DEVICES`.
fn size(nominal: usize) -> (usize, bool) {
    match std::env::var("MDE_BENCH_FLEET_DEVICES")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        Some(n) => (n, n != nominal),
        None => (nominal, false),
    }
}

/// One seeded machine: id, name, tags.
struct Machine {
    id: String,
    name: String,
    tags: Vec<&'static str>,
}

/// `tagged + others` machines, the others spread evenly through the numbering (every other one
/// carrying `OTHER_TAG`).
fn machines(tagged: usize, others: usize) -> Vec<Machine> {
    let total = tagged + others;
    let mut is_other = vec![false; total];
    for k in 0..others {
        is_other[k * total / others + total / (2 * others)] = true;
    }
    let mut k = 0;
    (0..total)
        .map(|i| {
            let tags = if is_other[i] {
                k += 1;
                if k % 2 == 0 { vec![OTHER_TAG] } else { vec![] }
            } else {
                vec![TAG]
            };
            Machine {
                id: machine_id(i as u32 + 1),
                name: format!("d{i:05}.fleet.contoso.local"),
                tags,
            }
        })
        .collect()
}

pub(super) async fn fleet3000() -> ScenarioResult {
    fleet(ROWS[0].0, ROWS[0].1).await
}

pub(super) async fn fleet10000() -> ScenarioResult {
    fleet(ROWS[1].0, ROWS[1].1).await
}

/// `tagged` online devices released by one set selecting their tag, among others.
async fn fleet(name: &'static str, nominal: usize) -> ScenarioResult {
    let scale = time_scale(name);
    let (n, shrunk) = size(nominal);
    let others = if shrunk { OTHERS.min(n / 2) } else { OTHERS };
    let mut bed = Bed::with(name, Vec::new(), scale, &["--duplicate-mode", "allow"], &[]).await;
    if shrunk {
        bed.notes.push(format!(
            "smoke run: MDE_BENCH_FLEET_DEVICES={n} (not the scenario's {} devices)",
            thousands(nominal)
        ));
    }

    // The tenant: seeded after the start (the bench's seed file has no tags), before the apply.
    let all = machines(n, others);
    let seeds: Vec<Value> = all
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "computerDnsName": m.name,
                "behaviour": "online",
                "isolated": true,
                "machineTags": m.tags,
            })
        })
        .collect();
    for chunk in seeds.chunks(SEED_CHUNK) {
        bed.sim
            .admin_post("machines", json!({ "machines": chunk }))
            .await;
    }
    let tagged: Vec<&Machine> = all.iter().filter(|m| m.tags.contains(&TAG)).collect();
    let untagged: Vec<&Machine> = all.iter().filter(|m| !m.tags.contains(&TAG)).collect();
    // The children the set will create, for the watch that tells when all are Ready.
    bed.devices = tagged
        .iter()
        .map(|m| Device {
            name: format!("{SET_NAME}-{}", m.id),
            id: m.id.clone(),
            behaviour: Behaviour::Online,
        })
        .collect();
    bed.watch.abort();
    let (tracker, watch) = track(&bed.kube, &bed.namespace, &bed.devices);
    bed.tracker = tracker;
    bed.watch = watch;
    let (seen, set_watch) = watch_set(&bed.kube, &bed.namespace);

    // The apply: one manifest.
    let sets: Api<DeviceIsolationSet> = Api::namespaced(bed.kube.clone(), &bed.namespace);
    let manifest = json!({
        "apiVersion": "isolation.mde.dev/v1alpha1",
        "kind": "DeviceIsolationSet",
        "metadata": {
            "name": SET_NAME,
            "annotations": { COMMENT_ANNOTATION: "False positive, rule 77 (INC-4711; bench)" },
        },
        "spec": {
            "isolated": false,
            "selector": { "machineTags": [TAG] },
            "maxDevices": n,
            "paused": false,
            "rollout": { "canary": 0 },
        },
    });
    let applied_at = Utc::now();
    if let Err(e) = sets
        .patch(
            SET_NAME,
            &PatchParams::apply("mde-bench").force(),
            &Patch::Apply(&manifest),
        )
        .await
    {
        bed.notes.push(format!("applying the set failed: {e}"));
    }
    let applied_end = Utc::now();
    let real = seconds_between(applied_at, applied_end);
    let apply = ApplyInfo {
        objects: 1,
        concurrency: 1,
        real_seconds: real,
        sim_seconds: real * scale,
    };
    eprintln!(
        "[{name}] applied one DeviceIsolationSet selecting {} of {} devices",
        n,
        n + others
    );

    // Until the set is Converged (a timeout is noted).
    let bound = quota_bound(n);
    let timeout = timeout_for(bound + 600.0, scale, 0.0);
    let started = Instant::now();
    let mut next_report = started + Duration::from_secs(10);
    loop {
        let (done, ready, devices) = {
            let s = seen.lock().unwrap_or_else(|e| e.into_inner());
            (s.converged_at, s.ready.clone(), s.devices.clone())
        };
        if done.is_some() {
            break;
        }
        if started.elapsed() > timeout {
            bed.notes.push(format!(
                "the set was not Converged within {timeout:?} (Ready {})",
                ready.unwrap_or_else(|| "not written".into())
            ));
            eprintln!("[{name}] operator log tail:\n{}", bed.op.tail());
            break;
        }
        if Instant::now() >= next_report {
            eprintln!(
                "[{name}] {:.0} s: Ready {}, devices {}",
                started.elapsed().as_secs_f64(),
                ready.as_deref().unwrap_or("—"),
                devices.map_or("—".into(), |d| show_counts(&d))
            );
            next_report += Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_watch.abort();

    let clock = bed.clock;
    let apply_start = clock.sim_at(applied_at);
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    let converged = seen.converged_at.map(|t| clock.sim_at(t));
    let children_settled = bed
        .tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .all_settled_at
        .map(|t| clock.sim_at(t));
    let log = calls(&bed.sim).await;
    let until_converged: Vec<&Call> = log
        .iter()
        .filter(|c| converged.is_none_or(|at| c.sim() <= at))
        .collect();
    let calls_by_api = call_summary(&bed.sim, &until_converged, n).await;

    let posts: Vec<&Call> = log.iter().filter(|c| c.is_post()).collect();
    let mut posts_per: HashMap<&str, usize> = HashMap::new();
    for p in &posts {
        if let Some(m) = p.machine() {
            *posts_per.entry(m).or_default() += 1;
        }
    }
    let first = posts.iter().map(|c| c.sim()).min();
    let last = posts.iter().map(|c| c.sim()).max();
    let after = |to: Option<DateTime<Utc>>| to.map(|t| seconds_between(apply_start, t));
    let selection_reads: Vec<&Call> = log
        .iter()
        .filter(|c| c.method == "GET" && c.api == "machines-list")
        .collect();
    let (unisolates, other_actions) = actions(&bed.sim, &tagged).await;
    let truth = isolated_now(&bed.sim).await;
    let reads = until_converged.iter().filter(|c| c.is_read()).count();
    let selection_time = after(first);
    let last_after_apply = after(last);
    let metrics = FleetMetrics {
        tagged: n,
        others,
        shrunk,
        selection_count: seen.selection_count,
        selection_reads: selection_reads.len(),
        selection_queries: selection_reads
            .iter()
            .map(|c| c.query.clone().unwrap_or_default())
            .collect(),
        resolutions_seen: seen.resolved_at.len(),
        last_selection_read_after_apply: after(selection_reads.iter().map(|c| c.sim()).max()),
        resolved_after_apply: seen
            .resolved_at
            .first()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| seconds_between(apply_start, clock.sim_at(t.with_timezone(&Utc)))),
        selection_seen_after_apply: after(seen.selection_at.map(|t| clock.sim_at(t))),
        first_post_after_apply: selection_time,
        last_post_after_apply: last_after_apply,
        last_post_after_first: match (first, last) {
            (Some(a), Some(b)) => Some(seconds_between(a, b)),
            _ => None,
        },
        quota_bound: bound,
        first_hour_last_post: {
            let mut times: Vec<DateTime<Utc>> = posts.iter().map(|c| c.sim()).collect();
            times.sort();
            let k = n.min(PER_HOUR as usize);
            match (first, times.get(k.saturating_sub(1))) {
                (Some(a), Some(b)) if times.len() >= k => Some(seconds_between(a, *b)),
                _ => None,
            }
        },
        first_hour_bound: quota_bound(n.min(PER_HOUR as usize)),
        ratio: match (first, last) {
            (Some(a), Some(b)) if bound > 0.0 => Some(seconds_between(a, b) / bound),
            _ => None,
        },
        ratio_with_selection: match (last_after_apply, selection_time) {
            (Some(l), Some(s)) if bound + s > 0.0 => Some(l / (bound + s)),
            _ => None,
        },
        bound_limit: selection_time.map(|s| BOUND_FACTOR * bound + s),
        posts: posts.len(),
        posts_rejected: posts.iter().filter(|c| c.status >= 300).count(),
        devices_not_one_post: tagged
            .iter()
            .filter(|m| posts_per.get(m.id.as_str()).copied().unwrap_or(0) != 1)
            .count(),
        other_posts: untagged
            .iter()
            .map(|m| posts_per.get(m.id.as_str()).copied().unwrap_or(0))
            .sum(),
        unisolate_actions: unisolates.values().sum(),
        devices_not_one_action: unisolates.values().filter(|k| **k != 1).count(),
        other_actions,
        released: tagged
            .iter()
            .filter(|m| truth.get(&m.id) == Some(&false))
            .count(),
        others_isolated: untagged
            .iter()
            .filter(|m| truth.get(&m.id) == Some(&true))
            .count(),
        reads_until_converged: reads,
        action_reads_until_converged: until_converged
            .iter()
            .filter(|c| c.is_action_read())
            .count(),
        reads_per_device: reads as f64 / n as f64,
        children_settled_after_apply: after(children_settled),
        converged_after_apply: after(converged),
        final_ready: seen.ready.clone(),
        final_devices: seen.devices.clone(),
        set_changes_seen: seen.changes,
    };
    if metrics.resolutions_seen > 1 {
        bed.notes.push(format!(
            "the watch saw {} values of status.selection.resolvedAt: the selection was resolved \
             more than once",
            metrics.resolutions_seen
        ));
    }
    eprintln!(
        "[{name}] selection {} reads, first POST {} s after the apply, last {} s (T = {bound:.0}), \
         Converged at {} s",
        metrics.selection_reads,
        opt(metrics.first_post_after_apply, 1),
        opt(metrics.last_post_after_apply, 1),
        opt(metrics.converged_after_apply, 1)
    );

    let (kube, namespace) = (bed.kube.clone(), bed.namespace.clone());
    let (run, operator, notes) = bed.finish().await;
    // The set goes too (its status holds every selected id), so later scenarios run against a
    // lean API server; the operator is stopped, so nothing recreates the children.
    let sets: Api<DeviceIsolationSet> = Api::namespaced(kube, &namespace);
    let _ = sets.delete(SET_NAME, &DeleteParams::default()).await;
    ScenarioResult {
        name: name.into(),
        title: format!(
            "Fleet: one DeviceIsolationSet releasing {} tagged devices among {}{}",
            thousands(n),
            thousands(n + others),
            if shrunk { " (smoke run, shrunk)" } else { "" }
        ),
        run,
        time_scale: scale,
        mix: Mix {
            online: n,
            ..Mix::default()
        },
        apply: Some(apply),
        calls: calls_by_api.0,
        throttled: calls_by_api.1,
        operator,
        burst: None,
        restart: None,
        offline: None,
        latency: None,
        churn: None,
        sharing: None,
        fleet: Some(metrics),
        tenants: None,
        notes,
    }
}

/// Unisolate actions per tagged device (ground truth), and every other action.
async fn actions(sim: &Sim, tagged: &[&Machine]) -> (HashMap<String, usize>, usize) {
    let all = sim.admin_get("actions").await;
    let mut per: HashMap<String, usize> = tagged.iter().map(|m| (m.id.clone(), 0)).collect();
    let mut other = 0;
    for a in all["value"].as_array().into_iter().flatten() {
        let machine = a["machineId"].as_str().unwrap_or_default();
        match per.get_mut(machine) {
            Some(k) if a["type"] == "Unisolate" => *k += 1,
            _ => other += 1,
        }
    }
    (per, other)
}

/// `selected 3000, requested 3000, ready 2990, pending 10, stalled 0, failed 0`.
fn show_counts(d: &DeviceCounts) -> String {
    format!(
        "selected {}, requested {}, ready {}, pending {}, stalled {}, failed {}",
        d.selected, d.requested, d.ready, d.pending, d.stalled, d.failed
    )
}

// ---------------------------------------------------------------------------------------------
// Targets and the Markdown section.

fn fleet_of<'a>(r: &'a Report, name: &str) -> Option<(&'a ScenarioResult, &'a FleetMetrics)> {
    let s = find(r, name)?;
    Some((s, s.fleet.as_ref()?))
}

/// Issue 13's rows of the Targets table.
pub(super) fn targets(r: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    for (name, nominal) in ROWS {
        let Some((s, m)) = fleet_of(r, name) else {
            let label = format!("fleet, N = {}", thousands(nominal));
            let mut limits = vec![
                (
                    "last POST after the apply",
                    format!("≤ {BOUND_FACTOR} × T(N) + selection time"),
                ),
                (
                    "selection reads (GET /api/machines)",
                    format!("≤ {SELECTION_READS_LIMIT}"),
                ),
                ("429 answers", "0".into()),
                (
                    "reads per selected device until Converged",
                    format!("≤ {READS_PER_DEVICE_LIMIT}"),
                ),
                ("ground truth", "exact".into()),
            ];
            if nominal == 10_000 {
                limits.push(("operator peak RSS", format!("≤ {RSS_LIMIT_MIB:.0} MiB")));
            }
            for (what, limit) in limits {
                out.push(Target {
                    what: format!("{label}: {what}"),
                    measured: "not measured".into(),
                    limit,
                    pass: None,
                });
            }
            continue;
        };
        let label = format!(
            "fleet, N = {}{}",
            thousands(m.tagged),
            if m.shrunk { " (smoke run)" } else { "" }
        );
        out.push(Target {
            what: format!("{label}: last POST after the apply (simulated)"),
            measured: match (m.last_post_after_apply, m.ratio) {
                (Some(l), Some(q)) => format!("{l:.1} s ((last − first POST) / T = {q:.3})"),
                (Some(l), None) => format!("{l:.1} s"),
                _ => "no POST".into(),
            },
            limit: match (m.bound_limit, m.first_post_after_apply) {
                (Some(b), Some(sel)) => format!(
                    "≤ {b:.1} s ({BOUND_FACTOR} × T = {BOUND_FACTOR} × {:.0} + selection {sel:.1})",
                    m.quota_bound
                ),
                _ => format!("≤ {BOUND_FACTOR} × T(N) + selection time"),
            },
            pass: m.within_bound().or(Some(false)),
        });
        out.push(Target {
            what: format!("{label}: selection reads (GET /api/machines)"),
            measured: format!(
                "{} (selection of {})",
                m.selection_reads,
                m.selection_count
                    .map_or("none".into(), |c| thousands(c as usize))
            ),
            limit: format!("≤ {SELECTION_READS_LIMIT}"),
            pass: Some(m.selection_reads <= SELECTION_READS_LIMIT && m.selection_count.is_some()),
        });
        out.push(Target {
            what: format!("{label}: 429 answers"),
            measured: s.throttled.to_string(),
            limit: "0".into(),
            pass: Some(s.throttled == 0),
        });
        out.push(Target {
            what: format!("{label}: reads (every read API) per selected device until Converged"),
            measured: format!("{:.3} ({})", m.reads_per_device, m.reads_until_converged),
            limit: format!("≤ {READS_PER_DEVICE_LIMIT}"),
            pass: Some(
                m.reads_per_device <= READS_PER_DEVICE_LIMIT && m.converged_after_apply.is_some(),
            ),
        });
        out.push(Target {
            what: format!(
                "{label}: ground truth (selected released by exactly one action, others untouched)"
            ),
            measured: format!(
                "{}/{} released, {} without exactly one action; {} of {} others still isolated, \
                 {} POSTs and {} actions elsewhere",
                thousands(m.released),
                thousands(m.tagged),
                m.devices_not_one_action,
                m.others_isolated,
                m.others,
                m.other_posts,
                m.other_actions
            ),
            limit: "exact".into(),
            pass: Some(m.ground_truth_exact()),
        });
        if nominal == 10_000 {
            out.push(Target {
                what: format!("{label}: operator peak RSS with the children"),
                measured: format!(
                    "{:.1} MiB ({:.1} CPU s)",
                    s.operator.peak_rss_mib, s.operator.cpu_seconds
                ),
                limit: format!("≤ {RSS_LIMIT_MIB:.0} MiB"),
                pass: Some(
                    s.operator.peak_rss_mib > 0.0 && s.operator.peak_rss_mib <= RSS_LIMIT_MIB,
                ),
            });
        }
    }
    out
}

/// One cell of the fleet table.
type Cell = dyn Fn(&ScenarioResult, &FleetMetrics) -> String;

/// Issue 13's section of docs/benchmarks.md.
pub(super) fn render(r: &Report, line: &mut dyn FnMut(&str)) {
    let cols: Vec<(&ScenarioResult, &FleetMetrics)> =
        ROWS.iter().filter_map(|(n, _)| fleet_of(r, n)).collect();
    if cols.is_empty() {
        return;
    }
    line("## Fleet (DeviceIsolationSet)");
    line("");
    line(&format!(
        "One DeviceIsolationSet releases every device tagged `{TAG}` (`isolated: false`, \
         `maxDevices` = N, not paused, no canary): N online devices, all isolated, among {OTHERS} \
         others (isolated too; every other one tagged `{OTHER_TAG}`, the rest untagged). The \
         bench applies the one manifest; the operator resolves the selection with \
         `GET /api/machines` reads, records it in `status.selection` and creates one child \
         DeviceIsolation per selected device, and the children send the unisolates through the \
         quota gate. The simulator creates a second action for a repeated POST \
         (`--duplicate-mode allow`), so one would show in the ground truth. Times are simulated \
         seconds from the start of the apply, from the simulator's call log; the selection time \
         is the apply to the first POST (`status.selection.resolvedAt` is written to the second \
         of real time, truncated: up to one second times the scale early). The target is last POST ≤ \
         {BOUND_FACTOR} × T(N) + the selection time. Converged is the moment a watch on the set \
         saw Ready=True with reason Converged. Reads count every read API (machine actions and \
         machines, the selection's included) from the operator's start until Converged; the \
         calls-per-API table above counts the same span, divided by N."
    ));
    line("");
    let mut header = String::from("| |");
    let mut rule = String::from("|---|");
    for (s, _) in &cols {
        header.push_str(&format!(" {} |", s.name));
        rule.push_str("---|");
    }
    line(&header);
    line(&rule);
    let rows: Vec<(&str, Box<Cell>)> = vec![
        ("time scale", Box::new(|s, _| format!("{}", s.time_scale))),
        (
            "selected (status.selection.count) / tagged / others",
            Box::new(|_, m| {
                format!(
                    "{} / {} / {}{}",
                    m.selection_count
                        .map_or("—".into(), |c| thousands(c as usize)),
                    thousands(m.tagged),
                    m.others,
                    if m.shrunk { " (smoke run)" } else { "" }
                )
            }),
        ),
        (
            "**selection reads** (GET /api/machines; resolutions seen)",
            Box::new(|_, m| format!("{} ({})", m.selection_reads, m.resolutions_seen)),
        ),
        (
            "apply → last selection read",
            Box::new(|_, m| opt(m.last_selection_read_after_apply, 1)),
        ),
        (
            "apply → status.selection.resolvedAt / seen by the watch",
            Box::new(|_, m| {
                format!(
                    "{} / {}",
                    opt(m.resolved_after_apply, 1),
                    opt(m.selection_seen_after_apply, 1)
                )
            }),
        ),
        (
            "**selection time**: apply → first POST",
            Box::new(|_, m| opt(m.first_post_after_apply, 1)),
        ),
        (
            "apply → last POST",
            Box::new(|_, m| opt(m.last_post_after_apply, 1)),
        ),
        (
            "limit: 1.01 × T(N) + selection time",
            Box::new(|_, m| opt(m.bound_limit, 1)),
        ),
        (
            "first POST → last POST",
            Box::new(|_, m| opt(m.last_post_after_first, 1)),
        ),
        ("T(N)", Box::new(|_, m| format!("{:.0}", m.quota_bound))),
        (
            "first POST → POST number min(N, 1,500) (its T)",
            Box::new(|_, m| {
                format!(
                    "{} ({:.0})",
                    opt(m.first_hour_last_post, 1),
                    m.first_hour_bound
                )
            }),
        ),
        (
            "**(last − first POST) / T(N)**",
            Box::new(|_, m| opt(m.ratio, 3)),
        ),
        (
            "(last POST − apply) / (T(N) + selection time)",
            Box::new(|_, m| opt(m.ratio_with_selection, 3)),
        ),
        (
            "POSTs (not 2xx)",
            Box::new(|_, m| format!("{} ({})", thousands(m.posts), m.posts_rejected)),
        ),
        ("**429s**", Box::new(|s, _| s.throttled.to_string())),
        (
            "**reads until Converged** (per selected device)",
            Box::new(|_, m| format!("{} ({:.3})", m.reads_until_converged, m.reads_per_device)),
        ),
        (
            "… of which machine-action reads",
            Box::new(|_, m| m.action_reads_until_converged.to_string()),
        ),
        (
            "unisolate actions (other actions)",
            Box::new(|_, m| format!("{} ({})", thousands(m.unisolate_actions), m.other_actions)),
        ),
        (
            "**selected devices without exactly one POST / action**",
            Box::new(|_, m| format!("{} / {}", m.devices_not_one_post, m.devices_not_one_action)),
        ),
        (
            "selected devices released (ground truth)",
            Box::new(|_, m| format!("{}/{}", thousands(m.released), thousands(m.tagged))),
        ),
        (
            "others still isolated (ground truth); POSTs on them",
            Box::new(|_, m| format!("{}/{}; {}", m.others_isolated, m.others, m.other_posts)),
        ),
        (
            "apply → every child Ready",
            Box::new(|_, m| opt(m.children_settled_after_apply, 1)),
        ),
        (
            "**apply → set Converged**",
            Box::new(|_, m| opt(m.converged_after_apply, 1)),
        ),
        (
            "set's Ready at the end; status.devices",
            Box::new(|_, m| {
                format!(
                    "{}; {}",
                    m.final_ready.as_deref().unwrap_or("—"),
                    m.final_devices.as_ref().map_or("—".into(), show_counts)
                )
            }),
        ),
        (
            "set changes seen by the watch",
            Box::new(|_, m| m.set_changes_seen.to_string()),
        ),
        (
            "**operator peak RSS (MiB)**",
            Box::new(|s, _| format!("{:.1}", s.operator.peak_rss_mib)),
        ),
        (
            "operator CPU seconds",
            Box::new(|s, _| format!("{:.1}", s.operator.cpu_seconds)),
        ),
    ];
    for (label, f) in &rows {
        let mut l = format!("| {label} |");
        for (s, m) in &cols {
            l.push_str(&format!(" {} |", f(s, m)));
        }
        line(&l);
    }
    line("");
}
