//! The registry of connections: the operator's own, and each `MdeConnection` and
//! `ClusterMdeConnection` the controller has looked at — live, or why it cannot be used.
//! Every entry is applied and deleted by the controller alone; resources only read.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Namespace;
use kube::core::{PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};

use super::{Connection, ConnectionKey};
use crate::crd::connection::AllowedNamespaces;
use crate::crd::{ConnectionKind, ConnectionRef};

/// Why a resource cannot use its connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The connection is being read or verified: its resources wait, and say nothing new.
    Pending,
    /// The connection does not exist, or its settings or credential cannot be used.
    NotReady,
    /// A ClusterMdeConnection that does not allow the resource's namespace.
    NotAllowed,
    /// Entra ID refused the connection's credential.
    AuthenticationFailed,
    /// MDE refused the connection's app the read permission.
    Forbidden,
}

/// A [`ProblemKind`] and what to tell the person.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Which.
    pub kind: ProblemKind,
    /// The message for the resource's condition.
    pub message: String,
}

impl Problem {
    /// A problem of `kind`.
    pub fn new(kind: ProblemKind, message: impl Into<String>) -> Problem {
        Problem {
            kind,
            message: message.into(),
        }
    }
}

/// What the controller last decided about one connection.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The live connection, once built (kept while a problem lasts, so that fixing the problem
    /// keeps its quota gate and view).
    pub conn: Option<Arc<Connection>>,
    /// Why resources cannot use it now; `None`: they can (then `conn` is set).
    pub problem: Option<Problem>,
    /// A ClusterMdeConnection's allowed namespaces.
    pub allowed: Option<AllowedNamespaces>,
}

impl Entry {
    fn state(&self) -> Result<Arc<Connection>, Problem> {
        match (&self.problem, &self.conn) {
            (None, Some(conn)) => Ok(conn.clone()),
            (Some(p), _) => Err(p.clone()),
            (None, None) => Err(Problem::new(ProblemKind::NotReady, "not built yet")),
        }
    }
}

/// Every connection of the process.
pub struct Connections {
    default: Arc<Connection>,
    named: RwLock<HashMap<ConnectionKey, Entry>>,
    /// Namespace labels, for ClusterMdeConnections that select namespaces by label.
    namespaces: Option<Store<PartialObjectMeta<Namespace>>>,
    /// Whether the connections' watch caches have their first list (before that, a connection
    /// not in the registry may merely not have been read yet).
    loaded: tokio::sync::watch::Receiver<bool>,
}

impl Connections {
    /// The operator's own connection and, when ClusterMdeConnections are served, the namespaces'
    /// labels.
    /// `loaded` turns true once the connections' caches have their first list.
    pub fn new(
        default: Arc<Connection>,
        namespaces: Option<Store<PartialObjectMeta<Namespace>>>,
        loaded: tokio::sync::watch::Receiver<bool>,
    ) -> Connections {
        Connections {
            default,
            named: RwLock::new(HashMap::new()),
            namespaces,
            loaded,
        }
    }

    /// The operator's own connection (its flags).
    pub fn default_connection(&self) -> &Arc<Connection> {
        &self.default
    }

    /// The connection a resource of `namespace` names in `r` (none: the operator's own).
    pub fn of(
        &self,
        namespace: &str,
        r: Option<&ConnectionRef>,
    ) -> Result<Arc<Connection>, Problem> {
        let Some(r) = r else {
            return Ok(self.default.clone());
        };
        let key = key_of(namespace, r);
        let named = self.named.read().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = named.get(&key) else {
            let kind = if *self.loaded.borrow() {
                ProblemKind::NotReady
            } else {
                ProblemKind::Pending
            };
            return Err(Problem::new(kind, format!("{key} does not exist")));
        };
        if let Some(allowed) = &entry.allowed
            && !self.allows(allowed, namespace)
        {
            return Err(Problem::new(
                ProblemKind::NotAllowed,
                format!("{key} does not allow namespace {namespace} (spec.namespaces)"),
            ));
        }
        entry.state()
    }

    fn allows(&self, allowed: &AllowedNamespaces, namespace: &str) -> bool {
        if allowed.names.iter().any(|n| n == namespace) {
            return true;
        }
        let Some(selector) = &allowed.selector else {
            return false;
        };
        let Ok(selector) = Selector::try_from(selector.clone()) else {
            return false;
        };
        let labels = self
            .namespaces
            .as_ref()
            .and_then(|store| store.get(&ObjectRef::new(namespace)))
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default();
        selector.matches(&labels)
    }

