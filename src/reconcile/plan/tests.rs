//! The planner as a table: each case is a resource, its facts, and the expected phase, effect and
//! status. Cases are grouped by the rule of design.md §2 they cover.

use super::*;
use crate::conditions::{READY, RECONCILING};
use crate::crd::{DeviceIsolationSpec, TrackedAction};
use crate::mde::model::IsolationType;

const MACHINE: &str = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";

fn t(min: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::minutes(min)
}

fn action(id: &str, kind: ActionKind, status: ActionStatus, created: i64) -> ActionFact {
    ActionFact {
        id: id.into(),
        kind,
        status,
        requestor: Some("someone@contoso.com".into()),
        comment: None,
        request_source: None,
        created_at: Some(t(created)),
        updated_at: Some(t(created + 1)),
    }
}

/// One row of the table: everything the planner sees.
#[derive(Clone)]
struct Case {
    device_name: Option<&'static str>,
    isolated: bool,
    drift: DriftPolicy,
    generation: i64,
    comment: Option<&'static str>,
    retry: Option<&'static str>,
    requested_by: Option<&'static str>,
    approved_by: Option<&'static str>,
    require_approval: bool,
    release_at: Option<DateTime<Utc>>,
    status: DeviceIsolationStatus,
    siblings: Vec<Sibling>,
    facts: Facts,
    dry_run: bool,
    now: DateTime<Utc>,
}

impl Case {
    fn release() -> Self {
        Case {
            device_name: None,
            isolated: false,
            drift: DriftPolicy::Report,
            generation: 1,
            comment: Some("Released after re-image (INC-4711)"),
            retry: None,
            requested_by: None,
            approved_by: None,
            require_approval: false,
            release_at: None,
            status: DeviceIsolationStatus::default(),
            siblings: vec![],
            facts: Facts {
                synced: true,
                ..Facts::default()
            },
            dry_run: false,
            now: t(10),
        }
    }

    fn isolate() -> Self {
        Case {
            isolated: true,
            ..Case::release()
        }
    }

    fn plan(&self) -> Plan {
        let spec = DeviceIsolationSpec {
            machine_id: match self.device_name {
                Some(_) => None,
                None => Some(MACHINE.into()),
            },
            device_name: self.device_name.map(String::from),
            isolated: self.isolated,
            isolation_type: IsolationType::Selective,
            drift_policy: self.drift,
            release_at: self.release_at,
            require_approval: self.require_approval,
            connection_ref: None,
        };
        let timing = Timing::default();
        plan(&Input {
            namespace: "secops",
            name: "laptop-042",
            uid: "1a2b3c4d-0000",
            generation: self.generation,
            spec: &spec,
            comment: self.comment,
            retry_request: self.retry,
            requested_by: self.requested_by,
            approved_by: self.approved_by,
            status: &self.status,
            siblings: &self.siblings,
            facts: &self.facts,
            now: self.now,
            dry_run: self.dry_run,
            timing: &timing,
        })
    }

    /// Plans, then feeds the plan's status back as the persisted one (what the controller does).
    fn settle(mut self) -> (Self, Plan) {
        let plan = self.plan();
        self.status = plan.status.clone();
        self.facts.post = None;
        self.facts.lookup = Lookup::NotDone;
        self.facts.resolution = Resolution::NotDone;
        (self, plan)
    }
}

fn reason(plan: &Plan, type_: &str) -> Option<String> {
    conditions::find(&plan.status.conditions, type_).map(|c| c.reason.to_string())
}

fn ready_reason(plan: &Plan) -> String {
    let ready = conditions::find(&plan.status.conditions, READY).expect("Ready is always set");
    format!("{}:{}", ready.status, ready.reason)
}

fn is_post(plan: &Plan, kind: ActionKind) -> bool {
    matches!(&plan.effect, Effect::Post { kind: k, .. } if *k == kind)
}

fn tracked(a: &ActionFact) -> TrackedAction {
    a.tracked()
}

fn converged_status(a: &ActionFact, generation: i64) -> DeviceIsolationStatus {
    let mut case = Case::release();
    case.generation = generation;
    case.status.action = Some(tracked(a));
    case.status.observed_generation = Some(generation);
    case.facts.actions = vec![];
    case.plan().status
}

// ---- Rule 1: converged resources cost nothing -------------------------------------------------

