//! The reconcile decision as a pure function: (resource, what the operator knows of MDE, the
//! outcome of the last call) → (the status to hold, the one effect to perform, when to look again).
//!
//! No I/O happens here. The driver ([`super`]) runs a short loop: plan → perform the effect (a
//! lookup or a POST) → feed the outcome back into [`Facts`] → plan again, until the plan asks for
//! no effect. Every rule of design.md §2 is a branch below and a row in the table tests.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::vocab::*;
use crate::audit::{AuditTag, carries_marker, comment_with_marker};
use crate::conditions::{self, Condition, Phase, STALLED};
use crate::crd::{DeviceIsolationStatus, DriftPolicy, Intent};
use crate::mde::model::ActionStatus;
use crate::quota::Priority;

/// `t` rounded up to the next multiple of `step` since the Unix epoch (`t` itself when `step` is
/// zero or `t` lies on the grid). Retry times are aligned this way so that resources whose actions
/// failed at about the same time retry at the same instant, and one poll sees all their new
/// actions: the delay grows by at most `step` (half the backoff), and the batch poller's reads do
/// not multiply with the number of failing devices.
pub fn align_up(t: DateTime<Utc>, step: Duration) -> DateTime<Utc> {
    let step_ms = step.as_millis() as i64;
    if step_ms <= 0 {
        return t;
    }
    let ms = t.timestamp_millis();
    let aligned = ms.div_euclid(step_ms) * step_ms;
    let up = if aligned == ms { ms } else { aligned + step_ms };
    DateTime::from_timestamp_millis(up).unwrap_or(t)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Builds plans; holds the evolving status while the rules run.
struct Planner<'a> {
    input: &'a Input<'a>,
    status: DeviceIsolationStatus,
    events: Vec<EventNote>,
    desired: ActionKind,
    /// The machine acted on, once known (spec.machineId, or resolved from spec.deviceName).
    machine: Option<String>,
}

/// Decides the next step for one resource. See the module docs.
pub fn plan(input: &Input<'_>) -> Plan {
    let mut p = Planner {
        input,
        status: input.status.clone(),
        events: Vec::new(),
        desired: ActionKind::for_desired(input.spec.isolated),
        machine: input
            .spec
            .machine_id
            .clone()
            .or_else(|| input.status.machine_id.clone()),
    };
    p.start_generation();
    let (phase, effect, requeue) = p.decide();
    p.finish(phase, effect, requeue)
}

type Decision = (Phase, Effect, Option<Duration>);

