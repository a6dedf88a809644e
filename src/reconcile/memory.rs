//! Per-resource process memory: what this process knows of a resource beyond its status. It is
//! lost on restart, which is safe (every rule that reads it falls back to a lookup). One owner,
//! keyed by [`ResourceRef`]; an entry exists from the resource's first reconcile until
//! [`Memory::forget`] (its deletion, or a re-list that no longer holds it).
//!
//! Writes after the first never create an entry, so a reconcile still in flight when its resource
//! is deleted cannot bring the entry back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::vocab::{CallFailure, DeviceCandidate, PostOutcome, ResourceRef};

#[derive(Clone, Debug, Default, PartialEq)]
struct Entry {
    /// Fingerprint ([`fingerprint`]) of the current intent's marker when this process knows its
    /// POST was never sent (refused by the quota gate, failed before sending): no lookup is
    /// needed before sending it.
    unsent: Option<u64>,
    /// Consecutive failed reconciles (Kubernetes-side errors), for the error backoff.
    errors: u32,
    /// What few resources ever need, boxed: the map holds an entry per resource, and its table
    /// reserves room for more entries than it holds, so an entry's size counts many times over.
    rare: Option<Box<Rare>>,
}

/// The part of an [`Entry`] that only a resource whose POST went wrong or that names its device
/// by name has.
#[derive(Clone, Debug, Default, PartialEq)]
struct Rare {
    /// Marker of a POST whose outcome was ambiguous, and when: no lookup may prove it absent
    /// before the settle time, even if the watch cache still shows an older status.
    ambiguous: Option<(String, DateTime<Utc>)>,
    /// Marker of a POST MDE rejected for good (not found, unsupported, invalid), and why: a
    /// reconcile from a watch cache that does not show the stall yet must not send it again.
    rejected: Option<(String, CallFailure)>,
    /// What spec.deviceName resolved to, for one generation and retry request ([`resolution_key`]):
    /// a reconcile from a watch cache that does not show the result yet must not look it up again.
    resolved: Option<(String, Vec<DeviceCandidate>)>,
}

impl Entry {
    fn rare(&self) -> Option<&Rare> {
        self.rare.as_deref()
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }
}

/// What an entry keeps of a marker it only compares with: its 64-bit SipHash (std's
/// `DefaultHasher`, whose keys are fixed). A marker is about 130 bytes, and every resource waiting
/// for quota had a copy here: 1.1 MB with the `fleet10000` benchmark's 8,500 waiting children
/// (heaptrack). Two markers of one resource (another generation or attempt) have the same
/// fingerprint with a probability of 2^-64.
fn fingerprint(marker: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    marker.hash(&mut hasher);
    hasher.finish()
}

/// The per-resource memory of the process (see the module docs).
#[derive(Default)]
pub struct Memory {
    /// Keyed by the resource's name and namespace, in the one allocation the view's watchers
    /// share ([`Memory::shared`]).
    entries: Mutex<HashMap<Arc<ResourceRef>, Entry>>,
    machines: MachineLocks,
}

impl Memory {
    /// Starts remembering `resource` (idempotent): called when a reconcile begins.
    pub fn track(&self, resource: &ResourceRef) {
        let mut entries = self.lock();
        if !entries.contains_key(resource) {
            // By name and namespace only: the uid and resourceVersion are two more strings.
            entries.insert(Arc::new(crate::cache::bare(resource)), Entry::default());
        }
    }

    /// The resource's name and namespace as this memory keeps them (a new copy when it is not
    /// tracked): whoever else keeps the resource for long (the view's watchers) shares them.
    /// With 10,000 resources, the memory and the view each with a copy cost 658 bytes per
    /// resource (748 in malloc chunks), sharing it 426 (495) (memory bench `--waiting`).
    pub fn shared(&self, resource: &ResourceRef) -> Arc<ResourceRef> {
        match self.lock().get_key_value(resource) {
            Some((shared, _)) => shared.clone(),
            None => Arc::new(crate::cache::bare(resource)),
        }
    }

    /// Frees everything remembered of `resource`. Returns whether anything was.
    pub fn forget(&self, resource: &ResourceRef) -> bool {
        self.lock().remove(resource).is_some()
    }