#[test]
fn converged_resource_plans_no_call_and_an_identical_status() {
    let done = action("a1", ActionKind::Unisolate, ActionStatus::Succeeded, 0);
    let mut case = Case::release();
    case.status = converged_status(&done, 1);
    // Even with the shared view unloaded (a fresh restart), nothing is requested.
    case.facts.synced = false;
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(
        plan.status, case.status,
        "a no-op reconcile must not change status"
    );
    assert_eq!(plan.requeue, None);
    assert!(plan.events.is_empty());
    assert_eq!(ready_reason(&plan), "True:Released");
    assert_eq!(plan.status.isolated, Some(false));
}

// ---- Rule 2: the comment is required -------------------------------------------------------

#[test]
fn missing_comment_stalls_without_a_call() {
    let mut case = Case::release();
    case.comment = None;
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(reason(&plan, STALLED).as_deref(), Some("CommentMissing"));
    assert_eq!(ready_reason(&plan), "False:CommentMissing");
    assert!(plan.status.intent.is_none());
    assert_eq!(
        plan.events.len(),
        1,
        "the transition into Stalled is an event"
    );
}

// ---- Rule 5: a new action ------------------------------------------------------------------

#[test]
fn new_release_writes_an_intent_and_posts_an_unisolate_with_the_marker() {
    let plan = Case::release().plan();
    let Effect::Post {
        machine_id,
        kind,
        comment,
        ..
    } = &plan.effect
    else {
        panic!("expected a POST, got {:?}", plan.effect)
    };
    assert_eq!(
        (machine_id.as_str(), *kind),
        (MACHINE, ActionKind::Unisolate)
    );
    let intent = plan
        .status
        .intent
        .as_ref()
        .expect("intent recorded before the POST");
    assert_eq!(intent.generation, 1);
    assert_eq!(intent.attempt, 1);
    assert!(comment.starts_with("Released after re-image (INC-4711) "));
    assert!(comment.ends_with(&intent.marker));
    assert_eq!(
        reason(&plan, RECONCILING).as_deref(),
        Some("ActionRequested")
    );
}

#[test]
fn isolate_passes_the_isolation_type_through() {
    let plan = Case::isolate().plan();
    assert!(matches!(
        plan.effect,
        Effect::Post {
            kind: ActionKind::Isolate,
            isolation_type: IsolationType::Selective,
            ..
        }
    ));
}

#[test]
fn nothing_is_requested_before_the_shared_view_is_loaded() {
    let mut case = Case::release();
    case.facts.synced = false;
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(
        reason(&plan, RECONCILING).as_deref(),
        Some("WaitingForMdeView")
    );
    assert!(plan.requeue.is_some());
    // Not even after its own lookup found nothing: the first load also brings MDE's record of
    // the calls a previous process made, which the quota must know before any request.
    case.facts.lookup = Lookup::Done;
    assert_eq!(case.plan().effect, Effect::None);
}

#[test]
fn open_action_of_the_same_type_is_adopted_without_a_post() {
    let mut case = Case::release();
    let open = action("theirs", ActionKind::Unisolate, ActionStatus::Pending, 5);
    case.facts.actions = vec![open.clone()];
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(plan.status.action.as_ref().unwrap().id, "theirs");
    assert_eq!(reason(&plan, RECONCILING).as_deref(), Some("ActionPending"));
    assert_eq!(plan.events[0].reason, "ActionAdopted");
}

#[test]
fn open_action_of_the_opposite_type_is_waited_for() {
    let mut case = Case::release();
    case.facts.actions = vec![action(
        "iso",
        ActionKind::Isolate,
        ActionStatus::InProgress,
        5,
    )];
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert!(plan.status.action.is_none());
    assert_eq!(
        reason(&plan, RECONCILING).as_deref(),
        Some("WaitingForOpenAction")
    );
    assert!(plan.requeue.is_some());
}

#[test]
fn device_already_in_the_desired_state_is_ready_without_a_post() {
    let mut case = Case::release();
    case.facts.actions = vec![
        action("old-iso", ActionKind::Isolate, ActionStatus::Succeeded, 0),
        action("rel", ActionKind::Unisolate, ActionStatus::Succeeded, 3),
    ];
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(ready_reason(&plan), "True:Released");
    assert_eq!(plan.status.action.as_ref().unwrap().id, "rel");
}

