//! The request pipeline of the MDE API and token endpoints: latency, authentication, quota,
//! faults, the endpoint itself, and the call log entry of every call.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Response, StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};

use crate::auth::{self, Endpoint};
use crate::calls::{ApiName, CallRecord, sim_time_string};
use crate::errors::{ApiError, PLAIN_JSON, json_response, odata_raw};
use crate::faults::FaultKind;
use crate::handlers::{self, Ctx, NoRoute};
use crate::server::ConnAbort;
use crate::state::SimState;

/// Largest request body read.
const MAX_BODY: usize = 1 << 20;

/// State shared by all connections.
#[derive(Debug)]
pub struct Shared {
    /// Everything mutable.
    pub state: Mutex<SimState>,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// Fallback host when a request has no Host header.
    pub host: String,
}

impl Shared {
    /// Locks the state; a panic elsewhere must not wedge the simulator, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `scheme://host` as this request addressed us (for nextLink and @odata.context).
    pub fn base(&self, headers: &HeaderMap) -> String {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
            .unwrap_or(&self.host);
        format!("{}://{}", self.scheme, host)
    }
}

/// Everything logged about a call besides the outcome.
struct CallInfo {
    method: String,
    path: String,
    query: Option<String>,
    api: ApiName,
}

impl CallInfo {
    // One flat log record; grouping the outcome fields would only add ceremony at call sites.
    #[allow(clippy::too_many_arguments)]
    fn log(
        self,
        st: &mut SimState,
        at: DateTime<Utc>,
        app: Option<String>,
        status: u16,
        counted: bool,
        fault: Option<FaultKind>,
        action_id: Option<String>,
    ) {
        let seq = st.calls.len() as u64 + 1;
        st.calls.push(CallRecord {
            seq,
            sim_time: sim_time_string(at),
            real_time: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            app,
            method: self.method,
            path: self.path,
            query: self.query,
            status,
            api: self.api,
            counted,
            fault: fault.map(FaultKind::as_str),
            action_id,
            credential: None,
            sim_at: at,
        });
    }
}

/// Entry point of every request: routes to the admin API, the token endpoints or the MDE API;
/// anything else is a 404 with the MDE error body.
pub async fn dispatch(State(shared): State<Arc<Shared>>, req: Request) -> Response<Body> {
    let mut resp = route(&shared, req).await;
    // MDE's `Date` header is MDE's clock: here the simulated one (clients measure the age of
    // actions with it).
    let now = shared.lock().clock.now();
    let date = now.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    if let Ok(v) = header::HeaderValue::from_str(&date) {
        resp.headers_mut().insert(header::DATE, v);
    }
    resp
}

async fn route(shared: &Arc<Shared>, req: Request) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["sim", rest @ ..] => crate::admin::handle(shared, req, rest).await,
        ["api", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            api_call(shared, req, &rest).await
        }
        [tenant, "oauth2", "v2.0", "token"] => {
            token_call(shared, req, tenant.to_string(), Endpoint::V2).await
        }
        [tenant, "oauth2", "token"] => {
            token_call(shared, req, tenant.to_string(), Endpoint::V1).await
        }
        _ => {
            let resp = ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("No resource matches the path {path}"),
            );
            let mut st = shared.lock();
            let now = st.clock.now();
            call_info(&req, ApiName::Unknown).log(&mut st, now, None, 404, false, None, None);
            resp.into_response()
        }
    }
}

fn call_info(req: &Request, api: ApiName) -> CallInfo {
    CallInfo {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        api,
    }
}

async fn read_body(req: Request) -> Result<(axum::http::request::Parts, Vec<u8>), ApiError> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => Ok((parts, b.to_vec())),
        Err(_) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "InvalidRequestBody",
            format!("Request body could not be read or exceeds {MAX_BODY} bytes"),
        )),
    }
}

async fn api_call(shared: &Shared, req: Request, segs: &[String]) -> Response<Body> {
    let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let abort = req.extensions().get::<ConnAbort>().cloned();
    let route = match handlers::route(req.method(), &seg_refs) {
        Ok(r) => r,
        Err(why) => {
            let err = match why {
                NoRoute::NotFound => ApiError::new(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("No resource matches the path {}", req.uri().path()),
                ),
                NoRoute::MethodNotAllowed => ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!(
                        "The method {} is not allowed on {}",
                        req.method(),
                        req.uri().path()
                    ),
                ),
            };
            let mut st = shared.lock();
            let now = st.clock.now();
            call_info(&req, ApiName::Unknown).log(
                &mut st,
                now,
                None,
                err.status.as_u16(),
                false,
                None,
                None,
            );
            return err.into_response();
        }
    };
    let api = route.api();
    let info = call_info(&req, api);
    let base = shared.base(req.headers());
    let (parts, body) = match read_body(req).await {
        Ok(x) => x,
        Err(e) => {
            let mut st = shared.lock();
            let now = st.clock.now();
            info.log(&mut st, now, None, e.status.as_u16(), false, None, None);
            return e.into_response();
        }
    };
    let latency = shared.lock().faults.latency(api);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (resp, cut) = process_api(shared, &route, info, &parts, &body, &base);
    finish(resp, cut, abort).await
}

