//! Secrets hygiene: the client secret and every access token the operator was issued appear
//! nowhere a user or an attacker with read access could see them: the operator's output
//! (stdout and stderr, at trace level for the operator's own target, in text and JSON format),
//! the namespace's events, the resources (status included), and `/metrics`.
//!
//! Each run is a full scenario against the real binary, a real kube-apiserver and `mde-sim`
//! started with a distinctive secret: a release, an isolation, and two stalls (an unknown
//! machine and a missing comment); one more run gives the operator a wrong secret, so that the
//! AuthenticationFailed path (Entra's error text in a condition) is covered too. Tokens live
//! two real seconds, so several are issued per run. The simulator's admin API does not expose
//! issued tokens, so the operator fetches them through a small recording proxy in front of the
//! token endpoint (`--authority`); every `access_token` it relays is checked.
//!
//! Secrets are never printed: the assertions are booleans with messages that name only where a
//! leak was found.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Response;
use common::cluster::cluster;
use common::http::{serve_loopback, split};
use common::operator::{SeedMachine, condition, create, device_isolation, machine_id, seed_file};
use common::sim::Sim;
use kube::api::{Api, ListParams};
use mde_isolation_operator::crd::{ConnectionKind, ConnectionRef, DeviceIsolation, MdeConnection};
use serde_json::Value;

/// How the operator gets its secret in one run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SecretFrom {
    Env,
    File,
}

/// One run's settings.
struct RunCfg {
    label: &'static str,
    from: SecretFrom,
    /// `RUST_LOG` of the operator.
    rust_log: &'static str,
    /// `--log-format`.
    log_format: &'static str,
    /// Give the operator a different (wrong) secret than the simulator's.
    wrong_secret: bool,
    /// With a wrong secret: require the resources to stall as AuthenticationFailed.
    expect_auth_stall: bool,
}

/// A recording reverse proxy in front of the simulator's token endpoint.
struct TokenProxy {
    base: String,
    tokens: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    tokens: Arc<Mutex<Vec<String>>>,
}

async fn relay(State(st): State<ProxyState>, req: Request) -> Response<Body> {
    let Some((parts, path, bytes)) = split(req, 1 << 20).await else {
        return Response::builder().status(502).body(Body::empty()).unwrap();
    };
    let mut rb = st
        .http
        .request(parts.method, format!("{}{path}", st.upstream))
        .body(bytes);
    if let Some(ct) = parts.headers.get("content-type") {
        rb = rb.header("content-type", ct);
    }
    let Ok(resp) = rb.send().await else {
        return Response::builder().status(502).body(Body::empty()).unwrap();
    };
    let status = resp.status();
    let ct = resp.headers().get("content-type").cloned();
    let body = resp.bytes().await.unwrap_or_default();
    if let Ok(v) = serde_json::from_slice::<Value>(&body)
        && let Some(t) = v["access_token"].as_str()
    {
        st.tokens.lock().unwrap().push(t.to_string());
    }
    let mut out = Response::builder().status(status);
    if let Some(ct) = ct {
        out = out.header("content-type", ct);
    }
    out.body(Body::from(body)).unwrap()
}

impl TokenProxy {
    async fn start(upstream: &str) -> TokenProxy {
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let state = ProxyState {
            upstream: upstream.to_string(),
            http: reqwest::Client::new(),
            tokens: tokens.clone(),
        };
        let addr = serve_loopback(axum::Router::new().fallback(relay).with_state(state)).await;
        TokenProxy {
            base: format!("http://{addr}"),
            tokens,
        }
    }

    fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().clone()
    }
}

/// The operator binary with exactly the environment the test gives it.
struct OperatorProcess {
    child: Child,
    log: PathBuf,
}

