//! Runs the real `mde-isolation-operator` binary against a test cluster and an `mde-sim`, and
//! small helpers to create DeviceIsolations and wait for their conditions.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mde_isolation_operator::crd::{
    COMMENT_ANNOTATION, DeviceIsolation, DeviceIsolationSpec, DriftPolicy,
};
use mde_isolation_operator::mde::model::IsolationType;

use super::sim::Sim;

/// Client secret of the simulator's default app.
pub const SIM_SECRET: &str = "mde-sim-secret";

/// A running operator process; killed on drop.
pub struct Operator {
    child: Option<Child>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    /// Length of the log when the running process was started: its own output follows.
    spawned_at: usize,
    _dir: tempfile::TempDir,
}

/// How to start an operator.
pub struct OperatorConfig<'a> {
    /// Admin (or service-account) kubeconfig.
    pub kubeconfig: &'a Path,
    /// Namespaces to watch.
    pub namespaces: Vec<String>,
    /// Time scale (must match the simulator's).
    pub time_scale: f64,
    /// Client id (the simulator's default app unless changed).
    pub client_id: String,
    /// Extra arguments.
    pub extra: Vec<String>,
}

impl<'a> OperatorConfig<'a> {
    /// Defaults for one namespace at time scale 60.
    pub fn new(kubeconfig: &'a Path, namespace: &str) -> Self {
        OperatorConfig {
            kubeconfig,
            namespaces: vec![namespace.to_string()],
            time_scale: 60.0,
            client_id: "mde-sim-client".into(),
            extra: vec![],
        }
    }
}

impl Operator {
    /// Starts the operator against `sim`, with the simulator's default client secret.
    pub fn start(sim: &Sim, cfg: OperatorConfig<'_>) -> Operator {
        Self::start_with_credential(sim, cfg, &[("MDE_CLIENT_SECRET", SIM_SECRET)])
    }