#[test]
fn latest_finished_action_decides_the_device_state_not_the_latest_created() {
    // Unisolate created first but finished last: the device is released.
    let mut case = Case::isolate();
    let mut rel = action("rel", ActionKind::Unisolate, ActionStatus::Succeeded, 0);
    rel.updated_at = Some(t(9));
    let iso = action("iso", ActionKind::Isolate, ActionStatus::Succeeded, 2);
    case.facts.actions = vec![rel, iso];
    assert!(is_post(&case.plan(), ActionKind::Isolate));
}

#[test]
fn dry_run_reports_the_call_and_makes_none() {
    let mut case = Case::release();
    case.dry_run = true;
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert!(plan.status.intent.is_none());
    let cond = conditions::find(&plan.status.conditions, RECONCILING).unwrap();
    assert_eq!(cond.reason, "DryRun");
    assert!(
        cond.message
            .contains(&format!("/api/machines/{MACHINE}/unisolate"))
    );
}

// ---- Rule 5: POST outcomes -----------------------------------------------------------------

fn posted() -> Case {
    let (case, plan) = Case::release().settle();
    assert!(is_post(&plan, ActionKind::Unisolate));
    case
}

fn our_action(case: &Case, status: ActionStatus) -> ActionFact {
    let mut a = action("ours", ActionKind::Unisolate, status, 10);
    a.comment = Some(comment_with_marker(
        "x",
        &case.status.intent.as_ref().unwrap().marker,
    ));
    a
}

#[test]
fn created_action_is_recorded_and_the_intent_cleared() {
    let mut case = posted();
    let a = our_action(&case, ActionStatus::Pending);
    case.facts.post = Some(PostOutcome::Action(a));
    let plan = case.plan();
    assert_eq!(plan.status.action.as_ref().unwrap().id, "ours");
    assert!(plan.status.intent.is_none());
    assert_eq!(plan.events[0].reason, "ActionRequested");
    assert_eq!(reason(&plan, RECONCILING).as_deref(), Some("ActionPending"));
}

#[test]
fn the_comment_and_the_event_name_who_asked_and_whether_the_api_server_vouches_for_it() {
    for (requested_by, verified, want) in [
        (Some("user-a"), true, Some("requested-by=user-a ")),
        (
            Some("user-a"),
            false,
            Some("requested-by=user-a (unverified) "),
        ),
        (None, true, None),
    ] {
        let mut case = Case::release();
        case.requested_by = requested_by;
        case.facts.requester_verified = verified;
        let (mut case, plan) = case.settle();
        let Effect::Post { comment, .. } = &plan.effect else {
            panic!("expected a POST, got {:?}", plan.effect)
        };
        let marker = &case.status.intent.as_ref().unwrap().marker;
        match want {
            Some(tag) => assert_eq!(
                comment,
                &format!("Released after re-image (INC-4711) {tag}{marker}")
            ),
            None => assert!(!comment.contains("requested-by"), "{comment}"),
        }
        let a = our_action(&case, ActionStatus::Pending);
        case.facts.post = Some(PostOutcome::Action(a));
        let note = &case.plan().events[0].note;
        match want {
            Some(tag) => assert!(note.ends_with(&format!("; {}", tag.trim_end())), "{note}"),
            None => assert!(!note.contains("requested-by"), "{note}"),
        }
    }
}

#[test]
fn return_existing_answer_of_the_opposite_type_is_not_recorded() {
    let mut case = posted();
    case.facts.post = Some(PostOutcome::Action(action(
        "iso",
        ActionKind::Isolate,
        ActionStatus::Pending,
        1,
    )));
    let plan = case.plan();
    assert!(plan.status.action.is_none());
    assert_eq!(
        reason(&plan, RECONCILING).as_deref(),
        Some("WaitingForOpenAction")
    );
}

#[test]
fn already_in_progress_looks_the_machine_up_then_adopts() {
    let mut case = posted();
    case.facts.post = Some(PostOutcome::Failed(CallFailure::AlreadyInProgress));
    let (mut case, plan) = case.settle();
    assert!(matches!(plan.effect, Effect::Lookup { .. }));
    assert!(
        case.status.intent.is_none(),
        "a rejected POST created nothing"
    );
    case.facts.lookup = Lookup::Done;
    case.facts.actions = vec![action(
        "open",
        ActionKind::Unisolate,
        ActionStatus::Pending,
        9,
    )];
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(plan.status.action.as_ref().unwrap().id, "open");
}

