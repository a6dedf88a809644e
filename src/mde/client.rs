//! The MDE API client: one `reqwest` client, one token source, and the shared quota gate.
//!
//! Every HTTP call first asks the [`QuotaGate`]; when it must wait, the call fails with
//! [`ErrorClass::QuotaWait`] without touching the network,
//! so a worker is never blocked. A 429 pauses the API in the gate for everyone. A 401 gets one
//! retry with a fresh token (the retry needs its own admission). Errors are classified so that a
//! POST whose outcome is unknown is reported as ambiguous and never retried blindly.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, HeaderMap, RETRY_AFTER};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::cloud::Endpoints;
use super::error::{ErrorClass, MdeError};
use super::model::{IsolationType, Machine, MachineAction, Page, is_valid_machine_id};
use super::odata::ListQuery;
use super::token::{ClientSecret, TokenSource, read_limited, sane_scale};
use crate::quota::{Admission, Api, QuotaGate, Span};

/// Retry-After assumed when a 429 carries none (server seconds).
const DEFAULT_RETRY_AFTER_SECS: f64 = 60.0;
/// Longest Retry-After honoured (server seconds): no window of MDE's is longer than an hour, so
/// a longer value (or one longer than the window the 429 names) is capped to that window.
const MAX_RETRY_AFTER_SECS: f64 = 3_600.0;
/// A response body larger than this is refused (10,000 actions are about 10 MB).
const MAX_BODY: usize = 64 << 20;
/// Paging stops with an error after this many pages.
const MAX_PAGES: usize = 1000;
/// Used when the configured request timeout is zero.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Receives one observation per HTTP request sent to MDE (for metrics).
///
/// `outcome` is `"ok"`, `"unauthorized"` (a 401 that triggers a token refresh and retry), or
/// the [`ErrorClass::label`] of the failure. Calls refused by the quota gate send nothing and are
/// not observed (the caller sees [`ErrorClass::QuotaWait`]).
pub trait CallObserver: Send + Sync {
    /// One request to `api` ended with `outcome` after `elapsed`.
    fn observe(&self, api: Api, outcome: &str, elapsed: Duration);
}

/// Everything the client needs.
pub struct MdeClientConfig {
    /// API, authority and scope.
    pub endpoints: Endpoints,
    /// Entra ID tenant (GUID or domain).
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// The application's credential.
    pub secret: ClientSecret,
    /// Extra PEM CA certificates to trust (in addition to the built-in roots), e.g. for a
    /// TLS-intercepting proxy or the simulator's self-signed certificate.
    pub ca_file: Option<PathBuf>,
    /// Timeout of one whole request (connect, send, receive).
    pub request_timeout: Duration,
    /// Clock compression of the server (1.0 = real time); server-side seconds such as
    /// `Retry-After` and `expires_in` are divided by it.
    pub time_scale: f64,
    /// Optional metrics hook.
    pub observer: Option<Arc<dyn CallObserver>>,
}

impl fmt::Debug for MdeClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdeClientConfig")
            .field("endpoints", &self.endpoints)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("secret", &self.secret)
            .field("ca_file", &self.ca_file)
            .field("request_timeout", &self.request_timeout)
            .field("time_scale", &self.time_scale)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// The MDE API client. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct MdeClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    api_url: Url,
    tokens: TokenSource,
    gate: Arc<QuotaGate>,
    time_scale: f64,
    observer: Option<Arc<dyn CallObserver>>,
    /// The `Date` of MDE's latest response and when it arrived here.
    mde_clock: std::sync::Mutex<Option<(DateTime<Utc>, Instant)>>,
}

impl fmt::Debug for MdeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdeClient")
            .field("api_url", &self.inner.api_url.as_str())
            .field("tokens", &self.inner.tokens)
            .finish_non_exhaustive()
    }
}

/// The result of one HTTP attempt.
enum Attempt<T> {
    /// 401: refresh the token and retry once.
    Unauthorized(Vec<u8>),
    /// Anything else.
    Done(Result<T, MdeError>),
}

