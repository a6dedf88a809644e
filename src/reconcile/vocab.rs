//! The reconciler's vocabulary: one type per concept, shared by the pure rules ([`super::plan`](mod@super::plan)),
//! the driver ([`super`]), the effects ([`super::effects`]) and the shared view.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use kube::runtime::reflector::ObjectRef;

use crate::crd::{DeviceIsolationSpec, DeviceIsolationStatus, TrackedAction};
use crate::mde::model::{ActionStatus, ActionType, IsolationType};
use crate::quota::{Api as QuotaApi, Priority};

/// The one identity of a DeviceIsolation inside the process: the view's watchers, the
/// per-resource memory, the poller's wake-ups and the controller's queue all use it.
pub type ResourceRef = ObjectRef<crate::cache::Cached>;

/// `namespace/name`: the resource's key at the quota gate and in logs.
pub fn key_of(resource: &ResourceRef) -> String {
    format!(
        "{}/{}",
        resource.namespace.as_deref().unwrap_or_default(),
        resource.name
    )
}

/// Whether a quota key is a resource's ([`key_of`]); the process's own keys (the poller's, the
/// resolver's) carry no `/`.
pub fn is_resource_key(key: &str) -> bool {
    key.contains('/')
}

/// Formats a time the way status stores it.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The two machine actions this operator requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActionKind {
    /// `POST /api/machines/{id}/isolate`.
    Isolate,
    /// `POST /api/machines/{id}/unisolate`.
    Unisolate,
}

impl ActionKind {
    /// The action that reaches `isolated`.
    pub fn for_desired(isolated: bool) -> Self {
        if isolated {
            ActionKind::Isolate
        } else {
            ActionKind::Unisolate
        }
    }

    /// MDE's spelling of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Isolate => "Isolate",
            ActionKind::Unisolate => "Unisolate",
        }
    }

    /// Parses MDE's spelling; other action types are not ours.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Isolate" => Some(ActionKind::Isolate),
            "Unisolate" => Some(ActionKind::Unisolate),
            _ => None,
        }
    }

    /// The kind of an MDE action type; other action types are not ours.
    pub fn of(action_type: &ActionType) -> Option<Self> {
        match action_type {
            ActionType::Isolate => Some(ActionKind::Isolate),
            ActionType::Unisolate => Some(ActionKind::Unisolate),
            _ => None,
        }
    }

    /// The isolation state a succeeded action of this kind leaves the device in.
    pub fn leaves_isolated(self) -> bool {
        self == ActionKind::Isolate
    }
}

impl From<ActionKind> for QuotaApi {
    /// The quota endpoint a request of this kind spends.
    fn from(kind: ActionKind) -> Self {
        match kind {
            ActionKind::Isolate => QuotaApi::Isolate,
            ActionKind::Unisolate => QuotaApi::Unisolate,
        }
    }
}

/// What the operator knows of one Isolate/Unisolate machine action.
#[derive(Clone, Debug, PartialEq)]
pub struct ActionFact {
    /// MDE action id.
    pub id: String,
    /// Isolate or Unisolate.
    pub kind: ActionKind,
    /// Current status.
    pub status: ActionStatus,
    /// Who asked for it.
    pub requestor: Option<String>,
    /// The comment it was requested with (`requestorComment`).
    pub comment: Option<String>,
    /// Where the request came from (`requestSource`).
    pub request_source: Option<String>,
    /// Creation time.
    pub created_at: Option<DateTime<Utc>>,
    /// Last update time (the completion time once final).
    pub updated_at: Option<DateTime<Utc>>,
}

impl ActionFact {
    /// Pending or InProgress.
    pub fn is_open(&self) -> bool {
        !self.status.is_final()
    }

    /// The action as status records it.
    pub fn tracked(&self) -> TrackedAction {
        TrackedAction {
            id: self.id.clone(),
            action_type: self.kind.as_str().to_string(),
            status: self.status.as_str().to_string(),
            requestor: self.requestor.clone(),
            created_at: self.created_at.map(rfc3339),
            updated_at: self.updated_at.map(rfc3339),
        }
    }

    /// Completion order: MDE may finish two actions out of creation order, so the device's real
    /// state is the outcome of the action that finished last.
    pub fn finished_at(&self) -> Option<DateTime<Utc>> {
        self.updated_at.or(self.created_at)
    }
}

