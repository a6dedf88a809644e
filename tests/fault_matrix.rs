//! The fault matrix: one test per fault, each with the same checks.
//!
//! Every scenario runs the real operator binary against a real kube-apiserver and `mde-sim`
//! (`--duplicate-mode allow`, so a blind re-POST would create a second action instead of being
//! refused), switches a fault on at run time (`POST /sim/faults`, `/sim/settings`, or a process
//! restart), keeps it for a while, switches it off, and then asserts:
//!
//! - every resource ends Ready for its generation and every device is in its desired state
//!   (the simulator's ground truth);
//! - every machine received exactly one action (no duplicate from a retry);
//! - the operator never panicked;
//! - while the fault lasted the conditions told the truth: a monitor samples every resource and
//!   the ground truth several times a second, and fails on any Ready=True whose device is not in
//!   the desired state and on any Stalled (a transient fault must never need a person); the
//!   reasons it saw are printed, and each scenario names the reasons its fault must produce.
//!
//! Faults: bursts of 500s, latency beyond the client timeout, applied-but-response-lost,
//! dropped connections, a 429 storm with the simulator's quota far below the operator's budget
//! (the operator must pause, not hammer), the token endpoint down while short-lived tokens
//! expire, the kube-apiserver restarted (a private control plane behind a small proxy), and a
//! concurrent writer patching annotations and status.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Response, StatusCode};
use chrono::{DateTime, Utc};
use common::cluster::{client_from, cluster};
use common::http::{serve_loopback, split};
use common::operator::{
    Operator, OperatorConfig, SeedMachine, condition, create, device_isolation, machine_id,
    seed_file,
};
use common::sim::Sim;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use mde_isolation_operator::crd::DeviceIsolation;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Simulated clock speed: an online device finishes an action in one real second.
const SCALE: &str = "60";
/// Resources per scenario (half released, half isolated).
const N: usize = 40;
/// Reasons a resource may show while it is not Ready and a transient fault lasts.
const TRANSIENT_REASONS: &[&str] = &[
    "ActionRequested",
    "ActionPending",
    "WaitingForMdeView",
    "WaitingForQuota",
    "RateLimited",
    "OutcomeUnknown",
    "TransientError",
    "WaitingForOpenAction",
];

/// One resource of a scenario.
#[derive(Clone, Debug)]
struct Res {
    name: String,
    machine: String,
    isolated: bool,
}

