//! Issue 15's scenario: several tenants through one operator.
//!
//! - `tenants3`: one `mde-sim` holding three named tenants, each with its own app (client id and
//!   secret) and 300 online devices, all isolated; the third tenant is flooded by another tool of
//!   its own (a foreign load of 60 unisolates a simulated minute, all at each minute's start, on
//!   its app's key), so that the operator meets 429 episodes there. One operator process watches
//!   the three namespaces; each namespace holds its tenant's Secret, one `MdeConnection` naming
//!   it (`quotaBudget: 1`) and, once the connections are Ready, 300 DeviceIsolations
//!   (`isolated: false`, `connectionRef` to the connection), the 900 created concurrently
//!   (`CREATE_CONCURRENCY` at once, interleaved across the tenants) as a GitOps sync would.
//!
//! Measured per tenant, from the simulator's call log of every tenant (`/sim/calls?tenant=*`,
//! each call carrying the `tenant` and `app` of its token) unless said otherwise, in simulated
//! seconds: the first and the last accepted (2xx) unisolate POST and (last − first) / T(300);
//! the 429s (every API) and their episodes on unisolate; the accepted POSTs per device; calls
//! made with an app that is not the tenant's and calls on a machine of another tenant; the
//! ground truth (`/sim/machines?tenant=`, and `/sim/actions?tenant=` with
//! `--duplicate-mode allow`, so a repeated POST would create a second action): every device
//! released by exactly one unisolate action; the resources Ready/Released; the connection's
//! learned unisolate limit. For the flooded tenant also the foreign load's tallies
//! (`stats.foreign` of that tenant) from just before the apply until the tenant's last resource
//! settled: what share of the unisolates admitted on its key in that span the other tool took.
//!
//! ```sh
//! cargo build --release -p mde-sim
//! cargo bench --bench operator -- tenants3
//! ```

use super::*;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use mde_isolation_operator::crd::{ConnectionKind, ConnectionRef, MdeConnection};

/// Scenario name.
const NAME: &str = "tenants3";

/// The same three tenants, none flooded: each must release within the ratio on its own.
pub(super) const QUIET: &str = "tenants3-quiet";

/// Devices (and DeviceIsolations) per tenant.
const DEVICES: usize = 300;

/// (last − first accepted unisolate) / T(300) of a tenant not flooded.
const RATIO_LIMIT: f64 = 1.05;

/// The flooded tenant's foreign load: unisolates per simulated minute, all at the minute's start.
const FLOOD_PER_MINUTE: u32 = 60;

/// Name of each tenant's MdeConnection and Secret.
const CONNECTION: &str = "tenant";
const SECRET: &str = "mde";

/// Real seconds the connections get to become Ready before the apply.
const CONNECTION_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One tenant of the simulator.
#[derive(Clone, Copy)]
struct TenantSpec {
    id: &'static str,
    app: &'static str,
    secret: &'static str,
    /// Machine ids start here.
    base: u32,
    /// Another tool of this tenant spends its unisolate quota.
    flooded: bool,
}

const TENANTS: [TenantSpec; 3] = [
    TenantSpec {
        id: "contoso.example",
        app: "app-contoso",
        secret: "secret-contoso",
        base: 0x10_0000,
        flooded: false,
    },
    TenantSpec {
        id: "fabrikam.example",
        app: "app-fabrikam",
        secret: "secret-fabrikam",
        base: 0x20_0000,
        flooded: false,
    },
    TenantSpec {
        id: "tailspin.example",
        app: "app-tailspin",
        secret: "secret-tailspin",
        base: 0x30_0000,
        flooded: true,
    },
];

/// The tenants of a run: with `flood`, the third one is flooded.
fn specs(flood: bool) -> [TenantSpec; 3] {
    let mut tenants = TENANTS;
    tenants[2].flooded = flood;
    tenants
}