#[test]
fn error_classes_map_to_stalled_reasons_and_clear_the_intent() {
    let rows = [
        (
            CallFailure::MachineNotFound("404".into()),
            "MachineNotFound",
        ),
        (
            CallFailure::Forbidden("Machine.Isolate".into()),
            "Forbidden",
        ),
        (
            CallFailure::AuthenticationFailed("401".into()),
            "AuthenticationFailed",
        ),
        (
            CallFailure::UnsupportedPlatform("os".into()),
            "UnsupportedPlatform",
        ),
        (CallFailure::InvalidRequest("400".into()), "InvalidRequest"),
    ];
    for (failure, expected) in rows {
        let mut case = posted();
        case.facts.post = Some(PostOutcome::Failed(failure.clone()));
        let plan = case.plan();
        assert_eq!(
            reason(&plan, STALLED).as_deref(),
            Some(expected),
            "{failure:?}"
        );
        assert_eq!(plan.effect, Effect::None);
        // Credentials and permissions are fixed outside the resource: looked at again later.
        let recheck = matches!(expected, "Forbidden" | "AuthenticationFailed");
        let want = recheck.then_some(Timing::default().credential_recheck);
        assert_eq!(plan.requeue, want, "{failure:?}");
        assert!(plan.status.intent.is_none());
    }
}

#[test]
fn sticky_stall_makes_no_call_on_later_reconciles() {
    let mut case = posted();
    case.facts.post = Some(PostOutcome::Failed(CallFailure::MachineNotFound(
        "x".into(),
    )));
    let (case, first) = case.settle();
    assert_eq!(first.events.len(), 1);
    let again = case.plan();
    assert_eq!(again.effect, Effect::None);
    assert_eq!(again.status, case.status);
    assert!(again.events.is_empty(), "no event without a transition");
}

#[test]
fn retry_request_clears_a_sticky_stall_once() {
    let mut case = posted();
    case.facts.post = Some(PostOutcome::Failed(CallFailure::UnsupportedPlatform(
        "x".into(),
    )));
    let (mut case, _) = case.settle();
    case.retry = Some("2026-11-28T11:00:00Z");
    let (case, plan) = case.settle();
    assert!(is_post(&plan, ActionKind::Unisolate));
    assert_eq!(
        plan.status.intent.as_ref().unwrap().attempt,
        2,
        "a new marker"
    );
    assert_eq!(
        case.status.last_handled_retry.as_deref(),
        Some("2026-11-28T11:00:00Z")
    );
}

#[test]
fn quota_wait_and_rate_limit_keep_the_intent_and_requeue_for_the_slot() {
    for (failure, expected) in [
        (
            CallFailure::QuotaWait(Duration::from_secs(42)),
            "WaitingForQuota",
        ),
        (
            CallFailure::RateLimited(Duration::from_secs(42)),
            "RateLimited",
        ),
    ] {
        let mut case = posted();
        let marker = case.status.intent.clone().unwrap().marker;
        case.facts.post = Some(PostOutcome::Failed(failure));
        let (mut case, plan) = case.settle();
        assert_eq!(reason(&plan, RECONCILING).as_deref(), Some(expected));
        assert_eq!(plan.requeue, Some(Duration::from_secs(42)));
        // Back at the slot, knowing the POST was never sent: same marker, no lookup.
        case.facts.intent_unsent = true;
        let plan = case.plan();
        let Effect::Post { comment, .. } = &plan.effect else {
            panic!("expected a POST, got {:?}", plan.effect)
        };
        assert!(comment.ends_with(&marker));
    }
}

#[test]
fn ambiguous_outcome_is_looked_up_by_marker_before_any_new_post() {
    let mut case = posted();
    case.facts.post = Some(PostOutcome::Failed(CallFailure::Ambiguous("reset".into())));
    let (mut case, plan) = case.settle();
    // Not at once: a request the client gave up on may still be applied.
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(plan.requeue, Some(Timing::default().ambiguous_settle));
    assert_eq!(
        reason(&plan, RECONCILING).as_deref(),
        Some("OutcomeUnknown")
    );
    assert!(case.status.intent.is_some());
    let early = case.plan();
    assert_eq!(
        early.effect,
        Effect::None,
        "no lookup before the settle time"
    );
    case.now += chrono::Duration::from_std(Timing::default().ambiguous_settle).unwrap();
    let plan = case.plan();
    assert!(matches!(plan.effect, Effect::Lookup { .. }));

    // The lookup finds the action carrying our marker: adopt it, no second POST.
    let found = our_action(&case, ActionStatus::Pending);
    let mut found_case = case.clone();
    found_case.facts.lookup = Lookup::Done;
    found_case.facts.actions = vec![found];
    let plan = found_case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(plan.status.action.as_ref().unwrap().id, "ours");
    assert!(plan.status.next_attempt_at.is_none());

    // The lookup proves it absent: POST again under the same marker.
    let marker = case.status.intent.clone().unwrap().marker;
    case.facts.lookup = Lookup::Done;
    let plan = case.plan();
    let Effect::Post { comment, .. } = &plan.effect else {
        panic!("expected a POST, got {:?}", plan.effect)
    };
    assert!(comment.ends_with(&marker));
}

