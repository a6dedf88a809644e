//! A real Kubernetes API server for integration tests.
//!
//! [`cluster()`] starts `tests/control-plane` (the upstream kube-apiserver with an
//! embedded etcd, built and cached by `scripts/build-control-plane.sh`) once per
//! test binary and hands out a [`TestCluster`]. Nothing here is mocked: requests
//! go through real authentication, RBAC, admission, validation and storage.
//!
//! Of the controller-manager only the garbage collector runs: dependents of a
//! deleted owner are deleted (tests/garbage_collection.rs), but deleted
//! namespaces stay `Terminating` and there is no `default` ServiceAccount. Give
//! each test its own namespace ([`TestCluster::namespace`]) and do not wait for
//! namespace deletions.
//!
//! Environment:
//! - `MDE_TEST_KUBECONFIG`: use this kubeconfig instead of starting a harness
//!   (its directory plays the part of `data_dir`, so ServiceAccount kubeconfigs
//!   exist only if the harness that wrote it was given `--service-account`).
//! - `MDE_CONTROL_PLANE_VERBOSE`: echo the harness's log to stderr as it runs.
//! - `MDE_CACHE_DIR`: where the scripts cache the harness binary and the tools.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use serde::Deserialize;

/// Namespace of the ServiceAccount identity the harness issues a token for.
pub const SA_NAMESPACE: &str = "mde-sa-test";
/// Name of the ServiceAccount identity the harness issues a token for; RBAC
/// tests bind roles to `system:serviceaccount:mde-sa-test:mde-isolation-operator`.
pub const SA_NAME: &str = "mde-isolation-operator";

/// How long to wait for the harness's `READY` line once the binary is built.
/// The harness itself gives up after three minutes; this is a backstop.
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// Lines of harness log kept for failure messages.
const LOG_TAIL_LINES: usize = 80;

/// `helm` arguments the chart requires (it refuses to render without them).
pub const CHART_REQUIRED_VALUES: [&str; 6] = [
    "--set",
    "mde.tenantId=t",
    "--set",
    "mde.clientId=c",
    "--set",
    "mde.existingSecret=s",
];

/// Field manager for the server-side applies done by the helpers.
const FIELD_MANAGER: &str = "mde-test-harness";

/// A running API server and the files to reach it.
pub struct TestCluster {
    /// Admin kubeconfig (bearer token in group `system:masters`).
    pub kubeconfig: PathBuf,
    /// Directory of the harness: holds `kubeconfig` and the
    /// `kubeconfig-NS-NAME` files of ServiceAccount identities.
    pub data_dir: PathBuf,
    /// Keeps the harness alive; `None` when `MDE_TEST_KUBECONFIG` is used.
    harness: Option<Harness>,
}

/// The harness process. Statics are never dropped, so `stdin` stays open for
/// the life of the test process; when the process exits, however it exits, the
/// pipe closes and the harness (started with `--exit-on-stdin-eof`) shuts down.
struct Harness {
    _child: Child,
    _stdin: ChildStdin,
    log: Arc<Mutex<VecDeque<String>>>,
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The shared API server of this test binary, started on first use.
///
/// Safe to call from any number of tests at once: the first caller starts the
/// harness, the others wait for it. A failed start is remembered, so every test
/// fails fast with the same message instead of each retrying a slow start.
pub fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(start_cluster) {
        Ok(c) => c,
        Err(e) => panic!("test control plane unavailable: {e}"),
    }
}

