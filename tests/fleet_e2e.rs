//! DeviceIsolationSet end to end (issue 13): the real kube-apiserver (with the upstream garbage
//! collector), real kubectl, `mde-sim` and the operator binary. Ground truth comes from the
//! simulator (`--duplicate-mode allow`, so a second action on a device would be created and seen).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::operator::{Operator, OperatorConfig, machine_id, the_leader, wait_leading};
use common::poll::poll;
use common::sim::Sim;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use mde_isolation_operator::crd::{DeviceIsolation, DeviceIsolationSet, SET_LABEL};
use serde_json::{Value, json};

/// One simulated device.
struct Device {
    id: String,
    name: String,
    tags: Vec<String>,
    behaviour: &'static str,
    /// Isolated at start, by whom: `None` released; `Some((requestor, source, at))`.
    isolated_by: Option<(&'static str, &'static str, &'static str)>,
}

impl Device {
    fn new(n: u32, name: &str, tags: &[&'static str]) -> Self {
        Device {
            id: machine_id(n),
            name: format!("{name}.contoso.local"),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            behaviour: "online",
            isolated_by: Some(("soc-analyst@contoso.com", "Portal", "2026-11-30T09:00:00Z")),
        }
    }
    fn tagged(mut self, tag: &str) -> Self {
        self.tags.push(tag.to_string());
        self
    }
    fn offline(mut self) -> Self {
        self.behaviour = "offline";
        self
    }
    fn by(mut self, who: &'static str, source: &'static str, at: &'static str) -> Self {
        self.isolated_by = Some((who, source, at));
        self
    }
    fn id(mut self, id: &str) -> Self {
        self.id = id.to_string();
        self
    }
}

const AAD: &str = "Automatic Attack Disruption";

fn seed(dir: &std::path::Path, devices: &[Device]) -> String {
    let mut yaml = String::from("machines:\n");
    for d in devices {
        yaml.push_str(&format!(
            "- id: {}\n  computerDnsName: {}\n  behaviour: {}\n  machineTags: [{}]\n",
            d.id,
            d.name,
            d.behaviour,
            d.tags.join(", ")
        ));
        if let Some((who, source, at)) = d.isolated_by {
            yaml.push_str(&format!(
                "  isolatedBy: {{requestor: \"{who}\", requestSource: {source}, at: \"{at}\"}}\n"
            ));
        }
    }
    let path = dir.join("seed.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

fn start_sim(seed: &str, scale: f64) -> Sim {
    Sim::start(&[
        "--seed",
        seed,
        "--time-scale",
        &scale.to_string(),
        "--duplicate-mode",
        "allow",
    ])
}

/// A pace at which a test can act in the middle of a rollout: 5 % of the quota (5 requests a
/// simulated minute, 75 an hour, for each API) at time scale 12, one request a real second in
/// bursts of at most 5.
const PACED_SCALE: f64 = 12.0;
const PACED_BUDGET: &str = "0.05";

/// The pace of the restart test: a quarter of the quota (25 a simulated minute, 375 an hour) at
/// time scale 4, which leaves room for the reads every restart makes (at the paced budget its 75
/// reads an hour run out, and the last devices wait minutes for the next hour).
const RESTART_SCALE: f64 = 4.0;
const RESTART_BUDGET: &str = "0.25";

/// Devices of the restart test: three minutes' worth at its pace.
const KILL_DEVICES: usize = 60;

/// Lease of the restart test's replicas (real seconds, as in tests/leader_election.rs).
const LEASE_SECONDS: u64 = 6;

/// The operator at `scale`, spending `budget` of the quota.
fn start_operator(
    sim: &Sim,
    kubeconfig: &std::path::Path,
    ns: &str,
    scale: f64,
    budget: &str,
) -> Operator {
    let mut cfg = OperatorConfig::new(kubeconfig, ns);
    cfg.time_scale = scale;
    cfg.extra = vec!["--quota-budget".into(), budget.into()];
    Operator::start(sim, cfg)
}

/// Server-side applies a set.
async fn apply_set(client: &kube::Client, ns: &str, name: &str, spec: Value) {
    let api: Api<DeviceIsolationSet> = Api::namespaced(client.clone(), ns);
    let body = json!({
        "apiVersion": "isolation.mde.dev/v1alpha1",
        "kind": "DeviceIsolationSet",
        "metadata": {"name": name, "annotations": {"isolation.mde.dev/comment": "fleet e2e (INC-4711)"}},
        "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap_or_else(|e| panic!("applying set {name}: {e}"));
}

async fn patch_paused(client: &kube::Client, ns: &str, name: &str, paused: bool) {
    let api: Api<DeviceIsolationSet> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": paused}})),
    )
    .await
    .unwrap_or_else(|e| panic!("pausing {name}: {e}"));
}

fn ready_reason(set: &DeviceIsolationSet) -> Option<(String, String, String)> {
    let s = set.status.as_ref()?;
    s.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .filter(|c| c.observed_generation == set.metadata.generation)
        .map(|c| {
            (
                c.status.to_string(),
                c.reason.to_string(),
                c.message.to_string(),
            )
        })
}

/// Polls the set until `pred` holds.
async fn wait_set<F>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    secs: u64,
    op: &Operator,
    what: &str,
    pred: F,
) -> DeviceIsolationSet
where
    F: Fn(&DeviceIsolationSet) -> bool,
{
    let api: Api<DeviceIsolationSet> = Api::namespaced(client.clone(), ns);
    let (api, pred) = (&api, &pred);
    poll(
        Duration::from_secs(secs),
        Duration::from_millis(100),
        || async move {
            match api.get(name).await {
                Ok(s) if pred(&s) => Ok(s),
                Ok(s) => Err(format!("{:#?}", s.status)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
    .unwrap_or_else(|last| {
        panic!(
            "set {ns}/{name} not {what}: {last}\noperator log:\n{}",
            op.tail()
        )
    })
}

fn has_reason(reason: &'static str) -> impl Fn(&DeviceIsolationSet) -> bool {
    move |s| ready_reason(s).is_some_and(|r| r.1 == reason)
}

/// Unisolate/isolate calls per machine (every one MDE received, answered or not).
async fn actions_by_machine(sim: &Sim) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for call in sim.admin_calls().await {
        if call["api"] == "unisolate" || call["api"] == "isolate" {
            let path = call["path"].as_str().unwrap_or("");
            if let Some(m) = path.split('/').nth(3) {
                *by.entry(m.to_string()).or_insert(0) += 1;
            }
        }
    }
    by
}

async fn mutating_calls(sim: &Sim) -> usize {
    actions_by_machine(sim).await.values().sum()
}

async fn children(client: &kube::Client, ns: &str, set: &str) -> Vec<DeviceIsolation> {
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().labels(&format!("{SET_LABEL}={set}")))
        .await
        .expect("list children")
        .items
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let out = cluster()
        .kubectl()
        .args(args)
        .output()
        .expect("kubectl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The three stories of the README with the manifests of `examples/fleet/`, applied with kubectl:
/// by tag (paused for review, a canary of 10), by `isolatedBy` (attack disruption among devices
/// people isolated; paused), and by list. Paused sets request nothing and show count and preview;
/// unpaused, every online device is released by exactly one action, offline ones stay pending and
/// counted, and no device outside the selections is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_stories_release_exactly_the_selected_devices_once() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("fleet-stories").await;
    let client = c.client().await;
    let mut devices = Vec::new();
    // By tag: 10 online and 2 offline (named last, outside the canary of 10), 1 domain controller
    // (excluded), 2 untagged.
    for i in 0..10 {
        devices.push(Device::new(
            0x100 + i,
            &format!("tag-{i:02}"),
            &["incident-4711"],
        ));
    }
    for i in 0..2 {
        devices
            .push(Device::new(0x110 + i, &format!("zz-offline-{i}"), &["incident-4711"]).offline());
    }
    devices.push(Device::new(
        0x120,
        "dc-01",
        &["incident-4711", "domain-controller"],
    ));
    devices.push(Device::new(0x121, "other-01", &["incident-9999"]));
    devices.push(Device::new(0x122, "other-02", &[]));
    // isolatedBy: 6 by attack disruption since 2026-12-01, 3 by people, 1 by attack disruption
    // before the date (not selected).
    for i in 0..6 {
        devices.push(Device::new(0x200 + i, &format!("aad-{i}"), &[]).by(
            AAD,
            "AutomaticAttackDisruption",
            "2026-12-02T03:00:00Z",
        ));
    }
    for i in 0..3 {
        devices.push(Device::new(0x210 + i, &format!("person-{i}"), &[]));
    }
    devices.push(Device::new(0x220, "aad-old", &[]).by(
        AAD,
        "AutomaticAttackDisruption",
        "2026-11-20T03:00:00Z",
    ));
    // The list example's ids: two online, one offline.
    let list_ids = [
        "4f0c2d1e9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c4d",
        "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b",
        "0123456789abcdef0123456789abcdef01234567",
    ];
    devices.push(Device::new(0, "list-0", &[]).id(list_ids[0]));
    devices.push(Device::new(0, "list-1", &[]).id(list_ids[1]));
    devices.push(Device::new(0, "list-2", &[]).id(list_ids[2]).offline());

    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(&seed(dir.path(), &devices), 60.0);
    let op = start_operator(&sim, &c.kubeconfig, &ns, 60.0, "1.0");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fleet");
    let (ok, out) = kubectl(&["apply", "-n", &ns, "-f", examples.to_str().unwrap()]);
    assert!(ok, "{out}");

    // The paused sets: selection shown, nothing requested for their devices.
    let tag = wait_set(
        &client,
        &ns,
        "release-inc-4711",
        60,
        &op,
        "Paused",
        has_reason("Paused"),
    )
    .await;
    let selection = tag.status.as_ref().unwrap().selection.clone().unwrap();
    assert_eq!((selection.count, selection.excluded), (12, 1));
    let preview: Vec<&str> = selection
        .preview
        .iter()
        .filter_map(|p| p.computer_dns_name.as_deref())
        .collect();
    assert_eq!(preview.len(), 12);
    assert_eq!(preview[0], "tag-00.contoso.local");
    assert!(!preview.contains(&"dc-01.contoso.local"));
    let aad = wait_set(
        &client,
        &ns,
        "release-disruption-1201",
        60,
        &op,
        "Paused",
        has_reason("Paused"),
    )
    .await;
    let aad_ids = aad
        .status
        .as_ref()
        .unwrap()
        .selection
        .as_ref()
        .unwrap()
        .machine_ids
        .clone();
    let want_aad: Vec<String> = (0..6).map(|i| machine_id(0x200 + i)).collect();
    assert_eq!(
        aad_ids, want_aad,
        "only attack disruption's isolations since the date"
    );
    let (ok, table) = kubectl(&["get", "dis", "-n", &ns]);
    assert!(ok, "{table}");
    assert!(
        table.contains("DESIRED") && table.contains("SELECTED") && table.contains("PENDING"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("release-inc-4711"))
        .expect("row");
    assert!(
        row.split_whitespace().any(|w| w == "12") && row.contains("Paused"),
        "{table}"
    );
    let acted = actions_by_machine(&sim).await;
    for d in devices
        .iter()
        .filter(|d| !list_ids.contains(&d.id.as_str()))
    {
        assert_eq!(
            acted.get(&d.id),
            None,
            "{} requested while its set is paused",
            d.name
        );
    }
    assert!(children(&client, &ns, "release-inc-4711").await.is_empty());

    // Unpause (as a reviewer would).
    for name in ["release-inc-4711", "release-disruption-1201"] {
        let (ok, out) = kubectl(&[
            "patch",
            "dis",
            "-n",
            &ns,
            name,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"paused":false}}"#,
        ]);
        assert!(ok, "{out}");
    }
    let settled = |ready: u32, pending: u32| {
        move |s: &DeviceIsolationSet| {
            s.status.as_ref().is_some_and(|st| {
                st.devices.ready == ready
                    && st.devices.pending == pending
                    && st.devices.requested == ready + pending
            }) && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
        }
    };
    let tag = wait_set(
        &client,
        &ns,
        "release-inc-4711",
        120,
        &op,
        "10 ready, 2 pending",
        settled(10, 2),
    )
    .await;
    assert_eq!(tag.status.as_ref().unwrap().devices.requested, 12);
    assert_eq!(
        ready_reason(&tag).unwrap().1,
        "RollingOut",
        "offline devices keep the set working"
    );
    let aad = wait_set(
        &client,
        &ns,
        "release-disruption-1201",
        120,
        &op,
        "Converged",
        has_reason("Converged"),
    )
    .await;
    assert_eq!(aad.status.as_ref().unwrap().devices.ready, 6);
    // kubectl wait sees the set's Ready condition, as a pipeline would.
    let (ok, out) = kubectl(&[
        "wait",
        "-n",
        &ns,
        "dis/release-disruption-1201",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
    assert!(ok, "{out}");
    wait_set(
        &client,
        &ns,
        "release-inc-4733",
        120,
        &op,
        "2 ready, 1 pending",
        settled(2, 1),
    )
    .await;

    // Ground truth: one action per selected device, released when online, nothing else touched.
    let acted = actions_by_machine(&sim).await;
    let selected: Vec<&Device> = devices
        .iter()
        .filter(|d| {
            (d.tags.iter().any(|t| t == "incident-4711")
                && !d.tags.iter().any(|t| t == "domain-controller"))
                || d.name.starts_with("aad-") && !d.name.starts_with("aad-old")
                || list_ids.contains(&d.id.as_str())
        })
        .collect();
    assert_eq!(selected.len(), 12 + 6 + 3);
    for d in &devices {
        let is_selected = selected.iter().any(|s| s.id == d.id);
        let truth = sim.ground_truth(&d.id).await;
        if is_selected {
            assert_eq!(acted.get(&d.id), Some(&1), "{}: one action", d.name);
            assert_eq!(truth["isolated"], d.behaviour == "offline", "{}", d.name);
        } else {
            assert_eq!(acted.get(&d.id), None, "{} is not selected", d.name);
            assert_eq!(truth["isolated"], true, "{}", d.name);
        }
    }
    // The events of a rollout.
    let (ok, events) = kubectl(&["get", "events.events.k8s.io", "-n", &ns, "-o", "json"]);
    assert!(ok, "{events}");
    for reason in [
        "SelectionResolved",
        "Paused",
        "RolloutStarted",
        "CanaryPassed",
        "Done",
    ] {
        assert!(
            events.contains(&format!("\"reason\": \"{reason}\"")),
            "no {reason} event"
        );
    }
}

/// A set of 24 devices named `name` rolling out at the paced rate, with 5 requests made.
async fn paced_rollout(
    name: &str,
    base: u32,
) -> (String, Vec<Device>, Sim, Operator, tempfile::TempDir) {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace(&format!("fleet-{name}")).await;
    let tag = format!("{name}-me");
    let devices: Vec<Device> = (0..24)
        .map(|i| Device::new(base + i, &format!("{name}-{i:02}"), &[]).tagged(&tag))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(&seed(dir.path(), &devices), PACED_SCALE);
    let op = start_operator(&sim, &c.kubeconfig, &ns, PACED_SCALE, PACED_BUDGET);
    apply_set(
        &c.client().await,
        &ns,
        name,
        json!({"isolated": false, "selector": {"machineTags": [tag]}}),
    )
    .await;
    sim.wait_until(60, "5 requests", || async {
        (mutating_calls(&sim).await >= 5).then_some(())
    })
    .await;
    (ns, devices, sim, op, dir)
}

/// Pausing a running set stops new requests once the operator has seen it; resuming finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_while_running_stops_new_requests_and_resuming_finishes() {
    let c = cluster();
    let client = c.client().await;
    let (ns, devices, sim, op, _dir) = paced_rollout("pause", 0x300).await;
    patch_paused(&client, &ns, "pause", true).await;
    wait_set(
        &client,
        &ns,
        "pause",
        30,
        &op,
        "Paused",
        has_reason("Paused"),
    )
    .await;
    let at_pause = mutating_calls(&sim).await;
    assert!(at_pause < 24, "the test paused too late: {at_pause}");
    // At one request a second, 6 s are 6 chances to request.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        mutating_calls(&sim).await,
        at_pause,
        "a request after the pause was seen"
    );
    let held = children(&client, &ns, "pause")
        .await
        .into_iter()
        .filter(|c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "HeldBySet"))
        });
    assert!(
        held.count() > 0,
        "children not yet requested say why they wait"
    );

    patch_paused(&client, &ns, "pause", false).await;
    wait_set(
        &client,
        &ns,
        "pause",
        120,
        &op,
        "Converged",
        has_reason("Converged"),
    )
    .await;
    let acted = actions_by_machine(&sim).await;
    for d in &devices {
        assert_eq!(acted.get(&d.id), Some(&1), "{}", d.name);
        assert_eq!(sim.ground_truth(&d.id).await["isolated"], false);
    }
}

/// A canary of 10 with an unsupported device among them and no failure budget: the set stops
/// after the canary and requests nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_device_stops_the_set_after_the_canary() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("fleet-canary").await;
    let client = c.client().await;
    let mut devices: Vec<Device> = (0..20)
        .map(|i| Device::new(0x400 + i, &format!("c-{i:02}"), &["canary"]))
        .collect();
    devices[3].behaviour = "unsupported";
    devices[3].isolated_by = None;
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(&seed(dir.path(), &devices), 60.0);
    let op = start_operator(&sim, &c.kubeconfig, &ns, 60.0, "1.0");
    apply_set(
        &client,
        &ns,
        "canary",
        json!({"isolated": false, "selector": {"machineTags": ["canary"]}, "rollout": {"canary": 10, "maxFailures": 0}}),
    )
    .await;
    let set = wait_set(
        &client,
        &ns,
        "canary",
        90,
        &op,
        "stopped",
        has_reason("FailureBudgetExceeded"),
    )
    .await;
    let status = set.status.as_ref().unwrap();
    assert_eq!(status.devices.failed, 1);
    assert_eq!(status.devices.requested, 10);
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "True")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acted = actions_by_machine(&sim).await;
    for (i, d) in devices.iter().enumerate() {
        let want = if i < 10 { Some(&1) } else { None };
        assert_eq!(acted.get(&d.id), want, "{}", d.name);
    }
    assert_eq!(children(&client, &ns, "canary").await.len(), 10);
}

/// Guards: a selection above maxDevices stalls with the count and calls nothing; the API server
/// refuses an empty selector, an empty isolatedBy and a name too long for the children's label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_stop_too_large_selections_and_refuse_empty_selectors() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("fleet-guards").await;
    let client = c.client().await;
    let devices: Vec<Device> = (0..5)
        .map(|i| Device::new(0x500 + i, &format!("g-{i}"), &["big"]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(&seed(dir.path(), &devices), 60.0);
    let op = start_operator(&sim, &c.kubeconfig, &ns, 60.0, "1.0");
    apply_set(
        &client,
        &ns,
        "too-large",
        json!({"isolated": false, "maxDevices": 3, "selector": {"machineTags": ["big"]}}),
    )
    .await;
    let set = wait_set(
        &client,
        &ns,
        "too-large",
        60,
        &op,
        "stalled",
        has_reason("SelectionTooLarge"),
    )
    .await;
    let (_, _, message) = ready_reason(&set).unwrap();
    assert!(
        message.contains("matches 5 devices") && message.contains("maxDevices 3"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mutating_calls(&sim).await, 0);
    assert!(children(&client, &ns, "too-large").await.is_empty());

    let api: Api<DeviceIsolationSet> = Api::namespaced(client.clone(), &ns);
    let refused = |spec: Value, name: &str| {
        let api = api.clone();
        let name = name.to_string();
        async move {
            let body = json!({"apiVersion": "isolation.mde.dev/v1alpha1", "kind": "DeviceIsolationSet",
                "metadata": {"name": name}, "spec": spec});
            match api
                .patch(&name, &PatchParams::apply("e2e-test"), &Patch::Apply(&body))
                .await
            {
                Ok(_) => panic!("{name} was admitted"),
                Err(e) => e.to_string(),
            }
        }
    };
    let e = refused(json!({"isolated": false, "selector": {}}), "empty").await;
    assert!(
        e.contains("the selector must name at least one criterion"),
        "{e}"
    );
    let e = refused(
        json!({"isolated": false, "selector": {"machineTags": []}}),
        "empty-list",
    )
    .await;
    assert!(
        e.contains("the selector must name at least one criterion"),
        "{e}"
    );
    let e = refused(
        json!({"isolated": false, "selector": {"isolatedBy": {"requestor": ""}}}),
        "empty-by",
    )
    .await;
    assert!(
        e.contains("isolatedBy needs requestor, requestSource or since"),
        "{e}"
    );
    let long = "x".repeat(64);
    let e = refused(
        json!({"isolated": false, "selector": {"machineTags": ["t"]}}),
        &long,
    )
    .await;
    assert!(e.contains("at most 63 characters"), "{e}");
}

/// Two replicas with leader election, the leader SIGKILLed in the middle of a rollout twice (the
/// standby takes over; the killed one comes back as the standby): no device gets a second action
/// and the rollout goes on from where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_hands_the_rollout_over_without_a_second_action() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("fleet-kill").await;
    let client = c.client().await;
    let devices: Vec<Device> = (0..KILL_DEVICES as u32)
        .map(|i| Device::new(0x600 + i, &format!("k-{i:02}"), &["kill"]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(&seed(dir.path(), &devices), RESTART_SCALE);
    let replica = || {
        let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
        cfg.time_scale = RESTART_SCALE;
        cfg.extra = vec![
            "--quota-budget".into(),
            RESTART_BUDGET.into(),
            "--leader-election".into(),
            "--lease-duration-seconds".into(),
            LEASE_SECONDS.to_string(),
        ];
        Operator::start(&sim, cfg)
    };
    let mut ops = [replica(), replica()];
    let http = reqwest::Client::new();
    apply_set(
        &client,
        &ns,
        "kill",
        json!({"isolated": false, "selector": {"machineTags": ["kill"]}}),
    )
    .await;
    // 25 requests a simulated minute: a kill in the first minute's burst and one in the second's.
    let mut leader = 0;
    for at in [10, 35] {
        let addrs = ops
            .each_ref()
            .map(|op| op.http_addr(Duration::from_secs(60)));
        leader = the_leader(&http, &[&ops[0], &ops[1]], &addrs).await;
        sim.wait_until(90, "more requests", || async {
            (mutating_calls(&sim).await >= at).then_some(())
        })
        .await;
        ops[leader].kill();
        let standby = 1 - leader;
        let within = Duration::from_secs(LEASE_SECONDS * 3);
        wait_leading(&http, &addrs[standby], within, &ops[standby]).await;
        ops[leader].restart();
        leader = standby;
    }
    let killed_at = mutating_calls(&sim).await;
    assert!(killed_at < KILL_DEVICES, "killed too late: {killed_at}");
    wait_set(
        &client,
        &ns,
        "kill",
        180,
        &ops[leader],
        "Converged",
        has_reason("Converged"),
    )
    .await;
    let acted = actions_by_machine(&sim).await;
    for d in &devices {
        assert_eq!(acted.get(&d.id), Some(&1), "{}", d.name);
        assert_eq!(sim.ground_truth(&d.id).await["isolated"], false);
    }
}

/// Deleting a running set: no request once the deletion is a second old (one in flight may land),
/// and the garbage collector removes the children; their devices stay as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_set_stops_requests_and_its_children_are_collected() {
    let c = cluster();
    let client = c.client().await;
    let (ns, _devices, sim, op, _dir) = paced_rollout("delete", 0x700).await;
    let api: Api<DeviceIsolationSet> = Api::namespaced(client.clone(), &ns);
    api.delete("delete", &DeleteParams::background())
        .await
        .expect("delete the set");
    let deleted = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_a_second = mutating_calls(&sim).await;
    assert!(after_a_second < 24, "deleted too late");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        mutating_calls(&sim).await,
        after_a_second,
        "a request after the set was deleted"
    );
    poll(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            match children(&client, &ns, "delete").await.len() {
                0 => Ok(()),
                n => Err(format!("{n} children left")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "children not collected {:?} after the delete: {e}\n{}",
            deleted.elapsed(),
            op.tail()
        )
    });
}
