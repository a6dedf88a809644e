//! When each DeviceIsolation is reconciled again without a change: the reconciles' requeues.
//!
//! kube's controller keeps a requeued object in a delay queue and in an index, each with its own
//! copy of the reconcile request (a 120-byte message with the name and namespace strings), in
//! tables that grow to the most objects ever waiting at once and never shrink. A set's children
//! mostly wait for quota, thousands at once: in the `fleet10000` benchmark those tables and
//! copies were about 5 MB, held to the end of the process. Here a requeue is an instant and the
//! reference the process already holds for the resource ([`super::Memory::shared`]), one entry in
//! a heap and one in an index, and the tables shrink as they empty. When due, the resource is
//! woken through the controller's trigger channel, as a change in MDE wakes it.
//!
//! A reconcile's result replaces the resource's requeue (so does kube's controller, which runs a
//! reconcile for the earliest of its requeue and any change): the last reconcile saw the latest
//! state. A wake-up that finds nothing to do costs one planner pass.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ResourceRef;
use crate::poller::Wake;

/// The resources' next reconciles (see the module docs). One owner: the reconcile sets a
/// resource's entry, [`super::Owners`] removes it with the resource.
#[derive(Default)]
pub struct Requeues {
    inner: Mutex<Inner>,
    /// Signalled when the earliest instant moved earlier (a permit is kept until [`Requeues::run`]
    /// waits again).
    earlier: Notify,
}

#[derive(Default)]
struct Inner {
    /// Each waiting resource's instant.
    at: HashMap<Arc<ResourceRef>, Instant>,
    /// The same, earliest first, and stale entries (an instant since replaced or removed) until
    /// they come up or the heap is rebuilt.
    queue: BinaryHeap<Reverse<Due>>,
}

/// A heap entry, ordered by its instant alone.
struct Due {
    at: Instant,
    resource: Arc<ResourceRef>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

impl Requeues {
    /// The resource's next reconcile: `after` from `now`. Replaces what was set before (a
    /// reconcile that asks for none [`forget`](Self::forget)s it).
    pub fn set(&self, resource: Arc<ResourceRef>, after: Duration, now: Instant) {
        let mut inner = self.lock();
        let at = now + after;
        if inner.at.get(&*resource) == Some(&at) {
            return;
        }
        let earliest = inner.queue.peek().map(|Reverse(d)| d.at);
        inner.at.insert(resource.clone(), at);
        inner.queue.push(Reverse(Due { at, resource }));
        inner.tidy();
        drop(inner);
        if earliest.is_none_or(|e| at < e) {
            self.earlier.notify_one();
        }
    }

    /// Forgets the resource's next reconcile (it asked for none, or it was deleted).
    pub fn forget(&self, resource: &ResourceRef) {
        let mut inner = self.lock();
        inner.at.remove(resource);
        inner.tidy();
    }

    /// Takes the resources whose instant has come by `now`.
    pub fn due(&self, now: Instant) -> Vec<Arc<ResourceRef>> {
        let mut inner = self.lock();
        let mut due = Vec::new();
        while let Some(Reverse(next)) = inner.queue.peek()
            && next.at <= now
        {
            let Some(Reverse(next)) = inner.queue.pop() else {
                break;
            };
            // Current only if the index still holds this instant for it.
            if inner.at.get(&*next.resource) == Some(&next.at) {
                inner.at.remove(&*next.resource);
                due.push(next.resource);
            }
        }
        inner.tidy();
        due
    }

    /// The earliest instant in the heap (possibly stale: waking for it finds nothing due).
    pub fn next(&self) -> Option<Instant> {
        self.lock().queue.peek().map(|Reverse(d)| d.at)
    }

