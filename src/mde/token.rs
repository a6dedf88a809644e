//! Entra ID access tokens (OAuth2 client credentials, v2 endpoint), cached and refreshed early.
//!
//! Secrets never reach logs: [`ClientSecret`] and [`TokenSource`] print `<redacted>`, errors
//! carry the endpoint's error code and first description line only, and the request body is never
//! logged.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use super::assertion::{AssertionAlgorithm, CertificateCredential, CertificateError};
use super::error::{ErrorClass, MdeError};

/// Refresh this long before expiry (divided by the time scale; at most half the lifetime).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Lifetime assumed when the endpoint omits `expires_in`.
const DEFAULT_LIFETIME_SECS: f64 = 3599.0;
/// A token response larger than this is not a token response.
const MAX_TOKEN_BODY: usize = 1 << 20;
/// After the endpoint refused a credential, it is not sent again for this long (divided by the
/// time scale), doubling on each further refusal up to [`REFUSAL_BACKOFF_MAX`], unless the
/// credential changes (a rotated secret, certificate or token file is tried at once).
const REFUSAL_BACKOFF_BASE: Duration = Duration::from_secs(60);
/// Longest wait between two attempts with a refused credential.
const REFUSAL_BACKOFF_MAX: Duration = Duration::from_secs(900);
/// After a token request failed for a passing reason (endpoint down, 5xx, timeout), nobody sends
/// another for this long (divided by the time scale), doubling up to [`OUTAGE_BACKOFF_MAX`]:
/// every waiting call shares one back-off instead of each asking again.
const OUTAGE_BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest wait between two token requests while the endpoint is failing.
const OUTAGE_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// `client_assertion_type` of JWT bearer assertions (RFC 7523).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A string that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The application's credential.
#[derive(Clone)]
pub enum ClientSecret {
    /// A client secret given as a value (e.g. from an environment variable).
    Value(SecretString),
    /// A client secret read from a file. The file is read again for every token request, so a
    /// rotated Kubernetes Secret takes effect without a restart; if a later read fails, the value
    /// read at startup is used.
    File {
        /// The file.
        path: PathBuf,
        /// Its content when the client started.
        initial: SecretString,
    },
    /// Workload identity federation: a projected service-account token file (e.g.
    /// `AZURE_FEDERATED_TOKEN_FILE`) sent as a `client_assertion`; re-read every time (it
    /// rotates).
    FederatedTokenFile(PathBuf),
    /// A certificate credential: a client assertion signed with the certificate's private key,
    /// made fresh for every token request.
    Certificate(Arc<CertificateCredential>),
    /// A credential its owner keeps current (an MdeConnection's, read from a Kubernetes Secret
    /// by the connection controller): each token request uses what it holds then, so a rotated
    /// Secret takes effect without a new client (its quota gate and view are kept).
    Current(Arc<CurrentCredential>),
}

/// A credential that can be replaced while clients use it (see [`ClientSecret::Current`]).
#[derive(Default)]
pub struct CurrentCredential(std::sync::RwLock<Option<ClientSecret>>);

impl CurrentCredential {
    /// Holding `secret`.
    pub fn new(secret: ClientSecret) -> Arc<Self> {
        Arc::new(CurrentCredential(std::sync::RwLock::new(Some(secret))))
    }

    /// Replaces the credential; the next token request uses it.
    pub fn set(&self, secret: ClientSecret) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(secret);
    }

    fn get(&self) -> Option<ClientSecret> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

fn read_trimmed(path: &Path) -> io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(text.to_owned())
}

impl ClientSecret {
    /// A secret value (surrounding whitespace, such as a trailing newline, is removed).
    pub fn from_value(value: String) -> Self {
        ClientSecret::Value(SecretString(value.trim().to_owned()))
    }

    /// A secret read from `path` now (so a missing or empty file fails at startup) and again at
    /// each token request.
    pub fn from_file(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let initial = SecretString(read_trimmed(&path)?);
        Ok(ClientSecret::File { path, initial })
    }

    /// The secret from environment variable `name`, if set and not blank.
    pub fn from_env(name: &str) -> Option<Self> {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(Self::from_value)
    }

    /// Workload identity: a federated token file read at each token request.
    pub fn federated_token_file(path: impl Into<PathBuf>) -> Self {
        ClientSecret::FederatedTokenFile(path.into())
    }

