//! kstatus-compatible conditions: `Ready` (always present), and `Reconciling` / `Stalled`, which
//! are present only while true ("abnormal-true" conditions, as kstatus expects).

use serde::{Deserialize, Serialize};

use crate::reconcile::Reason;

/// Condition type that is `True` once the device is in the desired state for this generation.
pub const READY: &str = "Ready";
/// Condition type present (`True`) while the operator is working towards the desired state.
pub const RECONCILING: &str = "Reconciling";
/// Condition type present (`True`) when progress needs a person (bad input, permission, conflict).
pub const STALLED: &str = "Stalled";

/// One status condition, shaped like `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: Ready, Reconciling or Stalled.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// One-word CamelCase reason, listed in the README.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// The metadata.generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the condition's status last changed (RFC 3339).
    pub last_transition_time: String,
}

/// A condition's reason: a DeviceIsolation's [`Reason`] or a set's.
pub trait ConditionReason: Copy {
    /// The CamelCase spelling status carries.
    fn as_str(self) -> &'static str;
}

/// Which condition a reason is given in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasonPhase {
    /// `Ready=True`.
    Ready,
    /// `Reconciling=True` (and `Ready=False`).
    Reconciling,
    /// `Stalled=True` (and `Ready=False`).
    Stalled,
    /// Only an event's reason, never a condition's.
    Event,
}

/// Declares a reason enum from `Name => Phase` lines: its `ALL`, `as_str` (the CamelCase
/// spelling status and events carry), `phase`, `parse`, and [`ConditionReason`].
macro_rules! reason_enum {
    ($(#[$meta:meta])* $vis:vis enum $enum:ident {
        $($(#[$doc:meta])* $name:ident => $phase:ident,)*
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $enum {
            $($(#[$doc])* $name,)*
        }

        impl $enum {
            /// Every reason.
            pub const ALL: &'static [$enum] = &[$($enum::$name,)*];

            /// The CamelCase spelling status and events carry.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($enum::$name => stringify!($name),)*
                }
            }

            /// The condition it is given in.
            pub fn phase(self) -> $crate::conditions::ReasonPhase {
                match self {
                    $($enum::$name => $crate::conditions::ReasonPhase::$phase,)*
                }
            }

            /// Parses the spelling status carries.
            pub fn parse(s: &str) -> Option<$enum> {
                Self::ALL.iter().copied().find(|r| r.as_str() == s)
            }
        }

        impl $crate::conditions::ConditionReason for $enum {
            fn as_str(self) -> &'static str {
                $enum::as_str(self)
            }
        }
    };
}
pub(crate) use reason_enum;

/// The phase a plan puts a resource in; it fully determines the three conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase<R = Reason> {
    /// Desired state reached.
    Ready { reason: R, message: String },
    /// Work in progress (an action pending, waiting for quota, a retry scheduled).
    Reconciling { reason: R, message: String },
    /// Needs a person.
    Stalled { reason: R, message: String },
}

impl<R: ConditionReason> Phase<R> {
    /// The reason carried by whichever condition is set.
    pub fn reason(&self) -> R {
        match self {
            Phase::Ready { reason, .. }
            | Phase::Reconciling { reason, .. }
            | Phase::Stalled { reason, .. } => *reason,
        }
    }
}

/// Builds the conditions for `phase`, keeping `lastTransitionTime` of any condition whose status
/// does not change, so that an unchanged phase yields byte-identical conditions (no status churn).
pub fn conditions_for<R: ConditionReason>(
    phase: &Phase<R>,
    previous: &[Condition],
    generation: i64,
    now: &str,
) -> Vec<Condition> {
    let (ready, extra) = match phase {
        Phase::Ready { reason, message } => (("True", reason, message), None),
        Phase::Reconciling { reason, message } => (
            ("False", reason, message),
            Some((RECONCILING, reason, message)),
        ),
        Phase::Stalled { reason, message } => {
            (("False", reason, message), Some((STALLED, reason, message)))
        }
    };
    let make = |type_: &str, status: &str, reason: &str, message: &str| {
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.to_string());
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: Some(generation),
            last_transition_time: since,
        }
    };
    let mut out = vec![make(READY, ready.0, ready.1.as_str(), ready.2)];
    if let Some((type_, reason, message)) = extra {
        out.push(make(type_, "True", reason.as_str(), message));
    }
    out
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(reason: Reason) -> Phase {
        Phase::Ready {
            reason,
            message: "m".into(),
        }
    }

    #[test]
    fn ready_phase_has_only_a_true_ready_condition() {
        let c = conditions_for(&ready(Reason::Released), &[], 3, "t0");
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].type_.as_str(), c[0].status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(c[0].observed_generation, Some(3));
    }

    #[test]
    fn stalled_phase_sets_ready_false_and_stalled_true() {
        let phase = Phase::Stalled {
            reason: Reason::MachineNotFound,
            message: "m".into(),
        };
        let c = conditions_for(&phase, &[], 1, "t0");
        assert_eq!(c.len(), 2);
        assert_eq!(find(&c, READY).unwrap().status, "False");
        assert_eq!(find(&c, STALLED).unwrap().reason, "MachineNotFound");
        assert!(find(&c, RECONCILING).is_none());
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let first = conditions_for(&ready(Reason::Released), &[], 1, "t0");
        let again = conditions_for(&ready(Reason::Released), &first, 1, "t1");
        assert_eq!(
            first, again,
            "an unchanged phase must not change the conditions"
        );
        let reconciling = Phase::Reconciling {
            reason: Reason::ActionPending,
            message: "m".into(),
        };
        let moved = conditions_for(&reconciling, &again, 2, "t2");
        assert_eq!(find(&moved, READY).unwrap().last_transition_time, "t2");
        assert_eq!(
            find(&moved, RECONCILING).unwrap().last_transition_time,
            "t2"
        );
    }
}