    /// Resources waiting.
    pub fn len(&self) -> usize {
        self.lock().at.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every resource through `waker` when its instant comes, until `shutdown`.
    pub async fn run(&self, waker: &dyn Wake, shutdown: &CancellationToken) {
        loop {
            let next = self.next();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.earlier.notified() => {}
                _ = sleep_until(next) => {}
            }
            for resource in self.due(Instant::now()) {
                waker.wake(&resource);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the tables consistent (each change is one call).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Bounds the stale entries (the heap is rebuilt from the index when they outnumber the
    /// current ones) and gives memory back as the tables empty.
    fn tidy(&mut self) {
        if self.queue.len() > 2 * self.at.len() + 64 {
            self.queue = self
                .at
                .iter()
                .map(|(resource, &at)| {
                    Reverse(Due {
                        at,
                        resource: resource.clone(),
                    })
                })
                .collect();
        }
        if self.at.capacity() > 64 && self.at.len() < self.at.capacity() / 4 {
            self.at.shrink_to(self.at.len() * 2);
        }
        if self.queue.capacity() > 64 && self.queue.len() < self.queue.capacity() / 4 {
            self.queue.shrink_to(self.queue.len() * 2);
        }
    }
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> Arc<ResourceRef> {
        Arc::new(ResourceRef::new(name).within("soc"))
    }

    fn names(due: Vec<Arc<ResourceRef>>) -> Vec<String> {
        due.iter().map(|r| r.name.clone()).collect()
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn resources_come_due_in_order_of_their_instants_once() {
        let (q, t0) = (Requeues::default(), Instant::now());
        q.set(r("c"), 3 * S, t0);
        q.set(r("a"), S, t0);
        q.set(r("b"), 2 * S, t0);
        assert_eq!(q.next(), Some(t0 + S));
        assert!(q.due(t0).is_empty());
        assert_eq!(names(q.due(t0 + 2 * S)), ["a", "b"]);
        assert_eq!(names(q.due(t0 + 10 * S)), ["c"]);
        assert!(q.due(t0 + 10 * S).is_empty() && q.is_empty());
    }

    #[test]
    fn the_last_reconciles_result_replaces_the_requeue() {
        let (q, t0) = (Requeues::default(), Instant::now());
        q.set(r("a"), S, t0);
        q.set(r("a"), 5 * S, t0);
        assert!(
            q.due(t0 + 2 * S).is_empty(),
            "the earlier instant was replaced"
        );
        assert_eq!(names(q.due(t0 + 5 * S)), ["a"]);
        q.set(r("b"), 5 * S, t0);
        q.set(r("b"), S, t0);
        assert_eq!(names(q.due(t0 + S)), ["b"]);
        assert!(q.due(t0 + 5 * S).is_empty(), "nor twice");
        q.set(r("c"), S, t0);
        q.forget(&r("c"));
        assert!(q.due(t0 + 5 * S).is_empty() && q.is_empty());
    }

    #[test]
    fn a_deleted_resource_is_never_woken() {
        let (q, t0) = (Requeues::default(), Instant::now());
        q.set(r("a"), S, t0);
        q.set(r("b"), S, t0);
        q.forget(&ResourceRef::new("a").within("soc"));
        assert_eq!(names(q.due(t0 + S)), ["b"]);
    }

    #[test]
    fn stale_entries_and_emptied_tables_are_bounded() {
        let (q, t0) = (Requeues::default(), Instant::now());
        let a = r("a");
        for i in 0..10_000u32 {
            q.set(a.clone(), S * (i + 1), t0);
        }
        assert!(
            q.lock().queue.len() <= 2 + 64 + 1,
            "{}",
            q.lock().queue.len()
        );
        let many: Vec<_> = (0..10_000).map(|i| r(&format!("r{i}"))).collect();
        for m in &many {
            q.set(m.clone(), S, t0);
        }
        assert_eq!(q.due(t0 + S).len(), 10_000);
        let inner = q.lock();
        assert!(inner.at.capacity() < 1_000 && inner.queue.capacity() < 1_000);
    }

    struct Woken(Mutex<Vec<String>>);

    impl Wake for Woken {
        fn wake(&self, resource: &ResourceRef) {
            self.0.lock().unwrap().push(resource.name.clone());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_wakes_each_resource_at_its_instant() {
        let q = Arc::new(Requeues::default());
        let woken = Arc::new(Woken(Mutex::new(Vec::new())));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (q, woken, shutdown) = (q.clone(), woken.clone(), shutdown.clone());
            async move { q.run(&*woken, &shutdown).await }
        });
        let t0 = Instant::now();
        q.set(r("late"), 60 * S, t0);
        tokio::time::sleep(S).await;
        // An earlier one set while the task sleeps for the later one.
        q.set(r("early"), S, Instant::now());
        tokio::time::sleep(2 * S).await;
        assert_eq!(*woken.0.lock().unwrap(), ["early"]);
        tokio::time::sleep(60 * S).await;
        assert_eq!(*woken.0.lock().unwrap(), ["early", "late"]);
        shutdown.cancel();
        task.await.unwrap();
    }
}
