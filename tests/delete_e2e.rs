//! Deletions reach the operator (issue 11), and so does a change to a machine's other resources
//! (rule 6): against a real kube-apiserver and `mde-sim`, with real kubectl, and no operator
//! restart.

mod common;

use std::time::Duration;

use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, apply, condition, device_isolation, machine_id,
    seed_file, wait_ready, wait_stalled,
};
use common::poll::poll;
use common::sim::Sim;
use kube::api::{Api, ListParams};
use mde_isolation_operator::crd::DeviceIsolation;

/// `mde_isolation_tracked_resources` per owner, from the operator's metrics.
async fn tracked(addr: &str) -> Vec<(String, i64)> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("mde_isolation_tracked_resources{owner=\""))
        .filter_map(|l| {
            let (owner, value) = l.split_once("\"} ")?;
            Some((owner.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until the memory and the view track `want` resources and the quota gate and the
/// requeues none (the resources are settled or gone, so none waits for a slot or a time).
async fn wait_tracked(addr: &str, op: &Operator, want: i64) {
    let expected = [
        ("memory", want),
        ("quota", 0),
        ("requeue", 0),
        ("view", want),
    ]
    .map(|(o, n)| (o.to_string(), n));
    let waited = poll(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let mut now = tracked(addr).await;
            now.sort();
            if now == expected {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;
    if let Err(last) = waited {
        panic!(
            "tracked resources stay at {last}, want {expected:?}\n{}",
            op.tail()
        );
    }
}

fn unisolates(calls: &[serde_json::Value], machine: &str) -> usize {
    calls
        .iter()
        .filter(|c| c["api"] == "unisolate" && c["path"].as_str().unwrap_or("").contains(machine))
        .count()
}

/// A machine, isolated, managed by two resources in a new namespace: `isolate` (Ready) and then
/// `release`, which meets the conflict; both are Stalled in `Conflict` and nothing was called.
struct Conflicted {
    ns: String,
    client: kube::Client,
    machine: String,
    sim: Sim,
    op: Operator,
    _seed: tempfile::TempDir,
}

async fn conflicted(prefix: &str, machine: u32) -> Conflicted {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace(prefix).await;
    let client = c.client().await;
    let m = machine_id(machine);
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_file(
        dir.path(),
        &[SeedMachine {
            id: &m,
            name: "shared.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
    );
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));

    // The operator has seen `isolate` (it is Ready: the machine is isolated) before `release`
    // arrives, so `release` meets the conflict on its first reconcile. Applied one right after the
    // other, `release` could be acted on before `isolate` arrived (correct: nothing conflicted
    // yet), and CI saw that once. `isolate`, already Ready, is told by the watch.
    apply(
        &client,
        &ns,
        &device_isolation("isolate", &m, true, Some("INC-2")),
    )
    .await;
    wait_ready(&client, &ns, "isolate", &op).await;
    apply(
        &client,
        &ns,
        &device_isolation("release", &m, false, Some("INC-1")),
    )
    .await;
    let (reason, message) = wait_stalled(&client, &ns, "release", &op).await;
    assert_eq!(reason, "Conflict", "{message}");
    assert_eq!(
        wait_stalled(&client, &ns, "isolate", &op).await.0,
        "Conflict"
    );
    assert_eq!(unisolates(&sim.admin_calls().await, &m), 0);
    Conflicted {
        ns,
        client,
        machine: m,
        sim,
        op,
        _seed: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_conflicting_partner_lets_the_other_proceed_without_a_restart() {
    let Conflicted {
        ns,
        client,
        machine: m,
        sim,
        op,
        _seed,
    } = conflicted("delete", 0xde1).await;
    let c = cluster();
    let addr = op.http_addr(Duration::from_secs(60));

    let out = c
        .kubectl()
        .args(["delete", "deviceisolation", "isolate", "-n", &ns])
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let di = wait_ready(&client, &ns, "release", &op).await;
    let (_, reason, _) = condition(&di, "Ready").unwrap();
    assert_eq!(reason, "Released");
    assert_eq!(unisolates(&sim.admin_calls().await, &m), 1);
    assert_eq!(sim.ground_truth(&m).await["isolated"], false);
    // Only the remaining resource is remembered.
    wait_tracked(&addr, &op, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_created_and_deleted_three_times_leave_nothing_tracked() {
    const N: u32 = 40;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("churn").await;
    let client = c.client().await;
    let ids: Vec<String> = (0..N).map(|i| machine_id(0xc000 + i)).collect();
    let names: Vec<String> = (0..N).map(|i| format!("churn-{i}.contoso.local")).collect();
    let machines: Vec<SeedMachine<'_>> = ids
        .iter()
        .zip(&names)
        .map(|(id, name)| SeedMachine {
            id,
            name,
            behaviour: "online",
            isolated: true,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_file(dir.path(), &machines);
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));
    let addr = op.http_addr(Duration::from_secs(60));
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);

    for round in 0..3 {
        // Alternate the desired state so that every round requests an action per device.
        let isolated = round % 2 == 1;
        for (i, id) in ids.iter().enumerate() {
            let di = device_isolation(&format!("d{i}"), id, isolated, Some("churn"));
            apply(&client, &ns, &di).await;
        }
        for i in 0..N {
            wait_ready(&client, &ns, &format!("d{i}"), &op).await;
        }
        wait_tracked(&addr, &op, i64::from(N)).await;
        api.delete_collection(&Default::default(), &ListParams::default())
            .await
            .expect("delete all");
        wait_tracked(&addr, &op, 0).await;
    }
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligning_a_conflicting_partner_lets_both_settle_without_a_call() {
    let Conflicted {
        ns,
        client,
        machine: m,
        sim,
        op,
        _seed,
    } = conflicted("align", 0xa11).await;

    // `release` is aligned with `isolate`: the partner learns it from the watch, not a restart.
    apply(
        &client,
        &ns,
        &device_isolation("release", &m, true, Some("INC-1")),
    )
    .await;
    wait_ready(&client, &ns, "release", &op).await;
    let partner = wait_ready(&client, &ns, "isolate", &op).await;
    assert_ne!(
        condition(&partner, "Stalled").map(|c| c.0).as_deref(),
        Some("True")
    );
    let calls = sim.admin_calls().await;
    assert_eq!(unisolates(&calls, &m), 0);
    assert_eq!(sim.ground_truth(&m).await["isolated"], true);
}
