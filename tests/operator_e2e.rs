//! The operator binary against a real kube-apiserver and `mde-sim`: what issue 2 must show.
//! Ground truth (the simulator's machines and call log) is what the assertions read.

mod common;

use std::time::Duration;

use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, apply, condition, create, device_isolation, machine_id,
    seed_file, wait_for, wait_ready, wait_stalled,
};
use common::sim::Sim;
use kube::api::{Api, Patch, PatchParams};
use mde_isolation_operator::crd::DeviceIsolation;
use mde_isolation_operator::mde::model::IsolationType;
use serde_json::{Value, json};

const SCALE: &str = "60";

/// Simulator calls that name `machine` (its POSTs, and lookups filtered on it).
async fn calls_for(sim: &Sim, machine: &str) -> Vec<Value> {
    sim.admin_calls()
        .await
        .into_iter()
        .filter(|c| {
            let path = c["path"].as_str().unwrap_or("");
            let query = c["query"].as_str().unwrap_or("");
            path.contains(machine) || query.contains(machine)
        })
        .collect()
}

/// Every call except token requests.
async fn api_calls(sim: &Sim) -> Vec<Value> {
    sim.admin_calls()
        .await
        .into_iter()
        .filter(|c| c["api"] != "token")
        .collect()
}

fn posts(calls: &[Value], api: &str) -> usize {
    calls.iter().filter(|c| c["api"] == api).count()
}

