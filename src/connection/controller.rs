//! The connection controller: turns each `MdeConnection` and `ClusterMdeConnection` into a live
//! [`Connection`] in the [`Connections`](super::Connections) registry, or into the reason it cannot be one.
//!
//! One reconcile reads as its steps:
//! 1. [`endpoints`]: the cloud, region and URLs (`InvalidSettings`);
//! 2. [`read_credential`]: the Secret's key, or the operator's federated token (`CredentialMissing`);
//! 3. [`built`]: the connection built from this generation, reused while the generation stands
//!    (its quota gate and view survive a rotated Secret: only the credential is swapped);
//! 4. [`verify`]: a token (once per credential) and the poller's first load of the tenant's
//!    actions (`AuthenticationFailed`, `Forbidden`; `Verifying` until then);
//! 5. the registry learns the result, and every resource naming the connection is woken if what
//!    it gets changed; the status says it, with the quota use of each API.
//!
//! The Secret is read again every [`Deps::recheck`]: a rotated one takes effect without a
//! restart (the operator may only `get` Secrets, not watch them).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Connection, ConnectionKey, Entry, Origin, Problem, ProblemKind, Shared};
use crate::conditions::{self, Phase, reason_enum};
use crate::crd::connection::{
    AllowedNamespaces, ApiQuota, ConnectionSettings, ConnectionStatus, Throttled,
};
use crate::crd::{ClusterMdeConnection, MdeConnection};
use crate::mde::assertion::{AssertionAlgorithm, CertificateCredential};
use crate::mde::client::{MdeClient, MdeClientConfig};
use crate::mde::cloud::{Endpoints, regional_api_url, resolve_endpoints};
use crate::mde::error::ErrorClass;
use crate::mde::token::{ClientSecret, CurrentCredential, SecretString};
use crate::quota::{Api as QuotaApi, QuotaConfig, QuotaGate, QuotaKey};
use crate::reconcile::{CallFailure, Context, FIELD_MANAGER};

reason_enum! {
    /// Every reason a connection's condition carries.
    pub enum ConnectionReason {
    /// A token was obtained and the read permission verified.
    Connected => Ready,
    /// Obtaining a token and verifying the read permission.
    Verifying => Reconciling,
    /// The cloud, region or a URL cannot be used.
    InvalidSettings => Stalled,
    /// The credential's Secret or key is missing or unreadable, or no workload identity.
    CredentialMissing => Stalled,
    /// Entra ID refused the credential.
    AuthenticationFailed => Stalled,
    /// MDE refused the app the read permission (Machine.Read.All).
    Forbidden => Stalled,
    }
}

/// How often a connection being verified is looked at.
const VERIFYING_RECHECK: Duration = Duration::from_secs(1);

/// What the controller needs besides the resources' context.
pub struct Deps {
    /// The resources' context: the Kubernetes client, the registry, the caches to wake.
    pub ctx: Arc<Context>,
    /// What every connection shares (waker, metrics, pollers' timing).
    pub shared: Shared,
    /// Extra CA certificates for MDE and the authority (the flags').
    pub ca_file: Option<std::path::PathBuf>,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// The simulator's time scale (1 against MDE).
    pub time_scale: f64,
    /// What MDE counts a budget against (the flags').
    pub quota_key: QuotaKey,
    /// The operator's federated token file (workload identity), if it has one.
    pub federated_token_file: Option<std::path::PathBuf>,
    /// Where ClusterMdeConnections' Secrets live: the operator's namespace.
    pub operator_namespace: Option<String>,
    /// How often the Secret is read again and the status refreshed.
    pub recheck: Duration,
}

/// Why a reconcile failed on the Kubernetes side (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the connection's status.
    #[error("writing the connection's status: {0}")]
    StatusWrite(#[source] kube::Error),
}

/// The two kinds, as the controller sees them.
pub trait ConnectionObject:
    Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + Send + Sync + 'static
{
    /// The API of its kind where it lives.
    fn api(&self, client: kube::Client) -> Api<Self>;
    /// Its key in the registry.
    fn key(&self) -> ConnectionKey;
    /// Its settings.
    fn settings(&self) -> &ConnectionSettings;
    /// The namespaces allowed to use it (`None`: a namespaced one, its own namespace only).
    fn allowed(&self) -> Option<AllowedNamespaces>;
    /// Where its Secrets live.
    fn secret_namespace(&self, deps: &Deps) -> Option<String>;
    /// Its status as last written.
    fn status(&self) -> Option<&ConnectionStatus>;
    /// Whether `key` is one of this kind's in `scope` (a namespace; `None`: all), i.e. what a
    /// complete list of that scope would hold if it still existed.
    fn covers(key: &ConnectionKey, scope: Option<&str>) -> bool;
}

