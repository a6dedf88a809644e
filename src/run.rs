//! `mde-isolation-operator run`: wires the clients, the quota gate, the shared view, the batch
//! poller, the controllers (one per watched namespace, or one for the cluster), and the HTTP
//! endpoint, and stops them all on one shutdown signal.
//!
//! With `--leader-election` the controllers start at once, so a standby's watch caches are warm,
//! but their reconciles do nothing and the poller does not start until this replica holds the
//! [`leader`] Lease. Then everything in the caches is reconciled afresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, Stream, StreamExt};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cache::Cached;
use crate::cache::{self, Stores};
use crate::config::{CLIENT_SECRET_ENV, RunArgs};
use crate::connection::{self, Connection, ConnectionKey, ConnectionWatches, Connections};
use crate::crd::{DeviceIsolation, DeviceIsolationSet};
use crate::events::EventPublisher;
use crate::fleet::{self, SetStores};
use crate::http::{self, Health};
use crate::leader::{self, Election, Leading, LeadingSender, LeaseConfig, LeaseTiming, Role};
use crate::mde::client::{MdeClient, MdeClientConfig};
use crate::mde::cloud::resolve_endpoints;
use crate::mde::token::{ClientSecret, CredentialError, CredentialSources, SecretString};
use crate::metrics::Metrics;
use crate::poller::{PollTiming, Wake};
use crate::quota::{QuotaConfig, QuotaGate};
use crate::reconcile::{self, Context, Memory, Requeues, ResourceRef, Timing};

/// Why the operator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable credential: none or several configured, or unreadable.
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The MDE client could not be built (e.g. an unreadable CA file).
    #[error("MDE client: {0}")]
    Mde(String),
    /// No Kubernetes configuration.
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// Leader election needs a namespace for its Lease.
    #[error(
        "no namespace for the leader-election Lease: set --lease-namespace (MDE_LEASE_NAMESPACE) or POD_NAMESPACE"
    )]
    NoLeaseNamespace,
    /// The HTTP endpoint could not bind.
    #[error("HTTP endpoint {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How often a connection's Secret is read again and its status refreshed (divided by the time
/// scale, at least a second).
const CONNECTION_RECHECK: Duration = Duration::from_secs(30);

/// How long a set's reconcile waits for more changes of its children before it runs.
const SET_DEBOUNCE: Duration = Duration::from_millis(500);

/// Routes wake-ups to the controller that watches the object's namespace.
struct Router {
    resources: Route<Cached>,
    sets: Route<DeviceIsolationSet>,
}

/// The trigger channels of one kind's controllers: one for every namespace, or one each.
struct Route<K: kube::Resource<DynamicType = ()>> {
    all: Option<mpsc::UnboundedSender<ObjectRef<K>>>,
    by_namespace: HashMap<String, mpsc::UnboundedSender<ObjectRef<K>>>,
}

impl<K: kube::Resource<DynamicType = ()>> Default for Route<K> {
    fn default() -> Self {
        Route {
            all: None,
            by_namespace: HashMap::new(),
        }
    }
}

impl<K: kube::Resource<DynamicType = ()>> Route<K> {
    fn add(&mut self, scope: &Option<String>, tx: mpsc::UnboundedSender<ObjectRef<K>>) {
        match scope {
            None => self.all = Some(tx),
            Some(ns) => {
                self.by_namespace.insert(ns.clone(), tx);
            }
        }
    }

    fn send(&self, object: &ObjectRef<K>) {
        let sender = self.all.as_ref().or_else(|| {
            let namespace = object.namespace.as_deref()?;
            self.by_namespace.get(namespace)
        });
        if let Some(tx) = sender {
            // A closed channel means that controller is shutting down; nothing to wake.
            let _ = tx.send(object.clone());
        }
    }
}

impl Wake for Router {
    fn wake(&self, resource: &ResourceRef) {
        self.resources.send(resource);
    }

    fn wake_set(&self, set: &ObjectRef<DeviceIsolationSet>) {
        self.sets.send(set);
    }
}

/// The one credential configured: a client secret (file or variable), a client certificate or
/// a federated token file.
fn load_secret(args: &RunArgs) -> Result<ClientSecret, RunError> {
    Ok(ClientSecret::from_sources(CredentialSources {
        client_secret_file: args.client_secret_file.as_deref(),
        client_secret: std::env::var(CLIENT_SECRET_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| SecretString::new(s.trim())),
        client_certificate_file: args.client_certificate_file.as_deref(),
        client_key_file: args.client_key_file.as_deref(),
        assertion_algorithm: args.assertion_algorithm,
        federated_token_file: args.federated_token_file.as_deref(),
    })?)
}