    /// Starts the operator against `sim` with the credential given as environment variables
    /// (e.g. `MDE_CLIENT_CERTIFICATE_FILE` and `MDE_CLIENT_KEY_FILE`, or none when it comes from
    /// flags in `cfg.extra`). `AZURE_AUTHORITY_HOST`, `AZURE_TENANT_ID` and `AZURE_CLIENT_ID`
    /// among them replace the `--authority`, `--tenant-id` and `--client-id` flags, as on a pod
    /// with Azure workload identity.
    pub fn start_with_credential(
        sim: &Sim,
        cfg: OperatorConfig<'_>,
        credential: &[(&str, &str)],
    ) -> Operator {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<String> = vec!["run".into()];
        for ns in &cfg.namespaces {
            args.extend(["--namespace".into(), ns.clone()]);
        }
        let from_env = |name: &str| credential.iter().any(|(k, _)| *k == name);
        args.extend(["--api-url".into(), format!("{}/", sim.base_url)]);
        if !from_env("AZURE_AUTHORITY_HOST") {
            args.extend(["--authority".into(), format!("{}/", sim.base_url)]);
        }
        if !from_env("AZURE_TENANT_ID") {
            args.extend(["--tenant-id".into(), "test-tenant".into()]);
        }
        if !from_env("AZURE_CLIENT_ID") {
            args.extend(["--client-id".into(), cfg.client_id.clone()]);
        }
        args.extend([
            "--time-scale".into(),
            cfg.time_scale.to_string(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
        ]);
        args.extend(cfg.extra.iter().cloned());
        let mut envs = vec![
            (
                "KUBECONFIG".to_string(),
                cfg.kubeconfig.display().to_string(),
            ),
            (
                "RUST_LOG".to_string(),
                "info,mde_isolation_operator=debug,kube=warn".to_string(),
            ),
        ];
        envs.extend(
            credential
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let log = dir.path().join("operator.log");
        let mut op = Operator {
            child: None,
            args,
            envs,
            log,
            spawned_at: 0,
            _dir: dir,
        };
        op.spawn();
        op
    }

    /// Starts the operator against `sim`, but with the MDE API reached at `api_url` (e.g. a
    /// fault-injecting proxy in front of the simulator); tokens still come from `sim`.
    pub fn start_with_api_url(sim: &Sim, cfg: OperatorConfig<'_>, api_url: &str) -> Operator {
        let mut op = Self::start(sim, cfg);
        // `start` has spawned the process already: stop it before it does anything (it is still
        // building its clients), point it elsewhere, and start it again.
        op.kill();
        if let Some(i) = op.args.iter().position(|a| a == "--api-url") {
            op.args[i + 1] = api_url.to_string();
        }
        op.spawn();
        op
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("operator log file");
        self.spawned_at = log.metadata().map_or(0, |m| m.len() as usize);
        let child = Command::new(env!("CARGO_BIN_EXE_mde-isolation-operator"))
            .args(&self.args)
            // Credentials and ids come only from the test (the operator refuses more than one);
            // removed before `envs` sets the test's own.
            .env_remove("MDE_CLIENT_SECRET")
            .env_remove("MDE_CLIENT_SECRET_FILE")
            .env_remove("MDE_CLIENT_CERTIFICATE_FILE")
            .env_remove("MDE_CLIENT_KEY_FILE")
            .env_remove("AZURE_FEDERATED_TOKEN_FILE")
            .env_remove("AZURE_CLIENT_ID")
            .env_remove("AZURE_TENANT_ID")
            .env_remove("AZURE_AUTHORITY_HOST")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("MDE_WATCH_NAMESPACES")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn mde-isolation-operator");
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts the operator again with the same settings.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Everything the operator printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of output, for failure messages.
    pub fn tail(&self) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.child.as_mut()?.try_wait().ok().flatten() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The address of the HTTP endpoint of the running process, once it logged it (a restarted
    /// process listens on a new port).
    pub fn http_addr(&self, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let out = self.output();
            if let Some(addr) = out
                .get(self.spawned_at..)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("serving /metrics"))
                .find_map(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
            {
                return addr.to_string();
            }
            assert!(
                Instant::now() < end,
                "no HTTP address logged:\n{}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A DeviceIsolation with the comment annotation.
pub fn device_isolation(
    name: &str,
    machine_id: &str,
    isolated: bool,
    comment: Option<&str>,
) -> DeviceIsolation {
    let mut di = DeviceIsolation::new(
        name,
        DeviceIsolationSpec {
            machine_id: Some(machine_id.into()),
            device_name: None,
            isolated,
            isolation_type: IsolationType::Full,
            drift_policy: DriftPolicy::Report,
            release_at: None,
            require_approval: false,
            connection_ref: None,
        },
    );
    if let Some(c) = comment {
        di.metadata.annotations = Some([(COMMENT_ANNOTATION.to_string(), c.to_string())].into());
    }
    di
}

/// Creates `di` in `ns`.
pub async fn create(client: &kube::Client, ns: &str, di: &DeviceIsolation) -> DeviceIsolation {
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), di)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating {}: {e}",
                di.metadata.name.as_deref().unwrap_or("?")
            )
        })
}

/// Server-side applies `di` in `ns` (as `kubectl apply --server-side` would).
pub async fn apply(client: &kube::Client, ns: &str, di: &DeviceIsolation) {
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), ns);
    let name = di.metadata.name.clone().expect("name");
    let mut body = serde_json::to_value(di).expect("json");
    body["apiVersion"] = "isolation.mde.dev/v1alpha1".into();
    body["kind"] = "DeviceIsolation".into();
    if let Some(o) = body.as_object_mut() {
        o.remove("status");
    }
    api.patch(
        &name,
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

/// Deletes a DeviceIsolation (no finalizer, so it goes at once).
pub async fn delete(client: &kube::Client, ns: &str, name: &str) {
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), ns);
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// The condition `type_` of a resource as (status, reason, message).
pub fn condition(di: &DeviceIsolation, type_: &str) -> Option<(String, String, String)> {
    di.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            (
                c.status.to_string(),
                c.reason.to_string(),
                c.message.to_string(),
            )
        })
}

