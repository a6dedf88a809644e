//! The reconcile decision as a pure function: (resource, what the operator knows of MDE, the
//! outcome of the last call) → (the status to hold, the one effect to perform, when to look again).
//!
//! No I/O happens here. The driver ([`super`]) runs a short loop: plan → perform the effect (a
//! lookup or a POST) → feed the outcome back into [`Facts`] → plan again, until the plan asks for
//! no effect. Every rule of design.md §2 is a branch below and a row in the table tests.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::vocab::*;
use crate::audit::{AuditTag, carries_marker, comment_with_marker, person_tag};
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
        desired: ActionKind::for_desired(
            input.spec.isolated && released_on_schedule(input).is_none(),
        ),
        machine: input
            .spec
            .machine_id
            .clone()
            .or_else(|| input.status.machine_id.clone()),
    };
    p.start_generation();
    p.start_scheduled_release();
    let (phase, effect, requeue) = p.decide();
    let requeue =
        until_release(input).map_or(requeue, |due| Some(requeue.map_or(due, |r| r.min(due))));
    p.finish(phase, effect, requeue)
}

/// spec.releaseAt, once it has come: the isolation it ends is over.
fn released_on_schedule(input: &Input<'_>) -> Option<DateTime<Utc>> {
    input
        .spec
        .release_at
        .filter(|at| input.spec.isolated && *at <= input.now)
}

/// How long until spec.releaseAt, while it is ahead: the resource looks again then, whatever
/// else it waits for.
fn until_release(input: &Input<'_>) -> Option<Duration> {
    let at = input.spec.release_at.filter(|_| input.spec.isolated)?;
    (at > input.now).then(|| (at - input.now).to_std().unwrap_or_default())
}

mod action;
mod device;
mod generation;
mod new_action;
mod outcome;
mod retry;

type Decision = (Phase, Effect, Option<Duration>);

impl<'a> Planner<'a> {
    pub(super) fn facts(&self) -> &'a Facts {
        self.input.facts
    }

    pub(super) fn generation(&self) -> i64 {
        self.input.generation
    }

    pub(super) fn decide(&mut self) -> Decision {
        if let Some(d) = self.connection_unusable() {
            return d;
        }
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

    /// Rule 0: without a usable connection nothing is called, and the resource says why. The
    /// controller wakes it when the connection changes; until then it looks again after the
    /// credential recheck. A credential stall of its own ends with the connection's (its recheck
    /// time is dropped), so a fixed Secret heals every resource of the connection at once.
    fn connection_unusable(&mut self) -> Option<Decision> {
        let problem = self.facts().connection.as_ref()?;
        let stalled_on_credential = conditions::find(&self.status.conditions, STALLED)
            .and_then(|c| Reason::parse(&c.reason))
            .is_some_and(Reason::is_rechecked);
        if stalled_on_credential {
            self.status.next_attempt_at = None;
        }
        Some(stalled_until(
            problem.reason,
            problem.message.clone(),
            self.input.timing.credential_recheck,
        ))
    }

    /// The machine id; only called once it is known.
    pub(super) fn machine_id(&self) -> String {
        self.machine.clone().unwrap_or_default()
    }

    /// Who asked, as the comment and the events say it (see [`person_tag`]).
    pub(super) fn requester(&self) -> Option<String> {
        self.input
            .requested_by
            .map(|name| person_tag("requested-by", name, self.facts().requester_verified))
    }

    /// The comment's text as sent to MDE before the marker: the annotation and who asked.
    pub(super) fn request_text(&self, comment: &str) -> String {
        let mut text = comment.trim().to_string();
        if let Some(at) = released_on_schedule(self.input) {
            text.push_str(&format!(
                " (released on schedule: releaseAt {})",
                rfc3339(at)
            ));
        }
        if let Some(tag) = self.requester() {
            text.push(' ');
            text.push_str(&tag);
        }
        if let Some(by) = self.input.approved_by {
            text.push(' ');
            text.push_str(&person_tag(
                "approved-by",
                by,
                self.facts().requester_verified,
            ));
        }
        text
    }

    /// The isolation's attempts do not count against the scheduled release that ends it: when
    /// releaseAt has come and status still follows the isolating action, start afresh (the
    /// attempt counter goes on, so every request keeps its own marker).
    pub(super) fn start_scheduled_release(&mut self) {
        let follows_isolate = self
            .status
            .action
            .as_ref()
            .is_some_and(|a| a.action_type == ActionKind::Isolate.as_str());
        if released_on_schedule(self.input).is_some() && follows_isolate {
            self.status.failed_attempts = 0;
            self.status.next_attempt_at = None;
        }
    }

    pub(super) fn current_intent(&self) -> Option<Intent> {
        self.status
            .intent
            .clone()
            .filter(|i| i.generation == self.generation() && i.action_type == self.desired.as_str())
    }

    pub(super) fn latest_succeeded(&self) -> Option<ActionFact> {
        self.facts()
            .actions
            .iter()
            .filter(|a| a.status == ActionStatus::Succeeded)
            .max_by_key(|a| a.finished_at())
            .cloned()
    }

    pub(super) fn previous_ready_reason(&self) -> Option<Reason> {
        conditions::find(&self.input.status.conditions, conditions::READY)
            .filter(|c| c.observed_generation == Some(self.generation()))
            .and_then(|c| Reason::parse(&c.reason))
    }

    pub(super) fn event(&mut self, warning: bool, reason: Reason, note: String) {
        self.events.push(EventNote {
            warning,
            reason,
            note,
        });
    }

    pub(super) fn finish(
        mut self,
        phase: Phase,
        effect: Effect,
        requeue: Option<Duration>,
    ) -> Plan {
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
mod tests;