fn check_http_url(what: &str, url: &Url) -> Result<(), MdeError> {
    if !matches!(url.scheme(), "https" | "http") || url.cannot_be_a_base() || url.host().is_none() {
        return Err(MdeError::config(format!(
            "the {what} URL must be an http(s) URL with a host"
        )));
    }
    if url.scheme() == "http" {
        tracing::warn!(url = %url, "{what} URL uses plain http: only for tests and the simulator");
    }
    Ok(())
}

fn check_action_id(api: Api, id: &str) -> Result<(), MdeError> {
    // Ids are GUIDs; anything else is still sent (percent-encoded) except what could change the
    // path's meaning.
    if id.is_empty() || id.len() > 128 || id == "." || id == ".." {
        return Err(MdeError::invalid_input(api, "malformed machine action id"));
    }
    Ok(())
}

fn check_machine_id(api: Api, id: &str) -> Result<(), MdeError> {
    if !is_valid_machine_id(id) {
        return Err(MdeError::invalid_input(
            api,
            "malformed machine id (expected 40 lowercase hexadecimal characters)",
        ));
    }
    Ok(())
}

/// `Retry-After` (delta seconds or an HTTP date) in server seconds, when present and readable.
fn retry_after_header(headers: &HeaderMap) -> Option<f64> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .and_then(|s| {
            s.parse::<f64>().ok().or_else(|| {
                DateTime::parse_from_rfc2822(s)
                    .ok()
                    .map(|d| (d.with_timezone(&Utc) - Utc::now()).num_milliseconds() as f64 / 1e3)
                    .map(|d| d.max(0.0))
            })
        })
        .filter(|s| s.is_finite() && *s >= 0.0)
}

/// The wait a 429's body names, in server seconds: MDE's message ends "… You can send requests
/// again in 8 seconds" (or "… try again in 8 seconds").
fn retry_after_in_body(body: &[u8]) -> Option<f64> {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    let (_, rest) = text.rsplit_once("again in ")?;
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let unit = rest[number.len()..].trim_start();
    if !unit.starts_with("second") {
        return None;
    }
    number.parse::<f64>().ok().filter(|s| s.is_finite())
}

