//! Leader election on a `coordination.k8s.io/v1` Lease, so that a second replica can stand by
//! while only one talks to MDE.
//!
//! The protocol is the one client-go's leader election follows:
//!
//! - A candidate reads the Lease every retry period. It takes the Lease when it is absent, has no
//!   holder (released), is held by this very identity (a restarted container), or has shown the
//!   same holder and `renewTime` for a whole lease duration *measured on the candidate's own
//!   clock since it first read that record*. No timestamp written by another node is compared
//!   with local time, so clock skew between nodes cannot make two replicas lead.
//! - Every write is a create, or a replace carrying the `resourceVersion` that was read: when two
//!   candidates race, the API server accepts one and answers 409 to the other.
//! - The leader renews every retry period. When no renewal has succeeded for the renew deadline
//!   (two thirds of the lease duration, counted from the *start* of the last successful request)
//!   it has lost the lease, while a candidate still has to wait a full lease duration after the
//!   last renewal it saw: the margin between the two is what keeps the old leader's last MDE
//!   call before the new leader's first.
//! - On shutdown the leader clears the holder, and a standby takes over on its next read instead
//!   of waiting for the lease to expire.
//!
//! Why not the `kube-lease-manager` crate (it supports kube 5): it writes the Lease with
//! server-side apply, which needs the `patch` verb, and its watch loop keeps reporting
//! leadership while renewals fail, so a holder cut off from the API server would go on calling
//! MDE after a standby took over. Here losing is a state of its own ([`Role::Lost`]) that the
//! caller acts on at once.
//!
//! RBAC: `get`, `create` and `update` on `leases` in the Lease's namespace.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Exit code of a process that lost its lease (see [`Role::Lost`]).
pub const LOST_EXIT_CODE: i32 = 3;

/// Where the Lease lives and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Name of the Lease.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity, written as `holderIdentity`; unique among the replicas.
    pub identity: String,
    /// Timings derived from the lease duration.
    pub timing: LeaseTiming,
    /// Set while another live replica holds the Lease (feeds readiness: a leader is known).
    pub leader_seen: Arc<AtomicBool>,
}

/// Lease timings. They concern Kubernetes, not MDE, so `--time-scale` never divides them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a holder's lease lasts after its last renewal, as other candidates count it.
    pub duration: Duration,
    /// How long the holder keeps leading without a successful renewal (less than `duration`).
    pub renew_deadline: Duration,
    /// Interval between reads of a candidate, between renewals of the holder, and between
    /// retries of a failed request.
    pub retry_period: Duration,
}

impl LeaseTiming {
    /// client-go's proportions (15 s, 10 s, 2 s): the renew deadline is 2/3 of the duration and
    /// the retry period 2/15 of it (at least 100 ms).
    pub fn from_duration(duration: Duration) -> Self {
        LeaseTiming {
            duration,
            renew_deadline: duration * 2 / 3,
            retry_period: (duration * 2 / 15).max(Duration::from_millis(100)),
        }
    }

    /// The duration in whole seconds, as `leaseDurationSeconds` holds it.
    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// This replica's identity: the `POD_NAME` environment variable, else `hostname_pid`.
pub fn default_identity() -> String {
    identity_from(
        std::env::var("POD_NAME").ok(),
        hostname(),
        std::process::id(),
    )
}

fn identity_from(pod_name: Option<String>, hostname: Option<String>, pid: u32) -> String {
    let non_empty = |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    match non_empty(pod_name) {
        Some(pod) => pod,
        None => format!(
            "{}_{pid}",
            non_empty(hostname).unwrap_or_else(|| "localhost".into())
        ),
    }
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
}

/// What a candidate does after reading the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// The Lease is free (released, expired, or ours already): replace it, holding it.
    Take,
    /// Someone else holds it: read again after (at most) this long.
    Wait(Duration),
}

