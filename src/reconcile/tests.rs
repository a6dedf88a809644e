//! The driver against a fake [`Effects`]: what it performs, in which order, for the cases where
//! the planner's decisions meet process memory and I/O (quota waits, ambiguous outcomes, a
//! restart with an intent, deletion).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use serde_json::json;

use super::*;
use crate::audit::carries_marker;
use crate::conditions::{self, READY, RECONCILING, STALLED};
use crate::crd::DeviceIsolation;
use crate::mde::model::ActionStatus;

const MACHINE: &str = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// A DeviceIsolation as the watch cache holds it.
fn resource(name: &str, isolated: bool, status: Option<DeviceIsolationStatus>) -> Cached {
    Cached::from(resource_as_sent(name, isolated, status))
}

/// A DeviceIsolation as the API server sends it.
fn resource_as_sent(
    name: &str,
    isolated: bool,
    status: Option<DeviceIsolationStatus>,
) -> DeviceIsolation {
    let mut di: DeviceIsolation = serde_json::from_value(json!({
        "apiVersion": "isolation.mde.dev/v1alpha1",
        "kind": "DeviceIsolation",
        "metadata": {
            "name": name, "namespace": "secops", "uid": format!("uid-{name}"), "generation": 1,
            "annotations": {crate::crd::COMMENT_ANNOTATION: "INC-4711"},
        },
        "spec": {"machineId": MACHINE, "isolated": isolated},
    }))
    .unwrap();
    di.status = status;
    di
}

/// One performed effect, as the fake saw it.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    Lookup,
    Hold,
    Post(String),
    Write(Option<String>, String),
    Release,
    Nudge,
    Resolve(String),
}

/// A fake MDE, quota gate and API server for one resource.
struct Fake {
    now: Mutex<DateTime<Utc>>,
    present: AtomicBool,
    /// Whether the shared view has loaded once.
    synced: AtomicBool,
    /// What the shared view knows.
    view: Mutex<Vec<ActionFact>>,
    /// What MDE holds (a lookup copies it into the view).
    mde: Mutex<Vec<ActionFact>>,
    siblings: Mutex<Vec<Sibling>>,
    /// Why the resource's set holds it.
    set_hold: Mutex<Option<String>>,
    /// Why the resource's connection cannot be used.
    connection: Mutex<Option<ConnectionProblem>>,
    /// Answers of `hold`, in order; none left means "go now".
    holds: Mutex<VecDeque<CallFailure>>,
    /// Answers of `post`, in order; none left means MDE creates a Pending action.
    posts: Mutex<VecDeque<CallFailure>>,
    calls: Mutex<Vec<Call>>,
    /// The last status written.
    written: Mutex<Option<DeviceIsolationStatus>>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            now: Mutex::new(t0()),
            present: AtomicBool::new(true),
            synced: AtomicBool::new(true),
            view: Mutex::default(),
            mde: Mutex::default(),
            siblings: Mutex::default(),
            set_hold: Mutex::default(),
            connection: Mutex::default(),
            holds: Mutex::default(),
            posts: Mutex::default(),
            calls: Mutex::default(),
            written: Mutex::default(),
        }
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn log(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn advance(&self, by: std::time::Duration) {
        *self.now.lock().unwrap() += chrono::Duration::from_std(by).unwrap();
    }

    /// The resource as the watch cache shows it after the last write.
    fn cached(&self, name: &str, isolated: bool) -> Cached {
        resource(name, isolated, self.written.lock().unwrap().clone())
    }

    /// The next request waits 30 s for quota (once); returns the wait.
    fn quota_waits_once(&self) -> std::time::Duration {
        let wait = std::time::Duration::from_secs(30);
        self.holds
            .lock()
            .unwrap()
            .push_back(CallFailure::QuotaWait(wait));
        wait
    }

    fn posts_made(calls: &[Call]) -> usize {
        calls.iter().filter(|c| matches!(c, Call::Post(_))).count()
    }
}

