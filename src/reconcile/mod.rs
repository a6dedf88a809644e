//! Reconciling one DeviceIsolation: plan → perform → feed back.
//!
//! - [`vocab`]: the types every part speaks (actions, facts, effects, plans, reasons).
//! - [`plan`](mod@plan): the pure decision, table-tested.
//! - [`effects`]: the one place that calls MDE, the quota gate and the API server.
//! - [`memory`]: what the process remembers per resource, freed on delete.
//!
//! The driver below asks the planner for the next step, performs the one effect it names, feeds
//! the outcome back into the facts, and plans again until nothing is left to do; the status is
//! written only when it changed. It decides nothing itself.

pub mod effects;
pub mod memory;
pub mod plan;
pub mod requeue;
pub mod vocab;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;

pub use effects::{Effects, Live, Request, failure_of};
pub use memory::Memory;
pub use plan::plan;
pub use requeue::Requeues;
pub use vocab::*;

use crate::cache::{Cached, Report, Stores};
use crate::connection::Connections;
use crate::crd::DeviceIsolationStatus;
use crate::events::EventPublisher;
use crate::metrics::Metrics;
use crate::poller::Wake;
use crate::quota::QuotaGate;
use crate::view::ActionView;

/// Field manager of the operator's status writes.
pub const FIELD_MANAGER: &str = "mde-isolation-operator";

/// Plan/act rounds per reconcile: plan, lookup, plan, POST, plan, lookup, plan is the longest
/// useful chain; a cap keeps a bug from looping against the quota.
const MAX_ROUNDS: usize = 8;

/// Errors that end a reconcile early; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused a status write.
    #[error("writing status: {0}")]
    StatusWrite(#[source] kube::Error),
}

/// State shared by every reconcile; each piece has this one owner.
pub struct Context {
    /// Kubernetes client (status writes).
    pub kube: kube::Client,
    /// The MDE connections: each with its client (token cache, quota gate), view, poller and
    /// resolver.
    pub connections: Arc<Connections>,
    /// Watch caches of every watched scope.
    pub stores: Stores,
    /// Watch caches of the DeviceIsolationSets of every watched scope.
    pub sets: crate::fleet::SetStores,
    /// Set selections written and not cached yet.
    pub selections: crate::fleet::Selections,
    /// A set selecting more devices waits for a second person's approval (0: never).
    pub approval_threshold: u32,
    /// Whether the API server vouches for requested-by.
    pub accountability: Arc<crate::accountability::Accountability>,
    /// Per-resource process memory.
    pub memory: Memory,
    /// When each resource is reconciled again without a change.
    pub requeues: Requeues,
    /// Event publisher.
    pub events: EventPublisher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Retry timings.
    pub timing: Timing,
    /// Plan only.
    pub dry_run: bool,
    /// Wakes resources (those sharing a machine with a deleted or changed one).
    pub waker: Arc<dyn Wake>,
}

/// Reconciles one DeviceIsolation. Its next reconcile without a change goes to
/// [`Context::requeues`], not to the controller's queue (see [`requeue`]).
pub async fn reconcile(di: Arc<Cached>, ctx: Arc<Context>) -> Result<Action, Error> {
    let resource = ResourceRef::from_obj(&*di);
    let conn = ctx.connections.of(
        resource.namespace.as_deref().unwrap_or_default(),
        di.spec.connection_ref.as_ref(),
    );
    // A connection being read or verified: wait for it (it wakes its resources when it is
    // decided) without a status write in between.
    let next = if let Err(p) = &conn
        && p.kind == crate::connection::ProblemKind::Pending
    {
        Some(ctx.timing.view_not_synced_retry)
    } else {
        let conn = conn.map_err(|p| ConnectionProblem::of(&p));
        let fx = Live::new(&ctx, conn, &di);
        let result = drive(&di, &fx, &ctx.memory, &ctx.timing, ctx.dry_run).await;
        ctx.metrics.reconciled(result.is_ok());
        let next = result?;
        ctx.memory.succeeded(&resource);
        next
    };
    ctx.requeue(&resource, next);
    Ok(Action::await_change())
}

