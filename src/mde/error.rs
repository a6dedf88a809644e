//! Errors of the MDE client, classified by what the caller should do next.
//!
//! The `Display` text is meant for a Kubernetes condition message: short, stable for the same
//! failure (no per-request correlation ids, no timestamps, no tokens), and naming the MDE code and
//! message. The per-request `target` id MDE returns is logged at debug level instead.

use std::fmt;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::quota::Api;

/// What kind of failure this is, i.e. what the caller should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The machine id is unknown to MDE (404 on a machine path).
    MachineNotFound,
    /// The machine action id is unknown to MDE (404 on an action path).
    ActionNotFound,
    /// 403: the application lacks a permission (or the token is for the wrong audience).
    Forbidden,
    /// 401 even after one token refresh, or the token endpoint refused the credentials.
    AuthenticationFailed,
    /// 400 `OsPlatformNotSupported` / `ClientVersionNotSupported`.
    UnsupportedPlatform,
    /// Any other 400 (or an unexpected 4xx/3xx): the request itself is wrong.
    InvalidRequest,
    /// 400 `ActiveRequestAlreadyExists`: an action of this kind is already open for the machine.
    AlreadyInProgress,
    /// 429: MDE throttled the API; it is paused for everyone for `retry_after` (already scaled to
    /// the local clock).
    RateLimited {
        /// How long MDE asked to wait.
        retry_after: Duration,
    },
    /// Nothing happened on the MDE side (connection refused, DNS, 5xx or a timeout on a GET):
    /// safe to retry later.
    Transient,
    /// A POST may or may not have taken effect (timeout, connection lost after sending, 5xx,
    /// unparseable success body): look the action up before sending it again.
    Ambiguous,
    /// The quota gate refused the call; nothing was sent. Come back at `until`.
    QuotaWait {
        /// When the slot reserved for the caller opens.
        until: Instant,
    },
}

impl ErrorClass {
    /// A short, stable label (for metrics `outcome`).
    pub fn label(&self) -> &'static str {
        match self {
            ErrorClass::MachineNotFound => "machine_not_found",
            ErrorClass::ActionNotFound => "action_not_found",
            ErrorClass::Forbidden => "forbidden",
            ErrorClass::AuthenticationFailed => "authentication_failed",
            ErrorClass::UnsupportedPlatform => "unsupported_platform",
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::AlreadyInProgress => "already_in_progress",
            ErrorClass::RateLimited { .. } => "rate_limited",
            ErrorClass::Transient => "transient",
            ErrorClass::Ambiguous => "ambiguous",
            ErrorClass::QuotaWait { .. } => "quota_wait",
        }
    }
}

/// An MDE client error.
#[derive(Debug, thiserror::Error)]
pub struct MdeError {
    class: ErrorClass,
    api: Option<Api>,
    status: Option<u16>,
    code: Option<String>,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl fmt::Display for MdeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The parts of an MDE (or Entra ID) error body the client uses.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    pub code: Option<String>,
    pub message: Option<String>,
    pub target: Option<String>,
}

impl ErrorBody {
    /// Reads `{"error":{"code","message","target"}}`; anything else (HTML, empty, other JSON)
    /// gives an empty body rather than an error.
    pub(crate) fn parse(body: &[u8]) -> ErrorBody {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return ErrorBody::default();
        };
        let text = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
        ErrorBody {
            code: text("/error/code").filter(|s| !s.is_empty()),
            message: text("/error/message").filter(|s| !s.is_empty()),
            target: text("/error/target"),
        }
    }
}

fn api_phrase(api: Api) -> &'static str {
    match api {
        Api::Isolate => "isolate",
        Api::Unisolate => "unisolate (release)",
        Api::MachineActionsRead => "machine actions read",
        Api::MachinesRead => "machines read",
        Api::Cancel => "cancel action",
    }
}

/// The permission an API needs (mde-api.md §2).
fn permission(api: Api) -> &'static str {
    if api.is_mutation() {
        "Machine.Isolate"
    } else {
        "Machine.Read.All"
    }
}

/// Makes a server-provided message safe and stable for a status condition: drops the
/// per-request target id, control characters and runs of whitespace, and bounds the length.
pub(crate) fn sanitize(message: &str, target: Option<&str>) -> String {
    let mut m = message.to_owned();
    if let Some(t) = target.filter(|t| !t.is_empty()) {
        m = m.replace(t, "");
    }
    let collapsed = m
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    const MAX: usize = 240;
    if collapsed.chars().count() <= MAX {
        collapsed
    } else {
        let cut: String = collapsed.chars().take(MAX).collect();
        format!("{cut}...")
    }
}