fn lease_config(args: &RunArgs) -> Result<LeaseConfig, RunError> {
    Ok(LeaseConfig {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace().ok_or(RunError::NoLeaseNamespace)?,
        identity: leader::default_identity(),
        timing: LeaseTiming::from_duration(Duration::from_secs(args.lease_duration_seconds)),
        leader_seen: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    })
}

/// The controllers' reconcile: nothing at all (no MDE call, no status write) until this replica
/// leads. A standby runs its controllers only to keep the watch caches warm; when it starts
/// leading, `reconcile_all_on` reconciles every cached resource from its state at that moment.
async fn reconcile_when_leading(
    di: Arc<Cached>,
    ctx: Arc<Context>,
    leading: Leading,
) -> Result<Action, reconcile::Error> {
    if !leading.now() {
        return Ok(Action::await_change());
    }
    // A set's child asks its set before any request: the sets' caches must be loaded. Only
    // children wait: without the DeviceIsolationSet CRD (a chart upgrade whose CRDs were not
    // applied yet) the sets' caches never load, and single resources must not wait for them.
    if di.owning_set().is_some() {
        ctx.sets.ready().await;
    }
    // Who asked is tagged verified or not: know which before the first request.
    ctx.accountability.checked().await;
    reconcile::reconcile(di, ctx).await
}

/// The set controller's reconcile, gated like [`reconcile_when_leading`].
async fn reconcile_set_when_leading(
    set: Arc<DeviceIsolationSet>,
    ctx: Arc<Context>,
    leading: Leading,
) -> Result<Action, fleet::Error> {
    if !leading.now() {
        return Ok(Action::await_change());
    }
    fleet::reconcile(set, ctx).await
}

/// A controller of the objects `changes` brings (cached in `store`), that also reconciles what
/// `triggers` names and, under leader election, everything cached again on becoming leader.
pub(crate) fn controller<K, S>(
    changes: S,
    store: reflector::Store<K>,
    mut triggers: mpsc::UnboundedReceiver<ObjectRef<K>>,
    config: ControllerConfig,
    elected: bool,
    leading: &Leading,
    shutdown: &CancellationToken,
) -> Controller<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    let triggers = futures::stream::poll_fn(move |cx| triggers.poll_recv(cx));
    let controller = Controller::for_stream(changes, store)
        .with_config(config)
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    if elected {
        controller.reconcile_all_on(once_leading(leading.clone()))
    } else {
        controller
    }
}

/// Says once when a CRD added after DeviceIsolation's is not served (a chart upgrade whose new
/// CRD was not applied yet; the watch keeps retrying with backoff) and once when it is: single
/// resources are served either way, and the kind is served as soon as its CRD is applied,
/// without a restart.
pub(crate) fn crd_notice<K: kube::Resource<DynamicType = ()>>(
    scope: Option<String>,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    let scope = scope.unwrap_or_else(|| "all namespaces".into());
    let kind = K::kind(&()).to_string();
    let file = format!("crds/{}.{}.yaml", K::plural(&()), K::group(&()));
    let mut missing = false;
    move |event| match event {
        Err(
            watcher::Error::InitialListFailed(kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(kube::Error::Api(status)),
        ) if status.code == 404 && !missing => {
            missing = true;
            tracing::error!(
                scope = %scope,
                "the {kind} CRD is not installed: {kind}s are not served until it is \
                 (kubectl apply -f {file}); single DeviceIsolations are served"
            );
        }
        // `Init` starts a list attempt; what follows it comes from the server.
        Ok(e) if missing && !matches!(e, watcher::Event::Init) => {
            missing = false;
            tracing::info!(scope = %scope, "the {kind} CRD is installed: serving {kind}s");
        }
        _ => {}
    }
}

/// Logs a controller's per-object outcome (errors are handled by the error policies).
async fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(result: Result<T, E>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "controller event");
    }
}

/// One item once this replica leads (never, if it does not).
fn once_leading(leading: Leading) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::once(leading.wait())
        .filter_map(|led| futures::future::ready(led.then_some(())))
}

