//! Leader election end to end: operator binaries with `--leader-election` against the real
//! kube-apiserver and `mde-sim`. Each replica signs in to the simulator as its own app (client
//! id), so the simulator's call log says exactly which replica made each call.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::cluster::{CHART_REQUIRED_VALUES, SA_NAME, SA_NAMESPACE, cluster};
use common::operator::{
    Operator, OperatorConfig, create, device_isolation, is_leading, machine_id, readyz, the_leader,
    wait_leading, wait_ready,
};
use common::sim::{Sim, real_time};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::Value;

const SCALE: f64 = 60.0;
const LEASE: &str = "mde-isolation-operator";
/// Real milliseconds the simulator adds to every API call: spreads the POSTs over seconds, so
/// that the leader can be killed halfway.
const LATENCY_MS: i64 = 200;

/// A simulator with `n` online, isolated machines (ids from `base`) and two apps, `replica-a`
/// and `replica-b`, with the operator's test secret.
fn sim_with_two_apps(base: u32, n: u32, latency_ms: i64) -> (Sim, tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids: Vec<String> = (0..n).map(|i| machine_id(base + i)).collect();
    let mut yaml = String::from("machines:\n");
    for (i, id) in ids.iter().enumerate() {
        yaml.push_str(&format!(
            "- id: {id}\n  computerDnsName: host-{i}.contoso.local\n  behaviour: online\n  isolated: true\n"
        ));
    }
    yaml.push_str("apps:\n");
    for app in ["replica-a", "replica-b"] {
        yaml.push_str(&format!(
            "- clientId: {app}\n  clientSecret: {}\n  roles: [Machine.Isolate, Machine.Read.All]\n",
            common::operator::SIM_SECRET
        ));
    }
    let seed = dir.path().join("seed.yaml");
    std::fs::write(&seed, yaml).expect("seed file");
    let latency = latency_ms.to_string();
    let sim = Sim::start(&[
        "--seed",
        seed.to_str().expect("utf-8 path"),
        "--time-scale",
        &SCALE.to_string(),
        "--latency-ms",
        &latency,
    ]);
    (sim, dir, ids)
}

/// An operator signing in as `app`, with leader election and a `lease_seconds` lease.
fn replica(
    sim: &Sim,
    kubeconfig: &std::path::Path,
    ns: &str,
    app: &str,
    lease_seconds: u64,
) -> Operator {
    let mut cfg = OperatorConfig::new(kubeconfig, ns);
    cfg.time_scale = SCALE;
    cfg.client_id = app.into();
    cfg.extra = vec![
        "--leader-election".into(),
        "--lease-duration-seconds".into(),
        lease_seconds.to_string(),
        // Few at a time, so that the POSTs take seconds and a kill lands in the middle.
        "--concurrency".into(),
        "2".into(),
    ];
    Operator::start(sim, cfg)
}

/// The Lease's holder, `acquireTime` and transitions.
async fn lease_state(
    client: &kube::Client,
    ns: &str,
) -> (Option<String>, Option<DateTime<Utc>>, i32) {
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get(LEASE)
        .await
        .expect("the Lease exists");
    let spec = lease.spec.unwrap_or_default();
    let acquired = spec
        .acquire_time
        .map(|t| DateTime::from_timestamp_micros(t.0.as_microsecond()).expect("acquireTime"));
    (
        spec.holder_identity,
        acquired,
        spec.lease_transitions.unwrap_or(0),
    )
}

/// Whether `holder` is the identity of the process `pid` (`hostname_pid` without POD_NAME).
fn is_identity_of(holder: &Option<String>, pid: u32) -> bool {
    holder
        .as_deref()
        .is_some_and(|h| h.ends_with(&format!("_{pid}")))
}

fn calls_of<'a>(calls: &'a [Value], app: &str) -> Vec<&'a Value> {
    calls.iter().filter(|c| c["app"] == app).collect()
}

