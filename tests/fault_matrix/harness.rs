//! The scenario harness: a simulator, the operator and resources per scenario, a monitor of what
//! the conditions claim against the ground truth while a fault lasts, and the report every
//! scenario asserts.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::cluster::cluster;
use crate::common::operator::{
    Operator, OperatorConfig, SeedMachine, condition, create, device_isolation, machine_id,
    seed_file,
};
use crate::common::sim::Sim;
use kube::api::{Api, ListParams};
use mde_isolation_operator::crd::DeviceIsolation;
use serde_json::{Value, json};

/// Simulated clock speed: an online device finishes an action in one real second.
pub(crate) const SCALE: &str = "60";
/// Resources per scenario (half released, half isolated).
pub(crate) const N: usize = 40;
/// Reasons a resource may show while it is not Ready and a transient fault lasts.
pub(crate) const TRANSIENT_REASONS: &[&str] = &[
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
pub(crate) struct Res {
    pub(crate) name: String,
    pub(crate) machine: String,
    pub(crate) isolated: bool,
}

/// A scenario's simulator, operator and resources.
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) ns: String,
    pub(crate) client: kube::Client,
    pub(crate) api: Api<DeviceIsolation>,
    pub(crate) sim: Arc<Sim>,
    pub(crate) op: Operator,
    pub(crate) resources: Vec<Res>,
    pub(crate) started: Instant,
    pub(crate) _dir: tempfile::TempDir,
}

impl Scenario {
    /// Starts a simulator with `N` online machines and the operator, in a fresh namespace of the
    /// shared test cluster.
    pub(crate) async fn start(
        name: &'static str,
        sim_extra: &[&str],
        op_extra: &[&str],
    ) -> Scenario {
        let c = cluster();
        c.install_crds().await;
        let ns = c.namespace(name).await;
        let client = c.client().await;
        Self::start_in(name, &c.kubeconfig, client, ns, sim_extra, op_extra, None)
    }

    /// Like [`Scenario::start`], against any cluster.
    pub(crate) fn start_in(
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
    pub(crate) async fn create(&self, range: std::ops::Range<usize>) {
        for r in &self.resources[range] {
            create(
                &self.client,
                &self.ns,
                &device_isolation(&r.name, &r.machine, r.isolated, Some("fault matrix")),
            )
            .await;
        }
    }

    pub(crate) async fn faults(&self, body: Value) {
        self.sim.admin_post("faults", body).await;
    }

    /// Starts sampling conditions against ground truth.
    pub(crate) fn monitor(&self) -> Monitor {
        Monitor::start(self.api.clone(), self.sim.clone(), &self.resources)
    }

    /// Waits until every resource is Ready, then checks ground truth, action counts, the
    /// monitor's findings and the operator's output, and prints the scenario's figures.
    /// `expected` are reasons of which at least one must have been seen while the fault lasted.
    pub(crate) async fn finish(&self, monitor: Monitor, expected: &[&str]) -> Report {
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
pub(crate) struct Report {
    pub(crate) actions: usize,
    pub(crate) expected: usize,
    /// Injected faults by `api/kind`.
    pub(crate) faults: BTreeMap<String, usize>,
    pub(crate) throttled: usize,
    pub(crate) unauthorized: usize,
    pub(crate) token_calls: usize,
    pub(crate) token_failures: usize,
    pub(crate) api_calls: usize,
}

impl Report {
    pub(crate) fn from_calls(calls: &[Value], actions: usize, expected: usize) -> Report {
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

    pub(crate) fn injected(&self) -> usize {
        self.faults.values().sum()
    }
}

/// Log lines of MDE calls whose outcome the operator classified as ambiguous (a POST that may
/// or may not have been applied).
pub(crate) fn ambiguous_outcomes(op: &Operator) -> usize {
    op.output()
        .lines()
        .filter(|l| l.contains("MDE call failed") && l.contains("ambiguous"))
        .count()
}

/// Ready=True for the resource's current generation.
pub(crate) fn ready_for_generation(d: &DeviceIsolation) -> bool {
    condition(d, "Ready").is_some_and(|c| c.0 == "True")
        && d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
}

/// The simulator's ground truth of every machine, by id.
pub(crate) async fn machines_by_id(sim: &Sim) -> HashMap<String, Value> {
    sim.admin_get("machines").await["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or_default().to_string(), m.clone()))
        .collect()
}

/// What the monitor saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// `Kind/Reason` → samples, while the fault flag was up.
    pub(crate) during_fault: BTreeMap<String, usize>,
    /// `Kind/Reason` → samples, over the whole run.
    pub(crate) all: BTreeMap<String, usize>,
    pub(crate) violations: Vec<String>,
    pub(crate) samples: usize,
}

/// Samples every resource and the ground truth a few times a second.
pub(crate) struct Monitor {
    pub(crate) stop: Arc<AtomicBool>,
    /// Raised while the fault lasts.
    pub(crate) fault: Arc<AtomicBool>,
    pub(crate) handle: tokio::task::JoinHandle<Seen>,
}

impl Monitor {
    pub(crate) fn start(api: Api<DeviceIsolation>, sim: Arc<Sim>, resources: &[Res]) -> Monitor {
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

    pub(crate) fn fault(&self, on: bool) {
        self.fault.store(on, Ordering::SeqCst);
    }

    pub(crate) async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("monitor task")
    }
}
