//! Machine actions and their lifecycle. An action stores a plan (when it turns InProgress,
//! when it ends and how); its status at any moment is computed from the simulated clock, so
//! nothing needs a ticker and everything is deterministic under any time scale.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::{add_seconds, fmt7};
use crate::tenant::Behaviour;

/// Action types the simulator creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Isolate the device.
    Isolate,
    /// Release it.
    Unisolate,
}

impl ActionType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::Isolate => "Isolate",
            ActionType::Unisolate => "Unisolate",
        }
    }
}

/// Action status; the last four are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Waiting for the device.
    Pending,
    /// Picked up by the device.
    InProgress,
    /// Done; the isolation state changed.
    Succeeded,
    /// The device failed it.
    Failed,
    /// The device never picked it up.
    TimeOut,
    /// Cancelled through the API or by a person.
    Cancelled,
}

impl Status {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "Pending",
            Status::InProgress => "InProgress",
            Status::Succeeded => "Succeeded",
            Status::Failed => "Failed",
            Status::TimeOut => "TimeOut",
            Status::Cancelled => "Cancelled",
        }
    }

    /// Whether the action can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Pending | Status::InProgress)
    }
}

/// `IsolationType` of an isolate request (becomes the action's `scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IsolationType {
    /// Full isolation.
    Full,
    /// Outlook/Teams/Skype still allowed.
    Selective,
    /// Isolation of an unmanaged device.
    UnManagedDevice,
}

impl IsolationType {
    /// Parses the case-sensitive wire value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Full" => Some(Self::Full),
            "Selective" => Some(Self::Selective),
            "UnManagedDevice" => Some(Self::UnManagedDevice),
            _ => None,
        }
    }
}

/// When an action turns InProgress and how and when it ends (unless cancelled first).
#[derive(Debug, Clone)]
pub struct Plan {
    /// `None` for offline devices: they never pick it up.
    pub in_progress_at: Option<DateTime<Utc>>,
    /// When the action reaches `final_status`.
    pub final_at: DateTime<Utc>,
    /// Succeeded, Failed or TimeOut.
    pub final_status: Status,
}

/// The lifecycle delays, simulated seconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delays {
    /// Pending → InProgress on an online device.
    pub pending_delay: f64,
    /// InProgress → final.
    pub progress_delay: f64,
    /// Pending → TimeOut on an offline device.
    pub offline_timeout: f64,
}

/// The plan of an action created (or re-planned) at `from` on a device with `behaviour`.
/// `created` bounds an offline device's TimeOut, which counts from the creation.
pub fn plan(behaviour: Behaviour, created: DateTime<Utc>, from: DateTime<Utc>, d: Delays) -> Plan {
    match behaviour {
        Behaviour::Offline => {
            let deadline = add_seconds(created, d.offline_timeout);
            Plan {
                in_progress_at: None,
                final_at: deadline.max(add_seconds(from, 1e-7)),
                final_status: Status::TimeOut,
            }
        }
        Behaviour::Online | Behaviour::Failing | Behaviour::Unsupported => {
            let start = add_seconds(from, d.pending_delay);
            Plan {
                in_progress_at: Some(start),
                final_at: add_seconds(start, d.progress_delay).max(add_seconds(start, 1e-7)),
                final_status: if behaviour == Behaviour::Online {
                    Status::Succeeded
                } else {
                    Status::Failed
                },
            }
        }
    }
}

/// A cancellation.
#[derive(Debug, Clone)]
pub struct Cancellation {
    /// When.
    pub at: DateTime<Utc>,
    /// Who (app display name or a person's UPN).
    pub requestor: String,
    /// Their comment.
    pub comment: String,
}

/// One machine action.
#[derive(Debug, Clone)]
pub struct Action {
    /// GUID.
    pub id: String,
    /// Isolate or Unisolate.
    pub action_type: ActionType,
    /// For Isolate: the requested isolation type (shown as `scope` once picked up).
    pub isolation_type: Option<IsolationType>,
    /// App display name or UPN.
    pub requestor: String,
    /// The Comment sent.
    pub comment: String,
    /// `PublicApi` for API calls, `Portal` for admin-simulated people, or what a seed's
    /// `isolatedBy` names.
    pub request_source: String,
    /// Target device.
    pub machine_id: String,
    /// Target device name.
    pub computer_dns_name: String,
    /// Creation time (strictly increasing across actions).
    pub created: DateTime<Utc>,
    /// The lifecycle plan.
    pub plan: Plan,
    /// Set when cancelled.
    pub cancellation: Option<Cancellation>,
}

impl Action {
    /// The status at `t`.
    pub fn status_at(&self, t: DateTime<Utc>) -> Status {
        if let Some(c) = &self.cancellation
            && c.at <= t
        {
            return Status::Cancelled;
        }
        if self.plan.final_at <= t {
            return self.plan.final_status;
        }
        match self.plan.in_progress_at {
            Some(p) if p <= t => Status::InProgress,
            _ => Status::Pending,
        }
    }