/// Decides whether a candidate may take the Lease. `lease` is `None` when it does not exist
/// (`Some(None)` when it has no spec); `unchanged_for` is how long this candidate has read the
/// same holder and renew time (see [`Observation`]).
pub fn decide(
    lease: Option<Option<&LeaseSpec>>,
    me: &str,
    unchanged_for: Duration,
    timing: &LeaseTiming,
) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty());
    match holder {
        None => Decision::Take,
        Some(h) if h == me => Decision::Take,
        Some(_) => {
            // The holder's own duration, which it chose and renews against.
            let lasts = spec
                .and_then(|s| s.lease_duration_seconds)
                .filter(|s| *s > 0)
                .map_or(timing.duration, |s| Duration::from_secs(s as u64));
            match lasts.checked_sub(unchanged_for) {
                Some(left) if !left.is_zero() => Decision::Wait(left),
                _ => Decision::Take,
            }
        }
    }
}

/// A candidate's memory of the holder and renew time it read last, and since when (its own
/// monotonic clock): client-go's "observed time".
#[derive(Debug, Default)]
pub struct Observation {
    record: Option<(Option<String>, Option<MicroTime>)>,
    since: Option<Instant>,
}

impl Observation {
    /// Notes the record read at `now`; returns how long the same record has been seen.
    pub fn observe(&mut self, spec: Option<&LeaseSpec>, now: Instant) -> Duration {
        let record = (
            spec.and_then(|s| s.holder_identity.clone()),
            spec.and_then(|s| s.renew_time.clone()),
        );
        match (&self.record, self.since) {
            (Some(seen), Some(since)) if *seen == record => now.saturating_duration_since(since),
            _ => {
                self.record = Some(record);
                self.since = Some(now);
                Duration::ZERO
            }
        }
    }
}

/// The spec that makes `me` the holder at `now`: a takeover sets `acquireTime` and counts a
/// transition, a renewal only moves `renewTime`.
pub fn claim(
    current: Option<&LeaseSpec>,
    me: &str,
    timing: &LeaseTiming,
    now: Timestamp,
) -> LeaseSpec {
    let mut spec = current.cloned().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(me) {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(match current {
            None => 0,
            Some(c) => c.lease_transitions.unwrap_or(0).saturating_add(1),
        });
    }
    spec.holder_identity = Some(me.to_string());
    spec.lease_duration_seconds = Some(timing.duration_seconds());
    spec.renew_time = Some(MicroTime(now));
    spec
}

/// The spec of a released Lease: no holder, so a candidate takes it on its next read.
pub fn released(current: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let mut spec = current.cloned().unwrap_or_default();
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(now));
    spec
}

/// Where this replica stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the Lease (hot standby).
    Candidate,
    /// Holding the Lease: may talk to MDE.
    Leader,
    /// Held the Lease and could not renew it within the renew deadline, or found another holder.
    /// Final: a standby may take over soon, so the caller must stop talking to MDE at once.
    Lost,
}