    /// Frees every resource for which `keep` is false; returns those freed.
    pub fn retain(&self, mut keep: impl FnMut(&ResourceRef) -> bool) -> Vec<ResourceRef> {
        let mut entries = self.lock();
        let gone: Vec<ResourceRef> = entries
            .keys()
            .filter(|r| !keep(r))
            .map(|r| ResourceRef::clone(r))
            .collect();
        for r in &gone {
            entries.remove(r);
        }
        gone
    }

    /// Resources remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the POST under `marker` is known never to have been sent.
    pub fn unsent(&self, resource: &ResourceRef, marker: &str) -> bool {
        self.lock()
            .get(resource)
            .is_some_and(|e| e.unsent == Some(fingerprint(marker)))
    }

    /// When the POST under `marker` last ended ambiguously in this process.
    pub fn ambiguous_at(&self, resource: &ResourceRef, marker: &str) -> Option<DateTime<Utc>> {
        self.lock()
            .get(resource)?
            .rare()?
            .ambiguous
            .as_ref()
            .filter(|(m, _)| m == marker)
            .map(|(_, at)| *at)
    }

    /// Records what a POST under `marker` (or its refusal at the quota gate) proved: an action
    /// or a certain failure means it is not out there unsent-but-pending; an ambiguous failure
    /// means it may be, as of `now`.
    pub fn after_post(
        &self,
        resource: &ResourceRef,
        marker: &str,
        outcome: &PostOutcome,
        now: DateTime<Utc>,
    ) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(resource) else {
            return; // deleted meanwhile
        };
        match outcome {
            PostOutcome::Action(_) => entry.unsent = None,
            PostOutcome::Failed(CallFailure::Ambiguous(_)) => {
                entry.unsent = None;
                entry.rare_mut().ambiguous = Some((marker.to_string(), now));
            }
            PostOutcome::Failed(f) if f.is_rejection() => {
                entry.unsent = None;
                entry.rare_mut().rejected = Some((marker.to_string(), f.clone()));
            }
            PostOutcome::Failed(_) => entry.unsent = Some(fingerprint(marker)),
        }
    }

    /// Why MDE rejected the POST under `marker` for good, in this process.
    pub fn rejected(&self, resource: &ResourceRef, marker: &str) -> Option<CallFailure> {
        self.lock()
            .get(resource)?
            .rare()?
            .rejected
            .as_ref()
            .filter(|(m, _)| m == marker)
            .map(|(_, f)| f.clone())
    }

    /// Records what `key` ([`resolution_key`]) resolved to.
    pub fn resolved(&self, resource: &ResourceRef, key: String, found: &[DeviceCandidate]) {
        if let Some(entry) = self.lock().get_mut(resource) {
            entry.rare_mut().resolved = Some((key, found.to_vec()));
        }
    }

    /// What `key` resolved to in this process, if it was.
    pub fn resolution(&self, resource: &ResourceRef, key: &str) -> Option<Vec<DeviceCandidate>> {
        self.lock()
            .get(resource)?
            .rare()?
            .resolved
            .as_ref()
            .filter(|(k, _)| k == key)
            .map(|(_, found)| found.clone())
    }

    /// Counts a failed reconcile; returns the consecutive failures so far.
    pub fn failed(&self, resource: &ResourceRef) -> u32 {
        let mut entries = self.lock();
        match entries.get_mut(resource) {
            Some(entry) => {
                entry.errors = entry.errors.saturating_add(1);
                entry.errors
            }
            None => 1,
        }
    }

    /// Resets the failure count after a successful reconcile.
    pub fn succeeded(&self, resource: &ResourceRef) {
        if let Some(entry) = self.lock().get_mut(resource) {
            entry.errors = 0;
        }
    }

    /// Waits until no other reconcile of this process is POSTing to `machine`, and holds that
    /// until the guard is dropped: two resources for one machine never race.
    pub async fn lock_machine(&self, machine: &str) -> MachineGuard {
        self.machines.lock(machine).await
    }

    /// Machines with a lock held or awaited (for tests: the map frees itself).
    pub fn machines_locked(&self) -> usize {
        self.machines.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<ResourceRef>, Entry>> {
        // Every write is one whole step; a poisoned lock holds consistent data.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type LockMap = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Identifies one resolution of a device name: a new generation or a new retry request asks MDE
/// again, a stale watch cache does not.
pub fn resolution_key(generation: i64, retry_request: Option<&str>, device_name: &str) -> String {
    format!(
        "{generation}/{}/{device_name}",
        retry_request.unwrap_or_default()
    )
}

/// One async lock per machine, present in the map only while held or awaited.
#[derive(Default)]
struct MachineLocks(LockMap);

impl MachineLocks {
    async fn lock(&self, machine: &str) -> MachineGuard {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(machine.to_string()).or_default().clone()
        };
        MachineGuard {
            guard: Some(lock.lock_owned().await),
            map: self.0.clone(),
            machine: machine.to_string(),
        }
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Holds one machine's lock; dropping it frees the lock, and the map entry when nobody waits.
pub struct MachineGuard {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    map: LockMap,
    machine: String,
}

impl Drop for MachineGuard {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        self.guard = None;
        // Clones are only taken under the map's lock: one reference left is the map's own.
        if map
            .get(&self.machine)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.machine);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> ResourceRef {
        ResourceRef::new(name).within("soc")
    }

    #[test]
    fn an_entry_is_small_until_something_rare_happens() {
        // A marker's fingerprint, the error count and one pointer (see `Entry::rare`).
        assert!(std::mem::size_of::<Entry>() <= 32);
        let (m, a) = (Memory::default(), r("a"));
        m.track(&a);
        m.after_post(
            &a,
            "mk1",
            &PostOutcome::Failed(CallFailure::Ambiguous("t".into())),
            now(),
        );
        assert_eq!(m.ambiguous_at(&a, "mk1"), Some(now()));
        assert_eq!(m.rejected(&a, "mk1"), None);
        assert_eq!(m.resolution(&a, "k"), None);
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn post_outcomes_set_what_the_planner_may_assume() {
        let m = Memory::default();
        let a = r("a");
        m.track(&a);
        m.after_post(
            &a,
            "mk1",
            &PostOutcome::Failed(CallFailure::QuotaWait(Default::default())),
            now(),
        );
        assert!(m.unsent(&a, "mk1"));
        assert!(!m.unsent(&a, "mk2"), "another marker is not known unsent");
        m.after_post(
            &a,
            "mk1",
            &PostOutcome::Failed(CallFailure::Ambiguous("timeout".into())),
            now(),
        );
        assert!(
            !m.unsent(&a, "mk1"),
            "an ambiguous POST may have been applied"
        );
        assert_eq!(m.ambiguous_at(&a, "mk1"), Some(now()));
        assert_eq!(m.ambiguous_at(&a, "mk2"), None);
    }

    #[test]
    fn forget_frees_the_entry_and_late_writes_do_not_bring_it_back() {
        let m = Memory::default();
        let (a, b) = (r("a"), r("b"));
        m.track(&a);
        m.track(&b);
        assert_eq!(m.failed(&a), 1);
        assert_eq!(m.failed(&a), 2);
        assert_eq!(m.len(), 2);
        assert!(m.forget(&a));
        assert!(!m.forget(&a));
        // A reconcile still in flight for the deleted resource.
        m.after_post(
            &a,
            "mk",
            &PostOutcome::Failed(CallFailure::Transient("x".into())),
            now(),
        );
        m.succeeded(&a);
        assert_eq!(m.failed(&a), 1);
        assert_eq!(m.len(), 1);
        assert_eq!(m.retain(|x| x != &b), vec![b.clone()]);
        assert!(m.is_empty());
    }

    #[tokio::test]
    async fn machine_locks_serialise_one_machine_and_free_themselves() {
        let m = Arc::new(Memory::default());
        let first = m.lock_machine("m1").await;
        let other = m.lock_machine("m2").await;
        assert_eq!(m.machines_locked(), 2);
        let waiter = tokio::spawn({
            let m = m.clone();
            async move {
                let _g = m.lock_machine("m1").await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "m1 is held");
        drop(first);
        waiter.await.unwrap();
        drop(other);
        assert_eq!(m.machines_locked(), 0);
    }
}