/// Sends the response, or resets the connection when a fault says so.
async fn finish(resp: Response<Body>, cut: bool, abort: Option<ConnAbort>) -> Response<Body> {
    match (cut, abort) {
        (true, Some(a)) => a.abort().await,
        _ => resp,
    }
}

/// Auth, quota, faults and the endpoint, under the state lock. Returns the response and
/// whether to cut the connection instead of sending it.
fn process_api(
    shared: &Shared,
    route: &handlers::Route,
    info: CallInfo,
    parts: &axum::http::request::Parts,
    body: &[u8],
    base: &str,
) -> (Response<Body>, bool) {
    let api = route.api();
    let mut st = shared.lock();
    let now = st.clock.now();
    let token = match auth::authorize(&st, &parts.headers, now, route.need()) {
        Ok(t) => t,
        Err((e, app)) => {
            info.log(&mut st, now, app, e.status.as_u16(), false, None, None);
            return (e.into_response(), false);
        }
    };
    let app = Some(token.client_id.clone());
    st.play_foreign(now);
    let limits = st.settings.limits();
    if let Err(throttle) = st.quota.check(&token.client_id, api, now, limits) {
        let e = throttle.error(st.settings.retry_after);
        info.log(&mut st, now, app, 429, false, None, None);
        return (e.into_response(), false);
    }
    let fault = st.faults.draw(api);
    if fault == Some(FaultKind::Drop) {
        // Nothing applied, no quota used.
        info.log(&mut st, now, app, 0, false, fault, None);
        return (ApiError::internal().into_response(), true);
    }
    st.quota.consume(&token.client_id, api, now);
    if fault == Some(FaultKind::ServerError) {
        info.log(&mut st, now, app, 500, true, fault, None);
        return (ApiError::internal().into_response(), false);
    }
    let ctx = Ctx {
        now,
        token: &token,
        base,
        path: parts.uri.path(),
        query: parts.uri.query(),
        body,
    };
    let (resp, status, action_id) = match handlers::handle(&mut st, route, &ctx) {
        Ok(o) => (odata_raw(o.status, o.body), o.status, o.action_id),
        Err(e) => (e.clone().into_response(), e.status, None),
    };
    info.log(&mut st, now, app, status.as_u16(), true, fault, action_id);
    (resp, fault == Some(FaultKind::LostResponse))
}

async fn token_call(
    shared: &Shared,
    req: Request,
    tenant: String,
    endpoint: Endpoint,
) -> Response<Body> {
    let abort = req.extensions().get::<ConnAbort>().cloned();
    let info = call_info(&req, ApiName::Token);
    if req.method() != Method::POST && !(endpoint == Endpoint::V1 && req.method() == Method::GET) {
        let e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "Use POST for token requests",
        );
        let mut st = shared.lock();
        let now = st.clock.now();
        info.log(&mut st, now, None, 405, false, None, None);
        return e.into_response();
    }
    let query = req.uri().query().map(str::to_string);
    // What certificate assertions must name as their audience.
    let token_url = format!("{}{}", shared.base(req.headers()), req.uri().path());
    let (_, body) = match read_body(req).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    // v1 clients sometimes send GET with a form body; fall back to the query string.
    let source = if body.is_empty() {
        query.unwrap_or_default().into_bytes()
    } else {
        body
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&source).into_owned().collect();
    let latency = shared.lock().faults.latency(ApiName::Token);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (resp, cut) = process_token(shared, info, &tenant, &form, endpoint, &token_url);
    finish(resp, cut, abort).await
}

fn process_token(
    shared: &Shared,
    info: CallInfo,
    tenant: &str,
    form: &[(String, String)],
    endpoint: Endpoint,
    token_url: &str,
) -> (Response<Body>, bool) {
    let mut st = shared.lock();
    let now = st.clock.now();
    let fault = st.faults.draw(ApiName::Token);
    match fault {
        Some(FaultKind::Drop) => {
            info.log(&mut st, now, None, 0, false, fault, None);
            return (ApiError::internal().into_response(), true);
        }
        Some(FaultKind::ServerError) => {
            info.log(&mut st, now, None, 500, false, fault, None);
            return (ApiError::internal().into_response(), false);
        }
        _ => {}
    }
    let issued = auth::issue(&mut st, tenant, form, endpoint, token_url, now, Utc::now());
    let resp = match issued.result {
        Ok(v) => json_response(StatusCode::OK, &v, PLAIN_JSON),
        Err(e) => e.into_response(),
    };
    info.log(
        &mut st,
        now,
        issued.client_id,
        resp.status().as_u16(),
        false,
        fault,
        None,
    );
    if let Some(record) = st.calls.last_mut() {
        record.credential = issued.credential;
    }
    (resp, fault == Some(FaultKind::LostResponse))
}
