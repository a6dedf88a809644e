//! Runs the real `mde-sim` binary for integration tests and wraps its API and admin API.
//!
//! `Sim::start(&["--machines", "3"])` spawns the binary on a free port, waits for its
//! `LISTENING` line and kills it on drop. Helpers return parsed JSON and never assert on real
//! elapsed time; prefer `--time-scale 0` plus `advance()` for determinism.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

/// Default client credentials of the simulator.
pub const CLIENT_ID: &str = "mde-sim-client";
/// Default client secret of the simulator.
pub const CLIENT_SECRET: &str = "mde-sim-secret";
/// Default v2 scope.
pub const SCOPE: &str = "https://api.securitycenter.microsoft.com/.default";

/// A running simulator.
pub struct Sim {
    /// `http://127.0.0.1:PORT` or `https://...`.
    pub base_url: String,
    /// CA certificate (PEM) when started with `--tls`.
    pub ca_pem: Option<String>,
    /// A client that trusts the simulator (its CA, when TLS).
    pub client: reqwest::Client,
    child: Child,
    _dir: tempfile::TempDir,
}

/// A response: status, headers and the body parsed as JSON (a JSON string if it is not JSON).
#[derive(Debug)]
pub struct Resp {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Parsed body.
    pub body: Value,
}

impl Resp {
    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// `error.code` of an MDE error body ("" when absent).
    pub fn code(&self) -> String {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

impl Sim {
    /// Starts `mde-sim` with `args` (plus `--listen 127.0.0.1:0` and, with `--tls`, a
    /// `--ca-out` in a temporary directory) and waits for its LISTENING line.
    pub fn start(args: &[&str]) -> Sim {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !all.iter().any(|a| a == "--listen") {
            all.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        let tls = all.iter().any(|a| a == "--tls");
        let ca_path: Option<PathBuf> = if tls && !all.iter().any(|a| a == "--ca-out") {
            let p = dir.path().join("ca.pem");
            all.extend(["--ca-out".into(), p.display().to_string()]);
            Some(p)
        } else {
            all.iter()
                .position(|a| a == "--ca-out")
                .map(|i| PathBuf::from(&all[i + 1]))
        };
        let stderr = if std::env::var_os("MDE_SIM_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let mut child = Command::new(binary())
            .args(&all)
            .env_remove("MDE_SIM_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn mde-sim");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("mde-sim did not print LISTENING within 60 s (args {all:?})");
            }
        };
        let base_url = line
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let ca_pem = ca_path
            .filter(|_| tls)
            .map(|p| std::fs::read_to_string(p).expect("CA file"));
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(0);
        if let Some(pem) = &ca_pem {
            builder = builder.add_root_certificate(
                reqwest::Certificate::from_pem(pem.as_bytes()).expect("CA PEM"),
            );
        }
        Sim {
            base_url,
            ca_pem,
            client: builder.build().expect("client"),
            child,
            _dir: dir,
        }
    }

    /// Absolute URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Sends a request; `token` adds a bearer header, `body` a JSON body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        Self::into_resp(req.send().await.expect("request")).await
    }

    /// Sends a request with a raw body.
    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .client
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::into_resp(req.send().await.expect("request")).await
    }

