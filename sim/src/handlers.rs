//! The MDE API endpoints: routing of `/api/...` paths and the logic of each endpoint, run
//! after authentication, quota and fault handling (see `api.rs`).

use axum::http::{Method, StatusCode};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::{Need, TokenInfo};
use crate::calls::ApiName;
use crate::config::DuplicateMode;
use crate::errors::ApiError;
use crate::lifecycle::{Action, ActionType, IsolationType, Status};
use crate::odata::{self, Entity, Kind, Query, Schema, Value as OValue};
use crate::state::{Settings, Tenant};
use crate::tenant::{Behaviour, DEVICE_VALUE, EXPOSURE_LEVEL, Machine, RISK_SCORE, os_version};

/// A recognised API endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// GET /api/machines.
    MachinesList,
    /// GET /api/machines/findbytag?tag=.
    MachinesFindByTag,
    /// GET /api/machines/{id}.
    MachinesGet(String),
    /// POST /api/machines/{id}/isolate.
    Isolate(String),
    /// POST /api/machines/{id}/unisolate.
    Unisolate(String),
    /// GET /api/machineactions.
    ActionsList,
    /// GET /api/machineactions/{id}.
    ActionsGet(String),
    /// POST /api/machineactions/{id}/cancel.
    Cancel(String),
}

impl Route {
    /// The API it belongs to (quota and statistics key).
    pub fn api(&self) -> ApiName {
        match self {
            Route::MachinesList => ApiName::MachinesList,
            Route::MachinesFindByTag => ApiName::MachinesFindByTag,
            Route::MachinesGet(_) => ApiName::MachinesGet,
            Route::Isolate(_) => ApiName::Isolate,
            Route::Unisolate(_) => ApiName::Unisolate,
            Route::ActionsList => ApiName::ActionsList,
            Route::ActionsGet(_) => ApiName::ActionsGet,
            Route::Cancel(_) => ApiName::ActionsCancel,
        }
    }

    /// The permission it needs.
    pub fn need(&self) -> Need {
        match self {
            Route::Isolate(_) | Route::Unisolate(_) | Route::Cancel(_) => Need::Isolate,
            _ => Need::Read,
        }
    }
}

/// Why a path did not route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No such resource.
    NotFound,
    /// The resource exists, not with this method.
    MethodNotAllowed,
}

/// Routes the segments after `api` (and an optional `v1.0`). Collection names match
/// case-insensitively, as ASP.NET routing does.
pub fn route(method: &Method, segs: &[&str]) -> Result<Route, NoRoute> {
    let segs = match segs.first() {
        Some(v) if v.eq_ignore_ascii_case("v1.0") => &segs[1..],
        _ => segs,
    };
    let is = |s: &str, lit: &str| s.eq_ignore_ascii_case(lit);
    let (route, post) = match segs {
        [m] if is(m, "machines") => (Route::MachinesList, false),
        [m, f] if is(m, "machines") && is(f, "findbytag") => (Route::MachinesFindByTag, false),
        [m, id] if is(m, "machines") => (Route::MachinesGet(id.to_string()), false),
        [m, id, a] if is(m, "machines") && is(a, "isolate") => {
            (Route::Isolate(id.to_string()), true)
        }
        [m, id, a] if is(m, "machines") && is(a, "unisolate") => {
            (Route::Unisolate(id.to_string()), true)
        }
        [m] if is(m, "machineactions") => (Route::ActionsList, false),
        [m, id] if is(m, "machineactions") => (Route::ActionsGet(id.to_string()), false),
        [m, id, c] if is(m, "machineactions") && is(c, "cancel") => {
            (Route::Cancel(id.to_string()), true)
        }
        _ => return Err(NoRoute::NotFound),
    };
    let want = if post { Method::POST } else { Method::GET };
    if *method == want {
        Ok(route)
    } else {
        Err(NoRoute::MethodNotAllowed)
    }
}

