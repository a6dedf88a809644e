//! The reconciler's effects: the one place that talks to MDE, the quota gate and the API server
//! on behalf of a resource, behind the [`Effects`] interface so that the driver can be tested
//! against a fake. [`Live`] is the real one; it is also where the client's errors are turned
//! into the planner's [`CallFailure`] ([`failure_of`], the only such mapping).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};

use super::memory::MachineGuard;
use super::vocab::*;
use super::{Context, FIELD_MANAGER};
use crate::cache::Cached;
use crate::connection::Connection;
use crate::crd::{DeviceIsolation, DeviceIsolationStatus};
use crate::events::EventKind;
use crate::mde::error::{ErrorClass, MdeError};
use crate::mde::odata::{Filter, ListQuery};
use crate::quota::{Api as QuotaApi, Priority};
use crate::view::fact_of;

/// A POST the plan asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Machine to act on.
    pub machine_id: String,
    /// Isolate or Unisolate.
    pub kind: ActionKind,
    /// For Isolate.
    pub isolation_type: crate::mde::model::IsolationType,
    /// Annotation text followed by the audit marker.
    pub comment: String,
    /// Class at the quota gate.
    pub priority: Priority,
}

/// Everything a reconcile of one resource does outside the planner.
pub trait Effects: Send + Sync {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
    /// Whether the resource still exists (in the watch cache, not being deleted).
    fn present(&self) -> bool;
    /// Why the resource's MDE connection cannot be used now, if it cannot.
    fn connection(&self) -> Option<ConnectionProblem>;
    /// Whether the shared view has loaded once, and why its first load fails while it does.
    fn view_state(&self) -> (bool, Option<CallFailure>);
    /// Known Isolate/Unisolate actions on `machine`.
    fn actions_for(&self, machine: &str) -> Vec<ActionFact>;
    /// The other live resources managing `machine`.
    fn siblings(&self, machine: &str) -> Vec<Sibling>;
    /// Registers the resource's interest in `machine` (changes there wake it), then checks
    /// [`present`](Self::present): `false` when the resource is gone, and then nothing stays
    /// registered.
    fn watch(&self, machine: &str) -> bool;
    /// Asks the batch poller to load the view now.
    fn nudge_view(&self);
    /// Why the resource's DeviceIsolationSet lets it request nothing new, if it does.
    fn set_hold(&self) -> Option<String>;
    /// Whether the API server vouches for the requested-by annotation.
    fn requester_verified(&self) -> bool;
    /// Finds the devices named `name`.
    fn resolve(&self, name: &str) -> impl Future<Output = Resolution> + Send;
    /// Lists `machine`'s recent Isolate/Unisolate actions into the view.
    fn lookup(
        &self,
        machine: &str,
        since: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Lookup> + Send;
    /// `None` when `request` could be sent now (nothing is counted); otherwise its slot is held
    /// and the failure says how long it waits.
    fn hold(&self, request: &Request) -> Option<CallFailure>;
    /// Sends `request` (at most one POST per machine at a time).
    fn post(&self, request: &Request) -> impl Future<Output = PostOutcome> + Send;
    /// Writes the whole status.
    fn write_status(
        &self,
        status: &DeviceIsolationStatus,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
    /// Publishes events (a failure is logged, never fatal: status holds the truth).
    fn publish(&self, notes: &[EventNote]) -> impl Future<Output = ()> + Send;
    /// Drops any quota slot the resource holds.
    fn release_quota(&self);
}

/// The real effects of one reconcile of `di`.
pub struct Live<'a> {
    ctx: &'a Context,
    /// The resource's MDE connection, or why it cannot be used (then the planner asks for no
    /// call, and nothing here reaches MDE).
    conn: Result<Arc<Connection>, ConnectionProblem>,
    di: &'a Cached,
    resource: ResourceRef,
    key: String,
    /// Held from the first POST of this reconcile to its end.
    machine_guard: tokio::sync::Mutex<Option<MachineGuard>>,
}

impl<'a> Live<'a> {
    /// The effects of reconciling `di` through `conn`, its connection (or why it has none).
    pub fn new(
        ctx: &'a Context,
        conn: Result<Arc<Connection>, ConnectionProblem>,
        di: &'a Cached,
    ) -> Self {
        let resource = ResourceRef::from_obj(di);
        Live {
            key: key_of(&resource),
            resource,
            ctx,
            conn,
            di,
            machine_guard: Default::default(),
        }
    }