/// A running election; see the module documentation.
pub struct Election {
    role: watch::Receiver<Role>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Election {
    /// Starts campaigning for the Lease in the background.
    pub fn start(client: kube::Client, config: LeaseConfig) -> Self {
        let (tx, rx) = watch::channel(Role::Candidate);
        let stop = CancellationToken::new();
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let task = tokio::spawn(elect(api, config, tx, stop.clone()));
        Election {
            role: rx,
            stop,
            task,
        }
    }

    /// This replica's role, as it changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Stops campaigning or renewing and, when leading, releases the Lease so that a standby
    /// takes over at once. Call it only once this process has stopped talking to MDE.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn elect(
    api: Api<Lease>,
    cfg: LeaseConfig,
    role: watch::Sender<Role>,
    stop: CancellationToken,
) {
    tracing::info!(
        lease = %cfg.name,
        namespace = %cfg.namespace,
        identity = %cfg.identity,
        duration = ?cfg.timing.duration,
        "campaigning for leadership"
    );
    let Some((mut lease, renewed_at)) = campaign(&api, &cfg, &stop).await else {
        return;
    };
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired the lease: leading");
    role.send_replace(Role::Leader);
    match hold(&api, &cfg, &mut lease, renewed_at, &stop).await {
        Held::Stopped => release(&api, &cfg, lease).await,
        Held::Lost(why) => {
            tracing::error!(lease = %cfg.name, identity = %cfg.identity, %why, "lost the lease");
            role.send_replace(Role::Lost);
        }
    }
}

/// Reads and tries to take the Lease until this replica holds it (the Lease as written, and the
/// instant the winning request started), or `stop`.
async fn campaign(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    stop: &CancellationToken,
) -> Option<(Lease, Instant)> {
    let retry = cfg.timing.retry_period;
    let mut seen = Observation::default();
    let mut last_holder: Option<String> = None;
    loop {
        // Bounded, so that a hung API server neither stalls the campaign nor delays shutdown. A
        // write that went through unanswered is harmless: the next read shows this identity as
        // the holder, and it is taken (renewed) again.
        let step = tokio::time::timeout(
            cfg.timing.renew_deadline,
            campaign_step(api, cfg, &mut seen, &mut last_holder),
        );
        let wait = tokio::select! {
            _ = stop.cancelled() => return None,
            step = step => match step {
                Ok(Step::Won(lease, started)) => return Some((*lease, started)),
                Ok(Step::Again(wait)) => wait,
                Err(_) => {
                    tracing::warn!(lease = %cfg.name, "the API server did not answer in time");
                    retry
                }
            },
        };
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What one read (and possibly one write) of the campaign came to.
enum Step {
    /// This replica holds the Lease; the winning request started at that instant.
    Won(Box<Lease>, Instant),
    /// Try again after this long.
    Again(Duration),
}

async fn campaign_step(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    seen: &mut Observation,
    last_holder: &mut Option<String>,
) -> Step {
    let retry = cfg.timing.retry_period;
    let current = match api.get_opt(&cfg.name).await {
        Ok(current) => current,
        Err(e) => {
            tracing::warn!(lease = %cfg.name, error = %e, "reading the lease");
            return Step::Again(retry);
        }
    };
    let spec = current.as_ref().map(|l| l.spec.as_ref());
    let unchanged = spec.map_or(Duration::ZERO, |s| seen.observe(s, Instant::now()));
    let decision = decide(spec, &cfg.identity, unchanged, &cfg.timing);
    cfg.leader_seen
        .store(matches!(decision, Decision::Wait(_)), Ordering::Relaxed);
    if let Decision::Wait(left) = decision {
        let holder = spec.flatten().and_then(|s| s.holder_identity.clone());
        if holder != *last_holder {
            let shown = holder.as_deref().unwrap_or_default();
            tracing::info!(lease = %cfg.name, holder = shown, "standing by: the lease is held");
            *last_holder = holder;
        }
        return Step::Again(left.min(retry));
    }
    let started = Instant::now();
    let written = match (decision, current) {
        (Decision::Take, Some(mut lease)) => {
            lease.spec = Some(claim(
                lease.spec.as_ref(),
                &cfg.identity,
                &cfg.timing,
                Timestamp::now(),
            ));
            api.replace(&cfg.name, &PostParams::default(), &lease).await
        }
        _ => api.create(&PostParams::default(), &new_lease(cfg)).await,
    };
    match written {
        Ok(lease) => Step::Won(Box::new(lease), started),
        // Another candidate wrote first: read again at once to see who.
        Err(kube::Error::Api(s)) if s.code == 409 => Step::Again(Duration::ZERO),
        Err(e) => {
            tracing::warn!(lease = %cfg.name, error = %e, "taking the lease");
            Step::Again(retry)
        }
    }
}

fn new_lease(cfg: &LeaseConfig) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(claim(None, &cfg.identity, &cfg.timing, Timestamp::now())),
    }
}

/// How holding the Lease ended.
enum Held {
    /// `stop` was requested: release it.
    Stopped,
    /// Lost, and why.
    Lost(String),
}

/// Renews the Lease every retry period until `stop` or until it is lost.
async fn hold(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    lease: &mut Lease,
    mut renewed_at: Instant,
    stop: &CancellationToken,
) -> Held {
    let t = cfg.timing;
    let mut next = renewed_at + t.retry_period;
    loop {
        let deadline = renewed_at + t.renew_deadline;
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Held::Stopped,
            _ = tokio::time::sleep_until(next.min(deadline)) => {}
        }
        if Instant::now() >= deadline {
            return Held::Lost(format!(
                "no renewal succeeded within {:?}",
                t.renew_deadline
            ));
        }
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, renew(api, cfg, lease)).await {
            Err(_) => {
                return Held::Lost(format!(
                    "renewal still unanswered after {:?}",
                    t.renew_deadline
                ));
            }
            Ok(Ok(renewed)) => {
                *lease = renewed;
                renewed_at = started;
                next = started + t.retry_period;
            }
            Ok(Err(Renewal::Taken(holder))) => {
                return Held::Lost(format!("the lease is now held by {holder}"));
            }
            Ok(Err(Renewal::Failed(e))) => {
                tracing::warn!(lease = %cfg.name, error = %e, "renewing the lease; retrying");
                next = Instant::now() + t.retry_period;
            }
        }
    }
}