/// What an endpoint needs to know about the request.
pub struct Ctx<'a> {
    /// Simulated time of the call.
    pub now: DateTime<Utc>,
    /// The caller.
    pub token: &'a TokenInfo,
    /// `scheme://host` as the client addressed us.
    pub base: &'a str,
    /// Request path.
    pub path: &'a str,
    /// Raw query.
    pub query: Option<&'a str>,
    /// Request body.
    pub body: &'a [u8],
}

/// A successful answer.
pub struct Outcome {
    /// 200 or 201.
    pub status: StatusCode,
    /// Serialized JSON body (serialized from structs, so fields keep the real API's order).
    pub body: Vec<u8>,
    /// The action created, returned or cancelled (for the call log).
    pub action_id: Option<String>,
}

/// The result of an endpoint.
pub type ApiResult = Result<Outcome, ApiError>;

/// Runs an endpoint in the tenant of the caller's token: it sees and changes only that
/// tenant's machines and actions (another tenant's are not found).
pub fn handle(t: &mut Tenant, settings: &Settings, route: &Route, ctx: &Ctx<'_>) -> ApiResult {
    match route {
        Route::MachinesList => machines_list(t, settings, ctx),
        Route::MachinesFindByTag => find_by_tag(t, ctx),
        Route::MachinesGet(id) => machines_get(t, ctx, id),
        Route::Isolate(id) => isolate(t, settings, ctx, id, ActionType::Isolate),
        Route::Unisolate(id) => isolate(t, settings, ctx, id, ActionType::Unisolate),
        Route::ActionsList => actions_list(t, settings, ctx),
        Route::ActionsGet(id) => actions_get(t, ctx, id),
        Route::Cancel(id) => cancel(t, ctx, id),
    }
}

fn ok(body: Vec<u8>) -> ApiResult {
    Ok(Outcome {
        status: StatusCode::OK,
        body,
        action_id: None,
    })
}

fn to_bytes(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}

/// A single entity with its `@odata.context` first.
#[derive(Serialize)]
struct EntityBody<T> {
    #[serde(rename = "@odata.context")]
    context: String,
    #[serde(flatten)]
    item: T,
}

fn entity(ctx: &Ctx<'_>, set: &str, item: impl Serialize) -> Vec<u8> {
    to_bytes(&EntityBody {
        context: format!("{}/api/$metadata#{set}/$entity", ctx.base),
        item,
    })
}

/// A collection page.
#[derive(Serialize)]
struct ListBody<T> {
    #[serde(rename = "@odata.context")]
    context: String,
    #[serde(rename = "@odata.count", skip_serializing_if = "Option::is_none")]
    count: Option<usize>,
    value: Vec<T>,
    #[serde(rename = "@odata.nextLink", skip_serializing_if = "Option::is_none")]
    next_link: Option<String>,
}

/// `$filter` on machines: exactly the properties the List machines page documents
/// (`computerDnsName`, `id`, `version`, `deviceValue`, `aadDeviceId`, `machineTags`, `lastSeen`,
/// `exposureLevel`, `onboardingStatus`, `lastIpAddress`, `healthStatus`, `osPlatform`,
/// `riskScore`, `rbacGroupId`); the other properties of a machine, `rbacGroupName` among them,
/// answer ODataError like the undocumented action properties.
const MACHINE_SCHEMA: Schema = Schema {
    entity: "Machine",
    fields: &[
        ("id", Kind::Str),
        ("computerDnsName", Kind::Str),
        ("version", Kind::Str),
        ("deviceValue", Kind::Str),
        ("aadDeviceId", Kind::Str),
        ("machineTags", Kind::Strings),
        ("lastSeen", Kind::DateTime),
        ("exposureLevel", Kind::Str),
        ("onboardingStatus", Kind::Str),
        ("lastIpAddress", Kind::Str),
        ("healthStatus", Kind::Str),
        ("osPlatform", Kind::Str),
        ("riskScore", Kind::Str),
        ("rbacGroupId", Kind::Number),
    ],
    unfilterable: &[
        "rbacGroupName",
        "firstSeen",
        "osProcessor",
        "lastExternalIpAddress",
        "agentVersion",
        "osBuild",
        "isAadJoined",
        "defenderAvStatus",
        "osArchitecture",
        "managedBy",
        "managedByStatus",
        "ipAddresses",
        "vmMetadata",
        "isPotentialDuplication",
        "mergedIntoMachineId",
    ],
    orderable: &["computerDnsName", "lastSeen"],
};

