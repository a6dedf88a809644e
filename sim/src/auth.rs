//! Entra ID client-credentials token issuance (v1 and v2 endpoints) with a client secret, a
//! certificate assertion or a federated token (workload identity), and bearer-token checks on
//! the API: 401 for a missing, unknown or expired token, 403 for a wrong audience or a missing
//! role. The token URL's tenant id selects the tenant whose apps may sign in; the token then
//! belongs to that tenant.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::{Value, json};

use crate::clock::add_seconds;
use crate::errors::{AadError, ApiError};
use crate::state::{SimState, TenantKey};
use crate::tenant::App;

/// Clock skew tolerated on assertion times (`nbf`, `exp`), as Entra ID's validation does.
const CLOCK_SKEW_SECS: i64 = 300;

/// An issued access token.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// The tenant it was issued in: API calls with it see and change only that tenant.
    pub tenant: TenantKey,
    /// Its `tid` claim: the tenant's id (for the default tenant, the id the token was asked
    /// for at).
    pub tid: String,
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

/// The answer to a token request, with what the call log records about it.
pub struct Issued {
    /// The client id (for the call log), once known.
    pub client_id: Option<String>,
    /// The credential presented, once recognised: `secret`, `certificate:<x5t#S256>`,
    /// `federated:<subject>` or `assertion-unverified`.
    pub credential: Option<String>,
    /// The JSON answer or the Entra error.
    pub result: Result<Value, AadError>,
}

/// Handles a token request at the token URL of tenant id `tenant` (which selects the tenant:
/// only its apps can sign in); `form` is the decoded form body and `token_url` the URL the
/// client posted to (the audience certificate assertions must name). Assertion times are
/// checked against `real_now`: clients sign with the real clock, not the simulated one.
#[allow(clippy::too_many_arguments)]
pub fn issue(
    st: &mut SimState,
    tenant: &str,
    key: &TenantKey,
    form: &[(String, String)],
    endpoint: Endpoint,
    token_url: &str,
    now: DateTime<Utc>,
    real_now: DateTime<Utc>,
) -> Issued {
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let client_id = get("client_id").map(str::to_string);
    let mut credential = None;
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
        let directory = st.tenants.get(key);
        let tid = directory.map_or_else(|| tenant.to_string(), |d| d.tid(tenant));
        let app = directory.and_then(|d| d.apps.iter().find(|a| a.client_id == client_id)).cloned().ok_or_else(|| {
            AadError::bad_request(
                "unauthorized_client",
                700016,
                format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'."),
            )
        })?;
        if let Some(secret) = get("client_secret") {
            credential = Some("secret".to_string());
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
            check_assertion(
                assertion,
                &app,
                token_url,
                real_now.timestamp(),
                &mut credential,
            )?;
        } else {
            return Err(AadError::invalid_client(
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            ));
        }
        let lifetime = st.settings.token_lifetime;
        let info = TokenInfo {
            tenant: key.clone(),
            tid,
            client_id: app.client_id.clone(),
            display_name: app.display_name.clone(),
            roles: app.roles.clone(),
            audience: audience.clone(),
            expires_at: add_seconds(now, lifetime as f64),
        };
        let token = access_token(&info, now);
        st.tokens.insert(token.clone(), info);
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
    Issued {
        client_id,
        credential,
        result,
    }
}