/// Why a call to MDE did not produce an action. Built by [`effects`](super::effects) from the client's
/// error classes (the only place that maps them); durations are already converted to the operator's clock.
#[derive(Clone, Debug, PartialEq)]
pub enum CallFailure {
    /// 404 on the machine.
    MachineNotFound(String),
    /// 403: a permission is missing (the message names it).
    Forbidden(String),
    /// 401 even after a fresh token.
    AuthenticationFailed(String),
    /// 400 OsPlatformNotSupported / ClientVersionNotSupported.
    UnsupportedPlatform(String),
    /// Any other 400: the request itself was wrong.
    InvalidRequest(String),
    /// 400 ActiveRequestAlreadyExists: an action is already open on the machine.
    AlreadyInProgress,
    /// 429: wait for Retry-After.
    RateLimited(Duration),
    /// The request was certainly not applied (connection refused, 5xx on a read, ...).
    Transient(String),
    /// The request may have been applied (timeout or reset after sending, 5xx on a POST).
    Ambiguous(String),
    /// The quota gate has no slot now; one is reserved after this long.
    QuotaWait(Duration),
}

impl CallFailure {
    /// MDE refused the request for good: nothing was created, and sending it again would be
    /// refused again (until a person changes something).
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            CallFailure::MachineNotFound(_)
                | CallFailure::Forbidden(_)
                | CallFailure::AuthenticationFailed(_)
                | CallFailure::UnsupportedPlatform(_)
                | CallFailure::InvalidRequest(_)
        )
    }
}

/// Result of the last POST of this reconcile pass.
#[derive(Clone, Debug, PartialEq)]
pub enum PostOutcome {
    /// MDE answered with an action (a new one, or an existing open one in return-existing mode).
    Action(ActionFact),
    /// MDE did not create an action, or we cannot tell.
    Failed(CallFailure),
}

/// State of the per-machine lookup of this reconcile pass.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Lookup {
    /// Not performed; [`Facts::actions`] holds what the shared view knows.
    #[default]
    NotDone,
    /// Performed after any POST of ours: [`Facts::actions`] holds MDE's answer, so an intent
    /// whose marker is absent there provably created nothing.
    Done,
    /// The lookup failed.
    Failed(CallFailure),
}

/// Everything the planner knows of MDE for this resource's machine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// Whether the shared view of isolation actions has been loaded at least once. Before that the
    /// operator cannot tell whether an action is open, so it requests nothing.
    pub synced: bool,
    /// Known Isolate/Unisolate actions on this machine, any status, anyone's.
    pub actions: Vec<ActionFact>,
    /// Whether this pass looked the machine up.
    pub lookup: Lookup,
    /// The process knows that the POST for the current intent was never sent (it was refused by
    /// the quota gate or failed before sending), so no lookup is needed before sending it.
    pub intent_unsent: bool,
    /// Outcome of the POST made in this pass.
    pub post: Option<PostOutcome>,
    /// Outcome of resolving spec.deviceName in this pass.
    pub resolution: Resolution,
    /// Why the shared view's first load fails, while it does.
    pub view_failure: Option<CallFailure>,
    /// When this process last saw an ambiguous outcome for the current intent's request. The
    /// status records it too, but the watch cache can lag behind the status write, so the
    /// process's own memory keeps a stale copy from triggering an early lookup.
    pub intent_ambiguous_at: Option<DateTime<Utc>>,
    /// MDE rejected the current intent's POST for good, in this process (the status may not show
    /// the stall yet).
    pub intent_rejected: Option<CallFailure>,
    /// Why the DeviceIsolationSet owning the resource lets it request nothing new (paused,
    /// stopped, deleted); `None` for a resource of no set, or a set rolling out.
    pub set_hold: Option<String>,
    /// Whether the API server vouches for the requested-by annotation (the accountability
    /// admission policy is installed and enforced).
    pub requester_verified: bool,
    /// Why the resource's MDE connection cannot be used, if it cannot: nothing is called.
    pub connection: Option<ConnectionProblem>,
}