impl Entity for Machine {
    fn field(&self, name: &str) -> Option<OValue<'_>> {
        Some(match name {
            "id" => OValue::Str(Some(&self.id)),
            "computerDnsName" => OValue::Str(Some(&self.computer_dns_name)),
            "version" => OValue::Str(Some(os_version(&self.os_platform))),
            "deviceValue" => OValue::Str(Some(DEVICE_VALUE)),
            "aadDeviceId" => OValue::Str(None),
            "machineTags" => OValue::Strings(&self.machine_tags),
            "lastSeen" => OValue::DateTime(self.last_seen),
            "exposureLevel" => OValue::Str(Some(EXPOSURE_LEVEL)),
            "onboardingStatus" => OValue::Str(Some(&self.onboarding_status)),
            "lastIpAddress" => OValue::Str(Some(&self.last_ip_address)),
            "healthStatus" => OValue::Str(Some(&self.health_status)),
            "osPlatform" => OValue::Str(Some(&self.os_platform)),
            "riskScore" => OValue::Str(Some(RISK_SCORE)),
            "rbacGroupId" => OValue::Number(self.rbac_group_id as f64),
            _ => return None,
        })
    }
}

const ACTION_SCHEMA: Schema = Schema {
    entity: "MachineAction",
    fields: &[
        ("id", Kind::Str),
        ("status", Kind::Str),
        ("machineId", Kind::Str),
        ("type", Kind::Str),
        ("requestor", Kind::Str),
        ("creationDateTimeUtc", Kind::DateTime),
    ],
    unfilterable: &[
        "lastUpdateDateTimeUtc",
        "lastUpdateTimeUtc",
        "computerDnsName",
        "requestorComment",
        "scope",
        "cancellationRequestor",
        "cancellationDateTimeUtc",
        "externalId",
        "requestSource",
        "title",
        "errorHResult",
    ],
    orderable: &["creationDateTimeUtc"],
};

/// An action as seen at one moment (its status depends on time).
struct ActionAt<'a> {
    action: &'a Action,
    status: Status,
}

impl Entity for ActionAt<'_> {
    fn field(&self, name: &str) -> Option<OValue<'_>> {
        let a = self.action;
        Some(match name {
            "id" => OValue::Str(Some(&a.id)),
            "status" => OValue::Str(Some(self.status.as_str())),
            "machineId" => OValue::Str(Some(&a.machine_id)),
            "type" => OValue::Str(Some(a.action_type.as_str())),
            "requestor" => OValue::Str(Some(&a.requestor)),
            "creationDateTimeUtc" => OValue::DateTime(a.created),
            _ => return None,
        })
    }
}

/// Applies filter, order, skip/top and the server page size; builds the OData list body with
/// `@odata.count` and an absolute `@odata.nextLink` when more remains.
fn list_body<E: Entity, T: Serialize>(
    mut items: Vec<E>,
    q: &Query,
    page_size: usize,
    ctx: &Ctx<'_>,
    set: &str,
    view: impl Fn(&E) -> T,
) -> ListBody<T> {
    if let Some(f) = &q.filter {
        items.retain(|e| odata::eval(f, e));
    }
    if let Some(o) = &q.orderby {
        items.sort_by(|a, b| {
            let c = odata::order_cmp(a, b, &o.field);
            if o.descending { c.reverse() } else { c }
        });
    }
    let total = items.len();
    let start = q.skip.min(total);
    let wanted = q.top.unwrap_or(usize::MAX).min(total - start);
    let n = wanted.min(page_size);
    ListBody {
        context: format!("{}/api/$metadata#{set}", ctx.base),
        count: q.count.then_some(total),
        value: items[start..start + n].iter().map(view).collect(),
        next_link: (wanted > n).then(|| next_link(ctx, q.skip + n, q.top.map(|t| t - n))),
    }
}

