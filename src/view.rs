//! The operator's shared view of the tenant's Isolate/Unisolate machine actions.
//!
//! The batch poller fills it with a few list calls per cycle whatever the number of resources;
//! reconcilers read it instead of calling MDE, and add the actions their POSTs and lookups return.
//! It also remembers which resources care about which machine, so that a change in MDE wakes
//! exactly the resources it concerns.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cache::bare;
use crate::mde::model::{ActionStatus, MachineAction};
use crate::reconcile::{ActionFact, ActionKind, CallFailure, ResourceRef};

/// Finished actions kept per machine beyond the open ones: enough to know the device's current
/// state, to detect drift, and to find a recent action by its marker.
const FINISHED_KEPT_PER_MACHINE: usize = 6;

/// A known action (an [`ActionFact`] when read), and when this process first saw it (its own
/// monotonic clock), kept together so that the sighting goes when the action is pruned. The view
/// holds an action per machine, thousands with a fleet: the requestor and the request source,
/// a few distinct values in a tenant, are interned ([`Inner::texts`]), and strings are boxed
/// (no spare capacity). Memory bench `--waiting` (one action per machine, 10,000): 768 → 496
/// bytes per action in malloc chunks, 6 → 4 allocations.
struct Known {
    id: Box<str>,
    kind: ActionKind,
    status: ActionStatus,
    requestor: Option<Arc<str>>,
    comment: Option<Box<str>>,
    request_source: Option<Arc<str>>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    first_seen: std::time::Instant,
}

impl Known {
    fn new(fact: ActionFact, texts: &mut Texts, first_seen: std::time::Instant) -> Self {
        Known {
            id: fact.id.into(),
            kind: fact.kind,
            status: fact.status,
            requestor: fact.requestor.map(|r| texts.intern(&r)),
            comment: fact.comment.map(String::into_boxed_str),
            request_source: fact.request_source.map(|r| texts.intern(&r)),
            created_at: fact.created_at,
            updated_at: fact.updated_at,
            first_seen,
        }
    }

    fn fact(&self) -> ActionFact {
        ActionFact {
            id: self.id.to_string(),
            kind: self.kind,
            status: self.status.clone(),
            requestor: self.requestor.as_deref().map(String::from),
            comment: self.comment.as_deref().map(String::from),
            request_source: self.request_source.as_deref().map(String::from),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// Whether it says what `fact` says.
    fn is(&self, fact: &ActionFact) -> bool {
        *self.id == *fact.id
            && self.kind == fact.kind
            && self.status == fact.status
            && self.requestor.as_deref() == fact.requestor.as_deref()
            && self.comment.as_deref() == fact.comment.as_deref()
            && self.request_source.as_deref() == fact.request_source.as_deref()
            && self.created_at == fact.created_at
            && self.updated_at == fact.updated_at
    }
}

/// Interned texts: one allocation per distinct value. Values no action holds any more are
/// dropped whenever the set has doubled since the last sweep.
#[derive(Default)]
struct Texts {
    set: HashSet<Arc<str>>,
    sweep_at: usize,
}

impl Texts {
    fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.set.get(text) {
            return shared.clone();
        }
        if self.set.len() >= self.sweep_at {
            self.set.retain(|t| Arc::strong_count(t) > 1);
            self.sweep_at = (self.set.len() * 2).max(64);
        }
        let shared: Arc<str> = Arc::from(text);
        self.set.insert(shared.clone());
        shared
    }
}

/// Sized for thousands of machines and resources: each list is allocated to its exact length
/// (a `Vec` grows to four elements on its first push, a `HashSet` of one holds four buckets),
/// a resource is kept by its name and namespace only (without the uid and resourceVersion its
/// watch-cache reference carries), and a machine id is one allocation shared by the resource
/// that watches it and the machine's watcher list.
#[derive(Default)]
struct Inner {
    synced: bool,
    load_failure: Option<CallFailure>,
    by_machine: HashMap<String, Vec<Known>>,
    /// The requestors and request sources of the known actions.
    texts: Texts,
    /// Resources per machine, without repeats; almost always one. Both maps share each
    /// resource's reference (an `Arc`): with 10,000 resources, a copy of each name and namespace
    /// in each map cost 458 bytes per resource, the shared one 311 (memory bench `--set`).
    watchers: HashMap<Arc<str>, Vec<Arc<ResourceRef>>>,
    machine_of: HashMap<Arc<ResourceRef>, Arc<str>>,
}

/// Thread-safe view; one per process.
#[derive(Default)]
pub struct ActionView {
    inner: RwLock<Inner>,
}

impl ActionView {
    /// An empty, not yet synced view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the first full load has completed.
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    /// Marks the first full load as done.
    pub fn mark_synced(&self) {
        let mut inner = self.write();
        inner.synced = true;
        inner.load_failure = None;
    }

