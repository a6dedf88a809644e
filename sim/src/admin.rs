//! The admin API under `/sim/` (no auth): ground truth, call log, statistics, clock, settings,
//! faults, tenants, reset, and actions by "people" (portal isolation, manual cancel). What
//! belongs to a tenant is addressed with `?tenant=<id>` (the default tenant without it). Shapes
//! are documented in docs/mde-sim.md.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, Response, StatusCode};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::api::Shared;
use crate::calls::{ApiName, stats};
use crate::clock::fmt7;
use crate::errors::{ApiError, PLAIN_JSON, json_response};
use crate::foreign::{self, LoadEntry};
use crate::lifecycle::{ActionType, IsolationType};
use crate::state::{Settings, SimState, Tenant, TenantKey};
use crate::tenant::{
    Behaviour, PORTAL_SOURCE, SeedMachine, SeedTenant, generate_machines, machine_from_seed,
};

type AdminResult = Result<(StatusCode, Value), ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("InvalidInput", msg)
}

fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "ResourceNotFound", msg)
}

fn ok(v: impl Serialize) -> AdminResult {
    Ok((
        StatusCode::OK,
        serde_json::to_value(v).unwrap_or(Value::Null),
    ))
}

/// Handles `/sim/{rest}`.
pub async fn handle(shared: &Shared, req: Request, rest: &[&str]) -> Response<Body> {
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match axum::body::to_bytes(req.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(_) => return bad("request body could not be read or is too large").into_response(),
    };
    let mut st = shared.lock();
    match route(&mut st, &method, rest, &query, &body) {
        Ok((status, v)) => json_response(status, &v, PLAIN_JSON),
        Err(e) => e.into_response(),
    }
}

/// A JSON object body; an empty body is an empty object.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("body must be a JSON object")),
        Err(e) => Err(bad(format!("body is not valid JSON: {e}"))),
    }
}

fn parse<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

/// Applies the keys of `patch` to `current`; unknown keys are errors.
fn merge<T: Serialize + DeserializeOwned>(
    current: &T,
    patch: Map<String, Value>,
) -> Result<T, ApiError> {
    let mut v = serde_json::to_value(current).map_err(|e| bad(e.to_string()))?;
    let obj = v.as_object_mut().ok_or_else(|| bad("not an object"))?;
    for (k, val) in patch {
        if !obj.contains_key(&k) {
            return Err(bad(format!("unknown setting {k:?}")));
        }
        obj.insert(k, val);
    }
    parse(v)
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The tenant an admin request addresses: `?tenant=<id>` (a named tenant; 404 when there is
/// none), or the default tenant without it.
fn tenant_key(st: &SimState, query: &str) -> Result<TenantKey, ApiError> {
    match query_param(query, "tenant") {
        None => Ok(TenantKey::Default),
        Some(id) => {
            let key = TenantKey::named(&id);
            if st.tenants.contains_key(&key) {
                Ok(key)
            } else {
                Err(no_tenant(&id))
            }
        }
    }
}

fn no_tenant(id: &str) -> ApiError {
    not_found(format!("no tenant {id}"))
}

fn route(
    st: &mut SimState,
    method: &Method,
    rest: &[&str],
    query: &str,
    body: &[u8],
) -> AdminResult {
    let get = *method == Method::GET;
    let post = *method == Method::POST;
    match rest {
        ["health"] if get => ok(json!({"ok": true})),
        ["time"] if get => time(st),
        ["time", "advance"] if post => {
            let secs = object(body)?
                .get("seconds")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad("need {\"seconds\": number}"))?;
            if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
                return Err(bad("seconds must be between 0 and 1e9"));
            }
            st.clock.advance(secs);
            time(st)
        }
        ["settings"] if get => settings(st),
        ["settings"] if post => {
            // Foreign calls until now were made under the settings in force until now.
            st.play_all_foreign();
            let mut patch = object(body)?;
            let scale = patch.remove("timeScale");
            let new = merge(&st.settings, patch)?;
            new.validate().map_err(bad)?;
            if let Some(scale) = scale {
                let s = scale
                    .as_f64()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| bad("timeScale must be a number >= 0"))?;
                st.clock.set_scale(s);
            }
            st.settings = new;
            settings(st)
        }
        ["faults"] if get => ok(&st.faults.settings),
        ["faults"] if post => {
            let new = merge(&st.faults.settings, object(body)?)?;
            new.validate().map_err(bad)?;
            st.faults.settings = new;
            ok(&st.faults.settings)
        }
        ["tenants"] if get => {
            let list: Vec<Value> = st.tenants.values().map(Tenant::describe).collect();
            ok(json!({"tenants": list}))
        }
        ["tenants"] if post => put_tenant(st, body),
        ["tenants", id] if get => st
            .tenants
            .get(&TenantKey::named(id))
            .map(|t| (StatusCode::OK, t.describe()))
            .ok_or_else(|| no_tenant(id)),
        ["tenants", id] if *method == Method::DELETE => {
            if st.remove_tenant(&TenantKey::named(id)) {
                ok(json!({"deleted": id}))
            } else {
                Err(no_tenant(id))
            }
        }
        ["reset"] if post => {
            if query_param(query, "tenant").is_some() {
                let key = tenant_key(st, query)?;
                st.reset_tenant(&key);
            } else {
                st.reset();
            }
            time(st)
        }
        ["calls"] if get => {
            let api = query_param(query, "api");
            let since: u64 = query_param(query, "since")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let logs: Vec<&Tenant> = if query_param(query, "tenant").as_deref() == Some("*") {
                st.tenants.values().collect()
            } else {
                vec![&st.tenants[&tenant_key(st, query)?]]
            };
            let mut calls: Vec<_> = logs
                .into_iter()
                .flat_map(|t| &t.calls)
                .filter(|c| c.seq > since && api.as_deref().is_none_or(|a| c.api.as_str() == a))
                .collect();
            calls.sort_by_key(|c| c.seq);
            ok(json!({"calls": calls}))
        }
        _ => {
            let key = tenant_key(st, query)?;
            let now = st.clock.now();
            let t = st
                .tenants
                .get_mut(&key)
                .ok_or_else(|| not_found("tenant vanished"))?;
            in_tenant(t, &st.settings, now, method, rest, query, body)
        }
    }
}

