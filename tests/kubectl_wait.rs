//! The `kubectl wait` recipes of docs/gitops.md, run with the real kubectl against the real
//! kube-apiserver, the operator binary and `mde-sim`.
//!
//! The situation they are for: a DeviceIsolation is Ready at generation 1, someone commits a spec
//! change (generation 2), and a pipeline waits for the change to be done. Until the operator
//! observes generation 2, the object still carries the Ready=True of generation 1. The test stops
//! the operator to hold that window open, and shows which waits return on the stale Ready and
//! which do not; then starts the operator and shows the recipe completing once generation 2 is
//! Ready.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, apply, condition, device_isolation, machine_id,
    seed_file, wait_ready,
};
use common::sim::Sim;
use kube::api::Api;
use mde_isolation_operator::crd::DeviceIsolation;

/// The trap: a jsonpath on the Ready condition's status ignores generations.
const STALE_JSONPATH: &str = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}=True"#;
/// Step 1 of the recipe (with the generation substituted): the operator observed the edit.
const OBSERVED_JSONPATH: &str = "jsonpath={.status.observedGeneration}=";
/// Step 2 of the recipe: Ready, which kubectl checks against the condition's observedGeneration.
const READY_CONDITION: &str = "condition=Ready";

/// Runs `kubectl wait` on `target` in `ns` with `--for=<for_>` and `--timeout=<timeout>`.
fn kubectl_wait(ns: &str, target: &str, for_: &str, timeout: &str) -> (Output, Duration) {
    let start = Instant::now();
    let out = cluster()
        .kubectl()
        .args(["wait", "-n", ns, target])
        .arg(format!("--for={for_}"))
        .arg(format!("--timeout={timeout}"))
        .output()
        .expect("run kubectl wait");
    (out, start.elapsed())
}

/// Runs kubectl with `args` and returns its stdout, failing on a non-zero exit.
fn kubectl(args: &[&str]) -> String {
    let out = cluster()
        .kubectl()
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(out: &Output, took: Duration) -> String {
    format!(
        "exit {} after {took:?}; stdout {:?}; stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn timed_out(out: &Output) -> bool {
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_waits_for_the_new_generation_and_a_status_jsonpath_does_not() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("kubectl-wait").await;
    let client = c.client().await;
    let m = machine_id(0x6001);
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = seed_file(
        dir.path(),
        &[SeedMachine {
            id: &m,
            name: "laptop-042.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
    );
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let mut op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));

    // Generation 1: released and Ready.
    let name = "laptop-042";
    let target = format!("deviceisolation/{name}");
    let di = device_isolation(name, &m, false, Some("Released after re-image (INC-4711)"));
    apply(&client, &ns, &di).await;
    let ready = wait_ready(&client, &ns, name, &op).await;
    assert_eq!(ready.metadata.generation, Some(1));

    // The operator stops; someone commits `isolated: true`: generation 2, status still for 1.
    op.kill();
    kubectl(&[
        "patch",
        "-n",
        &ns,
        &target,
        "--type=merge",
        "-p",
        r#"{"spec":{"isolated":true}}"#,
    ]);
    let generation = kubectl(&[
        "get",
        "-n",
        &ns,
        &target,
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert_eq!(generation, "2");
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let stale = api.get(name).await.expect("get");
    assert_eq!(
        stale.status.as_ref().and_then(|s| s.observed_generation),
        Some(1)
    );
    assert_eq!(
        condition(&stale, "Ready").map(|c| c.0).as_deref(),
        Some("True")
    );

    // The trap: a jsonpath on the Ready status returns at once on generation 1's Ready.
    let (out, took) = kubectl_wait(&ns, &target, STALE_JSONPATH, "60s");
    assert!(
        out.status.success() && took < Duration::from_secs(30),
        "the status jsonpath should return on the stale Ready at once: {}",
        describe(&out, took)
    );

    // `--for=condition=Ready` does not: kubectl compares the condition's observedGeneration (1)
    // with metadata.generation (2), and the operator writes observedGeneration on every condition.
    let (out, took) = kubectl_wait(&ns, &target, READY_CONDITION, "3s");
    assert!(
        timed_out(&out),
        "condition=Ready must not accept generation 1's Ready: {}",
        describe(&out, took)
    );

    // The recipe: wait for the operator to observe the generation, then for Ready.
    let observed = format!("{OBSERVED_JSONPATH}{generation}");
    let (out, took) = kubectl_wait(&ns, &target, &observed, "3s");
    assert!(
        timed_out(&out),
        "step 1 of the recipe must wait while the operator is stopped: {}",
        describe(&out, took)
    );

    // The operator comes back, isolates the device, and the recipe completes.
    op.restart();
    let (out, took) = kubectl_wait(&ns, &target, &observed, "90s");
    assert!(
        out.status.success(),
        "step 1: {}\noperator log tail:\n{}",
        describe(&out, took),
        op.tail()
    );
    let (out, took) = kubectl_wait(&ns, &target, READY_CONDITION, "90s");
    assert!(
        out.status.success(),
        "step 2: {}\noperator log tail:\n{}",
        describe(&out, took),
        op.tail()
    );

    let done = api.get(name).await.expect("get");
    let status = done.status.clone().expect("status");
    assert_eq!(status.observed_generation, Some(2));
    let (ready, reason, _) = condition(&done, "Ready").expect("Ready");
    assert_eq!((ready.as_str(), reason.as_str()), ("True", "Isolated"));
    let truth = sim.ground_truth(&m).await;
    assert_eq!(
        truth["isolated"], true,
        "the device is isolated when the recipe returns: {truth}"
    );
}

#[test]
fn docs_show_the_recipe_and_the_trap() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/gitops.md"))
        .expect("docs/gitops.md");
    for needle in [
        "--for=jsonpath='{.status.observedGeneration}'=",
        "--for=condition=Ready",
        r#"--for=jsonpath='{.status.conditions[?(@.type=="Ready")].status}'=True"#,
    ] {
        assert!(
            docs.contains(needle),
            "docs/gitops.md should show `{needle}` (tested here)"
        );
    }
}