impl TenantSpec {
    fn devices(&self) -> Vec<Device> {
        (0..DEVICES)
            .map(|i| Device {
                name: format!("d{i:03}"),
                id: machine_id(self.base + i as u32),
                behaviour: Behaviour::Online,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

/// What issue 15's scenario measures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TenantsMetrics {
    /// Devices per tenant.
    devices_per_tenant: usize,
    /// T(300).
    quota_bound: f64,
    /// The flooded tenant's foreign load, as the simulator's seed says.
    foreign_load: String,
    /// Real seconds from the connections' creation until all three were Ready (none: not
    /// within `CONNECTION_READY_TIMEOUT`).
    connections_ready_seconds: Option<f64>,
    /// One entry per tenant, in `TENANTS` order.
    tenants: Vec<TenantFigures>,
    /// Calls the simulator attributed to no tenant or to its default tenant (the operator's
    /// own flags' connection, unused here), by API.
    other_calls: BTreeMap<String, usize>,
}

/// One tenant's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TenantFigures {
    tenant: String,
    app: String,
    flooded: bool,
    /// Simulated seconds from the apply start to the tenant's first accepted unisolate.
    first_post_after_apply: Option<f64>,
    /// Simulated seconds from the first accepted unisolate to the last.
    last_post_after_first: Option<f64>,
    /// `last_post_after_first / quota_bound`.
    ratio: Option<f64>,
    /// Unisolate POSTs received (every answer).
    posts: usize,
    /// Of those, answered 2xx.
    accepted: usize,
    /// 429 answers, every API of the tenant.
    throttled: usize,
    /// 429 answers to unisolate POSTs.
    throttled_posts: usize,
    /// Unisolate 429s per episode (a run of 429s with no accepted unisolate between them).
    episodes: Vec<usize>,
    /// Most unisolate calls received in any 60 / 3,600 simulated seconds (`/sim/stats`).
    max_posts_per_minute: usize,
    max_posts_per_hour: usize,
    /// The tenant's devices without exactly one accepted unisolate.
    devices_not_one_accepted: usize,
    /// Calls of this tenant made with another app than the tenant's (token requests included).
    wrong_app_calls: usize,
    /// Calls of this tenant on a machine of another tenant.
    other_tenant_machine_calls: usize,
    /// Unisolate actions the simulator created for the tenant (ground truth).
    unisolate_actions: usize,
    /// Devices without exactly one unisolate action.
    devices_not_one_action: usize,
    /// Any other action of the tenant.
    other_actions: usize,
    /// Devices released at the end (ground truth).
    released: usize,
    /// DeviceIsolations Ready=True with reason Released at the end.
    ready: usize,
    /// Simulated seconds from the apply start until a watch saw every resource of the tenant
    /// settled (none: not within the timeout).
    settled_after_apply: Option<f64>,
    /// The connection's unisolate limit per minute at the end (`status.quota`: the budget, or
    /// less if it learned from a 429).
    learned_per_minute: Option<u32>,
    /// Flooded tenant: the foreign load from just before the apply until the tenant settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    foreign: Option<ForeignShare>,
}

/// The other tool's use of the flooded tenant's unisolate quota.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ForeignShare {
    /// Simulated seconds between the two reads of `stats.foreign`.
    span_sim_seconds: f64,
    /// Foreign unisolates admitted in the span.
    admitted: usize,
    /// Foreign unisolates refused (429) in the span.
    refused: usize,
    /// The operator's accepted unisolates (all of them fall in the span).
    operator_admitted: usize,
    /// `admitted / (admitted + operator_admitted)`.
    share: Option<f64>,
    /// `admitted` per simulated minute of the span (the limit is 100).
    per_minute: f64,
}

impl TenantFigures {
    /// Every device released by exactly one accepted POST and one action, every call with the
    /// tenant's own app on its own machines.
    fn ground_truth_exact(&self) -> bool {
        self.released == DEVICES
            && self.ready == DEVICES
            && self.accepted == DEVICES
            && self.devices_not_one_accepted == 0
            && self.unisolate_actions == DEVICES
            && self.devices_not_one_action == 0
            && self.other_actions == 0
            && self.wrong_app_calls == 0
            && self.other_tenant_machine_calls == 0
    }

    fn within_ratio(&self) -> bool {
        self.ratio.is_some_and(|r| r <= RATIO_LIMIT)
    }
}

// ---------------------------------------------------------------------------------------------
// The simulator's record, with the tenant and app of each call.

#[derive(Debug, Clone, Deserialize)]
struct TenantCall {
    #[serde(flatten)]
    call: Call,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    app: Option<String>,
}

/// Every tenant's calls, in arrival order.
async fn all_calls(sim: &Sim) -> Vec<TenantCall> {
    let v = sim.admin_get_in("*", "calls").await;
    serde_json::from_value(v["calls"].clone()).expect("call log")
}

/// Unisolate 429s per episode, in order.
fn episodes(calls: &[&TenantCall]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut current = 0;
    for c in calls.iter().filter(|c| c.call.api == "unisolate") {
        if c.call.status == 429 {
            current += 1;
        } else if (200..300).contains(&c.call.status) && current > 0 {
            out.push(current);
            current = 0;
        }
    }
    if current > 0 {
        out.push(current);
    }
    out
}

/// `stats.foreign.apis.unisolate.{admitted, refused}` of a tenant.
fn foreign_tally(stats: &Value) -> (usize, usize) {
    let u = &stats["foreign"]["apis"]["unisolate"];
    let n = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
    (n("admitted"), n("refused"))
}

// ---------------------------------------------------------------------------------------------
// The scenario.

/// The seed: three named tenants; the default one (the operator's flags) holds nothing.
fn write_seed(dir: &Path, specs: &[TenantSpec]) -> PathBuf {
    let tenants: Vec<Value> = specs
        .iter()
        .map(|t| {
            let machines: Vec<Value> = t
                .devices()
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    json!({"id": d.id, "computerDnsName": format!("dev-{i:03}.{}", t.id),
                           "behaviour": "online", "isolated": true})
                })
                .collect();
            let mut tenant = json!({
                "tenantId": t.id,
                "apps": [{"clientId": t.app, "clientSecret": t.secret,
                          "roles": ["Machine.Isolate", "Machine.Read.All"]}],
                "machines": machines,
            });
            if t.flooded {
                tenant["foreignLoad"] = json!([{"api": "unisolate",
                    "perMinute": FLOOD_PER_MINUTE, "pattern": "burst"}]);
            }
            tenant
        })
        .collect();
    let path = dir.join("seed.yaml");
    // JSON is YAML.
    std::fs::write(&path, json!({ "tenants": tenants }).to_string()).expect("seed file");
    path
}

