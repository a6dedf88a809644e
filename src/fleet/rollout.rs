//! The set's decision as a pure function: (spec, the selection snapshot, where each child stands)
//! → (which children to create now, the status to hold, the events to publish).
//!
//! Table-tested like the device planner; no I/O.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::SetReason;
use crate::conditions::{self, Condition, Phase, ReasonPhase};
use crate::crd::{DeviceCounts, DeviceIsolationSetSpec, Selection};

/// Where a child DeviceIsolation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildState {
    /// Ready for its current generation.
    Ready,
    /// Working: an action pending, an offline device, waiting for quota, not reconciled yet.
    Pending,
    /// Stalled on something outside the device (comment, permission, conflict, drift).
    Stalled,
    /// Failed on the device itself (not found, unsupported, retries exhausted, cancelled).
    Failed,
}

/// What the rollout decides from.
pub struct Input<'a> {
    /// metadata.generation.
    pub generation: i64,
    /// The spec.
    pub spec: &'a DeviceIsolationSetSpec,
    /// Whether the comment annotation is set.
    pub has_comment: bool,
    /// The snapshot for the current selector.
    pub selection: &'a Selection,
    /// This set's children, by machine id.
    pub children: &'a HashMap<&'a str, ChildState>,
    /// Selected machines another DeviceIsolation manages.
    pub managed_elsewhere: &'a HashSet<String>,
    /// The generation whose canary passed, if any.
    pub canary_passed_generation: Option<i64>,
    /// The operator's approval threshold: a larger selection needs a second person (0: never).
    pub approval_threshold: u32,
    /// Who approved this generation (see [`crate::crd::approver`]).
    pub approved_by: Option<&'a str>,
    /// Who asked, as the events say it (`requested-by=…`, see [`crate::audit::person_tag`]).
    pub requester: Option<String>,
    /// The conditions written last.
    pub conditions: &'a [Condition],
    /// Now.
    pub now: DateTime<Utc>,
}

/// An event to publish about the set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetEvent {
    /// Warning or Normal.
    pub warning: bool,
    /// Reason.
    pub reason: SetReason,
    /// Note.
    pub note: String,
}

/// What the rollout decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Machines whose child DeviceIsolation is to be created now.
    pub admit: Vec<String>,
    /// Device counts.
    pub devices: DeviceCounts,
    /// The generation whose canary passed.
    pub canary_passed_generation: Option<i64>,
    /// Conditions.
    pub conditions: Vec<Condition>,
    /// Ready's reason.
    pub reason: SetReason,
    /// Events.
    pub events: Vec<SetEvent>,
}

impl Decision {
    /// Whether the set lets its children send new requests.
    pub fn holds(&self) -> bool {
        self.reason.holds_children()
    }

    /// The status fields this decision owns, as a merge patch for `generation` (the selection
    /// is written on its own, when it is resolved).
    pub fn status_patch(&self, generation: Option<i64>) -> serde_json::Value {
        serde_json::json!({
            "observedGeneration": generation,
            "devices": self.devices,
            "canaryPassedGeneration": self.canary_passed_generation,
            "conditions": self.conditions,
        })
    }
}