impl ConnectionObject for MdeConnection {
    fn api(&self, client: kube::Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }
    fn key(&self) -> ConnectionKey {
        ConnectionKey::Namespaced {
            namespace: self.namespace().unwrap_or_default(),
            name: self.name_any(),
        }
    }
    fn settings(&self) -> &ConnectionSettings {
        &self.spec.connection
    }
    fn allowed(&self) -> Option<AllowedNamespaces> {
        None
    }
    fn secret_namespace(&self, _: &Deps) -> Option<String> {
        self.namespace()
    }
    fn status(&self) -> Option<&ConnectionStatus> {
        self.status.as_ref()
    }
    fn covers(key: &ConnectionKey, scope: Option<&str>) -> bool {
        matches!(key, ConnectionKey::Namespaced { namespace, .. }
            if scope.is_none_or(|s| s == namespace))
    }
}

impl ConnectionObject for ClusterMdeConnection {
    fn api(&self, client: kube::Client) -> Api<Self> {
        Api::all(client)
    }
    fn key(&self) -> ConnectionKey {
        ConnectionKey::Cluster {
            name: self.name_any(),
        }
    }
    fn settings(&self) -> &ConnectionSettings {
        &self.spec.connection
    }
    fn allowed(&self) -> Option<AllowedNamespaces> {
        Some(self.spec.namespaces.clone())
    }
    fn secret_namespace(&self, deps: &Deps) -> Option<String> {
        deps.operator_namespace.clone()
    }
    fn status(&self) -> Option<&ConnectionStatus> {
        self.status.as_ref()
    }
    fn covers(key: &ConnectionKey, _: Option<&str>) -> bool {
        matches!(key, ConnectionKey::Cluster { .. })
    }
}

/// Why a connection is not usable, as its own condition says it.
struct Refusal {
    reason: ConnectionReason,
    message: String,
}

impl Refusal {
    fn new(reason: ConnectionReason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
        }
    }

    /// What the resources naming the connection are told.
    fn problem(&self, key: &ConnectionKey) -> Problem {
        let kind = match self.reason {
            ConnectionReason::AuthenticationFailed => ProblemKind::AuthenticationFailed,
            ConnectionReason::Forbidden => ProblemKind::Forbidden,
            // MDE or Entra ID did not answer: the resources wait, they are not told to act.
            ConnectionReason::Verifying => ProblemKind::Pending,
            _ => ProblemKind::NotReady,
        };
        Problem::new(kind, format!("{key}: {}", self.message))
    }
}

/// A credential read now, and a digest of it (to verify each credential once).
struct Credential {
    secret: ClientSecret,
    digest: [u8; 32],
}

/// Reconciles one connection (see the module docs).
pub async fn reconcile<K: ConnectionObject>(obj: Arc<K>, deps: Arc<Deps>) -> Result<Action, Error> {
    let key = obj.key();
    let (conn, outcome) = connect(&*obj, &key, &deps).await;
    let entry = Entry {
        problem: outcome.as_ref().err().map(|r| r.problem(&key)),
        conn: conn.clone(),
        allowed: obj.allowed(),
    };
    if deps.ctx.connections.apply(key.clone(), entry) {
        wake_users(&deps.ctx, &key);
    }
    let phase = match &outcome {
        Ok(_) => Phase::Ready {
            reason: ConnectionReason::Connected,
            message: "a token was obtained and the read permission verified".into(),
        },
        Err(r) if r.reason == ConnectionReason::Verifying => Phase::Reconciling {
            reason: r.reason,
            message: r.message.clone(),
        },
        Err(r) => Phase::Stalled {
            reason: r.reason,
            message: r.message.clone(),
        },
    };
    announce(&*obj, &deps, &phase).await;
    write_status(&*obj, &deps, &phase, conn.as_deref()).await?;
    // While verifying, look again soon: the poller's first load takes a read or two.
    let verifying = matches!(&outcome, Err(r) if r.reason == ConnectionReason::Verifying);
    Ok(Action::requeue(if verifying {
        deps.recheck.min(VERIFYING_RECHECK)
    } else {
        deps.recheck
    }))
}