/// Creates a DeviceIsolation releasing `d` through the namespace's connection; retried like
/// [`create_one`](super::create_one).
async fn create_with_ref(api: &Api<DeviceIsolation>, d: &Device) -> Result<(), String> {
    let mut di = device_isolation(
        &d.name,
        &d.id,
        false,
        Some("Released after clean re-image (bench)"),
    );
    di.spec.connection_ref = Some(ConnectionRef {
        kind: ConnectionKind::MdeConnection,
        name: CONNECTION.into(),
    });
    super::create_retrying(api, &di).await
}

/// The Secret and the MdeConnection of a tenant in its namespace.
async fn connect(kube: &kube::Client, ns: &str, t: &TenantSpec, sim: &Sim) -> Result<(), String> {
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), ns);
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SECRET}, "stringData": {"client-secret": t.secret}});
    secrets
        .patch(
            SECRET,
            &PatchParams::apply("mde-bench"),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|e| format!("{}: Secret: {e}", t.id))?;
    let conns: Api<MdeConnection> = Api::namespaced(kube.clone(), ns);
    let conn: MdeConnection = serde_json::from_value(json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "MdeConnection",
        "metadata": {"name": CONNECTION},
        "spec": {
            "tenantId": t.id, "clientId": t.app,
            "apiUrl": format!("{}/", sim.base_url), "authority": format!("{}/", sim.base_url),
            "credential": {"clientSecret": {"name": SECRET, "key": "client-secret"}},
            "quotaBudget": 1.0,
        },
    }))
    .map_err(|e| format!("{}: MdeConnection: {e}", t.id))?;
    conns
        .create(&PostParams::default(), &conn)
        .await
        .map(drop)
        .map_err(|e| format!("{}: MdeConnection: {e}", t.id))
}