    /// A wait at the quota gate, counted. While MDE itself holds the API back (a 429's pause, or
    /// its probe not answered yet) the resource says `RateLimited`, not only the one resource
    /// whose call drew the 429: everyone waiting then waits for MDE, not for the budget.
    fn quota_failure(&self, conn: &Connection, api: QuotaApi, wait: Duration) -> CallFailure {
        self.ctx.metrics.quota_waited(api, wait);
        if conn.mde.gate().throttled(api, tokio::time::Instant::now()) {
            CallFailure::RateLimited(wait)
        } else {
            CallFailure::QuotaWait(wait)
        }
    }

    fn failure(&self, conn: &Connection, api: QuotaApi, e: &MdeError) -> CallFailure {
        match failure_of(e) {
            CallFailure::QuotaWait(wait) => self.quota_failure(conn, api, wait),
            other => other,
        }
    }

    /// The live connection; `Err` is what a call answers without one (the planner stops at the
    /// connection's problem before it asks for any call, so this is a second guard).
    fn conn(&self) -> Result<&Connection, CallFailure> {
        self.conn
            .as_deref()
            .map_err(|p| CallFailure::Transient(format!("no usable MDE connection: {}", p.message)))
    }
}

impl Effects for Live<'_> {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn present(&self) -> bool {
        self.di.metadata.deletion_timestamp.is_none()
            && self.ctx.stores.get(&self.resource).is_some()
    }

    fn connection(&self) -> Option<ConnectionProblem> {
        self.conn.as_ref().err().cloned()
    }

    fn view_state(&self) -> (bool, Option<CallFailure>) {
        match self.conn() {
            Ok(c) => (c.view.is_synced(), c.view.load_failure()),
            Err(_) => (false, None),
        }
    }

    fn actions_for(&self, machine: &str) -> Vec<ActionFact> {
        self.conn()
            .map(|c| c.view.actions_for(machine))
            .unwrap_or_default()
    }

    fn siblings(&self, machine: &str) -> Vec<Sibling> {
        self.ctx.stores.siblings(&self.resource, machine)
    }

    fn watch(&self, machine: &str) -> bool {
        // Registered first, checked second: the watch removes a deleted object from the cache
        // before it reports the deletion, so either this sees it gone or the deletion, reported
        // later, unregisters it.
        let Ok(conn) = self.conn() else {
            return self.present();
        };
        let shared = self.ctx.memory.shared(&self.resource);
        conn.view.watch(&shared, machine);
        if !self.present() {
            conn.view.unwatch(&self.resource);
            return false;
        }
        true
    }

    fn nudge_view(&self) {
        if let Ok(conn) = self.conn() {
            conn.nudge.notify_one();
        }
    }

    fn requester_verified(&self) -> bool {
        self.ctx.accountability.verified()
    }

    fn set_hold(&self) -> Option<String> {
        crate::fleet::hold_of(self.di, &self.ctx.sets)
    }

    async fn resolve(&self, name: &str) -> Resolution {
        let conn = match self.conn() {
            Ok(conn) => conn,
            Err(failure) => return Resolution::Failed(failure),
        };
        match conn.resolver.resolve(name).await {
            Ok(found) => Resolution::Found(
                found
                    .into_iter()
                    .map(|m| DeviceCandidate {
                        id: m.id,
                        health_status: m.health_status,
                    })
                    .collect(),
            ),
            Err(e) => Resolution::Failed(self.failure(conn, QuotaApi::MachinesRead, &e)),
        }
    }

    async fn lookup(&self, machine: &str, since: Option<DateTime<Utc>>) -> Lookup {
        let conn = match self.conn() {
            Ok(conn) => conn,
            Err(failure) => return Lookup::Failed(failure),
        };
        let mut filter =
            Filter::eq("machineId", machine).and(Filter::is_in("type", ["Isolate", "Unisolate"]));
        if let Some(since) = since {
            filter = filter.and(
                Filter::is_in("status", ["Pending", "InProgress"])
                    .or(Filter::ge("creationDateTimeUtc", since)),
            );
        }
        let query = ListQuery {
            filter: Some(filter),
            top: Some(10_000),
            orderby: Some("creationDateTimeUtc desc".into()),
            ..ListQuery::default()
        };
        match conn.mde.list_actions(&query, &self.key).await {
            Ok(actions) => {
                conn.view.upsert(actions.iter().filter_map(fact_of));
                Lookup::Done
            }
            Err(e) => Lookup::Failed(self.failure(conn, QuotaApi::MachineActionsRead, &e)),
        }
    }

    fn hold(&self, request: &Request) -> Option<CallFailure> {
        let conn = match self.conn() {
            Ok(conn) => conn,
            Err(failure) => return Some(failure),
        };
        let api = QuotaApi::from(request.kind);
        let gate = conn.mde.gate();
        gate.set_priority(&self.key, request.priority);
        let now = tokio::time::Instant::now();
        let slot = gate.hold(api, &self.key, now)?;
        Some(self.quota_failure(conn, api, slot.saturating_duration_since(now)))
    }

    async fn post(&self, request: &Request) -> PostOutcome {
        let conn = match self.conn() {
            Ok(conn) => conn,
            Err(failure) => return PostOutcome::Failed(failure),
        };
        {
            let mut guard = self.machine_guard.lock().await;
            if guard.is_none() {
                *guard = Some(self.ctx.memory.lock_machine(&request.machine_id).await);
            }
        }
        let api = QuotaApi::from(request.kind);
        conn.mde.gate().set_priority(&self.key, request.priority);
        let (mde, m, c, k) = (&conn.mde, &request.machine_id, &request.comment, &self.key);
        let result = match request.kind {
            ActionKind::Unisolate => mde.unisolate(m, c, k).await,
            ActionKind::Isolate => mde.isolate(m, c, request.isolation_type, k).await,
        };
        match result {
            Ok(action) => {
                let fact = fact_of(&action);
                conn.view.upsert(fact.clone());
                self.nudge_view();
                match fact {
                    Some((_, fact)) => PostOutcome::Action(fact),
                    None => PostOutcome::Failed(CallFailure::Ambiguous(
                        "MDE answered with an action of an unexpected type".into(),
                    )),
                }
            }
            Err(e) => PostOutcome::Failed(self.failure(conn, api, &e)),
        }
    }

    async fn write_status(&self, status: &DeviceIsolationStatus) -> Result<(), kube::Error> {
        let api: Api<DeviceIsolation> = Api::namespaced(
            self.ctx.kube.clone(),
            &self.di.namespace().unwrap_or_default(),
        );
        let patch = serde_json::json!({
            "apiVersion": DeviceIsolation::api_version(&()),
            "kind": DeviceIsolation::kind(&()),
            "status": status,
        });
        api.patch_status(
            &self.di.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(drop)
    }

    async fn publish(&self, notes: &[EventNote]) {
        if notes.is_empty() {
            return;
        }
        let regarding = self.di.object_ref(&());
        for note in notes {
            let kind = EventKind::of(note.warning);
            self.ctx
                .events
                .publish_logged(
                    &regarding,
                    kind,
                    note.reason.as_str(),
                    &note.note,
                    "Reconcile",
                )
                .await;
        }
    }

    fn release_quota(&self) {
        let Ok(conn) = self.conn() else { return };
        let gate = conn.mde.gate();
        for api in [
            QuotaApi::Isolate,
            QuotaApi::Unisolate,
            QuotaApi::MachineActionsRead,
        ] {
            gate.release(api, &self.key);
        }
    }
}

/// The planner's name for a client error.
pub fn failure_of(e: &MdeError) -> CallFailure {
    let msg = e.to_string();
    match e.class() {
        ErrorClass::MachineNotFound | ErrorClass::ActionNotFound => {
            CallFailure::MachineNotFound(msg)
        }
        ErrorClass::Forbidden => CallFailure::Forbidden(msg),
        ErrorClass::AuthenticationFailed => CallFailure::AuthenticationFailed(msg),
        ErrorClass::UnsupportedPlatform => CallFailure::UnsupportedPlatform(msg),
        ErrorClass::InvalidRequest => CallFailure::InvalidRequest(msg),
        ErrorClass::AlreadyInProgress => CallFailure::AlreadyInProgress,
        ErrorClass::RateLimited { retry_after } => CallFailure::RateLimited(retry_after),
        ErrorClass::Transient => CallFailure::Transient(msg),
        ErrorClass::Ambiguous => CallFailure::Ambiguous(msg),
        ErrorClass::QuotaWait { until } => {
            CallFailure::QuotaWait(until.saturating_duration_since(tokio::time::Instant::now()))
        }
    }
}
