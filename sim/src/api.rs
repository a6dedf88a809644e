//! The request pipeline of the MDE API and token endpoints: latency, authentication, quota,
//! faults, the endpoint itself, and the call log entry of every call.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Response, StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};

use crate::auth::{self, Endpoint, TokenInfo};
use crate::calls::{ApiName, CallRecord, sim_time_string};
use crate::errors::{ApiError, PLAIN_JSON, json_response, odata_raw};
use crate::faults::FaultKind;
use crate::handlers::{self, Ctx, NoRoute};
use crate::server::ConnAbort;
use crate::state::{SimState, TenantKey};

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

/// Everything logged about a call besides the outcome: the request, and whom it is
/// attributed to once known (the tenant and app of its token, or the tenant of a token URL).
struct CallInfo {
    method: String,
    path: String,
    query: Option<String>,
    api: ApiName,
    /// Whose log it goes to: the default tenant's until attributed.
    key: TenantKey,
    /// The record's `tenant`, `app` and `credential` (see `CallRecord`).
    tenant: Option<String>,
    app: Option<String>,
    credential: Option<String>,
}

impl CallInfo {
    /// Attributes the call to the tenant and app of a recognised token.
    fn by_token(&mut self, token: &TokenInfo) {
        self.key = token.tenant.clone();
        self.tenant = Some(token.tid.clone());
        self.app = Some(token.client_id.clone());
    }

    fn log(
        self,
        st: &mut SimState,
        at: DateTime<Utc>,
        status: u16,
        counted: bool,
        fault: Option<FaultKind>,
        action_id: Option<String>,
    ) {
        let record = CallRecord {
            // Numbered by `log_call`.
            seq: 0,
            sim_time: sim_time_string(at),
            real_time: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            tenant: self.tenant,
            app: self.app,
            method: self.method,
            path: self.path,
            query: self.query,
            status,
            api: self.api,
            counted,
            fault: fault.map(FaultKind::as_str),
            action_id,
            credential: self.credential,
            sim_at: at,
        };
        st.log_call(&self.key, record);
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
            call_info(&req, ApiName::Unknown).log(&mut st, now, 404, false, None, None);
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
        key: TenantKey::Default,
        tenant: None,
        app: None,
        credential: None,
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
            info.log(&mut st, now, e.status.as_u16(), false, None, None);
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
    mut info: CallInfo,
    parts: &axum::http::request::Parts,
    body: &[u8],
    base: &str,
) -> (Response<Body>, bool) {
    let mut guard = shared.lock();
    let st = &mut *guard;
    let now = st.clock.now();
    let token = match auth::authorize(st, &parts.headers, now, route.need()) {
        Ok(t) => t,
        Err((e, known)) => {
            if let Some(t) = known {
                info.by_token(t);
            }
            info.log(st, now, e.status.as_u16(), false, None, None);
            return (e.into_response(), false);
        }
    };
    info.by_token(&token);
    let ctx = Ctx {
        now,
        token: &token,
        base,
        path: parts.uri.path(),
        query: parts.uri.query(),
        body,
    };
    let served = serve_api(st, route, &ctx);
    info.log(
        st,
        now,
        served.status,
        served.counted,
        served.fault,
        served.action_id,
    );
    let cut = matches!(
        served.fault,
        Some(FaultKind::Drop | FaultKind::LostResponse)
    );
    (served.response, cut)
}

/// What an authorized API call got, and what its log record says about it.
struct Served {
    response: Response<Body>,
    status: u16,
    counted: bool,
    fault: Option<FaultKind>,
    action_id: Option<String>,
}

impl Served {
    fn error(e: ApiError, counted: bool, fault: Option<FaultKind>) -> Self {
        Served {
            status: e.status.as_u16(),
            response: e.into_response(),
            counted,
            fault,
            action_id: None,
        }
    }
}

/// Quota, faults and the endpoint for an authorized call, in the tenant of its token.
fn serve_api(st: &mut SimState, route: &handlers::Route, ctx: &Ctx<'_>) -> Served {
    let api = route.api();
    let (now, app) = (ctx.now, ctx.token.client_id.as_str());
    let limits = st.settings.limits();
    let Some(tenant) = st.tenants.get_mut(&ctx.token.tenant) else {
        // Tokens of a removed tenant are revoked with it; this is only a safety net.
        let e = ApiError::unauthorized("The access token is invalid.");
        return Served::error(e, false, None);
    };
    tenant.play_foreign(now, limits);
    if let Err(throttle) = tenant.quota.check(app, api, now, limits) {
        return Served::error(throttle.error(st.settings.retry_after), false, None);
    }
    let fault = st.faults.draw(api);
    if fault == Some(FaultKind::Drop) {
        // Nothing applied, no quota used; the connection is cut, so the response is not sent.
        let mut served = Served::error(ApiError::internal(), false, fault);
        served.status = 0;
        return served;
    }
    tenant.quota.consume(app, api, now);
    if fault == Some(FaultKind::ServerError) {
        return Served::error(ApiError::internal(), true, fault);
    }
    match handlers::handle(tenant, &st.settings, route, ctx) {
        Ok(o) => Served {
            response: odata_raw(o.status, o.body),
            status: o.status.as_u16(),
            counted: true,
            fault,
            action_id: o.action_id,
        },
        Err(e) => Served::error(e, true, fault),
    }
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
        info.log(&mut st, now, 405, false, None, None);
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
    mut info: CallInfo,
    tenant: &str,
    form: &[(String, String)],
    endpoint: Endpoint,
    token_url: &str,
) -> (Response<Body>, bool) {
    let mut st = shared.lock();
    let now = st.clock.now();
    // A token request belongs to the tenant of its URL.
    info.key = st.resolve(tenant);
    info.tenant = Some(
        st.tenants
            .get(&info.key)
            .map_or_else(|| tenant.to_string(), |t| t.tid(tenant)),
    );
    let fault = st.faults.draw(ApiName::Token);
    match fault {
        Some(FaultKind::Drop) => {
            info.log(&mut st, now, 0, false, fault, None);
            return (ApiError::internal().into_response(), true);
        }
        Some(FaultKind::ServerError) => {
            info.log(&mut st, now, 500, false, fault, None);
            return (ApiError::internal().into_response(), false);
        }
        _ => {}
    }
    let key = info.key.clone();
    let issued = auth::issue(
        &mut st,
        tenant,
        &key,
        form,
        endpoint,
        token_url,
        now,
        Utc::now(),
    );
    let resp = match issued.result {
        Ok(v) => json_response(StatusCode::OK, &v, PLAIN_JSON),
        Err(e) => e.into_response(),
    };
    info.app = issued.client_id;
    info.credential = issued.credential;
    let status = resp.status().as_u16();
    info.log(&mut st, now, status, false, fault, None);
    (resp, fault == Some(FaultKind::LostResponse))
}