async fn connection_ready(kube: &kube::Client, ns: &str) -> bool {
    let conns: Api<MdeConnection> = Api::namespaced(kube.clone(), ns);
    conns.get(CONNECTION).await.ok().is_some_and(|c| {
        c.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
}

/// The connection's unisolate limit per minute (`status.quota`).
async fn learned_per_minute(kube: &kube::Client, ns: &str) -> Option<u32> {
    let conns: Api<MdeConnection> = Api::namespaced(kube.clone(), ns);
    let c = conns.get(CONNECTION).await.ok()?;
    c.status?
        .quota
        .iter()
        .find(|q| q.api == "unisolate")
        .map(|q| q.limit_per_minute)
}

/// Resources Ready=True with reason Released.
async fn released_ready(kube: &kube::Client, ns: &str) -> usize {
    let api: Api<DeviceIsolation> = Api::namespaced(kube.clone(), ns);
    api.list(&ListParams::default()).await.map_or(0, |l| {
        l.items
            .iter()
            .filter(|di| condition(di, "Ready").is_some_and(|c| c.0 == "True" && c.1 == "Released"))
            .count()
    })
}

/// The scenario, with the third tenant flooded (`tenants3`) or not (`tenants3-quiet`).
pub(super) async fn tenants3(flood: bool) -> ScenarioResult {
    let name = if flood { NAME } else { QUIET };
    let tenants = specs(flood);
    let scale = time_scale(name);
    let run = run_info();
    let started = Instant::now();
    let c = cluster();
    let kube = c.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut notes = Vec::new();
    let extra = extra_sim_args();
    if !extra.is_empty() {
        notes.push(format!(
            "diagnostic run: extra simulator arguments {extra:?}"
        ));
    }
    let seed = write_seed(dir.path(), &tenants);
    let scale_arg = scale.to_string();
    let mut sim_args = vec![
        "--seed",
        seed.to_str().expect("utf-8 temp path"),
        "--time-scale",
        &scale_arg,
        "--duplicate-mode",
        "allow",
    ];
    sim_args.extend(extra.iter().map(String::as_str));
    let sim = Sim::start(&sim_args);
    let clock = SimClock::read(&sim).await;

    let mut namespaces = Vec::new();
    for t in &tenants {
        namespaces.push(c.namespace(&format!("bench-{}", t.id)).await);
    }
    let devices: Vec<Vec<Device>> = tenants.iter().map(TenantSpec::devices).collect();
    let watches: Vec<(Arc<Mutex<Tracker>>, tokio::task::JoinHandle<()>)> = namespaces
        .iter()
        .zip(&devices)
        .map(|(ns, d)| track(&kube, ns, d))
        .collect();
    let mut op_args: Vec<&str> = Vec::new();
    for ns in &namespaces[1..] {
        op_args.extend(["--namespace", ns.as_str()]);
    }
    let mut op = OperatorProcess::start(
        &sim,
        &c.kubeconfig,
        &namespaces[0],
        scale,
        dir.path(),
        &op_args,
        "operator.log",
    );
    if !op.wait_synced(1, Duration::from_secs(60)).await {
        notes.push("operator did not report synced caches within 60 s".into());
        eprintln!("[{name}] operator not synced:\n{}", op.tail());
    }

    // The connections, then (once Ready) the resources.
    let connected_at = Instant::now();
    for (t, ns) in tenants.iter().zip(&namespaces) {
        if let Err(e) = connect(&kube, ns, t, &sim).await {
            notes.push(format!("creating the connection failed: {e}"));
        }
    }
    let mut connections_ready_seconds = None;
    while connected_at.elapsed() < CONNECTION_READY_TIMEOUT {
        let mut all = true;
        for ns in &namespaces {
            all &= connection_ready(&kube, ns).await;
        }
        if all {
            connections_ready_seconds = Some(connected_at.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if connections_ready_seconds.is_none() {
        notes.push(format!(
            "not every MdeConnection was Ready within {CONNECTION_READY_TIMEOUT:?}; applied anyway"
        ));
    }

    let flooded = tenants.iter().position(|t| t.flooded);
    let foreign_before = match flooded {
        Some(f) => foreign_tally(&sim.admin_stats_in(tenants[f].id).await),
        None => (0, 0),
    };
    let foreign_before_at = clock.sim_at(Utc::now());

    // 900 creations, interleaved across the tenants so that all three start together.
    let order: Vec<(usize, Device)> = (0..DEVICES)
        .flat_map(|i| (0..tenants.len()).map(move |k| (k, i)))
        .map(|(k, i)| (k, devices[k][i].clone()))
        .collect();
    let apis: Vec<Api<DeviceIsolation>> = namespaces
        .iter()
        .map(|ns| Api::namespaced(kube.clone(), ns))
        .collect();
    let apply_start = Utc::now();
    let failed: Vec<String> = futures::stream::iter(order)
        .map(|(k, d)| {
            let api = apis[k].clone();
            async move { create_with_ref(&api, &d).await.err() }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .filter_map(|r| async move { r })
        .collect()
        .await;
    let apply_end = Utc::now();
    if !failed.is_empty() {
        notes.push(format!(
            "{} creations failed, e.g. {}",
            failed.len(),
            failed[0]
        ));
    }
    let real = seconds_between(apply_start, apply_end);
    let apply = ApplyInfo {
        objects: tenants.len() * DEVICES - failed.len(),
        concurrency: CREATE_CONCURRENCY,
        real_seconds: real,
        sim_seconds: real * scale,
    };
    let bound = quota_bound(DEVICES);
    eprintln!(
        "[{name}] created {} objects in {:.1} s real ({:.0} simulated; T(300) = {bound:.0})",
        apply.objects, apply.real_seconds, apply.sim_seconds
    );
    if apply.sim_seconds > bound {
        notes.push(format!(
            "creating the objects took {:.0} simulated seconds, longer than T(300) = {bound:.0}: \
             the POSTs may have been paced by the API server rather than by the quota",
            apply.sim_seconds
        ));
    }

    // The flooded tenant first (its settling ends the foreign span), then the others.
    let mut settled: Vec<Option<DateTime<Utc>>> = vec![None; tenants.len()];
    // 300 unisolates at the 40 a minute the flood leaves take about 450 simulated seconds.
    let flooded_timeout = timeout_for(900.0, scale, 0.0);
    let mut foreign_after = (0, 0);
    if let Some(f) = flooded {
        settled[f] = wait_settled(
            &watches[f].0,
            &format!("{name} {}", tenants[f].id),
            flooded_timeout,
        )
        .await;
        foreign_after = foreign_tally(&sim.admin_stats_in(tenants[f].id).await);
    }
    let foreign_after_at = clock.sim_at(Utc::now());
    for (k, t) in tenants.iter().enumerate() {
        if Some(k) == flooded {
            continue;
        }
        settled[k] = wait_settled(
            &watches[k].0,
            &format!("{name} {}", t.id),
            timeout_for(bound + 300.0, scale, 0.0),
        )
        .await;
    }
    for (k, t) in tenants.iter().enumerate() {
        if settled[k].is_none() {
            notes.push(format!("{}: not every resource settled", t.id));
        }
    }
    if settled.iter().any(Option::is_none) {
        eprintln!("[{name}] operator log tail:\n{}", op.tail());
    }

    // The figures.
    let log = all_calls(&sim).await;
    let apply_sim = clock.sim_at(apply_start);
    let owner: HashMap<String, usize> = devices
        .iter()
        .enumerate()
        .flat_map(|(k, ds)| ds.iter().map(move |d| (d.id.clone(), k)))
        .collect();
    let last_settled = settled.iter().flatten().max().map(|t| clock.sim_at(*t));
    let mut figures = Vec::new();
    let mut calls_by_api: BTreeMap<String, ApiCalls> = BTreeMap::new();
    let mut throttled_total = 0;
    for (k, t) in tenants.iter().enumerate() {
        let mine: Vec<&TenantCall> = log
            .iter()
            .filter(|c| c.tenant.as_deref() == Some(t.id))
            .collect();
        for c in mine
            .iter()
            .filter(|c| last_settled.is_none_or(|s| c.call.sim() <= s))
        {
            calls_by_api.entry(c.call.api.clone()).or_default().calls += 1;
        }
        let posts: Vec<&&TenantCall> = mine
            .iter()
            .filter(|c| c.call.method == "POST" && c.call.api == "unisolate")
            .collect();
        let accepted: Vec<&&TenantCall> = posts
            .iter()
            .copied()
            .filter(|c| (200..300).contains(&c.call.status))
            .collect();
        let mut per_machine: HashMap<&str, usize> = HashMap::new();
        for p in &accepted {
            if let Some(m) = p.call.machine() {
                *per_machine.entry(m).or_default() += 1;
            }
        }
        let first = accepted.iter().map(|c| c.call.sim()).min();
        let last = accepted.iter().map(|c| c.call.sim()).max();
        let span = match (first, last) {
            (Some(a), Some(b)) => Some(seconds_between(a, b)),
            _ => None,
        };
        let stats = sim.admin_stats_in(t.id).await;
        let u = &stats["apis"]["unisolate"];
        let n = |v: &Value| v.as_u64().unwrap_or(0) as usize;
        if let Some(apis) = stats["apis"].as_object() {
            for (api, s) in apis {
                throttled_total += n(&s["throttled"]);
                if n(&s["calls"]) == 0 {
                    continue;
                }
                let e = calls_by_api.entry(api.clone()).or_default();
                e.throttled += n(&s["throttled"]);
                e.max_per_minute = e.max_per_minute.max(n(&s["maxCallsPerMinute"]));
                e.max_per_hour = e.max_per_hour.max(n(&s["maxCallsPerHour"]));
            }
        }
        let truth = sim.admin_get_in(t.id, "machines").await;
        let released = truth["machines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| {
                m["id"].as_str().is_some_and(|id| owner.get(id) == Some(&k))
                    && m["isolated"] == false
            })
            .count();
        let actions = sim.admin_get_in(t.id, "actions").await;
        let mut unisolates: HashMap<&str, usize> = HashMap::new();
        let mut other_actions = 0;
        for a in actions["value"].as_array().into_iter().flatten() {
            let machine = a["machineId"].as_str().unwrap_or_default();
            if a["type"] == "Unisolate" && owner.get(machine) == Some(&k) {
                *unisolates.entry(machine).or_default() += 1;
            } else {
                other_actions += 1;
            }
        }
        let foreign = t.flooded.then(|| {
            let admitted = foreign_after.0.saturating_sub(foreign_before.0);
            let span = seconds_between(foreign_before_at, foreign_after_at);
            ForeignShare {
                span_sim_seconds: span,
                admitted,
                refused: foreign_after.1.saturating_sub(foreign_before.1),
                operator_admitted: accepted.len(),
                share: (admitted + accepted.len() > 0)
                    .then(|| admitted as f64 / (admitted + accepted.len()) as f64),
                per_minute: if span > 0.0 {
                    admitted as f64 * 60.0 / span
                } else {
                    0.0
                },
            }
        });
        let f = TenantFigures {
            tenant: t.id.into(),
            app: t.app.into(),
            flooded: t.flooded,
            first_post_after_apply: first.map(|a| seconds_between(apply_sim, a)),
            last_post_after_first: span,
            ratio: span.filter(|_| bound > 0.0).map(|s| s / bound),
            posts: posts.len(),
            accepted: accepted.len(),
            throttled: mine.iter().filter(|c| c.call.status == 429).count(),
            throttled_posts: posts.iter().filter(|c| c.call.status == 429).count(),
            episodes: episodes(&mine),
            max_posts_per_minute: n(&u["maxCallsPerMinute"]),
            max_posts_per_hour: n(&u["maxCallsPerHour"]),
            devices_not_one_accepted: devices[k]
                .iter()
                .filter(|d| per_machine.get(d.id.as_str()).copied().unwrap_or(0) != 1)
                .count(),
            wrong_app_calls: mine
                .iter()
                .filter(|c| c.app.as_deref().is_some_and(|a| a != t.app))
                .count(),
            other_tenant_machine_calls: mine
                .iter()
                .filter(|c| {
                    c.call
                        .machine()
                        .is_some_and(|m| owner.get(m).is_some_and(|o| *o != k))
                })
                .count(),
            unisolate_actions: unisolates.values().sum(),
            devices_not_one_action: devices[k]
                .iter()
                .filter(|d| unisolates.get(d.id.as_str()).copied().unwrap_or(0) != 1)
                .count(),
            other_actions,
            released,
            ready: released_ready(&kube, &namespaces[k]).await,
            settled_after_apply: settled[k].map(|s| seconds_between(apply_sim, clock.sim_at(s))),
            learned_per_minute: learned_per_minute(&kube, &namespaces[k]).await,
            foreign,
        };
        eprintln!(
            "[{name}] {}: first POST {} s after the apply, last − first {} s (ratio {}), \
             {} × 429 ({} unisolate 429 episodes), {}/{DEVICES} released",
            f.tenant,
            opt(f.first_post_after_apply, 1),
            opt(f.last_post_after_first, 1),
            opt(f.ratio, 3),
            f.throttled,
            f.episodes.len(),
            f.released
        );
        figures.push(f);
    }
    let n_all = tenants.len() * DEVICES;
    for e in calls_by_api.values_mut() {
        e.per_resource = e.calls as f64 / n_all as f64;
    }
    let mut other_calls: BTreeMap<String, usize> = BTreeMap::new();
    for c in log.iter().filter(|c| {
        c.tenant
            .as_deref()
            .is_none_or(|id| tenants.iter().all(|t| t.id != id))
    }) {
        *other_calls.entry(c.call.api.clone()).or_default() += 1;
    }
    let metrics = TenantsMetrics {
        devices_per_tenant: DEVICES,
        quota_bound: bound,
        foreign_load: flooded.map_or("none".into(), |f| {
            format!(
                "{}: unisolate {FLOOD_PER_MINUTE} a simulated minute, burst (all at the minute's \
                 start)",
                tenants[f].id
            )
        }),
        connections_ready_seconds,
        tenants: figures,
        other_calls,
    };

    // Closing: stop the operator, keep its log and the call log, leave a lean API server.
    op.kill();
    let operator = op.total_usage();
    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    if std::fs::create_dir_all(&logs).is_ok() {
        let _ = std::fs::copy(&op.log, logs.join(format!("{name}.log")));
        let v = sim.admin_get_in("*", "calls").await;
        let _ = std::fs::write(logs.join(format!("{name}-calls.json")), v.to_string());
    }
    for (_, w) in &watches {
        w.abort();
    }
    for ns in &namespaces {
        let dis: Api<DeviceIsolation> = Api::namespaced(kube.clone(), ns);
        let _ = dis
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await;
        let conns: Api<MdeConnection> = Api::namespaced(kube.clone(), ns);
        let _ = conns.delete(CONNECTION, &DeleteParams::default()).await;
    }
    let mut run = run;
    run.load_after = load_average();
    run.real_seconds = started.elapsed().as_secs_f64();
    drop(sim);
    drop(dir);
    ScenarioResult {
        name: name.into(),
        title: if flood {
            format!(
                "Three tenants, one MdeConnection each, {DEVICES} devices each released; one \
                 flooded by a foreign load"
            )
        } else {
            format!(
                "Three tenants, one MdeConnection each, {DEVICES} devices each released; none \
                 flooded"
            )
        },
        run,
        time_scale: scale,
        mix: Mix {
            online: n_all,
            ..Mix::default()
        },
        apply: Some(apply),
        calls: calls_by_api,
        throttled: throttled_total,
        operator,
        burst: None,
        restart: None,
        offline: None,
        latency: None,
        churn: None,
        sharing: None,
        fleet: None,
        tenants: Some(metrics),
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// Targets and the Markdown section.

fn tenants_of<'a>(r: &'a Report, name: &str) -> Option<(&'a ScenarioResult, &'a TenantsMetrics)> {
    let s = find(r, name)?;
    Some((s, s.tenants.as_ref()?))
}

/// `0.0 s` style, or "none".
fn secs(v: Option<f64>) -> String {
    v.map_or("none".into(), |x| format!("{x:.1} s"))
}

/// Issue 15's rows of the Targets table: the run with a flooded tenant, then the quiet one.
pub(super) fn targets(r: &Report) -> Vec<Target> {
    let mut out = flooded_targets(r);
    match tenants_of(r, QUIET) {
        Some((_, m)) => per_tenant(QUIET, m, &mut out),
        None => out.push(Target {
            what: format!("{QUIET}, each of the three tenants: (last − first POST) / T(300)"),
            measured: "not measured".into(),
            limit: format!("≤ {RATIO_LIMIT}"),
            pass: None,
        }),
    }
    out
}

/// Each tenant not flooded: its ratio and its 429s; every tenant: its ground truth.
fn per_tenant(name: &str, m: &TenantsMetrics, out: &mut Vec<Target>) {
    let limit_s = RATIO_LIMIT * m.quota_bound;
    for t in m.tenants.iter().filter(|t| !t.flooded) {
        out.push(Target {
            what: format!(
                "{name}, {}: (last − first accepted unisolate) / T(300)",
                t.tenant
            ),
            measured: format!(
                "{} ({} / {:.0} s)",
                opt(t.ratio, 3),
                secs(t.last_post_after_first),
                m.quota_bound
            ),
            limit: format!("≤ {RATIO_LIMIT} (≤ {limit_s:.0} s)"),
            pass: Some(t.within_ratio() && t.accepted == m.devices_per_tenant),
        });
        out.push(Target {
            what: format!("{name}, {}: 429 answers", t.tenant),
            measured: t.throttled.to_string(),
            limit: "0".into(),
            pass: Some(t.throttled == 0),
        });
    }
    for t in &m.tenants {
        out.push(Target {
            what: format!(
                "{name}, {}{}: ground truth (released by exactly one action; own app, own \
                 machines only)",
                t.tenant,
                if t.flooded { " (flooded)" } else { "" }
            ),
            measured: format!(
                "{}/{} released, {} Ready; {} / {} without exactly one accepted POST / action; \
                 {} calls with another app, {} on another tenant's machine",
                t.released,
                m.devices_per_tenant,
                t.ready,
                t.devices_not_one_accepted,
                t.devices_not_one_action,
                t.wrong_app_calls,
                t.other_tenant_machine_calls
            ),
            limit: "exact, 0, 0".into(),
            pass: Some(t.ground_truth_exact()),
        });
    }
}

/// The rows of the run with a flooded tenant.
fn flooded_targets(r: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    let Some((_, m)) = tenants_of(r, NAME) else {
        for (what, limit) in [
            (
                "tenants3, each tenant not flooded: (last − first POST) / T(300)",
                format!("≤ {RATIO_LIMIT}"),
            ),
            ("tenants3, each tenant not flooded: 429 answers", "0".into()),
            (
                "tenants3, each tenant: ground truth and one action per device, own app only",
                "exact".into(),
            ),
            (
                "tenants3, flooded tenant: converged (429s noted)",
                "all released".into(),
            ),
            (
                "tenants3: the others keep their figures beside the flooded tenant",
                format!("both ≤ {RATIO_LIMIT}, 0 × 429"),
            ),
        ] {
            out.push(Target {
                what: what.into(),
                measured: "not measured".into(),
                limit,
                pass: None,
            });
        }
        return out;
    };
    per_tenant(NAME, m, &mut out);
    if let Some(t) = m.tenants.iter().find(|t| t.flooded) {
        out.push(Target {
            what: format!("tenants3, {} (flooded): converged, 429s noted", t.tenant),
            measured: format!(
                "{}/{} Ready; {} × 429 ({} on unisolate; unisolate 429 episodes: {}, sizes {}); ratio to T(300) {}; \
                 the foreign load took {} of the unisolates admitted on its key",
                t.ready,
                m.devices_per_tenant,
                t.throttled,
                t.throttled_posts,
                t.episodes.len(),
                show_sizes(&t.episodes),
                opt(t.ratio, 3),
                t.foreign
                    .as_ref()
                    .and_then(|f| f.share)
                    .map_or("—".into(), |s| format!("{:.0} %", s * 100.0))
            ),
            limit: "all Ready".into(),
            pass: Some(t.ready == m.devices_per_tenant && t.released == m.devices_per_tenant),
        });
        let others: Vec<&TenantFigures> = m.tenants.iter().filter(|t| !t.flooded).collect();
        out.push(Target {
            what: "tenants3: the two others keep their figures while one tenant is flooded".into(),
            measured: format!(
                "{}; flooded tenant {} × 429",
                others
                    .iter()
                    .map(|o| format!("{} {} ({} × 429)", o.tenant, opt(o.ratio, 3), o.throttled))
                    .collect::<Vec<_>>()
                    .join(", "),
                t.throttled
            ),
            limit: format!("both ≤ {RATIO_LIMIT} and 0 × 429, with 429s in the flooded tenant"),
            pass: Some(
                others.iter().all(|o| o.within_ratio() && o.throttled == 0) && t.throttled > 0,
            ),
        });
    }
    out
}

/// `[40, 1, 1]` → "40, 1, 1"; none → "—".
fn show_sizes(sizes: &[usize]) -> String {
    if sizes.is_empty() {
        return "—".into();
    }
    let shown: Vec<String> = sizes.iter().take(12).map(usize::to_string).collect();
    let more = if sizes.len() > 12 { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// One cell of the tenants table.
type Cell = dyn Fn(&ScenarioResult, &TenantsMetrics, &TenantFigures) -> String;

/// Issue 15's section of docs/benchmarks.md: the run with a flooded tenant, then the quiet one.
pub(super) fn render(r: &Report, line: &mut dyn FnMut(&str)) {
    render_run(r, NAME, "## Several tenants (MdeConnection)", line);
    render_run(
        r,
        QUIET,
        "### The same, none flooded (`tenants3-quiet`)",
        line,
    );
}

fn render_run(r: &Report, name: &str, title: &str, line: &mut dyn FnMut(&str)) {
    let Some((s, m)) = tenants_of(r, name) else {
        return;
    };
    line(title);
    line("");
    line(&format!(
        "One simulator holds three named tenants, each with its own app registration and {} \
         online devices, all isolated; one operator process watches three namespaces, each \
         holding its tenant's Secret, one MdeConnection (`quotaBudget: 1`) and, once the three \
         connections are Ready ({}), {} DeviceIsolations releasing the devices through \
         `connectionRef`: {} created {} at once, interleaved across the tenants, in {:.1} real \
         seconds ({:.0} simulated), time scale {}. Foreign load: {}. The simulator creates a \
         second action for a repeated POST (`--duplicate-mode allow`), so one would show in the \
         ground truth. \
         Times are simulated seconds from the simulator's call log of every tenant \
         (`/sim/calls?tenant=*`, whose calls carry the tenant and app of their token). T(300) = \
         {:.0} s. The foreign load's share is over the span from just before the apply to the \
         moment the flooded tenant's last resource settled (`stats.foreign` of that tenant read \
         at both ends); the operator's accepted unisolates all fall in it. Calls the simulator \
         attributed to no named tenant (the default tenant of the operator's own flags, which no \
         resource uses): {}.",
        m.devices_per_tenant,
        m.connections_ready_seconds
            .map_or("not within 60 real seconds".into(), |t| format!(
                "{t:.1} real seconds after their creation"
            )),
        m.devices_per_tenant,
        s.apply.as_ref().map_or(0, |a| a.objects),
        s.apply
            .as_ref()
            .map_or(CREATE_CONCURRENCY, |a| a.concurrency),
        s.apply.as_ref().map_or(0.0, |a| a.real_seconds),
        s.apply.as_ref().map_or(0.0, |a| a.sim_seconds),
        s.time_scale,
        m.foreign_load,
        m.quota_bound,
        if m.other_calls.is_empty() {
            "none".to_string()
        } else {
            m.other_calls
                .iter()
                .map(|(api, n)| format!("{api} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    line("");
    let mut header = String::from("| |");
    let mut rule = String::from("|---|");
    for t in &m.tenants {
        header.push_str(&format!(
            " {}{} |",
            t.tenant,
            if t.flooded { " (flooded)" } else { "" }
        ));
        rule.push_str("---|");
    }
    line(&header);
    line(&rule);
    let rows: Vec<(&str, Box<Cell>)> = vec![
        ("app", Box::new(|_, _, t| format!("`{}`", t.app))),
        (
            "apply → first accepted unisolate",
            Box::new(|_, _, t| opt(t.first_post_after_apply, 1)),
        ),
        (
            "**first → last accepted unisolate**",
            Box::new(|_, _, t| opt(t.last_post_after_first, 1)),
        ),
        (
            "**(last − first) / T(300)**",
            Box::new(|_, _, t| opt(t.ratio, 3)),
        ),
        (
            "unisolate POSTs received (accepted)",
            Box::new(|_, _, t| format!("{} ({})", t.posts, t.accepted)),
        ),
        (
            "**429s** (every API; of them on unisolate)",
            Box::new(|_, _, t| format!("{} ({})", t.throttled, t.throttled_posts)),
        ),
        (
            "unisolate 429 episodes (429s in each)",
            Box::new(|_, _, t| format!("{} ({})", t.episodes.len(), show_sizes(&t.episodes))),
        ),
        (
            "most unisolate calls in 60 s / 3,600 s",
            Box::new(|_, _, t| format!("{} / {}", t.max_posts_per_minute, t.max_posts_per_hour)),
        ),
        (
            "connection's unisolate limit per minute at the end",
            Box::new(|_, _, t| t.learned_per_minute.map_or("—".into(), |l| l.to_string())),
        ),
        (
            "foreign unisolates admitted / refused (span, sim s)",
            Box::new(|_, _, t| {
                t.foreign.as_ref().map_or("—".into(), |f| {
                    format!("{} / {} ({:.0})", f.admitted, f.refused, f.span_sim_seconds)
                })
            }),
        ),
        (
            "**foreign share of the admitted unisolates** (foreign per minute)",
            Box::new(|_, _, t| {
                t.foreign.as_ref().map_or("—".into(), |f| {
                    format!(
                        "{} ({:.1})",
                        f.share
                            .map_or("—".into(), |s| format!("{:.1} %", s * 100.0)),
                        f.per_minute
                    )
                })
            }),
        ),
        (
            "**devices without exactly one accepted POST / unisolate action**",
            Box::new(|_, _, t| {
                format!(
                    "{} / {}",
                    t.devices_not_one_accepted, t.devices_not_one_action
                )
            }),
        ),
        (
            "unisolate actions (other actions)",
            Box::new(|_, _, t| format!("{} ({})", t.unisolate_actions, t.other_actions)),
        ),
        (
            "released (ground truth) / Ready Released",
            Box::new(|_, m, t| format!("{}/{} / {}", t.released, m.devices_per_tenant, t.ready)),
        ),
        (
            "**calls with another app / on another tenant's machine**",
            Box::new(|_, _, t| format!("{} / {}", t.wrong_app_calls, t.other_tenant_machine_calls)),
        ),
        (
            "apply → every resource settled",
            Box::new(|_, _, t| opt(t.settled_after_apply, 1)),
        ),
    ];
    for (label, f) in &rows {
        let mut l = format!("| {label} |");
        for t in &m.tenants {
            l.push_str(&format!(" {} |", f(s, m, t)));
        }
        line(&l);
    }
    line("");
    line(&format!(
        "Operator (one process for the three tenants): peak RSS {:.1} MiB, {:.1} CPU seconds.",
        s.operator.peak_rss_mib, s.operator.cpu_seconds
    ));
    line("");
}