/// Two replicas: one leads, the other stands by (503) for longer than a lease. The leader is
/// killed with SIGKILL halfway through 50 releases; the standby takes over within the lease
/// duration and finishes. Every device ends released with exactly one action, and the standby
/// made no MDE call before it held the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_from_a_killed_leader_without_duplicate_actions() {
    const N: u32 = 50;
    const LEASE_SECONDS: u64 = 6;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("leader-failover").await;
    let client = c.client().await;
    let (sim, _dir, machines) = sim_with_two_apps(0x1e_0000, N, LATENCY_MS);
    let apps = ["replica-a", "replica-b"];
    let mut ops = [
        replica(&sim, &c.kubeconfig, &ns, apps[0], LEASE_SECONDS),
        replica(&sim, &c.kubeconfig, &ns, apps[1], LEASE_SECONDS),
    ];
    let addrs = [
        ops[0].http_addr(Duration::from_secs(60)),
        ops[1].http_addr(Duration::from_secs(60)),
    ];
    let http = reqwest::Client::new();

    // Exactly one leads, and it stays that way for longer than a lease: renewals work and the
    // standby never steals a live lease.
    let leader = the_leader(&http, &[&ops[0], &ops[1]], &addrs).await;
    let standby = 1 - leader;
    // The standby started with the leader, but its watch caches may finish syncing a moment
    // later (readiness needs them); from then on it must stay ready.
    let sync_deadline = Instant::now() + Duration::from_secs(30);
    while readyz(&http, &addrs[standby]).await.0 != 200 && Instant::now() < sync_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stable_until = Instant::now() + Duration::from_secs(LEASE_SECONDS + 2);
    let mut standby_said = String::new();
    while Instant::now() < stable_until {
        assert!(
            is_leading(&http, &addrs[leader]).await,
            "the leader stopped leading:\n{}",
            ops[leader].tail()
        );
        // A standby is ready (a leader is known), so a two-replica Deployment is Available.
        let (status, body) = readyz(&http, &addrs[standby]).await;
        assert_eq!(
            status,
            200,
            "the standby is not ready: {}",
            ops[standby].tail()
        );
        standby_said = body;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(standby_said.trim(), "ok: standby");
    let (holder, _, _) = lease_state(&client, &ns).await;
    assert!(
        is_identity_of(&holder, ops[leader].pid().expect("running")),
        "lease holder {holder:?}"
    );

    for (i, m) in machines.iter().enumerate() {
        let di = device_isolation(&format!("dev-{i}"), m, false, Some("failover test"));
        create(&client, &ns, &di).await;
    }

    // Kill the leader after some, not all, of the releases were sent.
    let end = Instant::now() + Duration::from_secs(90);
    let at_kill = loop {
        let calls = sim.admin_calls().await;
        let posts = calls.iter().filter(|c| c["api"] == "unisolate").count();
        if posts >= 10 {
            ops[leader].kill();
            break calls;
        }
        assert!(
            Instant::now() < end,
            "only {posts} releases sent:\n{}",
            ops[leader].tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let killed_at = Instant::now();
    let posted_before_kill = at_kill.iter().filter(|c| c["api"] == "unisolate").count();
    assert!(
        (posted_before_kill as u32) < N,
        "all {posted_before_kill} releases were sent before the kill: nothing left to take over"
    );
    assert!(
        calls_of(&at_kill, apps[standby]).is_empty(),
        "the standby called MDE while standing by: {:#?}",
        calls_of(&at_kill, apps[standby])
    );

    // Takeover: within the lease duration, plus two read intervals (2/15 of it each) and slack.
    let within = Duration::from_secs(LEASE_SECONDS * 2).saturating_sub(killed_at.elapsed());
    wait_leading(&http, &addrs[standby], within, &ops[standby]).await;
    let takeover = killed_at.elapsed();
    let bound = Duration::from_secs_f64(LEASE_SECONDS as f64 * (1.0 + 4.0 / 15.0) + 2.0);
    assert!(
        takeover <= bound,
        "takeover took {takeover:?} (> {bound:?})"
    );
    let (holder, acquired, transitions) = lease_state(&client, &ns).await;
    assert!(
        is_identity_of(&holder, ops[standby].pid().expect("running")),
        "lease holder {holder:?}"
    );
    assert!(transitions >= 1, "transitions {transitions}");
    let acquired = acquired.expect("acquireTime");

    for i in 0..N {
        wait_ready(&client, &ns, &format!("dev-{i}"), &ops[standby]).await;
    }

    // Ground truth: every device released by exactly one action.
    let mut actions = 0;
    for m in &machines {
        let truth = sim.ground_truth(m).await;
        assert_eq!(truth["isolated"], false, "device {m}: {truth}");
        let n = truth["actions"].as_array().map_or(0, Vec::len);
        assert_eq!(n, 1, "device {m} got {n} actions: {truth}");
        actions += n;
    }

    // Who called when. The simulator logs a call once it has slept its latency, so a call
    // logged at t was sent no later than t - latency (API calls; token requests have no
    // latency): no call of the new leader may have been sent before it acquired the lease.
    let calls = sim.admin_calls().await;
    let (old, new) = (
        calls_of(&calls, apps[leader]),
        calls_of(&calls, apps[standby]),
    );
    assert!(!new.is_empty(), "the new leader made no call");
    for call in &new {
        let latency = if call["api"] == "token" {
            0
        } else {
            LATENCY_MS
        };
        // realTime has millisecond precision, truncated: allow that one millisecond.
        let sent_by = real_time(call) - chrono::Duration::milliseconds(latency - 1);
        assert!(
            sent_by >= acquired,
            "the new leader called MDE before it acquired the lease at {acquired}: {call}"
        );
    }
    let last_old = old.iter().map(|c| real_time(c)).max().expect("old calls");
    let first_new = new.iter().map(|c| real_time(c)).min().expect("new calls");
    assert!(
        last_old < first_new,
        "calls of the two replicas overlap: old leader's last {last_old}, new leader's first {first_new}"
    );
    let posts = |calls: &[&Value]| calls.iter().filter(|c| c["api"] == "unisolate").count();
    eprintln!(
        "failover: {posted_before_kill} releases sent before the kill ({} by the old leader in \
         all, {} by the new one), takeover after {takeover:?} (lease {LEASE_SECONDS} s), \
         {actions} actions for {N} devices",
        posts(&old),
        posts(&new)
    );
}

/// SIGTERM on the leader releases the lease: the standby takes over at its next read, far
/// sooner than the 15 s lease would expire, and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_lease_over_at_once() {
    const LEASE_SECONDS: u64 = 15;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("leader-handover").await;
    let client = c.client().await;
    let (sim, _dir, machines) = sim_with_two_apps(0x1f_0000, 2, 0);
    let mut ops = [
        replica(&sim, &c.kubeconfig, &ns, "replica-a", LEASE_SECONDS),
        replica(&sim, &c.kubeconfig, &ns, "replica-b", LEASE_SECONDS),
    ];
    let addrs = [
        ops[0].http_addr(Duration::from_secs(60)),
        ops[1].http_addr(Duration::from_secs(60)),
    ];
    let http = reqwest::Client::new();
    let leader = the_leader(&http, &[&ops[0], &ops[1]], &addrs).await;
    let standby = 1 - leader;
    let first = device_isolation("first", &machines[0], false, Some("handover test"));
    create(&client, &ns, &first).await;
    wait_ready(&client, &ns, "first", &ops[leader]).await;

    let pid = ops[leader].pid().expect("running");
    let termed_at = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let end = termed_at + Duration::from_secs(LEASE_SECONDS);
    while !is_leading(&http, &addrs[standby]).await {
        assert!(
            Instant::now() < end,
            "the standby did not take over before the lease would have expired:\nleader:\n{}\nstandby:\n{}",
            ops[leader].tail(),
            ops[standby].tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handover = termed_at.elapsed();
    // Released: the standby reads every 2 s (2/15 of the lease), so well under half the lease.
    assert!(
        handover < Duration::from_secs(LEASE_SECONDS / 2),
        "handover took {handover:?}"
    );
    let exit = ops[leader]
        .wait_exit(Duration::from_secs(20))
        .expect("the old leader exits");
    assert!(exit.success(), "exit {exit}: {}", ops[leader].tail());
    assert!(
        ops[leader].output().contains("released the lease"),
        "{}",
        ops[leader].tail()
    );
    let (holder, _, _) = lease_state(&client, &ns).await;
    assert!(
        is_identity_of(&holder, ops[standby].pid().expect("running")),
        "lease holder {holder:?}"
    );

    // The new leader works, and did not redo the first device.
    let second = device_isolation("second", &machines[1], false, Some("handover test"));
    create(&client, &ns, &second).await;
    wait_ready(&client, &ns, "second", &ops[standby]).await;
    for m in &machines {
        let truth = sim.ground_truth(m).await;
        assert_eq!(truth["isolated"], false, "{truth}");
        assert_eq!(
            truth["actions"].as_array().map_or(0, Vec::len),
            1,
            "{truth}"
        );
    }
    eprintln!("SIGTERM handover after {handover:?} (lease {LEASE_SECONDS} s)");
}

/// A leader whose lease is taken from it exits at once with the lost-lease code, rather than
/// going on calling MDE next to the new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_lease_exits_at_once() {
    const LEASE_SECONDS: u64 = 6;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("leader-lost").await;
    let client = c.client().await;
    let (sim, _dir, _machines) = sim_with_two_apps(0x20_0000, 1, 0);
    let mut op = replica(&sim, &c.kubeconfig, &ns, "replica-a", LEASE_SECONDS);
    let addr = op.http_addr(Duration::from_secs(60));
    let http = reqwest::Client::new();
    let end = Instant::now() + Duration::from_secs(60);
    while readyz(&http, &addr).await.0 != 200 {
        assert!(Instant::now() < end, "never led:\n{}", op.tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Someone else takes the lease (as a replica that judged it expired would).
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut lease = leases.get(LEASE).await.expect("lease");
    lease.spec.as_mut().expect("spec").holder_identity = Some("intruder".into());
    leases
        .replace(LEASE, &PostParams::default(), &lease)
        .await
        .expect("take the lease");
    let taken_at = Instant::now();

    // Its next renewal (every 0.8 s) meets the new holder.
    let exit = op
        .wait_exit(Duration::from_secs(LEASE_SECONDS))
        .unwrap_or_else(|| panic!("still running:\n{}", op.tail()));
    assert_eq!(
        exit.code(),
        Some(mde_isolation_operator::leader::LOST_EXIT_CODE),
        "exit {exit}: {}",
        op.tail()
    );
    assert!(op.output().contains("lost the lease"), "{}", op.tail());
    eprintln!("lost lease: exited after {:?}", taken_at.elapsed());
}

/// Runs `tool` (a `Command` of the cluster helper) with `stdin`, failing on a non-zero exit.
fn run_tool(mut tool: std::process::Command, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = tool
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write stdin");
    drop(pipe);
    let out = child.wait_with_output().expect("tool output");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The chart's leader-election Role (create; get and update of the release's Lease only) plus
/// its watch Role are all an operator with `--leader-election` needs: under the chart's
/// ServiceAccount it acquires the Lease, leads, and reconciles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_works_under_the_charts_rbac() {
    let c = cluster();
    c.install_crds().await;
    let client = c.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(SA_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {} // shared cluster: already there
        Err(e) => panic!("namespace {SA_NAMESPACE}: {e}"),
    }

    // A release of its own (a shared cluster may hold earlier runs' Leases and Roles).
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let release = format!("le-{suffix}");
    let fullname = format!("{release}-mde-isolation-operator");
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mde-isolation-operator");
    let sa = format!("serviceAccount.name={SA_NAME}");
    let mut args = vec!["template", &release, chart, "-n", SA_NAMESPACE];
    args.extend(CHART_REQUIRED_VALUES);
    args.extend([
        "--set",
        "serviceAccount.create=false",
        "--set",
        &sa,
        "--set",
        "leaderElection.enabled=true",
    ]);
    let rendered = run_tool(c.helm(), &args, None);
    let mut rbac = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("yaml");
        if matches!(value["kind"].as_str(), Some("Role" | "RoleBinding")) {
            rbac.push(serde_yaml::to_string(&value).expect("yaml"));
        }
    }
    assert_eq!(
        rbac.len(),
        4,
        "watch and leader-election Roles and bindings:\n{rendered}"
    );
    run_tool(
        c.kubectl(),
        &["apply", "-f", "-"],
        Some(&rbac.join("---\n")),
    );

    let (sim, _dir, machines) = sim_with_two_apps(0x21_0000, 1, 0);
    let sa_kubeconfig = c.service_account_kubeconfig(SA_NAMESPACE, SA_NAME);
    let mut cfg = OperatorConfig::new(&sa_kubeconfig, SA_NAMESPACE);
    cfg.time_scale = SCALE;
    cfg.client_id = "replica-a".into();
    cfg.extra = vec![
        "--leader-election".into(),
        "--lease-name".into(),
        fullname.clone(),
        "--lease-duration-seconds".into(),
        "6".into(),
    ];
    let op = Operator::start(&sim, cfg);
    let addr = op.http_addr(Duration::from_secs(60));
    let http = reqwest::Client::new();
    let end = Instant::now() + Duration::from_secs(60);
    while readyz(&http, &addr).await.0 != 200 {
        assert!(
            Instant::now() < end,
            "never led under the chart's RBAC:\n{}",
            op.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = Api::<Lease>::namespaced(client.clone(), SA_NAMESPACE)
        .get(&fullname)
        .await
        .expect("the release's Lease");
    assert!(
        is_identity_of(
            &lease.spec.and_then(|s| s.holder_identity),
            op.pid().expect("running")
        ),
        "{}",
        op.tail()
    );

    let name = format!("le-rbac-{suffix}");
    let di = device_isolation(&name, &machines[0], false, Some("rbac test"));
    create(&client, SA_NAMESPACE, &di).await;
    wait_ready(&client, SA_NAMESPACE, &name, &op).await;
    assert_eq!(sim.ground_truth(&machines[0]).await["isolated"], false);
    // A few renewals later, still no refusal from the API server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = op.output();
    let refused: Vec<&str> = out
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("lease") && l.contains("forbidden")
        })
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
}