#[test]
fn restart_with_an_intent_and_no_action_looks_up_first() {
    // Crash between POST and status write: the intent is persisted, the process memory is gone.
    let case = posted();
    let plan = case.plan();
    assert!(matches!(plan.effect, Effect::Lookup { .. }));
}

#[test]
fn failed_lookup_is_reported_without_a_post() {
    let mut case = posted();
    case.facts.lookup = Lookup::Failed(CallFailure::Forbidden("Machine.Read.All".into()));
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(reason(&plan, STALLED).as_deref(), Some("Forbidden"));
}

// ---- Rule 4: a tracked action ends ---------------------------------------------------------

fn tracking(status: ActionStatus) -> Case {
    let mut case = posted();
    let pending = our_action(&case, ActionStatus::Pending);
    case.facts.post = Some(PostOutcome::Action(pending.clone()));
    let (mut case, _) = case.settle();
    let mut a = pending;
    a.status = status;
    a.updated_at = Some(t(12));
    case.facts.actions = vec![a];
    case.now = t(12);
    case
}

#[test]
fn pending_action_waits_for_the_poller() {
    let plan = tracking(ActionStatus::InProgress).plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(reason(&plan, RECONCILING).as_deref(), Some("ActionPending"));
    assert_eq!(plan.status.action.as_ref().unwrap().status, "InProgress");
    assert_eq!(plan.requeue, Some(Timing::default().open_action_recheck));
}

#[test]
fn succeeded_action_makes_the_resource_ready_with_one_event() {
    let (case, plan) = tracking(ActionStatus::Succeeded).settle();
    assert_eq!(ready_reason(&plan), "True:Released");
    assert_eq!(plan.status.isolated, Some(false));
    assert_eq!(plan.events.len(), 1);
    assert_eq!(plan.events[0].reason, "Released");
    let again = case.plan();
    assert_eq!(again.status, case.status);
    assert!(again.events.is_empty());
}

#[test]
fn failed_action_schedules_a_persisted_backoff_then_retries_under_a_new_marker() {
    let (mut case, plan) = tracking(ActionStatus::Failed).settle();
    assert_eq!(plan.status.failed_attempts, 1);
    assert_eq!(
        reason(&plan, RECONCILING).as_deref(),
        Some("RetryScheduled")
    );
    assert_eq!(plan.requeue, Some(Duration::from_secs(60)));
    assert_eq!(plan.events[0].reason, "ActionFailed");
    // Reconciling again before the due time counts nothing twice and calls nothing.
    let again = case.plan();
    assert_eq!(again.status.failed_attempts, 1);
    assert_eq!(again.effect, Effect::None);
    // At the due time: a new request, attempt 2.
    case.now = t(14);
    let plan = case.plan();
    assert!(is_post(&plan, ActionKind::Unisolate));
    assert_eq!(plan.status.intent.as_ref().unwrap().attempt, 2);
}

#[test]
fn failures_seen_close_together_retry_at_the_same_instant() {
    // Backoff 60 s, aligned up to a 30 s grid: failures seen 5 s and 20 s past a minute both
    // retry 90 s past it, so one poll follows both new actions.
    let due_after = |seen: chrono::Duration| {
        let mut case = tracking(ActionStatus::Failed);
        case.now = t(12) + seen;
        let plan = case.plan();
        assert_eq!(plan.status.failed_attempts, 1);
        plan.status.next_attempt_at.unwrap()
    };
    let early = due_after(chrono::Duration::seconds(5));
    let late = due_after(chrono::Duration::seconds(20));
    assert_eq!(early, late);
    assert_eq!(early, rfc3339(t(13) + chrono::Duration::seconds(30)));
    // Never earlier than the backoff, never more than half of it later.
    assert_eq!(due_after(chrono::Duration::seconds(31)), rfc3339(t(14)));
}