/// An access token shaped like Entra ID's: a JWT whose claims say the tenant (`tid`, `iss`),
/// the app (`appid`), its roles, the audience and the (simulated) times. Its signature is random
/// bytes: the simulator knows its tokens by value, and a client must treat a token for an API as
/// opaque anyway.
fn access_token(info: &TokenInfo, now: DateTime<Utc>) -> String {
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": "mde-sim"});
    let claims = json!({
        "aud": info.audience,
        "iss": format!("https://sts.windows.net/{}/", info.tid),
        "iat": now.timestamp(),
        "nbf": now.timestamp(),
        "exp": info.expires_at.timestamp(),
        "appid": info.client_id,
        "appidacr": "1",
        "idtyp": "app",
        "roles": info.roles,
        "tid": info.tid,
        "ver": "1.0",
    });
    let signature: [u8; 64] = rand::rng().random();
    format!(
        "{}.{}.{}",
        b64(&header),
        b64(&claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// A decoded JWT: header, claims, the signed part and the signature.
struct Jwt<'a> {
    header: Value,
    claims: Value,
    signed: &'a str,
    signature: Vec<u8>,
}

fn malformed() -> AadError {
    AadError::bad_request(
        "invalid_request",
        50027,
        "JWT token is invalid or malformed.",
    )
}

fn decode_jwt(jwt: &str) -> Result<Jwt<'_>, AadError> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let json = |part: &str| {
        base64url_decode(part)
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(Value::is_object)
            .ok_or_else(malformed)
    };
    Ok(Jwt {
        header: json(h)?,
        claims: json(c)?,
        signed: &jwt[..h.len() + 1 + c.len()],
        signature: base64url_decode(sig).ok_or_else(malformed)?,
    })
}

impl Jwt<'_> {
    fn claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    /// `aud` as a list (a JWT may carry one audience or several).
    fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// Checks `nbf` and `exp` (required) against `now`, with [`CLOCK_SKEW_SECS`].
    fn check_times(&self, now: i64) -> Result<(), AadError> {
        let time = |name: &str| self.claims.get(name).and_then(Value::as_i64);
        let exp = time("exp");
        let nbf = time("nbf").or(time("iat"));
        let ok = exp.is_some_and(|exp| now < exp + CLOCK_SKEW_SECS)
            && nbf.is_none_or(|nbf| nbf <= now + CLOCK_SKEW_SECS);
        if ok {
            Ok(())
        } else {
            Err(AadError::invalid_client(
                700024,
                format!(
                    "Client assertion is not within its valid time range. Current time: {now}, assertion valid from {}, expiry time of assertion {}.",
                    nbf.map_or("-".into(), |t| t.to_string()),
                    exp.map_or("-".into(), |t| t.to_string()),
                ),
            ))
        }
    }
}

fn bad_signature(detail: &str) -> AadError {
    AadError::invalid_client(
        700027,
        format!("Client assertion failed signature validation. {detail}"),
    )
}

/// Checks a client assertion for `app`: a certificate assertion when its `iss` is the client
/// id, else a federated token. Sets `credential` to what was presented once recognised.
fn check_assertion(
    jwt: &str,
    app: &App,
    token_url: &str,
    now: i64,
    credential: &mut Option<String>,
) -> Result<(), AadError> {
    let token = decode_jwt(jwt)?;
    let client_id = app.client_id.as_str();
    if app.allow_assertion {
        *credential = Some("assertion-unverified".into());
        if token.claim("iss") != Some(client_id) || token.claim("sub") != Some(client_id) {
            return Err(AadError::invalid_client(
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            ));
        }
        return Ok(());
    }
    if token.claim("iss") == Some(client_id) {
        check_certificate_assertion(&token, app, token_url, now, credential)
    } else {
        check_federated_token(&token, app, now, credential)
    }
}