/// Steps 1–4: the connection (built now or before; kept while a problem lasts, so that its
/// quota gate and view outlive a rotation gone wrong), and whether resources may use it.
async fn connect<K: ConnectionObject>(
    obj: &K,
    key: &ConnectionKey,
    deps: &Deps,
) -> (Option<Arc<Connection>>, Result<(), Refusal>) {
    let previous = deps.ctx.connections.entry(key).and_then(|e| e.conn);
    let ready = async {
        let endpoints = endpoints(obj.settings())?;
        let credential = read_credential(obj, deps).await?;
        let conn = built(obj, key, endpoints, credential.secret, deps)?;
        Ok((conn, credential.digest))
    };
    match ready.await {
        Ok((conn, digest)) => {
            let verified = verify(&conn, digest).await;
            (Some(conn), verified)
        }
        Err(refusal) => (previous, Err(refusal)),
    }
}

/// Step 1: where the connection's calls go.
fn endpoints(settings: &ConnectionSettings) -> Result<Endpoints, Refusal> {
    let invalid = |what: &str, e: String| {
        Refusal::new(ConnectionReason::InvalidSettings, format!("{what}: {e}"))
    };
    let cloud = settings.cloud.map(Into::into).unwrap_or_default();
    let parse = |what: &str, s: &Option<String>| {
        s.as_deref()
            .map(url::Url::parse)
            .transpose()
            .map_err(|e| invalid(what, e.to_string()))
    };
    let api_url = parse("apiUrl", &settings.api_url)?;
    let authority = parse("authority", &settings.authority)?;
    let api_url = match (api_url, settings.region) {
        (None, Some(region)) => {
            Some(regional_api_url(cloud, region.into()).map_err(|e| invalid("region", e))?)
        }
        (url, _) => url,
    };
    Ok(resolve_endpoints(
        cloud,
        api_url,
        authority,
        settings.scope.clone(),
    ))
}

/// Step 2: the credential as it is now.
async fn read_credential<K: ConnectionObject>(obj: &K, deps: &Deps) -> Result<Credential, Refusal> {
    let credential = &obj.settings().credential;
    let missing = |m: String| Refusal::new(ConnectionReason::CredentialMissing, m);
    if credential.workload_identity.is_some() {
        let path = deps.federated_token_file.clone().ok_or_else(|| {
            missing(
                "workloadIdentity: the operator has no federated token file \
                 (AZURE_FEDERATED_TOKEN_FILE / --federated-token-file)"
                    .into(),
            )
        })?;
        let digest = sha256(path.to_string_lossy().as_bytes());
        return Ok(Credential {
            secret: ClientSecret::federated_token_file(path),
            digest,
        });
    }
    let namespace = obj.secret_namespace(deps).ok_or_else(|| {
        missing("the operator's namespace is not known (set POD_NAMESPACE)".into())
    })?;
    if let Some(r) = &credential.client_secret {
        let value = secret_key(deps, &namespace, &r.name, &r.key)
            .await
            .map_err(missing)?;
        let value = String::from_utf8(value).map_err(|_| {
            missing(format!(
                "Secret {namespace}/{}: key {} is not UTF-8",
                r.name, r.key
            ))
        })?;
        let value = value.trim();
        if value.is_empty() {
            return Err(missing(format!(
                "Secret {namespace}/{}: key {} is empty",
                r.name, r.key
            )));
        }
        return Ok(Credential {
            digest: sha256(value.as_bytes()),
            secret: ClientSecret::Value(SecretString::new(value)),
        });
    }
    if let Some(c) = &credential.certificate {
        let (name, cert_key, key_key) = (&c.secret_name, &c.certificate_key, &c.private_key_key);
        let cert = secret_key(deps, &namespace, name, cert_key)
            .await
            .map_err(missing)?;
        let key = secret_key(deps, &namespace, name, key_key)
            .await
            .map_err(missing)?;
        let label = |k: &str| format!("Secret {namespace}/{name} key {k}");
        let loaded = CertificateCredential::from_pem(
            &label(cert_key),
            &cert,
            &label(key_key),
            &key,
            AssertionAlgorithm::default(),
        )
        .map_err(|e| missing(e.to_string()))?;
        let digest = sha256(&[&cert[..], b"\0key\0", &key[..]].concat());
        return Ok(Credential {
            secret: ClientSecret::Certificate(Arc::new(loaded)),
            digest,
        });
    }
    Err(Refusal::new(
        ConnectionReason::InvalidSettings,
        "no credential (the API server normally refuses this)",
    ))
}

