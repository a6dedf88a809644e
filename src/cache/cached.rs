//! A DeviceIsolation as the watch cache keeps it: [`Cached`].
//!
//! Of an object's metadata the operator reads its identity (name, namespace, uid), generation
//! and deletion, five annotations ([`READ_ANNOTATIONS`]) and the set that owns it. Kept as the
//! API server sends them, the annotations are a `BTreeMap` (a node of eleven slots for one or
//! two entries) and the owner a `Vec` of four strings: about 1 KB per resource in malloc chunks,
//! the same for each of a set's 10,000 children. [`Cached`] keeps them as [`Notes`] instead, one
//! value shared by every resource whose notes are equal ([`Interner`]): a set's children all
//! carry the set's comment, requester and ownership, and resources applied together often share
//! a comment.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::Deserialize;

use crate::crd::{
    Annotations, COMMENT_ANNOTATION, DeviceIsolation, DeviceIsolationSpec, DeviceIsolationStatus,
    READ_ANNOTATIONS, REQUESTED_BY_ANNOTATION, RETRY_ANNOTATION, machine_of,
};

/// A DeviceIsolation as the operator's watch cache holds it (see the module docs): its spec and
/// status whole, of its metadata only what the operator reads (the rest is `None`), and its
/// annotations and owning set as shared [`Notes`]. Read annotations through its methods or
/// [`Annotations`]; `metadata.annotations` and `metadata.ownerReferences` are always `None`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "DeviceIsolation")]
pub struct Cached {
    /// Name, namespace, uid, generation, creation and deletion timestamps.
    pub metadata: ObjectMeta,
    /// The spec, as the API server sent it.
    pub spec: DeviceIsolationSpec,
    /// The status, as the API server sent it.
    pub status: Option<DeviceIsolationStatus>,
    notes: Arc<Notes>,
}

/// The annotations the operator reads of a resource, and the set that owns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Notes {
    /// Of [`READ_ANNOTATIONS`], those the resource carries, as written.
    annotations: Box<[(&'static str, Box<str>)]>,
    /// The controller ownerReference of kind DeviceIsolationSet: its name and uid.
    set: Option<Box<(Box<str>, Box<str>)>>,
}

impl Notes {
    /// What `meta` holds of the notes.
    pub fn of(meta: &ObjectMeta) -> Self {
        let annotations = READ_ANNOTATIONS
            .iter()
            .filter_map(|&key| Some((key, meta.annotation(key)?.into())))
            .collect();
        let set = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true) && o.kind == "DeviceIsolationSet")
            .map(|o| Box::new((o.name.as_str().into(), o.uid.as_str().into())));
        Notes { annotations, set }
    }
}

impl Annotations for Notes {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| &**v)
    }
}

impl Cached {
    /// `di` as the cache keeps it, its notes shared through `interner`.
    pub fn new(di: DeviceIsolation, interner: &mut Interner) -> Self {
        let DeviceIsolation {
            metadata,
            spec,
            status,
        } = di;
        let notes = interner.intern(Notes::of(&metadata));
        let metadata = ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            uid: metadata.uid,
            generation: metadata.generation,
            creation_timestamp: metadata.creation_timestamp,
            deletion_timestamp: metadata.deletion_timestamp,
            ..ObjectMeta::default()
        };
        Cached {
            metadata,
            spec,
            status,
            notes,
        }
    }

    /// The comment annotation, trimmed; `None` when missing or blank.
    pub fn comment(&self) -> Option<&str> {
        self.notes.trimmed(COMMENT_ANNOTATION)
    }

    /// The requested-by annotation, trimmed; `None` when missing or blank.
    pub fn requested_by(&self) -> Option<&str> {
        self.notes.trimmed(REQUESTED_BY_ANNOTATION)
    }

    /// The retry-request annotation value, if any.
    pub fn retry_request(&self) -> Option<&str> {
        self.notes
            .annotation(RETRY_ANNOTATION)
            .filter(|v| !v.is_empty())
    }

    /// Who approved the current generation ([`crate::crd::approver`]).
    pub fn approver(&self) -> Option<&str> {
        crate::crd::approver(&*self.notes, self.metadata.generation.unwrap_or(1))
    }

    /// The set that owns this resource (its controller ownerReference of kind
    /// DeviceIsolationSet): its name and uid.
    pub fn owning_set(&self) -> Option<(&str, &str)> {
        self.notes
            .set
            .as_deref()
            .map(|(name, uid)| (&**name, &**uid))
    }

    /// The machine acted on: spec.machineId, else the id resolved from spec.deviceName.
    pub fn machine_id(&self) -> Option<&str> {
        machine_of(&self.spec, self.status.as_ref())
    }
}

/// Outside the watch (tests, fixtures), a resource's notes are its own.
impl From<DeviceIsolation> for Cached {
    fn from(di: DeviceIsolation) -> Self {
        Cached::new(di, &mut Interner::default())
    }
}

