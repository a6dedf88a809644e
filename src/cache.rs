//! What the operator's watch cache keeps of each DeviceIsolation.
//!
//! The reflector store holds every watched resource for the life of the process, so its size is
//! most of the operator's memory with thousands of resources. The API server sends two things the
//! operator never reads and that outweigh the rest of a small object: `metadata.managedFields`
//! (server-side apply bookkeeping, a JSON tree per field manager that grows with every status
//! field) and the client-side `kubectl apply` copy of the whole manifest in the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation. Both are dropped as objects
//! arrive, before the store and the reconciler see them; every write the operator makes is a
//! patch of its own fields, so nothing it sends depends on them.

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::crd::DeviceIsolation;

/// The annotation in which client-side `kubectl apply` keeps the last applied manifest.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops the parts of a resource the operator never reads (see the module docs).
pub fn slim(di: &mut DeviceIsolation) {
    let meta = di.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// A watch of `api` whose objects are slimmed, feeding a reflector store; returns the store's
/// reader and the stream of changed objects that drives the controller.
pub fn slim_watch(
    api: Api<DeviceIsolation>,
    config: watcher::Config,
) -> (
    Store<DeviceIsolation>,
    impl Stream<Item = Result<DeviceIsolation, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).modify(slim))
        .applied_objects()
        .boxed();
    (reader, stream)
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
        slim(&mut di);
        assert!(di.metadata.managed_fields.is_none());
        let annotations = di.metadata.annotations.as_ref().unwrap();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(di.comment(), Some("INC-1"));
        assert_eq!(di.spec.machine_id.as_deref(), Some("m1"));
    }
}