/// The admin endpoints on one tenant's state.
fn in_tenant(
    t: &mut Tenant,
    settings: &Settings,
    now: DateTime<Utc>,
    method: &Method,
    rest: &[&str],
    query: &str,
    body: &[u8],
) -> AdminResult {
    let get = *method == Method::GET;
    let post = *method == Method::POST;
    match rest {
        ["foreign-load"] if get => ok(t.foreign.describe()),
        ["foreign-load"] if post => set_foreign_load(t, settings, now, object(body)?),
        ["stats"] if get => {
            t.play_foreign(now, settings.limits());
            let mut apis = stats(&t.calls);
            for a in ApiName::ALL {
                apis.entry(a.as_str()).or_default();
            }
            let s = settings;
            ok(json!({
                "now": fmt7(now),
                "totalCalls": t.calls.len(),
                "limits": {"perMinute": s.quota_per_minute, "perHour": s.quota_per_hour, "key": s.quota_key},
                "apis": apis,
                "foreign": t.foreign.report(),
            }))
        }
        ["machines"] if get => {
            let list: Vec<Value> = t
                .machines()
                .iter()
                .filter_map(|m| t.ground_truth(&m.id, now))
                .map(|mut g| {
                    g.actions.clear();
                    let mut v = json!(g);
                    if let Some(o) = v.as_object_mut() {
                        o.remove("actions");
                    }
                    v
                })
                .collect();
            ok(json!({"machines": list}))
        }
        ["machines"] if post => add_machines(t, now, object(body)?),
        ["machines", id] if get => {
            let m = t
                .find_machine(id)
                .ok_or_else(|| not_found(format!("no machine {id}")))?;
            let id = m.id.clone();
            ok(t.ground_truth(&id, now))
        }
        ["machines", id] if *method == Method::PATCH || post => {
            patch_machine(t, settings, now, id, object(body)?)
        }
        [
            "machines",
            id,
            which @ ("isolate-external" | "unisolate-external"),
        ] if post => {
            let kind = if *which == "isolate-external" {
                ActionType::Isolate
            } else {
                ActionType::Unisolate
            };
            external_action(t, settings, now, id, kind, object(body)?)
        }
        ["actions"] if get => {
            let machine = query_param(query, "machineId");
            let mut list: Vec<&crate::lifecycle::Action> = t
                .actions()
                .iter()
                .filter(|a| machine.as_deref().is_none_or(|m| a.machine_id == m))
                .collect();
            list.sort_by_key(|a| a.created);
            let list: Vec<Value> = list.iter().map(|a| json!(a.view(now))).collect();
            ok(json!({"value": list}))
        }
        ["actions", id] if get => {
            let a = t
                .action(id)
                .ok_or_else(|| not_found(format!("no action {id}")))?;
            let mut v = json!(a.view(now));
            v["plan"] = json!({
                "inProgressAt": a.plan.in_progress_at.map(fmt7),
                "finalAt": fmt7(a.plan.final_at),
                "finalStatus": a.plan.final_status,
            });
            ok(v)
        }
        ["actions", id, "cancel"] if post => {
            let b = object(body)?;
            let requestor =
                str_field(&b, "requestor")?.unwrap_or_else(|| "soc-analyst@contoso.com".into());
            let comment =
                str_field(&b, "comment")?.unwrap_or_else(|| "Cancelled in the portal".into());
            match t.cancel(id, requestor, comment, now) {
                Ok(a) => ok(a.view(now)),
                Err(None) => Err(not_found(format!("no action {id}"))),
                Err(Some(s)) => Err(ApiError::bad_request(
                    "BadRequest",
                    format!("action is already {}", s.as_str()),
                )),
            }
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no admin endpoint {method} /sim/{}", rest.join("/")),
        )),
    }
}

