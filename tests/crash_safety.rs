//! Crash safety: the operator is killed with SIGKILL at random moments (a seeded RNG) while
//! 200 resources converge, and restarted right after each kill. The simulator adds latency to
//! every API call so that kills land while POSTs are in flight and between a POST and the status
//! write that records its action, and it runs with `--duplicate-mode allow`, so any blind
//! re-POST would create a second action instead of being refused.
//!
//! At the end, from the simulator's ground truth: every device is in its desired state, every
//! resource is Ready for its latest generation, and every machine received exactly one action
//! per desired-state change (one for most, two for the resources whose desired state was flipped
//! mid-run after their first action succeeded).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, condition, create, device_isolation, machine_id,
    seed_file,
};
use common::sim::Sim;
use kube::api::{Api, ListParams, Patch, PatchParams};
use mde_isolation_operator::crd::DeviceIsolation;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Resources (and machines).
const N: usize = 200;
/// Resources whose desired state is flipped once their first action succeeded.
const FLIP_EVERY: usize = 10;
/// Kills before the operator is left alone to finish.
const MIN_KILLS: usize = 30;
/// Seed of the kill schedule.
const KILL_SEED: u64 = 0x5eed_c4a5;
/// Simulated clock speed (online devices finish an action in 60 simulated seconds: 1 s real).
const SCALE: &str = "60";
/// Real latency added by the simulator to each API call.
const LATENCY_MS: &str = "120";

/// The operator, shared between the test and the killer thread.
type Shared = Arc<Mutex<Operator>>;

fn tail(op: &Shared) -> String {
    op.lock().unwrap_or_else(|e| e.into_inner()).tail()
}

/// What the resources looked like at the moment of each kill.
#[derive(Debug, Default)]
struct KillStats {
    kills: usize,
    /// Intents (written before a POST) whose action exists in MDE: the POST was applied and the
    /// kill came before the status write that records it.
    applied_unrecorded: usize,
    /// Intents with no action in MDE: the POST had not been applied (or not sent).
    intent_only: usize,
}

