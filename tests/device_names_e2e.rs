//! spec.deviceName against the real kube-apiserver and `mde-sim`: resolved by exact
//! computerDnsName, in batched lookups through the quota gate, recorded in status and reused;
//! several matches or none stall with the reason a person needs.

mod common;

use std::time::Duration;

use common::cluster::cluster;
use common::operator::{Operator, OperatorConfig, apply, condition, device_isolation, wait_ready};
use common::sim::Sim;
use kube::api::{Api, Patch, PatchParams};
use mde_isolation_operator::crd::DeviceIsolation;
use serde_json::json;

fn by_name(name: &str, device: &str) -> DeviceIsolation {
    let mut di = device_isolation(name, &"0".repeat(40), false, Some("release by name"));
    di.spec.machine_id = None;
    di.spec.device_name = Some(device.into());
    di
}

async fn machines_list_calls(sim: &Sim) -> usize {
    sim.admin_calls()
        .await
        .iter()
        .filter(|c| c["api"] == "machines-list")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_names_resolve_exactly_in_batches_and_refuse_ambiguity() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("names").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.yaml");
    let laptop = "1".repeat(40);
    let (dup_a, dup_b) = ("2".repeat(40), "3".repeat(40));
    std::fs::write(
        &seed,
        format!(
            "machines:\n\
             - {{id: '{laptop}', computerDnsName: laptop-042.contoso.local, isolated: true}}\n\
             - {{id: '{}', computerDnsName: laptop-042, isolated: true}}\n\
             - {{id: '{dup_a}', computerDnsName: dup.contoso.local}}\n\
             - {{id: '{dup_b}', computerDnsName: dup.contoso.local, healthStatus: Inactive}}\n",
            "4".repeat(40)
        ),
    )
    .unwrap();
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let mut op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));

    for (name, device) in [
        ("laptop", "laptop-042.contoso.local"),
        ("dup", "dup.contoso.local"),
        ("ghost", "ghost.contoso.local"),
    ] {
        apply(&client, &ns, &by_name(name, device)).await;
    }
    let ready = wait_ready(&client, &ns, "laptop", &op).await;
    let status = ready.status.unwrap();
    assert_eq!(status.machine_id.as_deref(), Some(laptop.as_str()));
    let truth = sim.ground_truth(&laptop).await;
    assert_eq!(truth["isolated"], false, "{truth}");
    assert_eq!(truth["actions"].as_array().unwrap().len(), 1);
    let short = sim.ground_truth(&"4".repeat(40)).await;
    assert_eq!(
        short["isolated"], true,
        "the short-name record is another machine: {short}"
    );

    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let stalled = |name: &'static str| {
        let api = api.clone();
        async move {
            let end = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let di = api.get(name).await.unwrap();
                if let Some(s) = condition(&di, "Stalled") {
                    return (s.1, s.2);
                }
                assert!(std::time::Instant::now() < end, "{name} never stalled");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (reason, message) = stalled("dup").await;
    assert_eq!(reason, "AmbiguousDevice");
    assert!(
        message.contains(&dup_a) && message.contains(&dup_b),
        "{message}"
    );
    let (reason, message) = stalled("ghost").await;
    assert_eq!(reason, "MachineNotFound", "{message}");

    // Three names, resolved together: at most two machine reads (one batch, maybe split by
    // timing), never one per name per pass.
    let lookups = machines_list_calls(&sim).await;
    assert!(
        (1..=2).contains(&lookups),
        "{lookups} machine lookups: {:#?}\noperator log:\n{}",
        sim.admin_calls().await,
        op.output()
    );

    // The resolved id is reused: a restart resolves nothing again.
    op.restart();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(machines_list_calls(&sim).await, lookups);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_machine_id_and_device_name_is_enforced_by_the_api_server() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("names-cel").await;
    let client = c.client().await;
    let api: Api<DeviceIsolation> = Api::namespaced(client, &ns);
    let pp = PatchParams::apply("e2e-test");
    let body = |spec: serde_json::Value| {
        json!({
            "apiVersion": "isolation.mde.dev/v1alpha1",
            "kind": "DeviceIsolation",
            "metadata": {"name": "x"},
            "spec": spec,
        })
    };
    for spec in [
        json!({"isolated": false}),
        json!({"isolated": false, "machineId": "a".repeat(40), "deviceName": "a.contoso.local"}),
    ] {
        let err = api
            .patch("x", &pp, &Patch::Apply(body(spec.clone())))
            .await
            .expect_err("must be rejected");
        assert!(
            err.to_string()
                .contains("exactly one of machineId and deviceName must be set"),
            "{spec}: {err}"
        );
    }
    api.patch(
        "x",
        &pp,
        &Patch::Apply(body(
            json!({"isolated": false, "deviceName": "a.contoso.local"}),
        )),
    )
    .await
    .expect("a device name alone is accepted");
    let err = api
        .patch(
            "x",
            &pp,
            &Patch::Apply(body(
                json!({"isolated": false, "deviceName": "b.contoso.local"}),
            )),
        )
        .await
        .expect_err("deviceName is immutable");
    assert!(err.to_string().contains("deviceName is immutable"), "{err}");
}