/// One key of a Secret; the error names what is missing, never a value.
async fn secret_key(
    deps: &Deps,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Vec<u8>, String> {
    let api: Api<Secret> = Api::namespaced(deps.ctx.kube.clone(), namespace);
    let secret = match api.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(format!("Secret {namespace}/{name} does not exist")),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            return Err(format!(
                "the operator may not read Secret {namespace}/{name} (RBAC: get secrets in \
                 {namespace}; see the chart's connections values)"
            ));
        }
        Err(e) => return Err(format!("reading Secret {namespace}/{name}: {e}")),
    };
    secret
        .data
        .and_then(|mut d| d.remove(key))
        .map(|v| v.0)
        .ok_or_else(|| format!("Secret {namespace}/{name} has no key {key}"))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Step 3: the connection of this generation: the one built before, with the credential
/// swapped in, or a new one (its own client, token cache, quota gate, view and poller).
fn built<K: ConnectionObject>(
    obj: &K,
    key: &ConnectionKey,
    endpoints: Endpoints,
    secret: ClientSecret,
    deps: &Deps,
) -> Result<Arc<Connection>, Refusal> {
    let generation = obj.meta().generation.unwrap_or_default();
    let previous = deps.ctx.connections.entry(key).and_then(|e| e.conn);
    if let Some(conn) = previous
        && let Some(origin) = &conn.origin
        && origin.generation == generation
    {
        origin.credential.set(secret);
        return Ok(conn);
    }
    let settings = obj.settings();
    let credential = CurrentCredential::new(secret);
    let gate = Arc::new(QuotaGate::with_key(
        QuotaConfig::from_budget(settings.quota_budget.unwrap_or(1.0), deps.time_scale),
        deps.quota_key,
    ));
    let mde = MdeClient::new(
        MdeClientConfig {
            endpoints,
            tenant_id: settings.tenant_id.clone(),
            client_id: settings.client_id.clone(),
            secret: ClientSecret::Current(credential.clone()),
            ca_file: deps.ca_file.clone(),
            request_timeout: deps.request_timeout,
            time_scale: deps.time_scale,
            observer: Some(deps.shared.metrics.clone()),
        },
        gate,
    )
    .map_err(|e| Refusal::new(ConnectionReason::InvalidSettings, e.to_string()))?;
    tracing::info!(connection = %key, tenant = %settings.tenant_id, generation, "connection built");
    Ok(Connection::start_with(
        key.clone(),
        mde,
        &deps.shared,
        Some(Origin::new(generation, credential)),
    ))
}

/// Step 4: a token, then the read permission: the connection's poller's first load of the
/// tenant's actions (which also rebuilds its quota ledger from MDE's record, so that no call is
/// made before it). Once per credential: a rotated Secret is tried for a token again.
async fn verify(conn: &Connection, digest: [u8; 32]) -> Result<(), Refusal> {
    let Some(origin) = &conn.origin else {
        return Ok(());
    };
    let refused = |reason, message: String| Err(Refusal::new(reason, message));
    if origin.verified() != Some(digest) {
        if let Err(e) = conn.mde.tokens().token().await {
            return refused(reason_of_class(e.class()), e.to_string());
        }
        origin.set_verified(digest);
    }
    if conn.view.is_synced() {
        return Ok(());
    }
    conn.nudge.notify_one();
    match conn.view.load_failure() {
        Some(CallFailure::Forbidden(m)) => refused(ConnectionReason::Forbidden, m),
        Some(CallFailure::AuthenticationFailed(m)) => {
            refused(ConnectionReason::AuthenticationFailed, m)
        }
        Some(other) => refused(
            ConnectionReason::Verifying,
            format!("reading the tenant's actions failed, retrying: {other:?}"),
        ),
        None => refused(
            ConnectionReason::Verifying,
            "reading the tenant's actions".into(),
        ),
    }
}

fn reason_of_class(class: ErrorClass) -> ConnectionReason {
    match class {
        ErrorClass::AuthenticationFailed => ConnectionReason::AuthenticationFailed,
        ErrorClass::Forbidden => ConnectionReason::Forbidden,
        _ => ConnectionReason::Verifying,
    }
}

/// Wakes every DeviceIsolation and DeviceIsolationSet that names `key`.
fn wake_users(ctx: &Context, key: &ConnectionKey) {
    let names = |namespace: Option<String>, r: Option<&crate::crd::ConnectionRef>| {
        r.is_some_and(|r| super::key_of(&namespace.unwrap_or_default(), r) == *key)
    };
    for di in ctx.stores.all() {
        if names(di.namespace(), di.spec.connection_ref.as_ref()) {
            ctx.waker
                .wake(&crate::reconcile::ResourceRef::from_obj(&*di));
        }
    }
    for set in ctx.sets.all() {
        if names(set.namespace(), set.spec.connection_ref.as_ref()) {
            ctx.waker
                .wake_set(&kube::runtime::reflector::ObjectRef::from_obj(&*set));
        }
    }
}