impl Effects for Fake {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap()
    }
    fn present(&self) -> bool {
        self.present.load(Ordering::SeqCst)
    }
    fn connection(&self) -> Option<ConnectionProblem> {
        self.connection.lock().unwrap().clone()
    }
    fn view_state(&self) -> (bool, Option<CallFailure>) {
        (self.synced.load(Ordering::SeqCst), None)
    }
    fn actions_for(&self, machine: &str) -> Vec<ActionFact> {
        assert_eq!(machine, MACHINE);
        self.view.lock().unwrap().clone()
    }
    fn siblings(&self, _machine: &str) -> Vec<Sibling> {
        self.siblings.lock().unwrap().clone()
    }
    fn watch(&self, _machine: &str) -> bool {
        self.present()
    }
    fn nudge_view(&self) {
        self.log(Call::Nudge);
    }
    fn requester_verified(&self) -> bool {
        true
    }
    fn set_hold(&self) -> Option<String> {
        self.set_hold.lock().unwrap().clone()
    }
    async fn resolve(&self, name: &str) -> Resolution {
        self.log(Call::Resolve(name.into()));
        Resolution::Found(Vec::new())
    }
    async fn lookup(&self, _machine: &str, _since: Option<DateTime<Utc>>) -> Lookup {
        self.log(Call::Lookup);
        *self.view.lock().unwrap() = self.mde.lock().unwrap().clone();
        Lookup::Done
    }
    fn hold(&self, _request: &Request) -> Option<CallFailure> {
        self.log(Call::Hold);
        self.holds.lock().unwrap().pop_front()
    }
    async fn post(&self, request: &Request) -> PostOutcome {
        self.log(Call::Post(request.comment.clone()));
        let created = ActionFact {
            id: format!("action-{}", self.mde.lock().unwrap().len() + 1),
            kind: request.kind,
            status: ActionStatus::Pending,
            requestor: Some("mde-isolation-operator".into()),
            comment: Some(request.comment.clone()),
            request_source: None,
            created_at: Some(self.now()),
            updated_at: Some(self.now()),
        };
        match self.posts.lock().unwrap().pop_front() {
            Some(CallFailure::Ambiguous(msg)) => {
                // Applied, but the answer was lost.
                self.mde.lock().unwrap().push(created);
                PostOutcome::Failed(CallFailure::Ambiguous(msg))
            }
            Some(failure) => PostOutcome::Failed(failure),
            None => {
                self.mde.lock().unwrap().push(created.clone());
                self.view.lock().unwrap().push(created.clone());
                PostOutcome::Action(created)
            }
        }
    }
    async fn write_status(&self, status: &DeviceIsolationStatus) -> Result<(), kube::Error> {
        let reason = conditions::find(&status.conditions, READY)
            .map(|c| c.reason.to_string())
            .unwrap_or_default();
        let marker = status.intent.as_ref().map(|i| i.marker.clone());
        self.log(Call::Write(marker, reason));
        *self.written.lock().unwrap() = Some(status.clone());
        Ok(())
    }
    async fn publish(&self, _notes: &[EventNote]) {}
    fn release_quota(&self) {
        self.log(Call::Release);
    }
}

fn timing() -> Timing {
    Timing::default()
}

async fn run(fake: &Fake, di: &Cached, memory: &Memory) -> Option<Duration> {
    drive(di, fake, memory, &timing(), false).await.unwrap()
}

fn reason_of(status: &DeviceIsolationStatus, type_: &str) -> Option<String> {
    conditions::find(&status.conditions, type_).map(|c| c.reason.to_string())
}

#[tokio::test]
async fn a_request_that_must_wait_writes_its_intent_once_and_sends_without_a_lookup() {
    let (fake, memory) = (Fake::new(), Memory::default());
    let wait = fake.quota_waits_once();
    let action = run(&fake, &resource("a", false, None), &memory).await;
    assert_eq!(action, Some(wait));
    let calls = fake.calls();
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");
    let writes: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c, Call::Write(..)))
        .collect();
    assert_eq!(writes.len(), 1, "one write while waiting: {calls:?}");
    let Call::Write(Some(marker), reason) = writes[0] else {
        panic!("the write holds the intent: {calls:?}")
    };
    assert_eq!(reason, "WaitingForQuota");
    assert!(memory.unsent(&ResourceRef::new("a").within("secops"), marker));

    // The slot has come: the intent is already persisted and known unsent, so the request goes
    // at once, under the same marker, with no lookup and no second intent write.
    fake.advance(wait);
    let marker = marker.clone();
    run(&fake, &fake.cached("a", false), &memory).await;
    let calls = fake.calls();
    assert!(!calls.contains(&Call::Lookup), "{calls:?}");
    assert!(!calls.contains(&Call::Hold), "{calls:?}");
    let posted: Vec<&String> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Post(comment) => Some(comment),
            _ => None,
        })
        .collect();
    assert_eq!(posted.len(), 1, "{calls:?}");
    assert!(carries_marker(Some(posted[0]), &marker));
    let status = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(
        status.intent, None,
        "the action is recorded, the intent cleared"
    );
    assert_eq!(
        reason_of(&status, RECONCILING).as_deref(),
        Some("ActionPending")
    );
}

