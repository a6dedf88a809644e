//! The reconciler's I/O shell around [`planner::plan`]: gather facts, plan, perform the one effect
//! the plan asks for (a lookup or a POST), feed the outcome back, and write status only when it
//! changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;

use crate::crd::{DeviceIsolation, DeviceIsolationStatus};
use crate::events::{EventKind, EventPublisher};
use crate::mde::client::MdeClient;
use crate::mde::error::{ErrorClass, MdeError};
use crate::mde::odata::{Filter, ListQuery};
use crate::metrics::Metrics;
use crate::planner::{
    self, CallFailure, DeviceCandidate, Effect, Facts, Lookup, PostOutcome, Resolution, Sibling,
    Timing,
};
use crate::quota::{Api as QuotaApi, Priority};
use crate::resolver::DeviceResolver;
use crate::view::{ActionView, fact_of};

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
    /// The resource has no namespace (cannot happen for a namespaced kind).
    #[error("resource has no namespace")]
    NoNamespace,
}

/// State shared by every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub kube: kube::Client,
    /// MDE client (through the quota gate).
    pub mde: MdeClient,
    /// Shared view of isolation actions.
    pub view: Arc<ActionView>,
    /// Watch caches of all watched namespaces, for conflict detection across them.
    pub stores: Mutex<Vec<Store<DeviceIsolation>>>,
    /// Event publisher.
    pub events: EventPublisher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Retry timings.
    pub timing: Timing,
    /// Plan only.
    pub dry_run: bool,
    /// Wakes the batch poller early after a new action.
    pub poller_nudge: Arc<Notify>,
    /// Batches spec.deviceName lookups.
    resolver: Arc<DeviceResolver>,
    /// Markers whose POST this process knows was never sent (refused by the quota gate, failed
    /// before sending): they need no lookup before sending. Lost on restart, which is safe.
    unsent: Mutex<HashSet<String>>,
    /// Markers whose POST ended ambiguously, and when: no lookup may prove them absent before
    /// the settle time, even if the watch cache still shows an older status.
    ambiguous: Mutex<HashMap<String, chrono::DateTime<Utc>>>,
    /// One POST at a time per machine, so that two resources for one machine never race.
    machine_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Consecutive failed reconciles per resource, for exponential error backoff.
    error_counts: Mutex<HashMap<String, u32>>,
    /// When the per-phase resource gauges were last recounted (ms since the epoch).
    phases_counted_ms: std::sync::atomic::AtomicI64,
}

impl Context {
    /// Builds the context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kube: kube::Client,
        mde: MdeClient,
        view: Arc<ActionView>,
        events: EventPublisher,
        metrics: Arc<Metrics>,
        timing: Timing,
        dry_run: bool,
        poller_nudge: Arc<Notify>,
    ) -> Self {
        // Names asked for within a hundredth of the transient retry delay share one call.
        let resolver = DeviceResolver::new(mde.clone(), timing.transient_retry / 100);
        Context {
            kube,
            resolver,
            mde,
            view,
            stores: Mutex::new(Vec::new()),
            events,
            metrics,
            timing,
            dry_run,
            poller_nudge,
            unsent: Mutex::new(HashSet::new()),
            ambiguous: Mutex::new(HashMap::new()),
            machine_locks: Mutex::new(HashMap::new()),
            error_counts: Mutex::new(HashMap::new()),
            phases_counted_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    fn siblings(&self, di: &DeviceIsolation, machine: Option<&str>) -> Vec<Sibling> {
        let Some(machine) = machine else {
            return Vec::new();
        };
        let me = (di.namespace(), di.name_any());
        let stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores
            .iter()
            .flat_map(|s| s.state())
            .filter(|o| o.machine_id() == Some(machine))
            .filter(|o| (o.namespace(), o.name_any()) != me)
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .map(|o| Sibling {
                key: format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()),
                isolated: o.spec.isolated,
            })
            .collect()
    }

    /// Recounts resources by phase from the watch caches, at most once a second (a scan of the
    /// caches is O(resources); deleted resources never reach reconcile, so counting from the
    /// caches is what keeps the gauges true).
    fn count_phases(&self) {
        use std::sync::atomic::Ordering;
        let now = Utc::now().timestamp_millis();
        let last = self.phases_counted_ms.load(Ordering::Relaxed);
        if now - last < 1000
            || self
                .phases_counted_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let (mut ready, mut reconciling, mut stalled, mut unknown) = (0, 0, 0, 0);
        let stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        for di in stores.iter().flat_map(|s| s.state()) {
            let conds = di
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let is_true =
                |t: &str| crate::conditions::find(conds, t).is_some_and(|c| c.status == "True");
            if is_true(crate::conditions::STALLED) {
                stalled += 1;
            } else if is_true(crate::conditions::READY) {
                ready += 1;
            } else if is_true(crate::conditions::RECONCILING) {
                reconciling += 1;
            } else {
                unknown += 1;
            }
        }
        self.metrics.set_phase_counts(&[
            ("ready", ready),
            ("reconciling", reconciling),
            ("stalled", stalled),
            ("unknown", unknown),
        ]);
    }

    fn machine_lock(&self, machine: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.machine_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(machine.to_string()).or_default().clone()
    }

    fn is_unsent(&self, marker: &str) -> bool {
        self.unsent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(marker)
    }

    fn set_unsent(&self, marker: &str, unsent: bool) {
        let mut set = self.unsent.lock().unwrap_or_else(|e| e.into_inner());
        if unsent {
            set.insert(marker.to_string());
        } else {
            set.remove(marker);
        }
    }
}

