//! What the operator's watch cache keeps of each DeviceIsolation.
//!
//! The reflector store holds every watched resource for the life of the process, so its size is
//! most of the operator's memory with thousands of resources. The API server sends two things the
//! operator never reads and that outweigh the rest of a small object: `metadata.managedFields`
//! (server-side apply bookkeeping, a JSON tree per field manager that grows with every status
//! field) and the client-side `kubectl apply` copy of the whole manifest in the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation. Both are dropped as objects
//! arrive, before the store and the reconciler see them ([`slim`] for the sets); every write the
//! operator makes is a patch of its own fields, so nothing it sends depends on them. Of a
//! DeviceIsolation the store keeps a [`Cached`]: only the metadata the operator reads, the
//! annotations and owner shared by every resource that carries the same.

mod cached;
mod machines;

pub use cached::{Cached, Interner, Notes};
pub use machines::Machines;

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;

use futures::{Stream, StreamExt, TryStreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};

use crate::conditions::{self, READY, RECONCILING, STALLED};
use crate::crd::DeviceIsolation;
use crate::reconcile::{ResourceRef, Sibling, key_of};

/// The annotation in which client-side `kubectl apply` keeps the last applied manifest.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops the parts of a resource the operator never reads (see the module docs); for a set the
/// last-applied copy repeats a long machineIds list.
pub fn slim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    // The watch follows the resourceVersions of the events it receives, before this runs; the
    // operator's writes are patches, which need none. Kept, it would be a string in the object
    // and another in the store's key.
    meta.resource_version = None;
    // Labels (a set's child carries `isolation.mde.dev/set`, GitOps tools add their own): the
    // operator never reads them; a child finds its set by its ownerReference.
    meta.labels = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// A DeviceIsolation as the cache keeps it ([`Cached`]), the texts its conditions repeat held
/// once ([`conditions::share_texts`]).
pub fn slim_device(mut di: DeviceIsolation, interner: &mut Interner) -> Cached {
    if let Some(status) = di.status.as_mut() {
        conditions::share_texts(&mut status.conditions);
    }
    Cached::new(di, interner)
}

/// `resource` by its identity alone, name and namespace: a reference taken from an object
/// (`ResourceRef::from_obj`) also carries its uid and resourceVersion, two more strings that
/// equality and hashing ignore. What the process keeps per resource for long (the view's
/// watchers, the reconcile memory, a re-list's census) keeps this form.
pub fn bare(resource: &ResourceRef) -> ResourceRef {
    let mut bare = ResourceRef::new(&resource.name);
    bare.namespace = resource.namespace.clone();
    bare
}

/// What a watch reports besides changed objects: deletions, so that per-resource process state
/// can be freed (every object that is applied can also be deleted), and changes that concern
/// other resources than the changed one.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// What rule 6 (conflicts) reads of `resource` changed on `machines` (it arrived, changed
    /// its desired state or is being deleted): the other resources there decide it again.
    Siblings {
        /// The changed resource.
        resource: ResourceRef,
        /// The machines it left or joined or manages.
        machines: Vec<String>,
    },
    /// The resource was deleted; it managed `machine` (when known).
    Deleted {
        /// The resource.
        resource: ResourceRef,
        /// Its machine id (spec, or resolved into status).
        machine: Option<String>,
    },
    /// A (re-)list of `scope` (one namespace, or every namespace when `None`) completed and holds
    /// exactly `present`: anything of that scope not in it was deleted while the watch was down
    /// (no delete event is sent for those).
    Relisted {
        /// The watch's namespace, `None` for all.
        scope: Option<String>,
        /// What the list holds.
        present: HashSet<ResourceRef>,
    },
}