#[tokio::test]
async fn a_rejected_request_is_not_sent_again_from_a_stale_cache() {
    let (fake, memory) = (Fake::new(), Memory::default());
    let wait = fake.quota_waits_once();
    run(&fake, &resource("a", false, None), &memory).await;
    // The status with the intent, as a watch cache may still show it after the stall is written.
    let with_intent = fake.written.lock().unwrap().clone();
    assert!(with_intent.as_ref().unwrap().intent.is_some());
    fake.advance(wait);
    fake.posts
        .lock()
        .unwrap()
        .push_back(CallFailure::UnsupportedPlatform(
            "OsPlatformNotSupported".into(),
        ));
    run(&fake, &fake.cached("a", false), &memory).await;
    assert_eq!(Fake::posts_made(&fake.calls()), 1);
    let stalled = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(
        reason_of(&stalled, STALLED).as_deref(),
        Some("UnsupportedPlatform")
    );

    let action = run(&fake, &resource("a", false, with_intent), &memory).await;
    let calls = fake.calls();
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");
    assert!(!calls.contains(&Call::Lookup), "{calls:?}");
    assert_eq!(action, None);
    let again = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(
        reason_of(&again, STALLED).as_deref(),
        Some("UnsupportedPlatform")
    );
    assert_eq!(again.intent, None);
}

#[tokio::test]
async fn a_device_name_is_not_resolved_again_from_a_stale_cache_only_on_a_retry_request() {
    let (fake, memory) = (Fake::new(), Memory::default());
    let by_name = |retry: Option<&str>| {
        let mut di = resource_as_sent("ghost", false, None);
        di.spec.machine_id = None;
        di.spec.device_name = Some("ghost.contoso.local".into());
        if let Some(at) = retry {
            di.metadata
                .annotations
                .get_or_insert_default()
                .insert(crate::crd::RETRY_ANNOTATION.into(), at.into());
        }
        Cached::from(di)
    };
    let resolves = |calls: &[Call]| {
        calls
            .iter()
            .filter(|c| matches!(c, Call::Resolve(_)))
            .count()
    };
    run(&fake, &by_name(None), &memory).await;
    assert_eq!(resolves(&fake.calls()), 1);
    let stalled = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(
        reason_of(&stalled, STALLED).as_deref(),
        Some("MachineNotFound")
    );

    // A watch cache that does not show the stall yet: the same answer, no second read.
    let action = run(&fake, &by_name(None), &memory).await;
    assert_eq!(resolves(&fake.calls()), 0);
    assert_eq!(action, None);
    let again = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(
        reason_of(&again, STALLED).as_deref(),
        Some("MachineNotFound")
    );

    // A person asks again: MDE is asked again.
    let mut retried = by_name(Some("2026-12-01T11:00:00Z"));
    retried.status = Some(again);
    run(&fake, &retried, &memory).await;
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| matches!(c, Call::Resolve(_)))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_resource_whose_connection_is_refused_calls_nothing_and_goes_on_when_it_is_fixed() {
    let (fake, memory) = (Fake::new(), Memory::default());
    *fake.connection.lock().unwrap() = Some(ConnectionProblem {
        reason: Reason::AuthenticationFailed,
        message: "MdeConnection secops/tenant-a: AADSTS7000215".into(),
    });
    let action = run(&fake, &resource("a", false, None), &memory).await;
    let calls = fake.calls();
    assert!(
        calls
            .iter()
            .all(|c| !matches!(c, Call::Post(_) | Call::Lookup | Call::Hold)),
        "{calls:?}"
    );
    assert_eq!(action, Some(timing().credential_recheck));
    let stalled = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(
        reason_of(&stalled, STALLED).as_deref(),
        Some("AuthenticationFailed")
    );
    assert_eq!(
        stalled.next_attempt_at, None,
        "the connection, not a timer, ends the stall"
    );

    // The Secret was fixed: the connection wakes its resources, which go on at once.
    *fake.connection.lock().unwrap() = None;
    run(&fake, &fake.cached("a", false), &memory).await;
    assert_eq!(Fake::posts_made(&fake.calls()), 1);
}