/// Reconciles one DeviceIsolation.
pub async fn reconcile(di: Arc<DeviceIsolation>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = reconcile_inner(&di, &ctx).await;
    ctx.metrics.reconciled(result.is_ok());
    ctx.count_phases();
    if result.is_ok() {
        ctx.error_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&resource_key(&di));
    }
    result
}

async fn reconcile_inner(di: &DeviceIsolation, ctx: &Context) -> Result<Action, Error> {
    let namespace = di.namespace().ok_or(Error::NoNamespace)?;
    let name = di.name_any();
    let key = format!("{namespace}/{name}");
    if di.metadata.deletion_timestamp.is_some() {
        ctx.view.unwatch(&(namespace, name));
        return Ok(Action::await_change());
    }
    // Unknown until spec.deviceName is resolved (then recorded in status and reused).
    let mut machine = di.machine_id().map(str::to_string);
    if let Some(m) = &machine {
        ctx.view.watch((namespace.clone(), name.clone()), m);
    }

    let uid = di.uid().unwrap_or_default();
    let generation = di.metadata.generation.unwrap_or(1);
    let mut siblings = ctx.siblings(di, machine.as_deref());
    let persisted = di.status.clone().unwrap_or_default();
    let mut written = persisted.clone();
    let mut status = persisted.clone();
    let mut facts = Facts {
        synced: ctx.view.is_synced(),
        view_failure: ctx.view.load_failure(),
        actions: machine
            .as_deref()
            .map(|m| ctx.view.actions_for(m))
            .unwrap_or_default(),
        ..Facts::default()
    };
    let mut machine_guard = None;

    for _ in 0..MAX_ROUNDS {
        facts.intent_unsent = status
            .intent
            .as_ref()
            .is_some_and(|i| ctx.is_unsent(&i.marker));
        facts.intent_ambiguous_at = status.intent.as_ref().and_then(|i| {
            ctx.ambiguous
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&i.marker)
                .copied()
        });
        let plan = planner::plan(&planner::Input {
            namespace: &namespace,
            name: &name,
            uid: &uid,
            generation,
            spec: &di.spec,
            comment: di.comment(),
            retry_request: di.retry_request(),
            status: &status,
            siblings: &siblings,
            facts: &facts,
            now: Utc::now(),
            dry_run: ctx.dry_run,
            timing: &ctx.timing,
        });
        facts.post = None;
        if waits_for_view(&plan) {
            // The poller loads the view on demand only, so that a restart over converged
            // resources makes no MDE call; this resource needs it now.
            ctx.poller_nudge.notify_one();
        }
        publish_events(ctx, di, &plan.events).await;
        status = plan.status;

        if machine.is_none()
            && let Some(resolved) = status.machine_id.clone()
        {
            // The device name was just resolved: from now on this is a machine like any other.
            ctx.view.watch((namespace.clone(), name.clone()), &resolved);
            facts.actions = ctx.view.actions_for(&resolved);
            siblings = ctx.siblings(di, Some(&resolved));
            machine = Some(resolved);
        }

        match plan.effect {
            Effect::ResolveDevice { device_name } => {
                facts.resolution = match ctx.resolver.resolve(&device_name).await {
                    Ok(found) => Resolution::Found(
                        found
                            .into_iter()
                            .map(|m| DeviceCandidate {
                                id: m.id,
                                health_status: m.health_status,
                            })
                            .collect(),
                    ),
                    Err(e) => Resolution::Failed(to_failure(ctx, QuotaApi::MachinesRead, &e)),
                };
            }
            Effect::None => {
                write_status(ctx, di, &written, &status).await?;
                if plan.requeue.is_none() {
                    // Ready or Stalled: a slot reserved earlier (a request that had to wait,
                    // then was adopted or stalled) would only hold quota from others.
                    for api in [
                        QuotaApi::Isolate,
                        QuotaApi::Unisolate,
                        QuotaApi::MachineActionsRead,
                    ] {
                        ctx.mde.gate().release(api, &key);
                    }
                }
                return Ok(match plan.requeue {
                    Some(after) => Action::requeue(after.max(Duration::from_millis(50))),
                    None => Action::await_change(),
                });
            }
            Effect::Lookup {
                machine_id,
                created_since,
            } => {
                facts.lookup = match lookup(ctx, &machine_id, created_since, &key).await {
                    Ok(()) => Lookup::Done,
                    Err(failure) => Lookup::Failed(failure),
                };
                facts.actions = ctx.view.actions_for(&machine_id);
            }
            Effect::Post {
                machine_id,
                kind,
                isolation_type,
                comment,
            } => {
                if machine_guard.is_none() {
                    let lock = ctx.machine_lock(&machine_id);
                    machine_guard = Some(lock.lock_owned().await);
                }
                let api = match kind {
                    planner::ActionKind::Unisolate => QuotaApi::Unisolate,
                    planner::ActionKind::Isolate => QuotaApi::Isolate,
                };
                let marker = status
                    .intent
                    .as_ref()
                    .map(|i| i.marker.clone())
                    .unwrap_or_default();
                // A retry (its earlier action failed) waits behind every first attempt, so that
                // a few failing devices do not delay the rest of a burst.
                let attempt = status.intent.as_ref().map_or(1, |i| i.attempt);
                ctx.mde.gate().set_priority(
                    &key,
                    if attempt > 1 {
                        Priority::Low
                    } else {
                        Priority::Normal
                    },
                );
                // The intent reaches the API server before the POST leaves: crash safety. When it
                // is already there (a request that waited for quota), nothing is written: a write
                // that only flips the reason back and forth would wake this resource again and
                // again while it waits. When the request would only wait, its slot is held and the
                // intent is written once, together with the reason it waits: one write per
                // resource instead of two while a burst is queued.
                if written.intent != status.intent {
                    if let Some(slot) = ctx.mde.gate().hold(api, &key, tokio::time::Instant::now())
                    {
                        let wait = slot.saturating_duration_since(tokio::time::Instant::now());
                        ctx.set_unsent(&marker, true);
                        facts.post = Some(PostOutcome::Failed(quota_failure(ctx, api, wait)));
                        continue;
                    }
                    write_status(ctx, di, &written, &status).await?;
                    written = status.clone();
                }
                let result = match kind {
                    planner::ActionKind::Unisolate => {
                        ctx.mde.unisolate(&machine_id, &comment, &key).await
                    }
                    planner::ActionKind::Isolate => {
                        ctx.mde
                            .isolate(&machine_id, &comment, isolation_type, &key)
                            .await
                    }
                };
                facts.post = Some(match result {
                    Ok(action) => {
                        ctx.set_unsent(&marker, false);
                        ctx.view.upsert(fact_of(&action));
                        ctx.poller_nudge.notify_one();
                        match fact_of(&action) {
                            Some((_, fact)) => PostOutcome::Action(fact),
                            None => PostOutcome::Failed(CallFailure::Ambiguous(
                                "MDE answered with an action of an unexpected type".into(),
                            )),
                        }
                    }
                    Err(e) => {
                        let failure = to_failure(ctx, api, &e);
                        let certainly_unsent = !matches!(failure, CallFailure::Ambiguous(_));
                        ctx.set_unsent(&marker, certainly_unsent);
                        if !certainly_unsent {
                            let mut ambiguous =
                                ctx.ambiguous.lock().unwrap_or_else(|e| e.into_inner());
                            // Forget old entries (markers are unique per request).
                            ambiguous.retain(|_, at| Utc::now() - *at < chrono::Duration::hours(1));
                            ambiguous.insert(marker.clone(), Utc::now());
                        }
                        PostOutcome::Failed(failure)
                    }
                });
                facts.actions = ctx.view.actions_for(&machine_id);
            }
        }
    }
    tracing::error!(resource = %key, "planner did not settle; retrying later");
    write_status(ctx, di, &written, &status).await?;
    Ok(Action::requeue(ctx.timing.transient_retry))
}