/// A watch of `api` (`scope`: its namespace, `None` for all) whose objects are slimmed, feeding a
/// reflector store and its index of machines; deletions and changes among a machine's resources
/// are sent to `report` after the store holds them. Returns the store's reader, the index and the stream of changed objects that
/// drives the controller.
///
/// The stream's objects only say which resource to reconcile (the controller reconciles the
/// cached copy): they carry no uid. The controller's queue keeps a reference taken from the
/// object for every resource waiting for a requeue, twice (its delay queue and its index), and
/// a reference copies the uid (and the resourceVersion, which [`Cached`] drops). In the
/// `fleet10000` benchmark, with 8,500 children waiting for quota, those copies of name,
/// namespace, uid and resourceVersion were 2.1 MB (heaptrack).
pub fn slim_watch(
    api: Api<DeviceIsolation>,
    config: watcher::Config,
    scope: Option<String>,
    report: mpsc::UnboundedSender<Report>,
) -> (
    Store<Cached>,
    Machines,
    impl Stream<Item = Result<Cached, watcher::Error>> + Send + 'static,
) {
    let (mut writer, reader, machines) = machines::Writer::new();
    // Objects of the list in progress (between Init and InitDone).
    let mut listing: Option<HashSet<ResourceRef>> = None;
    let mut interner = Interner::default();
    let cached = watcher(api, config).map_ok(move |event| {
        let mut cache = |di| slim_device(di, &mut interner);
        match event {
            watcher::Event::Apply(di) => watcher::Event::Apply(cache(di)),
            watcher::Event::Delete(di) => watcher::Event::Delete(cache(di)),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitApply(di) => watcher::Event::InitApply(cache(di)),
            watcher::Event::InitDone => watcher::Event::InitDone,
        }
    });
    let stream = cached
        .map_ok(move |event| {
            let machines = writer.apply(&event);
            (event, machines)
        })
        .inspect(move |event| {
            let Ok((event, machines)) = event else { return };
            match event {
                watcher::Event::Apply(di) => {
                    if !machines.is_empty() {
                        let _ = report.send(Report::Siblings {
                            resource: ResourceRef::from_obj(di),
                            machines: machines.clone(),
                        });
                    }
                }
                watcher::Event::Delete(di) => {
                    let _ = report.send(Report::Deleted {
                        resource: ResourceRef::from_obj(di),
                        machine: di.machine_id().map(String::from),
                    });
                }
                watcher::Event::Init => listing = Some(HashSet::new()),
                watcher::Event::InitApply(di) => {
                    if let Some(seen) = listing.as_mut() {
                        seen.insert(bare(&ResourceRef::from_obj(di)));
                    }
                }
                watcher::Event::InitDone => {
                    if let Some(present) = listing.take() {
                        let scope = scope.clone();
                        let _ = report.send(Report::Relisted { scope, present });
                    }
                }
            }
        })
        .map_ok(|(event, _)| event)
        .applied_objects()
        .map_ok(|mut di| {
            di.metadata.uid = None;
            di
        })
        .boxed();
    (reader, machines, stream)
}

/// The watch caches of every watched scope: what the operator knows of all DeviceIsolations.
#[derive(Clone, Default)]
pub struct Stores(Vec<(Store<Cached>, Machines)>);

impl Stores {
    /// The caches of the given scopes, each with its index.
    pub fn new(stores: Vec<(Store<Cached>, Machines)>) -> Self {
        Stores(stores)
    }

    /// The resource as cached now; `None` once it is deleted.
    pub fn get(&self, resource: &ResourceRef) -> Option<Arc<Cached>> {
        self.0.iter().find_map(|(s, _)| s.get(resource))
    }

    /// Every cached resource of every scope.
    pub fn all(&self) -> impl Iterator<Item = Arc<Cached>> + '_ {
        self.0.iter().flat_map(|(s, _)| s.state())
    }

    /// The other live resources managing `machine`, across every scope (rule 6: conflicts).
    pub fn siblings(&self, me: &ResourceRef, machine: &str) -> Vec<Sibling> {
        self.0
            .iter()
            .flat_map(|(_, m)| m.managing(machine))
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .map(|o| (ResourceRef::from_obj(&*o), o.spec.isolated))
            .filter(|(r, _)| r != me)
            .map(|(r, isolated)| Sibling {
                key: key_of(&r),
                isolated,
            })
            .collect()
    }

    /// Resources by phase (ready, reconciling, stalled, unknown), for the gauges.
    pub fn count_phases(&self) -> [(&'static str, i64); 4] {
        let (mut ready, mut reconciling, mut stalled, mut unknown) = (0, 0, 0, 0);
        for di in self.all() {
            let conds = di
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let is_true = |t: &str| conditions::find(conds, t).is_some_and(|c| c.status == "True");
            if is_true(STALLED) {
                stalled += 1;
            } else if is_true(READY) {
                ready += 1;
            } else if is_true(RECONCILING) {
                reconciling += 1;
            } else {
                unknown += 1;
            }
        }
        [
            ("ready", ready),
            ("reconciling", reconciling),
            ("stalled", stalled),
            ("unknown", unknown),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::COMMENT_ANNOTATION;

    #[test]
    fn slim_drops_bookkeeping_and_keeps_what_the_operator_reads() {
        let mut di: DeviceIsolation = serde_json::from_value(serde_json::json!({
            "apiVersion": "isolation.mde.dev/v1alpha1",
            "kind": "DeviceIsolation",
            "metadata": {
                "name": "laptop",
                "namespace": "soc",
                "resourceVersion": "4711",
                "annotations": {
                    LAST_APPLIED: "{\"big\":\"manifest\"}",
                    COMMENT_ANNOTATION: "INC-1",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"machineId": "m1", "isolated": false},
        }))
        .unwrap();
        di.metadata.labels = Some([("isolation.mde.dev/set".to_string(), "s".to_string())].into());
        slim(&mut di);
        assert!(di.metadata.managed_fields.is_none());
        assert!(di.metadata.resource_version.is_none());
        assert!(di.metadata.labels.is_none());
        let annotations = di.metadata.annotations.as_ref().unwrap();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(
            di.metadata.annotations.as_ref().unwrap()[COMMENT_ANNOTATION],
            "INC-1"
        );
        assert_eq!(di.spec.machine_id.as_deref(), Some("m1"));
    }
}