/// Why a renewal did not go through.
enum Renewal {
    /// Someone else holds the Lease now (or it was deleted): lost for good.
    Taken(String),
    /// A failure worth retrying until the deadline.
    Failed(kube::Error),
}

async fn renew(api: &Api<Lease>, cfg: &LeaseConfig, lease: &Lease) -> Result<Lease, Renewal> {
    let mut next = lease.clone();
    next.spec = Some(claim(
        lease.spec.as_ref(),
        &cfg.identity,
        &cfg.timing,
        Timestamp::now(),
    ));
    match api.replace(&cfg.name, &PostParams::default(), &next).await {
        Ok(l) => Ok(l),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Someone wrote the Lease since our last write: if it is still ours (a label edit),
            // renew on top of that version; otherwise it was taken.
            let current = api.get_opt(&cfg.name).await.map_err(Renewal::Failed)?;
            let Some(mut current) = current else {
                return Err(Renewal::Taken("nobody (the Lease was deleted)".into()));
            };
            let holder = current
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default();
            if holder != cfg.identity {
                return Err(Renewal::Taken(format!("{holder:?}")));
            }
            current.spec = Some(claim(
                current.spec.as_ref(),
                &cfg.identity,
                &cfg.timing,
                Timestamp::now(),
            ));
            api.replace(&cfg.name, &PostParams::default(), &current)
                .await
                .map_err(Renewal::Failed)
        }
        Err(e) => Err(Renewal::Failed(e)),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaseConfig, mut lease: Lease) {
    lease.spec = Some(released(lease.spec.as_ref(), Timestamp::now()));
    let params = PostParams::default();
    let write = api.replace(&cfg.name, &params, &lease);
    match tokio::time::timeout(cfg.timing.renew_deadline, write).await {
        Ok(Ok(_)) => tracing::info!(lease = %cfg.name, "released the lease"),
        // Written by someone else since our last renewal: not ours to clear any more.
        Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
            tracing::info!(lease = %cfg.name, "the lease changed hands; nothing to release")
        }
        Ok(Err(e)) => {
            tracing::warn!(lease = %cfg.name, error = %e, "releasing the lease; a standby takes over once it expires")
        }
        Err(_) => tracing::warn!(
            lease = %cfg.name,
            "releasing the lease timed out; a standby takes over once it expires"
        ),
    }
}

/// Whether this replica may talk to MDE (it holds the Lease, or leader election is off): one
/// value with one writer ([`LeadingSender`], held by whoever follows the election), read through
/// cloned handles by the reconcile gate, the batch poller and readiness.
#[derive(Clone, Debug)]
pub struct Leading(watch::Receiver<bool>);

/// The one writer of [`Leading`].
#[derive(Debug)]
pub struct LeadingSender(watch::Sender<bool>);

/// A leadership value, `true` from the start when there is no election.
pub fn leading(from_start: bool) -> (LeadingSender, Leading) {
    let (tx, rx) = watch::channel(from_start);
    (LeadingSender(tx), Leading(rx))
}

impl LeadingSender {
    /// This replica leads from now on (it never stops: losing the Lease ends the process).
    pub fn lead(&self) {
        self.0.send_replace(true);
    }
}

