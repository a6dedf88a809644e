//! A cluster whose DeviceIsolationSet CRD is not installed yet: a chart upgrade whose new CRD was
//! not applied (Helm installs CRDs but never upgrades them). Single DeviceIsolations are served,
//! the operator says what is missing, and a set is served as soon as its CRD is applied, without
//! a restart. Its own test binary: the API server is shared within one, and the other binaries
//! install every CRD.

mod common;

use std::time::Duration;

use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, create, device_isolation, machine_id, readyz, seed_file,
    wait_ready,
};
use common::poll::eventually;
use common::sim::Sim;
use kube::api::{Api, Patch, PatchParams};
use mde_isolation_operator::crd::DeviceIsolationSet;
use serde_json::json;

const MISSING: &str = "the DeviceIsolationSet CRD is not installed";
const FOUND: &str = "the DeviceIsolationSet CRD is installed: serving DeviceIsolationSets";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_set_crd_single_resources_work_and_sets_follow_once_it_is_applied() {
    let c = cluster();
    c.install_crd_file("deviceisolations.isolation.mde.dev.yaml")
        .await;
    let ns = c.namespace("no-set-crd").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (single, member) = (machine_id(0x7a0), machine_id(0x7a1));
    let seed = seed_file(
        dir.path(),
        &[
            SeedMachine {
                id: &single,
                name: "single.contoso.local",
                behaviour: "online",
                isolated: true,
            },
            SeedMachine {
                id: &member,
                name: "member.contoso.local",
                behaviour: "online",
                isolated: true,
            },
        ],
    );
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));

    // A single resource converges, the process is ready, and the log names the missing CRD once.
    create(
        &client,
        &ns,
        &device_isolation("single", &single, false, Some("no set CRD")),
    )
    .await;
    wait_ready(&client, &ns, "single", &op).await;
    let addr = op.http_addr(Duration::from_secs(30));
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the operator ready", || {
        let (http, addr) = (&http, &addr);
        async move {
            match readyz(http, addr).await {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            }
        }
    })
    .await;
    assert_eq!(op.output().matches(MISSING).count(), 1, "{}", op.tail());
    assert!(
        op.output()
            .contains("kubectl apply -f crds/deviceisolationsets")
    );

    // The CRD applied (as the chart README says after an upgrade): a set is served.
    c.install_crd_file("deviceisolationsets.isolation.mde.dev.yaml")
        .await;
    let sets: Api<DeviceIsolationSet> = Api::namespaced(client.clone(), &ns);
    let body = json!({
        "apiVersion": "isolation.mde.dev/v1alpha1",
        "kind": "DeviceIsolationSet",
        "metadata": {"name": "after-upgrade",
                     "annotations": {"isolation.mde.dev/comment": "after the CRD upgrade"}},
        "spec": {"isolated": false, "selector": {"machineIds": [member]}},
    });
    sets.patch(
        "after-upgrade",
        &PatchParams::apply("e2e-test"),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
    // The watch retries with kube's backoff (at most 30 s between tries).
    eventually(Duration::from_secs(90), "the set Converged", || {
        let sets = &sets;
        async move {
            let set = sets.get("after-upgrade").await.map_err(|e| e.to_string())?;
            let conditions = set.status.as_ref().map(|s| s.conditions.clone());
            conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True" && c.reason == "Converged")
                .then_some(())
                .ok_or(format!("{conditions:#?}"))
        }
    })
    .await;
    assert!(op.output().contains(FOUND), "{}", op.tail());
    for id in [&single, &member] {
        let truth = sim.ground_truth(id).await;
        assert_eq!(truth["isolated"], false, "{truth}");
        assert_eq!(truth["actions"].as_array().unwrap().len(), 1, "{truth}");
    }
}