/// Decides. See the module docs.
pub fn plan(input: &Input<'_>) -> Decision {
    let spec = input.spec;
    let selection = input.selection;
    // Devices the set acts on: the snapshot less those another resource manages.
    let eligible: Vec<&String> = selection
        .machine_ids
        .iter()
        .filter(|m| !input.managed_elsewhere.contains(*m))
        .collect();
    let mut devices = DeviceCounts {
        selected: selection.count,
        managed_elsewhere: selection
            .machine_ids
            .iter()
            .filter(|m| input.managed_elsewhere.contains(*m))
            .count() as u32,
        ..DeviceCounts::default()
    };
    for m in &eligible {
        let Some(state) = input.children.get(m.as_str()) else {
            continue;
        };
        devices.requested += 1;
        match state {
            ChildState::Ready => devices.ready += 1,
            ChildState::Pending => devices.pending += 1,
            ChildState::Stalled => devices.stalled += 1,
            ChildState::Failed => devices.failed += 1,
        }
    }
    // Devices selected but not admitted yet also wait.
    devices.pending += eligible.len() as u32 - devices.requested;

    let mut canary_passed = input
        .canary_passed_generation
        .filter(|g| *g == input.generation);
    let mut events = Vec::new();
    let mut admit = Vec::new();
    let (reason, message) = if !input.has_comment {
        (
            SetReason::CommentMissing,
            "annotation isolation.mde.dev/comment is required: every child's action carries it"
                .to_string(),
        )
    } else if selection.count > spec.max_devices {
        (
            SetReason::SelectionTooLarge,
            format!(
                "the selector matches {} devices, more than maxDevices {}: narrow the selector or \
                 raise spec.maxDevices",
                selection.count, spec.max_devices
            ),
        )
    } else if selection.count == 0 {
        (
            SetReason::NothingSelected,
            "the selector matches no device (annotate isolation.mde.dev/refresh-requested-at to \
             resolve it again)"
                .to_string(),
        )
    } else if needs_approval(input) && input.approved_by.is_none() {
        (
            SetReason::AwaitingApproval,
            format!(
                "{} devices selected, more than the approval threshold {}: a second person \
                 approves generation {g} (annotations isolation.mde.dev/approved-by and \
                 isolation.mde.dev/approved-generation: \"{g}\")",
                selection.count,
                input.approval_threshold,
                g = input.generation
            ),
        )
    } else if devices.failed > spec.rollout.max_failures {
        (
            SetReason::FailureBudgetExceeded,
            format!(
                "{} devices failed, more than rollout.maxFailures {}: no new request until the \
                 budget is raised or the devices recover",
                devices.failed, spec.rollout.max_failures
            ),
        )
    } else if spec.paused {
        (
            SetReason::Paused,
            format!(
                "paused: {} devices selected, {} requested; set spec.paused to false to proceed",
                selection.count, devices.requested
            ),
        )
    } else {
        let canary = (spec.rollout.canary as usize).min(eligible.len());
        let canary_ready = eligible[..canary]
            .iter()
            .all(|m| input.children.get(m.as_str()) == Some(&ChildState::Ready));
        if canary > 0 && canary_passed.is_none() && canary_ready {
            canary_passed = Some(input.generation);
            events.push(SetEvent {
                warning: false,
                reason: SetReason::CanaryPassed,
                note: format!("the {canary} canary devices are Ready; requesting the rest"),
            });
        }
        let admitted = if canary > 0 && canary_passed.is_none() {
            &eligible[..canary]
        } else {
            &eligible[..]
        };
        admit = admitted
            .iter()
            .filter(|m| !input.children.contains_key(m.as_str()))
            .map(|m| (*m).clone())
            .collect();
        let settled = devices.ready + devices.failed + devices.stalled;
        if canary > 0 && canary_passed.is_none() {
            (
                SetReason::Canary,
                format!(
                    "canary: {} of {canary} devices Ready; the rest follow when all are",
                    eligible[..canary]
                        .iter()
                        .filter(|m| input.children.get(m.as_str()) == Some(&ChildState::Ready))
                        .count()
                ),
            )
        } else if devices.ready == eligible.len() as u32 {
            (
                SetReason::Converged,
                format!("{} devices Ready{}", devices.ready, elsewhere(&devices)),
            )
        } else if devices.pending == 0 && devices.stalled == 0 && settled == eligible.len() as u32 {
            (
                SetReason::ConvergedWithFailures,
                format!(
                    "{} devices Ready, {} failed (within rollout.maxFailures {}){}",
                    devices.ready,
                    devices.failed,
                    spec.rollout.max_failures,
                    elsewhere(&devices)
                ),
            )
        } else if devices.pending == 0 && admit.is_empty() {
            (
                SetReason::DevicesStalled,
                format!(
                    "{} devices Ready, {} stalled, {} failed: see the children's conditions",
                    devices.ready, devices.stalled, devices.failed
                ),
            )
        } else {
            (
                SetReason::RollingOut,
                format!(
                    "{} of {} devices requested: {} Ready, {} pending, {} stalled, {} failed{}",
                    devices.requested + admit.len() as u32,
                    eligible.len(),
                    devices.ready,
                    devices.pending,
                    devices.stalled,
                    devices.failed,
                    elsewhere(&devices)
                ),
            )
        }
    };

    let phase = match reason.phase() {
        ReasonPhase::Ready => Phase::Ready { reason, message },
        ReasonPhase::Stalled => Phase::Stalled { reason, message },
        // Event-only reasons are never decided above.
        ReasonPhase::Reconciling | ReasonPhase::Event => Phase::Reconciling { reason, message },
    };
    let previous = conditions::find(input.conditions, conditions::READY)
        .filter(|c| c.observed_generation == Some(input.generation))
        .map(|c| c.reason.as_str());
    let changed = previous != Some(reason.as_str());
    if changed
        && previous == Some(SetReason::AwaitingApproval.as_str())
        && let Some(by) = input.approved_by
    {
        events.push(SetEvent {
            warning: false,
            reason: SetReason::Approved,
            note: format!("generation {} approved by {by}", input.generation),
        });
    }
    if changed
        && let Some(mut event) =
            transition_event(reason, &phase, devices.requested, !admit.is_empty())
    {
        if event.reason == SetReason::RolloutStarted
            && let Some(tag) = &input.requester
        {
            event.note.push_str(&format!("; {tag}"));
        }
        events.push(event);
    }
    let conditions = conditions::conditions_for(
        &phase,
        input.conditions,
        input.generation,
        &input.now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    Decision {
        admit,
        devices,
        canary_passed_generation: canary_passed,
        conditions,
        reason,
        events,
    }
}

/// Whether the selection needs a second person's approval.
fn needs_approval(input: &Input<'_>) -> bool {
    input.approval_threshold > 0 && input.selection.count > input.approval_threshold
}

fn elsewhere(devices: &DeviceCounts) -> String {
    match devices.managed_elsewhere {
        0 => String::new(),
        n => format!("; {n} managed by other DeviceIsolations (not duplicated)"),
    }
}

/// The event of entering `reason` (for this generation).
fn transition_event(
    reason: SetReason,
    phase: &Phase<SetReason>,
    requested_before: u32,
    admitting: bool,
) -> Option<SetEvent> {
    let (Phase::Ready { message, .. }
    | Phase::Reconciling { message, .. }
    | Phase::Stalled { message, .. }) = phase;
    let (warning, event) = match reason {
        SetReason::Canary | SetReason::RollingOut if requested_before == 0 && admitting => {
            (false, SetReason::RolloutStarted)
        }
        SetReason::Paused => (false, SetReason::Paused),
        SetReason::Converged | SetReason::ConvergedWithFailures => (false, SetReason::Done),
        r if r.phase() == ReasonPhase::Stalled => (true, r),
        _ => return None,
    };
    Some(SetEvent {
        warning,
        reason: event,
        note: message.clone(),
    })
}

#[cfg(test)]
mod tests;