/// The same request with `$skip`/`$top` moved on.
fn next_link(ctx: &Ctx<'_>, skip: usize, top: Option<usize>) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(ctx.query.unwrap_or("").as_bytes()) {
        if k != "$skip" && k != "$top" {
            ser.append_pair(&k, &v);
        }
    }
    if let Some(t) = top {
        ser.append_pair("$top", &t.to_string());
    }
    ser.append_pair("$skip", &skip.to_string());
    format!("{}{}?{}", ctx.base, ctx.path, ser.finish())
}

fn machines_list(st: &Tenant, settings: &Settings, ctx: &Ctx<'_>) -> ApiResult {
    let q = odata::parse_query(ctx.query, &MACHINE_SCHEMA).map_err(ApiError::odata)?;
    if st.machines().is_empty() {
        return Err(ApiError::not_found("No machines found"));
    }
    let items: Vec<&Machine> = st.machines().iter().collect();
    let body = list_body(items, &q, settings.page_size, ctx, "Machines", |m| m.view());
    if body.value.is_empty() && settings.empty_filter_404 && q.filter.is_some() {
        return Err(ApiError::not_found("No machines found"));
    }
    ok(to_bytes(&body))
}

impl Entity for &Machine {
    fn field(&self, name: &str) -> Option<OValue<'_>> {
        (**self).field(name)
    }
}

fn find_by_tag(st: &Tenant, ctx: &Ctx<'_>) -> ApiResult {
    let tag = url::form_urlencoded::parse(ctx.query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "tag")
        .map(|(_, v)| v.into_owned())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("InvalidInput", "The 'tag' parameter is required"))?;
    let value: Vec<_> = st
        .machines()
        .iter()
        .filter(|m| m.machine_tags.contains(&tag))
        .map(|m| m.view())
        .collect();
    ok(to_bytes(&ListBody {
        context: format!("{}/api/$metadata#Machines", ctx.base),
        count: None,
        value,
        next_link: None,
    }))
}

fn machines_get(st: &Tenant, ctx: &Ctx<'_>, id: &str) -> ApiResult {
    let m = st
        .machine(id)
        .ok_or_else(|| ApiError::not_found(format!("Machine {id} was not found")))?;
    ok(entity(ctx, "Machines", m.view()))
}

/// Parses a JSON object body; MDE answers InvalidRequestBody when it cannot.
fn body_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "InvalidRequestBody",
            "Request body is empty",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "InvalidRequestBody",
            "Request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            "InvalidRequestBody",
            format!("Request body is not valid JSON: {e}"),
        )),
    }
}

/// The case-sensitive `Comment` property.
fn comment(obj: &Map<String, Value>) -> Result<String, ApiError> {
    match obj.get("Comment") {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | Some(Value::Null) | None => Err(ApiError::bad_request(
            "MissingRequiredParameter",
            "Required parameter 'Comment' is missing or empty",
        )),
        Some(_) => Err(ApiError::bad_request(
            "InvalidRequestBody",
            "'Comment' must be a string",
        )),
    }
}