/// Classifies an HTTP error status (or an unusable success) of one MDE API.
pub(crate) fn classify(
    api: Api,
    status: u16,
    code: Option<&str>,
    message: Option<&str>,
    retry_after: Duration,
) -> ErrorClass {
    let in_progress = message.is_some_and(|m| {
        m.to_ascii_lowercase()
            .contains("action is already in progress")
    });
    match status {
        400 => match code {
            Some("OsPlatformNotSupported" | "ClientVersionNotSupported") => {
                ErrorClass::UnsupportedPlatform
            }
            Some("ActiveRequestAlreadyExists") => ErrorClass::AlreadyInProgress,
            _ if in_progress => ErrorClass::AlreadyInProgress,
            _ => ErrorClass::InvalidRequest,
        },
        401 => ErrorClass::AuthenticationFailed,
        403 => ErrorClass::Forbidden,
        404 => match api {
            Api::Isolate | Api::Unisolate | Api::MachinesRead => ErrorClass::MachineNotFound,
            Api::MachineActionsRead | Api::Cancel => ErrorClass::ActionNotFound,
        },
        429 => ErrorClass::RateLimited { retry_after },
        // 408 is a server-side timeout: like a timeout, the POST may have been processed.
        200..=299 | 408 | 500..=599 if api.is_mutation() => ErrorClass::Ambiguous,
        200..=299 | 408 | 500..=599 => ErrorClass::Transient,
        _ => ErrorClass::InvalidRequest,
    }
}

impl MdeError {
    fn build(
        class: ErrorClass,
        api: Option<Api>,
        status: Option<u16>,
        code: Option<String>,
        message: String,
    ) -> Self {
        MdeError {
            class,
            api,
            status,
            code,
            message,
            source: None,
        }
    }

    fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What the caller should do.
    pub fn class(&self) -> ErrorClass {
        self.class.clone()
    }

    /// The MDE (or Entra ID) error code, e.g. `ActiveRequestAlreadyExists`.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The HTTP status, when a response was received.
    pub fn http_status(&self) -> Option<u16> {
        self.status
    }

    /// The API the failed call was for (`None` for configuration errors).
    pub fn api(&self) -> Option<Api> {
        self.api
    }

    /// An MDE error response (non-2xx other than a 401 that is still being retried).
    pub(crate) fn from_response(api: Api, status: u16, body: &[u8], retry_after: Duration) -> Self {
        let parsed = ErrorBody::parse(body);
        if let Some(target) = &parsed.target {
            tracing::debug!(api = api.as_str(), status, mde_target = %target, code = ?parsed.code, "MDE error response");
        }
        let class = classify(
            api,
            status,
            parsed.code.as_deref(),
            parsed.message.as_deref(),
            retry_after,
        );
        let what = api_phrase(api);
        let lead = match &class {
            ErrorClass::MachineNotFound => format!("MDE {what}: no machine with this id"),
            ErrorClass::ActionNotFound => format!("MDE {what}: no such machine action"),
            ErrorClass::Forbidden => format!(
                "MDE {what} forbidden: the application likely lacks the {} application \
                 permission (or its token is for another audience)",
                permission(api)
            ),
            ErrorClass::AuthenticationFailed => {
                format!("MDE {what}: access token rejected even after a refresh")
            }
            ErrorClass::UnsupportedPlatform => format!(
                "MDE {what}: the device's OS platform or sensor version does not support it"
            ),
            ErrorClass::AlreadyInProgress => {
                format!("MDE {what}: an action is already in progress for this machine")
            }
            ErrorClass::InvalidRequest if (300..400).contains(&status) => {
                format!("MDE {what}: unexpected redirect (check the API URL)")
            }
            ErrorClass::InvalidRequest => format!("MDE {what}: request rejected as invalid"),
            ErrorClass::RateLimited { .. } => {
                format!("MDE {what}: throttled; paused until Retry-After")
            }
            ErrorClass::Ambiguous => {
                format!("MDE {what}: server error, the action may have been created")
            }
            ErrorClass::Transient | ErrorClass::QuotaWait { .. } => {
                format!("MDE {what}: server error")
            }
        };
        // A 429's message names the seconds left ("try again in 59 seconds"): it would change
        // the condition message on every call.
        let mde_message = match class {
            ErrorClass::RateLimited { .. } => None,
            _ => parsed.message.as_deref(),
        };
        let message = detail(
            lead,
            status,
            parsed.code.as_deref(),
            mde_message,
            parsed.target.as_deref(),
        );
        Self::build(class, Some(api), Some(status), parsed.code, message)
    }

