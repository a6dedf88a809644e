//! `spec.releaseAt` end to end: two replicas with leader election against the real kube-apiserver
//! and `mde-sim` at time scale 240 (two simulated hours are 30 real seconds). An isolation ends at
//! its instant with one Unisolate although the leader that isolated the device was killed in
//! between; an instant moved later before it passes postpones the release.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, condition, create, device_isolation, machine_id,
    seed_file, the_leader, wait_for, wait_leading,
};
use common::sim::{Sim, real_time};
use kube::api::{Api, Patch, PatchParams};
use mde_isolation_operator::crd::DeviceIsolation;
use serde_json::{Value, json};

const SCALE: f64 = 240.0;
const LEASE_SECONDS: u64 = 6;
/// The drift interval (the longest poll interval, 360 simulated seconds) in real time: the
/// tolerance of "at the instant".
const ONE_POLL_INTERVAL: Duration = Duration::from_millis(1500);

fn replica(sim: &Sim, kubeconfig: &std::path::Path, ns: &str) -> Operator {
    let mut cfg = OperatorConfig::new(kubeconfig, ns);
    cfg.time_scale = SCALE;
    cfg.extra = vec![
        "--leader-election".into(),
        "--lease-duration-seconds".into(),
        LEASE_SECONDS.to_string(),
    ];
    Operator::start(sim, cfg)
}

fn has_ready_reason(reason: &'static str) -> impl Fn(&DeviceIsolation) -> bool {
    move |di| condition(di, "Ready").is_some_and(|c| c.0 == "True" && c.1 == reason)
}

/// The MDE calls on `machine` of kind `api` (isolate, unisolate).
fn calls_on<'a>(calls: &'a [Value], machine: &str, api: &str) -> Vec<&'a Value> {
    calls
        .iter()
        .filter(|c| c["api"] == api && c["path"].as_str().is_some_and(|p| p.contains(machine)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolation_ends_on_time_across_a_failover_and_an_edit_postpones_it() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("release-at").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (timed, moved) = (machine_id(0x7b0), machine_id(0x7b1));
    let machine = |id: &str, name: &'static str| (id.to_string(), name);
    let machines = [machine(&timed, "timed"), machine(&moved, "moved")];
    let seeds: Vec<SeedMachine> = machines
        .iter()
        .map(|(id, name)| SeedMachine {
            id,
            name,
            behaviour: "online",
            isolated: false,
        })
        .collect();
    let seed = seed_file(dir.path(), &seeds);
    let sim = Sim::start(&[
        "--seed",
        seed.to_str().unwrap(),
        "--time-scale",
        &SCALE.to_string(),
    ]);
    let mut ops = [
        replica(&sim, &c.kubeconfig, &ns),
        replica(&sim, &c.kubeconfig, &ns),
    ];
    let http = reqwest::Client::new();
    let addrs = ops
        .each_ref()
        .map(|op| op.http_addr(Duration::from_secs(60)));
    let leader = the_leader(&http, &[&ops[0], &ops[1]], &addrs).await;

    // Two simulated hours ahead, and one and a half for the one that will be moved.
    let start = Utc::now();
    let release_at = start + chrono::Duration::seconds(30);
    let first_instant = start + chrono::Duration::milliseconds(22_500);
    for (name, id, at) in [
        ("timed", &timed, release_at),
        ("moved", &moved, first_instant),
    ] {
        let mut di = device_isolation(name, id, true, Some("isolated until the fix (INC-4711)"));
        di.spec.release_at = Some(at);
        create(&client, &ns, &di).await;
    }
    for name in ["timed", "moved"] {
        wait_for(
            &client,
            &ns,
            name,
            Duration::from_secs(20),
            &ops[leader],
            "Isolated",
            has_ready_reason("Isolated"),
        )
        .await;
    }

    // Moved 22.5 s later, well before its first instant.
    let later = first_instant + chrono::Duration::milliseconds(22_500);
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "moved",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"releaseAt": later.to_rfc3339()}})),
    )
    .await
    .unwrap();

    // The leader that isolated the devices dies; the standby takes over and comes back as one.
    ops[leader].kill();
    let standby = 1 - leader;
    wait_leading(
        &http,
        &addrs[standby],
        Duration::from_secs(LEASE_SECONDS * 3),
        &ops[standby],
    )
    .await;
    ops[leader].restart();
    assert!(Utc::now() < first_instant, "the failover took too long");

    let released = wait_for(
        &client,
        &ns,
        "timed",
        Duration::from_secs(60),
        &ops[standby],
        "ReleasedOnSchedule",
        has_ready_reason("ReleasedOnSchedule"),
    )
    .await;
    assert_eq!(released.status.unwrap().isolated, Some(false));
    let calls = sim.admin_calls().await;
    let releases = calls_on(&calls, &timed, "unisolate");
    assert_eq!(releases.len(), 1, "{releases:#?}");
    assert_eq!(calls_on(&calls, &timed, "isolate").len(), 1);
    let sent = real_time(releases[0]);
    let late = (sent - release_at).to_std();
    assert!(
        sent >= release_at && late.is_ok_and(|l| l <= ONE_POLL_INTERVAL),
        "released at {sent}, releaseAt {release_at}"
    );
    eprintln!("release_at: the Unisolate left {late:?} after releaseAt");
    let truth = sim.ground_truth(&timed).await;
    assert_eq!(truth["isolated"], false, "{truth}");
    let comment = truth["actions"][1]["requestorComment"].as_str().unwrap();
    assert!(
        comment.contains("(released on schedule: releaseAt "),
        "{comment}"
    );

    // Past its first instant (by 7.5 s), the moved one is still isolated; it goes at the new one.
    assert!(calls_on(&calls, &moved, "unisolate").is_empty());
    assert_eq!(sim.ground_truth(&moved).await["isolated"], true);
    wait_for(
        &client,
        &ns,
        "moved",
        Duration::from_secs(60),
        &ops[standby],
        "ReleasedOnSchedule",
        has_ready_reason("ReleasedOnSchedule"),
    )
    .await;
    let calls = sim.admin_calls().await;
    let releases = calls_on(&calls, &moved, "unisolate");
    assert_eq!(releases.len(), 1, "{releases:#?}");
    assert!(real_time(releases[0]) >= later, "{:#?}", releases[0]);
}