fn check_certificate_assertion(
    token: &Jwt<'_>,
    app: &App,
    token_url: &str,
    now: i64,
    credential: &mut Option<String>,
) -> Result<(), AadError> {
    let s256 = token.header_str("x5t#S256");
    let sha1 = token.header_str("x5t");
    let Some(thumbprint) = s256.or(sha1) else {
        return Err(bad_signature(
            "The assertion names no certificate: its header has neither 'x5t#S256' nor 'x5t'.",
        ));
    };
    *credential = Some(format!("certificate:{thumbprint}"));
    let cert = app
        .certificates
        .iter()
        .find(|c| s256.is_none_or(|t| t == c.x5t_s256) && sha1.is_none_or(|t| t == c.x5t))
        .ok_or_else(|| {
            AadError::invalid_client(
                700027,
                format!(
                    "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}']"
                ),
            )
        })?;
    let alg = token.header_str("alg").unwrap_or("none");
    if !matches!(alg, "RS256" | "PS256") {
        return Err(bad_signature(&format!(
            "'{alg}' is not a supported signing algorithm; use RS256 or PS256."
        )));
    }
    if !cert.verify(alg, token.signed.as_bytes(), &token.signature) {
        return Err(bad_signature(
            "The signature does not match the registered certificate's key.",
        ));
    }
    if token.claim("sub") != Some(app.client_id.as_str()) {
        return Err(AadError::invalid_client(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    let want = token_url.trim_end_matches('/');
    if !token
        .audiences()
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(want))
    {
        return Err(AadError::invalid_client(
            700027,
            format!(
                "Client assertion contains an invalid audience: it must be the token endpoint '{token_url}'."
            ),
        ));
    }
    token.check_times(now)
}

fn check_federated_token(
    token: &Jwt<'_>,
    app: &App,
    now: i64,
    credential: &mut Option<String>,
) -> Result<(), AadError> {
    let iss = token.claim("iss").unwrap_or("");
    let sub = token.claim("sub").unwrap_or("");
    let no_match = |code: u32, what: &str, value: &str| {
        AadError::invalid_client(
            code,
            format!(
                "No matching federated identity record found for presented assertion {what} '{value}'. Please note that the matching is done using a case-sensitive comparison."
            ),
        )
    };
    if app.federated.is_empty() {
        return Err(AadError::invalid_client(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    let by_issuer: Vec<_> = app.federated.iter().filter(|f| f.issuer == iss).collect();
    if by_issuer.is_empty() {
        return Err(no_match(700211, "issuer", iss));
    }
    let rules: Vec<_> = by_issuer.into_iter().filter(|f| f.subject == sub).collect();
    if rules.is_empty() {
        return Err(no_match(700213, "subject", sub));
    }
    *credential = Some(format!("federated:{sub}"));
    let audiences = token.audiences();
    let rules: Vec<_> = rules
        .into_iter()
        .filter(|f| audiences.contains(&f.audience.as_str()))
        .collect();
    if rules.is_empty() {
        return Err(no_match(700212, "audience", &audiences.join(",")));
    }
    let alg = token.header_str("alg").unwrap_or("none");
    let kid = token.header_str("kid");
    if !rules
        .iter()
        .any(|f| f.verify(alg, kid, token.signed.as_bytes(), &token.signature))
    {
        return Err(bad_signature(
            "The token's signature does not verify with the issuer's keys.",
        ));
    }
    token.check_times(now)
}

/// Decodes unpadded (or padded) base64url.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
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

/// Checks the bearer token of an API call. On failure also returns the token when it was
/// recognised, for the call log.
pub fn authorize<'a>(
    st: &'a SimState,
    headers: &HeaderMap,
    now: DateTime<Utc>,
    need: Need,
) -> Result<TokenInfo, (ApiError, Option<&'a TokenInfo>)> {
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
    let app = Some(info);
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

    use std::path::Path;

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
    use serde_json::json;

    use crate::credentials::{FederatedCredential, RegisteredCertificate};

    const URL: &str = "http://127.0.0.1:1/tenant/oauth2/v2.0/token";

    /// An RSA certificate made by the openssl command, and its key.
    fn rsa_cert(dir: &Path, name: &str) -> (String, RsaKeyPair) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=sim-test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the openssl command is needed to make RSA test keys");
        assert!(out.status.success());
        let pem = std::fs::read(&key).unwrap();
        let der = rustls_pemfile::private_key(&mut &pem[..]).unwrap().unwrap();
        let key = RsaKeyPair::from_pkcs8(der.secret_der()).unwrap();
        (std::fs::read_to_string(cert).unwrap(), key)
    }

    fn b64(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    fn rsa_jwt(key: &RsaKeyPair, header: Value, claims: Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let padding: &dyn signature::RsaEncoding = match header["alg"].as_str() {
            Some("RS256") => &signature::RSA_PKCS1_SHA256,
            _ => &signature::RSA_PSS_SHA256,
        };
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(
            padding,
            &ring::rand::SystemRandom::new(),
            signed.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{signed}.{}", b64(&sig))
    }

    fn app(certificates: Vec<RegisteredCertificate>, federated: Vec<FederatedCredential>) -> App {
        App {
            client_id: "app".into(),
            client_secret: None,
            roles: vec![],
            display_name: "app".into(),
            allow_assertion: false,
            certificates,
            federated,
        }
    }

    /// The AADSTS code of a refusal (and that it is a 401 invalid_client), or 0 when accepted;
    /// with the credential recorded.
    fn check(app: &App, jwt: &str, now: i64) -> (u32, Option<String>) {
        let mut credential = None;
        let code = match check_assertion(jwt, app, URL, now, &mut credential) {
            Ok(()) => 0,
            Err(e) => {
                assert_eq!(
                    (e.status.as_u16(), e.error),
                    (401, "invalid_client"),
                    "{e:?}"
                );
                e.aadsts
            }
        };
        (code, credential)
    }

    #[test]
    fn certificate_assertions_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, key) = rsa_cert(dir.path(), "registered");
        let (_, other_key) = rsa_cert(dir.path(), "other");
        let cert = RegisteredCertificate::parse(&pem, dir.path()).unwrap();
        // Registered by path too (relative to the seed file's directory).
        let by_path = RegisteredCertificate::parse("registered.crt", dir.path()).unwrap();
        assert_eq!(by_path.x5t_s256, cert.x5t_s256);
        let app = app(vec![cert.clone()], vec![]);
        let now = 1_800_000_000;
        let claims = json!({"aud": URL, "iss": "app", "sub": "app", "jti": "1",
            "nbf": now, "iat": now, "exp": now + 600});
        let header = |alg: &str| json!({"alg": alg, "typ": "JWT", "x5t#S256": cert.x5t_s256});
        let thumb = Some(format!("certificate:{}", cert.x5t_s256));

        for alg in ["PS256", "RS256"] {
            assert_eq!(
                check(&app, &rsa_jwt(&key, header(alg), claims.clone()), now),
                (0, thumb.clone())
            );
        }
        let sha1_only = json!({"alg": "RS256", "x5t": cert.x5t});
        assert_eq!(
            check(&app, &rsa_jwt(&key, sha1_only, claims.clone()), now).0,
            0
        );
        // Within the clock skew either side.
        assert_eq!(
            check(
                &app,
                &rsa_jwt(&key, header("PS256"), claims.clone()),
                now - 299
            )
            .0,
            0
        );
        assert_eq!(
            check(
                &app,
                &rsa_jwt(&key, header("PS256"), claims.clone()),
                now + 899
            )
            .0,
            0
        );

        let cases: Vec<(Value, Value, &RsaKeyPair, i64, u32)> = vec![
            // Signed by another key under the registered thumbprint.
            (header("PS256"), claims.clone(), &other_key, now, 700027),
            // A thumbprint that is not registered.
            (
                json!({"alg": "PS256", "x5t#S256": "AAAA"}),
                claims.clone(),
                &key,
                now,
                700027,
            ),
            // No thumbprint at all.
            (json!({"alg": "PS256"}), claims.clone(), &key, now, 700027),
            // Unsupported algorithm name (the signature is PS256).
            (header("HS256"), claims.clone(), &key, now, 700027),
            // Audience is not this token endpoint.
            (
                header("RS256"),
                json!({"aud": "https://elsewhere/token", "iss": "app", "sub": "app", "nbf": now, "exp": now + 600}),
                &key,
                now,
                700027,
            ),
            // sub is not the client.
            (
                header("RS256"),
                json!({"aud": URL, "iss": "app", "sub": "x", "nbf": now, "exp": now + 600}),
                &key,
                now,
                700021,
            ),
            // Expired, not yet valid, or without exp.
            (header("RS256"), claims.clone(), &key, now + 901, 700024),
            (header("RS256"), claims.clone(), &key, now - 301, 700024),
            (
                header("RS256"),
                json!({"aud": URL, "iss": "app", "sub": "app", "nbf": now}),
                &key,
                now,
                700024,
            ),
        ];
        for (i, (h, c, k, at, code)) in cases.into_iter().enumerate() {
            assert_eq!(check(&app, &rsa_jwt(k, h, c), at).0, code, "case {i}");
        }
        let (_, credential) = check(
            &app,
            &rsa_jwt(
                &key,
                json!({"alg": "PS256", "x5t#S256": "AAAA"}),
                claims.clone(),
            ),
            now,
        );
        assert_eq!(credential.as_deref(), Some("certificate:AAAA"));

        // An app without certificates refuses certificate assertions; malformed ones are 400.
        let bare = super::tests::app(vec![], vec![]);
        assert_eq!(
            check(&bare, &rsa_jwt(&key, header("PS256"), claims), now).0,
            700027
        );
        let mut c = None;
        let e = check_assertion("a.b", &bare, URL, now, &mut c).unwrap_err();
        assert_eq!((e.status.as_u16(), e.aadsts), (400, 50027));
    }

    #[test]
    fn federated_tokens_are_verified_against_their_rule() {
        let rng = ring::rand::SystemRandom::new();
        let key = rcgen::KeyPair::generate().unwrap();
        let signer = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let other_signer = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &other.serialize_der(),
            &rng,
        )
        .unwrap();
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let subject = "system:serviceaccount:secops:mde-isolation-operator";
        let rule = FederatedCredential::new(
            issuer.into(),
            subject.into(),
            crate::credentials::TOKEN_EXCHANGE_AUDIENCE.into(),
            None,
            Some(&key.public_key_pem()),
            Path::new("."),
        )
        .unwrap();
        let app = app(vec![], vec![rule]);
        let now = 1_800_000_000;
        let jwt = |signer: &EcdsaKeyPair, claims: Value| {
            let signed = format!(
                "{}.{}",
                b64(json!({"alg": "ES256", "kid": "k"}).to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let sig = signer.sign(&rng, signed.as_bytes()).unwrap();
            format!("{signed}.{}", b64(sig.as_ref()))
        };
        let claims = |iss: &str, sub: &str, aud: Value, exp: i64| json!({"iss": iss, "sub": sub, "aud": aud, "iat": now, "nbf": now, "exp": exp});
        let aud = json!(["api://AzureADTokenExchange"]);
        let good = claims(issuer, subject, aud.clone(), now + 3600);
        assert_eq!(
            check(&app, &jwt(&signer, good.clone()), now),
            (0, Some(format!("federated:{subject}")))
        );
        for (token, code) in [
            (jwt(&other_signer, good), 700027),
            (
                jwt(
                    &signer,
                    claims("https://other", subject, aud.clone(), now + 60),
                ),
                700211,
            ),
            (
                jwt(
                    &signer,
                    claims(issuer, "system:serviceaccount:x:y", aud.clone(), now + 60),
                ),
                700213,
            ),
            (
                jwt(
                    &signer,
                    claims(issuer, subject, json!("api://other"), now + 60),
                ),
                700212,
            ),
            (
                jwt(&signer, claims(issuer, subject, aud, now - 301)),
                700024,
            ),
        ] {
            assert_eq!(check(&app, &token, now).0, code);
        }
    }
}
