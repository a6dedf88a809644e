//! The two error wire formats: MDE API errors (`{"error":{"code","message","target"}}`) and
//! Entra ID token endpoint errors (`{"error","error_description","error_codes",...}`), plus the
//! response headers the real API sends.

use axum::body::Body;
use axum::http::{HeaderValue, Response, StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

/// Content type of every MDE API response.
pub const ODATA_JSON: &str =
    "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8";

/// Content type of token endpoint and admin responses.
pub const PLAIN_JSON: &str = "application/json; charset=utf-8";

/// An MDE API error: status, code and message; `target` is a fresh GUID per response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// MDE error code (`ResourceNotFound`, `ODataError`, ...).
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `Retry-After` seconds, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the given status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 with the given code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `ODataError`: a query option the API does not understand.
    pub fn odata(message: impl Into<String>) -> Self {
        Self::bad_request("ODataError", message)
    }

    /// 404 `ResourceNotFound`: an unknown machine or action.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFound", message)
    }

    /// 401 `Unauthorized`: no, unknown or expired token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    /// 403 `Forbidden`: missing role or wrong audience.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// 429 `TooManyRequests`, with a `Retry-After` header when given.
    pub fn too_many(retry_after: Option<u64>, message: impl Into<String>) -> Self {
        Self {
            retry_after,
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", message)
        }
    }

    /// 500 `InternalServerError` (injected faults).
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "An unexpected error occurred. Please try again later.",
        )
    }

    /// The JSON body, with a fresh correlation GUID.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message, "target": Uuid::new_v4().to_string()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response<Body> {
        let mut resp = odata_response(self.status, &self.body());
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A JSON response with the MDE API headers (`Content-Type` with OData parameters,
/// `OData-Version: 4.0`).
pub fn odata_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    odata_raw(
        status,
        serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// Like `odata_response`, for a body already serialized.
pub fn odata_raw(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = raw_response(status, body, ODATA_JSON);
    resp.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    resp
}

/// A JSON response with the given content type.
pub fn json_response(
    status: StatusCode,
    body: &impl Serialize,
    content_type: &'static str,
) -> Response<Body> {
    raw_response(
        status,
        serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec()),
        content_type,
    )
}

fn raw_response(status: StatusCode, bytes: Vec<u8>, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// An Entra ID token endpoint error (`AADSTS...`).
#[derive(Debug, Clone)]
pub struct AadError {
    /// HTTP status (400 or 401).
    pub status: StatusCode,
    /// OAuth error (`invalid_client`, `invalid_request`, ...).
    pub error: &'static str,
    /// The AADSTS number.
    pub aadsts: u32,
    /// The description after `AADSTSnnn: `.
    pub description: String,
}

impl AadError {
    /// 400 with the given OAuth error.
    pub fn bad_request(error: &'static str, aadsts: u32, description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error,
            aadsts,
            description: description.into(),
        }
    }

    /// 401 `invalid_client`.
    pub fn invalid_client(aadsts: u32, description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            aadsts,
            description: description.into(),
        }
    }

    /// 400 `invalid_request` for a missing form parameter.
    pub fn missing(param: &str) -> Self {
        Self::bad_request(
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{param}'."),
        )
    }
}

impl IntoResponse for AadError {
    fn into_response(self) -> Response<Body> {
        let trace = Uuid::new_v4().to_string();
        let correlation = Uuid::new_v4().to_string();
        let ts = chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
        let body = json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {ts}",
                self.aadsts, self.description
            ),
            "error_codes": [self.aadsts],
            "timestamp": ts,
            "trace_id": trace,
            "correlation_id": correlation,
        });
        json_response(self.status, &body, PLAIN_JSON)
    }
}