fn waits_for_view(plan: &planner::Plan) -> bool {
    crate::conditions::find(&plan.status.conditions, crate::conditions::RECONCILING)
        .is_some_and(|c| c.reason == planner::WAITING_FOR_VIEW)
}

/// Lists the machine's Isolate/Unisolate actions (open ones, and recent ones when `since` is
/// given) into the view.
async fn lookup(
    ctx: &Context,
    machine_id: &str,
    created_since: Option<chrono::DateTime<Utc>>,
    key: &str,
) -> Result<(), CallFailure> {
    let mut filter =
        Filter::eq("machineId", machine_id).and(Filter::is_in("type", ["Isolate", "Unisolate"]));
    if let Some(since) = created_since {
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
    match ctx.mde.list_actions(&query, key).await {
        Ok(actions) => {
            ctx.view.upsert(actions.iter().filter_map(fact_of));
            Ok(())
        }
        Err(e) => Err(to_failure(ctx, QuotaApi::MachineActionsRead, &e)),
    }
}

/// Converts a client error into the planner's vocabulary, counting quota waits.
fn to_failure(ctx: &Context, api: QuotaApi, e: &MdeError) -> CallFailure {
    match failure_of(e) {
        CallFailure::QuotaWait(wait) => quota_failure(ctx, api, wait),
        other => other,
    }
}

/// A wait at the quota gate, counted. While MDE itself holds the API back (a 429's pause, or its
/// probe not answered yet) the resource says `RateLimited` for as long as that lasts, not only
/// the one resource whose call drew the 429: everyone waiting then waits for MDE, not for the
/// operator's budget.
fn quota_failure(ctx: &Context, api: QuotaApi, wait: Duration) -> CallFailure {
    ctx.metrics.quota_waited(api, wait);
    if ctx.mde.gate().throttled(api, tokio::time::Instant::now()) {
        CallFailure::RateLimited(wait)
    } else {
        CallFailure::QuotaWait(wait)
    }
}

/// Converts a client error into the planner's vocabulary.
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

/// Writes `desired` with server-side apply when it differs from what was last written. Fields
/// the operator no longer sets are removed because it owns the whole status.
async fn write_status(
    ctx: &Context,
    di: &DeviceIsolation,
    written: &DeviceIsolationStatus,
    desired: &DeviceIsolationStatus,
) -> Result<(), Error> {
    if written == desired {
        return Ok(());
    }
    let api: Api<DeviceIsolation> =
        Api::namespaced(ctx.kube.clone(), &di.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": DeviceIsolation::api_version(&()),
        "kind": DeviceIsolation::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &di.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::StatusWrite)?;
    Ok(())
}

async fn publish_events(ctx: &Context, di: &DeviceIsolation, notes: &[planner::EventNote]) {
    if notes.is_empty() {
        return;
    }
    let regarding = di.object_ref(&());
    for note in notes {
        let kind = if note.warning {
            EventKind::Warning
        } else {
            EventKind::Normal
        };
        // An event that cannot be published must not fail the reconcile; status holds the truth.
        if let Err(e) = ctx
            .events
            .publish(&regarding, kind, &note.reason, &note.note, "Reconcile")
            .await
        {
            tracing::warn!(error = %e, reason = %note.reason, "could not publish event");
        }
    }
}

fn resource_key(di: &DeviceIsolation) -> String {
    format!("{}/{}", di.namespace().unwrap_or_default(), di.name_any())
}

/// Exponential backoff for reconciles that failed on the Kubernetes side (a flat requeue would
/// hammer an API server that is already in trouble).
pub fn error_policy(di: Arc<DeviceIsolation>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = resource_key(&di);
    let failures = {
        let mut counts = ctx.error_counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = ctx
        .timing
        .transient_retry
        .saturating_mul(1u32 << (failures - 1).min(5))
        .min(ctx.timing.backoff_max);
    tracing::warn!(resource = %key, %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