    /// Why the first load failed last time, while it has not succeeded (e.g. the credential was
    /// refused): resources waiting for the view report it instead of waiting silently.
    pub fn load_failure(&self) -> Option<CallFailure> {
        self.read().load_failure.clone()
    }

    /// Records a failed first load (ignored once synced).
    pub fn set_load_failure(&self, failure: CallFailure) {
        let mut inner = self.write();
        if !inner.synced {
            inner.load_failure = Some(failure);
        }
    }

    /// Known actions on `machine_id` (open ones and the latest finished ones).
    pub fn actions_for(&self, machine_id: &str) -> Vec<ActionFact> {
        self.read()
            .by_machine
            .get(machine_id)
            .map(|list| list.iter().map(Known::fact).collect())
            .unwrap_or_default()
    }

    /// Records actions (from a poll, a POST answer or a lookup). Returns the machines whose known
    /// actions changed, so that their watchers can be woken.
    pub fn upsert<I>(&self, actions: I) -> HashSet<String>
    where
        I: IntoIterator<Item = (String, ActionFact)>,
    {
        let mut inner = self.write();
        let Inner {
            by_machine, texts, ..
        } = &mut *inner;
        let mut changed = HashSet::new();
        let seen_now = std::time::Instant::now();
        for (machine, action) in actions {
            let list = by_machine.entry(machine.clone()).or_default();
            match list.iter_mut().find(|k| *k.id == *action.id) {
                Some(existing) if existing.is(&action) => continue,
                Some(existing) => {
                    let first_seen = existing.first_seen;
                    *existing = Known::new(action, texts, first_seen);
                }
                None => {
                    list.reserve_exact(1);
                    list.push(Known::new(action, texts, seen_now));
                }
            }
            prune(list);
            changed.insert(machine);
        }
        changed
    }

    /// Ids of open actions, oldest first.
    pub fn open_action_ids(&self) -> Vec<String> {
        let inner = self.read();
        let mut open: Vec<&Known> = open(&inner).collect();
        open.sort_by_key(|k| k.created_at);
        open.into_iter().map(|k| k.id.to_string()).collect()
    }

    /// The newest creation time MDE stamped on any action in the view (MDE's clock).
    pub fn newest_created_at(&self) -> Option<DateTime<Utc>> {
        let inner = self.read();
        inner
            .by_machine
            .values()
            .flatten()
            .filter_map(|k| k.created_at)
            .max()
    }

    /// Age of the youngest open action at `now`, if any is open.
    pub fn youngest_open_age(&self, now: DateTime<Utc>) -> Option<Duration> {
        open(&self.read()).map(|k| age(k, now)).min()
    }

    /// Number of open actions and the age of the oldest, for metrics.
    pub fn open_summary(&self, now: DateTime<Utc>) -> (usize, Option<Duration>) {
        let inner = self.read();
        let oldest = open(&inner).map(|k| age(k, now)).max();
        (open(&inner).count(), oldest)
    }

    /// Registers that `resource` manages `machine_id` (replacing an earlier machine). The
    /// reference is kept as given: the reconcile memory's ([`Memory::shared`]), by name and
    /// namespace.
    ///
    /// [`Memory::shared`]: crate::reconcile::Memory::shared
    pub fn watch(&self, resource: &Arc<ResourceRef>, machine_id: &str) {
        if self.read().machine_of.get(&**resource).map(|m| &**m) == Some(machine_id) {
            return; // the common case, on every reconcile: no write lock
        }
        let mut inner = self.write();
        unregister(&mut inner, resource);
        let machine: Arc<str> = match inner.watchers.get_key_value(machine_id) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(machine_id),
        };
        let resource = if resource.extra.uid.is_none() && resource.extra.resource_version.is_none()
        {
            resource.clone()
        } else {
            Arc::new(bare(resource))
        };
        inner.machine_of.insert(resource.clone(), machine.clone());
        let list = inner.watchers.entry(machine).or_default();
        if !list.contains(&resource) {
            list.reserve_exact(1);
            list.push(resource);
        }
    }

    /// Forgets a deleted resource; returns the machine it watched.
    pub fn unwatch(&self, resource: &ResourceRef) -> Option<String> {
        unregister(&mut self.write(), resource).map(|m| m.to_string())
    }

    /// Resources watching a machine (for the tracked-resources gauge).
    pub fn watched(&self) -> usize {
        self.read().machine_of.len()
    }