#[tokio::test]
async fn a_resource_whose_set_holds_it_requests_nothing_and_goes_on_when_released() {
    let (fake, memory) = (Fake::new(), Memory::default());
    // Waiting for quota with its intent written, when its set is paused.
    let wait = fake.quota_waits_once();
    run(&fake, &resource("a", false, None), &memory).await;
    fake.calls();
    *fake.set_hold.lock().unwrap() = Some("its DeviceIsolationSet s is paused".into());
    fake.advance(wait);
    for _ in 0..3 {
        let action = run(&fake, &fake.cached("a", false), &memory).await;
        assert_eq!(action, Some(timing().transient_retry));
    }
    let calls = fake.calls();
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");
    assert!(
        !calls.contains(&Call::Hold),
        "not even a quota slot: {calls:?}"
    );
    let status = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(reason_of(&status, READY).as_deref(), Some("HeldBySet"));
    assert!(
        status.intent.is_some(),
        "the intent stays for when it goes on"
    );

    *fake.set_hold.lock().unwrap() = None;
    run(&fake, &fake.cached("a", false), &memory).await;
    assert_eq!(Fake::posts_made(&fake.calls()), 1);
}

#[tokio::test]
async fn an_ambiguous_post_is_looked_up_after_the_settle_time_and_never_sent_twice() {
    let (fake, memory) = (Fake::new(), Memory::default());
    fake.posts
        .lock()
        .unwrap()
        .push_back(CallFailure::Ambiguous("timed out".into()));
    let first = resource("a", false, None);
    let settle = timing().ambiguous_settle;
    assert_eq!(run(&fake, &first, &memory).await, Some(settle));
    let calls = fake.calls();
    assert_eq!(Fake::posts_made(&calls), 1);
    assert!(
        matches!(calls.first(), Some(Call::Hold))
            && matches!(calls.get(1), Some(Call::Write(Some(_), _))),
        "the intent is written before the POST leaves: {calls:?}"
    );

    // Woken early, from a watch cache that has not seen the last write yet: the process's own
    // memory keeps it from looking up (and proving absent) what may still be applied.
    let mut lagging = fake.cached("a", false);
    lagging.status.as_mut().unwrap().next_attempt_at = None;
    fake.advance(settle / 2);
    run(&fake, &lagging, &memory).await;
    let calls = fake.calls();
    assert!(!calls.contains(&Call::Lookup), "{calls:?}");
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");

    // After the settle time: a lookup finds the action by its marker and adopts it.
    fake.advance(settle);
    run(&fake, &fake.cached("a", false), &memory).await;
    let calls = fake.calls();
    assert_eq!(calls.first(), Some(&Call::Lookup), "{calls:?}");
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");
    let status = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(status.action.unwrap().id, "action-1");
    assert_eq!(status.intent, None);
}

#[tokio::test]
async fn after_a_restart_an_intent_is_looked_up_before_anything_is_sent() {
    // A previous process wrote the intent and crashed: whether its POST left is unknown.
    let (fake, before) = (Fake::new(), Memory::default());
    fake.holds
        .lock()
        .unwrap()
        .push_back(CallFailure::QuotaWait(std::time::Duration::from_secs(1)));
    run(&fake, &resource("a", false, None), &before).await;
    let Some(DeviceIsolationStatus {
        intent: Some(intent),
        ..
    }) = fake.written.lock().unwrap().clone()
    else {
        panic!("an intent was written")
    };
    fake.calls();

    // Case 1: it had been sent and has even finished (the view, loaded after the restart,
    // does not show it): the lookup finds it, nothing is sent, the device is released.
    let restarted = Memory::default();
    fake.mde.lock().unwrap().push(ActionFact {
        id: "done".into(),
        kind: ActionKind::Unisolate,
        status: ActionStatus::Succeeded,
        requestor: None,
        comment: Some(crate::audit::comment_with_marker(
            "INC-4711",
            &intent.marker,
        )),
        request_source: None,
        created_at: Some(t0()),
        updated_at: Some(t0()),
    });
    run(&fake, &fake.cached("a", false), &restarted).await;
    let calls = fake.calls();
    assert_eq!(calls.first(), Some(&Call::Lookup), "{calls:?}");
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");
    let status = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(reason_of(&status, READY).as_deref(), Some("Released"));
    assert!(calls.contains(&Call::Release), "settled: slots released");

    // Case 2: it never left: the lookup proves it absent and it is sent once, same marker.
    let fake = Fake::new();
    *fake.written.lock().unwrap() = Some(DeviceIsolationStatus {
        intent: Some(intent.clone()),
        ..Default::default()
    });
    run(&fake, &fake.cached("a", false), &Memory::default()).await;
    let calls = fake.calls();
    let lookup = calls.iter().position(|c| c == &Call::Lookup);
    let post = calls.iter().position(|c| matches!(c, Call::Post(_)));
    assert!(
        lookup.is_some() && post.is_some() && lookup < post,
        "{calls:?}"
    );
    assert_eq!(Fake::posts_made(&calls), 1);
    let Some(Call::Post(comment)) = post.map(|i| calls[i].clone()) else {
        unreachable!()
    };
    assert!(carries_marker(Some(&comment), &intent.marker));
}