async fn sim_with(machines: &[SeedMachine<'_>], extra: &[&str]) -> (Sim, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_file(dir.path(), machines);
    let mut args = vec!["--seed", seed.to_str().unwrap(), "--time-scale", SCALE];
    args.extend_from_slice(extra);
    (Sim::start(&args), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_converges_with_one_unisolate_and_restarts_cost_nothing() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("release").await;
    let client = c.client().await;
    let m = machine_id(0x1001);
    let (sim, _dir) = sim_with(
        &[SeedMachine {
            id: &m,
            name: "laptop-042.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
        &[],
    )
    .await;
    let mut op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));

    let mut di = device_isolation(
        "laptop-042",
        &m,
        false,
        Some("Released after clean re-image (INC-4711)"),
    );
    // No accountability policy in this cluster: who asked is passed on, marked unverified.
    di.metadata.annotations.get_or_insert_default().insert(
        "isolation.mde.dev/requested-by".into(),
        "alice@contoso.com".into(),
    );
    apply(&client, &ns, &di).await;
    let ready = wait_ready(&client, &ns, "laptop-042", &op).await;

    let status = ready.status.clone().unwrap();
    let action = status.action.clone().expect("status.action");
    assert_eq!(action.action_type, "Unisolate");
    assert_eq!(action.status, "Succeeded");
    assert_eq!(status.isolated, Some(false));
    assert!(
        status.intent.is_none(),
        "intent cleared once the action is recorded"
    );
    assert_eq!(
        condition(&ready, "Ready").unwrap().1,
        "Released",
        "Ready reason"
    );

    let truth = sim.ground_truth(&m).await;
    assert_eq!(truth["isolated"], false, "device released: {truth}");
    let actions = truth["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "exactly one action: {truth}");
    assert_eq!(actions[0]["id"], action.id.as_str());
    let comment = actions[0]["requestorComment"].as_str().unwrap();
    assert!(
        comment.starts_with("Released after clean re-image (INC-4711)"),
        "{comment}"
    );
    assert!(
        comment.contains(&format!("{ns}/laptop-042")),
        "audit tag: {comment}"
    );
    assert!(
        comment.contains(" requested-by=alice@contoso.com (unverified) [mde-isolation-operator "),
        "{comment}"
    );
    let machine_calls = calls_for(&sim, &m).await;
    assert_eq!(posts(&machine_calls, "unisolate"), 1, "{machine_calls:#?}");

    // Re-apply the same manifest, then restart the operator: no MDE call at all.
    let before = api_calls(&sim).await.len();
    let rv_before = ready.metadata.resource_version.clone();
    apply(&client, &ns, &di).await;
    op.restart();
    // 5 simulated minutes (5 s real at scale 60), shorter than the drift interval.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(op.is_running(), "operator died: {}", op.tail());
    let after = api_calls(&sim).await;
    assert_eq!(
        after.len(),
        before,
        "re-apply and restart added MDE calls: {:#?}",
        &after[before..]
    );
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let again = api.get("laptop-042").await.unwrap();
    assert_eq!(
        again.metadata.resource_version, rv_before,
        "a no-op reconcile must not write status"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selective_isolation_passes_the_type_through() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("isolate").await;
    let client = c.client().await;
    let m = machine_id(0x2001);
    let (sim, _dir) = sim_with(
        &[SeedMachine {
            id: &m,
            name: "srv-7.contoso.local",
            behaviour: "online",
            isolated: false,
        }],
        &[],
    )
    .await;
    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));
    let mut di = device_isolation("srv-7", &m, true, Some("Contain INC-4712"));
    di.spec.isolation_type = IsolationType::Selective;
    apply(&client, &ns, &di).await;
    let ready = wait_ready(&client, &ns, "srv-7", &op).await;
    assert_eq!(condition(&ready, "Ready").unwrap().1, "Isolated");
    let truth = sim.ground_truth(&m).await;
    assert_eq!(truth["isolated"], true, "{truth}");
    let actions = truth["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "{truth}");
    assert_eq!(actions[0]["type"], "Isolate");
    assert_eq!(actions[0]["scope"], "Selective", "{truth}");
}

/// A second resource, and a resource facing someone else's open action, adopt instead of POSTing.
async fn adopts_open_actions(duplicate_mode: &str) {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace(&format!("adopt-{duplicate_mode}")).await;
    let client = c.client().await;
    let offline = machine_id(0x3001);
    let external = machine_id(0x3002);
    let (sim, _dir) = sim_with(
        &[
            SeedMachine {
                id: &offline,
                name: "offline.contoso.local",
                behaviour: "offline",
                isolated: true,
            },
            SeedMachine {
                id: &external,
                name: "external.contoso.local",
                behaviour: "offline",
                isolated: true,
            },
        ],
        &["--duplicate-mode", duplicate_mode],
    )
    .await;
    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));

    // First resource: its unisolate stays Pending (offline device).
    create(
        &client,
        &ns,
        &device_isolation("first", &offline, false, Some("release")),
    )
    .await;
    let pending = |di: &DeviceIsolation| {
        di.status
            .as_ref()
            .and_then(|s| s.action.as_ref())
            .is_some_and(|a| a.status == "Pending")
    };
    let first = wait_for(
        &client,
        &ns,
        "first",
        Duration::from_secs(60),
        &op,
        "pending",
        pending,
    )
    .await;
    let first_action = first.status.unwrap().action.unwrap().id;

    // Second resource for the same machine and state: adopts, no POST.
    create(
        &client,
        &ns,
        &device_isolation("second", &offline, false, Some("release too")),
    )
    .await;
    let second = wait_for(
        &client,
        &ns,
        "second",
        Duration::from_secs(60),
        &op,
        "pending",
        pending,
    )
    .await;
    assert_eq!(second.status.unwrap().action.unwrap().id, first_action);
    assert_eq!(posts(&calls_for(&sim, &offline).await, "unisolate"), 1);

    // Someone else's open unisolate, created after the operator's view was loaded: the operator
    // POSTs, MDE refuses or returns the open one, and the resource adopts it either way.
    let theirs = sim
        .admin_post(
            &format!("machines/{external}/unisolate-external"),
            json!({}),
        )
        .await;
    let theirs_id = theirs["id"]
        .as_str()
        .expect("external action id")
        .to_string();
    create(
        &client,
        &ns,
        &device_isolation("third", &external, false, Some("release")),
    )
    .await;
    let third = wait_for(
        &client,
        &ns,
        "third",
        Duration::from_secs(60),
        &op,
        "pending",
        pending,
    )
    .await;
    assert_eq!(third.status.unwrap().action.unwrap().id, theirs_id);
    let truth = sim.ground_truth(&external).await;
    assert_eq!(
        truth["actions"].as_array().unwrap().len(),
        1,
        "no action was created next to the open one: {truth}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_actions_are_adopted_when_duplicates_are_rejected() {
    adopts_open_actions("reject").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_actions_are_adopted_when_duplicates_return_the_existing_action() {
    adopts_open_actions("return-existing").await;
}

/// Runs five more simulated minutes and checks that no further call names `machine`.
async fn assert_quiet(sim: &Sim, machine: &str, max_calls: usize) {
    let settled = calls_for(sim, machine).await.len();
    assert!(settled <= max_calls, "{settled} calls for {machine}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = calls_for(sim, machine).await;
    assert_eq!(
        later.len(),
        settled,
        "calls after the condition was set: {later:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecoverable_problems_stall_with_their_reason_and_stop_calling() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("stall").await;
    let client = c.client().await;
    let known = machine_id(0x4001);
    let offline = machine_id(0x4002);
    let unknown = machine_id(0x4999);
    let (sim, _dir) = sim_with(
        &[
            SeedMachine {
                id: &known,
                name: "known.contoso.local",
                behaviour: "online",
                isolated: true,
            },
            SeedMachine {
                id: &offline,
                name: "away.contoso.local",
                behaviour: "offline",
                isolated: true,
            },
        ],
        &[],
    )
    .await;
    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));

    create(
        &client,
        &ns,
        &device_isolation("no-comment", &known, false, None),
    )
    .await;
    let (reason, _) = wait_stalled(&client, &ns, "no-comment", &op).await;
    assert_eq!(reason, "CommentMissing");

    create(
        &client,
        &ns,
        &device_isolation("unknown", &unknown, false, Some("release")),
    )
    .await;
    let (reason, message) = wait_stalled(&client, &ns, "unknown", &op).await;
    assert_eq!(reason, "MachineNotFound", "{message}");

    create(
        &client,
        &ns,
        &device_isolation("cancelled", &offline, false, Some("release")),
    )
    .await;
    let di = wait_for(
        &client,
        &ns,
        "cancelled",
        Duration::from_secs(60),
        &op,
        "pending",
        |di| di.status.as_ref().and_then(|s| s.action.as_ref()).is_some(),
    )
    .await;
    let action = di.status.unwrap().action.unwrap().id;
    sim.admin_post(&format!("actions/{action}/cancel"), json!({}))
        .await;
    let (reason, message) = wait_stalled(&client, &ns, "cancelled", &op).await;
    assert_eq!(reason, "ActionCancelled", "{message}");

    assert_quiet(&sim, &known, 0).await;
    assert_quiet(&sim, &unknown, 2).await;
    assert_quiet(&sim, &offline, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_permission_stalls_as_forbidden() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("forbidden").await;
    let client = c.client().await;
    let m = machine_id(0x5001);
    let (sim, _dir) = sim_with(
        &[SeedMachine {
            id: &m,
            name: "p.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
        &["--app-roles", "Machine.Read.All"],
    )
    .await;
    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));
    create(
        &client,
        &ns,
        &device_isolation("p", &m, false, Some("release")),
    )
    .await;
    let (reason, message) = wait_stalled(&client, &ns, "p", &op).await;
    assert_eq!(reason, "Forbidden");
    assert!(message.contains("Machine.Isolate"), "{message}");
    assert_quiet(&sim, &m, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_resources_converge_within_a_shortened_quota() {
    const N: u32 = 300;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("many").await;
    let client = c.client().await;
    // 20 calls a minute and 300 an hour per API (a fifth of MDE's): 300 releases need 15
    // simulated minutes at least; at time scale 120 that is under 10 s.
    let sim = Sim::start(&[
        "--machines",
        &N.to_string(),
        "--time-scale",
        "120",
        "--quota-per-minute",
        "20",
        "--quota-per-hour",
        "300",
    ]);
    let ids = sim.machine_ids().await;
    assert_eq!(ids.len(), N as usize);
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.time_scale = 120.0;
    cfg.extra = vec!["--quota-budget".into(), "0.2".into()];
    let op = Operator::start(&sim, cfg);
    for (i, id) in ids.iter().enumerate() {
        // Half release, half isolate, so both APIs carry load.
        create(
            &client,
            &ns,
            &device_isolation(&format!("d{i:03}"), id, i % 2 == 0, Some("bulk")),
        )
        .await;
    }
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let end = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let list = api.list(&Default::default()).await.unwrap();
        let ready = list
            .items
            .iter()
            .filter(|d| condition(d, "Ready").is_some_and(|c| c.0 == "True"))
            .count();
        if ready == N as usize {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "{ready}/{N} ready; operator log tail:\n{}",
            op.tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stats = sim.admin_stats().await;
    for (api_name, s) in stats["apis"].as_object().unwrap() {
        let field = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
        assert_eq!(field("throttled"), 0, "{api_name}: {s}");
        assert!(field("maxCallsPerMinute") <= 20, "{api_name}: {s}");
        assert!(field("maxCallsPerHour") <= 300, "{api_name}: {s}");
    }
    let calls = api_calls(&sim).await;
    assert_eq!(
        posts(&calls, "unisolate") + posts(&calls, "isolate"),
        N as usize
    );
    // How fully the window was used is a throughput figure: the benchmark reports it.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_are_rejected_naming_the_field() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("invalid").await;
    let client = c.client().await;
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams::apply("e2e-test");
    let body = |name: &str, spec: Value| {
        json!({
            "apiVersion": "isolation.mde.dev/v1alpha1",
            "kind": "DeviceIsolation",
            "metadata": {"name": name, "annotations": {"isolation.mde.dev/comment": "x"}},
            "spec": spec,
        })
    };
    let cases = [
        (
            "bad-id",
            json!({"machineId": "XYZ", "isolated": false}),
            "spec.machineId",
        ),
        (
            "bad-type",
            json!({"machineId": machine_id(1), "isolated": true, "isolationType": "Partial"}),
            "spec.isolationType",
        ),
        (
            "no-isolated",
            json!({"machineId": machine_id(1)}),
            "spec.isolated",
        ),
    ];
    for (name, spec, field) in cases {
        let err = api
            .patch(name, &pp, &Patch::Apply(body(name, spec)))
            .await
            .expect_err(name);
        assert!(err.to_string().contains(field), "{name}: {err}");
    }
    api.patch(
        "ok",
        &pp,
        &Patch::Apply(body(
            "ok",
            json!({"machineId": machine_id(1), "isolated": false}),
        )),
    )
    .await
    .expect("a valid manifest is accepted");
    let err = api
        .patch(
            "ok",
            &pp,
            &Patch::Apply(body(
                "ok",
                json!({"machineId": machine_id(2), "isolated": false}),
            )),
        )
        .await
        .expect_err("machineId edit");
    let msg = err.to_string();
    assert!(
        msg.contains("spec.machineId") && msg.contains("immutable"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_report_health_and_metrics_and_sigterm_stops_cleanly() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("endpoints").await;
    let client = c.client().await;
    let m = machine_id(0x7001);
    let (sim, _dir) = sim_with(
        &[SeedMachine {
            id: &m,
            name: "e.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
        &[],
    )
    .await;
    let mut op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));
    let addr = op.http_addr(Duration::from_secs(60));
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let url = format!("http://{addr}{path}");
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.expect("endpoint answers");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    assert_eq!(get("/livez").await.0, 200);
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while get("/readyz").await.0 != 200 {
        assert!(
            std::time::Instant::now() < end,
            "never ready: {}",
            op.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    apply(
        &client,
        &ns,
        &device_isolation("e", &m, false, Some("release")),
    )
    .await;
    wait_ready(&client, &ns, "e", &op).await;
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"mde_isolation_mde_calls_total{api="unisolate",outcome="ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("mde_isolation_reconciles_total"),
        "{metrics}"
    );
    assert!(!metrics.contains(&m), "no machine id as a label");

    let pid = op.pid().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = op
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("did not stop on SIGTERM: {}", op.tail()));
    assert!(exit.success(), "exit status {exit}: {}", op.tail());
    assert!(op.output().contains("operator stopped"), "{}", op.tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_the_call_and_makes_no_mutating_call() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("dry-run").await;
    let client = c.client().await;
    let m = machine_id(0x7002);
    let (sim, _dir) = sim_with(
        &[SeedMachine {
            id: &m,
            name: "d.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
        &[],
    )
    .await;
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.extra = vec!["--dry-run".into()];
    let op = Operator::start(&sim, cfg);
    apply(
        &client,
        &ns,
        &device_isolation("d", &m, false, Some("release")),
    )
    .await;
    let di = wait_for(
        &client,
        &ns,
        "d",
        Duration::from_secs(60),
        &op,
        "DryRun",
        |di| condition(di, "Reconciling").is_some_and(|c| c.1 == "DryRun"),
    )
    .await;
    let (_, _, message) = condition(&di, "Reconciling").unwrap();
    assert!(
        message.contains(&format!("POST /api/machines/{m}/unisolate")),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = api_calls(&sim).await;
    assert_eq!(
        posts(&calls, "unisolate") + posts(&calls, "isolate"),
        0,
        "{calls:#?}"
    );
    assert_eq!(sim.ground_truth(&m).await["isolated"], true);
}
