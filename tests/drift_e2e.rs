//! Drift (design.md §2 rule 7), time-scaled against the real kube-apiserver and `mde-sim`: a
//! person isolates a device the operator released. With `driftPolicy: Report` the operator reports
//! it within one drift interval, from one batched read, and leaves the device alone; only
//! `driftPolicy: Correct` releases it again.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, apply, condition, device_isolation, machine_id,
    seed_file, wait_for, wait_ready,
};
use common::sim::Sim;
use k8s_openapi::api::events::v1::Event;
use kube::api::Api;
use mde_isolation_operator::crd::{DeviceIsolation, DriftPolicy};
use serde_json::{Value, json};

/// Simulated seconds between drift reads (the operator's `--drift-interval-seconds`).
const DRIFT_INTERVAL: f64 = 360.0;

fn sim_time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

async fn released_device(
    policy: DriftPolicy,
    prefix: &str,
    n: u32,
) -> (
    Sim,
    Operator,
    kube::Client,
    String,
    String,
    tempfile::TempDir,
) {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace(prefix).await;
    let client = c.client().await;
    let m = machine_id(n);
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_file(
        dir.path(),
        &[SeedMachine {
            id: &m,
            name: "drift.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
    );
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.extra = vec![
        "--drift-interval-seconds".into(),
        DRIFT_INTERVAL.to_string(),
    ];
    let op = Operator::start(&sim, cfg);
    let mut di = device_isolation("drifting", &m, false, Some("Released after INC-4711"));
    di.spec.drift_policy = policy;
    apply(&client, &ns, &di).await;
    wait_ready(&client, &ns, "drifting", &op).await;
    (sim, op, client, ns, m, dir)
}

/// A person isolates the device in the portal; the action succeeds at once.
async fn isolate_in_portal(sim: &Sim, machine: &str) -> (String, DateTime<Utc>) {
    let a = sim
        .admin_post(
            &format!("machines/{machine}/isolate-external"),
            json!({"requestor": "analyst@contoso.com", "immediate": true}),
        )
        .await;
    (
        a["id"].as_str().expect("action id").to_string(),
        sim_time(&a["creationDateTimeUtc"]),
    )
}

async fn list_reads_since(sim: &Sim, since: DateTime<Utc>) -> Vec<Value> {
    sim.admin_calls()
        .await
        .into_iter()
        .filter(|c| c["api"] == "machineactions-list" && sim_time(&c["simTime"]) >= since)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_reported_within_one_interval_from_one_read_and_not_undone() {
    let (sim, op, client, ns, m, _dir) =
        released_device(DriftPolicy::Report, "drift-report", 0x6001).await;
    // Let the poller go idle (no open action), so the next read is a drift read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (foreign, at) = isolate_in_portal(&sim, &m).await;

    let di = wait_for(
        &client,
        &ns,
        "drifting",
        Duration::from_secs(30),
        &op,
        "Drifted",
        |di| condition(di, "Stalled").is_some_and(|c| c.1 == "Drifted"),
    )
    .await;
    let reads = list_reads_since(&sim, at).await;
    assert_eq!(
        reads.len(),
        1,
        "drift detected by one batched read: {reads:#?}"
    );
    let detected = sim_time(&reads[0]["simTime"]);
    let delay = (detected - at).num_milliseconds() as f64 / 1000.0;
    assert!(
        delay <= DRIFT_INTERVAL + 5.0,
        "detected {delay} simulated seconds after the foreign isolate"
    );

    let status = di.status.clone().unwrap();
    assert_eq!(status.isolated, Some(true), "status reports the real state");
    let (_, _, message) = condition(&di, "Stalled").unwrap();
    assert!(
        message.contains(&foreign) && message.contains("analyst@contoso.com"),
        "{message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let drifted: Vec<Event> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Drifted"))
        .collect();
    assert_eq!(drifted.len(), 1, "one Warning event: {drifted:#?}");
    assert_eq!(drifted[0].type_.as_deref(), Some("Warning"));

    // Two more drift intervals: the person's decision stands.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let truth = sim.ground_truth(&m).await;
    assert_eq!(truth["isolated"], true, "{truth}");
    let unisolates = sim
        .admin_calls()
        .await
        .into_iter()
        .filter(|c| c["api"] == "unisolate")
        .count();
    assert_eq!(unisolates, 1, "only the original release");
    let api: Api<DeviceIsolation> = Api::namespaced(client, &ns);
    let later = api.get("drifting").await.unwrap();
    assert_eq!(
        later.metadata.resource_version, di.metadata.resource_version,
        "no status churn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_policy_correct_releases_the_device_again() {
    let (sim, op, client, ns, m, _dir) =
        released_device(DriftPolicy::Correct, "drift-correct", 0x6002).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (foreign, _) = isolate_in_portal(&sim, &m).await;
    assert_eq!(sim.ground_truth(&m).await["isolated"], true);

    let di = wait_for(
        &client,
        &ns,
        "drifting",
        Duration::from_secs(60),
        &op,
        "re-released",
        |di| {
            condition(di, "Ready").is_some_and(|c| c.0 == "True")
                && di
                    .status
                    .as_ref()
                    .and_then(|s| s.action.as_ref())
                    .is_some_and(|a| a.id != foreign && a.status == "Succeeded")
                && di.status.as_ref().map(|s| s.requests) == Some(2)
        },
    )
    .await;
    let truth = sim.ground_truth(&m).await;
    assert_eq!(truth["isolated"], false, "{truth}");
    let unisolates: Vec<&Value> = truth["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"] == "Unisolate")
        .collect();
    assert_eq!(
        unisolates.len(),
        2,
        "the release and the correction: {truth}"
    );
    assert_eq!(di.status.unwrap().isolated, Some(false));
}
