//! `mde-isolation-operator run`: wires the clients, the quota gate, the shared view, the batch
//! poller, the controllers (one per watched namespace, or one for the cluster), and the HTTP
//! endpoint, and stops them all on one shutdown signal.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{CLIENT_SECRET_ENV, RunArgs};
use crate::controller::{self, Context};
use crate::crd::DeviceIsolation;
use crate::http::{self, Health};
use crate::mde::client::{MdeClient, MdeClientConfig};
use crate::mde::cloud::resolve_endpoints;
use crate::mde::token::ClientSecret;
use crate::metrics::Metrics;
use crate::planner::Timing;
use crate::poller::{PollTiming, Poller, Wake};
use crate::quota::{QuotaConfig, QuotaGate};
use crate::view::{ActionView, ResourceKey};

/// Why the operator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No client secret configured.
    #[error(
        "no client secret: set --client-secret-file (MDE_CLIENT_SECRET_FILE) or the {CLIENT_SECRET_ENV} environment variable"
    )]
    NoSecret,
    /// The secret file could not be read.
    #[error("reading the client secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The MDE client could not be built (e.g. an unreadable CA file).
    #[error("MDE client: {0}")]
    Mde(String),
    /// No Kubernetes configuration.
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// The HTTP endpoint could not bind.
    #[error("HTTP endpoint {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Routes poller wake-ups to the controller that watches the resource's namespace.
struct Router {
    all: Option<mpsc::UnboundedSender<ObjectRef<DeviceIsolation>>>,
    by_namespace: HashMap<String, mpsc::UnboundedSender<ObjectRef<DeviceIsolation>>>,
}

impl Wake for Router {
    fn wake(&self, (namespace, name): &ResourceKey) {
        let sender = self
            .all
            .as_ref()
            .or_else(|| self.by_namespace.get(namespace));
        if let Some(tx) = sender {
            // A closed channel means that controller is shutting down; nothing to wake.
            let _ = tx.send(ObjectRef::new(name).within(namespace));
        }
    }
}

fn load_secret(args: &RunArgs) -> Result<ClientSecret, RunError> {
    match &args.client_secret_file {
        Some(path) => ClientSecret::from_file(path).map_err(|source| RunError::SecretFile {
            path: path.display().to_string(),
            source,
        }),
        None => std::env::var(CLIENT_SECRET_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(ClientSecret::from_value)
            .ok_or(RunError::NoSecret),
    }
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let secret = load_secret(&args)?;
    let endpoints = resolve_endpoints(
        args.cloud,
        args.api_url.clone(),
        args.authority.clone(),
        args.scope.clone(),
    );
    tracing::info!(api = %endpoints.api_url, authority = %endpoints.authority, "MDE endpoints");
    let gate = Arc::new(QuotaGate::new(QuotaConfig::from_budget(
        args.quota_budget,
        args.time_scale,
    )));
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
    let health = Arc::new(Health::new(poll_timing.max_open.max(poll_timing.idle) * 3));
    // Without leader election this replica is the only one talking to MDE.
    health.leading.store(true, Ordering::Relaxed);
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));

    let view = Arc::new(ActionView::new());
    let nudge = Arc::new(Notify::new());
    let timing = Timing {
        max_attempts: args.max_attempts,
        ..scaled_timing(args.time_scale)
    };
    let recorder = Recorder::new(
        kube.clone(),
        Reporter {
            controller: controller::FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let ctx = Arc::new(Context::new(
        kube.clone(),
        mde.clone(),
        view.clone(),
        recorder,
        metrics.clone(),
        timing,
        args.dry_run,
        nudge.clone(),
    ));

    let scopes: Vec<(Option<String>, Api<DeviceIsolation>)> = if args.all_namespaces {
        vec![(None, Api::all(kube.clone()))]
    } else {
        args.namespaces
            .iter()
            .map(|ns| (Some(ns.clone()), Api::namespaced(kube.clone(), ns)))
            .collect()
    };
    let mut router = Router {
        all: None,
        by_namespace: HashMap::new(),
    };
    let mut runs = Vec::new();
    let mut stores = Vec::new();
    for (namespace, api) in scopes {
        let (tx, mut rx) = mpsc::unbounded_channel();
        match namespace {
            None => router.all = Some(tx),
            Some(ns) => {
                router.by_namespace.insert(ns, tx);
            }
        }
        let wakeups = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let controller = Controller::new(api, watcher::Config::default())
            .with_config(ControllerConfig::default().concurrency(args.concurrency))
            .reconcile_on(wakeups)
            .graceful_shutdown_on(shutdown.clone().cancelled_owned());
        stores.push(controller.store());
        let run = controller
            .run(controller::reconcile, controller::error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller event");
                }
            });
        runs.push(run);
    }
    *ctx.stores.lock().unwrap_or_else(|e| e.into_inner()) = stores.clone();

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

    let poller = Poller {
        client: mde,
        view,
        waker: Arc::new(router),
        metrics: metrics.clone(),
        health: health.clone(),
        timing: poll_timing,
        nudge,
    };
    tokio::spawn(poller.run(shutdown.clone()));
    tokio::spawn({
        let (metrics, gate, shutdown) = (metrics.clone(), gate.clone(), shutdown.clone());
        async move {
            loop {
                metrics.observe_quota(&gate, tokio::time::Instant::now());
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

    tracing::info!(dry_run = args.dry_run, "operator running");
    join_all(runs).await;
    if !shutdown.is_cancelled() {
        health.controllers_running.store(false, Ordering::Relaxed);
        tracing::error!("a controller stopped unexpectedly");
    }
    shutdown.cancel();
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