/// One reconcile: plan → perform → feed back, until the plan asks for nothing. Returns when to
/// reconcile again without a change (`None`: only on a change).
pub async fn drive<E: Effects>(
    di: &Cached,
    fx: &E,
    memory: &Memory,
    timing: &Timing,
    dry_run: bool,
) -> Result<Option<Duration>, Error> {
    let resource = ResourceRef::from_obj(di);
    // Remembered first, checked second (see `Live::watch`): a deletion reported meanwhile
    // cannot leave an entry behind, and a deleted resource requests nothing.
    memory.track(&resource);
    let Some(mut pass) = Pass::start(di, fx) else {
        memory.forget(&resource);
        return Ok(None);
    };
    for _ in 0..MAX_ROUNDS {
        let plan = pass.plan(di, memory, timing, dry_run, fx.now());
        if plan.needs_view(&pass.facts) {
            fx.nudge_view();
        }
        fx.publish(&plan.events).await;
        pass.status = plan.status.clone();
        pass.follow_resolved_machine(fx);
        match plan.effect {
            Effect::None => return pass.finish(fx, &plan).await,
            Effect::ResolveDevice { device_name } => {
                pass.facts.resolution = pass.resolve(di, fx, memory, &device_name).await;
            }
            Effect::Lookup {
                machine_id,
                created_since,
            } => {
                pass.facts.lookup = fx.lookup(&machine_id, created_since).await;
                pass.facts.actions = fx.actions_for(&machine_id);
            }
            Effect::Post {
                machine_id,
                kind,
                isolation_type,
                comment,
                priority,
            } => {
                let request = Request {
                    machine_id,
                    kind,
                    isolation_type,
                    comment,
                    priority,
                };
                let outcome = pass.post(fx, &request).await?;
                if let Some(intent) = &pass.status.intent {
                    memory.after_post(&pass.resource, &intent.marker, &outcome, fx.now());
                }
                pass.facts.post = Some(outcome);
                pass.facts.actions = fx.actions_for(&request.machine_id);
            }
        }
    }
    tracing::error!(resource = %key_of(&pass.resource), "planner did not settle; retrying later");
    pass.write(fx).await?;
    Ok(Some(timing.transient_retry))
}

/// What one reconcile knows and has written so far.
struct Pass {
    resource: ResourceRef,
    /// Unknown until spec.deviceName is resolved (then recorded in status and reused).
    machine: Option<String>,
    siblings: Vec<Sibling>,
    /// The status last written (or read).
    written: DeviceIsolationStatus,
    /// The status the plans have led to.
    status: DeviceIsolationStatus,
    facts: Facts,
}

impl Pass {
    /// `None` when the resource is gone.
    fn start<E: Effects>(di: &Cached, fx: &E) -> Option<Self> {
        let machine = di.machine_id().map(str::to_string);
        let present = match &machine {
            Some(m) => fx.watch(m),
            None => fx.present(),
        };
        if !present {
            return None;
        }
        let (synced, view_failure) = fx.view_state();
        let persisted = di.status.clone().unwrap_or_default();
        Some(Pass {
            resource: ResourceRef::from_obj(di),
            siblings: machine
                .as_deref()
                .map(|m| fx.siblings(m))
                .unwrap_or_default(),
            facts: Facts {
                synced,
                view_failure,
                set_hold: fx.set_hold(),
                requester_verified: fx.requester_verified(),
                connection: fx.connection(),
                actions: machine
                    .as_deref()
                    .map(|m| fx.actions_for(m))
                    .unwrap_or_default(),
                ..Facts::default()
            },
            machine,
            written: persisted.clone(),
            status: persisted,
        })
    }

