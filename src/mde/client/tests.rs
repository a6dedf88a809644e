//! Client behaviour against tiny in-test servers on 127.0.0.1.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap as AxHeaders, Method as AxMethod, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::mde::model::ActionStatus;
use crate::quota::QuotaConfig;

const MACHINE: &str = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";
const ACTION_JSON: &str = r#"{"id":"5382f7ea-7557-4ab7-9782-d50480024a4e","type":"Unisolate","status":"Pending","machineId":"1e5bc9d7e413ddd7902c2932e418702b84d0cc07","requestorComment":"c","creationDateTimeUtc":"2026-11-28T10:00:00.1234567Z","lastUpdateDateTimeUtc":"2026-11-28T10:00:00.1234567Z"}"#;

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path_and_query: String,
    auth: String,
    content_type: String,
    body: String,
}

type Responder = dyn Fn(&Seen, usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync;

struct Mock {
    token_hits: AtomicUsize,
    api: Mutex<Vec<Seen>>,
    respond: Box<Responder>,
}

impl Mock {
    fn api_calls(&self) -> Vec<Seen> {
        self.api.lock().unwrap().clone()
    }
    fn tokens(&self) -> usize {
        self.token_hits.load(Ordering::SeqCst)
    }
}

async fn token(State(m): State<Arc<Mock>>) -> String {
    let n = m.token_hits.fetch_add(1, Ordering::SeqCst);
    format!(r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"tok-{n}"}}"#)
}