/// A scenario's simulator, operator and resources.
struct Scenario {
    name: &'static str,
    ns: String,
    client: kube::Client,
    api: Api<DeviceIsolation>,
    sim: Arc<Sim>,
    op: Operator,
    resources: Vec<Res>,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl Scenario {
    /// Starts a simulator with `N` online machines and the operator, in a fresh namespace of the
    /// shared test cluster.
    async fn start(name: &'static str, sim_extra: &[&str], op_extra: &[&str]) -> Scenario {
        let c = cluster();
        c.install_crds().await;
        let ns = c.namespace(name).await;
        let client = c.client().await;
        Self::start_in(name, &c.kubeconfig, client, ns, sim_extra, op_extra, None)
    }

    /// Like [`Scenario::start`], against any cluster.
    fn start_in(
        name: &'static str,
        kubeconfig: &Path,
        client: kube::Client,
        ns: String,
        sim_extra: &[&str],
        op_extra: &[&str],
        api_url: Option<&str>,
    ) -> Scenario {
        let started = Instant::now();
        let resources: Vec<Res> = (0..N)
            .map(|i| Res {
                name: format!("d{i:02}"),
                machine: machine_id(0xf000 + i as u32),
                // Even ones start isolated and are released; odd ones are isolated.
                isolated: i % 2 == 1,
            })
            .collect();
        let names: Vec<String> = (0..N).map(|i| format!("f-{i:02}.contoso.local")).collect();
        let seed: Vec<SeedMachine<'_>> = resources
            .iter()
            .zip(&names)
            .map(|(r, n)| SeedMachine {
                id: &r.machine,
                name: n,
                behaviour: "online",
                isolated: !r.isolated,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let seed = seed_file(dir.path(), &seed);
        let mut args = vec![
            "--seed",
            seed.to_str().unwrap(),
            "--time-scale",
            SCALE,
            "--duplicate-mode",
            "allow",
            "--rng-seed",
            "11",
        ];
        args.extend_from_slice(sim_extra);
        let sim = Arc::new(Sim::start(&args));
        let mut cfg = OperatorConfig::new(kubeconfig, &ns);
        cfg.extra = op_extra.iter().map(|s| s.to_string()).collect();
        let op = match api_url {
            Some(url) => Operator::start_with_api_url(&sim, cfg, url),
            None => Operator::start(&sim, cfg),
        };
        let api = Api::namespaced(client.clone(), &ns);
        Scenario {
            name,
            ns,
            client,
            api,
            sim,
            op,
            resources,
            started,
            _dir: dir,
        }
    }

    /// Creates the resources `range` (indexes into `resources`).
    async fn create(&self, range: std::ops::Range<usize>) {
        for r in &self.resources[range] {
            create(
                &self.client,
                &self.ns,
                &device_isolation(&r.name, &r.machine, r.isolated, Some("fault matrix")),
            )
            .await;
        }
    }

    async fn faults(&self, body: Value) {
        self.sim.admin_post("faults", body).await;
    }

    /// Starts sampling conditions against ground truth.
    fn monitor(&self) -> Monitor {
        Monitor::start(self.api.clone(), self.sim.clone(), &self.resources)
    }

    /// Waits until every resource is Ready, then checks ground truth, action counts, the
    /// monitor's findings and the operator's output, and prints the scenario's figures.
    /// `expected` are reasons of which at least one must have been seen while the fault lasted.
    async fn finish(&self, monitor: Monitor, expected: &[&str]) -> Report {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let list = self.api.list(&ListParams::default()).await;
            if let Ok(list) = list {
                let ready = list
                    .items
                    .iter()
                    .filter(|d| ready_for_generation(d))
                    .count();
                if list.items.len() == self.resources.len() && ready == list.items.len() {
                    break;
                }
                if Instant::now() > deadline {
                    let stuck: Vec<String> = list
                        .items
                        .iter()
                        .filter(|d| !ready_for_generation(d))
                        .take(5)
                        .map(|d| format!("{:?}", d.status))
                        .collect();
                    panic!(
                        "{}: {ready}/{} Ready; e.g. {stuck:#?}\noperator log tail:\n{}",
                        self.name,
                        self.resources.len(),
                        self.op.tail()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let seen = monitor.stop().await;

        let truth = machines_by_id(&self.sim).await;
        let actions: Vec<Value> = self.sim.admin_get("actions").await["value"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut per_machine: HashMap<String, usize> = HashMap::new();
        for a in &actions {
            *per_machine
                .entry(a["machineId"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        let wrong_state: Vec<String> = self
            .resources
            .iter()
            .filter(|r| truth[&r.machine]["isolated"] != json!(r.isolated))
            .map(|r| format!("{}: {}", r.name, truth[&r.machine]))
            .collect();
        let wrong_count: Vec<String> = self
            .resources
            .iter()
            .filter(|r| per_machine.get(&r.machine).copied().unwrap_or(0) != 1)
            .map(|r| {
                let mine: Vec<String> = actions
                    .iter()
                    .filter(|a| a["machineId"] == r.machine.as_str())
                    .map(|a| format!("{} {} {}", a["type"], a["status"], a["requestorComment"]))
                    .collect();
                format!("{}: {mine:?}", r.name)
            })
            .collect();
        let calls = self.sim.admin_calls().await;
        let report = Report::from_calls(&calls, actions.len(), self.resources.len());
        let output = self.op.output();
        eprintln!(
            "[{}] {} actions created, {} expected; faults injected {:?}; 429s {}; 401s {}; \
             token calls {} ({} failed); API calls {}; reasons while the fault lasted {:?}; \
             all reasons {:?}; {} samples; run time {:?}",
            self.name,
            report.actions,
            report.expected,
            report.faults,
            report.throttled,
            report.unauthorized,
            report.token_calls,
            report.token_failures,
            report.api_calls,
            seen.during_fault,
            seen.all,
            seen.samples,
            self.started.elapsed()
        );
        assert!(
            seen.violations.is_empty(),
            "{}: untruthful or stalled conditions: {:#?}",
            self.name,
            &seen.violations[..seen.violations.len().min(10)]
        );
        assert!(
            wrong_state.is_empty(),
            "{}: devices not in the desired state: {wrong_state:#?}",
            self.name
        );
        assert!(
            wrong_count.is_empty(),
            "{}: machines without exactly one action: {wrong_count:#?}",
            self.name
        );
        assert!(
            !output.contains("panicked"),
            "{}: the operator panicked:\n{}",
            self.name,
            self.op.tail()
        );
        if !expected.is_empty() {
            assert!(
                expected
                    .iter()
                    .any(|r| seen.during_fault.contains_key(&format!("Reconciling/{r}"))),
                "{}: none of {expected:?} was reported while the fault lasted; saw {:?}",
                self.name,
                seen.during_fault
            );
        }
        report
    }
}

/// What the simulator saw during a scenario.
#[derive(Debug, Default)]
struct Report {
    actions: usize,
    expected: usize,
    /// Injected faults by `api/kind`.
    faults: BTreeMap<String, usize>,
    throttled: usize,
    unauthorized: usize,
    token_calls: usize,
    token_failures: usize,
    api_calls: usize,
}

impl Report {
    fn from_calls(calls: &[Value], actions: usize, expected: usize) -> Report {
        let mut r = Report {
            actions,
            expected,
            ..Report::default()
        };
        for c in calls {
            let api = c["api"].as_str().unwrap_or("?");
            if let Some(kind) = c["fault"].as_str() {
                *r.faults.entry(format!("{api}/{kind}")).or_default() += 1;
            }
            if api == "token" {
                r.token_calls += 1;
                if c["status"] != 200 {
                    r.token_failures += 1;
                }
                continue;
            }
            r.api_calls += 1;
            match c["status"].as_u64() {
                Some(429) => r.throttled += 1,
                Some(401) => r.unauthorized += 1,
                _ => {}
            }
        }
        r
    }

    fn injected(&self) -> usize {
        self.faults.values().sum()
    }
}

/// Log lines of MDE calls whose outcome the operator classified as ambiguous (a POST that may
/// or may not have been applied).
fn ambiguous_outcomes(op: &Operator) -> usize {
    op.output()
        .lines()
        .filter(|l| l.contains("MDE call failed") && l.contains("ambiguous"))
        .count()
}

/// Ready=True for the resource's current generation.
fn ready_for_generation(d: &DeviceIsolation) -> bool {
    condition(d, "Ready").is_some_and(|c| c.0 == "True")
        && d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
}

/// The simulator's ground truth of every machine, by id.
async fn machines_by_id(sim: &Sim) -> HashMap<String, Value> {
    sim.admin_get("machines").await["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or_default().to_string(), m.clone()))
        .collect()
}

/// What the monitor saw.
#[derive(Debug, Default)]
struct Seen {
    /// `Kind/Reason` → samples, while the fault flag was up.
    during_fault: BTreeMap<String, usize>,
    /// `Kind/Reason` → samples, over the whole run.
    all: BTreeMap<String, usize>,
    violations: Vec<String>,
    samples: usize,
}

/// Samples every resource and the ground truth a few times a second.
struct Monitor {
    stop: Arc<AtomicBool>,
    /// Raised while the fault lasts.
    fault: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Seen>,
}

impl Monitor {
    fn start(api: Api<DeviceIsolation>, sim: Arc<Sim>, resources: &[Res]) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(AtomicBool::new(false));
        let desired: HashMap<String, Res> = resources
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        let handle = tokio::spawn({
            let (stop, fault) = (stop.clone(), fault.clone());
            async move {
                let mut seen = Seen::default();
                while !stop.load(Ordering::SeqCst) {
                    let during = fault.load(Ordering::SeqCst);
                    // Resources first, then ground truth: a device that was in the desired state
                    // when a resource said Ready is still in it afterwards (one action each).
                    if let Ok(list) = api.list(&ListParams::default()).await {
                        let truth = machines_by_id(&sim).await;
                        seen.samples += 1;
                        for d in &list.items {
                            let name = d.metadata.name.clone().unwrap_or_default();
                            let Some(r) = desired.get(&name) else {
                                continue;
                            };
                            let key = if ready_for_generation(d) {
                                let reason = condition(d, "Ready").map(|c| c.1).unwrap_or_default();
                                if truth[&r.machine]["isolated"] != json!(r.isolated) {
                                    seen.violations.push(format!(
                                        "{name} Ready ({reason}) while the device is {}",
                                        truth[&r.machine]
                                    ));
                                }
                                format!("Ready/{reason}")
                            } else if let Some((_, reason, message)) =
                                condition(d, "Stalled").filter(|c| c.0 == "True")
                            {
                                seen.violations
                                    .push(format!("{name} Stalled {reason}: {message}"));
                                format!("Stalled/{reason}")
                            } else if let Some((_, reason, message)) =
                                condition(d, "Reconciling").filter(|c| c.0 == "True")
                            {
                                if !TRANSIENT_REASONS.contains(&reason.as_str()) {
                                    seen.violations
                                        .push(format!("{name} Reconciling {reason}: {message}"));
                                }
                                format!("Reconciling/{reason}")
                            } else {
                                "NoStatusYet".to_string()
                            };
                            *seen.all.entry(key.clone()).or_default() += 1;
                            if during {
                                *seen.during_fault.entry(key).or_default() += 1;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                seen
            }
        });
        Monitor {
            stop,
            fault,
            handle,
        }
    }

    fn fault(&self, on: bool) {
        self.fault.store(on, Ordering::SeqCst);
    }

    async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("monitor task")
    }
}

// ---------------------------------------------------------------------------------------------
// MDE-side faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_500s() {
    let s = Scenario::start("bursts-500", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    // Three bursts: 60 % of API calls answer 500 for two seconds, then a short calm.
    s.faults(json!({"fault5xxRate": 0.6})).await;
    s.create(0..N).await;
    for _ in 0..3 {
        s.faults(json!({"fault5xxRate": 0.6})).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.faults(json!({"fault5xxRate": 0.0})).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    m.fault(false);
    let r = s.finish(m, &["TransientError", "OutcomeUnknown"]).await;
    assert!(r.injected() > 0, "no 500 was injected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_beyond_the_client_timeout() {
    // The operator gives up on a request after one second; the simulator answers after two.
    let s = Scenario::start("timeouts", &[], &["--request-timeout-seconds", "1"]).await;
    let m = s.monitor();
    m.fault(true);
    // First every call is slow, reads too: the operator cannot even load its view of MDE.
    s.faults(json!({"latencyMs": 2000})).await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Then only the POSTs are slow: each one times out after it was sent.
    s.faults(json!({"latencyMs": 2000, "apis": ["isolate", "unisolate"]}))
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"latencyMs": 0, "apis": null})).await;
    m.fault(false);
    let r = s.finish(m, &["OutcomeUnknown", "TransientError"]).await;
    let calls = s.sim.admin_calls().await;
    let posts = calls
        .iter()
        .filter(|c| c["api"] == "isolate" || c["api"] == "unisolate")
        .count();
    let timed_out = s.op.output().matches("timed out").count();
    eprintln!(
        "[timeouts] POSTs received by the simulator: {posts} for {} actions; operator log lines \
         saying 'timed out': {timed_out}",
        r.actions
    );
    assert!(timed_out > 0, "no request timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_but_response_lost() {
    let s = Scenario::start("lost-response", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.faults(json!({"lostResponseRate": 0.5})).await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"lostResponseRate": 0.0})).await;
    m.fault(false);
    // The OutcomeUnknown phase is usually resolved by a lookup within the same reconcile, so a
    // sampler rarely sees it; the operator's log shows each ambiguous outcome.
    let r = s.finish(m, &[]).await;
    let lost_posts = ["isolate", "unisolate"]
        .iter()
        .map(|a| {
            r.faults
                .get(&format!("{a}/lost-response"))
                .copied()
                .unwrap_or(0)
        })
        .sum::<usize>();
    let ambiguous = ambiguous_outcomes(&s.op);
    eprintln!(
        "[lost-response] {lost_posts} POSTs applied with their response lost; {ambiguous} \
         ambiguous outcomes in the operator log; {} actions for {} resources",
        r.actions, r.expected
    );
    assert!(lost_posts > 0, "no POST lost its response: {:?}", r.faults);
    assert!(
        ambiguous > 0,
        "the operator never reported an ambiguous outcome"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_drops() {
    let s = Scenario::start("drops", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.faults(json!({"dropRate": 0.5})).await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"dropRate": 0.0})).await;
    m.fault(false);
    let r = s.finish(m, &["TransientError", "OutcomeUnknown"]).await;
    eprintln!(
        "[drops] {} ambiguous outcomes in the operator log",
        ambiguous_outcomes(&s.op)
    );
    assert!(r.injected() > 0, "no connection was dropped");
}

/// 429s per throttling episode of one API: an episode starts with a 429 at simulated time `t`
/// and lasts the `Retry-After` the simulator gave it (recomputed from the call log: until the
/// oldest counted call of the window leaves it). A client that pauses as told gets 429s in an
/// episode only for calls already in flight when it learned of the first one.
fn throttle_episodes(calls: &[Value], api: &str, per_minute: usize) -> Vec<usize> {
    let time = |c: &Value| {
        c["simTime"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let mine: Vec<(DateTime<Utc>, bool, bool)> = calls
        .iter()
        .filter(|c| c["api"] == api)
        .filter_map(|c| Some((time(c)?, c["status"] == 429, c["counted"] == true)))
        .collect();
    let mut episodes = Vec::new();
    let mut end: Option<DateTime<Utc>> = None;
    for (i, &(t, throttled, _)) in mine.iter().enumerate() {
        if !throttled {
            continue;
        }
        if end.is_some_and(|e| t < e) {
            *episodes.last_mut().unwrap() += 1;
            continue;
        }
        // Retry-After: when the oldest of the last `per_minute` counted calls leaves the window.
        let counted: Vec<DateTime<Utc>> = mine[..i]
            .iter()
            .filter(|c| c.2 && c.0 > t - chrono::Duration::seconds(60))
            .map(|c| c.0)
            .collect();
        let oldest = counted
            .len()
            .checked_sub(per_minute)
            .map(|k| counted[k])
            .unwrap_or(t);
        let retry_after =
            (oldest + chrono::Duration::seconds(60) - t).max(chrono::Duration::seconds(1));
        end = Some(t + retry_after);
        episodes.push(1);
    }
    episodes
}

/// The 429 storm with the checks every fault gets: all converge, one action per machine, no
/// panic, and a truthful condition (RateLimited seen) while it lasts. How many 429s each pause
/// ends with is the stricter test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_converges_with_truthful_conditions() {
    let s = Scenario::start("storm-429-converge", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": 5}))
        .await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": 100}))
        .await;
    m.fault(false);
    let r = s.finish(m, &["RateLimited"]).await;
    assert!(r.throttled > 0, "the storm produced no 429");
}

#[ignore = "BUG: when MDE's real limit is below the budget (other SOC tools share it), each Retry-After pause ends in a burst of 429s (4-13 per episode): the gate returns to the full budget after one probe; needs an adaptive budget (see the stop-8 note)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_pauses_instead_of_hammering() {
    // The operator's budget is MDE's full 100/min, but the simulator admits only 5 calls a
    // minute per API: every API is throttled with real 429s and Retry-After.
    const PER_MINUTE: usize = 5;
    let s = Scenario::start("storm-429", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": PER_MINUTE}))
        .await;
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    s.sim
        .admin_post("settings", json!({"quotaPerMinute": 100}))
        .await;
    m.fault(false);
    let r = s.finish(m, &["RateLimited"]).await;
    let calls = s.sim.admin_calls().await;
    let mut worst = Vec::new();
    for api in [
        "isolate",
        "unisolate",
        "machineactions-list",
        "machineactions-get",
    ] {
        let episodes = throttle_episodes(&calls, api, PER_MINUTE);
        eprintln!(
            "[storm-429] {api}: {} 429s in {} episodes: {episodes:?}",
            episodes.iter().sum::<usize>(),
            episodes.len()
        );
        // The first episode holds the calls sent before the operator could know that MDE's
        // limit is below its budget; after that it knows, and a handful per episode is the most
        // that in-flight calls explain.
        if let Some(&max) = episodes.iter().skip(1).max()
            && max > 5
        {
            worst.push(format!("{api}: {episodes:?}"));
        }
    }
    assert!(r.throttled > 0, "the storm produced no 429");
    assert!(
        worst.is_empty(),
        "after the first 429 the operator kept sending calls that MDE throttled: {worst:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_while_tokens_expire() {
    // Tokens live 120 simulated seconds (2 s real): several expire during the outage.
    let s = Scenario::start("token", &["--token-lifetime", "120"], &[]).await;
    let m = s.monitor();
    s.create(0..N / 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    m.fault(true);
    // Every token request answers 500 (the /api calls themselves are not faulted).
    s.faults(json!({"fault5xxRate": 1.0, "apis": ["token"]}))
        .await;
    // Past the cached token's refresh time (1 s) and expiry (2 s) before the second half
    // needs one for its POSTs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.create(N / 2..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.faults(json!({"fault5xxRate": 0.0, "apis": null})).await;
    m.fault(false);
    let r = s.finish(m, &["TransientError"]).await;
    assert!(r.token_failures > 0, "the token endpoint never failed");
    assert!(
        r.token_calls - r.token_failures >= 3,
        "tokens were not refreshed as they expired: {r:?}"
    );
}

/// Token requests answered 500 by the simulator, i.e. made while the endpoint was down.
fn failed_token_requests(calls: &[Value]) -> usize {
    calls
        .iter()
        .filter(|c| c["api"] == "token" && c["fault"] == "5xx")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_outage_is_not_hammered() {
    const OUTAGE: Duration = Duration::from_millis(8500);
    let s = Scenario::start("token-hammer", &["--token-lifetime", "120"], &[]).await;
    let m = s.monitor();
    s.create(0..N / 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.faults(json!({"fault5xxRate": 1.0, "apis": ["token"]}))
        .await;
    // The cached token reaches its refresh time (1 s) and expires (2 s); then 20 resources
    // need a token for their POSTs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.create(N / 2..N).await;
    tokio::time::sleep(OUTAGE - Duration::from_millis(2500)).await;
    s.faults(json!({"fault5xxRate": 0.0, "apis": null})).await;
    let failed = failed_token_requests(&s.sim.admin_calls().await);
    s.finish(m, &[]).await;
    // A transient failure is retried after 10 s (scaled: 1/6 s here). One token request per
    // retry interval for the whole process is 51 in 8.5 seconds; allow three times that.
    let bound = (OUTAGE.as_secs_f64() * 60.0 / 10.0 * 3.0) as usize;
    eprintln!("[token-hammer] {failed} token requests during a {OUTAGE:?} outage (bound {bound})");
    assert!(
        failed <= bound,
        "{failed} token requests while the token endpoint was down for {OUTAGE:?}: every waiting \
         reconcile asks again instead of sharing one back-off"
    );
}

/// A proxy in front of the simulator's API that, while `late` is up, holds every isolate and
/// unisolate POST past the client's timeout and forwards it to the simulator 1.5 s after it
/// arrived, whatever the client did meanwhile: a request that MDE applies after the client gave
/// up on it. (`mde-sim`'s own latency cannot do this: it comes before processing, and a request
/// whose client disconnected is never processed.)
struct LateApplyProxy {
    base: String,
    upstream: Arc<RwLock<String>>,
    late: Arc<AtomicBool>,
    delayed: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct LateState {
    /// The simulator's address, set once it runs.
    upstream: Arc<RwLock<String>>,
    http: reqwest::Client,
    late: Arc<AtomicBool>,
    delayed: Arc<AtomicUsize>,
}

async fn late_apply_handler(State(st): State<LateState>, req: Request) -> Response<Body> {
    let Some((parts, path, bytes)) = split(req, 16 << 20).await else {
        return Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::empty())
            .unwrap();
    };
    let url = format!("{}{path}", st.upstream.read().unwrap());
    let mut headers = reqwest::header::HeaderMap::new();
    for name in ["authorization", "content-type", "accept"] {
        if let Some(v) = parts.headers.get(name) {
            headers.insert(name, v.clone());
        }
    }
    let action_post = parts.method == axum::http::Method::POST
        && (parts.uri.path().ends_with("/isolate") || parts.uri.path().ends_with("/unisolate"));
    if action_post && st.late.load(Ordering::SeqCst) {
        st.delayed.fetch_add(1, Ordering::SeqCst);
        let http = st.http.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let _ = http.post(url).headers(headers).body(bytes).send().await;
        });
        // The client (timeout 1 s) is gone long before this answer.
        tokio::time::sleep(Duration::from_secs(5)).await;
        return Response::builder()
            .status(StatusCode::GATEWAY_TIMEOUT)
            .body(Body::empty())
            .unwrap();
    }
    let resp = match st
        .http
        .request(parts.method, url)
        .headers(headers)
        .body(bytes)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::empty())
                .unwrap();
        }
    };
    let mut out = Response::builder().status(resp.status());
    for name in ["content-type", "retry-after", "odata-version"] {
        if let Some(v) = resp.headers().get(name) {
            out = out.header(name, v);
        }
    }
    let body = resp.bytes().await.unwrap_or_default();
    out.body(Body::from(body)).unwrap()
}

impl LateApplyProxy {
    async fn start() -> LateApplyProxy {
        let late = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicUsize::new(0));
        let upstream = Arc::new(RwLock::new(String::new()));
        let state = LateState {
            upstream: upstream.clone(),
            http: reqwest::Client::new(),
            late: late.clone(),
            delayed: delayed.clone(),
        };
        let app = axum::Router::new()
            .fallback(late_apply_handler)
            .with_state(state);
        let addr = serve_loopback(app).await;
        LateApplyProxy {
            base: format!("http://{addr}/"),
            upstream,
            late,
            delayed,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_applied_after_the_client_gave_up() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("late-apply").await;
    let client = c.client().await;
    // The operator reaches the API through the proxy (tokens come from the simulator directly);
    // the proxy learns the simulator's address once it runs.
    let proxy = LateApplyProxy::start().await;
    let s = Scenario::start_in(
        "late-apply",
        &c.kubeconfig,
        client,
        ns,
        &[],
        &["--request-timeout-seconds", "1"],
        Some(&proxy.base),
    );
    *proxy.upstream.write().unwrap() = s.sim.base_url.clone();
    let m = s.monitor();
    m.fault(true);
    proxy.late.store(true, Ordering::SeqCst);
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.late.store(false, Ordering::SeqCst);
    m.fault(false);
    let delayed = proxy.delayed.load(Ordering::SeqCst);
    // What the simulator saw for the first machine with more than one action, if any (real
    // times, so that the order of the late POSTs and the operator's lookup shows).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let actions = s.sim.admin_get("actions").await["value"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let first = s
        .resources
        .iter()
        .map(|r| &r.machine)
        .find(|m| {
            actions
                .iter()
                .filter(|a| a["machineId"] == m.as_str())
                .count()
                > 1
        })
        .unwrap_or(&s.resources[0].machine);
    for c in s.sim.admin_calls().await.iter().filter(|c| {
        c["path"].as_str().unwrap_or("").contains(first.as_str())
            || c["query"].as_str().unwrap_or("").contains(first.as_str())
    }) {
        eprintln!(
            "[late-apply] {} {} {} {} -> {} {}",
            c["realTime"].as_str().unwrap_or(""),
            c["method"].as_str().unwrap_or(""),
            c["api"].as_str().unwrap_or(""),
            c["path"].as_str().unwrap_or(""),
            c["status"],
            c["actionId"].as_str().unwrap_or("")
        );
    }
    eprintln!(
        "[late-apply] {delayed} POSTs applied 1.5 s after they were sent (client timeout 1 s)"
    );
    assert!(delayed > 0, "no POST was delayed");
    s.finish(m, &["OutcomeUnknown", "TransientError"]).await;
}

/// The README: `Forbidden` "names the missing permission (`Machine.Isolate` to act,
/// `Machine.Read.All` to read)". An app that may isolate but not read never gets there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_read_permission_stalls_as_forbidden() {
    let s = Scenario::start("no-read", &["--app-roles", "Machine.Isolate"], &[]).await;
    s.create(0..2).await;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let d = s.api.get("d00").await.expect("d00");
        if let Some((_, reason, message)) = condition(&d, "Stalled").filter(|c| c.0 == "True") {
            assert_eq!(reason, "Forbidden", "{message}");
            assert!(message.contains("Machine.Read.All"), "{message}");
            return;
        }
        assert!(
            Instant::now() < end,
            "d00 never stalled; conditions {:?}\noperator log tail:\n{}",
            d.status.map(|s| s.conditions),
            s.op.tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes-side faults
// ---------------------------------------------------------------------------------------------

/// A private control plane (its own data directory and port), restartable.
struct PrivateControlPlane {
    binary: PathBuf,
    data_dir: tempfile::TempDir,
    port: u16,
    child: Option<(Child, ChildStdin)>,
}

impl PrivateControlPlane {
    fn start() -> PrivateControlPlane {
        // The shared harness is built (or found in the cache) by the first `cluster()` call;
        // the script prints the binary's path last.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-control-plane.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run build-control-plane.sh");
        assert!(out.status.success(), "build-control-plane.sh failed");
        let binary = PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .trim(),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut cp = PrivateControlPlane {
            binary,
            data_dir: tempfile::tempdir().unwrap(),
            port,
            child: None,
        };
        cp.spawn();
        cp
    }

    fn kubeconfig(&self) -> PathBuf {
        self.data_dir.path().join("kubeconfig")
    }

    /// Starts the harness on the data directory and port and waits for its READY line.
    fn spawn(&mut self) {
        let mut child = Command::new(&self.binary)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kube-control-plane");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("READY ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(240)).is_err() {
            let _ = child.kill();
            panic!("private kube-control-plane did not become ready");
        }
        self.child = Some((child, stdin));
    }

    /// SIGTERM, wait for the exit, start again on the same data directory and port.
    fn restart(&mut self) {
        if let Some((mut child, stdin)) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(60);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            drop(stdin);
        }
        self.spawn();
    }
}

impl Drop for PrivateControlPlane {
    fn drop(&mut self) {
        if let Some((mut child, _stdin)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where the proxy forwards, and with which credentials.
#[derive(Clone)]
struct Upstream {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Upstream {
    /// Reads the harness's kubeconfig (server, CA, bearer token).
    async fn from_kubeconfig(path: &Path) -> Upstream {
        let text = std::fs::read_to_string(path).expect("kubeconfig");
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig yaml");
        let token = yaml["users"][0]["user"]["token"]
            .as_str()
            .expect("token in kubeconfig")
            .to_string();
        let kc = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kubeconfig");
        let mut http = reqwest::Client::builder().use_rustls_tls();
        for der in cfg.root_cert.unwrap_or_default() {
            http = http.add_root_certificate(reqwest::Certificate::from_der(&der).unwrap());
        }
        Upstream {
            base: cfg
                .cluster_url
                .to_string()
                .trim_end_matches('/')
                .to_string(),
            token,
            http: http.build().unwrap(),
        }
    }
}

/// A plain-HTTP reverse proxy in front of the private API server, like `kubectl proxy`: it
/// adds the current credentials, so clients keep one kubeconfig across restarts although the
/// harness issues a fresh CA and token on every start. Watches are streamed through; when the
/// server goes away, open connections break and new ones get 503 until it is back.
struct KubeProxy {
    upstream: Arc<RwLock<Upstream>>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

async fn proxy_handler(State(up): State<Arc<RwLock<Upstream>>>, req: Request) -> Response<Body> {
    let up = up.read().unwrap().clone();
    let unavailable = |why: String| {
        Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": why, "reason": "ServiceUnavailable", "code": 503})
                .to_string(),
            ))
            .unwrap()
    };
    let Some((parts, path, bytes)) = split(req, 64 << 20).await else {
        return unavailable("request body".into());
    };
    let mut rb = up
        .http
        .request(parts.method, format!("{}{path}", up.base))
        .bearer_auth(&up.token)
        .body(bytes);
    for (k, v) in &parts.headers {
        if !matches!(
            k.as_str(),
            "host" | "authorization" | "content-length" | "connection" | "transfer-encoding"
        ) {
            rb = rb.header(k, v);
        }
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return unavailable(format!("upstream: {e}")),
    };
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if !matches!(
            k.as_str(),
            "content-length" | "connection" | "transfer-encoding"
        ) {
            out = out.header(k, v);
        }
    }
    let stream = futures::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match resp.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(resp))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    out.body(Body::from_stream(stream)).unwrap()
}

impl KubeProxy {
    async fn start(upstream: Upstream) -> KubeProxy {
        let upstream = Arc::new(RwLock::new(upstream));
        let app = axum::Router::new()
            .fallback(proxy_handler)
            .with_state(upstream.clone());
        let addr = serve_loopback(app).await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: http://{addr}\n\
                 users:\n- name: proxy\n  user: {{}}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: proxy\n\
                 current-context: proxy\n"
            ),
        )
        .unwrap();
        KubeProxy {
            upstream,
            kubeconfig,
            _dir: dir,
        }
    }

    fn point_to(&self, upstream: Upstream) {
        *self.upstream.write().unwrap() = upstream;
    }
}

/// Applies the DeviceIsolation CRD to a cluster and waits until it is Established.
async fn install_crd(client: &kube::Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DeviceIsolation::crd();
    let name = crd.metadata.name.clone().unwrap();
    api.patch(
        &name,
        &PatchParams::apply("fault-matrix").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    let established = kube::runtime::wait::await_condition(
        api,
        &name,
        kube::runtime::wait::conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(60), established)
        .await
        .expect("CRD established in time")
        .expect("CRD established");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_restarted_mid_run() {
    // Make sure the harness binary exists (the shared cluster builds it), then run our own.
    let _ = cluster();
    let mut cp = PrivateControlPlane::start();
    let proxy = KubeProxy::start(Upstream::from_kubeconfig(&cp.kubeconfig()).await).await;
    let client = client_from(&proxy.kubeconfig).await;
    install_crd(&client).await;
    let ns = "apiserver-restart".to_string();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
    let s = Scenario::start_in(
        "apiserver-restart",
        &proxy.kubeconfig,
        client.clone(),
        ns,
        &[],
        &[],
        None,
    );
    let m = s.monitor();
    s.create(0..N / 2).await;
    // Some actions are requested, some recorded, some still open when the server goes away.
    tokio::time::sleep(Duration::from_millis(700)).await;
    m.fault(true);
    let down = Instant::now();
    cp.restart();
    proxy.point_to(Upstream::from_kubeconfig(&cp.kubeconfig()).await);
    let downtime = down.elapsed();
    // New resources while the operator's watches reconnect.
    s.create(N / 2..N).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    m.fault(false);
    let r = s.finish(m, &[]).await;
    eprintln!(
        "[apiserver-restart] API server down for {downtime:?} (restart on the same data directory \
         and port); {} actions for {} resources",
        r.actions, r.expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writer_patches_annotations_and_status() {
    let s = Scenario::start("concurrent-writer", &[], &[]).await;
    let m = s.monitor();
    m.fault(true);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let names: Vec<String> = s.resources.iter().map(|r| r.name.clone()).collect();
    // Three writers at once, for the whole time the operator works:
    // - annotation pokes (merge patches, no precondition): every one is a new resourceVersion
    //   and a watch event;
    // - optimistic status writers: read, wait a little, write the status back with the
    //   resourceVersion they read (a 409 Conflict when the operator wrote in between);
    // - a careless status writer that merge-patches stale status copies (up to a second old)
    //   without any precondition: lost updates the operator must repair.
    let mut writers = Vec::new();
    for kind in ["annotate", "optimistic", "stale"] {
        let (api, stop, counts, names) =
            (s.api.clone(), stop.clone(), counts.clone(), names.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(match kind {
                "annotate" => 1,
                "optimistic" => 2,
                _ => 3,
            });
            let mut snapshots: HashMap<String, (Instant, Value)> = HashMap::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let name = &names[rng.random_range(0..names.len())];
                let outcome = match kind {
                    "annotate" => api
                        .patch(
                            name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"metadata": {"annotations": {"test.mde.dev/poke": n.to_string()}}})),
                        )
                        .await
                        .map(|_| "annotation patched"),
                    "optimistic" => match api.get_status(name).await {
                        Ok(obj) => {
                            tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
                            api.replace_status(name, &PostParams::default(), &obj)
                                .await
                                .map(|_| "status written back")
                        }
                        Err(e) => Err(e),
                    },
                    _ => {
                        let now = Instant::now();
                        let stale = snapshots
                            .get(name)
                            .filter(|(at, _)| now.duration_since(*at) > Duration::from_millis(300))
                            .map(|(_, v)| v.clone());
                        match stale {
                            Some(status) => {
                                snapshots.remove(name);
                                api.patch_status(
                                    name,
                                    &PatchParams::default(),
                                    &Patch::Merge(json!({"status": status})),
                                )
                                .await
                                .map(|_| "stale status restored")
                            }
                            None => match api.get_status(name).await {
                                Ok(obj) => {
                                    // Every status field, with null for the absent ones, so
                                    // that the merge patch really restores the old copy.
                                    let mut status = json!({"observedGeneration": null,
                                        "isolated": null, "action": null, "intent": null,
                                        "requests": null, "failedAttempts": null,
                                        "nextAttemptAt": null, "lastHandledRetry": null,
                                        "conditions": null});
                                    if let Ok(Value::Object(cur)) = serde_json::to_value(&obj.status)
                                    {
                                        for (k, v) in cur {
                                            status[k] = v;
                                        }
                                    }
                                    snapshots.entry(name.clone()).or_insert((now, status));
                                    Ok("snapshot taken")
                                }
                                Err(e) => Err(e),
                            },
                        }
                    }
                };
                let key = match outcome {
                    Ok(what) => what,
                    Err(kube::Error::Api(e)) if e.code == 409 => "409 conflict",
                    Err(_) => "other error",
                };
                *counts.lock().unwrap().entry(key).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(if kind == "annotate" { 10 } else { 25 }))
                    .await;
            }
        }));
    }
    s.create(0..N).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer");
    }
    m.fault(false);
    let counts = counts.lock().unwrap().clone();
    let r = s.finish(m, &[]).await;
    eprintln!("[concurrent-writer] writer outcomes {counts:?}; {r:?}");
    assert!(
        counts.get("409 conflict").copied().unwrap_or(0) > 0,
        "the optimistic writer never met a conflict: {counts:?}"
    );
}