    /// Converts a reqwest response.
    pub async fn into_resp(r: reqwest::Response) -> Resp {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            headers,
            body,
        }
    }

    /// GET with a token.
    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.send("GET", path, Some(token), None).await
    }

    /// POST JSON with a token.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.send("POST", path, Some(token), Some(body)).await
    }

    /// Posts a form to a token endpoint (`v2` or `v1` path).
    pub async fn token_request(&self, path: &str, form: &[(&str, &str)]) -> Resp {
        let r = self
            .client
            .post(self.url(path))
            .form(form)
            .send()
            .await
            .expect("token request");
        Self::into_resp(r).await
    }

    /// A token for the default app and audience.
    pub async fn token(&self) -> String {
        self.token_for(CLIENT_ID, CLIENT_SECRET, SCOPE).await
    }

    /// A v2 token for the given app and scope.
    pub async fn token_for(&self, client_id: &str, secret: &str, scope: &str) -> String {
        let r = self
            .token_request(
                "/contoso.onmicrosoft.com/oauth2/v2.0/token",
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret),
                    ("scope", scope),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "token request failed: {:?}", r.body);
        r.body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    /// GET on the admin API (must answer 2xx).
    pub async fn admin_get(&self, path: &str) -> Value {
        let r = self.send("GET", &format!("/sim/{path}"), None, None).await;
        assert!(r.status < 300, "GET /sim/{path}: {} {:?}", r.status, r.body);
        r.body
    }

    /// POST on the admin API (must answer 2xx).
    pub async fn admin_post(&self, path: &str, body: Value) -> Value {
        let r = self
            .send("POST", &format!("/sim/{path}"), None, Some(body))
            .await;
        assert!(
            r.status < 300,
            "POST /sim/{path}: {} {:?}",
            r.status,
            r.body
        );
        r.body
    }

    /// Every API call received so far.
    pub async fn admin_calls(&self) -> Vec<Value> {
        self.admin_get("calls").await["calls"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Statistics per API (`apis.<name>.calls`, `throttled`, `maxCallsPerMinute`, ...).
    pub async fn admin_stats(&self) -> Value {
        self.admin_get("stats").await
    }

    /// Ground truth of a machine (by id or name): `isolated`, `behaviour`, `actions`, ...
    pub async fn ground_truth(&self, machine: &str) -> Value {
        self.admin_get(&format!("machines/{machine}")).await
    }

    /// Ids of all machines, in listing order.
    pub async fn machine_ids(&self) -> Vec<String> {
        self.admin_get("machines").await["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// Moves the simulated clock forward.
    pub async fn advance(&self, seconds: f64) -> Value {
        self.admin_post("time/advance", json!({"seconds": seconds}))
            .await
    }

    /// The simulated time.
    pub async fn now(&self) -> String {
        self.admin_get("time").await["now"]
            .as_str()
            .expect("now")
            .to_string()
    }

    /// A v2 token (default scope) for an app of the tenant whose token URL has tenant id
    /// `tenant`: a named tenant of the simulator, or any other id for the default tenant.
    pub async fn token_in(&self, tenant: &str, client_id: &str, secret: &str) -> String {
        let r = self
            .token_request(
                &token_path(tenant),
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret),
                    ("scope", SCOPE),
                ],
            )
            .await;
        assert_eq!(
            r.status, 200,
            "token request at tenant {tenant} failed: {:?}",
            r.body
        );
        r.body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    /// GET on the admin API about one tenant (`?tenant=`; must answer 2xx).
    pub async fn admin_get_in(&self, tenant: &str, path: &str) -> Value {
        self.admin_get(&in_tenant(path, tenant)).await
    }

    /// POST on the admin API about one tenant (`?tenant=`; must answer 2xx).
    pub async fn admin_post_in(&self, tenant: &str, path: &str, body: Value) -> Value {
        self.admin_post(&in_tenant(path, tenant), body).await
    }

    /// The calls of one tenant (its tokens' calls and the token requests at its URL); `"*"`:
    /// every tenant's, in arrival order.
    pub async fn admin_calls_in(&self, tenant: &str) -> Vec<Value> {
        self.admin_get_in(tenant, "calls").await["calls"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Statistics of one tenant's calls, quota and foreign load.
    pub async fn admin_stats_in(&self, tenant: &str) -> Value {
        self.admin_get_in(tenant, "stats").await
    }

    /// Ground truth of a machine (by id or name) of one tenant.
    pub async fn ground_truth_in(&self, tenant: &str, machine: &str) -> Value {
        self.admin_get_in(tenant, &format!("machines/{machine}"))
            .await
    }

    /// Ids of all machines of one tenant, in listing order.
    pub async fn machine_ids_in(&self, tenant: &str) -> Vec<String> {
        self.admin_get_in(tenant, "machines").await["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// Creates (or replaces, fresh) a named tenant: `{"tenantId", "apps": [...], "machines"?:
    /// [...], "generate"?: {"count", "offlineRatio", "failingRatio", "domain"},
    /// "foreignLoad"?: [...]}`; answers its description.
    pub async fn put_tenant(&self, tenant: Value) -> Value {
        self.admin_post("tenants", tenant).await
    }

    /// Polls `f` every 50 ms until it returns `Some`, failing after `deadline` real seconds.
    pub async fn wait_until<T, F, Fut>(&self, deadline_secs: u64, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let timeout = Duration::from_secs(deadline_secs);
        let every = Duration::from_millis(50);
        super::poll::poll(timeout, every, || {
            let next = f();
            async move { next.await.ok_or_else(|| "not yet".to_string()) }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}

/// The v2 token endpoint path of a tenant id.
pub fn token_path(tenant: &str) -> String {
    format!("/{tenant}/oauth2/v2.0/token")
}

/// An admin path with `tenant=<id>` added to its query.
pub fn in_tenant(path: &str, tenant: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}tenant={tenant}")
}

/// The claims of a JWT (an access token of the simulator carries `tid`, `appid`, `roles`,
/// `aud`, ...), without checking its signature.
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// The simulator's binary. It is a workspace member of its own (`sim/`), built beside the
/// executable running this code: `cargo test` and `cargo build` at the root build every member
/// (`make bench` builds its release build); `cargo build -p mde-sim` builds it alone.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable");
    // target/<profile>/deps/<this> → target/<profile>/mde-sim
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("a target directory");
    let bin = dir.join(format!("mde-sim{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: build the simulator with `cargo build -p mde-sim` (`--release` for the \
         benchmark)",
        bin.display()
    );
    bin
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// When the simulator logged `call` (its `realTime`, wall clock).
pub fn real_time(call: &Value) -> chrono::DateTime<chrono::Utc> {
    call["realTime"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|| panic!("realTime of {call}"))
}
