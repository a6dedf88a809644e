//! A proxy that applies requests after the client gave up on them (applied-but-timed-out).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::common::http::{serve_loopback, split};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Response, StatusCode};

pub(crate) struct LateApplyProxy {
    pub(crate) base: String,
    pub(crate) upstream: Arc<RwLock<String>>,
    pub(crate) late: Arc<AtomicBool>,
    pub(crate) delayed: Arc<AtomicUsize>,
}

#[derive(Clone)]
pub(crate) struct LateState {
    /// The simulator's address, set once it runs.
    pub(crate) upstream: Arc<RwLock<String>>,
    pub(crate) http: reqwest::Client,
    pub(crate) late: Arc<AtomicBool>,
    pub(crate) delayed: Arc<AtomicUsize>,
}

pub(crate) async fn late_apply_handler(
    State(st): State<LateState>,
    req: Request,
) -> Response<Body> {
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
    pub(crate) async fn start() -> LateApplyProxy {
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