/// The window a 429's body names, in server seconds: MDE's message reads "Maximum allowed 30
/// per 00:01:00 for the key …".
fn window_in_body(body: &[u8]) -> Option<f64> {
    let text = String::from_utf8_lossy(body);
    let (_, rest) = text.split_once(" per ")?;
    let hms = rest.split_whitespace().next()?.trim_end_matches(['.', ',']);
    let mut parts = hms.split(':').map(|p| p.parse::<u32>().ok());
    let (Some(Some(h)), Some(Some(m)), Some(Some(s)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let secs = f64::from(h) * 3600.0 + f64::from(m) * 60.0 + f64::from(s);
    (secs > 0.0).then_some(secs)
}

/// What a 429 says: the pause in local time (`Retry-After`, else the wait its body names, else
/// 60 server seconds; never longer than the window it names, nor than an hour) and which window
/// refused the call, when the body names it.
fn throttle_of(headers: &HeaderMap, body: &[u8], time_scale: f64) -> (Duration, Option<Span>) {
    let window = window_in_body(body);
    let secs = retry_after_header(headers)
        .or_else(|| retry_after_in_body(body))
        .unwrap_or(DEFAULT_RETRY_AFTER_SECS)
        .min(window.unwrap_or(MAX_RETRY_AFTER_SECS))
        .min(MAX_RETRY_AFTER_SECS);
    let span = window.map(|w| if w <= 60.0 { Span::Minute } else { Span::Hour });
    (Duration::from_secs_f64(secs / time_scale), span)
}

impl MdeClient {
    /// Builds the client. Fails on a malformed URL or tenant, or an unreadable CA file.
    pub fn new(cfg: MdeClientConfig, gate: Arc<QuotaGate>) -> Result<Self, MdeError> {
        check_http_url("MDE API", &cfg.endpoints.api_url)?;
        check_http_url("authority", &cfg.endpoints.authority)?;
        let timeout = if cfg.request_timeout.is_zero() {
            FALLBACK_TIMEOUT
        } else {
            cfg.request_timeout
        };
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // MDE does not redirect; following one could turn a POST into a GET elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "mde-isolation-operator/",
                env!("CARGO_PKG_VERSION")
            ));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                MdeError::config_with(format!("reading the CA file {}", path.display()), e)
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                MdeError::config_with(format!("parsing the CA file {}", path.display()), e)
            })?;
            if certs.is_empty() {
                return Err(MdeError::config(format!(
                    "the CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
            // Added to the built-in roots; verification itself is never relaxed.
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| MdeError::config_with("building the HTTP client", e))?;
        let tokens = TokenSource::new(
            http.clone(),
            &cfg.endpoints.authority,
            &cfg.tenant_id,
            &cfg.client_id,
            &cfg.endpoints.scope,
            cfg.secret,
            cfg.time_scale,
        )?;
        Ok(MdeClient {
            inner: Arc::new(Inner {
                http,
                api_url: cfg.endpoints.api_url,
                tokens,
                gate,
                time_scale: sane_scale(cfg.time_scale),
                observer: cfg.observer,
                mde_clock: std::sync::Mutex::new(None),
            }),
        })
    }

    /// The shared quota gate.
    pub fn gate(&self) -> &Arc<QuotaGate> {
        &self.inner.gate
    }

    /// The token source (e.g. to warm it up at startup).
    pub fn tokens(&self) -> &TokenSource {
        &self.inner.tokens
    }

    /// `POST /api/machines/{id}/unisolate` with `{"Comment": comment}`.
    pub async fn unisolate(
        &self,
        machine_id: &str,
        comment: &str,
        key: &str,
    ) -> Result<MachineAction, MdeError> {
        let api = Api::Unisolate;
        check_machine_id(api, machine_id)?;
        let url = self.url(&["api", "machines", machine_id, "unisolate"]);
        let body = json!({ "Comment": comment });
        self.request(api, Method::POST, url, Some(&body), key, parse_json)
            .await
    }

    /// `POST /api/machines/{id}/isolate` with `{"Comment": comment, "IsolationType": ...}`.
    pub async fn isolate(
        &self,
        machine_id: &str,
        comment: &str,
        isolation_type: IsolationType,
        key: &str,
    ) -> Result<MachineAction, MdeError> {
        let api = Api::Isolate;
        check_machine_id(api, machine_id)?;
        let url = self.url(&["api", "machines", machine_id, "isolate"]);
        let body = json!({ "Comment": comment, "IsolationType": isolation_type.as_str() });
        self.request(api, Method::POST, url, Some(&body), key, parse_json)
            .await
    }

    /// `POST /api/machineactions/{id}/cancel` with `{"Comment": comment}`.
    pub async fn cancel_action(
        &self,
        id: &str,
        comment: &str,
        key: &str,
    ) -> Result<MachineAction, MdeError> {
        let api = Api::Cancel;
        check_action_id(api, id)?;
        let url = self.url(&["api", "machineactions", id, "cancel"]);
        let body = json!({ "Comment": comment });
        self.request(api, Method::POST, url, Some(&body), key, parse_json)
            .await
    }

    /// `GET /api/machineactions/{id}`.
    pub async fn get_action(&self, id: &str, key: &str) -> Result<MachineAction, MdeError> {
        let api = Api::MachineActionsRead;
        check_action_id(api, id)?;
        let url = self.url(&["api", "machineactions", id]);
        self.request(api, Method::GET, url, None, key, parse_json)
            .await
    }

    /// MDE's clock now, from the `Date` of its latest response plus the time elapsed here since
    /// (times the time scale). `Date` has whole seconds and is truncated, so this is never ahead
    /// of MDE: ages measured with it are never longer than the truth. `None` before any answer
    /// carried a `Date`.
    pub fn mde_now(&self) -> Option<DateTime<Utc>> {
        let seen = *self
            .inner
            .mde_clock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (date, at) = seen?;
        let since = at.elapsed().mul_f64(self.inner.time_scale);
        Some(date + chrono::Duration::from_std(since).unwrap_or_default())
    }

    /// `GET /api/machineactions?...`, following `@odata.nextLink` to the end. Every page passes
    /// the gate; if a later page must wait, the whole call fails with `QuotaWait`.
    pub async fn list_actions(
        &self,
        query: &ListQuery,
        key: &str,
    ) -> Result<Vec<MachineAction>, MdeError> {
        self.list(
            Api::MachineActionsRead,
            &["api", "machineactions"],
            query,
            key,
        )
        .await
    }

    /// `GET /api/machines/{id}`.
    pub async fn get_machine(&self, id: &str, key: &str) -> Result<Machine, MdeError> {
        let api = Api::MachinesRead;
        check_machine_id(api, id)?;
        let url = self.url(&["api", "machines", id]);
        self.request(api, Method::GET, url, None, key, parse_json)
            .await
    }

    /// `GET /api/machines?...`, following `@odata.nextLink`. MDE answers 404 instead of an empty
    /// list when it has no recent machines; that becomes an empty list.
    pub async fn list_machines(
        &self,
        query: &ListQuery,
        key: &str,
    ) -> Result<Vec<Machine>, MdeError> {
        match self
            .list(Api::MachinesRead, &["api", "machines"], query, key)
            .await
        {
            Err(e) if e.class() == ErrorClass::MachineNotFound => Ok(Vec::new()),
            other => other,
        }
    }

    /// The API base with `segments` appended, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.api_url.clone();
        // `new` checked that the URL can be a base, so this cannot fail.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Resolves a `@odata.nextLink` against the current page and pins it to the configured API
    /// origin, so the bearer token never goes to a host named by a response body.
    fn next_url(&self, current: &Url, link: &str) -> Result<Url, MdeError> {
        let api = Api::MachineActionsRead;
        let parsed = current
            .join(link)
            .map_err(|_| MdeError::paging(api, "unparseable @odata.nextLink"))?;
        if parsed.origin() == self.inner.api_url.origin() {
            return Ok(parsed);
        }
        tracing::debug!(next = %parsed, "@odata.nextLink names another host; following it on the configured API host");
        let mut url = self.inner.api_url.clone();
        url.set_path(parsed.path());
        url.set_query(parsed.query());
        Ok(url)
    }

    async fn list<T: DeserializeOwned>(
        &self,
        api: Api,
        segments: &[&str],
        query: &ListQuery,
        key: &str,
    ) -> Result<Vec<T>, MdeError> {
        let mut url = self.url(segments);
        let qs = query.to_query_string();
        url.set_query((!qs.is_empty()).then_some(qs.as_str()));
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for _ in 0..MAX_PAGES {
            let page: Page<T> = self
                .request(api, Method::GET, url.clone(), None, key, Page::parse)
                .await?;
            if page.skipped > 0 {
                tracing::warn!(
                    api = api.as_str(),
                    skipped = page.skipped,
                    "skipped MDE list items that do not parse"
                );
            }
            out.extend(page.items);
            let Some(link) = page.next_link else {
                return Ok(out);
            };
            let next = self.next_url(&url, &link)?;
            if !seen.insert(next.to_string()) || next == url {
                return Err(MdeError::paging(api, "@odata.nextLink repeats a page"));
            }
            url = next;
        }
        Err(MdeError::paging(api, "too many pages"))
    }

    /// One logical call: token, admission, send, one retry on 401.
    async fn request<T, E>(
        &self,
        api: Api,
        method: Method,
        url: Url,
        body: Option<&Value>,
        key: &str,
        parse: fn(&[u8]) -> Result<T, E>,
    ) -> Result<T, MdeError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut refreshed = false;
        loop {
            let token = self.inner.tokens.token().await?;
            let started = Instant::now();
            if let Admission::WaitUntil(until) = self.inner.gate.reserve(api, key, started) {
                tracing::debug!(api = api.as_str(), key, "waiting for quota");
                return Err(MdeError::quota_wait(api, until));
            }
            let attempt = self
                .send(api, started, &method, &url, body, &token, parse)
                .await;
            let elapsed = started.elapsed();
            let (outcome, result) = match attempt {
                Attempt::Unauthorized(_) if !refreshed => {
                    self.observe(api, "unauthorized", elapsed);
                    tracing::debug!(
                        api = api.as_str(),
                        "401: refreshing the token and retrying once"
                    );
                    self.inner.tokens.invalidate_if(&token);
                    refreshed = true;
                    continue;
                }
                Attempt::Unauthorized(bytes) => {
                    let e = MdeError::from_response(api, 401, &bytes, Duration::ZERO);
                    (e.class().label(), Err(e))
                }
                Attempt::Done(Ok(v)) => ("ok", Ok(v)),
                Attempt::Done(Err(e)) => (e.class().label(), Err(e)),
            };
            self.observe(api, outcome, elapsed);
            match &result {
                Ok(_) => tracing::debug!(
                    api = api.as_str(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "MDE call succeeded"
                ),
                Err(e) => tracing::debug!(
                    api = api.as_str(),
                    status = e.http_status(),
                    outcome,
                    elapsed_ms = elapsed.as_millis() as u64,
                    error = %e,
                    "MDE call failed"
                ),
            }
            return result;
        }
    }

    /// One HTTP request of a call the gate admitted at `sent`.
    #[allow(clippy::too_many_arguments)]
    async fn send<T, E>(
        &self,
        api: Api,
        sent: Instant,
        method: &Method,
        url: &Url,
        body: Option<&Value>,
        token: &str,
        parse: fn(&[u8]) -> Result<T, E>,
    ) -> Attempt<T>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut req = self
            .inner
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(token)
            .header(ACCEPT, "application/json");
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Done(Err(MdeError::transport(api, e))),
        };
        let status = resp.status().as_u16();
        let date = resp.headers().get(reqwest::header::DATE);
        let date = date.and_then(|d| DateTime::parse_from_rfc2822(d.to_str().ok()?).ok());
        if let Some(date) = date {
            *self
                .inner
                .mde_clock
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((date.to_utc(), Instant::now()));
        }
        if status != 429 {
            // MDE answered without throttling: a probe after a 429 succeeded.
            self.inner.gate.record_answer(api);
        }
        let headers = (status == 429).then(|| resp.headers().clone());
        let bytes = read_limited(resp, MAX_BODY).await;
        if let Some(headers) = headers {
            // A 429's body is a few hundred bytes: reading it before pausing costs nothing, and
            // it names the window that refused the call.
            let body = bytes.unwrap_or_default();
            let (wait, span) = throttle_of(&headers, &body, self.inner.time_scale);
            let now = Instant::now();
            self.inner.gate.refused(api, sent, span, now + wait, now);
            tracing::warn!(
                api = api.as_str(),
                retry_after_ms = wait.as_millis() as u64,
                window = ?span,
                "MDE throttled the API (429)"
            );
            return Attempt::Done(Err(MdeError::rate_limited(api, wait, &body)));
        }
        match (status, bytes) {
            (401, b) => Attempt::Unauthorized(b.unwrap_or_default()),
            (200..=299, Ok(b)) => {
                Attempt::Done(parse(&b).map_err(|e| MdeError::bad_success_body(api, status, e)))
            }
            (200..=299, Err(Some(e))) => Attempt::Done(Err(MdeError::bad_success_body(
                api,
                status,
                e.without_url(),
            ))),
            (200..=299, Err(None)) => Attempt::Done(Err(MdeError::bad_success_body(
                api,
                status,
                std::io::Error::other("response body too large"),
            ))),
            (_, b) => Attempt::Done(Err(MdeError::from_response(
                api,
                status,
                &b.unwrap_or_default(),
                Duration::ZERO,
            ))),
        }
    }

    fn observe(&self, api: Api, outcome: &str, elapsed: Duration) {
        if let Some(o) = &self.inner.observer {
            o.observe(api, outcome, elapsed);
        }
    }
}

fn parse_json<T: DeserializeOwned>(b: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(b)
}

#[cfg(test)]
mod tests;
