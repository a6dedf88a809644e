//! Resource hygiene (issue 5): a soak over ten simulated hours with thousands of reconciles. The
//! desired state of half the resources flips again and again, so actions, status writes, events,
//! polls and quota reservations keep coming; the operator's memory, open files and threads must
//! level off instead of growing with the work done.

mod common;

use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::operator::{Operator, OperatorConfig, condition, create};
use common::sim::Sim;
use kube::api::{Api, Patch, PatchParams};
use mde_isolation_operator::crd::DeviceIsolation;
use serde_json::json;

const N: usize = 100;
/// 600 simulated seconds per real second: a minute of real time is ten simulated hours.
const SCALE: &str = "600";

/// (resident KiB, open files, threads) of a process.
fn usage(pid: u32) -> (u64, usize, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (field("VmRSS:"), fds, field("Threads:"))
}

async fn reconciles(http: &reqwest::Client, addr: &str) -> u64 {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("mde_isolation_reconciles_total{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_files_and_threads_stay_bounded_over_simulated_hours() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("soak").await;
    let client = c.client().await;
    let sim = Sim::start(&["--machines", &N.to_string(), "--time-scale", SCALE]);
    let ids = sim.machine_ids().await;
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.time_scale = 600.0;
    let op = Operator::start(&sim, cfg);
    let addr = op.http_addr(Duration::from_secs(60));
    let http = reqwest::Client::new();
    let pid = op.pid().expect("running");

    for (i, id) in ids.iter().enumerate() {
        create(
            &client,
            &ns,
            &common::operator::device_isolation(&format!("s{i:03}"), id, i % 2 == 0, Some("soak")),
        )
        .await;
    }
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams::default();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(60) {
        // Flip the desired state of every other resource: new actions, status and events.
        round += 1;
        for i in (0..N).step_by(2) {
            let patch = json!({"spec": {"isolated": (i / 2 + round as usize).is_multiple_of(2)}});
            api.patch(&format!("s{i:03}"), &pp, &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        samples.push((started.elapsed(), usage(pid)));
        assert!(op.pid().is_some(), "operator died: {}", op.tail());
    }
    // Let the last flips settle, then check the operator kept up (the soak did real work).
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let list = api.list(&Default::default()).await.unwrap();
        let ready = list
            .items
            .iter()
            .filter(|d| {
                condition(d, "Ready").is_some_and(|c| c.0 == "True")
                    && d.status.as_ref().and_then(|s| s.observed_generation)
                        == d.metadata.generation
            })
            .count();
        if ready == N {
            break;
        }
        assert!(
            Instant::now() < end,
            "{ready}/{N} ready after the soak: {}",
            op.tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    samples.push((started.elapsed(), usage(pid)));
    let total_reconciles = reconciles(&http, &addr).await;
    let sim_now = sim.now().await;

    // Warm-up: the first third. After it, growth must stay small whatever the work done.
    let warm = samples[samples.len() / 3].1;
    let last = samples.last().unwrap().1;
    let max_rss = samples[samples.len() / 3..]
        .iter()
        .map(|(_, u)| u.0)
        .max()
        .unwrap();
    eprintln!(
        "[soak] {round} flip rounds, {total_reconciles} reconciles, simulated clock now {sim_now}; \
         RSS KiB warm {} max {} last {}; fds warm {} last {}; threads warm {} last {}",
        warm.0, max_rss, last.0, warm.1, last.1, warm.2, last.2
    );
    assert!(
        total_reconciles >= 1000,
        "only {total_reconciles} reconciles"
    );
    assert!(
        max_rss <= warm.0 * 3 / 2 + 16 * 1024,
        "memory kept growing: warm {} KiB, max {max_rss} KiB: {samples:?}",
        warm.0
    );
    // Up to --concurrency (32) pooled connections may open as load shifts; a leak grows past it.
    assert!(
        last.1 <= warm.1 + 32,
        "open files grew: {} -> {}: {samples:?}",
        warm.1,
        last.1
    );
    assert!(
        last.2 <= warm.2 + 4,
        "threads grew: {} -> {}: {samples:?}",
        warm.2,
        last.2
    );
    // Ground truth agrees with the last desired states: the churn lost nothing.
    for (i, id) in ids.iter().enumerate() {
        let di = api.get(&format!("s{i:03}")).await.unwrap();
        let truth = sim.ground_truth(id).await;
        assert_eq!(
            truth["isolated"].as_bool(),
            Some(di.spec.isolated),
            "{id}: {truth}"
        );
    }
}