fn start_cluster() -> Result<TestCluster, String> {
    if let Some(path) = std::env::var_os("MDE_TEST_KUBECONFIG") {
        let kubeconfig = std::path::absolute(PathBuf::from(path))
            .map_err(|e| format!("MDE_TEST_KUBECONFIG: {e}"))?;
        if !kubeconfig.is_file() {
            return Err(format!(
                "MDE_TEST_KUBECONFIG={} is not a file",
                kubeconfig.display()
            ));
        }
        let data_dir = kubeconfig
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        return Ok(TestCluster {
            kubeconfig,
            data_dir,
            harness: None,
        });
    }

    let binary = build_harness()?;
    let mut child = Command::new(&binary)
        .arg("--exit-on-stdin-eof")
        .arg("--service-account")
        .arg(format!("{SA_NAMESPACE}/{SA_NAME}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");

    // Drain stderr for the whole run (a full pipe would block the server) and
    // keep its tail for failure messages.
    let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL_LINES)));
    let verbose = std::env::var_os("MDE_CONTROL_PLANE_VERBOSE").is_some();
    {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if verbose {
                    eprintln!("[control-plane] {line}");
                }
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                if log.len() == LOG_TAIL_LINES {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });
    }

    // The READY line is the only thing the harness prints on stdout; keep
    // reading after it so the pipe never fills.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(path) = line.strip_prefix("READY ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(PathBuf::from(path));
            }
        }
        // Dropping the sender (if READY never came) wakes the waiter at once.
    });

    let tail = |log: &Arc<Mutex<VecDeque<String>>>| {
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    };
    let kubeconfig = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(path) => path,
        Err(e) => {
            let why = match e {
                mpsc::RecvTimeoutError::Timeout => {
                    format!("no READY line within {READY_TIMEOUT:?}")
                }
                mpsc::RecvTimeoutError::Disconnected => "harness exited before READY".to_string(),
            };
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            // The stderr thread may still be copying the last lines.
            std::thread::sleep(Duration::from_millis(200));
            return Err(format!(
                "{why} ({} {status}); harness log tail:\n{}",
                binary.display(),
                tail(&log)
            ));
        }
    };
    let data_dir = kubeconfig
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    Ok(TestCluster {
        kubeconfig,
        data_dir,
        harness: Some(Harness {
            _child: child,
            _stdin: stdin,
            log,
        }),
    })
}

/// Runs `scripts/build-control-plane.sh` (seconds when its cache is warm) and
/// returns the binary path it prints last. Its progress goes to our stderr.
fn build_harness() -> Result<PathBuf, String> {
    let script = repo_root().join("scripts/build-control-plane.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}); see its output above",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().map(str::trim).unwrap_or_default();
    if path.is_empty() {
        return Err(format!("{} printed no binary path", script.display()));
    }
    Ok(PathBuf::from(path))
}

/// Installs kubectl and helm into `.tools/bin` once per process if missing.
fn tools_dir() -> &'static Path {
    static TOOLS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let res = TOOLS.get_or_init(|| {
        let bin = repo_root().join(".tools/bin");
        if bin.join("kubectl").exists() && bin.join("helm").exists() {
            return Ok(bin);
        }
        let script = repo_root().join("scripts/install-tools.sh");
        let status = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("run {}: {e}", script.display()))?;
        if !status.success() {
            return Err(format!("{} failed ({status})", script.display()));
        }
        Ok(bin)
    });
    match res {
        Ok(p) => p,
        Err(e) => panic!("kubectl/helm unavailable: {e}"),
    }
}

/// A kube client for any kubeconfig file, verifying the server with the
/// kubeconfig's CA (never with verification switched off).
pub async fn client_from(kubeconfig: &Path) -> Client {
    // More than one rustls backend may be compiled in; pick ring explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("load kubeconfig {}: {e}", kubeconfig.display()));
    assert!(
        !config.accept_invalid_certs,
        "test clients must verify the server certificate"
    );
    Client::try_from(config).unwrap_or_else(|e| panic!("client for {}: {e}", kubeconfig.display()))
}

impl TestCluster {
    /// An admin client. Make one per test: a `Client` is tied to the tokio
    /// runtime of the test that made it.
    pub async fn client(&self) -> Client {
        client_from(&self.kubeconfig).await
    }

    /// A client that authenticates as ServiceAccount `ns/name` (see
    /// [`TestCluster::service_account_kubeconfig`]); RBAC applies to it.
    pub async fn service_account_client(&self, ns: &str, name: &str) -> Client {
        client_from(&self.service_account_kubeconfig(ns, name)).await
    }

    /// Kubeconfig whose token authenticates as `system:serviceaccount:NS:NAME`
    /// (groups `system:serviceaccounts`, `system:serviceaccounts:NS`). The
    /// harness started by [`cluster()`] issues one for [`SA_NAMESPACE`]/[`SA_NAME`].
    pub fn service_account_kubeconfig(&self, ns: &str, name: &str) -> PathBuf {
        let path = self.data_dir.join(format!("kubeconfig-{ns}-{name}"));
        assert!(
            path.is_file(),
            "{} does not exist: the harness was not started with --service-account {ns}/{name}",
            path.display()
        );
        path
    }