fn isolate(
    st: &mut Tenant,
    settings: &Settings,
    ctx: &Ctx<'_>,
    id: &str,
    kind: ActionType,
) -> ApiResult {
    let obj = body_object(ctx.body)?;
    let comment = comment(&obj)?;
    let isolation_type = match kind {
        ActionType::Unisolate => None,
        ActionType::Isolate => Some(match obj.get("IsolationType") {
            None | Some(Value::Null) => IsolationType::Full,
            Some(Value::String(s)) => IsolationType::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "InvalidRequestBody",
                    format!("Invalid IsolationType '{s}'. Allowed values: Full, Selective, UnManagedDevice"),
                )
            })?,
            Some(_) => return Err(ApiError::bad_request("InvalidRequestBody", "'IsolationType' must be a string")),
        }),
    };
    let m = st
        .machine(id)
        .ok_or_else(|| ApiError::not_found(format!("Machine {id} was not found")))?;
    if m.behaviour == Behaviour::Unsupported {
        return Err(ApiError::bad_request(
            "OsPlatformNotSupported",
            format!(
                "OS platform {} is not supported for this action",
                m.os_platform
            ),
        ));
    }
    let open = st.open_actions(id, ctx.now);
    if !open.is_empty() {
        let in_progress = || {
            ApiError::bad_request(
                "ActiveRequestAlreadyExists",
                "Action is already in progress",
            )
        };
        match settings.duplicate_mode {
            DuplicateMode::Reject => return Err(in_progress()),
            DuplicateMode::ReturnExisting => {
                let same = open
                    .iter()
                    .find(|a| a.action_type == kind)
                    .ok_or_else(in_progress)?;
                return Ok(Outcome {
                    status: StatusCode::CREATED,
                    body: entity(ctx, "MachineActions", same.view(ctx.now)),
                    action_id: Some(same.id.clone()),
                });
            }
            DuplicateMode::Allow => {}
        }
    }
    let requestor = ctx.token.display_name.clone();
    let a = st
        .create_action(
            settings,
            id,
            kind,
            isolation_type,
            requestor,
            comment,
            "PublicApi".into(),
            ctx.now,
        )
        .ok_or_else(|| ApiError::not_found(format!("Machine {id} was not found")))?;
    Ok(Outcome {
        status: StatusCode::CREATED,
        body: entity(ctx, "MachineActions", a.view(ctx.now)),
        action_id: Some(a.id.clone()),
    })
}

fn actions_list(st: &Tenant, settings: &Settings, ctx: &Ctx<'_>) -> ApiResult {
    let q = odata::parse_query(ctx.query, &ACTION_SCHEMA).map_err(ApiError::odata)?;
    let now = ctx.now;
    let mut items: Vec<ActionAt<'_>> = st
        .actions()
        .iter()
        .map(|a| ActionAt {
            action: a,
            status: a.status_at(now),
        })
        .collect();
    // Oldest first: seeded isolations can predate actions stored before them.
    items.sort_by_key(|a| a.action.created);
    ok(to_bytes(&list_body(
        items,
        &q,
        settings.page_size,
        ctx,
        "MachineActions",
        |a| a.action.view(now),
    )))
}

fn actions_get(st: &Tenant, ctx: &Ctx<'_>, id: &str) -> ApiResult {
    let a = st
        .action(id)
        .ok_or_else(|| ApiError::not_found(format!("Machine action {id} was not found")))?;
    ok(entity(ctx, "MachineActions", a.view(ctx.now)))
}

fn cancel(st: &mut Tenant, ctx: &Ctx<'_>, id: &str) -> ApiResult {
    let obj = body_object(ctx.body)?;
    let comment = comment(&obj)?;
    match st.cancel(id, ctx.token.display_name.clone(), comment, ctx.now) {
        Ok(a) => Ok(Outcome {
            status: StatusCode::OK,
            body: entity(ctx, "MachineActions", a.view(ctx.now)),
            action_id: Some(a.id.clone()),
        }),
        Err(None) => Err(ApiError::not_found(format!(
            "Machine action {id} was not found"
        ))),
        Err(Some(status)) => Err(ApiError::bad_request(
            "BadRequest",
            format!(
                "Machine action {id} is already in a final state ({}) and cannot be cancelled",
                status.as_str()
            ),
        )),
    }
}