    /// A certificate credential (see [`CertificateCredential::load`]).
    pub fn certificate(
        cert_path: impl Into<PathBuf>,
        key_path: Option<PathBuf>,
        algorithm: AssertionAlgorithm,
    ) -> Result<Self, CertificateError> {
        Ok(ClientSecret::Certificate(Arc::new(
            CertificateCredential::load(cert_path, key_path, algorithm)?,
        )))
    }

    /// The one credential configured among `sources`; an error when there is none or more
    /// than one, or when it cannot be read now.
    pub fn from_sources(sources: CredentialSources<'_>) -> Result<Self, CredentialError> {
        let mut given = Vec::new();
        if sources.client_secret_file.is_some() {
            given.push("--client-secret-file");
        }
        if sources.client_secret.is_some() {
            given.push(CLIENT_SECRET_VARIABLE);
        }
        if sources.client_certificate_file.is_some() {
            given.push("--client-certificate-file");
        }
        if sources.federated_token_file.is_some() {
            given.push("--federated-token-file");
        }
        if given.len() > 1 {
            return Err(CredentialError::Several(given.join(", ")));
        }
        if sources.client_key_file.is_some() && sources.client_certificate_file.is_none() {
            return Err(CredentialError::KeyWithoutCertificate);
        }
        if let Some(path) = sources.client_secret_file {
            return ClientSecret::from_file(path).map_err(|source| CredentialError::File {
                what: "client secret",
                path: path.display().to_string(),
                source,
            });
        }
        if let Some(secret) = sources.client_secret {
            return Ok(ClientSecret::Value(secret));
        }
        if let Some(cert) = sources.client_certificate_file {
            let credential = CertificateCredential::load(
                cert,
                sources.client_key_file.map(Path::to_path_buf),
                sources.assertion_algorithm,
            )?;
            tracing::info!(
                thumbprint = %credential.thumbprint(),
                algorithm = %credential.algorithm(),
                "authenticating with a client certificate"
            );
            return Ok(ClientSecret::Certificate(Arc::new(credential)));
        }
        if let Some(path) = sources.federated_token_file {
            // Checked now so that a wrong path fails at startup; read again for every request.
            read_trimmed(path).map_err(|source| CredentialError::File {
                what: "federated token",
                path: path.display().to_string(),
                source,
            })?;
            tracing::info!(file = %path.display(), "authenticating with a federated token (workload identity)");
            return Ok(ClientSecret::federated_token_file(path));
        }
        Err(CredentialError::None)
    }

    /// A digest of the credential's current material, to tell whether it changed since the
    /// endpoint refused it. `None` when it cannot be read.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        let sha = |s: &str| {
            let mut out = [0; 32];
            out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref());
            out
        };
        match self {
            ClientSecret::Value(s) => Some(sha(s.expose())),
            ClientSecret::File { path, initial } => Some(sha(
                &read_trimmed(path).unwrap_or_else(|_| initial.expose().to_owned())
            )),
            ClientSecret::FederatedTokenFile(path) => read_trimmed(path).ok().map(|t| sha(&t)),
            ClientSecret::Certificate(c) => Some(c.fingerprint()),
            ClientSecret::Current(c) => c.get()?.fingerprint(),
        }
    }

    /// The form fields carrying the credential; assertions are addressed to `audience` (the
    /// token URL) and name `client_id`.
    fn form_fields(
        &self,
        client_id: &str,
        audience: &str,
    ) -> Result<Vec<(&'static str, SecretString)>, MdeError> {
        let assertion = |jwt: SecretString| {
            vec![
                ("client_assertion_type", SecretString::new(JWT_BEARER)),
                ("client_assertion", jwt),
            ]
        };
        Ok(match self {
            ClientSecret::Value(s) => vec![("client_secret", s.clone())],
            ClientSecret::File { path, initial } => {
                let current = match read_trimmed(path) {
                    Ok(s) => SecretString(s),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e,
                            "client secret file unreadable; using the value read at startup");
                        initial.clone()
                    }
                };
                vec![("client_secret", current)]
            }
            ClientSecret::FederatedTokenFile(path) => {
                let token = read_trimmed(path).map_err(|e| {
                    MdeError::config_with(
                        format!("reading the federated token file {}", path.display()),
                        e,
                    )
                })?;
                assertion(SecretString(token))
            }
            ClientSecret::Certificate(c) => assertion(
                c.assertion(client_id, audience)
                    .map_err(|e| MdeError::config(format!("client certificate: {e}")))?,
            ),
            ClientSecret::Current(c) => c
                .get()
                .ok_or_else(|| MdeError::config("no credential yet"))?
                .form_fields(client_id, audience)?,
        })
    }
}

