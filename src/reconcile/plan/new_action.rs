//! No action serves this generation yet: adopt, wait, recover an intent, or request (rule 5).

use super::*;

impl Planner<'_> {
    /// Rule 5: no action serves this generation yet.
    pub(super) fn new_action(&mut self) -> Decision {
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
        if !self.facts().synced {
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
            // MDE rejected it for good, and the status read is older than the stall written.
            if let Some(rejected) = self.facts().intent_rejected.clone() {
                self.status.intent = None;
                return self.failure_decision(&rejected);
            }
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

    pub(super) fn post(&mut self, comment: &str) -> Decision {
        let machine_id = self.machine_id();
        if let Some(why) = &self.facts().set_hold {
            return reconciling(
                Reason::HeldBySet,
                format!("no new request: {why}"),
                Some(self.input.timing.transient_retry),
                Effect::None,
            );
        }
        if self.input.spec.require_approval && self.input.approved_by.is_none() {
            return reconciling(
                Reason::AwaitingApproval,
                format!(
                    "spec.requireApproval: no request until a second person approves generation \
                     {g} (annotations isolation.mde.dev/approved-by and \
                     isolation.mde.dev/approved-generation: \"{g}\")",
                    g = self.generation()
                ),
                None,
                Effect::None,
            );
        }
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
                comment: comment_with_marker(&self.request_text(comment), &marker),
                priority: if self.status.intent.as_ref().map_or(1, |i| i.attempt) > 1 {
                    Priority::Low
                } else {
                    Priority::Normal
                },
            },
        )
    }

    pub(super) fn lookup_decision(&self, since: Option<DateTime<Utc>>) -> Decision {
        reconciling(
            Reason::WaitingForOpenAction,
            "MDE reports an action in progress on the machine; looking it up".into(),
            Some(self.input.timing.transient_retry),
            self.lookup_effect(since),
        )
    }

    /// A lookup, unless this pass already made one (then the caller's requeue takes over).
    pub(super) fn lookup_effect(&self, since: Option<DateTime<Utc>>) -> Effect {
        if self.facts().lookup != Lookup::NotDone {
            return Effect::None;
        }
        Effect::Lookup {
            machine_id: self.machine_id(),
            created_since: since.map(|t| t - chrono::Duration::minutes(10)),
        }
    }
}