    /// The planner's next step, from the resource, the facts and the process's memory.
    fn plan(
        &mut self,
        di: &Cached,
        memory: &Memory,
        timing: &Timing,
        dry_run: bool,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Plan {
        let marker = self.status.intent.as_ref().map(|i| i.marker.as_str());
        self.facts.intent_unsent = marker.is_some_and(|m| memory.unsent(&self.resource, m));
        self.facts.intent_ambiguous_at =
            marker.and_then(|m| memory.ambiguous_at(&self.resource, m));
        self.facts.intent_rejected = marker.and_then(|m| memory.rejected(&self.resource, m));
        let plan = plan::plan(&Input {
            namespace: self.resource.namespace.as_deref().unwrap_or_default(),
            name: &self.resource.name,
            uid: di.metadata.uid.as_deref().unwrap_or_default(),
            generation: di.metadata.generation.unwrap_or(1),
            spec: &di.spec,
            comment: di.comment(),
            retry_request: di.retry_request(),
            requested_by: di.requested_by(),
            approved_by: di.approver(),
            status: &self.status,
            siblings: &self.siblings,
            facts: &self.facts,
            now,
            dry_run,
            timing,
        });
        self.facts.post = None;
        plan
    }

    /// Resolves spec.deviceName once per generation and retry request in this process: a
    /// reconcile from a watch cache that does not show the written result yet reuses it.
    async fn resolve<E: Effects>(
        &self,
        di: &Cached,
        fx: &E,
        memory: &Memory,
        device_name: &str,
    ) -> Resolution {
        let key = memory::resolution_key(
            di.metadata.generation.unwrap_or(1),
            di.retry_request(),
            device_name,
        );
        if let Some(found) = memory.resolution(&self.resource, &key) {
            return Resolution::Found(found);
        }
        let resolution = fx.resolve(device_name).await;
        if let Resolution::Found(found) = &resolution {
            memory.resolved(&self.resource, key, found);
        }
        resolution
    }

    /// A device name was just resolved: from now on this is a machine like any other.
    fn follow_resolved_machine<E: Effects>(&mut self, fx: &E) {
        if self.machine.is_some() {
            return;
        }
        if let Some(resolved) = self.status.machine_id.clone() {
            fx.watch(&resolved);
            self.facts.actions = fx.actions_for(&resolved);
            self.siblings = fx.siblings(&resolved);
            self.machine = Some(resolved);
        }
    }

    /// The intent reaches the API server before the POST leaves (crash safety). A request that
    /// would only wait for quota holds its slot instead and its intent is written once, with the
    /// reason it waits (by the plan that follows). When the intent is already there (a request
    /// that waited), nothing is written: a write that only flips the reason back and forth would
    /// wake the resource again and again while it waits.
    async fn post<E: Effects>(&mut self, fx: &E, request: &Request) -> Result<PostOutcome, Error> {
        if self.written.intent != self.status.intent {
            if let Some(wait) = fx.hold(request) {
                return Ok(PostOutcome::Failed(wait));
            }
            self.write(fx).await?;
        }
        Ok(fx.post(request).await)
    }

    async fn finish<E: Effects>(&mut self, fx: &E, plan: &Plan) -> Result<Option<Duration>, Error> {
        self.write(fx).await?;
        if plan.settled() {
            fx.release_quota();
        }
        Ok(plan
            .requeue
            .map(|after| after.max(Duration::from_millis(50))))
    }

    /// Writes the status when it differs from what was last written.
    async fn write<E: Effects>(&mut self, fx: &E) -> Result<(), Error> {
        if self.written != self.status {
            fx.write_status(&self.status)
                .await
                .map_err(Error::StatusWrite)?;
            self.written = self.status.clone();
        }
        Ok(())
    }
}

/// Every owner of per-resource state in the process.
pub struct Owners<'a> {
    /// Per-resource memory.
    pub memory: &'a Memory,
    /// Each connection's interest in machines and quota reservations and priority classes (a
    /// resource holds them in its own connection's only, but which one is not known once it is
    /// deleted).
    pub connections: &'a [(&'a ActionView, &'a QuotaGate)],
    /// When resources are reconciled again.
    pub requeues: &'a Requeues,
    /// Wakes other resources.
    pub waker: &'a dyn Wake,
}