impl<'a> Planner<'a> {
    fn facts(&self) -> &'a Facts {
        self.input.facts
    }

    fn generation(&self) -> i64 {
        self.input.generation
    }

    /// Drops what belonged to an older generation: its attempts, its intent, and its action unless
    /// that action is of the desired type and still open (then it serves the new generation too).
    /// A finished action is dropped: whether the device is already in the desired state is then
    /// decided from MDE's history, which also sees actions of generations in between.
    fn start_generation(&mut self) {
        if self.status.observed_generation == Some(self.generation()) {
            return;
        }
        let desired = self.desired.as_str();
        if self.status.action.as_ref().is_some_and(|a| {
            a.action_type != desired || ActionStatus::from(a.status.as_str()).is_final()
        }) {
            self.status.action = None;
        }
        if self
            .status
            .intent
            .as_ref()
            .is_some_and(|i| i.generation != self.generation())
        {
            self.status.intent = None;
        }
        self.status.requests = 0;
        self.status.failed_attempts = 0;
        self.status.next_attempt_at = None;
    }

    fn decide(&mut self) -> Decision {
        let retry_now = self.take_retry_request();

        if !retry_now && let Some(d) = self.sticky_stall() {
            return d;
        }
        if self.machine.is_none()
            && let Some(d) = self.resolve_device()
        {
            return d;
        }
        self.status.machine_id = self.machine.clone();
        if let Some(d) = self.conflict() {
            return d;
        }
        if let Some(d) = self.post_outcome() {
            return d;
        }
        if let Some(d) = self.tracked_action(retry_now) {
            return d;
        }
        self.new_action()
    }

    /// The machine id; only called once it is known.
    fn machine_id(&self) -> String {
        self.machine.clone().unwrap_or_default()
    }

    /// Resolves spec.deviceName by an exact computerDnsName match; refuses when several devices
    /// carry the name (never pick one) or none does.
    fn resolve_device(&mut self) -> Option<Decision> {
        let Some(name) = self.input.spec.device_name.clone() else {
            return Some(stalled(
                Reason::InvalidSpec,
                "neither spec.machineId nor spec.deviceName is set".into(),
            ));
        };
        match &self.facts().resolution {
            Resolution::NotDone => Some(reconciling(
                Reason::ResolvingDevice,
                format!("looking up the MDE device named {name}"),
                Some(self.input.timing.transient_retry),
                Effect::ResolveDevice { device_name: name },
            )),
            Resolution::Failed(failure) => Some(self.failure_decision(failure)),
            Resolution::Found(found) => match found.as_slice() {
                [] => Some(stalled(
                    Reason::MachineNotFound,
                    format!(
                        "no MDE device is named {name} (exact computerDnsName match); check the \
                         name or set spec.machineId"
                    ),
                )),
                [one] => {
                    self.machine = Some(one.id.clone());
                    None
                }
                many => {
                    let listed: Vec<String> = many
                        .iter()
                        .map(|c| {
                            format!(
                                "{} ({})",
                                c.id,
                                c.health_status.as_deref().unwrap_or("health unknown")
                            )
                        })
                        .collect();
                    Some(stalled(
                        Reason::AmbiguousDevice,
                        format!(
                            "{} MDE devices are named {name}: {}; the operator never picks one: \
                             use spec.machineId in a new DeviceIsolation",
                            many.len(),
                            listed.join(", ")
                        ),
                    ))
                }
            },
        }
    }

    /// A new value of the retry annotation clears a sticky stall and the failure count once.
    fn take_retry_request(&mut self) -> bool {
        let Some(request) = self.input.retry_request else {
            return false;
        };
        if self.status.last_handled_retry.as_deref() == Some(request) {
            return false;
        }
        self.status.last_handled_retry = Some(request.to_string());
        self.status.failed_attempts = 0;
        self.status.next_attempt_at = None;
        true
    }

    /// Rule 6: two resources for one machine that disagree both stall, and neither calls MDE.
    fn conflict(&mut self) -> Option<Decision> {
        let others: Vec<&str> = self
            .input
            .siblings
            .iter()
            .filter(|s| s.isolated != self.input.spec.isolated)
            .map(|s| s.key.as_str())
            .collect();
        if others.is_empty() {
            return None;
        }
        let message = format!(
            "machine {} is also managed by {} with the opposite desired state; delete or align one of them",
            self.machine_id(),
            others.join(", ")
        );
        Some(stalled(Reason::Conflict, message))
    }

    /// A stall that needs a person stays until the generation changes or a retry is requested, so
    /// that a 404 or 403 is not retried against the quota on every resync.
    fn sticky_stall(&self) -> Option<Decision> {
        let cond = conditions::find(&self.input.status.conditions, STALLED)?;
        let same_generation = cond.observed_generation == Some(self.generation())
            && self.input.status.observed_generation == Some(self.generation());
        if !same_generation {
            return None;
        }
        let reason = Reason::parse(&cond.reason)?;
        if reason.is_sticky() {
            return Some(stalled(reason, cond.message.clone()));
        }
        // A refused credential or permission is tried again at its recheck time, not on every
        // event (our own status write is one).
        if reason.is_rechecked()
            && let Some(due) = self.status.next_attempt_at.as_deref().and_then(parse_time)
            && due > self.input.now
        {
            let wait = (due - self.input.now).to_std().unwrap_or_default();
            return Some(stalled_until(reason, cond.message.clone(), wait));
        }
        None
    }

    /// Handles the answer to a POST made earlier in this pass.
    fn post_outcome(&mut self) -> Option<Decision> {
        let outcome = self.facts().post.as_ref()?;
        match outcome {
            PostOutcome::Action(action) => {
                let ours = self
                    .status
                    .intent
                    .as_ref()
                    .is_some_and(|i| carries_marker(action.comment.as_deref(), &i.marker));
                if action.kind != self.desired {
                    // return-existing mode handed back someone else's opposite action: wait for it.
                    return Some(self.wait_for_opposite(action));
                }
                self.status.intent = None;
                self.status.next_attempt_at = None;
                let reason = if ours {
                    Reason::ActionRequested
                } else {
                    Reason::ActionAdopted
                };
                self.event(
                    false,
                    reason,
                    format!(
                        "{} action {} for machine {} is {}",
                        action.kind.as_str(),
                        action.id,
                        self.machine_id(),
                        action.status.as_str()
                    ),
                );
                self.status.action = Some(action.tracked());
                Some(self.follow(action.clone()))
            }
            PostOutcome::Failed(failure) => Some(self.post_failure(failure)),
        }
    }

    fn post_failure(&mut self, failure: &CallFailure) -> Decision {
        let t = self.input.timing;
        match failure {
            CallFailure::AlreadyInProgress => {
                // Someone's action is open on the machine: find it, then adopt or wait.
                self.status.intent = None;
                if self.facts().lookup == Lookup::Done {
                    // Looked already and the open action finished meanwhile: try again soon.
                    return reconciling(
                        Reason::WaitingForOpenAction,
                        "MDE reports an action in progress on the machine".into(),
                        Some(t.transient_retry),
                        Effect::None,
                    );
                }
                self.lookup_decision(None)
            }
            CallFailure::Ambiguous(msg) => {
                // The action may exist: never re-POST blindly; look it up by its marker first.
                // Not at once: a request the client gave up on may still be applied, so a lookup
                // now could miss it and "prove" it absent. Look after the settle time.
                let due = self.input.now
                    + chrono::Duration::from_std(t.ambiguous_settle).unwrap_or_default();
                self.status.next_attempt_at = Some(rfc3339(due));
                let message = format!(
                    "outcome of the request is unknown ({msg}); looking it up by its audit tag at {}",
                    rfc3339(due)
                );
                reconciling(
                    Reason::OutcomeUnknown,
                    message,
                    Some(t.ambiguous_settle),
                    Effect::None,
                )
            }
            other => {
                // Certainly not applied: nothing was created under the intent's marker.
                self.status.intent = match other {
                    CallFailure::QuotaWait(_)
                    | CallFailure::RateLimited(_)
                    | CallFailure::Transient(_) => self.status.intent.clone(),
                    _ => None,
                };
                self.failure_decision(other)
            }
        }
    }

    /// Maps a failure that certainly created nothing to a phase.
    fn failure_decision(&mut self, failure: &CallFailure) -> Decision {
        let t = self.input.timing;
        if matches!(
            failure,
            CallFailure::Forbidden(_) | CallFailure::AuthenticationFailed(_)
        ) {
            let due = self.input.now
                + chrono::Duration::from_std(t.credential_recheck).unwrap_or_default();
            self.status.next_attempt_at = Some(rfc3339(due));
        }
        match failure {
            CallFailure::MachineNotFound(m) => stalled(Reason::MachineNotFound, m.clone()),
            CallFailure::Forbidden(m) => {
                stalled_until(Reason::Forbidden, m.clone(), t.credential_recheck)
            }
            CallFailure::AuthenticationFailed(m) => stalled_until(
                Reason::AuthenticationFailed,
                m.clone(),
                t.credential_recheck,
            ),
            CallFailure::UnsupportedPlatform(m) => stalled(Reason::UnsupportedPlatform, m.clone()),
            CallFailure::InvalidRequest(m) => stalled(Reason::InvalidRequest, m.clone()),
            CallFailure::RateLimited(after) => reconciling(
                Reason::RateLimited,
                "MDE answered 429 Too Many Requests; all calls to this API pause until Retry-After"
                    .into(),
                Some(*after),
                Effect::None,
            ),
            CallFailure::QuotaWait(after) => reconciling(
                Reason::WaitingForQuota,
                "waiting for a slot in the MDE API quota".into(),
                Some(*after),
                Effect::None,
            ),
            CallFailure::Transient(m) | CallFailure::Ambiguous(m) => reconciling(
                Reason::TransientError,
                format!("MDE call failed and will be retried: {m}"),
                Some(t.transient_retry),
                Effect::None,
            ),
            CallFailure::AlreadyInProgress => reconciling(
                Reason::WaitingForOpenAction,
                "MDE reports an action in progress on the machine".into(),
                Some(t.transient_retry),
                Effect::None,
            ),
        }
    }

    /// Rules 1, 4 and 7: an action is recorded for this generation.
    fn tracked_action(&mut self, retry_now: bool) -> Option<Decision> {
        let recorded = self.status.action.clone()?;
        let kind = ActionKind::parse(&recorded.action_type)?;
        if kind != self.desired {
            return None;
        }
        // The shared view may know a newer state of the action than status does.
        let fresh = self
            .facts()
            .actions
            .iter()
            .find(|a| a.id == recorded.id)
            .cloned();
        let current = match fresh {
            Some(a) => a,
            None => ActionFact {
                id: recorded.id.clone(),
                kind,
                status: ActionStatus::from(recorded.status.as_str()),
                requestor: recorded.requestor.clone(),
                comment: None,
                created_at: recorded.created_at.as_deref().and_then(parse_time),
                updated_at: recorded.updated_at.as_deref().and_then(parse_time),
            },
        };
        // A failure counts once: when the persisted status first learns that it is final.
        let was_final = self
            .input
            .status
            .action
            .as_ref()
            .filter(|a| a.id == recorded.id)
            .is_some_and(|a| ActionStatus::from(a.status.as_str()).is_final());
        self.status.action = Some(current.tracked());

        match &current.status {
            ActionStatus::Failed | ActionStatus::TimeOut => {
                if !was_final {
                    self.status.failed_attempts += 1;
                    self.event(
                        true,
                        Reason::ActionFailed,
                        format!(
                            "{} action {} ended {}",
                            kind.as_str(),
                            current.id,
                            current.status.as_str()
                        ),
                    );
                }
                if retry_now {
                    return None;
                }
                Some(self.schedule_retry(&current))
            }
            ActionStatus::Cancelled => {
                if retry_now {
                    return None;
                }
                Some(stalled(
                    Reason::ActionCancelled,
                    format!(
                        "{} action {} was cancelled in MDE; the operator does not override a person: \
                         request a retry (annotation isolation.mde.dev/retry-requested-at) to try again",
                        kind.as_str(),
                        current.id
                    ),
                ))
            }
            ActionStatus::Succeeded => self.converged(&current, retry_now),
            _ => Some(self.follow(current)),
        }
    }

    /// Rule 1 and rule 7: converged, unless someone changed the device since.
    fn converged(&mut self, ours: &ActionFact, retry_now: bool) -> Option<Decision> {
        let drift = self
            .facts()
            .actions
            .iter()
            .filter(|a| a.kind != self.desired && a.status == ActionStatus::Succeeded)
            .filter(|a| a.finished_at() > ours.finished_at())
            .max_by_key(|a| a.finished_at())
            .cloned();
        let Some(foreign) = drift else {
            self.status.isolated = Some(self.desired.leaves_isolated());
            return Some(self.ready(ours));
        };
        self.status.isolated = Some(foreign.kind.leaves_isolated());
        if self.input.spec.drift_policy == DriftPolicy::Correct || retry_now {
            // Re-converge: a new action for this generation, counted afresh.
            self.status.action = None;
            return None;
        }
        let who = foreign.requestor.as_deref().unwrap_or("someone");
        let message = format!(
            "device was {} outside the operator by {who} (action {}); driftPolicy Report leaves it: \
             set driftPolicy: Correct or request a retry to restore the desired state",
            if foreign.kind.leaves_isolated() {
                "isolated"
            } else {
                "released"
            },
            foreign.id
        );
        if self.previous_ready_reason() != Some(Reason::Drifted) {
            self.event(true, Reason::Drifted, message.clone());
        }
        Some(stalled(Reason::Drifted, message))
    }

    fn ready(&mut self, action: &ActionFact) -> Decision {
        let reason = if self.desired.leaves_isolated() {
            Reason::Isolated
        } else {
            Reason::Released
        };
        let message = format!(
            "device {} by {} action {}",
            reason.as_str().to_lowercase(),
            action.kind.as_str(),
            action.id
        );
        if self.previous_ready_reason() != Some(reason) {
            self.event(false, reason, message.clone());
        }
        (Phase::Ready { reason, message }, Effect::None, None)
    }

    /// An open action serves this generation: wait; the batch poller wakes us on change.
    fn follow(&mut self, action: ActionFact) -> Decision {
        if !action.is_open() {
            // A final state arrived with the POST answer or a lookup: plan it as tracked.
            self.status.action = Some(action.tracked());
            return self
                .tracked_action(false)
                .unwrap_or_else(|| self.new_action());
        }
        let since = action
            .created_at
            .map(rfc3339)
            .unwrap_or_else(|| "an unknown time".into());
        reconciling(
            Reason::ActionPending,
            format!(
                "{} action {} is {} since {since}; offline devices can take up to 3 days",
                action.kind.as_str(),
                action.id,
                action.status.as_str()
            ),
            Some(self.input.timing.open_action_recheck),
            Effect::None,
        )
    }

    fn schedule_retry(&mut self, failed: &ActionFact) -> Decision {
        let t = self.input.timing;
        let attempts = self.status.failed_attempts;
        if attempts >= t.max_attempts {
            self.status.next_attempt_at = None;
            return stalled(
                Reason::RetriesExhausted,
                format!(
                    "{attempts} attempts failed (last: action {} {}); request a retry to try again",
                    failed.id,
                    failed.status.as_str()
                ),
            );
        }
        let due = match self.status.next_attempt_at.as_deref().and_then(parse_time) {
            Some(due) => due,
            None => {
                let exp = t
                    .backoff_base
                    .saturating_mul(1u32 << (attempts.saturating_sub(1)).min(16))
                    .min(t.backoff_max);
                let due = align_up(
                    self.input.now + chrono::Duration::from_std(exp).unwrap_or_default(),
                    exp / 2,
                );
                self.status.next_attempt_at = Some(rfc3339(due));
                due
            }
        };
        if due <= self.input.now {
            // Time for the next attempt: a new action under a new marker.
            self.status.action = None;
            self.status.next_attempt_at = None;
            return self.new_action();
        }
        let wait = (due - self.input.now).to_std().unwrap_or_default();
        reconciling(
            Reason::RetryScheduled,
            format!(
                "action {} ended {}; attempt {} of {} at {}",
                failed.id,
                failed.status.as_str(),
                attempts + 1,
                t.max_attempts,
                rfc3339(due)
            ),
            Some(wait),
            Effect::None,
        )
    }

    /// Rule 5: no action serves this generation yet.
    fn new_action(&mut self) -> Decision {
        let t = self.input.timing;
        let Some(comment) = self.input.comment else {
            return stalled(
                Reason::CommentMissing,
                "annotation isolation.mde.dev/comment is required: MDE records it as the reason \
                 for the action"
                    .into(),
            );
        };
        if let Some(due) = self.status.next_attempt_at.as_deref().and_then(parse_time)
            && due > self.input.now
        {
            let wait = (due - self.input.now).to_std().unwrap_or_default();
            if self.current_intent().is_some() {
                return reconciling(
                    Reason::OutcomeUnknown,
                    format!(
                        "looking up whether the last request created an action at {}",
                        rfc3339(due)
                    ),
                    Some(wait),
                    Effect::None,
                );
            }
            return reconciling(
                Reason::RetryScheduled,
                format!("next attempt at {}", rfc3339(due)),
                Some(wait),
                Effect::None,
            );
        }
        if let Lookup::Failed(failure) = &self.facts().lookup {
            return self.failure_decision(failure);
        }
        if !self.facts().synced && self.facts().lookup != Lookup::Done {
            if let Some(failure) = &self.facts().view_failure {
                return match failure {
                    CallFailure::AuthenticationFailed(m) | CallFailure::Forbidden(m) => {
                        let reason = match failure {
                            CallFailure::Forbidden(_) => Reason::Forbidden,
                            _ => Reason::AuthenticationFailed,
                        };
                        // Only the view is read again (no call of this resource's own), soon.
                        stalled_until(
                            reason,
                            format!("cannot read MDE's open actions: {m}"),
                            t.transient_retry,
                        )
                    }
                    other => reconciling(
                        Reason::WaitingForMdeView,
                        format!(
                            "loading the open actions of the tenant failed, retrying: {other:?}"
                        ),
                        Some(t.view_not_synced_retry),
                        Effect::None,
                    ),
                };
            }
            return reconciling(
                Reason::WaitingForMdeView,
                "loading the open actions of the tenant before requesting anything".into(),
                Some(t.view_not_synced_retry),
                Effect::None,
            );
        }

        // Never stack actions on one machine: adopt an open one of our type, wait for the other.
        let open: Vec<&ActionFact> = self
            .facts()
            .actions
            .iter()
            .filter(|a| a.is_open())
            .collect();
        if let Some(same) = open.iter().find(|a| a.kind == self.desired) {
            let same = (*same).clone();
            self.status.intent = None;
            self.status.next_attempt_at = None;
            self.event(
                false,
                Reason::ActionAdopted,
                format!(
                    "adopted open {} action {} requested by {}",
                    same.kind.as_str(),
                    same.id,
                    same.requestor.as_deref().unwrap_or("someone")
                ),
            );
            self.status.action = Some(same.tracked());
            return self.follow(same);
        }
        if let Some(other) = open.first() {
            let other = (*other).clone();
            return self.wait_for_opposite(&other);
        }

        // An intent without an action: the POST may have happened (crash, ambiguous answer).
        if let Some(intent) = self.current_intent() {
            if let Some(found) = self
                .facts()
                .actions
                .iter()
                .find(|a| carries_marker(a.comment.as_deref(), &intent.marker))
                .cloned()
            {
                self.status.intent = None;
                self.status.next_attempt_at = None;
                self.event(
                    false,
                    Reason::ActionRequested,
                    format!("recovered action {} from its audit marker", found.id),
                );
                self.status.action = Some(found.tracked());
                return self
                    .tracked_action(false)
                    .unwrap_or_else(|| self.follow(found));
            }
            let provably_absent = self.facts().intent_unsent || self.facts().lookup == Lookup::Done;
            if !provably_absent
                && let Some(at) = self.facts().intent_ambiguous_at
                && let Ok(settle) = chrono::Duration::from_std(t.ambiguous_settle)
                && self.input.now < at + settle
            {
                let wait = (at + settle - self.input.now).to_std().unwrap_or_default();
                return reconciling(
                    Reason::OutcomeUnknown,
                    format!(
                        "looking up whether the last request created an action at {}",
                        rfc3339(at + settle)
                    ),
                    Some(wait),
                    Effect::None,
                );
            }
            if !provably_absent {
                let since = parse_time(&intent.recorded_at);
                let effect = self.lookup_effect(since);
                return reconciling(
                    Reason::OutcomeUnknown,
                    "looking up whether the last request created an action".into(),
                    Some(t.transient_retry),
                    effect,
                );
            }
        }

        // Already in the desired state: the latest finished isolation action says so.
        if self.status.intent.is_none()
            && let Some(last) = self.latest_succeeded()
            && last.kind == self.desired
        {
            self.status.action = Some(last.tracked());
            self.status.isolated = Some(self.desired.leaves_isolated());
            return self.ready(&last);
        }

        self.post(comment)
    }

    fn wait_for_opposite(&self, other: &ActionFact) -> Decision {
        reconciling(
            Reason::WaitingForOpenAction,
            format!(
                "{} action {} is open on the machine; waiting for it to end before requesting {}",
                other.kind.as_str(),
                other.id,
                self.desired.as_str()
            ),
            Some(self.input.timing.open_action_recheck),
            Effect::None,
        )
    }

    fn post(&mut self, comment: &str) -> Decision {
        let machine_id = self.machine_id();
        if self.input.dry_run {
            return reconciling(
                Reason::DryRun,
                format!(
                    "dry run: would POST /api/machines/{machine_id}/{}",
                    self.desired.as_str().to_lowercase()
                ),
                None,
                Effect::None,
            );
        }
        // An intent proven unsent keeps its marker; otherwise this is a new request.
        let marker = match self.current_intent() {
            Some(intent) => intent.marker,
            None => {
                self.status.requests += 1;
                let marker = AuditTag {
                    namespace: self.input.namespace,
                    name: self.input.name,
                    uid: self.input.uid,
                    generation: self.generation(),
                    attempt: self.status.requests,
                }
                .marker();
                self.status.intent = Some(Intent {
                    generation: self.generation(),
                    action_type: self.desired.as_str().into(),
                    attempt: self.status.requests,
                    marker: marker.clone(),
                    recorded_at: rfc3339(self.input.now),
                });
                marker
            }
        };
        reconciling(
            Reason::ActionRequested,
            format!(
                "requesting {} for machine {machine_id}",
                self.desired.as_str()
            ),
            Some(self.input.timing.transient_retry),
            Effect::Post {
                machine_id,
                kind: self.desired,
                isolation_type: self.input.spec.isolation_type,
                comment: comment_with_marker(comment, &marker),
                priority: if self.status.intent.as_ref().map_or(1, |i| i.attempt) > 1 {
                    Priority::Low
                } else {
                    Priority::Normal
                },
            },
        )
    }

    fn lookup_decision(&self, since: Option<DateTime<Utc>>) -> Decision {
        reconciling(
            Reason::WaitingForOpenAction,
            "MDE reports an action in progress on the machine; looking it up".into(),
            Some(self.input.timing.transient_retry),
            self.lookup_effect(since),
        )
    }

    /// A lookup, unless this pass already made one (then the caller's requeue takes over).
    fn lookup_effect(&self, since: Option<DateTime<Utc>>) -> Effect {
        if self.facts().lookup != Lookup::NotDone {
            return Effect::None;
        }
        Effect::Lookup {
            machine_id: self.machine_id(),
            created_since: since.map(|t| t - chrono::Duration::minutes(10)),
        }
    }

    fn current_intent(&self) -> Option<Intent> {
        self.status
            .intent
            .clone()
            .filter(|i| i.generation == self.generation() && i.action_type == self.desired.as_str())
    }

    fn latest_succeeded(&self) -> Option<ActionFact> {
        self.facts()
            .actions
            .iter()
            .filter(|a| a.status == ActionStatus::Succeeded)
            .max_by_key(|a| a.finished_at())
            .cloned()
    }

    fn previous_ready_reason(&self) -> Option<Reason> {
        conditions::find(&self.input.status.conditions, conditions::READY)
            .filter(|c| c.observed_generation == Some(self.generation()))
            .and_then(|c| Reason::parse(&c.reason))
    }

    fn event(&mut self, warning: bool, reason: Reason, note: String) {
        self.events.push(EventNote {
            warning,
            reason,
            note,
        });
    }

    fn finish(mut self, phase: Phase, effect: Effect, requeue: Option<Duration>) -> Plan {
        if let Phase::Stalled { reason, message } = &phase {
            let previous = conditions::find(&self.input.status.conditions, STALLED)
                .filter(|c| c.observed_generation == Some(self.generation()))
                .map(|c| c.reason.as_str());
            if previous != Some(reason.as_str()) && *reason != Reason::Drifted {
                self.event(true, *reason, message.clone());
            }
        }
        let now = rfc3339(self.input.now);
        let conditions: Vec<Condition> = conditions::conditions_for(
            &phase,
            &self.input.status.conditions,
            self.generation(),
            &now,
        );
        self.status.conditions = conditions;
        self.status.observed_generation = Some(self.generation());
        Plan {
            status: self.status,
            effect,
            requeue,
            events: self.events,
            reason: phase.reason(),
        }
    }
}

fn stalled(reason: Reason, message: String) -> Decision {
    (Phase::Stalled { reason, message }, Effect::None, None)
}

/// Stalled, but looked at again after `recheck` (the cause may be fixed outside the resource).
fn stalled_until(reason: Reason, message: String, recheck: Duration) -> Decision {
    (
        Phase::Stalled { reason, message },
        Effect::None,
        Some(recheck),
    )
}

fn reconciling(
    reason: Reason,
    message: String,
    requeue: Option<Duration>,
    effect: Effect,
) -> Decision {
    (Phase::Reconciling { reason, message }, effect, requeue)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