impl Leading {
    /// Whether this replica leads now.
    pub fn now(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until this replica leads; `false` if that can no longer happen (the writer is gone).
    pub async fn wait(mut self) -> bool {
        self.0.wait_for(|l| *l).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "replica-a";

    fn timing() -> LeaseTiming {
        LeaseTiming::from_duration(Duration::from_secs(15))
    }

    fn held_by(holder: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn timings_follow_client_go_proportions() {
        let t = timing();
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert_eq!(t.retry_period, Duration::from_secs(2));
        let short = LeaseTiming::from_duration(Duration::from_millis(600));
        assert_eq!(short.retry_period, Duration::from_millis(100));
        assert!(short.renew_deadline < short.duration);
        assert_eq!(short.duration_seconds(), 1, "never 0 seconds");
    }

    #[test]
    fn a_missing_lease_is_created() {
        assert_eq!(
            decide(None, ME, Duration::ZERO, &timing()),
            Decision::Create
        );
    }

    #[test]
    fn a_lease_without_holder_or_held_by_me_is_taken_at_once() {
        let t = timing();
        assert_eq!(decide(Some(None), ME, Duration::ZERO, &t), Decision::Take);
        let released = released(Some(&held_by("replica-b", 15)), Timestamp::UNIX_EPOCH);
        assert_eq!(
            decide(Some(Some(&released)), ME, Duration::ZERO, &t),
            Decision::Take
        );
        let empty = LeaseSpec {
            holder_identity: Some(String::new()),
            ..held_by("x", 15)
        };
        assert_eq!(
            decide(Some(Some(&empty)), ME, Duration::ZERO, &t),
            Decision::Take
        );
        assert_eq!(
            decide(Some(Some(&held_by(ME, 15))), ME, Duration::ZERO, &t),
            Decision::Take
        );
    }

    #[test]
    fn another_holder_is_waited_for_its_own_duration_since_first_seen() {
        let t = timing();
        let other = held_by("replica-b", 20);
        assert_eq!(
            decide(Some(Some(&other)), ME, Duration::from_secs(5), &t),
            Decision::Wait(Duration::from_secs(15))
        );
        assert_eq!(
            decide(Some(Some(&other)), ME, Duration::from_secs(20), &t),
            Decision::Take
        );
        // No duration in the record: ours.
        let no_duration = LeaseSpec {
            lease_duration_seconds: None,
            ..other
        };
        assert_eq!(
            decide(Some(Some(&no_duration)), ME, Duration::from_secs(14), &t),
            Decision::Wait(Duration::from_secs(1))
        );
    }

    #[test]
    fn observation_restarts_whenever_the_holder_renews_or_changes() {
        let start = Instant::now();
        let mut seen = Observation::default();
        let a = held_by("replica-b", 15);
        assert_eq!(seen.observe(Some(&a), start), Duration::ZERO);
        let later = start + Duration::from_secs(4);
        assert_eq!(seen.observe(Some(&a), later), Duration::from_secs(4));
        // A renewal (new renewTime) restarts the count, however old the timestamps are: only
        // this candidate's clock is used.
        let renewed = LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::from_second(1).unwrap())),
            ..a.clone()
        };
        assert_eq!(seen.observe(Some(&renewed), later), Duration::ZERO);
        let much_later = later + Duration::from_secs(30);
        assert_eq!(
            seen.observe(Some(&renewed), much_later),
            Duration::from_secs(30)
        );
        let other_holder = held_by("replica-c", 15);
        assert_eq!(
            seen.observe(Some(&other_holder), much_later),
            Duration::ZERO
        );
    }

    #[test]
    fn claiming_someone_elses_lease_counts_a_transition_renewing_does_not() {
        let t = timing();
        let now = Timestamp::from_second(1_000).unwrap();
        let created = claim(None, ME, &t, now);
        assert_eq!(created.holder_identity.as_deref(), Some(ME));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.lease_duration_seconds, Some(15));
        assert_eq!(created.acquire_time, Some(MicroTime(now)));

        let taken = claim(Some(&held_by("replica-b", 15)), ME, &t, now);
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        assert_eq!(taken.renew_time, Some(MicroTime(now)));

