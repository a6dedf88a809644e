//! Kubernetes-side faults: a private, restartable control plane behind a small proxy.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::common::http::{serve_loopback, split};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Response, StatusCode};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams};
use mde_isolation_operator::crd::DeviceIsolation;
use serde_json::json;

/// A private control plane (its own data directory and port), restartable.
pub(crate) struct PrivateControlPlane {
    pub(crate) binary: PathBuf,
    pub(crate) data_dir: tempfile::TempDir,
    pub(crate) port: u16,
    pub(crate) child: Option<(Child, ChildStdin)>,
}

impl PrivateControlPlane {
    pub(crate) fn start() -> PrivateControlPlane {
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

    pub(crate) fn kubeconfig(&self) -> PathBuf {
        self.data_dir.path().join("kubeconfig")
    }

    /// Starts the harness on the data directory and port and waits for its READY line.
    pub(crate) fn spawn(&mut self) {
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
    pub(crate) fn restart(&mut self) {
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
pub(crate) struct Upstream {
    pub(crate) base: String,
    pub(crate) token: String,
    pub(crate) http: reqwest::Client,
}

impl Upstream {
    /// Reads the harness's kubeconfig (server, CA, bearer token).
    pub(crate) async fn from_kubeconfig(path: &Path) -> Upstream {
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
pub(crate) struct KubeProxy {
    pub(crate) upstream: Arc<RwLock<Upstream>>,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) _dir: tempfile::TempDir,
}

pub(crate) async fn proxy_handler(
    State(up): State<Arc<RwLock<Upstream>>>,
    req: Request,
) -> Response<Body> {
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
    pub(crate) async fn start(upstream: Upstream) -> KubeProxy {
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

    pub(crate) fn point_to(&self, upstream: Upstream) {
        *self.upstream.write().unwrap() = upstream;
    }
}

/// Applies the DeviceIsolation CRD to a cluster and waits until it is Established.
pub(crate) async fn install_crd(client: &kube::Client) {
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