/// Name of the environment variable that may hold the client secret.
const CLIENT_SECRET_VARIABLE: &str = "MDE_CLIENT_SECRET";

/// Everything that can name the app's credential; exactly one must.
#[derive(Debug, Default, Clone)]
pub struct CredentialSources<'a> {
    /// `--client-secret-file`.
    pub client_secret_file: Option<&'a Path>,
    /// The `MDE_CLIENT_SECRET` environment variable (blank counts as unset).
    pub client_secret: Option<SecretString>,
    /// `--client-certificate-file`.
    pub client_certificate_file: Option<&'a Path>,
    /// `--client-key-file` (else the key is looked for in the certificate file).
    pub client_key_file: Option<&'a Path>,
    /// `--assertion-algorithm`.
    pub assertion_algorithm: AssertionAlgorithm,
    /// `--federated-token-file` (`AZURE_FEDERATED_TOKEN_FILE`).
    pub federated_token_file: Option<&'a Path>,
}

/// Why no credential could be set up. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Nothing configured.
    #[error(
        "no credential configured: set exactly one of --client-secret-file (MDE_CLIENT_SECRET_FILE), \
         the MDE_CLIENT_SECRET environment variable, --client-certificate-file \
         (MDE_CLIENT_CERTIFICATE_FILE) with --client-key-file (MDE_CLIENT_KEY_FILE), or \
         --federated-token-file (AZURE_FEDERATED_TOKEN_FILE, set by Azure workload identity)"
    )]
    None,
    /// More than one configured.
    #[error(
        "more than one credential configured ({0}): set exactly one of a client secret, a client certificate or a federated token file"
    )]
    Several(String),
    /// A key without its certificate.
    #[error(
        "--client-key-file (MDE_CLIENT_KEY_FILE) needs --client-certificate-file (MDE_CLIENT_CERTIFICATE_FILE)"
    )]
    KeyWithoutCertificate,
    /// A credential file could not be read (or is empty).
    #[error("reading the {what} file {path}: {source}")]
    File {
        /// Which credential.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The certificate or its key is unusable.
    #[error("client certificate: {0}")]
    Certificate(#[from] CertificateError),
}

struct Cached {
    token: SecretString,
    refresh_at: Instant,
}

/// A passing failure of the token endpoint, shared by every caller until `retry_at`.
#[derive(Debug)]
struct Outage {
    retry_at: Instant,
    backoff: Duration,
}

/// The endpoint's last refusal of the credential, answered again without a request until
/// `retry_at` unless the credential changed.
struct Refused {
    fingerprint: Option<[u8; 32]>,
    status: u16,
    body: Vec<u8>,
    retry_at: Instant,
    backoff: Duration,
}

/// A cached source of access tokens for one application.
pub struct TokenSource {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    scope: String,
    secret: ClientSecret,
    time_scale: f64,
    cache: Mutex<Option<Cached>>,
    refused: Mutex<Option<Refused>>,
    /// The last passing failure of the endpoint and until when it is answered again.
    outage: Mutex<Option<Outage>>,
    /// Held while fetching, so that concurrent callers share one request.
    refresh: tokio::sync::Mutex<()>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// True for a tenant id that can safely be a URL path segment: a GUID or a domain name.
fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 253
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !t.starts_with('.')
}

impl TokenSource {
    /// A token source posting to `{authority}/{tenant_id}/oauth2/v2.0/token`.
    pub fn new(
        http: reqwest::Client,
        authority: &Url,
        tenant_id: &str,
        client_id: &str,
        scope: &str,
        secret: ClientSecret,
        time_scale: f64,
    ) -> Result<Self, MdeError> {
        let tenant_id = tenant_id.trim();
        if tenant_id.is_empty() {
            return Err(MdeError::config(
                "no tenant id: set --tenant-id (MDE_TENANT_ID, or AZURE_TENANT_ID as set by workload identity)",
            ));
        }
        if !valid_tenant(tenant_id) {
            return Err(MdeError::config(
                "the tenant id must be a GUID or a domain name",
            ));
        }
        if client_id.trim().is_empty() {
            return Err(MdeError::config(
                "no client id: set --client-id (MDE_CLIENT_ID, or AZURE_CLIENT_ID as set by workload identity)",
            ));
        }
        let mut token_url = authority.clone();
        token_url
            .path_segments_mut()
            .map_err(|()| MdeError::config("the authority URL cannot be a base URL"))?
            .pop_if_empty()
            .extend([tenant_id, "oauth2", "v2.0", "token"]);
        Ok(TokenSource {
            http,
            token_url,
            client_id: client_id.trim().to_owned(),
            scope: scope.to_owned(),
            secret,
            time_scale: sane_scale(time_scale),
            cache: Mutex::new(None),
            refused: Mutex::new(None),
            outage: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
        })
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &Url {
        &self.token_url
    }

    fn cached(&self) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.expose().to_owned())
    }

    /// A valid access token: the cached one, or a fresh one when it is close to expiry.
    /// Concurrent callers share a single token request.
    pub async fn token(&self) -> Result<String, MdeError> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _guard = self.refresh.lock().await;
        // Someone else may have refreshed while this caller waited for the lock.
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let fingerprint = self.secret.fingerprint();
        if let Some(e) = self.still_refused(fingerprint) {
            return Err(e);
        }
        if let Some(e) = self.still_out() {
            return Err(e);
        }
        let (token, lifetime) = match self.fetch(fingerprint).await {
            Ok(ok) => ok,
            Err(e) => {
                if e.class() != ErrorClass::AuthenticationFailed {
                    self.record_outage();
                }
                return Err(e);
            }
        };
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.outage.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let margin = (REFRESH_MARGIN.div_f64(self.time_scale)).min(lifetime / 2);
        let refresh_at = Instant::now() + lifetime.saturating_sub(margin);
        let value = token.expose().to_owned();
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached { token, refresh_at });
        Ok(value)
    }

    /// Forgets the cached token (after MDE answered 401 with it).
    pub fn invalidate(&self) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Forgets the cached token only if it is `rejected`, so that a late 401 for an old token
    /// does not throw away a token another caller just fetched.
    pub(crate) fn invalidate_if(&self, rejected: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().is_some_and(|c| c.token.expose() == rejected) {
            *cache = None;
        }
    }

    /// The last refusal again, without a request, while its backoff runs and the credential
    /// is unchanged: a wrong credential must not hammer the endpoint (Entra ID throttles and
    /// flags clients that loop on failing sign-ins).
    fn still_refused(&self, fingerprint: Option<[u8; 32]>) -> Option<MdeError> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let r = refused.as_ref()?;
        (fingerprint.is_some() && r.fingerprint == fingerprint && Instant::now() < r.retry_at)
            .then(|| MdeError::token_response(r.status, &r.body))
    }

    /// The last outage error again, without a request, while its back-off runs.
    fn still_out(&self) -> Option<MdeError> {
        let outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let o = outage.as_ref()?;
        (Instant::now() < o.retry_at).then(|| {
            MdeError::token_transport(
                "failing; the next token request waits for its back-off",
                None,
            )
        })
    }

    /// Remembers a passing failure of the token endpoint.
    fn record_outage(&self) {
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let backoff = match outage.as_ref() {
            Some(o) => (o.backoff * 2).min(OUTAGE_BACKOFF_MAX.div_f64(self.time_scale)),
            None => OUTAGE_BACKOFF_BASE.div_f64(self.time_scale),
        };
        *outage = Some(Outage {
            retry_at: Instant::now() + backoff,
            backoff,
        });
    }

    /// Remembers a refusal of the credential with `fingerprint`.
    fn record_refusal(&self, fingerprint: Option<[u8; 32]>, status: u16, body: &[u8]) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let base = REFUSAL_BACKOFF_BASE.div_f64(self.time_scale);
        let backoff = match refused.as_ref() {
            Some(r) if r.fingerprint == fingerprint => {
                (r.backoff * 2).min(REFUSAL_BACKOFF_MAX.div_f64(self.time_scale))
            }
            _ => base,
        };
        tracing::info!(retry_in = ?backoff, "the credential is not sent again until it changes or this wait ends");
        *refused = Some(Refused {
            fingerprint,
            status,
            body: body.to_vec(),
            retry_at: Instant::now() + backoff,
            backoff,
        });
    }

    async fn fetch(
        &self,
        fingerprint: Option<[u8; 32]>,
    ) -> Result<(SecretString, Duration), MdeError> {
        // Built in a block: the serializer is not `Send` and must not live across an await.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            form.append_pair("client_id", &self.client_id);
            for (name, value) in self
                .secret
                .form_fields(&self.client_id, self.token_url.as_str())?
            {
                form.append_pair(name, value.expose());
            }
            form.append_pair("scope", &self.scope);
            form.finish()
        };

        let started = Instant::now();
        let resp = self
            .http
            .post(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "unreachable"
                };
                MdeError::token_transport(what, Some(e))
            })?;
        let status = resp.status().as_u16();
        let bytes = read_limited(resp, MAX_TOKEN_BODY)
            .await
            .map_err(|e| MdeError::token_transport("the response could not be read", e))?;
        tracing::debug!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "token request"
        );
        if !(200..300).contains(&status) {
            let err = MdeError::token_response(status, &bytes);
            tracing::warn!(status, error = %err, "token request refused");
            if err.class() == ErrorClass::AuthenticationFailed {
                self.record_refusal(fingerprint, status, &bytes);
            }
            return Err(err);
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|_| MdeError::token_transport("the response is not JSON", None))?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| MdeError::token_transport("the response has no access_token", None))?;
        // v2 sends a number; v1 sent a string. Server seconds, compressed by the time scale.
        let expires_in = match v.get("expires_in") {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_LIFETIME_SECS)
        .min(86_400.0);
        let lifetime = Duration::from_secs_f64(expires_in / self.time_scale);
        Ok((SecretString(token.to_owned()), lifetime))
    }
}

