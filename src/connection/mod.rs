//! Connections to MDE: one tenant and app registration each, with everything MDE counts or
//! answers per tenant and app — its token cache (in the client), its quota gate, its batch poller
//! and its view of actions. The operator's own connection comes from its flags; every
//! `MdeConnection` and `ClusterMdeConnection` that the [`controller`] verified is another.
//! [`Connections`] is the one owner of them: resources ask it for theirs by `spec.connectionRef`.

pub mod controller;
mod registry;
mod watches;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use registry::{Connections, Entry, Problem, ProblemKind, key_of};
pub use watches::ConnectionWatches;

use crate::http::Health;
use crate::leader::Leading;
use crate::mde::client::MdeClient;
use crate::mde::token::CurrentCredential;
use crate::metrics::Metrics;
use crate::poller::{PollTiming, Poller, Wake};
use crate::resolver::DeviceResolver;
use crate::view::ActionView;

/// Which connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionKey {
    /// The operator's own, from its flags.
    Default,
    /// An `MdeConnection`.
    Namespaced {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A `ClusterMdeConnection`.
    Cluster {
        /// Its name.
        name: String,
    },
}

impl std::fmt::Display for ConnectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionKey::Default => f.write_str("the operator's own connection"),
            ConnectionKey::Namespaced { namespace, name } => {
                write!(f, "MdeConnection {namespace}/{name}")
            }
            ConnectionKey::Cluster { name } => write!(f, "ClusterMdeConnection {name}"),
        }
    }
}

/// What every connection's poller and resolver share with the rest of the process.
#[derive(Clone)]
pub struct Shared {
    /// Where a poller's wake-ups go.
    pub waker: Arc<dyn Wake>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Liveness (the pollers' heartbeats).
    pub health: Arc<Health>,
    /// Poll timings.
    pub poll: PollTiming,
    /// Names asked for within this window share one lookup ([`crate::resolver::WINDOW`]; tests
    /// set their own).
    pub resolver_window: Duration,
    /// Pollers start once this replica leads.
    pub leading: Leading,
    /// Stops every poller (their last read is cut off by [`Connection::stop`]).
    pub shutdown: CancellationToken,
}

/// One tenant and app, live.
pub struct Connection {
    /// Which one.
    pub key: ConnectionKey,
    /// The client: its token cache and quota gate are this connection's.
    pub mde: MdeClient,
    /// What this tenant's actions are, as its poller last read them.
    pub view: Arc<ActionView>,
    /// Batches spec.deviceName lookups in this tenant.
    pub resolver: Arc<DeviceResolver>,
    /// Wakes this connection's poller early.
    pub nudge: Arc<Notify>,
    /// What a named connection was built from (`None`: the operator's own).
    pub origin: Option<Origin>,
    /// This connection's poller: stopped when the connection is dropped (replaced or deleted).
    poller: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// What the controller built a named connection from.
pub struct Origin {
    /// The resource's generation.
    pub generation: i64,
    /// The credential the client uses, swapped when the Secret changes.
    pub credential: Arc<CurrentCredential>,
    /// The digest of the credential last verified (a token and one read).
    verified: std::sync::Mutex<Option<[u8; 32]>>,
}

impl Origin {
    /// Built from `generation`, with `credential`, not verified yet.
    pub fn new(generation: i64, credential: Arc<CurrentCredential>) -> Origin {
        Origin {
            generation,
            credential,
            verified: Default::default(),
        }
    }

    /// The digest of the credential last verified.
    pub fn verified(&self) -> Option<[u8; 32]> {
        *self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the credential with `digest` was verified.
    pub fn set_verified(&self, digest: [u8; 32]) {
        *self.verified.lock().unwrap_or_else(|e| e.into_inner()) = Some(digest);
    }
}

impl Connection {
    /// The operator's own connection over `mde`, whose poller starts once this replica leads.
    pub fn start(key: ConnectionKey, mde: MdeClient, shared: &Shared) -> Arc<Connection> {
        Self::start_with(key, mde, shared, None)
    }

    /// A connection over `mde` built from `origin`, whose poller starts once this replica leads.
    pub fn start_with(
        key: ConnectionKey,
        mde: MdeClient,
        shared: &Shared,
        origin: Option<Origin>,
    ) -> Arc<Connection> {
        let view = Arc::new(ActionView::new());
        let nudge = Arc::new(Notify::new());
        let poller = Poller {
            client: mde.clone(),
            view: view.clone(),
            waker: shared.waker.clone(),
            metrics: shared.metrics.clone(),
            health: shared.health.clone(),
            timing: shared.poll.clone(),
            nudge: nudge.clone(),
        };
        let task = tokio::spawn({
            let (leading, stop) = (shared.leading.clone(), shared.shutdown.clone());
            async move {
                let lead = tokio::select! {
                    led = leading.wait() => led,
                    _ = stop.cancelled() => false,
                };
                if lead {
                    poller.run(stop).await;
                }
            }
        });
        Arc::new(Connection {
            key,
            resolver: DeviceResolver::new(mde.clone(), shared.resolver_window),
            mde,
            view,
            nudge,
            origin,
            poller: std::sync::Mutex::new(Some(task)),
        })
    }

    /// Stops the poller and waits until it has: no read of this connection is under way after.
    pub async fn stop(&self) {
        let task = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(task) = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