    /// A 429, already turned into a pause of the API.
    pub(crate) fn rate_limited(api: Api, retry_after: Duration, body: &[u8]) -> Self {
        Self::from_response(api, 429, body, retry_after)
    }

    /// The quota gate refused the call; nothing was sent.
    pub fn quota_wait(api: Api, until: Instant) -> Self {
        Self::build(
            ErrorClass::QuotaWait { until },
            Some(api),
            None,
            None,
            format!(
                "waiting for the operator's MDE {} quota budget",
                api_phrase(api)
            ),
        )
    }

    /// The request failed below HTTP (connect, TLS, timeout, connection lost).
    pub(crate) fn transport(api: Api, err: reqwest::Error) -> Self {
        let what = api_phrase(api);
        // Connect errors (refused, DNS, TLS handshake) mean the request never left.
        let (class, message) = if err.is_connect() {
            (
                ErrorClass::Transient,
                format!("MDE {what}: could not connect to the MDE API"),
            )
        } else if err.is_builder() {
            (
                ErrorClass::InvalidRequest,
                format!("MDE {what}: the request could not be built"),
            )
        } else if api.is_mutation() {
            let how = if err.is_timeout() {
                "timed out"
            } else {
                "lost the connection"
            };
            (
                ErrorClass::Ambiguous,
                format!("MDE {what}: {how} after sending; the action may have been created"),
            )
        } else {
            let how = if err.is_timeout() {
                "timed out"
            } else {
                "lost the connection"
            };
            (ErrorClass::Transient, format!("MDE {what}: {how}"))
        };
        Self::build(class, Some(api), None, None, message).with_source(err.without_url())
    }

    /// A success status whose body could not be read or parsed.
    pub(crate) fn bad_success_body(
        api: Api,
        status: u16,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let what = api_phrase(api);
        let (class, message) = if api.is_mutation() {
            (
                ErrorClass::Ambiguous,
                format!(
                    "MDE {what}: HTTP {status} with an unreadable body; the action may have been created"
                ),
            )
        } else {
            (
                ErrorClass::Transient,
                format!("MDE {what}: HTTP {status} with an unreadable body"),
            )
        };
        Self::build(class, Some(api), Some(status), None, message).with_source(source)
    }

    /// Paging did not terminate (a repeated or runaway `@odata.nextLink`).
    pub(crate) fn paging(api: Api, why: &str) -> Self {
        Self::build(
            ErrorClass::Transient,
            Some(api),
            None,
            None,
            format!("MDE {}: {why}", api_phrase(api)),
        )
    }

    /// A caller-side input error (e.g. a malformed machine id); nothing was sent.
    pub fn invalid_input(api: Api, message: impl Into<String>) -> Self {
        Self::build(
            ErrorClass::InvalidRequest,
            Some(api),
            None,
            None,
            format!("MDE {}: {}", api_phrase(api), message.into()),
        )
    }

    /// The client could not be configured (bad URL, unreadable CA file).
    pub fn config(message: impl Into<String>) -> Self {
        Self::build(ErrorClass::InvalidRequest, None, None, None, message.into())
    }

    /// Attaches an underlying cause to a configuration error.
    pub(crate) fn config_with(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::config(message).with_source(source)
    }

    /// The token endpoint answered with an error status.
    pub(crate) fn token_response(status: u16, body: &[u8]) -> Self {
        // Entra ID: {"error":"invalid_client","error_description":"AADSTS7000215: ...\r\nTrace ID: ..."}
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let code = v
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .filter(|s| !s.is_empty());
        // Trace/correlation ids and timestamps follow the first line; they change every time.
        let description = v
            .get("error_description")
            .and_then(Value::as_str)
            .map(|d| {
                let first = d.split(['\r', '\n']).next().unwrap_or("");
                first.split(" Trace ID:").next().unwrap_or("").to_owned()
            })
            .filter(|s| !s.is_empty());
        let (class, lead) = match status {
            400..=499 if status != 408 && status != 429 => (
                ErrorClass::AuthenticationFailed,
                "Entra ID refused the client credentials",
            ),
            _ => (ErrorClass::Transient, "Entra ID token endpoint error"),
        };
        let message = detail(
            lead.to_owned(),
            status,
            code.as_deref(),
            description.as_deref(),
            None,
        );
        Self::build(class, None, Some(status), code, message)
    }

    /// The token endpoint could not be reached or answered nonsense.
    pub(crate) fn token_transport(what: &str, source: Option<reqwest::Error>) -> Self {
        let e = Self::build(
            ErrorClass::Transient,
            None,
            None,
            None,
            format!("Entra ID token endpoint: {what}"),
        );
        match source {
            Some(s) => e.with_source(s.without_url()),
            None => e,
        }
    }
}