    /// Records what the controller decided about `key`; `true` when what its resources get
    /// changed (they are then woken).
    pub fn apply(&self, key: ConnectionKey, entry: Entry) -> bool {
        let mut named = self.named.write().unwrap_or_else(|e| e.into_inner());
        let before = named.get(&key).map(seen_by_resources);
        let after = Some(seen_by_resources(&entry));
        named.insert(key, entry);
        before != after
    }

    /// Registers a connection the watch has just brought, until its first reconcile: resources
    /// naming it wait instead of saying it does not exist.
    pub fn seen(&self, key: ConnectionKey) {
        let mut named = self.named.write().unwrap_or_else(|e| e.into_inner());
        named.entry(key).or_insert(Entry {
            conn: None,
            problem: Some(Problem::new(ProblemKind::Pending, "being verified")),
            allowed: None,
        });
    }

    /// Forgets `key` (the resource was deleted); its live connection, if any, to be stopped.
    pub fn delete(&self, key: &ConnectionKey) -> Option<Arc<Connection>> {
        let mut named = self.named.write().unwrap_or_else(|e| e.into_inner());
        named.remove(key).and_then(|e| e.conn)
    }

    /// Every named connection registered.
    pub fn keys(&self) -> Vec<ConnectionKey> {
        let named = self.named.read().unwrap_or_else(|e| e.into_inner());
        named.keys().cloned().collect()
    }

    /// What the controller last decided about `key`.
    pub fn entry(&self, key: &ConnectionKey) -> Option<Entry> {
        let named = self.named.read().unwrap_or_else(|e| e.into_inner());
        named.get(key).cloned()
    }

    /// Every built connection, usable or not, the operator's own first.
    pub fn all(&self) -> Vec<Arc<Connection>> {
        let named = self.named.read().unwrap_or_else(|e| e.into_inner());
        std::iter::once(self.default.clone())
            .chain(named.values().filter_map(|e| e.conn.clone()))
            .collect()
    }
}

/// What resources get from an entry: the connection (by identity) or the problem, and the
/// allowed namespaces.
fn seen_by_resources(entry: &Entry) -> (Result<usize, Problem>, Option<AllowedNamespaces>) {
    (
        entry.state().map(|c| Arc::as_ptr(&c) as usize),
        entry.allowed.clone(),
    )
}

