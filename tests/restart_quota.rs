//! The quota survives the process (issue 12): the operator is SIGKILLed and restarted every 20
//! simulated seconds while it releases devices at the limit MDE enforces. Each new process must
//! start where the previous one stopped: it rebuilds the gate's ledger from MDE's record of the
//! app's actions before its first POST, and goes at an even pace for the reads MDE keeps no
//! record of. Measured against the simulator's own quota (10 calls a minute per API, the
//! operator's budget set to the same), with `--duplicate-mode allow` so that a blind re-POST
//! would show as a second action.
//!
//! Without the restart memory every new process started with a full budget in a window its
//! predecessor had spent: 55 × 429 on unisolate over 10 restarts in the measurement.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, create, device_isolation, machine_id, seed_file,
};
use common::sim::Sim;
use serde_json::Value;

/// Resources (and machines), all isolated at start and released.
const N: usize = 40;
/// Calls per minute and per hour per API, in the simulator and (as a budget) in the operator.
const PER_MINUTE: &str = "10";
const PER_HOUR: &str = "150";
/// Simulated seconds per real one.
const SCALE: f64 = 20.0;
/// Real time between kills: 20 simulated seconds.
const KILL_EVERY: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_every_20_simulated_seconds_never_meet_a_429_on_posts() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("restart-quota").await;
    let client = c.client().await;
    let ids: Vec<String> = (0..N).map(|i| machine_id(0x9a00 + i as u32)).collect();
    let names: Vec<String> = (0..N).map(|i| format!("rq-{i:02}.contoso.local")).collect();
    let seed: Vec<SeedMachine<'_>> = (0..N)
        .map(|i| SeedMachine {
            id: &ids[i],
            name: &names[i],
            behaviour: "online",
            isolated: true,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_file(dir.path(), &seed);
    let sim = Sim::start(&[
        "--seed",
        seed.to_str().unwrap(),
        "--time-scale",
        &SCALE.to_string(),
        "--quota-per-minute",
        PER_MINUTE,
        "--quota-per-hour",
        PER_HOUR,
        "--duplicate-mode",
        "allow",
    ]);
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.time_scale = SCALE;
    cfg.extra = vec!["--quota-budget".into(), "0.1".into()];
    let mut op = Operator::start(&sim, cfg);
    for (i, id) in ids.iter().enumerate() {
        create(
            &client,
            &ns,
            &device_isolation(&format!("rq-{i:02}"), id, false, Some("restart test")),
        )
        .await;
    }

    // T(40) at 10 a minute is 180 simulated seconds (9 s real): kill until every device is
    // released, and at least until the third window.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut kills = 0;
    let mut kills_with_posts_on_both_sides = 0;
    let mut posts_before = 0;
    loop {
        tokio::time::sleep(KILL_EVERY).await;
        let released = released(&sim, &ids).await;
        if released == N && kills >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{released} of {N} released after {kills} kills; operator log tail:\n{}",
            op.tail()
        );
        let posts = posts(&sim.admin_calls().await);
        if posts > posts_before && posts_before > 0 && released < N {
            kills_with_posts_on_both_sides += 1;
        }
        posts_before = posts;
        op.restart();
        kills += 1;
    }

    let calls = sim.admin_calls().await;
    let throttled = |api: &str| {
        calls
            .iter()
            .filter(|c| c["api"] == api && c["status"] == 429)
            .count()
    };
    let read_429s: usize = ["machineactions-list", "machineactions-get", "machines-get"]
        .iter()
        .map(|a| throttled(a))
        .sum();
    let actions = sim.admin_get("actions").await;
    let mut per_machine: HashMap<&str, usize> = ids.iter().map(|id| (id.as_str(), 0)).collect();
    for a in actions["value"].as_array().into_iter().flatten() {
        if a["type"] == "Unisolate"
            && let Some(n) = a["machineId"].as_str().and_then(|m| per_machine.get_mut(m))
        {
            *n += 1;
        }
    }
    let not_once: Vec<_> = per_machine.iter().filter(|(_, n)| **n != 1).collect();
    eprintln!(
        "[restart-quota] {kills} kills ({kills_with_posts_on_both_sides} mid-burst), {} unisolate POSTs, \
         429s: unisolate {}, reads {read_429s}; {:?} real",
        posts(&calls),
        throttled("unisolate"),
        started.elapsed()
    );
    assert!(
        kills_with_posts_on_both_sides >= 2,
        "the kills did not land mid-burst ({kills_with_posts_on_both_sides}); nothing was tested"
    );
    assert!(
        not_once.is_empty(),
        "machines without exactly one unisolate: {not_once:?}"
    );
    assert_eq!(
        throttled("unisolate"),
        0,
        "a new process sent into a window its predecessor had spent; log tail:\n{}",
        op.tail()
    );
    assert!(
        read_429s <= kills,
        "{read_429s} read 429s over {kills} restarts (at most one per restart)"
    );
}

async fn released(sim: &Sim, ids: &[String]) -> usize {
    let machines = sim.admin_get("machines").await;
    let isolated: HashMap<&str, bool> = machines["machines"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| Some((m["id"].as_str()?, m["isolated"].as_bool()?)))
                .collect()
        })
        .unwrap_or_default();
    ids.iter()
        .filter(|id| isolated.get(id.as_str()) == Some(&false))
        .count()
}

fn posts(calls: &[Value]) -> usize {
    calls
        .iter()
        .filter(|c| c["api"] == "unisolate" && c["status"].as_u64().is_some_and(|s| s < 300))
        .count()
}