#[test]
fn align_up_rounds_to_the_grid_and_keeps_times_on_it() {
    let step = Duration::from_secs(30);
    assert_eq!(align_up(t(1), step), t(1));
    assert_eq!(
        align_up(t(1) + chrono::Duration::milliseconds(1), step),
        t(1) + chrono::Duration::seconds(30)
    );
    assert_eq!(
        align_up(t(1) + chrono::Duration::seconds(7), Duration::ZERO),
        t(1) + chrono::Duration::seconds(7)
    );
}

#[test]
fn timeouts_up_to_the_limit_stall_with_retries_exhausted() {
    let mut case = tracking(ActionStatus::TimeOut);
    case.status.failed_attempts = Timing::default().max_attempts - 1;
    let plan = case.plan();
    assert_eq!(reason(&plan, STALLED).as_deref(), Some("RetriesExhausted"));
    assert_eq!(plan.effect, Effect::None);
}

#[test]
fn cancelled_action_stalls_and_is_not_fought() {
    let (case, plan) = tracking(ActionStatus::Cancelled).settle();
    assert_eq!(reason(&plan, STALLED).as_deref(), Some("ActionCancelled"));
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(case.plan().effect, Effect::None);
}

// ---- Rule 6: conflicts ---------------------------------------------------------------------

#[test]
fn conflicting_resources_stall_naming_each_other_without_calls() {
    let mut case = Case::release();
    case.siblings = vec![Sibling {
        key: "other/laptop-042-iso".into(),
        isolated: true,
    }];
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    let stall = conditions::find(&plan.status.conditions, STALLED).unwrap();
    assert_eq!(stall.reason, "Conflict");
    assert!(stall.message.contains("other/laptop-042-iso"));
}

#[test]
fn sibling_with_the_same_desired_state_is_no_conflict() {
    let mut case = Case::release();
    case.siblings = vec![Sibling {
        key: "other/same".into(),
        isolated: false,
    }];
    assert!(is_post(&case.plan(), ActionKind::Unisolate));
}

// ---- Rule 7: drift -------------------------------------------------------------------------

fn drifted(policy: DriftPolicy) -> Case {
    let ours = action("ours", ActionKind::Unisolate, ActionStatus::Succeeded, 0);
    let mut case = Case::release();
    case.drift = policy;
    case.status = converged_status(&ours, 1);
    let mut foreign = action("portal", ActionKind::Isolate, ActionStatus::Succeeded, 5);
    foreign.requestor = Some("analyst@contoso.com".into());
    case.facts.actions = vec![ours, foreign];
    case
}

#[test]
fn drift_is_reported_once_and_not_undone_by_default() {
    let (case, plan) = drifted(DriftPolicy::Report).settle();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(reason(&plan, STALLED).as_deref(), Some("Drifted"));
    assert_eq!(plan.status.isolated, Some(true));
    assert_eq!(plan.events.len(), 1);
    assert!(plan.events[0].warning && plan.events[0].reason == "Drifted");
    assert!(plan.events[0].note.contains("analyst@contoso.com"));
    let again = case.plan();
    assert!(again.events.is_empty());
    assert_eq!(again.status, case.status);
}

#[test]
fn drift_policy_correct_requests_a_new_action() {
    let plan = drifted(DriftPolicy::Correct).plan();
    assert!(is_post(&plan, ActionKind::Unisolate));
}

// ---- Generations ---------------------------------------------------------------------------

#[test]
fn a_new_generation_with_the_opposite_state_requests_a_new_action() {
    let done = action("a1", ActionKind::Unisolate, ActionStatus::Succeeded, 0);
    let mut case = Case::isolate();
    case.generation = 2;
    case.status = converged_status(&done, 1);
    case.facts.actions = vec![done];
    let plan = case.plan();
    assert!(is_post(&plan, ActionKind::Isolate));
    assert_eq!(plan.status.observed_generation, Some(2));
    assert_eq!(plan.status.intent.as_ref().unwrap().generation, 2);
}

#[test]
fn a_new_generation_with_the_same_state_reuses_the_device_state_without_a_post() {
    let done = action("a1", ActionKind::Unisolate, ActionStatus::Succeeded, 0);
    let mut case = Case::release();
    case.generation = 2;
    case.status = converged_status(&done, 1);
    case.facts.actions = vec![done];
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(ready_reason(&plan), "True:Released");
    let ready = conditions::find(&plan.status.conditions, READY).unwrap();
    assert_eq!(ready.observed_generation, Some(2));
}