async fn api(
    State(m): State<Arc<Mock>>,
    method: AxMethod,
    uri: Uri,
    headers: AxHeaders,
    body: Bytes,
) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let seen = Seen {
        method: method.to_string(),
        path_and_query: uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        auth: header("authorization"),
        content_type: header("content-type"),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let n = {
        let mut calls = m.api.lock().unwrap();
        calls.push(seen.clone());
        calls.len() - 1
    };
    let (status, headers, body) = (m.respond)(&seen, n);
    let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (k, v) in headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

fn router(mock: Arc<Mock>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .fallback(api)
        .with_state(mock)
}

async fn serve_plain(app: Router) -> Url {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Url::parse(&format!("http://{addr}/")).unwrap()
}

fn mock(
    respond: impl Fn(&Seen, usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
) -> Arc<Mock> {
    Arc::new(Mock {
        token_hits: AtomicUsize::new(0),
        api: Mutex::new(Vec::new()),
        respond: Box::new(respond),
    })
}

fn ok(body: &str) -> (u16, Vec<(&'static str, String)>, String) {
    (
        200,
        vec![("content-type", "application/json".into())],
        body.to_owned(),
    )
}

fn err(status: u16, code: &str, message: &str) -> (u16, Vec<(&'static str, String)>, String) {
    (
        status,
        vec![("content-type", "application/json".into())],
        format!(
            r#"{{"error":{{"code":"{code}","message":"{message}","target":"1b2c3d4e-0000-0000-0000-000000000000"}}}}"#
        ),
    )
}

#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<(Api, String)>>);

impl CallObserver for Recorder {
    fn observe(&self, api: Api, outcome: &str, _elapsed: Duration) {
        self.0.lock().unwrap().push((api, outcome.to_owned()));
    }
}

impl Recorder {
    fn outcomes(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|o| o.1.clone()).collect()
    }
}

struct Setup {
    api_url: Url,
    authority: Url,
    gate: QuotaConfig,
    timeout: Duration,
    time_scale: f64,
    ca_file: Option<PathBuf>,
}

impl Setup {
    fn new(url: &Url) -> Self {
        Setup {
            api_url: url.clone(),
            authority: url.clone(),
            gate: QuotaConfig::from_budget(1.0, 1.0),
            timeout: Duration::from_secs(5),
            time_scale: 1.0,
            ca_file: None,
        }
    }

    fn build(self) -> (MdeClient, Arc<Recorder>) {
        self.try_build().unwrap()
    }

    fn try_build(self) -> Result<(MdeClient, Arc<Recorder>), MdeError> {
        let recorder = Arc::new(Recorder::default());
        let client = MdeClient::new(
            MdeClientConfig {
                endpoints: Endpoints {
                    api_url: self.api_url,
                    authority: self.authority,
                    scope: "https://api.securitycenter.microsoft.com/.default".into(),
                },
                tenant_id: "contoso.onmicrosoft.com".into(),
                client_id: "app".into(),
                secret: ClientSecret::from_value("s".into()),
                ca_file: self.ca_file,
                request_timeout: self.timeout,
                time_scale: self.time_scale,
                observer: Some(recorder.clone()),
            },
            Arc::new(QuotaGate::new(self.gate)),
        )?;
        Ok((client, recorder))
    }
}

async fn client_for(m: &Arc<Mock>) -> (MdeClient, Arc<Recorder>) {
    let url = serve_plain(router(m.clone())).await;
    Setup::new(&url).build()
}

#[tokio::test]
async fn unisolate_and_isolate_send_the_documented_requests() {
    let m = mock(|_, _| (201, vec![], ACTION_JSON.to_owned()));
    let (c, rec) = client_for(&m).await;
    let a = c
        .unisolate(MACHINE, "Released (INC-1)", "ns/a")
        .await
        .unwrap();
    assert_eq!(a.id, "5382f7ea-7557-4ab7-9782-d50480024a4e");
    assert_eq!(a.status, ActionStatus::Pending);
    c.isolate(MACHINE, "Isolate it", IsolationType::Selective, "ns/a")
        .await
        .unwrap();
    c.cancel_action("5382f7ea-7557-4ab7-9782-d50480024a4e", "stop", "ns/a")
        .await
        .unwrap();
    let calls = m.api_calls();
    assert_eq!(calls[0].method, "POST");
    assert_eq!(
        calls[0].path_and_query,
        format!("/api/machines/{MACHINE}/unisolate")
    );
    assert_eq!(calls[0].auth, "Bearer tok-0");
    assert!(calls[0].content_type.starts_with("application/json"));
    let body: Value = serde_json::from_str(&calls[0].body).unwrap();
    assert_eq!(body, json!({"Comment": "Released (INC-1)"}));
    assert_eq!(
        calls[1].path_and_query,
        format!("/api/machines/{MACHINE}/isolate")
    );
    let body: Value = serde_json::from_str(&calls[1].body).unwrap();
    assert_eq!(
        body,
        json!({"Comment": "Isolate it", "IsolationType": "Selective"})
    );
    assert_eq!(
        calls[2].path_and_query,
        "/api/machineactions/5382f7ea-7557-4ab7-9782-d50480024a4e/cancel"
    );
    assert_eq!(m.tokens(), 1, "the token is cached");
    assert_eq!(rec.outcomes(), ["ok", "ok", "ok"]);
}

#[tokio::test]
async fn gets_encode_ids_and_validate_machine_ids() {
    let m = mock(|s, _| {
        if s.path_and_query.starts_with("/api/machines/") {
            ok(&format!(
                r#"{{"id":"{MACHINE}","computerDnsName":"pc","machineTags":["a"]}}"#
            ))
        } else {
            ok(ACTION_JSON)
        }
    });
    let (c, _) = client_for(&m).await;
    let machine = c.get_machine(MACHINE, "k").await.unwrap();
    assert_eq!(machine.computer_dns_name.as_deref(), Some("pc"));
    c.get_action("a/b?c d", "k").await.unwrap();
    assert_eq!(
        m.api_calls()[1].path_and_query,
        "/api/machineactions/a%2Fb%3Fc%20d"
    );
    for bad in ["", "..", "."] {
        assert_eq!(
            c.get_action(bad, "k").await.unwrap_err().class(),
            ErrorClass::InvalidRequest
        );
    }
    for bad in ["../x", &MACHINE.to_uppercase(), "1e5b"] {
        let e = c.unisolate(bad, "c", "k").await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidRequest);
        assert!(e.http_status().is_none());
    }
    assert_eq!(m.api_calls().len(), 2, "invalid ids never reach the server");
}

#[tokio::test]
async fn a_401_refreshes_the_token_and_retries_once() {
    let m = mock(|s, _| {
        if s.auth == "Bearer tok-0" {
            err(401, "Unauthorized", "expired")
        } else {
            (201, vec![], ACTION_JSON.to_owned())
        }
    });
    let (c, rec) = client_for(&m).await;
    c.unisolate(MACHINE, "c", "k").await.unwrap();
    let auths: Vec<String> = m.api_calls().into_iter().map(|s| s.auth).collect();
    assert_eq!(auths, ["Bearer tok-0", "Bearer tok-1"]);
    assert_eq!(m.tokens(), 2);
    assert_eq!(rec.outcomes(), ["unauthorized", "ok"]);
    // The fresh token is kept.
    c.get_action("x", "k").await.unwrap();
    assert_eq!(m.tokens(), 2);
}

#[tokio::test]
async fn a_second_401_is_an_authentication_failure() {
    let m = mock(|_, _| err(401, "Unauthorized", "nope"));
    let (c, rec) = client_for(&m).await;
    let e = c.get_action("x", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::AuthenticationFailed);
    assert_eq!(e.http_status(), Some(401));
    assert_eq!(m.api_calls().len(), 2);
    assert_eq!(m.tokens(), 2);
    assert_eq!(rec.outcomes(), ["unauthorized", "authentication_failed"]);
}

#[tokio::test]
async fn the_401_retry_needs_its_own_admission() {
    let m = mock(|_, _| err(401, "Unauthorized", "nope"));
    let url = serve_plain(router(m.clone())).await;
    let mut setup = Setup::new(&url);
    setup.gate = QuotaConfig {
        per_minute: 1,
        per_hour: 10,
        minute: Duration::from_secs(60),
        hour: Duration::from_secs(3600),
        guard: Duration::from_secs(1),
    };
    let (c, _) = setup.build();
    let e = c.get_action("x", "k").await.unwrap_err();
    assert!(matches!(e.class(), ErrorClass::QuotaWait { .. }), "{e:?}");
    assert_eq!(m.api_calls().len(), 1);
}

#[tokio::test]
async fn quota_wait_sends_nothing() {
    let m = mock(|_, _| ok(ACTION_JSON));
    let url = serve_plain(router(m.clone())).await;
    let mut setup = Setup::new(&url);
    setup.gate = QuotaConfig {
        per_minute: 1,
        ..QuotaConfig::from_budget(1.0, 1.0)
    };
    let (c, rec) = setup.build();
    c.get_action("a", "ns/one").await.unwrap();
    let before = Instant::now();
    let e = c.get_action("b", "ns/two").await.unwrap_err();
    match e.class() {
        ErrorClass::QuotaWait { until } => {
            assert!(until >= before + Duration::from_secs(55));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "waiting for the operator's MDE machine actions read quota budget"
    );
    // The same key asking again gets the same slot; other APIs are independent.
    let again = c.get_action("b", "ns/two").await.unwrap_err();
    assert_eq!(again.class(), e.class());
    c.get_machine(MACHINE, "ns/two").await.unwrap();
    assert_eq!(m.api_calls().len(), 2);
    assert_eq!(
        rec.outcomes(),
        ["ok", "ok"],
        "quota waits are not observed as calls"
    );
}

#[tokio::test]
async fn a_429_without_retry_after_pauses_for_the_wait_its_body_names() {
    let m = mock(|_, _| {
        err(
            429,
            "TooManyRequests",
            "Maximum allowed 30 per 00:01:00 for the key Destination+TenantID+AppID. You can send \
             requests again in 8 seconds",
        )
    });
    let url = serve_plain(router(m.clone())).await;
    let (c, _rec) = Setup::new(&url).build();
    let before = Instant::now();
    let e = c.unisolate(MACHINE, "c", "ns/a").await.unwrap_err();
    assert_eq!(
        e.class(),
        ErrorClass::RateLimited {
            retry_after: Duration::from_secs(8)
        }
    );
    let paused = c.gate().paused_until(Api::Unisolate).unwrap();
    assert!(paused >= before + Duration::from_secs(8));
    assert!(paused < before + Duration::from_secs(60), "not the default");
}

#[tokio::test]
async fn a_429_pauses_the_api_for_everyone() {
    let m = mock(|_, _| {
        let (s, _, b) = err(429, "TooManyRequests", "slow down");
        (s, vec![("retry-after", "120".into())], b)
    });
    let url = serve_plain(router(m.clone())).await;
    let mut setup = Setup::new(&url);
    setup.time_scale = 60.0;
    let (c, rec) = setup.build();
    let before = Instant::now();
    let e = c.unisolate(MACHINE, "c", "ns/a").await.unwrap_err();
    // 120 server seconds at time scale 60.
    assert_eq!(
        e.class(),
        ErrorClass::RateLimited {
            retry_after: Duration::from_secs(2)
        }
    );
    assert_eq!(e.code(), Some("TooManyRequests"));
    let paused = c.gate().paused_until(Api::Unisolate).unwrap();
    assert!(paused >= before + Duration::from_secs(2));
    let e = c.unisolate(MACHINE, "c", "ns/b").await.unwrap_err();
    assert!(matches!(e.class(), ErrorClass::QuotaWait { until } if until >= paused));
    assert_eq!(m.api_calls().len(), 1);
    assert_eq!(rec.outcomes(), ["rate_limited"]);
    assert!(c.gate().paused_until(Api::Isolate).is_none());
}

fn retry_after(headers: &HeaderMap, body: &[u8], time_scale: f64) -> Duration {
    throttle_of(headers, body, time_scale).0
}

#[test]
fn retry_after_forms() {
    let mut h = HeaderMap::new();
    assert_eq!(retry_after(&h, b"", 1.0), Duration::from_secs(60));
    assert_eq!(retry_after(&h, b"", 60.0), Duration::from_secs(1));
    h.insert(RETRY_AFTER, "7".parse().unwrap());
    assert_eq!(retry_after(&h, b"", 1.0), Duration::from_secs(7));
    h.insert(RETRY_AFTER, "1.5".parse().unwrap());
    assert_eq!(retry_after(&h, b"", 1.0), Duration::from_millis(1500));
    h.insert(RETRY_AFTER, "-3".parse().unwrap());
    assert_eq!(retry_after(&h, b"", 1.0), Duration::from_secs(60));
    h.insert(RETRY_AFTER, "soon".parse().unwrap());
    assert_eq!(retry_after(&h, b"", 1.0), Duration::from_secs(60));
    h.insert(RETRY_AFTER, "99999999".parse().unwrap());
    assert_eq!(retry_after(&h, b"", 1.0), Duration::from_secs(3600));
    let at = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
    h.insert(RETRY_AFTER, at.parse().unwrap());
    let d = retry_after(&h, b"", 1.0);
    assert!(
        d > Duration::from_secs(27) && d <= Duration::from_secs(30),
        "{d:?}"
    );
}

#[test]
fn a_429_without_retry_after_uses_the_wait_its_body_names() {
    let none = HeaderMap::new();
    let real = br#"{"error":{"code":"TooManyRequests","message":"Maximum allowed 30 per 00:01:00 for the key Destination+TenantID+AppID. You can send requests again in 8 seconds","target":"x"}}"#;
    assert_eq!(retry_after(&none, real, 1.0), Duration::from_secs(8));
    assert_eq!(retry_after(&none, real, 4.0), Duration::from_secs(2));
    let sim = b"API calls quota exceeded! ... Please try again in 12 seconds.";
    assert_eq!(retry_after(&none, sim, 1.0), Duration::from_secs(12));
    // The header wins over the body; no number, or another unit, falls back to 60 s.
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, "3".parse().unwrap());
    assert_eq!(retry_after(&h, real, 1.0), Duration::from_secs(3));
    assert_eq!(
        retry_after(&none, b"try again in a while", 1.0),
        Duration::from_secs(60)
    );
    assert_eq!(
        retry_after(&none, b"try again in 5 minutes", 1.0),
        Duration::from_secs(60)
    );
    assert_eq!(
        retry_after(&none, b"send requests again in 999999 seconds", 1.0),
        Duration::from_secs(3600)
    );
}

#[test]
fn a_429_names_the_window_that_refused_and_caps_the_pause_to_it() {
    let minute = br#"{"error":{"code":"TooManyRequests","message":"Maximum allowed 100 per 00:01:00 for the key Destination+TenantID+AppID. You can send requests again in 8 seconds"}}"#;
    let hour = br#"{"error":{"code":"TooManyRequests","message":"Maximum allowed 1500 per 01:00:00 for the key Destination+TenantID+AppID. You can send requests again in 2400 seconds"}}"#;
    let none = HeaderMap::new();
    assert_eq!(
        throttle_of(&none, minute, 1.0),
        (Duration::from_secs(8), Some(Span::Minute))
    );
    assert_eq!(
        throttle_of(&none, hour, 1.0),
        (Duration::from_secs(2400), Some(Span::Hour))
    );
    // A Retry-After longer than the window it refers to is capped to that window.
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, "68".parse().unwrap());
    assert_eq!(
        throttle_of(&h, minute, 1.0),
        (Duration::from_secs(60), Some(Span::Minute))
    );
    assert_eq!(throttle_of(&h, b"no window here", 1.0).1, None);
    assert_eq!(window_in_body(b"allowed 5 per 1:2 for"), None);
    assert_eq!(window_in_body(b"allowed 5 per 00:00:00 for"), None);
}

#[tokio::test]
async fn errors_are_classified_from_real_responses() {
    let m = mock(|s, _| {
        let p = s.path_and_query.as_str();
        if p.contains("/machines/") && p.ends_with("/isolate") {
            err(403, "Forbidden", "Insufficient permissions")
        } else if p.ends_with("/unisolate") {
            err(
                400,
                "ActiveRequestAlreadyExists",
                "Action is already in progress",
            )
        } else if p.starts_with("/api/machines/") {
            err(404, "ResourceNotFound", "Machine not found")
        } else if p.ends_with("/cancel") {
            err(404, "NotFound", "Action not found")
        } else {
            (500, vec![], "<html>oops</html>".into())
        }
    });
    let (c, _) = client_for(&m).await;
    let e = c
        .isolate(MACHINE, "c", IsolationType::Full, "k")
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Forbidden);
    assert!(e.to_string().contains("Machine.Isolate"));
    assert!(
        !e.to_string().contains("1b2c3d4e"),
        "no target id in the message"
    );
    let e = c.unisolate(MACHINE, "c", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::AlreadyInProgress);
    assert_eq!(e.code(), Some("ActiveRequestAlreadyExists"));
    let e = c.get_machine(MACHINE, "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::MachineNotFound);
    let e = c.cancel_action("x", "c", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::ActionNotFound);
    let e = c.get_action("x", "k").await.unwrap_err();
    assert_eq!(
        (e.class(), e.http_status()),
        (ErrorClass::Transient, Some(500))
    );
}

#[tokio::test]
async fn server_errors_and_garbled_bodies_on_posts_are_ambiguous() {
    let m = mock(|s, _| {
        if s.path_and_query.ends_with("/unisolate") {
            (201, vec![], "{\"id\": ".into())
        } else if s.path_and_query.ends_with("/isolate") {
            (503, vec![], String::new())
        } else {
            ok("not json")
        }
    });
    let (c, rec) = client_for(&m).await;
    let e = c.unisolate(MACHINE, "c", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Ambiguous);
    assert!(e.to_string().contains("may have been created"), "{e}");
    let e = c
        .isolate(MACHINE, "c", IsolationType::Full, "k")
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Ambiguous);
    let e = c.get_action("x", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient);
    assert_eq!(rec.outcomes(), ["ambiguous", "ambiguous", "transient"]);
}