    /// Resources watching any of `machines`.
    pub fn watchers_of<'a, I>(&self, machines: I) -> Vec<ResourceRef>
    where
        I: IntoIterator<Item = &'a String>,
    {
        let inner = self.read();
        let mut out: Vec<ResourceRef> = machines
            .into_iter()
            .filter_map(|m| inner.watchers.get(m.as_str()))
            .flatten()
            .map(|r| ResourceRef::clone(r))
            .collect();
        let mut seen = HashSet::new();
        out.retain(|r| seen.insert(r.clone()));
        out
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write is a whole step).
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// An action's age: the larger of its age by MDE's creation time and the time since this process
/// first saw it. Each alone misleads: MDE's stamp is wrong under clock skew and under `mde-sim`'s
/// time scale (whose clock runs ahead, so real time catches up with a stamp long after the action
/// was created and the action would look brand new again), and the first sight makes every action
/// look young after a restart. The larger one is never too young, which is the error that costs
/// reads.
fn age(known: &Known, now: DateTime<Utc>) -> Duration {
    let by_stamp = known
        .created_at
        .and_then(|c| (now - c).to_std().ok())
        .unwrap_or_default();
    by_stamp.max(known.first_seen.elapsed())
}

/// Removes `resource`'s interest in its machine (and the machine's entry once nobody watches
/// it); returns the machine.
fn unregister(inner: &mut Inner, resource: &ResourceRef) -> Option<Arc<str>> {
    let machine = inner.machine_of.remove(resource)?;
    if let Some(list) = inner.watchers.get_mut(&machine) {
        list.retain(|r| **r != *resource);
        if list.is_empty() {
            inner.watchers.remove(&machine);
        } else {
            list.shrink_to_fit();
        }
    }
    Some(machine)
}

/// The open actions of the view.
fn open(inner: &Inner) -> impl Iterator<Item = &Known> {
    inner
        .by_machine
        .values()
        .flatten()
        .filter(|k| !k.status.is_final())
}

/// The planner's view of an MDE action with its machine id; `None` for other action types or an
/// action without a machine id (nothing to attach it to).
pub fn fact_of(action: &MachineAction) -> Option<(String, ActionFact)> {
    let kind = ActionKind::of(&action.action_type)?;
    let machine = action.machine_id.clone()?;
    Some((
        machine,
        ActionFact {
            id: action.id.clone(),
            kind,
            status: action.status.clone(),
            requestor: action.requestor.clone(),
            comment: action.requestor_comment.clone(),
            request_source: action.request_source.clone(),
            created_at: action.created_at,
            updated_at: action.updated_at,
        },
    ))
}

/// Keeps every open action and the latest finished ones, newest last.
fn prune(list: &mut Vec<Known>) {
    list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let finished = list.iter().filter(|k| k.status.is_final()).count();
    if finished <= FINISHED_KEPT_PER_MACHINE {
        return;
    }
    let mut drop = finished - FINISHED_KEPT_PER_MACHINE;
    list.retain(|k| {
        if drop > 0 && k.status.is_final() {
            drop -= 1;
            false
        } else {
            true
        }
    });
    list.shrink_to_fit();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mde::model::ActionStatus;

    fn fact(id: &str, status: ActionStatus, minute: i64) -> ActionFact {
        let at = DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
            + chrono::Duration::minutes(minute);
        ActionFact {
            id: id.into(),
            kind: ActionKind::Unisolate,
            status,
            requestor: None,
            comment: None,
            request_source: None,
            created_at: Some(at),
            updated_at: Some(at),
        }
    }

    #[test]
    fn upsert_reports_only_real_changes() {
        let view = ActionView::new();
        let m = "m1".to_string();
        let changed = view.upsert([(m.clone(), fact("a", ActionStatus::Pending, 0))]);
        assert!(changed.contains("m1"));
        assert!(
            view.upsert([(m.clone(), fact("a", ActionStatus::Pending, 0))])
                .is_empty()
        );
        assert_eq!(
            view.upsert([(m.clone(), fact("a", ActionStatus::Succeeded, 0))])
                .len(),
            1
        );
        assert_eq!(view.actions_for("m1")[0].status, ActionStatus::Succeeded);
    }

    #[test]
    fn requestors_and_sources_are_kept_once_and_read_back_as_given() {
        let view = ActionView::new();
        let mut a = fact("a", ActionStatus::Pending, 0);
        a.requestor = Some("app".into());
        a.request_source = Some("PublicApi".into());
        a.comment = Some("why [mde-isolation-operator ns/x gen=1 uid=1 try=1]".into());
        let mut b = a.clone();
        b.id = "b".into();
        view.upsert([("m1".to_string(), a.clone()), ("m2".to_string(), b.clone())]);
        assert_eq!(view.actions_for("m1"), vec![a]);
        assert_eq!(view.actions_for("m2"), vec![b]);
        assert_eq!(view.read().texts.set.len(), 2, "one copy of each value");
    }

    #[test]
    fn open_actions_are_never_pruned_and_finished_ones_are_bounded() {
        let view = ActionView::new();
        let m = "m1".to_string();
        view.upsert([(m.clone(), fact("open", ActionStatus::Pending, 0))]);
        for i in 1..20 {
            view.upsert([(
                m.clone(),
                fact(&format!("f{i}"), ActionStatus::Succeeded, i),
            )]);
        }
        let kept = view.actions_for("m1");
        assert_eq!(kept.len(), FINISHED_KEPT_PER_MACHINE + 1);
        assert!(kept.iter().any(|a| a.id == "open"));
        assert!(
            kept.iter().any(|a| a.id == "f19"),
            "the newest finished stays"
        );
        assert_eq!(view.open_action_ids(), vec!["open".to_string()]);
    }

    #[test]
    fn watchers_follow_the_machine_a_resource_manages() {
        let view = ActionView::new();
        let r = ResourceRef::new("a").within("ns");
        let shared = Arc::new(r.clone());
        view.watch(&shared, "m1");
        assert_eq!(view.watchers_of([&"m1".to_string()]), vec![r.clone()]);
        view.watch(&shared, "m2");
        assert!(view.watchers_of([&"m1".to_string()]).is_empty());
        assert_eq!(view.watched(), 1);
        assert_eq!(view.unwatch(&r).as_deref(), Some("m2"));
        assert!(view.watchers_of([&"m2".to_string()]).is_empty());
        assert_eq!(view.watched(), 0);
        assert_eq!(view.unwatch(&r), None);
    }

    #[test]
    fn resources_sharing_a_machine_are_each_woken_once_and_leave_one_by_one() {
        let view = ActionView::new();
        let (a, b) = (
            ResourceRef::new("a").within("ns"),
            ResourceRef::new("b").within("ns"),
        );
        let (shared_a, shared_b) = (Arc::new(a.clone()), Arc::new(b.clone()));
        view.watch(&shared_a, "m1");
        view.watch(&shared_a, "m1");
        view.watch(&shared_b, "m1");
        let m1 = "m1".to_string();
        let mut woken = view.watchers_of([&m1, &m1]);
        woken.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(woken, vec![a.clone(), b.clone()]);
        assert_eq!(view.unwatch(&a).as_deref(), Some("m1"));
        assert_eq!(view.watchers_of([&m1]), vec![b.clone()]);
        assert_eq!(view.unwatch(&b).as_deref(), Some("m1"));
        assert!(view.watchers_of([&m1]).is_empty());
        assert_eq!(view.watched(), 0);
    }

    #[test]
    fn ages_are_the_larger_of_mde_stamp_and_first_sight() {
        let view = ActionView::new();
        let now = Utc::now();
        let mut old = fact("old", ActionStatus::Pending, 0);
        old.created_at = Some(now - chrono::Duration::hours(1));
        view.upsert([("m1".to_string(), old)]);
        let age = view.youngest_open_age(now).unwrap();
        assert!(age >= Duration::from_secs(3599), "{age:?}");
        // A simulator at a time scale stamps actions ahead of this clock: age from first sight.
        let mut ahead = fact("ahead", ActionStatus::Pending, 0);
        ahead.created_at = Some(now + chrono::Duration::hours(5));
        view.upsert([("m2".to_string(), ahead)]);
        assert!(view.youngest_open_age(now).unwrap() < Duration::from_secs(5));
        let (open, oldest) = view.open_summary(now);
        assert_eq!(open, 2);
        assert!(oldest.unwrap() >= Duration::from_secs(3599));
    }

    #[test]
    fn an_action_stamped_ahead_does_not_look_new_again_when_this_clock_catches_up() {
        // mde-sim at a time scale stamps an action hours ahead; later this clock passes the stamp,
        // and by the stamp alone the action would be a few milliseconds old (and be polled fast).
        let view = ActionView::new();
        let stamp = Utc::now() + chrono::Duration::hours(5);
        let mut ahead = fact("ahead", ActionStatus::Pending, 0);
        ahead.created_at = Some(stamp);
        view.upsert([("m1".to_string(), ahead)]);
        std::thread::sleep(Duration::from_millis(30));
        let caught_up = stamp + chrono::Duration::milliseconds(1);
        let age = view.youngest_open_age(caught_up).unwrap();
        assert!(age >= Duration::from_millis(30), "{age:?}");
    }
}