impl OperatorProcess {
    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn tail(&self) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The address of `/metrics`, once logged.
    fn http_addr(&self) -> Option<String> {
        self.output()
            .lines()
            .filter(|l| l.contains("serving /metrics"))
            .find_map(|l| {
                // Text logs: `addr=127.0.0.1:1234`; JSON logs: `"addr":"127.0.0.1:1234"`.
                let rest = l
                    .split("addr=")
                    .nth(1)
                    .or_else(|| l.split("\"addr\":\"").nth(1))?;
                Some(
                    rest.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                        .next()?
                        .to_string(),
                )
            })
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `name` until `pred` holds; an error names what was awaited (never the log).
async fn wait_until(
    api: &Api<DeviceIsolation>,
    name: &str,
    what: &str,
    pred: impl Fn(&DeviceIsolation) -> bool,
) -> Result<(), String> {
    common::poll::poll(
        Duration::from_secs(90),
        Duration::from_millis(100),
        || async {
            match api.get(name).await {
                Ok(d) if pred(&d) => Ok(()),
                Ok(d) => Err(format!("{:?}", d.status.map(|s| s.conditions))),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
    .map_err(|last| format!("{name} never became {what}; conditions: {last}"))
}

fn is(type_: &'static str, reason: &'static str) -> impl Fn(&DeviceIsolation) -> bool {
    move |d| {
        condition(d, type_).is_some_and(|c| c.0 == "True" && (reason.is_empty() || c.1 == reason))
    }
}

/// Everything a reader of the cluster or the operator's output can see, as one text per place.
async fn observable(
    client: &kube::Client,
    ns: &str,
    op: &OperatorProcess,
) -> Vec<(&'static str, String)> {
    let dis: Api<DeviceIsolation> = Api::namespaced(client.clone(), ns);
    let resources = dis
        .list(&ListParams::default())
        .await
        .map(|l| serde_json::to_string(&l.items).unwrap())
        .unwrap_or_default();
    let events_v1: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let events = events_v1
        .list(&ListParams::default())
        .await
        .map(|l| serde_json::to_string(&l.items).unwrap())
        .unwrap_or_default();
    let core_events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    let core = core_events
        .list(&ListParams::default())
        .await
        .map(|l| serde_json::to_string(&l.items).unwrap())
        .unwrap_or_default();
    let mut metrics = String::new();
    if let Some(addr) = op.http_addr()
        && let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await
    {
        metrics = r.text().await.unwrap_or_default();
    }
    vec![
        ("operator output", op.output()),
        ("resources and their status", resources),
        ("events", format!("{events}{core}")),
        ("/metrics", metrics),
    ]
}

/// Whether `text` holds `secret` or a 12-character piece of it.
fn leaks(text: &str, secret: &str) -> bool {
    if text.contains(secret) {
        return true;
    }
    let chars: Vec<char> = secret.chars().collect();
    chars
        .windows(12)
        .step_by(6)
        .any(|w| text.contains(&w.iter().collect::<String>()))
}

/// The operator binary watching `ns`, with nothing in its environment but the kubeconfig and
/// `rust_log` (the credential is the caller's to add), its tokens from `authority`.
fn operator_command(ns: &str, rust_log: &str, api: &str, authority: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mde-isolation-operator"));
    cmd.env_clear()
        .env("KUBECONFIG", &cluster().kubeconfig)
        .env("RUST_LOG", rust_log)
        .args(["run", "--namespace", ns, "--tenant-id", "test-tenant"])
        .args(["--client-id", "mde-sim-client", "--time-scale", "60"])
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--api-url")
        .arg(format!("{api}/"))
        .arg("--authority")
        .arg(format!("{authority}/"));
    cmd
}

async fn run(cfg: RunCfg) {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace(&format!("secrets-{}", cfg.label)).await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();

    let secret = format!("Zq8-{}-hygiene", uuid::Uuid::new_v4().simple());
    let operator_secret = if cfg.wrong_secret {
        format!("Wr0ng-{}-hygiene", uuid::Uuid::new_v4().simple())
    } else {
        secret.clone()
    };
    let release = machine_id(0x5ec1);
    let isolate = machine_id(0x5ec2);
    let unknown = machine_id(0x5ecf);
    let seed = seed_file(
        dir.path(),
        &[
            SeedMachine {
                id: &release,
                name: "rel.contoso.local",
                behaviour: "online",
                isolated: true,
            },
            SeedMachine {
                id: &isolate,
                name: "iso.contoso.local",
                behaviour: "online",
                isolated: false,
            },
        ],
    );
    let sim = Sim::start(&[
        "--seed",
        seed.to_str().unwrap(),
        "--time-scale",
        "60",
        "--token-lifetime",
        "120",
        "--client-secret",
        &secret,
    ]);
    let proxy = TokenProxy::start(&sim.base_url).await;

    let log = dir.path().join("operator.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut cmd = operator_command(&ns, cfg.rust_log, &sim.base_url, &proxy.base);
    cmd.args(["--log-format", cfg.log_format]);
    match cfg.from {
        SecretFrom::Env => {
            cmd.env("MDE_CLIENT_SECRET", &operator_secret);
        }
        SecretFrom::File => {
            let path = dir.path().join("client-secret");
            std::fs::write(&path, format!("{operator_secret}\n")).unwrap();
            cmd.arg("--client-secret-file").arg(&path);
        }
    }
    let op = OperatorProcess {
        child: cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn the operator"),
        log,
    };

    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    for (name, machine, isolated, comment) in [
        ("release", &release, false, Some("release it")),
        ("isolate", &isolate, true, Some("isolate it")),
        ("unknown", &unknown, false, Some("no such machine")),
        ("no-comment", &release, false, None),
    ] {
        create(
            &client,
            &ns,
            &device_isolation(name, machine, isolated, comment),
        )
        .await;
    }
    let outcome: Result<(), String> = async {
        wait_until(
            &api,
            "no-comment",
            "Stalled",
            is("Stalled", "CommentMissing"),
        )
        .await?;
        if cfg.wrong_secret {
            // Let the operator try (and fail) a few times; the conditions it shows meanwhile are
            // checked by `a_wrong_secret_stalls_as_authentication_failed`.
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let refused = sim
                    .admin_calls()
                    .await
                    .iter()
                    .filter(|c| c["api"] == "token" && c["status"] == 401)
                    .count();
                if refused >= 5 {
                    break;
                }
                if Instant::now() > end {
                    return Err(format!("only {refused} refused token requests"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if cfg.expect_auth_stall {
                for name in ["release", "isolate"] {
                    wait_until(&api, name, "Stalled", is("Stalled", "AuthenticationFailed"))
                        .await?;
                }
            }
        } else {
            wait_until(&api, "release", "Ready", is("Ready", "Released")).await?;
            wait_until(&api, "isolate", "Ready", is("Ready", "Isolated")).await?;
            wait_until(&api, "unknown", "Stalled", is("Stalled", "MachineNotFound")).await?;
            // A few more token lifetimes, so that refreshed tokens are in use too.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(())
    }
    .await;

    let tokens = proxy.tokens();
    let places = observable(&client, &ns, &op).await;
    let scanned: usize = places.iter().map(|(_, t)| t.len()).sum();
    let mut found = Vec::new();
    for (place, text) in &places {
        if leaks(text, &secret) {
            found.push(format!("the client secret in {place}"));
        }
        if operator_secret != secret && leaks(text, &operator_secret) {
            found.push(format!("the configured (wrong) secret in {place}"));
        }
        for (i, t) in tokens.iter().enumerate() {
            if leaks(text, t) {
                found.push(format!("access token #{i} in {place}"));
            }
        }
    }
    eprintln!(
        "[secrets/{}] secret from {:?}, RUST_LOG={:?}, --log-format {}: {} access tokens issued \
         through the proxy; {} bytes scanned in {:?}; leaks found: {}",
        cfg.label,
        cfg.from,
        cfg.rust_log,
        cfg.log_format,
        tokens.len(),
        scanned,
        places.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        found.len()
    );
    assert!(found.is_empty(), "secrets leaked: {found:?}");
    if let Err(e) = outcome {
        // Checked above: the log holds no secret, so it can be shown.
        panic!(
            "{}: scenario failed: {e}\noperator log tail:\n{}",
            cfg.label,
            op.tail()
        );
    }
    if !cfg.wrong_secret {
        assert!(
            tokens.len() >= 2,
            "{}: expected refreshed tokens, saw {}",
            cfg.label,
            tokens.len()
        );
    }
    // The operator's own target has no trace-level events: at `trace` it logs everything it
    // has at debug level (calls, outcomes, token requests).
    assert!(
        op.output().contains("DEBUG"),
        "{}: no debug output was produced, so the check proves little",
        cfg.label
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_from_env_never_appears_in_trace_logs_events_status_or_metrics() {
    run(RunCfg {
        label: "env",
        from: SecretFrom::Env,
        rust_log: "info,mde_isolation_operator=trace",
        log_format: "text",
        wrong_secret: false,
        expect_auth_stall: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_from_file_never_appears_in_json_trace_logs_events_status_or_metrics() {
    run(RunCfg {
        label: "file",
        from: SecretFrom::File,
        rust_log: "mde_isolation_operator=trace",
        log_format: "json",
        wrong_secret: false,
        expect_auth_stall: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_stalls_without_showing_either_secret() {
    run(RunCfg {
        label: "wrong",
        from: SecretFrom::Env,
        rust_log: "info,mde_isolation_operator=trace",
        log_format: "text",
        wrong_secret: true,
        expect_auth_stall: false,
    })
    .await;
}

/// The README promises `Stalled AuthenticationFailed` ("check tenant id, client id and secret")
/// when the credentials are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_stalls_as_authentication_failed() {
    run(RunCfg {
        label: "wrong-stall",
        from: SecretFrom::Env,
        rust_log: "info,mde_isolation_operator=debug",
        log_format: "text",
        wrong_secret: true,
        expect_auth_stall: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stay_out_of_the_logs_even_with_every_crate_at_trace() {
    run(RunCfg {
        label: "all-trace",
        from: SecretFrom::File,
        rust_log: "trace",
        log_format: "text",
        wrong_secret: false,
        expect_auth_stall: false,
    })
    .await;
}

/// An MdeConnection's Secret: first a wrong value (Entra's refusal reaches the connection's and
/// its resource's conditions), then the right one (a release, refreshed tokens). Neither value,
/// nor any token issued for the connection's tenant, appears in the operator's output at trace
/// level, the resources' or the connection's status, the events, or `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_secret_never_appears_in_logs_events_status_or_metrics() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("secrets-connection").await;
    let client = c.client().await;
    let secret = format!("Cn7-{}-hygiene", uuid::Uuid::new_v4().simple());
    let wrong = format!("Wr0ngCn-{}-hygiene", uuid::Uuid::new_v4().simple());
    let machine = machine_id(0x5ec9);
    let sim = Sim::start(&["--time-scale", "60", "--token-lifetime", "120"]);
    sim.put_tenant(serde_json::json!({
        "tenantId": "hygiene.example",
        "apps": [{"clientId": "app-hygiene", "clientSecret": secret,
                  "roles": ["Machine.Isolate", "Machine.Read.All"]}],
        "machines": [{"id": machine, "computerDnsName": "h.contoso.local",
                      "behaviour": "online", "isolated": true}],
    }))
    .await;
    let proxy = TokenProxy::start(&sim.base_url).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("operator.log");
    let log_file = std::fs::File::create(&log).unwrap();
    // The operator's own connection (flags) is the simulator's default app; the connection's
    // credential is the distinctive one.
    let mut cmd = operator_command(
        &ns,
        "info,mde_isolation_operator=trace",
        &sim.base_url,
        &sim.base_url,
    );
    cmd.env("MDE_CLIENT_SECRET", common::operator::SIM_SECRET);
    let op = OperatorProcess {
        child: cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn the operator"),
        log,
    };
    let put_secret = |value: String| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, &ns);
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "conn"}, "stringData": {"client-secret": value}});
            api.patch(
                "conn",
                &kube::api::PatchParams::apply("e2e").force(),
                &kube::api::Patch::Apply(&body),
            )
            .await
            .unwrap();
        }
    };
    put_secret(wrong.clone()).await;
    let conns: Api<MdeConnection> = Api::namespaced(client.clone(), &ns);
    let conn: MdeConnection = serde_json::from_value(serde_json::json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "MdeConnection",
        "metadata": {"name": "hygiene"},
        "spec": {
            "tenantId": "hygiene.example", "clientId": "app-hygiene",
            "apiUrl": format!("{}/", sim.base_url), "authority": format!("{}/", proxy.base),
            "credential": {"clientSecret": {"name": "conn", "key": "client-secret"}},
        },
    }))
    .unwrap();
    conns
        .create(&kube::api::PostParams::default(), &conn)
        .await
        .unwrap();
    let mut di = device_isolation("via-connection", &machine, false, Some("release it"));
    di.spec.connection_ref = Some(ConnectionRef {
        kind: ConnectionKind::MdeConnection,
        name: "hygiene".into(),
    });
    create(&client, &ns, &di).await;
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let outcome: Result<(), String> = async {
        wait_until(
            &api,
            "via-connection",
            "Stalled",
            is("Stalled", "AuthenticationFailed"),
        )
        .await?;
        put_secret(secret.clone()).await;
        wait_until(&api, "via-connection", "Ready", is("Ready", "Released")).await?;
        // A few token lifetimes, so that refreshed tokens are in use too.
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(())
    }
    .await;

    let tokens = proxy.tokens();
    let mut places = observable(&client, &ns, &op).await;
    let connections = conns
        .list(&ListParams::default())
        .await
        .map(|l| serde_json::to_string(&l.items).unwrap())
        .unwrap_or_default();
    assert!(
        connections.contains("Connected"),
        "the connection's status is scanned"
    );
    places.push(("connections and their status", connections));
    let mut found = Vec::new();
    for (place, text) in &places {
        for (what, value) in [("the secret", &secret), ("the wrong secret", &wrong)] {
            if leaks(text, value) {
                found.push(format!("{what} in {place}"));
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if leaks(text, t) {
                found.push(format!("access token #{i} in {place}"));
            }
        }
    }
    assert!(found.is_empty(), "secrets leaked: {found:?}");
    if let Err(e) = outcome {
        panic!(
            "connection: scenario failed: {e}\noperator log tail:\n{}",
            op.tail()
        );
    }
    assert!(
        tokens.len() >= 2,
        "expected refreshed tokens, saw {}",
        tokens.len()
    );
    assert!(
        op.output().contains("DEBUG"),
        "no debug output: the check proves little"
    );
}