/// Kills (SIGKILL) and restarts the operator at seeded random intervals until told to stop and
/// at least `MIN_KILLS` kills were made. Between the kill and the restart it records which
/// resources held an intent, and whether MDE had applied that intent's POST.
async fn killer(
    op: Shared,
    sim: Arc<Sim>,
    api: Api<DeviceIsolation>,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<KillStats>>,
) {
    let mut rng = StdRng::seed_from_u64(KILL_SEED);
    loop {
        // Sometimes right after a restart (mid-startup), mostly after work has started.
        let wait = if rng.random_bool(0.2) {
            rng.random_range(50..300)
        } else {
            rng.random_range(300..1600)
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let kills = stats.lock().unwrap_or_else(|e| e.into_inner()).kills;
        if stop.load(Ordering::SeqCst) && kills >= MIN_KILLS {
            return;
        }
        op.lock().unwrap_or_else(|e| e.into_inner()).kill();
        let markers: Vec<String> = api
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.status?.intent.map(|i| i.marker))
            .collect();
        let comments: Vec<String> = if markers.is_empty() {
            Vec::new()
        } else {
            sim.admin_get("actions").await["value"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|a| a["requestorComment"].as_str().map(str::to_string))
                .collect()
        };
        let applied = markers
            .iter()
            .filter(|m| comments.iter().any(|c| c.ends_with(m.as_str())))
            .count();
        op.lock().unwrap_or_else(|e| e.into_inner()).restart();
        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
        s.kills += 1;
        s.applied_unrecorded += applied;
        s.intent_only += markers.len() - applied;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_duplicates_an_action() {
    let started = Instant::now();
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("crash").await;
    let client = c.client().await;

    // Even machines start isolated and are released; odd ones start released and are isolated.
    let ids: Vec<String> = (0..N).map(|i| machine_id(0xc000 + i as u32)).collect();
    let names: Vec<String> = (0..N)
        .map(|i| format!("crash-{i:03}.contoso.local"))
        .collect();
    let seed: Vec<SeedMachine<'_>> = (0..N)
        .map(|i| SeedMachine {
            id: &ids[i],
            name: &names[i],
            behaviour: "online",
            isolated: i % 2 == 0,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_file(dir.path(), &seed);
    let sim = Arc::new(Sim::start(&[
        "--seed",
        seed.to_str().unwrap(),
        "--time-scale",
        SCALE,
        "--latency-ms",
        LATENCY_MS,
        "--duplicate-mode",
        "allow",
        "--rng-seed",
        "7",
    ]));
    let op: Shared = Arc::new(Mutex::new(Operator::start(
        &sim,
        OperatorConfig::new(&c.kubeconfig, &ns),
    )));
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(KillStats::default()));
    let killer = tokio::spawn(killer(
        op.clone(),
        sim.clone(),
        api.clone(),
        stop.clone(),
        stats.clone(),
    ));

    // Resources arrive over a few seconds while the killer runs; creation order is shuffled.
    let mut order: Vec<usize> = (0..N).collect();
    let mut rng = StdRng::seed_from_u64(KILL_SEED ^ 1);
    for i in (1..N).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    // Desired state per resource: (isolated, number of desired-state changes so far).
    let mut desired: BTreeMap<usize, (bool, usize)> = BTreeMap::new();
    for &i in &order {
        let isolated = i % 2 == 1;
        create(
            &client,
            &ns,
            &device_isolation(&format!("d{i:03}"), &ids[i], isolated, Some("crash test")),
        )
        .await;
        desired.insert(i, (isolated, 1));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    // Flip every tenth resource once its first action has succeeded: a second desired-state
    // change, which must cost exactly one more action.
    let flips: Vec<usize> = (0..N).step_by(FLIP_EVERY).collect();
    let mut pending_flips = flips.clone();
    let flip_deadline = Instant::now() + Duration::from_secs(150);
    while !pending_flips.is_empty() {
        let truth = machines_by_id(&sim).await;
        let mut still = Vec::new();
        for i in pending_flips {
            let t = &truth[&ids[i]];
            let first_done = t["isolated"] == json!(i % 2 == 1) && t["openActions"] == 0;
            if first_done {
                let now = i % 2 == 0; // flipped: released ones are isolated again and vice versa
                api.patch(
                    &format!("d{i:03}"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"isolated": now}})),
                )
                .await
                .unwrap_or_else(|e| panic!("flip d{i:03}: {e}"));
                desired.insert(i, (now, 2));
            } else {
                still.push(i);
            }
        }
        pending_flips = still;
        assert!(
            Instant::now() < flip_deadline,
            "first actions of {pending_flips:?} never completed; operator log tail:\n{}",
            tail(&op)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Let the killer reach its minimum, then leave the operator alone to finish.
    stop.store(true, Ordering::SeqCst);
    killer.await.expect("killer task");
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    let kill_count = stats.kills;
    let killing_done = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let not_ready: Vec<String> = list
            .items
            .iter()
            .filter(|d| !ready_for_generation(d))
            .map(|d| {
                format!(
                    "{} {:?}",
                    d.metadata.name.as_deref().unwrap_or("?"),
                    condition(d, "Ready")
                )
            })
            .collect();
        if list.items.len() == N && not_ready.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {N} not Ready, e.g. {:?}; operator log tail:\n{}",
            not_ready.len(),
            &not_ready[..not_ready.len().min(5)],
            tail(&op)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Ground truth.
    let truth = machines_by_id(&sim).await;
    let mut wrong_state = Vec::new();
    let mut wrong_count = Vec::new();
    let (mut created, mut expected) = (0usize, 0usize);
    for (&i, &(isolated, changes)) in &desired {
        let t = sim.ground_truth(&ids[i]).await;
        let actions = t["actions"].as_array().cloned().unwrap_or_default();
        created += actions.len();
        expected += changes;
        if truth[&ids[i]]["isolated"] != json!(isolated) {
            wrong_state.push(format!("d{i:03}: {}", truth[&ids[i]]));
        }
        let succeeded = actions.iter().all(|a| a["status"] == "Succeeded");
        if actions.len() != changes || !succeeded {
            let summary: Vec<String> = actions
                .iter()
                .map(|a| {
                    format!(
                        "{} {} {}",
                        a["type"].as_str().unwrap_or("?"),
                        a["status"].as_str().unwrap_or("?"),
                        a["requestorComment"].as_str().unwrap_or("")
                    )
                })
                .collect();
            wrong_count.push(format!("d{i:03} expected {changes}: {summary:?}"));
        }
    }

    // Evidence that kills hit the interesting windows: recoveries and adoptions after restarts,
    // and what the POSTs met at the simulator.
    let events = event_reasons(&client, &ns).await;
    let calls = sim.admin_calls().await;
    let post_status = |code: u64| {
        calls
            .iter()
            .filter(|c| c["api"] == "isolate" || c["api"] == "unisolate")
            .filter(|c| c["status"] == code)
            .count()
    };
    let panicked = op
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .output()
        .contains("panicked");
    eprintln!(
        "crash safety: {kill_count} SIGKILLs in {killing_done:?} (seed {KILL_SEED:#x}), \
         catching {} POSTs applied but not yet recorded and {} intents not yet applied; \
         {created} actions created, {expected} expected ({N} resources, {} flipped); \
         POSTs answered 201: {}, 400: {}; events {events:?}; total run time {:?}",
        stats.applied_unrecorded,
        stats.intent_only,
        flips.len(),
        post_status(201),
        post_status(400),
        started.elapsed()
    );
    assert!(kill_count >= MIN_KILLS, "only {kill_count} kills");
    assert!(
        wrong_state.is_empty(),
        "devices not in their desired state: {wrong_state:#?}"
    );
    assert!(
        wrong_count.is_empty(),
        "machines without exactly one action per desired-state change: {wrong_count:#?}"
    );
    assert_eq!(created, expected);
    assert!(!panicked, "operator panicked: {}", tail(&op));
}

/// Ready=True for the resource's current generation.
fn ready_for_generation(d: &DeviceIsolation) -> bool {
    condition(d, "Ready").is_some_and(|c| c.0 == "True")
        && d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
}

/// The simulator's ground truth of every machine, by id.
async fn machines_by_id(sim: &Sim) -> HashMap<String, Value> {
    sim.admin_get("machines").await["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or_default().to_string(), m.clone()))
        .collect()
}

/// How many events of each reason the namespace holds.
async fn event_reasons(client: &kube::Client, ns: &str) -> BTreeMap<String, usize> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let mut out = BTreeMap::new();
    for e in api
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let reason = e.reason.unwrap_or_default();
        let n = e.series.map_or(1, |s| s.count.max(1)) as usize;
        let note = e.note.unwrap_or_default();
        *out.entry(reason.clone()).or_default() += n;
        if note.contains("recovered") {
            *out.entry(format!("{reason}(recovered by marker)"))
                .or_default() += n;
        }
    }
    out
}
