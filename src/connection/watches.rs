//! The watches of `MdeConnection`s (one per watched scope) and, when served, of
//! `ClusterMdeConnection`s and the namespaces' labels (their `spec.namespaces.selector`), and the
//! controllers over them (see [`super::controller`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, future::LocalBoxFuture};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::ConnectionKey;
use super::controller::{self, ConnectionObject, Deps};
use crate::cache;
use crate::crd::{ClusterMdeConnection, MdeConnection};
use crate::leader::Leading;

type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// One kind's watch of one scope: its cache and its events, until a controller runs over them.
struct Watch<K: kube::Resource<DynamicType = ()> + 'static> {
    scope: Option<String>,
    store: Store<K>,
    events: Events<K>,
}

/// Every connection watch of the process.
pub struct ConnectionWatches {
    namespaced: Vec<Watch<MdeConnection>>,
    cluster: Option<Watch<ClusterMdeConnection>>,
    /// The namespaces' labels, when ClusterMdeConnections are served.
    pub namespace_labels: Option<Store<PartialObjectMeta<Namespace>>>,
    loaded: watch::Receiver<bool>,
}

fn watch_of<K>(api: Api<K>, scope: Option<String>) -> Watch<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let events = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(cache::slim),
    )
    .boxed();
    Watch {
        scope,
        store,
        events,
    }
}

impl ConnectionWatches {
    /// The watches of `scopes` (a namespace each, `None` for all) and, with `cluster`, of
    /// ClusterMdeConnections and namespaces. The namespaces' watch runs until `shutdown`.
    pub fn start(
        kube: &kube::Client,
        scopes: &[Option<String>],
        cluster: bool,
        shutdown: &CancellationToken,
    ) -> ConnectionWatches {
        let namespaced: Vec<_> = scopes
            .iter()
            .map(|scope| {
                let api = match scope {
                    None => Api::all(kube.clone()),
                    Some(ns) => Api::namespaced(kube.clone(), ns),
                };
                watch_of(api, scope.clone())
            })
            .collect();
        let cluster_watch = cluster.then(|| watch_of(Api::all(kube.clone()), None));
        let namespace_labels = cluster.then(|| {
            let (store, writer) = reflector::store();
            let stream = reflector::reflector(
                writer,
                watcher(
                    Api::<PartialObjectMeta<Namespace>>::all(kube.clone()),
                    watcher::Config::default(),
                ),
            );
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let drained = stream.for_each(|_| futures::future::ready(()));
                tokio::select! {
                    _ = drained => {},
                    _ = shutdown.cancelled() => {},
                }
            });
            store
        });
        let (loaded_tx, loaded) = watch::channel(false);
        let namespaced_stores: Vec<_> = namespaced.iter().map(|w| w.store.clone()).collect();
        let cluster_store = cluster_watch.as_ref().map(|w| w.store.clone());
        tokio::spawn(async move {
            for store in namespaced_stores {
                ready(&store).await;
            }
            if let Some(store) = cluster_store {
                ready(&store).await;
            }
            let _ = loaded_tx.send(true);
        });
        ConnectionWatches {
            namespaced,
            cluster: cluster_watch,
            namespace_labels,
            loaded,
        }
    }

    /// Turns true once every connection cache has its first list.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.clone()
    }

    /// The controllers over the watches.
    pub fn controllers(
        self,
        deps: &Arc<Deps>,
        elected: bool,
        leading: &Leading,
        shutdown: &CancellationToken,
    ) -> Vec<LocalBoxFuture<'static, ()>> {
        let mut runs: Vec<_> = self
            .namespaced
            .into_iter()
            .map(|w| run(w, deps, elected, leading, shutdown))
            .collect();
        runs.extend(
            self.cluster
                .map(|w| run(w, deps, elected, leading, shutdown)),
        );
        runs
    }
}

/// A connection deleted: its resources are told, its poller stopped (in the background: the
/// watch goes on).
fn gone(ctx: &Arc<crate::reconcile::Context>, key: ConnectionKey) {
    let ctx = ctx.clone();
    tokio::spawn(async move { controller::deleted(&ctx, key).await });
}

/// Waits for a cache's first list (polling: the readiness future wakes one waiter only).
async fn ready<K: kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) {
    loop {
        match tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await {
            Ok(_) => return,
            Err(_elapsed) => continue,
        }
    }
}

/// The controller over one watch: reconciles (only while this replica leads) every connection
/// it brings, registers each as soon as it is seen, and frees each it reports deleted.
fn run<K>(
    w: Watch<K>,
    deps: &Arc<Deps>,
    elected: bool,
    leading: &Leading,
    shutdown: &CancellationToken,
) -> LocalBoxFuture<'static, ()>
where
    K: ConnectionObject + std::fmt::Debug,
{
    let ctx = deps.ctx.clone();
    let scope = w.scope.clone();
    // The connections of the list in progress (between Init and InitDone): any other of this
    // scope was deleted while the watch was down, and no delete event comes for it.
    let mut listing: Option<HashSet<ConnectionKey>> = None;
    let changes = w
        .events
        .inspect(crate::run::crd_notice(w.scope.clone()))
        .inspect(move |event| match event {
            Ok(watcher::Event::Apply(obj)) => ctx.connections.seen(obj.key()),
            Ok(watcher::Event::InitApply(obj)) => {
                ctx.connections.seen(obj.key());
                if let Some(seen) = listing.as_mut() {
                    seen.insert(obj.key());
                }
            }
            Ok(watcher::Event::Delete(obj)) => gone(&ctx, obj.key()),
            Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
            Ok(watcher::Event::InitDone) => {
                let present = listing.take().unwrap_or_default();
                for key in ctx.connections.keys() {
                    if K::covers(&key, scope.as_deref()) && !present.contains(&key) {
                        gone(&ctx, key);
                    }
                }
            }
            Err(_) => {}
        })
        .applied_objects();
    // Nothing else triggers a connection's reconcile: its own changes and its recheck do.
    let (_, triggers) = mpsc::unbounded_channel();
    let controller = crate::run::controller(
        changes,
        w.store,
        triggers,
        ControllerConfig::default(),
        elected,
        leading,
        shutdown,
    );
    let leading = leading.clone();
    controller
        .run(
            move |obj, deps| {
                let leading = leading.clone();
                async move {
                    if !leading.now() {
                        return Ok(Action::await_change());
                    }
                    controller::reconcile(obj, deps).await
                }
            },
            controller::error_policy,
            deps.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection controller event");
            }
        })
        .boxed_local()
}
