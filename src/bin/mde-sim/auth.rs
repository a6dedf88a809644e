//! Entra ID client-credentials token issuance (v1 and v2 endpoints) and bearer-token checks
//! on the API: 401 for a missing, unknown or expired token, 403 for a wrong audience or a
//! missing role.

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};

use crate::clock::add_seconds;
use crate::errors::{AadError, ApiError};
use crate::state::SimState;

/// An issued access token.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// The app it was issued to.
    pub client_id: String,
    /// The app's display name (the `requestor` of its actions).
    pub display_name: String,
    /// Roles at issue time.
    pub roles: Vec<String>,
    /// Requested scope without `/.default`, or the v1 resource.
    pub audience: String,
    /// Simulated expiry.
    pub expires_at: DateTime<Utc>,
}

/// Which token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/oauth2/token` with `resource`.
    V1,
    /// `/oauth2/v2.0/token` with `scope`.
    V2,
}

/// The permission an API call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Machine.Read.All or Machine.ReadWrite.All (every GET).
    Read,
    /// Machine.Isolate (isolate, unisolate, cancel).
    Isolate,
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn normalize_audience(a: &str) -> String {
    a.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Handles a token request; `form` is the decoded form body. Returns the client id (for the
/// call log, once known) and the JSON answer.
pub fn issue(
    st: &mut SimState,
    tenant: &str,
    form: &[(String, String)],
    endpoint: Endpoint,
    now: DateTime<Utc>,
) -> (Option<String>, Result<Value, AadError>) {
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let client_id = get("client_id").map(str::to_string);
    let result = (|| {
        let grant = get("grant_type").ok_or_else(|| AadError::missing("grant_type"))?;
        if grant != "client_credentials" {
            return Err(AadError::bad_request(
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{grant}'."),
            ));
        }
        let client_id = get("client_id").ok_or_else(|| AadError::missing("client_id"))?;
        let audience = match endpoint {
            Endpoint::V2 => {
                let scope = get("scope").ok_or_else(|| AadError::missing("scope"))?;
                match scope.trim().strip_suffix("/.default") {
                    Some(aud) if !aud.is_empty() && !aud.contains(' ') => aud.to_string(),
                    _ => {
                        return Err(AadError::bad_request(
                            "invalid_scope",
                            1002012,
                            format!(
                                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                            ),
                        ));
                    }
                }
            }
            Endpoint::V1 => get("resource")
                .ok_or_else(|| AadError::missing("resource"))?
                .to_string(),
        };
        let app = st.apps.iter().find(|a| a.client_id == client_id).cloned().ok_or_else(|| {
            AadError::bad_request(
                "unauthorized_client",
                700016,
                format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'."),
            )
        })?;
        if let Some(secret) = get("client_secret") {
            if app.client_secret.as_deref() != Some(secret) {
                return Err(AadError::invalid_client(
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app.",
                ));
            }
        } else if let Some(assertion) = get("client_assertion") {
            if get("client_assertion_type") != Some(JWT_BEARER) {
                return Err(AadError::bad_request(
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'client_assertion_type'.",
                ));
            }
            check_assertion(assertion, client_id, app.allow_assertion)?;
        } else {
            return Err(AadError::invalid_client(
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            ));
        }
        let lifetime = st.settings.token_lifetime;
        let token: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(96)
            .map(char::from)
            .collect();
        st.tokens.insert(
            token.clone(),
            TokenInfo {
                client_id: app.client_id.clone(),
                display_name: app.display_name.clone(),
                roles: app.roles.clone(),
                audience: audience.clone(),
                expires_at: add_seconds(now, lifetime as f64),
            },
        );
        Ok(match endpoint {
            Endpoint::V2 => json!({
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": token,
            }),
            Endpoint::V1 => {
                let on = now.timestamp() + lifetime as i64;
                let num = |n: i64| {
                    if st.settings.v1_string_numbers {
                        json!(n.to_string())
                    } else {
                        json!(n)
                    }
                };
                json!({
                    "token_type": "Bearer",
                    "expires_in": num(lifetime as i64),
                    "ext_expires_in": num(lifetime as i64),
                    "expires_on": on.to_string(),
                    "not_before": now.timestamp().to_string(),
                    "resource": audience,
                    "access_token": token,
                })
            }
        })
    })();
    (client_id, result)
}

/// Structural check of a client assertion: a JWT whose payload names the client as `iss` and
/// `sub`. The signature is not verified: the simulator has no keys to verify it with.
fn check_assertion(jwt: &str, client_id: &str, allowed: bool) -> Result<(), AadError> {
    let malformed = || {
        AadError::bad_request(
            "invalid_request",
            50027,
            "JWT token is invalid or malformed.",
        )
    };
    if !allowed {
        return Err(AadError::invalid_client(
            700027,
            "Client assertion failed signature validation.",
        ));
    }
    let mut parts = jwt.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let bytes = base64url_decode(payload).ok_or_else(malformed)?;
    let claims: Value = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    let iss = claims.get("iss").and_then(Value::as_str);
    let sub = claims.get("sub").and_then(Value::as_str);
    if iss != Some(client_id) || sub != Some(client_id) {
        return Err(AadError::invalid_client(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    Ok(())
}

/// Decodes unpadded (or padded) base64url.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Checks the bearer token of an API call. On failure also returns the client id when the
/// token was recognised, for the call log.
pub fn authorize(
    st: &SimState,
    headers: &HeaderMap,
    now: DateTime<Utc>,
    need: Need,
) -> Result<TokenInfo, (ApiError, Option<String>)> {
    let header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let token = match header.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
            t.trim()
        }
        _ => {
            return Err((
                ApiError::unauthorized("Authorization header is missing or is not a Bearer token."),
                None,
            ));
        }
    };
    let Some(info) = st.tokens.get(token) else {
        return Err((ApiError::unauthorized("The access token is invalid."), None));
    };
    let app = Some(info.client_id.clone());
    if info.expires_at <= now {
        return Err((ApiError::unauthorized("The access token has expired."), app));
    }
    let aud = normalize_audience(&info.audience);
    if !st
        .settings
        .audiences
        .iter()
        .any(|a| normalize_audience(a) == aud)
    {
        return Err((
            ApiError::forbidden(format!(
                "The access token audience '{}' is not valid for this API.",
                info.audience
            )),
            app,
        ));
    }
    let has = |r: &str| info.roles.iter().any(|x| x == r);
    let (ok, needed) = match need {
        Need::Read => (
            has("Machine.Read.All") || has("Machine.ReadWrite.All"),
            "Machine.Read.All, Machine.ReadWrite.All",
        ),
        Need::Isolate => (has("Machine.Isolate"), "Machine.Isolate"),
    };
    if !ok {
        return Err((
            ApiError::forbidden(format!(
                "The application does not have any of the required application permissions ({needed}) to access the resource."
            )),
            app,
        ));
    }
    Ok(info.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round() {
        assert_eq!(
            base64url_decode("eyJpc3MiOiJhIn0").unwrap(),
            br#"{"iss":"a"}"#.to_vec()
        );
        assert!(base64url_decode("a b").is_none());
    }
}