/// The key of the connection a resource of `namespace` names.
pub fn key_of(namespace: &str, r: &ConnectionRef) -> ConnectionKey {
    match r.kind {
        ConnectionKind::MdeConnection => ConnectionKey::Namespaced {
            namespace: namespace.to_string(),
            name: r.name.clone(),
        },
        ConnectionKind::ClusterMdeConnection => ConnectionKey::Cluster {
            name: r.name.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::connection::Shared;
    use crate::mde::client::{MdeClient, MdeClientConfig};
    use crate::mde::cloud::{Cloud, resolve_endpoints};
    use crate::mde::token::ClientSecret;
    use crate::quota::{QuotaConfig, QuotaGate};

    struct NoWake;
    impl crate::poller::Wake for NoWake {
        fn wake(&self, _: &crate::reconcile::ResourceRef) {}
    }

    /// A connection whose poller never starts (this replica never leads).
    fn connection(key: ConnectionKey) -> Arc<Connection> {
        let (_, leading) = crate::leader::leading(false);
        let shared = Shared {
            waker: Arc::new(NoWake),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            health: Arc::new(crate::http::Health::new(
                Duration::from_secs(60),
                leading.clone(),
            )),
            poll: crate::poller::PollTiming::scaled(1.0, Duration::from_secs(360)),
            resolver_window: Duration::from_millis(10),
            leading,
            shutdown: tokio_util::sync::CancellationToken::new(),
        };
        let mde = MdeClient::new(
            MdeClientConfig {
                endpoints: resolve_endpoints(Cloud::Commercial, None, None, None),
                tenant_id: "contoso.onmicrosoft.com".into(),
                client_id: "app".into(),
                secret: ClientSecret::from_value("s".into()),
                ca_file: None,
                request_timeout: Duration::from_secs(1),
                time_scale: 1.0,
                observer: None,
            },
            Arc::new(QuotaGate::new(QuotaConfig::from_budget(1.0, 1.0))),
        )
        .unwrap();
        Connection::start(key, mde, &shared)
    }

    fn named(ns: &str, name: &str) -> ConnectionKey {
        ConnectionKey::Namespaced {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn reference(kind: ConnectionKind, name: &str) -> ConnectionRef {
        ConnectionRef {
            kind,
            name: name.into(),
        }
    }

    fn usable(conn: &Arc<Connection>, allowed: Option<AllowedNamespaces>) -> Entry {
        Entry {
            conn: Some(conn.clone()),
            problem: None,
            allowed,
        }
    }

    #[tokio::test]
    async fn a_resource_gets_its_own_connection_the_default_or_why_not() {
        let (loaded_tx, loaded) = tokio::sync::watch::channel(false);
        let default = connection(ConnectionKey::Default);
        let registry = Connections::new(default.clone(), None, loaded);
        let own = reference(ConnectionKind::MdeConnection, "a");

        let got = registry.of("secops", None).unwrap();
        assert!(
            Arc::ptr_eq(&got, &default),
            "no reference: the operator's own"
        );
        // Before the caches are loaded an unknown connection may only not be read yet.
        assert_eq!(
            registry.of("secops", Some(&own)).unwrap_err().kind,
            ProblemKind::Pending
        );
        loaded_tx.send(true).unwrap();
        let missing = registry.of("secops", Some(&own)).unwrap_err();
        assert_eq!(missing.kind, ProblemKind::NotReady);
        assert!(
            missing.message.contains("MdeConnection secops/a"),
            "{}",
            missing.message
        );

        let a = connection(named("secops", "a"));
        assert!(registry.apply(named("secops", "a"), usable(&a, None)));
        assert!(Arc::ptr_eq(&registry.of("secops", Some(&own)).unwrap(), &a));
        // A namespaced connection is its namespace's only.
        assert_eq!(
            registry.of("other", Some(&own)).unwrap_err().kind,
            ProblemKind::NotReady
        );
        // The same decision again changes nothing for its resources; a problem does.
        assert!(!registry.apply(named("secops", "a"), usable(&a, None)));
        let refused = Entry {
            conn: Some(a.clone()),
            problem: Some(Problem::new(
                ProblemKind::AuthenticationFailed,
                "AADSTS7000215",
            )),
            allowed: None,
        };
        assert!(registry.apply(named("secops", "a"), refused));
        assert_eq!(
            registry.of("secops", Some(&own)).unwrap_err().kind,
            ProblemKind::AuthenticationFailed
        );
        assert_eq!(
            registry.all().len(),
            2,
            "a refused connection is still built"
        );
        assert!(registry.delete(&named("secops", "a")).is_some());
        assert_eq!(
            registry.of("secops", Some(&own)).unwrap_err().kind,
            ProblemKind::NotReady
        );
    }

    #[tokio::test]
    async fn a_cluster_connection_serves_the_namespaces_it_allows_only() {
        let (_, loaded) = tokio::sync::watch::channel(true);
        let registry = Connections::new(connection(ConnectionKey::Default), None, loaded);
        let shared = connection(ConnectionKey::Cluster { name: "s".into() });
        let allowed = AllowedNamespaces {
            names: vec!["secops".into()],
            selector: Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some([("team".to_string(), "secops".to_string())].into()),
                    ..Default::default()
                },
            ),
        };
        registry.apply(
            ConnectionKey::Cluster { name: "s".into() },
            usable(&shared, Some(allowed)),
        );
        let r = reference(ConnectionKind::ClusterMdeConnection, "s");
        assert!(registry.of("secops", Some(&r)).is_ok());
        // Without the namespaces' labels a selector matches no namespace but the listed ones.
        let refused = registry.of("finance", Some(&r)).unwrap_err();
        assert_eq!(refused.kind, ProblemKind::NotAllowed);
        assert!(refused.message.contains("finance"), "{}", refused.message);
        // A newly seen connection makes its resources wait, not fail.
        registry.seen(ConnectionKey::Cluster { name: "t".into() });
        let t = reference(ConnectionKind::ClusterMdeConnection, "t");
        assert_eq!(
            registry.of("secops", Some(&t)).unwrap_err().kind,
            ProblemKind::Pending
        );
    }
}