// ---- Device names (spec.deviceName) --------------------------------------------------------

fn by_name() -> Case {
    Case {
        device_name: Some("laptop-042.contoso.local"),
        ..Case::release()
    }
}

fn candidate(id: &str) -> DeviceCandidate {
    DeviceCandidate {
        id: id.into(),
        health_status: Some("Active".into()),
    }
}

#[test]
fn a_device_name_is_resolved_before_anything_else() {
    let plan = by_name().plan();
    assert_eq!(
        plan.effect,
        Effect::ResolveDevice {
            device_name: "laptop-042.contoso.local".into()
        }
    );
    assert_eq!(
        reason(&plan, RECONCILING).as_deref(),
        Some("ResolvingDevice")
    );
}

#[test]
fn one_match_is_recorded_in_status_and_reused_without_another_lookup() {
    let mut case = by_name();
    case.facts.resolution = Resolution::Found(vec![candidate(MACHINE)]);
    let (case, plan) = case.settle();
    assert_eq!(plan.status.machine_id.as_deref(), Some(MACHINE));
    assert!(matches!(&plan.effect, Effect::Post { machine_id, .. } if machine_id == MACHINE));
    // Next pass: the id comes from status; no ResolveDevice.
    let again = case.plan();
    assert!(!matches!(again.effect, Effect::ResolveDevice { .. }));
}

#[test]
fn several_matches_stall_as_ambiguous_listing_the_candidates() {
    let mut case = by_name();
    case.facts.resolution = Resolution::Found(vec![candidate("aaa1"), candidate("bbb2")]);
    let (case, plan) = case.settle();
    let stall = conditions::find(&plan.status.conditions, STALLED).unwrap();
    assert_eq!(stall.reason, "AmbiguousDevice");
    assert!(stall.message.contains("aaa1") && stall.message.contains("bbb2"));
    assert!(plan.status.machine_id.is_none());
    assert_eq!(case.plan().effect, Effect::None, "sticky: no second lookup");
}

#[test]
fn no_match_stalls_as_machine_not_found() {
    let mut case = by_name();
    case.facts.resolution = Resolution::Found(vec![]);
    let plan = case.plan();
    assert_eq!(reason(&plan, STALLED).as_deref(), Some("MachineNotFound"));
    assert_eq!(plan.effect, Effect::None);
}

#[test]
fn a_machine_id_is_recorded_in_status_too() {
    let plan = Case::release().plan();
    assert_eq!(plan.status.machine_id.as_deref(), Some(MACHINE));
}

// ---- Credentials and permissions -----------------------------------------------------------

#[test]
fn forbidden_is_not_retried_on_the_next_event_but_after_the_recheck_time() {
    let mut case = posted();
    case.facts.post = Some(PostOutcome::Failed(CallFailure::Forbidden(
        "missing Machine.Isolate".into(),
    )));
    let (mut case, first) = case.settle();
    assert_eq!(first.events.len(), 1);
    // Our own status write wakes the resource at once: no second POST, no new event.
    let again = case.plan();
    assert_eq!(again.effect, Effect::None);
    assert_eq!(reason(&again, STALLED).as_deref(), Some("Forbidden"));
    assert!(again.events.is_empty());
    assert_eq!(again.status, case.status);
    // After the recheck time (the role may have been granted): one new request.
    case.now += chrono::Duration::from_std(Timing::default().credential_recheck).unwrap();
    assert!(is_post(&case.plan(), ActionKind::Unisolate));
}

#[test]
fn a_refused_credential_while_loading_the_view_stalls_without_a_call() {
    let mut case = Case::release();
    case.facts.synced = false;
    case.facts.view_failure = Some(CallFailure::AuthenticationFailed(
        "token endpoint answered 401 invalid_client".into(),
    ));
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    let stall = conditions::find(&plan.status.conditions, STALLED).unwrap();
    assert_eq!(stall.reason, "AuthenticationFailed");
    assert!(stall.message.contains("invalid_client"));
    assert!(
        plan.requeue.is_some(),
        "recovers by itself once the view loads"
    );
    // Once the view loads, the same resource requests its action.
    let (mut case, _) = case.settle();
    case.facts.synced = true;
    case.facts.view_failure = None;
    assert!(is_post(&case.plan(), ActionKind::Unisolate));
}