impl Resource for Cached {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        DeviceIsolation::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        DeviceIsolation::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        DeviceIsolation::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        DeviceIsolation::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Equal [`Notes`] held once: one per watch, owned by its stream. A value no cached object holds
/// any more is dropped at the next prune, which runs whenever the table has doubled since the
/// last one, so the table stays within twice the notes in use (plus a few).
#[derive(Default)]
pub struct Interner {
    notes: HashSet<Arc<Notes>>,
    /// The table's size after the last prune.
    kept: usize,
}

impl Interner {
    /// The shared value equal to `notes`.
    pub fn intern(&mut self, notes: Notes) -> Arc<Notes> {
        if let Some(shared) = self.notes.get(&notes) {
            return shared.clone();
        }
        if self.notes.len() >= 2 * self.kept + 16 {
            self.notes.retain(|n| Arc::strong_count(n) > 1);
            self.kept = self.notes.len();
        }
        let shared = Arc::new(notes);
        self.notes.insert(shared.clone());
        shared
    }

    /// Distinct notes held (in use or not yet pruned).
    pub fn len(&self) -> usize {
        self.notes.len()
    }

    /// Whether no notes are held.
    pub fn is_empty(&self) -> bool {
        self.notes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{APPROVED_BY_ANNOTATION, APPROVED_GENERATION_ANNOTATION};

    /// A DeviceIsolation named `name` with these annotations, owned by the set `set` when given.
    fn di(name: &str, annotations: &[(&str, &str)], set: Option<&str>) -> DeviceIsolation {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "isolation.mde.dev/v1alpha1",
            "kind": "DeviceIsolation",
            "metadata": {
                "name": name, "namespace": "soc", "uid": format!("uid-{name}"), "generation": 2,
                "labels": {"isolation.mde.dev/set": set.unwrap_or("-")},
                "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                "ownerReferences": set.map(|s| vec![
                    serde_json::json!({"apiVersion": "isolation.mde.dev/v1alpha1",
                        "kind": "DeviceIsolationSet", "name": s, "uid": format!("uid-{s}"),
                        "controller": true}),
                    serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "x",
                        "uid": "u"}),
                ]).unwrap_or_default(),
            },
            "spec": {"machineId": "m1", "isolated": false},
        }))
        .unwrap()
    }

    #[test]
    fn keeps_what_the_operator_reads_and_nothing_else() {
        let cached = Cached::from(di(
            "laptop",
            &[
                (COMMENT_ANNOTATION, " INC-1 "),
                (REQUESTED_BY_ANNOTATION, "alice"),
                (RETRY_ANNOTATION, "2026-12-06T00:00:00Z"),
                (APPROVED_BY_ANNOTATION, "bob"),
                (APPROVED_GENERATION_ANNOTATION, "2"),
                (
                    "argocd.argoproj.io/tracking-id",
                    "app:isolation.mde.dev/...",
                ),
            ],
            Some("release"),
        ));
        assert_eq!(cached.comment(), Some("INC-1"));
        assert_eq!(cached.requested_by(), Some("alice"));
        assert_eq!(cached.retry_request(), Some("2026-12-06T00:00:00Z"));
        assert_eq!(cached.approver(), Some("bob"));
        assert_eq!(cached.owning_set(), Some(("release", "uid-release")));
        assert_eq!(cached.machine_id(), Some("m1"));
        assert_eq!(
            cached.notes.annotations.len(),
            5,
            "the tracking id is not kept"
        );
        let meta = &cached.metadata;
        assert_eq!(meta.name.as_deref(), Some("laptop"));
        assert_eq!(meta.namespace.as_deref(), Some("soc"));
        assert_eq!(meta.uid.as_deref(), Some("uid-laptop"));
        assert_eq!(meta.generation, Some(2));
        assert!(meta.annotations.is_none() && meta.labels.is_none());
        assert!(meta.owner_references.is_none());
    }

    #[test]
    fn blank_annotations_read_as_missing_and_a_foreign_owner_is_no_set() {
        let mut single = di("laptop", &[(COMMENT_ANNOTATION, "  ")], None);
        single.metadata.owner_references = Some(vec![Default::default()]);
        let cached = Cached::from(single);
        assert_eq!(cached.comment(), None);
        assert_eq!(cached.owning_set(), None);
        assert_eq!(cached.approver(), None);
    }

    #[test]
    fn equal_notes_are_held_once_and_unused_ones_are_pruned() {
        let mut interner = Interner::default();
        let children: Vec<Cached> = (0..100)
            .map(|i| {
                let child = di(&format!("c{i}"), &[(COMMENT_ANNOTATION, "INC")], Some("s"));
                Cached::new(child, &mut interner)
            })
            .collect();
        assert_eq!(interner.len(), 1);
        assert!(
            children
                .iter()
                .all(|c| Arc::ptr_eq(&c.notes, &children[0].notes))
        );
        assert_eq!(children[7].metadata.name.as_deref(), Some("c7"));
        // Resources with a comment of their own each, dropped at once: the table does not keep
        // them past the next doubling.
        for i in 0..1000 {
            let comment = format!("INC-{i}");
            drop(Cached::new(
                di("d", &[(COMMENT_ANNOTATION, &comment)], None),
                &mut interner,
            ));
        }
        assert!(interner.len() <= 2 + 16, "{} held", interner.len());
        // Those still in use are never pruned.
        let again = Cached::new(
            di("c100", &[(COMMENT_ANNOTATION, "INC")], Some("s")),
            &mut interner,
        );
        assert!(Arc::ptr_eq(&again.notes, &children[0].notes));
    }
}