/// Reads a response body up to `max` bytes; `Err(None)` when it is larger.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, Option<reqwest::Error>> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Some)? {
        if out.len() + chunk.len() > max {
            return Err(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A usable time scale: positive and finite, else real time.
pub(crate) fn sane_scale(s: f64) -> f64 {
    if s.is_finite() && s > 0.0 { s } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;
    use axum::routing::post;

    #[derive(Default)]
    struct Server {
        hits: AtomicUsize,
        /// `expires_in` per request index (the last one repeats).
        lifetimes: Vec<u64>,
        delay_ms: u64,
        fail_with: Option<(u16, String)>,
        bodies: Mutex<Vec<(String, String)>>,
    }

    async fn token_handler(
        State(s): State<Arc<Server>>,
        UrlPath(tenant): UrlPath<String>,
        body: String,
    ) -> (StatusCode, String) {
        let n = s.hits.fetch_add(1, Ordering::SeqCst);
        s.bodies.lock().unwrap().push((tenant, body));
        if s.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
        }
        if let Some((status, body)) = &s.fail_with {
            return (StatusCode::from_u16(*status).unwrap(), body.clone());
        }
        let life = s
            .lifetimes
            .get(n)
            .or(s.lifetimes.last())
            .copied()
            .unwrap_or(3599);
        (
            StatusCode::OK,
            format!(
                r#"{{"token_type":"Bearer","expires_in":{life},"ext_expires_in":{life},"access_token":"tok-{n}"}}"#
            ),
        )
    }

    async fn serve(server: Arc<Server>) -> Url {
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token_handler))
            .with_state(server);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Url::parse(&format!("http://{addr}/")).unwrap()
    }

    fn source(authority: &Url, secret: ClientSecret) -> TokenSource {
        TokenSource::new(
            reqwest::Client::new(),
            authority,
            "contoso.onmicrosoft.com",
            "app-id",
            "https://api.securitycenter.microsoft.com/.default",
            secret,
            1.0,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn posts_the_client_credentials_form_and_caches() {
        let server = Arc::new(Server::default());
        let url = serve(server.clone()).await;
        let ts = source(&url, ClientSecret::from_value("s3cr=t&x\n".into()));
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);
        let bodies = server.bodies.lock().unwrap().clone();
        assert_eq!(bodies[0].0, "contoso.onmicrosoft.com");
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(bodies[0].1.as_bytes())
            .into_owned()
            .collect();
        let get = |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.as_str());
        assert_eq!(get("grant_type"), Some("client_credentials"));
        assert_eq!(get("client_id"), Some("app-id"));
        assert_eq!(get("client_secret"), Some("s3cr=t&x"));
        assert_eq!(
            get("scope"),
            Some("https://api.securitycenter.microsoft.com/.default")
        );
    }

    #[tokio::test]
    async fn refreshes_before_expiry_and_after_invalidation() {
        // First token expires at once (inside the margin), later ones live an hour.
        let server = Arc::new(Server {
            lifetimes: vec![0, 3599],
            ..Server::default()
        });
        let url = serve(server.clone()).await;
        let ts = source(&url, ClientSecret::from_value("x".into()));
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        assert_eq!(ts.token().await.unwrap(), "tok-1");
        assert_eq!(ts.token().await.unwrap(), "tok-1");
        // A 401 for an older token does not discard the current one.
        ts.invalidate_if("tok-0");
        assert_eq!(ts.token().await.unwrap(), "tok-1");
        ts.invalidate_if("tok-1");
        assert_eq!(ts.token().await.unwrap(), "tok-2");
        ts.invalidate();
        assert_eq!(ts.token().await.unwrap(), "tok-3");
        assert_eq!(server.hits.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn refresh_margin_is_scaled_and_bounded_by_half_the_lifetime() {
        // 3599 server seconds at time scale 3600 ≈ 1 s real; margin = min(300/3600 s, 0.5 s).
        let server = Arc::new(Server::default());
        let url = serve(server.clone()).await;
        let ts = TokenSource::new(
            reqwest::Client::new(),
            &url,
            "t",
            "c",
            "s",
            ClientSecret::from_value("x".into()),
            3600.0,
        )
        .unwrap();
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        let refresh_at = ts.cache.lock().unwrap().as_ref().unwrap().refresh_at;
        let left = refresh_at - Instant::now();
        assert!(
            left > Duration::from_millis(700) && left < Duration::from_millis(920),
            "{left:?}"
        );
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_request() {
        let server = Arc::new(Server {
            delay_ms: 200,
            ..Server::default()
        });
        let url = serve(server.clone()).await;
        let ts = Arc::new(source(&url, ClientSecret::from_value("x".into())));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let ts = ts.clone();
                tokio::spawn(async move { ts.token().await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "tok-0");
        }
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refused_credentials_are_authentication_failures() {
        let server = Arc::new(Server {
            fail_with: Some((
                401,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: abc\r\nCorrelation ID: def"}"#.into(),
            )),
            ..Server::default()
        });
        let url = serve(server.clone()).await;
        let ts = source(&url, ClientSecret::from_value("wrong".into()));
        let e = ts.token().await.unwrap_err();
        assert_eq!(
            e.class(),
            super::super::error::ErrorClass::AuthenticationFailed
        );
        assert_eq!(e.code(), Some("invalid_client"));
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("wrong") && !text.contains("Trace ID"),
            "{text}"
        );
        // The refusal is answered again without a request while the credential is unchanged.
        let again = ts.token().await.unwrap_err();
        assert_eq!(
            again.class(),
            super::super::error::ErrorClass::AuthenticationFailed
        );
        assert_eq!(again.to_string(), e.to_string());
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_credential_is_retried_when_it_changes_or_after_a_backoff() {
        let server = Arc::new(Server {
            fail_with: Some((
                401,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#.into(),
            )),
            ..Server::default()
        });
        let url = serve(server.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "old").unwrap();
        let ts = source(&url, ClientSecret::from_file(&path).unwrap());
        for _ in 0..5 {
            assert!(ts.token().await.is_err());
        }
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);
        // A rotated secret is tried at once.
        std::fs::write(&path, "new").unwrap();
        assert!(ts.token().await.is_err());
        assert!(ts.token().await.is_err());
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);
        let backoff = ts.refused.lock().unwrap().as_ref().unwrap().backoff;
        assert_eq!(backoff, REFUSAL_BACKOFF_BASE);

        // The backoff is divided by the time scale and doubles on each refusal.
        let fast = TokenSource::new(
            reqwest::Client::new(),
            &url,
            "t",
            "c",
            "s",
            ClientSecret::from_value("x".into()),
            6000.0,
        )
        .unwrap();
        assert!(fast.token().await.is_err());
        let first = fast.refused.lock().unwrap().as_ref().unwrap().backoff;
        assert_eq!(first, Duration::from_millis(10));
        tokio::time::sleep(first + Duration::from_millis(5)).await;
        assert!(fast.token().await.is_err());
        assert_eq!(server.hits.load(Ordering::SeqCst), 4);
        let second = fast.refused.lock().unwrap().as_ref().unwrap().backoff;
        assert_eq!(second, first * 2);
    }

    #[tokio::test]
    async fn certificate_credentials_send_a_fresh_signed_assertion_each_time() {
        let server = Arc::new(Server {
            lifetimes: vec![0],
            ..Server::default()
        });
        let url = serve(server.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::mde::assertion::test_keys::pair(dir.path(), "a", false);
        let secret = ClientSecret::certificate(
            &cert,
            Some(key),
            crate::mde::assertion::AssertionAlgorithm::Rs256,
        )
        .unwrap();
        assert!(!format!("{secret:?}").contains("PRIVATE"));
        let ts = source(&url, secret);
        ts.token().await.unwrap();
        ts.token().await.unwrap();
        let bodies = server.bodies.lock().unwrap().clone();
        let assertions: Vec<String> = bodies
            .iter()
            .map(|(_, body)| {
                let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
                    .into_owned()
                    .collect();
                assert!(!pairs.iter().any(|p| p.0 == "client_secret"));
                let get = |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.clone());
                assert_eq!(get("client_assertion_type").as_deref(), Some(JWT_BEARER));
                get("client_assertion").unwrap()
            })
            .collect();
        assert_ne!(assertions[0], assertions[1], "each request has its own jti");
        let claims = crate::mde::assertion::test_keys::verify(&assertions[0], &cert);
        assert_eq!(claims["aud"], ts.token_url().as_str());
        assert_eq!(claims["iss"], "app-id");
    }

    #[test]
    fn exactly_one_credential_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s").unwrap();
        let missing = dir.path().join("missing");
        let err = |sources: CredentialSources<'_>| ClientSecret::from_sources(sources).unwrap_err();

        let none = err(CredentialSources::default()).to_string();
        for option in [
            "--client-secret-file",
            "MDE_CLIENT_SECRET",
            "--client-certificate-file",
            "--client-key-file",
            "--federated-token-file",
            "AZURE_FEDERATED_TOKEN_FILE",
        ] {
            assert!(none.contains(option), "{none}");
        }
        let several = err(CredentialSources {
            client_secret_file: Some(&file),
            client_secret: Some(SecretString::new("hunter2")),
            federated_token_file: Some(&file),
            ..CredentialSources::default()
        })
        .to_string();
        assert!(
            several.contains("--client-secret-file, MDE_CLIENT_SECRET, --federated-token-file")
                && !several.contains("hunter2"),
            "{several}"
        );
        assert!(matches!(
            err(CredentialSources {
                client_key_file: Some(&file),
                ..CredentialSources::default()
            }),
            CredentialError::KeyWithoutCertificate
        ));
        let unreadable = err(CredentialSources {
            federated_token_file: Some(&missing),
            ..CredentialSources::default()
        })
        .to_string();
        assert!(unreadable.contains("federated token file"), "{unreadable}");
        assert!(matches!(
            ClientSecret::from_sources(CredentialSources {
                client_secret: Some(SecretString::new("s")),
                ..CredentialSources::default()
            }),
            Ok(ClientSecret::Value(_))
        ));
        assert!(matches!(
            ClientSecret::from_sources(CredentialSources {
                federated_token_file: Some(&file),
                ..CredentialSources::default()
            }),
            Ok(ClientSecret::FederatedTokenFile(_))
        ));
    }

    #[tokio::test]
    async fn unreachable_or_garbled_endpoint_is_transient() {
        let server = Arc::new(Server {
            fail_with: Some((200, "<html>".into())),
            ..Server::default()
        });
        let url = serve(server).await;
        let e = source(&url, ClientSecret::from_value("x".into()))
            .token()
            .await
            .unwrap_err();
        assert_eq!(e.class(), super::super::error::ErrorClass::Transient);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = Url::parse(&format!("http://{addr}/")).unwrap();
        let e = source(&url, ClientSecret::from_value("x".into()))
            .token()
            .await
            .unwrap_err();
        assert_eq!(e.class(), super::super::error::ErrorClass::Transient);
    }

    #[tokio::test]
    async fn secret_files_are_reread_and_federated_tokens_are_assertions() {
        let dir = tempfile::tempdir().unwrap();
        let secret_path = dir.path().join("secret");
        std::fs::write(&secret_path, "first\n").unwrap();
        let secret = ClientSecret::from_file(&secret_path).unwrap();
        let fields = |s: &ClientSecret| s.form_fields("app", "https://aud");
        assert_eq!(fields(&secret).unwrap()[0].1.expose(), "first");
        std::fs::write(&secret_path, "rotated").unwrap();
        assert_eq!(fields(&secret).unwrap()[0].1.expose(), "rotated");
        std::fs::remove_file(&secret_path).unwrap();
        assert_eq!(fields(&secret).unwrap()[0].1.expose(), "first");

        std::fs::write(&secret_path, "  \n").unwrap();
        assert!(ClientSecret::from_file(&secret_path).is_err());
        assert!(ClientSecret::from_file(dir.path().join("missing")).is_err());

        let jwt = dir.path().join("token");
        std::fs::write(&jwt, "eyJhbGciOi.payload.sig\n").unwrap();
        let fed = ClientSecret::federated_token_file(&jwt);
        let sent = fields(&fed).unwrap();
        assert_eq!(sent[0].0, "client_assertion_type");
        assert_eq!(
            sent[1],
            (
                "client_assertion",
                SecretString::new("eyJhbGciOi.payload.sig")
            )
        );
        // Re-read for every request: a rotated token is sent as it is.
        std::fs::write(&jwt, "eyJrotated.payload.sig").unwrap();
        assert_eq!(
            fields(&fed).unwrap()[1].1.expose(),
            "eyJrotated.payload.sig"
        );
        std::fs::remove_file(&jwt).unwrap();
        assert!(fields(&fed).is_err());
    }

    #[test]
    fn nothing_secret_is_printed() {
        let s = ClientSecret::from_value("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
        let ts = TokenSource::new(
            reqwest::Client::new(),
            &Url::parse("https://login.microsoftonline.com").unwrap(),
            "00000000-0000-0000-0000-000000000001",
            "app",
            "scope",
            s,
            1.0,
        )
        .unwrap();
        *ts.cache.lock().unwrap() = Some(Cached {
            token: SecretString::new("eyJ0eXAi-access-token"),
            refresh_at: Instant::now(),
        });
        let dbg = format!("{ts:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("eyJ0eXAi"),
            "{dbg}"
        );
        assert_eq!(
            ts.token_url().as_str(),
            "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000001/oauth2/v2.0/token"
        );
    }

    #[test]
    fn tenant_ids_are_validated() {
        let auth = Url::parse("https://login.microsoftonline.com/").unwrap();
        let mk = |t: &str| {
            TokenSource::new(
                reqwest::Client::new(),
                &auth,
                t,
                "app",
                "s",
                ClientSecret::from_value("x".into()),
                1.0,
            )
        };
        assert!(mk("contoso.onmicrosoft.com").is_ok());
        assert!(mk("72f988bf-86f1-41af-91ab-2d7cd011db47").is_ok());
        for bad in ["", "../common", "a/b", "x?y", ".."] {
            assert!(mk(bad).is_err(), "{bad}");
        }
        let with_prefix = TokenSource::new(
            reqwest::Client::new(),
            &Url::parse("http://127.0.0.1:9/prefix").unwrap(),
            "t",
            "app",
            "s",
            ClientSecret::from_value("x".into()),
            1.0,
        )
        .unwrap();
        assert_eq!(
            with_prefix.token_url().as_str(),
            "http://127.0.0.1:9/prefix/t/oauth2/v2.0/token"
        );
    }
}