    /// Whether the action is Pending or InProgress at `t`.
    pub fn is_open_at(&self, t: DateTime<Utc>) -> bool {
        !self.status_at(t).is_final()
    }

    /// The time of the last status change at or before `t`.
    pub fn last_update_at(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self.status_at(t) {
            Status::Cancelled => self.cancellation.as_ref().map_or(self.created, |c| c.at),
            Status::Pending => self.created,
            Status::InProgress => self.plan.in_progress_at.unwrap_or(self.created),
            _ => self.plan.final_at,
        }
    }

    /// When the action changed the device's isolation, if it Succeeded by `t`.
    pub fn succeeded_at(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        (self.status_at(t) == Status::Succeeded).then_some(self.plan.final_at)
    }

    /// The wire representation at `t`.
    pub fn view(&self, t: DateTime<Utc>) -> ActionView {
        let status = self.status_at(t);
        let cancelled = if status == Status::Cancelled {
            self.cancellation.as_ref()
        } else {
            None
        };
        ActionView {
            id: self.id.clone(),
            action_type: self.action_type,
            // MDE leaves scope null until the device has the action.
            scope: match (self.action_type, status) {
                (ActionType::Isolate, Status::Pending) => None,
                (ActionType::Isolate, _) => self.isolation_type,
                (ActionType::Unisolate, _) => None,
            },
            requestor: self.requestor.clone(),
            requestor_comment: self.comment.clone(),
            status,
            machine_id: self.machine_id.clone(),
            computer_dns_name: self.computer_dns_name.clone(),
            creation_date_time_utc: fmt7(self.created),
            last_update_date_time_utc: fmt7(self.last_update_at(t)),
            cancellation_requestor: cancelled.map(|c| c.requestor.clone()),
            cancellation_comment: cancelled.map(|c| c.comment.clone()),
            cancellation_date_time_utc: cancelled.map(|c| fmt7(c.at)),
            // E_FAIL for failed actions, as a signed 32-bit HRESULT.
            error_h_result: if status == Status::Failed {
                -2147467259
            } else {
                0
            },
            external_id: None,
            request_source: self.request_source.clone(),
            related_file_info: None,
            commands: Vec::new(),
            troubleshoot_info: None,
            title: None,
        }
    }
}

/// Wire shape of a MachineAction (every field of mde-api.md §4).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionView {
    id: String,
    #[serde(rename = "type")]
    action_type: ActionType,
    scope: Option<IsolationType>,
    requestor: String,
    requestor_comment: String,
    status: Status,
    machine_id: String,
    computer_dns_name: String,
    creation_date_time_utc: String,
    last_update_date_time_utc: String,
    cancellation_requestor: Option<String>,
    cancellation_comment: Option<String>,
    cancellation_date_time_utc: Option<String>,
    error_h_result: i64,
    external_id: Option<String>,
    request_source: String,
    related_file_info: Option<serde_json::Value>,
    commands: Vec<serde_json::Value>,
    troubleshoot_info: Option<serde_json::Value>,
    title: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    const D: Delays = Delays {
        pending_delay: 10.0,
        progress_delay: 50.0,
        offline_timeout: 1000.0,
    };

    fn action(behaviour: Behaviour) -> Action {
        Action {
            id: "a".into(),
            action_type: ActionType::Isolate,
            isolation_type: Some(IsolationType::Full),
            requestor: "r".into(),
            comment: "c".into(),
            request_source: "PublicApi".into(),
            machine_id: "m".into(),
            computer_dns_name: "n".into(),
            created: t0(),
            plan: plan(behaviour, t0(), t0(), D),
            cancellation: None,
        }
    }

    #[test]
    fn online_goes_pending_inprogress_succeeded() {
        let a = action(Behaviour::Online);
        assert_eq!(a.status_at(add_seconds(t0(), 9.0)), Status::Pending);
        assert_eq!(a.status_at(add_seconds(t0(), 10.0)), Status::InProgress);
        assert_eq!(a.status_at(add_seconds(t0(), 60.0)), Status::Succeeded);
        assert_eq!(a.view(t0()).scope, None);
        assert_eq!(
            a.view(add_seconds(t0(), 10.0)).scope,
            Some(IsolationType::Full)
        );
    }

    #[test]
    fn offline_times_out() {
        let a = action(Behaviour::Offline);
        assert_eq!(a.status_at(add_seconds(t0(), 999.0)), Status::Pending);
        assert_eq!(a.status_at(add_seconds(t0(), 1000.0)), Status::TimeOut);
    }

    #[test]
    fn cancellation_wins_from_its_time() {
        let mut a = action(Behaviour::Online);
        a.cancellation = Some(Cancellation {
            at: add_seconds(t0(), 5.0),
            requestor: "p".into(),
            comment: "x".into(),
        });
        assert_eq!(a.status_at(add_seconds(t0(), 4.0)), Status::Pending);
        assert_eq!(a.status_at(add_seconds(t0(), 100.0)), Status::Cancelled);
        assert_eq!(a.succeeded_at(add_seconds(t0(), 100.0)), None);
    }
}