/// Polls `name` until `pred` holds, failing with the operator's log tail after `timeout`.
pub async fn wait_for<F>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    op: &Operator,
    what: &str,
    pred: F,
) -> DeviceIsolation
where
    F: Fn(&DeviceIsolation) -> bool,
{
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), ns);
    let (api, pred) = (&api, &pred);
    let found = super::poll::poll(timeout, Duration::from_millis(100), || async move {
        match api.get(name).await {
            Ok(di) if pred(&di) => Ok(di),
            Ok(di) => Err(format!("{:#?}", di.status)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    found.unwrap_or_else(|last| {
        panic!(
            "timed out waiting for {ns}/{name} to be {what}; last status: {last}\noperator log tail:\n{}",
            op.tail()
        )
    })
}

/// Waits until Ready=True.
pub async fn wait_ready(
    client: &kube::Client,
    ns: &str,
    name: &str,
    op: &Operator,
) -> DeviceIsolation {
    wait_for(
        client,
        ns,
        name,
        Duration::from_secs(90),
        op,
        "Ready",
        |di| {
            condition(di, "Ready").is_some_and(|c| c.0 == "True")
                && di.status.as_ref().and_then(|s| s.observed_generation) == di.metadata.generation
        },
    )
    .await
}

/// Waits until Stalled=True and returns its reason and message.
pub async fn wait_stalled(
    client: &kube::Client,
    ns: &str,
    name: &str,
    op: &Operator,
) -> (String, String) {
    let di = wait_for(
        client,
        ns,
        name,
        Duration::from_secs(90),
        op,
        "Stalled",
        |di| condition(di, "Stalled").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let (_, reason, message) = condition(&di, "Stalled").expect("stalled");
    (reason, message)
}

/// Writes a simulator seed file with the given machines and returns its path inside `dir`.
pub fn seed_file(dir: &Path, machines: &[SeedMachine<'_>]) -> PathBuf {
    let mut yaml = String::from("machines:\n");
    for m in machines {
        yaml.push_str(&format!(
            "- id: {}\n  computerDnsName: {}\n  behaviour: {}\n  isolated: {}\n",
            m.id, m.name, m.behaviour, m.isolated
        ));
    }
    let path = dir.join("seed.yaml");
    std::fs::write(&path, yaml).expect("seed file");
    path
}

/// One machine of a seed file.
pub struct SeedMachine<'a> {
    /// 40 hex.
    pub id: &'a str,
    /// DNS name.
    pub name: &'a str,
    /// online | offline | failing | unsupported.
    pub behaviour: &'a str,
    /// Isolated at start.
    pub isolated: bool,
}

/// A deterministic machine id for test number `n`.
pub fn machine_id(n: u32) -> String {
    format!("{n:040x}")
}

/// `/readyz` of an operator: status and body (status 0 when it does not answer).
pub async fn readyz(http: &reqwest::Client, addr: &str) -> (u16, String) {
    match http.get(format!("http://{addr}/readyz")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Whether `/readyz` says this replica leads (a standby is ready too, and says so).
pub async fn is_leading(http: &reqwest::Client, addr: &str) -> bool {
    let (status, body) = readyz(http, addr).await;
    status == 200 && body.trim() == "ok: leader"
}

/// Waits until the replica at `addr` leads, failing after `within` with its log.
pub async fn wait_leading(http: &reqwest::Client, addr: &str, within: Duration, op: &Operator) {
    let end = Instant::now() + within;
    while !is_leading(http, addr).await {
        assert!(
            Instant::now() < end,
            "the standby did not take over:\n{}",
            op.tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until exactly one of the two replicas leads; returns its index.
pub async fn the_leader(
    http: &reqwest::Client,
    ops: &[&Operator; 2],
    addrs: &[String; 2],
) -> usize {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let a = is_leading(http, &addrs[0]).await;
        let b = is_leading(http, &addrs[1]).await;
        assert!(
            !(a && b),
            "both replicas ready (leading) at once:\nA:\n{}\nB:\n{}",
            ops[0].tail(),
            ops[1].tail()
        );
        if a || b {
            return if a { 0 } else { 1 };
        }
        assert!(
            Instant::now() < end,
            "no replica became the leader:\nA:\n{}\nB:\n{}",
            ops[0].tail(),
            ops[1].tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