/// Why a resource's MDE connection (spec.connectionRef) cannot be used now, as its condition
/// says it.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionProblem {
    /// ConnectionNotReady, ConnectionNotAllowed, AuthenticationFailed or Forbidden.
    pub reason: Reason,
    /// What to tell the person.
    pub message: String,
}

impl ConnectionProblem {
    /// The resource's words for the registry's problem.
    pub fn of(p: &crate::connection::Problem) -> ConnectionProblem {
        use crate::connection::ProblemKind;
        let reason = match p.kind {
            ProblemKind::NotReady | ProblemKind::Pending => Reason::ConnectionNotReady,
            ProblemKind::NotAllowed => Reason::ConnectionNotAllowed,
            ProblemKind::AuthenticationFailed => Reason::AuthenticationFailed,
            ProblemKind::Forbidden => Reason::Forbidden,
        };
        ConnectionProblem {
            reason,
            message: p.message.clone(),
        }
    }
}

/// A device that carries the name being resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceCandidate {
    /// MDE machine id.
    pub id: String,
    /// MDE health status (Active, Inactive, ...), shown to help a person choose.
    pub health_status: Option<String>,
}

/// State of the lookup of spec.deviceName in this pass.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Resolution {
    /// Not looked up.
    #[default]
    NotDone,
    /// The devices whose computerDnsName equals the name exactly.
    Found(Vec<DeviceCandidate>),
    /// The lookup failed.
    Failed(CallFailure),
}

/// Another DeviceIsolation for the same machine.
#[derive(Clone, Debug, PartialEq)]
pub struct Sibling {
    /// namespace/name.
    pub key: String,
    /// Its desired state.
    pub isolated: bool,
}

/// Retry and polling timings, already scaled to the operator's clock.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Failed/TimeOut attempts before giving up (`Stalled`, `RetriesExhausted`).
    pub max_attempts: u32,
    /// First retry delay; doubles per failed attempt.
    pub backoff_base: Duration,
    /// Cap on the retry delay.
    pub backoff_max: Duration,
    /// Safety-net re-check of an open action (the batch poller normally wakes the resource).
    pub open_action_recheck: Duration,
    /// Delay after a transient error or an ambiguous outcome.
    pub transient_retry: Duration,
    /// Re-check while the shared view is not loaded yet.
    pub view_not_synced_retry: Duration,
    /// After an ambiguous outcome, how long to wait before a lookup may prove the action absent:
    /// a request the client gave up on can still be applied within this time. Real time (it
    /// concerns the network), so not divided by the time scale.
    pub ambiguous_settle: Duration,
    /// Re-check of a refused credential or missing permission: a person fixes those outside
    /// the resource (a rotated secret, a granted role), so the resource recovers by itself.
    pub credential_recheck: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            max_attempts: 5,
            backoff_base: Duration::from_secs(60),
            backoff_max: Duration::from_secs(3600),
            open_action_recheck: Duration::from_secs(1800),
            transient_retry: Duration::from_secs(10),
            view_not_synced_retry: Duration::from_secs(2),
            ambiguous_settle: Duration::from_secs(61),
            credential_recheck: Duration::from_secs(900),
        }
    }
}

/// The planner's input: one resource and its facts.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// Resource namespace.
    pub namespace: &'a str,
    /// Resource name.
    pub name: &'a str,
    /// Resource uid.
    pub uid: &'a str,
    /// metadata.generation.
    pub generation: i64,
    /// The spec.
    pub spec: &'a DeviceIsolationSpec,
    /// The comment annotation (trimmed, non-empty).
    pub comment: Option<&'a str>,
    /// The retry-request annotation.
    pub retry_request: Option<&'a str>,
    /// The requested-by annotation: who asked for this generation.
    pub requested_by: Option<&'a str>,
    /// Who approved this generation (see [`crate::crd::approver`]).
    pub approved_by: Option<&'a str>,
    /// Current status (default when none).
    pub status: &'a DeviceIsolationStatus,
    /// Other resources for the same machine.
    pub siblings: &'a [Sibling],
    /// What is known of MDE.
    pub facts: &'a Facts,
    /// Current time.
    pub now: DateTime<Utc>,
    /// Plan and report only; never POST.
    pub dry_run: bool,
    /// Timings.
    pub timing: &'a Timing,
}

