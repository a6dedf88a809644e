//! Which cached DeviceIsolations manage each machine.
//!
//! Rule 6 (conflicts) asks for a resource's siblings on every reconcile. Scanning the cache for
//! them made a rollout O(N²): at 10,000 resources that scan was half of the operator's CPU. The
//! index answers in O(1). Its one [`Writer`] is the watch's ([`super::slim_watch`]): for every
//! event it changes the store and then the index, [`Machines::apply`] and [`Machines::delete`]
//! per object, [`Machines::reset`] from the store after a (re-)list.
//!
//! It holds the store's own `Arc`s, so a resource costs one pointer here, and it is keyed by a
//! hash of the machine id rather than a copy of it: an entry is a few dozen bytes. Two machines
//! whose ids share a hash share an entry, so [`Machines::managing`] compares the ids.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::{Arc, PoisonError, RwLock};

use kube::runtime::reflector::{self, ObjectRef, Store, store};
use kube::runtime::watcher;

use super::Cached;

/// The watch's side of a cache: the store's writer and the index, changed together.
pub struct Writer {
    writer: store::Writer<Cached>,
    store: Store<Cached>,
    index: Machines,
}

impl Writer {
    /// A writer, the store's reader and the index's.
    pub fn new() -> (Self, Store<Cached>, Machines) {
        let (store, writer) = reflector::store();
        let index = Machines::default();
        let (reader, machines) = (store.clone(), index.clone());
        let writer = Writer {
            writer,
            store,
            index,
        };
        (writer, reader, machines)
    }