/// Accepts connections, reads the request head, then closes without answering.
async fn serve_dropping() -> Url {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Url::parse(&format!("http://{addr}/")).unwrap()
}

#[tokio::test]
async fn a_connection_lost_after_sending_a_post_is_ambiguous() {
    let tokens = mock(|_, _| ok("{}"));
    let authority = serve_plain(router(tokens)).await;
    let mut setup = Setup::new(&serve_dropping().await);
    setup.authority = authority;
    let (c, _) = setup.build();
    let e = c.unisolate(MACHINE, "c", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Ambiguous, "{e:?}");
    let e = c.get_machine(MACHINE, "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient, "{e:?}");
}

#[tokio::test]
async fn a_timeout_on_a_post_is_ambiguous_and_refused_connections_are_transient() {
    let slow = Arc::new(Mock {
        token_hits: AtomicUsize::new(0),
        api: Mutex::new(Vec::new()),
        respond: Box::new(|_, _| ok(ACTION_JSON)),
    });
    let app = router(slow.clone()).layer(axum::middleware::from_fn(
        |req: axum::extract::Request, next: axum::middleware::Next| async move {
            if req.uri().path().starts_with("/api/") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            next.run(req).await
        },
    ));
    let url = serve_plain(app).await;
    let mut setup = Setup::new(&url);
    setup.timeout = Duration::from_millis(300);
    let (c, _) = setup.build();
    let e = c.cancel_action("x", "c", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Ambiguous, "{e:?}");
    assert!(e.to_string().contains("timed out"), "{e}");
    let e = c.get_action("x", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient, "{e:?}");

    // Nothing listens on the API port: the request never left, even for a POST.
    let tokens = mock(|_, _| ok("{}"));
    let authority = serve_plain(router(tokens)).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut setup = Setup::new(&Url::parse(&format!("http://{addr}/")).unwrap());
    setup.authority = authority;
    let (c, rec) = setup.build();
    let e = c.unisolate(MACHINE, "c", "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient, "{e:?}");
    assert_eq!(rec.outcomes(), ["transient"]);
}

#[tokio::test]
async fn list_actions_follows_next_links_on_the_configured_host() {
    let m = mock(|s, n| {
        assert_eq!(s.method, "GET");
        match n {
            0 => ok(&format!(
                r#"{{"@odata.context":"https://elsewhere/api/$metadata#MachineActions","value":[{ACTION_JSON},{ACTION_JSON}],"@odata.nextLink":"https://elsewhere.invalid:1/api/machineactions?$skiptoken=p2"}}"#
            )),
            1 => {
                assert_eq!(s.path_and_query, "/api/machineactions?$skiptoken=p2");
                ok(&format!(
                    r#"{{"value":[{ACTION_JSON},{{"no":"id"}}],"@odata.nextLink":"/api/machineactions?$skiptoken=p3"}}"#
                ))
            }
            _ => ok(r#"{"value":[]}"#),
        }
    });
    let (c, rec) = client_for(&m).await;
    let q = ListQuery {
        filter: Some(crate::mde::odata::Filter::is_in(
            "status",
            ["Pending", "InProgress"],
        )),
        top: Some(10_000),
        ..ListQuery::default()
    };
    let actions = c.list_actions(&q, "poller").await.unwrap();
    assert_eq!(actions.len(), 3);
    let calls = m.api_calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        calls[0].path_and_query,
        "/api/machineactions?$filter=status%20in%20%28%27Pending%27%2C%27InProgress%27%29&$top=10000"
    );
    assert_eq!(calls[2].path_and_query, "/api/machineactions?$skiptoken=p3");
    assert!(calls.iter().all(|c| c.auth == "Bearer tok-0"));
    assert_eq!(rec.outcomes(), ["ok", "ok", "ok"]);
    // Every page went through the gate.
    let (minute_left, _) = c.gate().remaining(Api::MachineActionsRead, Instant::now());
    assert_eq!(minute_left, 97);
}

#[tokio::test]
async fn paging_stops_on_a_repeated_next_link_or_a_later_quota_wait() {
    let m =
        mock(|_, _| ok(r#"{"value":[],"@odata.nextLink":"/api/machineactions?$skiptoken=same"}"#));
    let (c, _) = client_for(&m).await;
    let e = c
        .list_actions(&ListQuery::default(), "k")
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient);
    assert_eq!(m.api_calls().len(), 2);

    let m = mock(|_, n| {
        ok(&format!(
            r#"{{"value":[],"@odata.nextLink":"/api/machineactions?$skiptoken={n}"}}"#
        ))
    });
    let url = serve_plain(router(m.clone())).await;
    let mut setup = Setup::new(&url);
    setup.gate = QuotaConfig {
        per_minute: 2,
        ..QuotaConfig::from_budget(1.0, 1.0)
    };
    let (c, _) = setup.build();
    let e = c
        .list_actions(&ListQuery::default(), "k")
        .await
        .unwrap_err();
    assert!(matches!(e.class(), ErrorClass::QuotaWait { .. }));
    assert_eq!(m.api_calls().len(), 2);
}

#[tokio::test]
async fn list_machines_treats_404_as_empty() {
    let m = mock(|_, _| err(404, "NotFound", "No machines"));
    let (c, _) = client_for(&m).await;
    assert!(
        c.list_machines(&ListQuery::default(), "k")
            .await
            .unwrap()
            .is_empty()
    );
}

#[test]
fn construction_validates_urls_and_ca_files() {
    let url = Url::parse("http://127.0.0.1:9/").unwrap();
    let with_api = |api: &str| {
        let mut s = Setup::new(&url);
        s.api_url = Url::parse(api).unwrap();
        s.try_build()
    };
    assert!(with_api("ftp://x/").is_err());
    assert!(with_api("mailto:someone@example.com").is_err());
    assert!(with_api("https://api.securitycenter.microsoft.com").is_ok());

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    for ca in [garbage, dir.path().join("missing.pem")] {
        let mut s = Setup::new(&url);
        s.ca_file = Some(ca);
        let e = s.try_build().unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidRequest);
        assert!(e.to_string().contains("CA file"), "{e}");
    }
}

#[test]
fn futures_are_send_and_debug_hides_secrets() {
    fn assert_send<T: Send>(_: &T) {}
    let url = Url::parse("http://127.0.0.1:9/").unwrap();
    let (c, _) = Setup::new(&url).build();
    assert_send(&c.unisolate(MACHINE, "c", "k"));
    assert_send(&c.list_actions(&ListQuery::default(), "k"));
    assert_send(&c.tokens().token());
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("\"s\"") && dbg.contains("<redacted>"),
        "{dbg}"
    );
}

/// Serves `app` over TLS with a fresh self-signed certificate for 127.0.0.1; returns its URL
/// and the certificate (PEM).
async fn serve_tls(app: Router) -> (Url, String) {
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_pem = ck.cert.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (
        Url::parse(&format!("https://127.0.0.1:{}/", addr.port())).unwrap(),
        cert_pem,
    )
}

#[tokio::test]
async fn tls_uses_the_extra_ca_and_never_skips_verification() {
    let m = mock(|_, _| ok(&format!(r#"{{"id":"{MACHINE}"}}"#)));
    let (url, pem) = serve_tls(router(m.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();

    let mut setup = Setup::new(&url);
    setup.ca_file = Some(ca);
    let (c, _) = setup.build();
    assert_eq!(c.get_machine(MACHINE, "k").await.unwrap().id, MACHINE);

    // Without the CA the self-signed certificate is refused (the token request fails first).
    let (c, _) = Setup::new(&url).build();
    let e = c.get_machine(MACHINE, "k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient, "{e:?}");
    assert_eq!(m.api_calls().len(), 1);
}
