//! The answer to a POST of this pass, and what a failed call means.

use super::*;

impl Planner<'_> {
    /// Handles the answer to a POST made earlier in this pass.
    pub(super) fn post_outcome(&mut self) -> Option<Decision> {
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
                let mut note = format!(
                    "{} action {} for machine {} is {}",
                    action.kind.as_str(),
                    action.id,
                    self.machine_id(),
                    action.status.as_str()
                );
                if let (true, Some(tag)) = (ours, self.requester()) {
                    note.push_str(&format!("; {tag}"));
                }
                self.event(false, reason, note);
                self.status.action = Some(action.tracked());
                Some(self.follow(action.clone()))
            }
            PostOutcome::Failed(failure) => Some(self.post_failure(failure)),
        }
    }

    pub(super) fn post_failure(&mut self, failure: &CallFailure) -> Decision {
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
    pub(super) fn failure_decision(&mut self, failure: &CallFailure) -> Decision {
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
}