/// A Kubernetes event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventNote {
    /// Warning rather than Normal.
    pub warning: bool,
    /// Its reason.
    pub reason: Reason,
    /// Human-readable note.
    pub note: String,
}

/// The one effect a plan asks the controller to perform next.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Nothing: write the status (if changed) and requeue as told.
    None,
    /// Find the devices named `device_name` (exact computerDnsName), then plan again.
    ResolveDevice {
        /// The name from spec.deviceName.
        device_name: String,
    },
    /// List this machine's recent Isolate/Unisolate actions, then plan again.
    Lookup {
        /// Machine to look up.
        machine_id: String,
        /// Only actions created at or after this time are needed.
        created_since: Option<DateTime<Utc>>,
    },
    /// Write the status (it holds the intent), then POST, then plan again with the outcome.
    Post {
        /// Machine to act on.
        machine_id: String,
        /// Isolate or Unisolate.
        kind: ActionKind,
        /// For Isolate.
        isolation_type: IsolationType,
        /// Full comment: the annotation text followed by the audit marker.
        comment: String,
        /// Its class at the quota gate: a retry (its earlier action failed) waits behind every
        /// first attempt, so that a few failing devices do not delay the rest of a burst.
        priority: Priority,
    },
}

/// The planner's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The status to hold after this step (written only when it differs from the current one).
    pub status: DeviceIsolationStatus,
    /// What to do next.
    pub effect: Effect,
    /// When to reconcile again; `None` waits for a change (of the resource or from the poller).
    pub requeue: Option<Duration>,
    /// Events for transitions made by this step.
    pub events: Vec<EventNote>,
    /// The reason of the phase the status is in after this step.
    pub reason: Reason,
}

impl Plan {
    /// Ready or Stalled with nothing left to do: any quota slot reserved earlier (a request that
    /// had to wait, then was adopted or stalled) would only hold quota from others.
    pub fn settled(&self) -> bool {
        self.effect == Effect::None && self.requeue.is_none()
    }

    /// The poller should load the shared view now: it loads it on demand only (so that a
    /// restart over converged resources makes no MDE call), and this resource waits for it,
    /// either to request something or, after a restart, to follow an action already sent
    /// (whose end only the view will show).
    pub fn needs_view(&self, facts: &Facts) -> bool {
        self.reason == Reason::WaitingForMdeView || (!facts.synced && !self.settled())
    }
}

/// Reason of the phase that waits for the shared view's first load.
pub const WAITING_FOR_VIEW: &str = "WaitingForMdeView";

pub use crate::conditions::ReasonPhase;

crate::conditions::reason_enum! {
    /// Every reason the operator writes into a condition or an event. The README's "Status and
    /// conditions" table lists each (a test checks it).
    pub enum Reason {
    /// The device is released.
    Released => Ready,
    /// The device is isolated.
    Isolated => Ready,
    /// The device was released at spec.releaseAt.
    ReleasedOnSchedule => Ready,
    /// spec.requireApproval: waiting for a second person's approval of this generation.
    AwaitingApproval => Reconciling,
    /// The request is being sent (or was: the event).
    ActionRequested => Reconciling,
    /// The action is Pending/InProgress in MDE.
    ActionPending => Reconciling,
    /// Another open Isolate/Unisolate action on the machine.
    WaitingForOpenAction => Reconciling,
    /// The shared view's first load has not completed.
    WaitingForMdeView => Reconciling,
    /// Waiting for a slot in the operator's share of the quota.
    WaitingForQuota => Reconciling,
    /// MDE answered 429: the API pauses.
    RateLimited => Reconciling,
    /// A request may or may not have been applied.
    OutcomeUnknown => Reconciling,
    /// A call failed in a way that is retried.
    TransientError => Reconciling,
    /// The action ended Failed or TimeOut; the next attempt is scheduled.
    RetryScheduled => Reconciling,
    /// `--dry-run`.
    DryRun => Reconciling,
    /// Looking up spec.deviceName.
    ResolvingDevice => Reconciling,
    /// The DeviceIsolationSet that owns the resource is paused, stopped or deleted: no new request.
    HeldBySet => Reconciling,
    /// Neither spec.machineId nor spec.deviceName (the API server normally refuses it).
    InvalidSpec => Stalled,
    /// The comment annotation is missing.
    CommentMissing => Stalled,
    /// Another DeviceIsolation wants the opposite state of the same machine.
    Conflict => Stalled,
    /// MDE answered 404, or no device carries the name.
    MachineNotFound => Stalled,
    /// Several devices carry the name.
    AmbiguousDevice => Stalled,
    /// MDE answered 403.
    Forbidden => Stalled,
    /// 401 even with a fresh token.
    AuthenticationFailed => Stalled,
    /// MDE cannot isolate this OS or sensor version.
    UnsupportedPlatform => Stalled,
    /// MDE rejected the request body.
    InvalidRequest => Stalled,
    /// A person cancelled the action.
    ActionCancelled => Stalled,
    /// `--max-attempts` actions ended Failed or TimeOut.
    RetriesExhausted => Stalled,
    /// spec.connectionRef names a connection that does not exist or is not verified.
    ConnectionNotReady => Stalled,
    /// spec.connectionRef names a ClusterMdeConnection that does not allow this namespace.
    ConnectionNotAllowed => Stalled,
    /// Someone changed the device outside the operator.
    Drifted => Stalled,
    /// An open action of the desired type was adopted (event).
    ActionAdopted => Event,
    /// An action ended Failed or TimeOut (event).
    ActionFailed => Event,
    }
}