impl Owners<'_> {
    /// Frees everything held for `resource` (its memory, its interest in a machine, its quota
    /// slots) and wakes the resources it shared `machine` with: a partner stalled in `Conflict`
    /// may proceed now.
    pub fn forget(&self, resource: &ResourceRef, machine: Option<&str>) {
        self.memory.forget(resource);
        self.requeues.forget(resource);
        for (view, gate) in self.connections {
            let watched = view.unwatch(resource);
            gate.forget(&key_of(resource));
            let machines: HashSet<String> = watched
                .into_iter()
                .chain(machine.map(String::from))
                .collect();
            self.wake_others(view, &machines, resource);
        }
    }

    /// What rule 6 reads of `resource` changed on `machines`: wakes the others there, in every
    /// connection.
    pub fn siblings_changed(&self, resource: &ResourceRef, machines: &[String]) {
        for (view, _) in self.connections {
            self.wake_others(view, machines, resource);
        }
    }

    /// Wakes the resources other than `resource` that watch any of `machines` in `view`.
    fn wake_others<'m>(
        &self,
        view: &ActionView,
        machines: impl IntoIterator<Item = &'m String>,
        resource: &ResourceRef,
    ) {
        for other in view.watchers_of(machines) {
            if other != *resource {
                self.waker.wake(&other);
            }
        }
    }

    /// A (re-)list of `scope` (a namespace; every one when `None`) holds exactly `present`: frees
    /// every resource of that scope it does not hold (deleted while the watch was down).
    pub fn relisted(&self, scope: Option<&str>, present: &HashSet<ResourceRef>) {
        let of_scope = |r: &ResourceRef| scope.is_none_or(|s| r.namespace.as_deref() == Some(s));
        for resource in self.memory.retain(|r| !of_scope(r) || present.contains(r)) {
            self.forget(&resource, None);
        }
    }

    /// Resources each owner holds state for.
    pub fn tracked(&self) -> [(&'static str, usize); 4] {
        [
            ("memory", self.memory.len()),
            ("requeue", self.requeues.len()),
            (
                "view",
                self.connections.iter().map(|(v, _)| v.watched()).sum(),
            ),
            (
                "quota",
                self.connections
                    .iter()
                    .map(|(_, g)| g.keys(is_resource_key))
                    .sum(),
            ),
        ]
    }
}

impl Context {
    /// Resources each per-resource owner still holds state for.
    pub fn tracked(&self) -> [(&'static str, usize); 4] {
        let live = self.connections.all();
        let parts: Vec<_> = live.iter().map(|c| (&*c.view, &**c.mde.gate())).collect();
        self.owners(&parts).tracked()
    }

    fn owners<'a>(&'a self, connections: &'a [(&'a ActionView, &'a QuotaGate)]) -> Owners<'a> {
        Owners {
            memory: &self.memory,
            requeues: &self.requeues,
            connections,
            waker: &*self.waker,
        }
    }

    /// Sets when `resource` is reconciled again without a change ([`Requeues`]), under the
    /// reference its memory holds; `None`: only on a change.
    fn requeue(&self, resource: &ResourceRef, after: Option<Duration>) {
        match after {
            Some(after) => {
                let now = tokio::time::Instant::now();
                self.requeues.set(self.memory.shared(resource), after, now);
            }
            None => self.requeues.forget(resource),
        }
    }

    /// Frees what the watches report gone (the gauges follow on the next 5 s tick); wakes the
    /// resources whose siblings changed.
    pub fn report(&self, report: Report) {
        let live = self.connections.all();
        let parts: Vec<_> = live.iter().map(|c| (&*c.view, &**c.mde.gate())).collect();
        let owners = self.owners(&parts);
        match report {
            Report::Siblings { resource, machines } => {
                owners.siblings_changed(&resource, &machines)
            }
            Report::Deleted { resource, machine } => owners.forget(&resource, machine.as_deref()),
            Report::Relisted { scope, present } => owners.relisted(scope.as_deref(), &present),
        }
    }
}

/// Exponential backoff for reconciles that failed on the Kubernetes side (a flat requeue would
/// hammer an API server that is already in trouble).
pub fn error_policy(di: Arc<Cached>, error: &Error, ctx: Arc<Context>) -> Action {
    let resource = ResourceRef::from_obj(&*di);
    let failures = ctx.memory.failed(&resource);
    let delay = ctx
        .timing
        .transient_retry
        .saturating_mul(1u32 << (failures - 1).min(5))
        .min(ctx.timing.backoff_max);
    tracing::warn!(resource = %key_of(&resource), %error, failures, retry_in = ?delay, "reconcile failed");
    ctx.requeue(&resource, Some(delay));
    Action::await_change()
}