#[tokio::test]
async fn a_deleted_partner_lets_a_conflicting_resource_proceed_and_a_deleted_resource_does_nothing()
{
    let (fake, memory) = (Fake::new(), Memory::default());
    fake.siblings.lock().unwrap().push(Sibling {
        key: "secops/b".into(),
        isolated: true,
    });
    assert_eq!(run(&fake, &resource("a", false, None), &memory).await, None);
    let status = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(reason_of(&status, STALLED).as_deref(), Some("Conflict"));
    assert_eq!(Fake::posts_made(&fake.calls()), 0);

    // b is deleted; the wake-up reconciles a, which no longer sees it.
    fake.siblings.lock().unwrap().clear();
    run(&fake, &fake.cached("a", false), &memory).await;
    assert_eq!(Fake::posts_made(&fake.calls()), 1);
    assert_eq!(memory.len(), 1);

    // a itself is deleted while a reconcile of it is queued: nothing is called or written,
    // and nothing is remembered of it.
    fake.present.store(false, Ordering::SeqCst);
    fake.siblings.lock().unwrap().clear();
    let last = fake.cached("a", false);
    assert_eq!(run(&fake, &last, &memory).await, None);
    assert!(fake.calls().is_empty());
    assert!(memory.is_empty());
}

#[tokio::test]
async fn before_the_view_is_loaded_nothing_is_requested_and_the_poller_is_asked_for_it() {
    let (fake, memory) = (Fake::new(), Memory::default());
    fake.synced.store(false, Ordering::SeqCst);
    let action = run(&fake, &resource("a", false, None), &memory).await;
    assert_eq!(action, Some(timing().view_not_synced_retry));
    let calls = fake.calls();
    assert!(calls.contains(&Call::Nudge), "{calls:?}");
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");
    let status = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(
        reason_of(&status, RECONCILING).as_deref(),
        Some("WaitingForMdeView")
    );
    assert_eq!(status.intent, None, "no intent before anything may be sent");
}

/// After a restart, a resource following an action it sent before needs the view to see the
/// action end: it asks the poller for the first load (instead of waiting out the poller's idle
/// interval). A converged resource asks for nothing, so a restart over them makes no call.
#[tokio::test]
async fn after_a_restart_following_an_action_asks_for_the_view_and_converged_ones_do_not() {
    // The action is sent and recorded by a first process.
    let (fake, memory) = (Fake::new(), Memory::default());
    run(&fake, &resource("a", false, None), &memory).await;
    let sent = fake.written.lock().unwrap().clone().unwrap();
    assert!(sent.action.is_some(), "{sent:?}");
    fake.calls();

    // A new process: the view is not loaded yet.
    let fake = Fake::new();
    fake.synced.store(false, Ordering::SeqCst);
    *fake.written.lock().unwrap() = Some(sent);
    let action = run(&fake, &fake.cached("a", false), &Memory::default()).await;
    assert_ne!(action, None);
    let calls = fake.calls();
    assert!(calls.contains(&Call::Nudge), "{calls:?}");
    assert_eq!(Fake::posts_made(&calls), 0, "{calls:?}");

    // The action ended before the restart and the resource is Ready: no nudge.
    let (fake, memory) = (Fake::new(), Memory::default());
    run(&fake, &resource("b", false, None), &memory).await;
    let mut done = fake.view.lock().unwrap().clone();
    for a in &mut done {
        a.status = ActionStatus::Succeeded;
    }
    *fake.view.lock().unwrap() = done;
    run(&fake, &fake.cached("b", false), &memory).await;
    let converged = fake.written.lock().unwrap().clone().unwrap();
    assert_eq!(reason_of(&converged, READY).as_deref(), Some("Released"));
    let fake = Fake::new();
    fake.synced.store(false, Ordering::SeqCst);
    *fake.written.lock().unwrap() = Some(converged);
    run(&fake, &fake.cached("b", false), &Memory::default()).await;
    let calls = fake.calls();
    assert!(!calls.contains(&Call::Nudge), "{calls:?}");
}

