//! An action recorded for this generation: follow it, converge, or report drift (rules 1, 4, 7).

use super::*;

impl Planner<'_> {
    /// Rules 1, 4 and 7: an action is recorded for this generation.
    pub(super) fn tracked_action(&mut self, retry_now: bool) -> Option<Decision> {
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
                request_source: None,
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
    pub(super) fn converged(&mut self, ours: &ActionFact, retry_now: bool) -> Option<Decision> {
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

    pub(super) fn ready(&mut self, action: &ActionFact) -> Decision {
        let reason = if self.desired.leaves_isolated() {
            Reason::Isolated
        } else if released_on_schedule(self.input).is_some() {
            Reason::ReleasedOnSchedule
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
    pub(super) fn follow(&mut self, action: ActionFact) -> Decision {
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

    pub(super) fn wait_for_opposite(&self, other: &ActionFact) -> Decision {
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
}