impl Reason {
    /// A stall that is looked at again after [`Timing::credential_recheck`]: fixed outside the
    /// resource (a rotated secret, a granted role), so the resource recovers by itself.
    pub fn is_rechecked(self) -> bool {
        matches!(self, Reason::Forbidden | Reason::AuthenticationFailed)
    }

    /// A stall that stays until the spec changes or a retry is requested.
    pub fn is_sticky(self) -> bool {
        matches!(
            self,
            Reason::MachineNotFound
                | Reason::AmbiguousDevice
                | Reason::UnsupportedPlatform
                | Reason::InvalidRequest
                | Reason::ActionCancelled
                | Reason::RetriesExhausted
        )
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{r} twice");
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
        }
        assert_eq!(Reason::parse("NoSuchReason"), None);
    }

    /// The README's "Status and conditions" section documents every reason: a table row for
    /// those given in a condition, the events line for the others.
    #[test]
    fn every_reason_is_documented_in_the_readme() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let section = readme
            .split("## Status and conditions")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("a Status and conditions section");
        let events = section
            .lines()
            .skip_while(|l| !l.starts_with("Events (`kubectl get events`)"))
            .take_while(|l| !l.is_empty())
            .collect::<String>();
        for r in Reason::ALL {
            let documented = match r.phase() {
                ReasonPhase::Ready => section.contains(&format!("| Ready=True | `{r}` |")),
                ReasonPhase::Reconciling => section.contains(&format!("| Reconciling | `{r}` |")),
                ReasonPhase::Stalled => section.contains(&format!("| Stalled | `{r}` |")),
                ReasonPhase::Event => events.contains(&format!("`{r}`")),
            };
            assert!(
                documented,
                "{r} ({:?}) is not in the README's table",
                r.phase()
            );
        }
    }

    #[test]
    fn sticky_and_rechecked_stalls_are_stalls() {
        for r in Reason::ALL {
            if r.is_sticky() || r.is_rechecked() {
                assert_eq!(r.phase(), ReasonPhase::Stalled, "{r}");
            }
            assert!(!(r.is_sticky() && r.is_rechecked()), "{r}");
        }
    }

    #[test]
    fn action_kinds_map_to_mde_and_the_quota() {
        assert_eq!(
            ActionKind::of(&ActionType::Isolate),
            Some(ActionKind::Isolate)
        );
        assert_eq!(
            ActionKind::of(&ActionType::Unisolate),
            Some(ActionKind::Unisolate)
        );
        assert_eq!(QuotaApi::from(ActionKind::Unisolate), QuotaApi::Unisolate);
        assert_eq!(QuotaApi::from(ActionKind::Isolate), QuotaApi::Isolate);
        for kind in [ActionKind::Isolate, ActionKind::Unisolate] {
            assert_eq!(ActionKind::parse(kind.as_str()), Some(kind));
        }
    }
}