/// A wake-up recorder for [`Owners::forget`].
#[derive(Default)]
struct Woken(Mutex<Vec<ResourceRef>>);

impl Wake for Woken {
    fn wake(&self, resource: &ResourceRef) {
        self.0.lock().unwrap().push(resource.clone());
    }
}

#[test]
fn forgetting_a_deleted_resource_frees_every_owner_and_wakes_its_partners() {
    use crate::quota::{Api, Priority, QuotaConfig};
    let (memory, view, woken) = (Memory::default(), ActionView::new(), Woken::default());
    let gate = QuotaGate::new(QuotaConfig::from_budget(1.0, 1.0));
    let requeues = Requeues::default();
    let owners = Owners {
        memory: &memory,
        requeues: &requeues,
        connections: &[(&view, &gate)],
        waker: &woken,
    };
    let (a, b) = (
        ResourceRef::new("a").within("secops"),
        ResourceRef::new("b").within("secops"),
    );
    for r in [&a, &b] {
        memory.track(r);
        view.watch(&memory.shared(r), MACHINE);
    }
    gate.set_priority("secops/b", Priority::Low);
    let now = tokio::time::Instant::now();
    requeues.set(memory.shared(&b), std::time::Duration::from_secs(60), now);
    for _ in 0..100 {
        gate.reserve(Api::Unisolate, "secops/other", now);
    }
    assert!(matches!(
        gate.reserve(Api::Unisolate, "secops/b", now),
        crate::quota::Admission::WaitUntil(_)
    ));
    assert_eq!(
        owners.tracked(),
        [("memory", 2), ("requeue", 1), ("view", 2), ("quota", 1)]
    );

    owners.forget(&b, Some(MACHINE));
    assert_eq!(*woken.0.lock().unwrap(), vec![a.clone()]);
    assert_eq!(
        owners.tracked(),
        [("memory", 1), ("requeue", 0), ("view", 1), ("quota", 0)]
    );
    owners.forget(&a, Some(MACHINE));
    assert_eq!(
        owners.tracked(),
        [("memory", 0), ("requeue", 0), ("view", 0), ("quota", 0)]
    );
}

#[test]
fn a_relist_frees_what_it_no_longer_holds_in_its_own_scope_only() {
    let (memory, view, woken) = (Memory::default(), ActionView::new(), Woken::default());
    let gate = QuotaGate::new(crate::quota::QuotaConfig::from_budget(1.0, 1.0));
    let requeues = Requeues::default();
    let owners = Owners {
        memory: &memory,
        requeues: &requeues,
        connections: &[(&view, &gate)],
        waker: &woken,
    };
    let kept = ResourceRef::new("kept").within("secops");
    let gone = ResourceRef::new("gone").within("secops");
    let elsewhere = ResourceRef::new("x").within("other");
    let now = tokio::time::Instant::now();
    for r in [&kept, &gone, &elsewhere] {
        memory.track(r);
        view.watch(&memory.shared(r), MACHINE);
        requeues.set(memory.shared(r), std::time::Duration::from_secs(60), now);
    }
    owners.relisted(Some("secops"), &[kept.clone()].into());
    assert_eq!(
        owners.tracked(),
        [("memory", 2), ("requeue", 2), ("view", 2), ("quota", 0)]
    );
    assert!(!memory.forget(&gone), "freed by the relist");
    memory.track(&gone);
    owners.relisted(None, &[kept.clone()].into());
    assert_eq!(
        owners.tracked(),
        [("memory", 1), ("requeue", 1), ("view", 1), ("quota", 0)]
    );
    assert!(memory.forget(&kept));
}