        let later = Timestamp::from_second(1_002).unwrap();
        let renewed = claim(Some(&taken), ME, &t, later);
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
    }

    #[test]
    fn releasing_clears_the_holder_and_keeps_the_history() {
        let now = Timestamp::from_second(1_000).unwrap();
        let held = claim(Some(&held_by("replica-b", 15)), ME, &timing(), now);
        let free = released(Some(&held), now);
        assert_eq!(free.holder_identity, None);
        assert_eq!(free.lease_transitions, held.lease_transitions);
        assert_eq!(free.acquire_time, held.acquire_time);
    }

    /// How the fake API server answers renewals (PUTs).
    #[derive(Clone, Copy)]
    enum Renewals {
        Succeed,
        Fail,
        Hang,
    }

    /// A fake Lease API for namespace `ns`: no Lease at first, creates succeed, renewals answer
    /// as told. Returns the client and the bodies of the PUTs received.
    async fn fake_api(
        renewals: Renewals,
    ) -> (kube::Client, std::sync::Arc<std::sync::Mutex<Vec<Lease>>>) {
        use axum::Json;
        use axum::http::StatusCode;
        use axum::routing::{get, post};
        let puts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let not_found = || async {
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
            (StatusCode::NOT_FOUND, Json(status))
        };
        let created = |Json(mut lease): Json<Lease>| async move {
            lease.metadata.resource_version = Some("1".into());
            (StatusCode::CREATED, Json(lease))
        };
        let recorded = puts.clone();
        let renewed = move |Json(lease): Json<Lease>| {
            let recorded = recorded.clone();
            async move {
                recorded.lock().unwrap().push(lease.clone());
                match renewals {
                    Renewals::Succeed => Ok(Json(lease)),
                    Renewals::Fail => Err(StatusCode::INTERNAL_SERVER_ERROR),
                    Renewals::Hang => std::future::pending().await,
                }
            }
        };
        let app = axum::Router::new()
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l",
                get(not_found).put(renewed),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases",
                post(created),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(url.parse().unwrap());
        (kube::Client::try_from(config).unwrap(), puts)
    }

    fn fake_config(duration: Duration) -> LeaseConfig {
        LeaseConfig {
            name: "l".into(),
            namespace: "ns".into(),
            identity: ME.into(),
            timing: LeaseTiming::from_duration(duration),
            leader_seen: Arc::default(),
        }
    }

    /// Starts an election against the fake API and waits until it leads; returns when.
    async fn leading(election: &Election) -> Instant {
        let mut role = election.role();
        let led = tokio::time::timeout(
            Duration::from_secs(5),
            role.wait_for(|r| *r == Role::Leader),
        )
        .await;
        assert!(matches!(led, Ok(Ok(_))), "never led");
        Instant::now()
    }

    async fn lost_after(renewals: Renewals) -> Duration {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (client, puts) = fake_api(renewals).await;
        let cfg = fake_config(Duration::from_secs(3));
        let election = Election::start(client, cfg.clone());
        let led_at = leading(&election).await;
        let mut role = election.role();
        let lost =
            tokio::time::timeout(Duration::from_secs(5), role.wait_for(|r| *r == Role::Lost)).await;
        assert!(matches!(lost, Ok(Ok(_))), "never lost");
        assert!(!puts.lock().unwrap().is_empty(), "renewals were tried");
        led_at.elapsed()
    }

    #[tokio::test]
    async fn failing_renewals_lose_the_lease_at_the_renew_deadline() {
        // 3 s lease: renewals every 400 ms, all answered 500; lost 2 s after the last success,
        // and in any case before the 3 s after which a standby may take over.
        let after = lost_after(Renewals::Fail).await;
        assert!(
            after >= Duration::from_millis(1_900) && after < Duration::from_secs(3),
            "lost after {after:?}"
        );
    }

    #[tokio::test]
    async fn an_unanswered_renewal_loses_the_lease_at_the_renew_deadline() {
        let after = lost_after(Renewals::Hang).await;
        assert!(
            after >= Duration::from_millis(1_900) && after < Duration::from_secs(3),
            "lost after {after:?}"
        );
    }

    #[tokio::test]
    async fn a_leader_renews_past_the_deadline_and_releases_on_stop() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (client, puts) = fake_api(Renewals::Succeed).await;
        let election = Election::start(client, fake_config(Duration::from_secs(3)));
        leading(&election).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(*election.role().borrow(), Role::Leader);
        let renewals = puts.lock().unwrap().len();
        assert!(renewals >= 3, "{renewals} renewals in 3 s");
        election.release().await;
        let last = puts.lock().unwrap().last().cloned().expect("a release");
        let spec = last.spec.expect("spec");
        assert_eq!(spec.holder_identity, None, "released");
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn identity_is_the_pod_name_else_host_and_pid() {
        assert_eq!(
            identity_from(Some("op-7d9f-x2".into()), Some("node".into()), 42),
            "op-7d9f-x2"
        );
        assert_eq!(
            identity_from(Some(" ".into()), Some("node-1\n".into()), 42),
            "node-1_42"
        );
        assert_eq!(identity_from(None, None, 7), "localhost_7");
    }
}