#[test]
fn a_transient_view_failure_is_named_while_waiting() {
    let mut case = Case::release();
    case.facts.synced = false;
    case.facts.view_failure = Some(CallFailure::Transient("connection refused".into()));
    let plan = case.plan();
    let cond = conditions::find(&plan.status.conditions, RECONCILING).unwrap();
    assert_eq!(cond.reason, WAITING_FOR_VIEW);
    assert!(
        cond.message.contains("connection refused"),
        "{}",
        cond.message
    );
}

// ---- releaseAt: an isolation that ends on time ------------------------------------------------

/// Feeds back what MDE answered to the POST the plan asked for (the action, succeeded at once).
fn answered(mut case: Case, plan: &Plan, id: &str) -> Case {
    let Effect::Post { kind, comment, .. } = &plan.effect else {
        panic!("expected a POST, got {:?}", plan.effect)
    };
    let mut a = action(id, *kind, ActionStatus::Succeeded, 0);
    a.created_at = Some(case.now);
    a.updated_at = Some(case.now);
    a.comment = Some(comment.clone());
    case.facts.post = Some(PostOutcome::Action(a.clone()));
    case.facts.actions.push(a);
    case
}

#[test]
fn an_isolation_ends_at_release_at_with_one_unisolate_and_says_why() {
    let mut case = Case::isolate();
    case.release_at = Some(t(70));
    let (case, plan) = case.settle();
    assert!(is_post(&plan, ActionKind::Isolate));
    let (mut case, plan) = answered(case, &plan, "iso").settle();
    assert_eq!(ready_reason(&plan), "True:Isolated");
    assert_eq!(
        plan.requeue,
        Some(Duration::from_secs(60 * 60)),
        "back at releaseAt"
    );

    // Not a minute early.
    case.now = t(69);
    let (mut case, plan) = case.settle();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(plan.requeue, Some(Duration::from_secs(60)));

    case.now = t(70);
    let (case, plan) = case.settle();
    let Effect::Post { kind, comment, .. } = &plan.effect else {
        panic!("expected the release, got {:?}", plan.effect)
    };
    assert_eq!(*kind, ActionKind::Unisolate);
    assert!(
        comment.contains("(released on schedule: releaseAt 2026-11-28T11:10:00Z)"),
        "{comment}"
    );
    let (case, plan) = answered(case, &plan, "rel").settle();
    assert_eq!(ready_reason(&plan), "True:ReleasedOnSchedule");
    assert_eq!(plan.requeue, None);
    assert_eq!(plan.status.isolated, Some(false));
    // Settled: later passes request nothing more.
    let (_, plan) = case.settle();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(ready_reason(&plan), "True:ReleasedOnSchedule");
}

#[test]
fn moving_release_at_later_before_it_passes_postpones_the_release() {
    let mut case = Case::isolate();
    case.release_at = Some(t(70));
    let (case, plan) = case.settle();
    let (mut case, _) = answered(case, &plan, "iso").settle();
    // Edited at t(65): a new generation, ending at t(130) instead.
    case.generation = 2;
    case.release_at = Some(t(130));
    case.now = t(65);
    let (mut case, plan) = case.settle();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(ready_reason(&plan), "True:Isolated");
    assert_eq!(plan.requeue, Some(Duration::from_secs(65 * 60)));
    case.now = t(70);
    let (_, plan) = case.settle();
    assert_eq!(plan.effect, Effect::None, "not at the old instant");
}

// ---- requireApproval: a second person before the request ---------------------------------------

#[test]
fn a_resource_that_requires_approval_requests_nothing_until_approved_and_names_both() {
    let mut case = Case::release();
    case.require_approval = true;
    case.requested_by = Some("user-a");
    case.facts.requester_verified = true;
    let plan = case.plan();
    assert_eq!(plan.effect, Effect::None);
    assert_eq!(plan.requeue, None, "the approval annotation wakes it");
    assert!(plan.status.intent.is_none());
    let waiting = conditions::find(&plan.status.conditions, RECONCILING).unwrap();
    assert_eq!(waiting.reason, "AwaitingApproval");
    assert!(
        waiting
            .message
            .contains("isolation.mde.dev/approved-generation: \"1\""),
        "{}",
        waiting.message
    );

    case.approved_by = Some("user-b");
    let plan = case.plan();
    let Effect::Post { comment, .. } = &plan.effect else {
        panic!("expected a POST, got {:?}", plan.effect)
    };
    assert!(
        comment.contains("requested-by=user-a approved-by=user-b ["),
        "{comment}"
    );
}