/// A named tenant (the seed file's shape of a `tenants` entry) created, or replaced fresh: 201
/// when new, 200 when it replaced one (whose tokens are revoked).
fn put_tenant(st: &mut SimState, body: &[u8]) -> AdminResult {
    let seed: SeedTenant = parse(Value::Object(object(body)?))?;
    let now = st.clock.now();
    let tenant =
        Tenant::from_seed(seed, std::path::Path::new("."), st.rng_seed(), now).map_err(bad)?;
    let v = tenant.describe();
    let status = if st.put_tenant(tenant) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, v))
}

fn str_field(b: &Map<String, Value>, k: &str) -> Result<Option<String>, ApiError> {
    match b.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("{k} must be a string"))),
    }
}

fn time(st: &SimState) -> AdminResult {
    ok(json!({
        "now": fmt7(st.clock.now()),
        "timeScale": st.clock.scale(),
        "realTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }))
}

fn settings(st: &SimState) -> AdminResult {
    let mut v = json!(st.settings);
    v["timeScale"] = json!(st.clock.scale());
    ok(v)
}

/// `{"load": [{"api", "perMinute", "pattern", "app"}, ...]}` replaces the foreign load from now
/// on (an empty list stops it); the calls due until now are played under the old one.
fn set_foreign_load(
    t: &mut Tenant,
    settings: &Settings,
    now: DateTime<Utc>,
    mut b: Map<String, Value>,
) -> AdminResult {
    let load = b
        .remove("load")
        .ok_or_else(|| bad("need {\"load\": [...]}"))?;
    if let Some(k) = b.keys().next() {
        return Err(bad(format!("unknown field {k:?}")));
    }
    let entries: Vec<LoadEntry> = parse(load)?;
    foreign::validate(&entries, &t.apps).map_err(bad)?;
    t.play_foreign(now, settings.limits());
    t.foreign.set(entries, now);
    ok(t.foreign.describe())
}

/// `{"machines": [seed machines]}` and/or `{"count": N, "behaviour": "..."}`.
fn add_machines(st: &mut Tenant, now: DateTime<Utc>, b: Map<String, Value>) -> AdminResult {
    let mut new = Vec::new();
    if let Some(list) = b.get("machines") {
        let seeds: Vec<SeedMachine> = parse(list.clone())?;
        for s in seeds {
            new.push(machine_from_seed(s, &mut st.machine_rng, now).map_err(bad)?);
        }
    }
    if let Some(count) = b.get("count") {
        let count = count
            .as_u64()
            .filter(|c| *c <= 100_000)
            .ok_or_else(|| bad("count must be 0..=100000"))? as usize;
        let behaviour: Behaviour = parse(b.get("behaviour").cloned().unwrap_or(json!("online")))?;
        let mut generated = generate_machines(
            &mut st.machine_rng,
            st.next_number,
            count,
            0.0,
            0.0,
            &st.domain,
            now,
        );
        st.next_number += count;
        for m in &mut generated {
            m.behaviour = behaviour;
            if behaviour == Behaviour::Offline {
                m.health_status = "Inactive".into();
            }
        }
        new.extend(generated);
    }
    if let Some(k) = b
        .keys()
        .find(|k| !matches!(k.as_str(), "machines" | "count" | "behaviour"))
    {
        return Err(bad(format!("unknown field {k:?}")));
    }
    let mut added = Vec::new();
    for m in new {
        added.push(json!({"id": m.id, "computerDnsName": m.computer_dns_name}));
        st.add_machine(m)
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, "Conflict", e))?;
    }
    Ok((StatusCode::CREATED, json!({"added": added})))
}

/// Changes behaviour (re-planning Pending actions), health, tags, name or OS of a machine.
fn patch_machine(
    st: &mut Tenant,
    settings: &Settings,
    now: DateTime<Utc>,
    id: &str,
    b: Map<String, Value>,
) -> AdminResult {
    let id = st
        .find_machine(id)
        .map(|m| m.id.clone())
        .ok_or_else(|| not_found(format!("no machine {id}")))?;
    for (k, v) in b {
        match k.as_str() {
            "behaviour" | "behavior" => {
                let beh: Behaviour = parse(v)?;
                st.set_behaviour(&id, beh, now, settings.delays);
            }
            "healthStatus" | "computerDnsName" | "osPlatform" => {
                let s: String = parse(v)?;
                let m = st
                    .machine_mut(&id)
                    .ok_or_else(|| not_found("machine vanished"))?;
                match k.as_str() {
                    "healthStatus" => m.health_status = s,
                    "computerDnsName" => m.computer_dns_name = s,
                    _ => m.os_platform = s,
                }
            }
            "machineTags" => {
                let tags: Vec<String> = parse(v)?;
                if let Some(m) = st.machine_mut(&id) {
                    m.machine_tags = tags;
                }
            }
            "lastSeen" => {
                let t: chrono::DateTime<chrono::Utc> = parse(v)?;
                if let Some(m) = st.machine_mut(&id) {
                    m.last_seen = t;
                }
            }
            other => return Err(bad(format!("unknown field {other:?}"))),
        }
    }
    ok(st.ground_truth(&id, now))
}

/// Someone else (a person in the portal) isolates or releases the machine: a real action with
/// a UPN as requestor, bypassing quota and the duplicate check. `immediate: true` makes it
/// Succeed at once (drift tests).
fn external_action(
    st: &mut Tenant,
    settings: &Settings,
    now: DateTime<Utc>,
    id: &str,
    kind: ActionType,
    b: Map<String, Value>,
) -> AdminResult {
    let m = st
        .find_machine(id)
        .ok_or_else(|| not_found(format!("no machine {id}")))?;
    if m.behaviour == Behaviour::Unsupported {
        return Err(ApiError::bad_request(
            "OsPlatformNotSupported",
            "OS platform is not supported for this action",
        ));
    }
    let id = m.id.clone();
    let requestor = str_field(&b, "requestor")?.unwrap_or_else(|| "portal-user@contoso.com".into());
    let comment =
        str_field(&b, "comment")?.unwrap_or_else(|| format!("{} from the portal", kind.as_str()));
    let iso = match (kind, str_field(&b, "isolationType")?) {
        (ActionType::Unisolate, _) => None,
        (ActionType::Isolate, None) => Some(IsolationType::Full),
        (ActionType::Isolate, Some(s)) => {
            Some(IsolationType::parse(&s).ok_or_else(|| bad(format!("bad isolationType {s}")))?)
        }
    };
    let source = str_field(&b, "requestSource")?.unwrap_or_else(|| PORTAL_SOURCE.into());
    if source.trim().is_empty() {
        return Err(bad("requestSource must not be empty"));
    }
    let immediate = b.get("immediate").and_then(Value::as_bool).unwrap_or(false);
    if let Some(k) = b.keys().find(|k| {
        !matches!(
            k.as_str(),
            "requestor" | "comment" | "isolationType" | "requestSource" | "immediate"
        )
    }) {
        return Err(bad(format!("unknown field {k:?}")));
    }
    let action_id = st
        .create_action(settings, &id, kind, iso, requestor, comment, source, now)
        .map(|a| a.id.clone())
        .ok_or_else(|| not_found("machine vanished"))?;
    let a = st
        .action_mut(&action_id)
        .ok_or_else(|| not_found("action vanished"))?;
    if immediate {
        // Done at the current instant, so it shows as Succeeded even on a frozen clock.
        a.created = a.created.min(now);
        a.plan.in_progress_at = Some(a.created);
        a.plan.final_at = a.created;
        a.plan.final_status = crate::lifecycle::Status::Succeeded;
    }
    Ok((StatusCode::CREATED, json!(a.view(now))))
}