/// Follows the election: on becoming leader, says so through `leading` (which opens the
/// reconcile gate, starts the poller and triggers the bulk reconcile, all from one value); on
/// losing the lease, exits the process.
async fn follow_election(
    mut role: watch::Receiver<Role>,
    health: Arc<Health>,
    leading: LeadingSender,
) {
    let Ok(first) = role.wait_for(|r| *r != Role::Candidate).await.map(|r| *r) else {
        return; // stopped while standing by
    };
    if first == Role::Leader {
        // The poller beats only after its first sleep: count its silence from now, not from
        // start-up, or a standby that waited long would fail liveness right after taking over.
        health.poller_beat();
        leading.lead();
        tracing::info!("leading: reconciling and polling MDE");
        if role.wait_for(|r| *r == Role::Lost).await.is_err() {
            return; // released on shutdown
        }
    }
    // A standby may take the lease over soon. Reconciles in flight cannot be trusted any more:
    // one may be about to send a request that the new leader also sends (a second action on a
    // machine). A graceful stop would let them run on, so end the process now; the pod
    // restarts as a standby, and anything left half done is recovered by the new leader from
    // status intents and audit tags, as after a crash.
    tracing::error!(
        code = leader::LOST_EXIT_CODE,
        "lost the leader-election lease: exiting at once so that this replica stops calling MDE"
    );
    std::process::exit(leader::LOST_EXIT_CODE);
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let secret = load_secret(&args)?;
    let lease = args
        .leader_election
        .then(|| lease_config(&args))
        .transpose()?;
    let regional = match (&args.api_url, args.region) {
        (None, Some(region)) => {
            Some(crate::mde::cloud::regional_api_url(args.cloud, region).map_err(RunError::Mde)?)
        }
        _ => None,
    };
    let endpoints = resolve_endpoints(
        args.cloud,
        args.api_url.clone().or(regional),
        args.authority.clone(),
        args.scope.clone(),
    );
    tracing::info!(api = %endpoints.api_url, authority = %endpoints.authority, "MDE endpoints");
    let gate = Arc::new(QuotaGate::with_key(
        QuotaConfig::from_budget(args.quota_budget, args.time_scale),
        args.quota_key,
    ));
    let metrics = Arc::new(Metrics::new());
    let mde = MdeClient::new(
        MdeClientConfig {
            endpoints,
            tenant_id: args.tenant_id.clone(),
            client_id: args.client_id.clone(),
            secret,
            ca_file: args.ca_file.clone(),
            request_timeout: Duration::from_secs(args.request_timeout_seconds),
            time_scale: args.time_scale,
            observer: Some(metrics.clone()),
        },
        gate.clone(),
    )
    .map_err(|e| RunError::Mde(e.to_string()))?;
    let kube = kube::Client::try_default().await?;

    let poll_timing = PollTiming::scaled(
        args.time_scale,
        Duration::from_secs(args.drift_interval_seconds),
    );
    // Without leader election this replica is the only one talking to MDE; with it, it may only
    // once it holds the lease (`follow_election`).
    let (leading_tx, leading) = leader::leading(lease.is_none());
    let health = Arc::new(Health::new(
        poll_timing.max_open.max(poll_timing.idle) * 3,
        leading.clone(),
    ));
    // The election reports a live holder straight into readiness (a standby is ready).
    let lease = lease.map(|cfg| LeaseConfig {
        leader_seen: health.leader_known.clone(),
        ..cfg
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));

    let timing = Timing {
        max_attempts: args.max_attempts,
        // Twice the request timeout, plus the second status times are truncated to.
        ambiguous_settle: Duration::from_secs(args.request_timeout_seconds * 2 + 1),
        ..scaled_timing(args.time_scale)
    };
    // Whether the API server vouches for requested-by: a policy is rarely changed, so a minute.
    let accountability = Arc::new(crate::accountability::Accountability::default());
    tokio::spawn(crate::accountability::run(
        kube.clone(),
        accountability.clone(),
        Duration::from_secs(60),
        shutdown.clone(),
    ));
    let events = EventPublisher::new(
        kube.clone(),
        reconcile::FIELD_MANAGER,
        std::env::var("POD_NAME").ok(),
    );

    let scope_names: Vec<Option<String>> = if args.all_namespaces {
        vec![None]
    } else {
        args.namespaces.iter().cloned().map(Some).collect()
    };
    let scopes: Vec<(Option<String>, Api<DeviceIsolation>)> = if args.all_namespaces {
        vec![(None, Api::all(kube.clone()))]
    } else {
        args.namespaces
            .iter()
            .map(|ns| (Some(ns.clone()), Api::namespaced(kube.clone(), ns)))
            .collect()
    };
    // The sets of the same scopes, each with a channel on which its children's changes arrive.
    let mut set_watches = Vec::new();
    for (namespace, _) in &scopes {
        let api: Api<DeviceIsolationSet> = match namespace {
            None => Api::all(kube.clone()),
            Some(ns) => Api::namespaced(kube.clone(), ns),
        };
        let (reader, writer) = reflector::store();
        let changes = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).modify(cache::slim),
        )
        .inspect(crd_notice(namespace.clone()))
        .applied_objects()
        .boxed();
        let (tx, rx) = mpsc::unbounded_channel::<ObjectRef<DeviceIsolationSet>>();
        set_watches.push((reader, changes, tx, rx));
    }
    let set_stores = SetStores::new(set_watches.iter().map(|w| w.0.clone()).collect());
    let mut router = Router {
        resources: Route::default(),
        sets: Route::default(),
    };
    // The watches first: the context holds their caches, the controllers their streams.
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    let mut watches = Vec::new();
    for ((namespace, api), set_watch) in scopes.into_iter().zip(&set_watches) {
        let (tx, rx) = mpsc::unbounded_channel();
        router.resources.add(&namespace, tx);
        router.sets.add(&namespace, set_watch.2.clone());
        let (store, machines, changes) = cache::slim_watch(
            api,
            watcher::Config::default(),
            namespace,
            report_tx.clone(),
        );
        // A child's change brings its set up to date (counts, the canary, the failure budget).
        let to_set = set_watch.2.clone();
        let changes = changes.inspect(move |changed| {
            if let Ok(di) = changed
                && let Some((name, _)) = di.owning_set()
            {
                let set = ObjectRef::new(name).within(&di.namespace().unwrap_or_default());
                let _ = to_set.send(set);
            }
        });
        watches.push((store, machines, changes, rx));
    }
    let stores: Vec<_> = watches.iter().map(|(store, ..)| store.clone()).collect();
    let indexed: Vec<_> = (watches.iter())
        .map(|(store, machines, ..)| (store.clone(), machines.clone()))
        .collect();
    let waker = Arc::new(router);
    // The connections: the operator's own (its flags), and those the connection controllers
    // build from MdeConnections and ClusterMdeConnections, whose watches start here.
    let shared = connection::Shared {
        waker: waker.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        poll: poll_timing,
        resolver_window: crate::resolver::WINDOW,
        leading: leading.clone(),
        shutdown: shutdown.clone(),
    };
    let default_gate = mde.gate().clone();
    let default = Connection::start(ConnectionKey::Default, mde, &shared);
    let connection_watches =
        ConnectionWatches::start(&kube, &scope_names, args.cluster_connections, &shutdown);
    let connections = Arc::new(Connections::new(
        default,
        connection_watches.namespace_labels.clone(),
        connection_watches.loaded(),
    ));
    let ctx = Arc::new(Context {
        kube: kube.clone(),
        connections: connections.clone(),
        stores: Stores::new(indexed),
        sets: set_stores.clone(),
        selections: fleet::Selections::default(),
        accountability: accountability.clone(),
        approval_threshold: args.approval_threshold,
        memory: Memory::default(),
        requeues: Requeues::default(),
        events,
        metrics: metrics.clone(),
        timing,
        dry_run: args.dry_run,
        waker: waker.clone(),
    });
    tokio::spawn({
        let ctx = ctx.clone();
        async move {
            while let Some(report) = report_rx.recv().await {
                ctx.report(report);
            }
        }
    });
    // Wakes each resource when its requeue comes (the reconciles set them).
    tokio::spawn({
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        async move { ctx.requeues.run(&*ctx.waker, &shutdown).await }
    });

    let mut runs = Vec::new();
    let elected = lease.is_some();
    for (store, _, changes, rx) in watches {
        let config = ControllerConfig::default().concurrency(args.concurrency);
        let controller = controller(changes, store, rx, config, elected, &leading, &shutdown);
        let gate = leading.clone();
        runs.push(
            controller
                .run(
                    move |di, ctx| reconcile_when_leading(di, ctx, gate.clone()),
                    reconcile::error_policy,
                    ctx.clone(),
                )
                .for_each(log_result)
                .boxed_local(),
        );
    }
    let deps = Arc::new(connection::controller::Deps {
        ctx: ctx.clone(),
        shared,
        ca_file: args.ca_file.clone(),
        request_timeout: Duration::from_secs(args.request_timeout_seconds),
        time_scale: args.time_scale,
        quota_key: args.quota_key,
        federated_token_file: args.federated_token_file.clone(),
        operator_namespace: std::env::var("POD_NAMESPACE").ok(),
        recheck: CONNECTION_RECHECK
            .div_f64(args.time_scale)
            .max(Duration::from_secs(1)),
    });
    runs.extend(connection_watches.controllers(&deps, elected, &leading, &shutdown));
    for (store, changes, _, rx) in set_watches {
        // A burst of child changes becomes one reconcile of their set.
        let config = ControllerConfig::default().debounce(SET_DEBOUNCE);
        let controller = controller(changes, store, rx, config, elected, &leading, &shutdown);
        let gate = leading.clone();
        runs.push(
            controller
                .run(
                    move |set, ctx| reconcile_set_when_leading(set, ctx, gate.clone()),
                    fleet::error_policy,
                    ctx.clone(),
                )
                .for_each(log_result)
                .boxed_local(),
        );
    }
    tokio::spawn({
        let health = health.clone();
        async move {
            for store in stores {
                // The readiness future registers one waker, and the controller waits on it too,
                // so one of the two is never woken: poll again every 200 ms instead of relying
                // on it. An error only means the writer was dropped, i.e. shutdown.
                loop {
                    match tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready())
                        .await
                    {
                        Ok(Ok(())) => break,
                        Ok(Err(_)) => return,
                        Err(_elapsed) => continue,
                    }
                }
            }
            health.caches_synced.store(true, Ordering::Relaxed);
            tracing::info!("watch caches synced");
        }
    });

    tokio::spawn({
        let (metrics, gate, shutdown) = (metrics.clone(), default_gate, shutdown.clone());
        let ctx = ctx.clone();
        async move {
            loop {
                metrics.observe_quota(&gate, tokio::time::Instant::now());
                // The per-resource gauges: an O(resources) scan of the caches, so on this tick,
                // not on every reconcile or deletion.
                metrics.set_tracked(&ctx.tracked());
                metrics.set_phase_counts(&ctx.stores.count_phases());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| RunError::Http {
            addr: args.http_addr,
            source,
        })?;
    tokio::spawn(http::serve(
        listener,
        metrics,
        health.clone(),
        shutdown.clone().cancelled_owned(),
    ));
    // Campaign only now that nothing can fail any more: a replica that took the lease and then
    // stopped on a start-up error would make the standby wait for the lease to expire.
    let election = lease.map(|cfg| {
        let election = Election::start(kube.clone(), cfg);
        tokio::spawn(follow_election(election.role(), health.clone(), leading_tx));
        election
    });

    tracing::info!(
        dry_run = args.dry_run,
        leader_election = election.is_some(),
        "operator running"
    );
    join_all(runs).await;
    if !shutdown.is_cancelled() {
        health.controllers_running.store(false, Ordering::Relaxed);
        tracing::error!("a controller stopped unexpectedly");
    }
    shutdown.cancel();
    // Every reconcile has finished; a poller may be in the middle of a read: end them too, so
    // that nothing here calls MDE once the lease is released.
    for conn in connections.all() {
        conn.stop().await;
    }
    if let Some(election) = election {
        election.release().await;
    }
    tracing::info!("operator stopped");
    Ok(())
}

/// Production retry timings divided by the time scale.
pub fn scaled_timing(time_scale: f64) -> Timing {
    let d = Timing::default();
    let s = |x: Duration| x.div_f64(time_scale);
    Timing {
        max_attempts: d.max_attempts,
        backoff_base: s(d.backoff_base),
        backoff_max: s(d.backoff_max),
        open_action_recheck: s(d.open_action_recheck),
        transient_retry: s(d.transient_retry),
        view_not_synced_retry: s(d.view_not_synced_retry),
        ambiguous_settle: d.ambiguous_settle,
        credential_recheck: s(d.credential_recheck),
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