fn detail(
    lead: String,
    status: u16,
    code: Option<&str>,
    message: Option<&str>,
    target: Option<&str>,
) -> String {
    let mut out = format!("{lead} (HTTP {status}");
    if let Some(c) = code {
        out.push(' ');
        out.push_str(&sanitize(c, None));
    }
    if let Some(m) = message
        .map(|m| sanitize(m, target))
        .filter(|m| !m.is_empty())
    {
        out.push_str(": ");
        out.push_str(&m);
    }
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RA: Duration = Duration::from_secs(60);

    fn body(code: &str, message: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"error": {"code": code, "message": message,
            "target": "43f4cb08-8fac-4b65-9db1-745c2ae65f3a"}}))
        .unwrap()
    }

    fn class_of(api: Api, status: u16, code: &str, message: &str) -> ErrorClass {
        MdeError::from_response(api, status, &body(code, message), RA).class()
    }

    #[test]
    fn every_documented_code_classifies() {
        use ErrorClass::*;
        let post = Api::Unisolate;
        for code in [
            "BadRequest",
            "ODataError",
            "InvalidInput",
            "InvalidRequestBody",
            "MissingRequiredParameter",
        ] {
            assert_eq!(class_of(post, 400, code, "x"), InvalidRequest, "{code}");
            assert_eq!(
                class_of(Api::MachineActionsRead, 400, code, "x"),
                InvalidRequest
            );
        }
        for code in ["OsPlatformNotSupported", "ClientVersionNotSupported"] {
            assert_eq!(class_of(Api::Isolate, 400, code, "x"), UnsupportedPlatform);
        }
        assert_eq!(
            class_of(post, 400, "ActiveRequestAlreadyExists", "x"),
            AlreadyInProgress
        );
        assert_eq!(
            class_of(post, 400, "BadRequest", "Action is already in progress"),
            AlreadyInProgress
        );
        assert_eq!(
            class_of(post, 401, "Unauthorized", "x"),
            AuthenticationFailed
        );
        for code in ["Forbidden", "DisabledFeature", "DisallowedOperation"] {
            assert_eq!(class_of(post, 403, code, "x"), Forbidden);
        }
        for code in ["NotFound", "ResourceNotFound"] {
            assert_eq!(class_of(Api::Isolate, 404, code, "x"), MachineNotFound);
            assert_eq!(class_of(Api::Unisolate, 404, code, "x"), MachineNotFound);
            assert_eq!(class_of(Api::MachinesRead, 404, code, "x"), MachineNotFound);
            assert_eq!(
                class_of(Api::MachineActionsRead, 404, code, "x"),
                ActionNotFound
            );
            assert_eq!(class_of(Api::Cancel, 404, code, "x"), ActionNotFound);
        }
        assert_eq!(
            class_of(post, 429, "TooManyRequests", "x"),
            RateLimited { retry_after: RA }
        );
        assert_eq!(class_of(post, 500, "InternalServerError", "x"), Ambiguous);
        assert_eq!(class_of(Api::Cancel, 503, "x", "x"), Ambiguous);
        assert_eq!(
            class_of(Api::MachineActionsRead, 500, "InternalServerError", "x"),
            Transient
        );
        assert_eq!(class_of(Api::MachinesRead, 502, "", ""), Transient);
        assert_eq!(class_of(post, 408, "", ""), Ambiguous);
        assert_eq!(class_of(Api::MachinesRead, 408, "", ""), Transient);
        assert_eq!(class_of(post, 409, "Conflict", ""), InvalidRequest);
        assert_eq!(class_of(post, 302, "", ""), InvalidRequest);
    }

    #[test]
    fn non_json_bodies_classify_by_status() {
        use ErrorClass::*;
        let cases: [(&[u8], u16, ErrorClass); 6] = [
            (b"<html>Bad Gateway</html>", 502, Ambiguous),
            (b"", 404, MachineNotFound),
            (b"\xff\xfe\x00", 403, Forbidden),
            (b"{\"error\": 5}", 400, InvalidRequest),
            (b"null", 401, AuthenticationFailed),
            (b"[]", 429, RateLimited { retry_after: RA }),
        ];
        for (b, status, want) in cases {
            let e = MdeError::from_response(Api::Isolate, status, b, RA);
            assert_eq!(e.class(), want, "{status}");
            assert_eq!(e.http_status(), Some(status));
            assert_eq!(e.code(), None);
        }
    }

    #[test]
    fn display_is_short_stable_and_hides_the_target() {
        let e = MdeError::from_response(
            Api::Isolate,
            403,
            &body(
                "Forbidden",
                "Insufficient permissions 43f4cb08-8fac-4b65-9db1-745c2ae65f3a",
            ),
            RA,
        );
        let s = e.to_string();
        assert!(s.contains("Machine.Isolate"), "{s}");
        assert!(
            s.contains("HTTP 403 Forbidden: Insufficient permissions"),
            "{s}"
        );
        assert!(!s.contains("43f4cb08"), "{s}");
        assert_eq!(e.code(), Some("Forbidden"));

        let e = MdeError::from_response(Api::MachineActionsRead, 403, b"", RA);
        assert!(e.to_string().contains("Machine.Read.All"));

        let e = MdeError::from_response(
            Api::Unisolate,
            400,
            &body(
                "ActiveRequestAlreadyExists",
                "Action is already in progress",
            ),
            RA,
        );
        assert_eq!(
            e.to_string(),
            "MDE unisolate (release): an action is already in progress for this machine \
             (HTTP 400 ActiveRequestAlreadyExists: Action is already in progress)"
        );
        // Same failure, another request id: same text (no condition churn).
        let again = MdeError::from_response(
            Api::Unisolate,
            400,
            &serde_json::to_vec(&json!({"error": {"code": "ActiveRequestAlreadyExists",
                "message": "Action is already in progress", "target": "other"}}))
            .unwrap(),
            RA,
        );
        assert_eq!(again.to_string(), e.to_string());

        let throttled = |secs: u32| {
            MdeError::from_response(
                Api::MachineActionsRead,
                429,
                &body(
                    "TooManyRequests",
                    &format!("API calls quota exceeded! Please try again in {secs} seconds."),
                ),
                RA,
            )
            .to_string()
        };
        assert_eq!(throttled(59), throttled(12));
        assert_eq!(
            throttled(1),
            "MDE machine actions read: throttled; paused until Retry-After (HTTP 429 TooManyRequests)"
        );

        let long = "x ".repeat(1000);
        let e = MdeError::from_response(Api::Isolate, 400, &body("BadRequest", &long), RA);
        assert!(e.to_string().len() < 400);
        let e = MdeError::from_response(Api::Isolate, 400, &body("BadRequest", "a\r\n\tb"), RA);
        assert!(e.to_string().ends_with(": a b)"), "{e}");
    }

    #[test]
    fn token_errors_drop_trace_ids() {
        let b = serde_json::to_vec(&json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value. Trace ID: 0b5a7e3c-1234 Correlation ID: 9f3e Timestamp: 2026-11-28 10:00:00Z",
            "error_codes": [7000215],
            "trace_id": "0b5a7e3c-1234"
        }))
        .unwrap();
        let e = MdeError::token_response(401, &b);
        assert_eq!(e.class(), ErrorClass::AuthenticationFailed);
        assert_eq!(e.code(), Some("invalid_client"));
        let s = e.to_string();
        assert!(s.contains("AADSTS7000215"), "{s}");
        assert!(!s.contains("Trace ID") && !s.contains("0b5a7e3c"), "{s}");
        let b = br#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'x' not found.\r\nTrace ID: 1\r\nCorrelation ID: 2"}"#;
        let s = MdeError::token_response(400, b).to_string();
        assert!(s.ends_with("AADSTS90002: Tenant 'x' not found.)"), "{s}");
        assert_eq!(
            MdeError::token_response(503, b"oops").class(),
            ErrorClass::Transient
        );
        assert_eq!(
            MdeError::token_response(429, b"").class(),
            ErrorClass::Transient
        );
    }

    #[test]
    fn quota_wait_and_inputs() {
        let until = Instant::now();
        let e = MdeError::quota_wait(Api::Cancel, until);
        assert_eq!(e.class(), ErrorClass::QuotaWait { until });
        assert_eq!(e.http_status(), None);
        assert_eq!(e.class().label(), "quota_wait");
        let e = MdeError::invalid_input(Api::Isolate, "malformed machine id");
        assert_eq!(e.class(), ErrorClass::InvalidRequest);
        assert_eq!(e.api(), Some(Api::Isolate));
    }

    #[test]
    fn error_body_parsing_is_lenient() {
        assert_eq!(ErrorBody::parse(b"garbage"), ErrorBody::default());
        assert_eq!(
            ErrorBody::parse(br#"{"error":{"code":"","message":null}}"#),
            ErrorBody::default()
        );
        let b = ErrorBody::parse(&body("NotFound", "Machine not found"));
        assert_eq!(b.code.as_deref(), Some("NotFound"));
        assert_eq!(b.message.as_deref(), Some("Machine not found"));
        assert!(b.target.is_some());
    }
}