    /// Server-side applies every CustomResourceDefinition in `<repo>/crds/*.yaml`
    /// and waits until each is Established. Runs once per process; concurrent
    /// callers wait for the first one, and a failure lets the next caller retry.
    pub async fn install_crds(&self) {
        static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        DONE.get_or_try_init(|| self.apply_crds(None))
            .await
            .unwrap_or_else(|e| panic!("install CRDs: {e}"));
    }

    /// Server-side applies the CustomResourceDefinitions of `<repo>/crds/<file>` alone (for a
    /// test of a cluster that lacks the others: give that test its own binary, the API server is
    /// shared within one) and waits until they are Established.
    pub async fn install_crd_file(&self, file: &str) {
        self.apply_crds(Some(file))
            .await
            .unwrap_or_else(|e| panic!("install {file}: {e}"));
    }

    async fn apply_crds(&self, only: Option<&str>) -> Result<(), String> {
        let dir = repo_root().join("crds");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("read {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .filter(|p| only.is_none_or(|f| p.file_name().is_some_and(|n| n == f)))
            .collect();
        files.sort();
        let mut crds = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("read {}: {e}", file.display()))?;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value = serde_yaml::Value::deserialize(doc)
                    .map_err(|e| format!("parse {}: {e}", file.display()))?;
                if value.is_null() {
                    continue; // empty document, e.g. after a trailing `---`
                }
                let crd: CustomResourceDefinition = serde_yaml::from_value(value).map_err(|e| {
                    format!("{}: not a CustomResourceDefinition: {e}", file.display())
                })?;
                crds.push(crd);
            }
        }
        if crds.is_empty() {
            return Err(format!(
                "no CustomResourceDefinition in {}/*.yaml",
                dir.display()
            ));
        }

        let api: Api<CustomResourceDefinition> = Api::all(self.client().await);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for crd in &crds {
            let name = crd
                .metadata
                .name
                .clone()
                .ok_or("CRD without metadata.name")?;
            api.patch(&name, &params, &Patch::Apply(crd))
                .await
                .map_err(|e| format!("apply CRD {name}: {e}"))?;
        }
        for crd in &crds {
            let name = crd.metadata.name.as_deref().unwrap_or_default();
            let established = await_condition(api.clone(), name, conditions::is_crd_established());
            match tokio::time::timeout(Duration::from_secs(60), established).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("wait for CRD {name}: {e}")),
                Err(_) => return Err(format!("CRD {name} not Established within 60s")),
            }
        }
        Ok(())
    }

    /// Creates a namespace `<prefix>-<random>` and returns its name. The random
    /// part keeps parallel tests and repeated runs against one cluster apart.
    pub async fn namespace(&self, prefix: &str) -> String {
        // A DNS label: lower-case alphanumerics and '-', at most 63 characters.
        let mut prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(50)
            .collect();
        prefix = prefix.trim_matches('-').to_string();
        if prefix.is_empty() {
            prefix.push_str("test");
        }
        let api: Api<Namespace> = Api::all(self.client().await);
        loop {
            let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
            let name = format!("{prefix}-{suffix}");
            let ns = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some([("mde.dev/test".to_string(), "true".to_string())].into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match api.create(&PostParams::default(), &ns).await {
                Ok(_) => return name,
                Err(kube::Error::Api(s)) if s.code == 409 => continue, // name taken: draw again
                Err(e) => panic!("create namespace {name}: {e}"),
            }
        }
    }

    /// `kubectl` from `.tools/bin` (installed on first use), with `KUBECONFIG`
    /// set to the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        self.tool("kubectl")
    }

    /// `helm` from `.tools/bin` (installed on first use), with `KUBECONFIG`
    /// set to the admin kubeconfig.
    pub fn helm(&self) -> Command {
        self.tool("helm")
    }

    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(tools_dir().join(name));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// The last lines the harness logged (empty with `MDE_TEST_KUBECONFIG`),
    /// for failure messages.
    pub fn log_tail(&self) -> String {
        match &self.harness {
            Some(h) => {
                let log = h.log.lock().unwrap_or_else(|p| p.into_inner());
                log.iter().cloned().collect::<Vec<_>>().join("\n")
            }
            None => String::new(),
        }
    }
}