    /// What `reflector::reflector` does with `event` (this store has no subscribers to dispatch
    /// to), then the index, from the store's copy of the object before and after the change.
    /// Returns the machines on which an applied object changed what rule 6 reads of it: it is new
    /// there, left, changed its desired state or is being deleted. The other resources there
    /// must decide rule 6 again (a partner already Ready learns that it is in conflict now, a
    /// stalled one that the conflict is over). A status write changes none of it. A deletion is
    /// reported by the watch itself.
    pub fn apply(&mut self, event: &watcher::Event<Cached>) -> Vec<String> {
        match event {
            watcher::Event::Apply(o) => {
                let key = ObjectRef::from_obj(o);
                let old = self.store.get(&key);
                self.writer.apply_watcher_event(event);
                let new = self.store.get(&key);
                if let Some(new) = &new {
                    self.index.apply(old.as_ref(), new);
                }
                let was = old.as_deref().and_then(standing);
                let is = new.as_deref().and_then(standing);
                if was == is {
                    return Vec::new();
                }
                let mut machines: Vec<String> = [was, is]
                    .into_iter()
                    .flatten()
                    .map(|(m, ..)| m.to_string())
                    .collect();
                machines.dedup();
                machines
            }
            watcher::Event::Delete(o) => {
                let old = self.store.get(&ObjectRef::from_obj(o));
                self.writer.apply_watcher_event(event);
                if let Some(old) = old {
                    self.index.delete(&old);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                self.writer.apply_watcher_event(event);
                self.index.reset(self.store.state());
                Vec::new()
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {
                self.writer.apply_watcher_event(event);
                Vec::new()
            }
        }
    }
}

/// What rule 6 reads of a resource: its machine, its desired state and whether it is being
/// deleted (`None` while it has no machine).
fn standing(o: &Cached) -> Option<(&str, bool, bool)> {
    Some((
        o.machine_id()?,
        o.spec.isolated,
        o.metadata.deletion_timestamp.is_some(),
    ))
}

/// The index of one watch's cache; clones share it.
#[derive(Clone, Default)]
pub struct Machines(Arc<RwLock<HashMap<u64, Vec<Arc<Cached>>>>>);

/// The key of `machine`. The hasher has fixed keys, so the key is the same on every call.
fn slot(machine: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(machine)
}

impl Machines {
    /// The cached resources that manage `machine` now.
    pub fn managing(&self, machine: &str) -> Vec<Arc<Cached>> {
        let index = self.0.read().unwrap_or_else(PoisonError::into_inner);
        index
            .get(&slot(machine))
            .into_iter()
            .flatten()
            .filter(|o| o.machine_id() == Some(machine))
            .cloned()
            .collect()
    }

    /// The store replaced `old` (absent for a new resource) by `new`.
    pub fn apply(&self, old: Option<&Arc<Cached>>, new: &Arc<Cached>) {
        let mut index = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = old {
            remove(&mut index, old);
        }
        if let Some(machine) = new.machine_id() {
            index.entry(slot(machine)).or_default().push(new.clone());
        }
    }

    /// The store dropped `old`.
    pub fn delete(&self, old: &Arc<Cached>) {
        remove(
            &mut self.0.write().unwrap_or_else(PoisonError::into_inner),
            old,
        );
    }

    /// A (re-)list replaced the store's content by `all`.
    pub fn reset(&self, all: impl IntoIterator<Item = Arc<Cached>>) {
        let mut fresh: HashMap<u64, Vec<Arc<Cached>>> = HashMap::new();
        for o in all {
            if let Some(machine) = o.machine_id() {
                fresh.entry(slot(machine)).or_default().push(o);
            }
        }
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = fresh;
    }

    /// How many resources the index holds (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.read().unwrap().values().map(Vec::len).sum()
    }
}

/// Drops `old`, the very object the store held, from its machine's entry.
fn remove(index: &mut HashMap<u64, Vec<Arc<Cached>>>, old: &Arc<Cached>) {
    let Some(machine) = old.machine_id() else {
        return;
    };
    let key = slot(machine);
    if let Some(entry) = index.get_mut(&key) {
        entry.retain(|o| !Arc::ptr_eq(o, old));
        if entry.is_empty() {
            index.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DeviceIsolation;

    fn di(name: &str, machine: Option<&str>, resolved: Option<&str>) -> Arc<Cached> {
        let mut value = serde_json::json!({
            "apiVersion": "isolation.mde.dev/v1alpha1",
            "kind": "DeviceIsolation",
            "metadata": {"name": name, "namespace": "soc"},
            "spec": {"isolated": false},
        });
        match machine {
            Some(m) => value["spec"]["machineId"] = m.into(),
            None => value["spec"]["deviceName"] = "laptop.contoso.local".into(),
        }
        if let Some(r) = resolved {
            value["status"] = serde_json::json!({"machineId": r});
        }
        let di: DeviceIsolation = serde_json::from_value(value).unwrap();
        Arc::new(Cached::from(di))
    }

    fn names(found: Vec<Arc<Cached>>) -> Vec<String> {
        let mut names: Vec<_> = found
            .iter()
            .map(|o| o.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn apply_finds_every_resource_of_a_machine_and_only_those() {
        let index = Machines::default();
        let (a, b, c) = (
            di("a", Some("m1"), None),
            di("b", Some("m1"), None),
            di("c", Some("m2"), None),
        );
        for o in [&a, &b, &c] {
            index.apply(None, o);
        }
        assert_eq!(names(index.managing("m1")), ["a", "b"]);
        assert_eq!(names(index.managing("m2")), ["c"]);
        assert!(index.managing("m3").is_empty());
    }

    #[test]
    fn a_new_version_replaces_the_old_one() {
        let index = Machines::default();
        let old = di("a", Some("m1"), None);
        index.apply(None, &old);
        let new = di("a", Some("m1"), None);
        index.apply(Some(&old), &new);
        let found = index.managing("m1");
        assert_eq!(found.len(), 1);
        assert!(Arc::ptr_eq(&found[0], &new));
    }

    #[test]
    fn a_resolved_device_name_enters_and_a_changed_machine_moves() {
        let index = Machines::default();
        let unresolved = di("a", None, None);
        index.apply(None, &unresolved);
        assert_eq!(index.len(), 0);
        let resolved = di("a", None, Some("m1"));
        index.apply(Some(&unresolved), &resolved);
        assert_eq!(names(index.managing("m1")), ["a"]);
        let moved = di("a", None, Some("m2"));
        index.apply(Some(&resolved), &moved);
        assert!(index.managing("m1").is_empty());
        assert_eq!(names(index.managing("m2")), ["a"]);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn delete_frees_the_entry() {
        let index = Machines::default();
        let (a, b) = (di("a", Some("m1"), None), di("b", Some("m1"), None));
        index.apply(None, &a);
        index.apply(None, &b);
        index.delete(&a);
        assert_eq!(names(index.managing("m1")), ["b"]);
        index.delete(&b);
        assert!(index.0.read().unwrap().is_empty());
    }

    #[test]
    fn the_writer_keeps_the_index_as_the_store() {
        use watcher::Event::*;
        let (mut writer, store, index) = Writer::new();
        let unwrap = |o: Arc<Cached>| Arc::unwrap_or_clone(o);
        let in_store = |name: &str| store.get(&ObjectRef::new(name).within("soc")).unwrap();
        // The first list, then changes.
        writer.apply(&Init);
        writer.apply(&InitApply(unwrap(di("a", Some("m1"), None))));
        writer.apply(&InitApply(unwrap(di("b", None, None))));
        assert!(
            index.managing("m1").is_empty(),
            "nothing before the list is done"
        );
        writer.apply(&InitDone);
        assert!(Arc::ptr_eq(&index.managing("m1")[0], &in_store("a")));
        writer.apply(&Apply(unwrap(di("b", None, Some("m1")))));
        writer.apply(&Apply(unwrap(di("a", Some("m1"), None))));
        assert_eq!(names(index.managing("m1")), ["a", "b"]);
        assert!(
            index
                .managing("m1")
                .iter()
                .any(|o| Arc::ptr_eq(o, &in_store("a")))
        );
        writer.apply(&Delete(unwrap(di("b", None, Some("m1")))));
        assert_eq!(names(index.managing("m1")), ["a"]);
        assert_eq!(index.len(), 1);
        // A re-list that no longer holds `a`.
        writer.apply(&Init);
        writer.apply(&InitApply(unwrap(di("c", Some("m2"), None))));
        writer.apply(&InitDone);
        assert!(index.managing("m1").is_empty());
        assert_eq!(names(index.managing("m2")), ["c"]);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn the_writer_reports_the_machines_where_what_rule_6_reads_changed() {
        use watcher::Event::*;
        let (mut writer, _, _) = Writer::new();
        let unwrap = |o: Arc<Cached>| Arc::unwrap_or_clone(o);
        writer.apply(&Init);
        writer.apply(&InitApply(unwrap(di("ready", Some("m1"), None))));
        assert!(writer.apply(&InitDone).is_empty());
        // A new resource on m1.
        let release = || unwrap(di("release", Some("m1"), None));
        assert_eq!(writer.apply(&Apply(release())), ["m1"]);
        // Its status changes: nothing.
        let mut written = release();
        written.status = Some(Default::default());
        assert!(writer.apply(&Apply(written)).is_empty());
        // It changes its desired state, then is being deleted.
        let mut aligned = release();
        aligned.spec.isolated = true;
        assert_eq!(writer.apply(&Apply(aligned.clone())), ["m1"]);
        let mut deleting = aligned.clone();
        let at = k8s_openapi::jiff::Timestamp::from_second(1).unwrap();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        assert_eq!(writer.apply(&Apply(deleting.clone())), ["m1"]);
        // A device name without a machine yet: nothing; resolved onto m2, then moved to m3.
        assert!(
            writer
                .apply(&Apply(unwrap(di("named", None, None))))
                .is_empty()
        );
        let resolved = unwrap(di("named", None, Some("m2")));
        assert_eq!(writer.apply(&Apply(resolved)), ["m2"]);
        let moved = unwrap(di("named", None, Some("m3")));
        assert_eq!(writer.apply(&Apply(moved)), ["m2", "m3"]);
    }

    #[test]
    fn reset_holds_exactly_the_relisted_resources() {
        let index = Machines::default();
        index.apply(None, &di("gone", Some("m1"), None));
        index.reset([di("a", Some("m1"), None), di("b", None, None)]);
        assert_eq!(names(index.managing("m1")), ["a"]);
        assert_eq!(index.len(), 1);
    }
}