/// An event when the connection's Ready reason changes to one worth telling: `Connected`
/// (Normal) or a stall (Warning). `Verifying` passes silently. Only for an MdeConnection: Events
/// are namespaced, and a ClusterMdeConnection's would need a grant in some other namespace (its
/// status says the same).
async fn announce<K: ConnectionObject>(obj: &K, deps: &Deps, phase: &Phase<ConnectionReason>) {
    if obj.meta().namespace.is_none() {
        return;
    }
    let reason = phase.reason();
    let previous = obj
        .status()
        .and_then(|s| conditions::find(&s.conditions, conditions::READY))
        .map(|c| c.reason.as_str());
    if previous == Some(reason.as_str()) || reason == ConnectionReason::Verifying {
        return;
    }
    let (kind, message) = match phase {
        Phase::Stalled { message, .. } => (crate::events::EventKind::Warning, message),
        Phase::Ready { message, .. } | Phase::Reconciling { message, .. } => {
            (crate::events::EventKind::Normal, message)
        }
    };
    deps.ctx
        .events
        .publish_logged(
            &obj.object_ref(&()),
            kind,
            reason.as_str(),
            message,
            "Connect",
        )
        .await;
}

/// Step 5: the status: the condition and what the gate counts.
async fn write_status<K: ConnectionObject>(
    obj: &K,
    deps: &Deps,
    phase: &Phase<ConnectionReason>,
    conn: Option<&Connection>,
) -> Result<(), Error> {
    let generation = obj.meta().generation.unwrap_or_default();
    let previous = obj.status().cloned().unwrap_or_default();
    let now = chrono::Utc::now();
    let mut status = ConnectionStatus {
        observed_generation: Some(generation),
        conditions: conditions::conditions_for(
            phase,
            &previous.conditions,
            generation,
            &now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        ..ConnectionStatus::default()
    };
    if let Some(conn) = conn {
        let gate = conn.mde.gate();
        status.quota = quota_of(gate);
        status.calls_last_hour = Some(match gate.key() {
            QuotaKey::App => status.quota.first().map_or(0, |q| q.calls_last_hour),
            QuotaKey::Endpoint => status.quota.iter().map(|q| q.calls_last_hour).sum(),
        });
        status.last_throttled = gate.last_refused().map(|(api, at)| {
            let ago = tokio::time::Instant::now().saturating_duration_since(at);
            let at = now - chrono::Duration::from_std(ago).unwrap_or_default();
            Throttled {
                api: api.as_str().to_string(),
                at: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }
        });
    }
    if obj.status() == Some(&status) {
        return Ok(());
    }
    let api = obj.api(deps.ctx.kube.clone());
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
    .map_err(Error::StatusWrite)
}

/// Each API's use and limits (one entry, `app`, when MDE counts one budget for the app).
fn quota_of(gate: &QuotaGate) -> Vec<ApiQuota> {
    use crate::quota::Span;
    let now = tokio::time::Instant::now();
    let apis: Vec<QuotaApi> = match gate.key() {
        QuotaKey::App => vec![QuotaApi::Unisolate],
        QuotaKey::Endpoint => QuotaApi::all().to_vec(),
    };
    apis.into_iter()
        .map(|api| {
            let (minute, hour) = gate.used(api, now);
            ApiQuota {
                api: match gate.key() {
                    QuotaKey::App => "app".to_string(),
                    QuotaKey::Endpoint => api.as_str().to_string(),
                },
                calls_last_minute: minute,
                calls_last_hour: hour,
                limit_per_minute: gate.limit(api, Span::Minute),
                limit_per_hour: gate.limit(api, Span::Hour),
            }
        })
        .collect()
}

/// A deleted connection: its resources are told, its poller stopped.
pub async fn deleted(ctx: &Context, key: ConnectionKey) {
    if let Some(conn) = ctx.connections.delete(&key) {
        conn.stop().await;
    }
    wake_users(ctx, &key);
    tracing::info!(connection = %key, "connection deleted");
}

/// Exponential backoff for status writes that failed.
pub fn error_policy<K: ConnectionObject>(_: Arc<K>, error: &Error, deps: Arc<Deps>) -> Action {
    tracing::warn!(%error, "connection reconcile failed");
    Action::requeue(deps.recheck)
}
