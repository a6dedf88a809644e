//! MDE entities as the operator reads them: `MachineAction` and `Machine`.
//!
//! Parsing is lenient on purpose: MDE adds fields, some documentation examples spell fields
//! differently, and dates come with seven fraction digits. Only `id` (and `type` for actions) are
//! required; every other field that is missing, null, of an unexpected type or unparseable becomes
//! `None` instead of failing the whole response.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// How a device is isolated (the `IsolationType` of an isolate request).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum IsolationType {
    /// Full isolation: the device keeps only its connection to the Defender service.
    #[default]
    Full,
    /// Selective isolation: Outlook, Teams and Skype for Business keep working (Windows only).
    Selective,
    /// Isolation of an unmanaged device discovered by MDE, enforced by the onboarded devices
    /// around it (contain).
    UnManagedDevice,
}

impl IsolationType {
    /// The value MDE expects in the request body.
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationType::Full => "Full",
            IsolationType::Selective => "Selective",
            IsolationType::UnManagedDevice => "UnManagedDevice",
        }
    }
}

impl fmt::Display for IsolationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `type` of a machine action. Only isolation actions matter to the operator; every other
/// type is kept verbatim so that it can be recognised and ignored.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ActionType {
    /// `Isolate`.
    Isolate,
    /// `Unisolate` (release from isolation).
    Unisolate,
    /// Any other action type (`RunAntiVirusScan`, `Offboard`, ...), as MDE spelled it.
    Other(String),
}

impl ActionType {
    /// The MDE spelling.
    pub fn as_str(&self) -> &str {
        match self {
            ActionType::Isolate => "Isolate",
            ActionType::Unisolate => "Unisolate",
            ActionType::Other(s) => s,
        }
    }
}

impl From<&str> for ActionType {
    fn from(s: &str) -> Self {
        if s.eq_ignore_ascii_case("Isolate") {
            ActionType::Isolate
        } else if s.eq_ignore_ascii_case("Unisolate") {
            ActionType::Unisolate
        } else {
            ActionType::Other(s.to_owned())
        }
    }
}

impl fmt::Display for ActionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ActionType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ActionType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ActionType::from(s.as_str()))
    }
}

/// The `status` of a machine action.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ActionStatus {
    /// Accepted, not yet picked up by the device (offline devices stay here for up to 3 days).
    Pending,
    /// The device is executing it.
    InProgress,
    /// Done.
    Succeeded,
    /// The device could not execute it.
    Failed,
    /// MDE gave up waiting for the device.
    TimeOut,
    /// Someone cancelled it.
    Cancelled,
    /// A status this client does not know, as MDE spelled it (empty if MDE sent none).
    Unknown(String),
}

impl ActionStatus {
    /// True once the action can no longer change (`Succeeded`, `Failed`, `TimeOut`, `Cancelled`).
    /// Unknown statuses count as open, so that the operator keeps watching instead of acting.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ActionStatus::Succeeded
                | ActionStatus::Failed
                | ActionStatus::TimeOut
                | ActionStatus::Cancelled
        )
    }

    /// The MDE spelling.
    pub fn as_str(&self) -> &str {
        match self {
            ActionStatus::Pending => "Pending",
            ActionStatus::InProgress => "InProgress",
            ActionStatus::Succeeded => "Succeeded",
            ActionStatus::Failed => "Failed",
            ActionStatus::TimeOut => "TimeOut",
            ActionStatus::Cancelled => "Cancelled",
            ActionStatus::Unknown(s) => s,
        }
    }
}

impl From<&str> for ActionStatus {
    fn from(s: &str) -> Self {
        const KNOWN: [ActionStatus; 6] = [
            ActionStatus::Pending,
            ActionStatus::InProgress,
            ActionStatus::Succeeded,
            ActionStatus::Failed,
            ActionStatus::TimeOut,
            ActionStatus::Cancelled,
        ];
        KNOWN
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .unwrap_or_else(|| ActionStatus::Unknown(s.to_owned()))
    }
}

impl fmt::Display for ActionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ActionStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ActionStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(lenient_string(d)?
            .map(|s| ActionStatus::from(s.as_str()))
            .unwrap_or_else(|| ActionStatus::Unknown(String::new())))
    }
}

/// A machine action (`/api/machineactions`), reduced to the fields the operator uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "JsonObject", rename_all = "camelCase")]
pub struct MachineAction {
    /// The action id (a GUID).
    pub id: String,
    /// The action type (JSON `type`).
    #[serde(rename = "type")]
    pub action_type: ActionType,
    /// Where it stands (an absent status parses as `Unknown("")`).
    pub status: ActionStatus,
    /// The device it targets.
    pub machine_id: Option<String>,
    /// Who asked: the app's display name (or client id) for app tokens, a UPN for users.
    pub requestor: Option<String>,
    /// The `Comment` sent with the request.
    pub requestor_comment: Option<String>,
    /// Where the request came from (`requestSource`: the public API, the portal, automatic
    /// attack disruption, ...).
    pub request_source: Option<String>,
    /// `Full` / `Selective` for isolation actions; null at creation.
    pub scope: Option<String>,
    /// `creationDateTimeUtc`.
    #[serde(rename = "creationDateTimeUtc")]
    pub created_at: Option<DateTime<Utc>>,
    /// `lastUpdateDateTimeUtc` (some documentation examples spell it `lastUpdateTimeUtc`).
    #[serde(rename = "lastUpdateDateTimeUtc")]
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMachineAction {
    id: String,
    #[serde(rename = "type")]
    action_type: ActionType,
    #[serde(default)]
    status: Option<ActionStatus>,
    #[serde(default, deserialize_with = "lenient_string")]
    machine_id: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    requestor: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    requestor_comment: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    request_source: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    scope: Option<String>,
    #[serde(default, deserialize_with = "lenient_datetime")]
    creation_date_time_utc: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "lenient_datetime")]
    last_update_date_time_utc: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "lenient_datetime")]
    last_update_time_utc: Option<DateTime<Utc>>,
}

/// A JSON object. Entities deserialize through it so that a JSON array is refused: serde would
/// otherwise read a struct from an array, field by field in declaration order.
type JsonObject = serde_json::Map<String, Value>;

impl TryFrom<JsonObject> for MachineAction {
    type Error = serde_json::Error;
    fn try_from(object: JsonObject) -> Result<Self, Self::Error> {
        RawMachineAction::deserialize(Value::Object(object)).map(Self::from)
    }
}

impl TryFrom<JsonObject> for Machine {
    type Error = serde_json::Error;
    fn try_from(object: JsonObject) -> Result<Self, Self::Error> {
        RawMachine::deserialize(Value::Object(object)).map(Self::from)
    }
}

impl From<RawMachineAction> for MachineAction {
    fn from(r: RawMachineAction) -> Self {
        MachineAction {
            id: r.id,
            action_type: r.action_type,
            status: r
                .status
                .unwrap_or_else(|| ActionStatus::Unknown(String::new())),
            machine_id: r.machine_id,
            requestor: r.requestor,
            requestor_comment: r.requestor_comment,
            request_source: r.request_source,
            scope: r.scope,
            created_at: r.creation_date_time_utc,
            updated_at: r.last_update_date_time_utc.or(r.last_update_time_utc),
        }
    }
}

/// A device (`/api/machines`), reduced to the fields the operator uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "JsonObject", rename_all = "camelCase")]
pub struct Machine {
    /// The machine id (40 lowercase hex characters).
    pub id: String,
    /// The device's DNS name.
    pub computer_dns_name: Option<String>,
    /// `Windows10`, `Linux`, `macOS`, ...
    pub os_platform: Option<String>,
    /// `Active`, `Inactive`, `ImpairedCommunication`, `NoSensorData`, ...
    pub health_status: Option<String>,
    /// Tags set on the device (empty when absent).
    pub machine_tags: Vec<String>,
    /// The device group it belongs to.
    pub rbac_group_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMachine {
    id: String,
    #[serde(default, deserialize_with = "lenient_string")]
    computer_dns_name: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    os_platform: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    health_status: Option<String>,
    #[serde(default, deserialize_with = "lenient_string_list")]
    machine_tags: Vec<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    rbac_group_name: Option<String>,
}

impl From<RawMachine> for Machine {
    fn from(r: RawMachine) -> Self {
        Machine {
            id: r.id,
            computer_dns_name: r.computer_dns_name,
            os_platform: r.os_platform,
            health_status: r.health_status,
            machine_tags: r.machine_tags,
            rbac_group_name: r.rbac_group_name,
        }
    }
}

/// One page of an OData collection: `{"value": [...], "@odata.nextLink": "..."}`.
#[derive(Debug)]
pub(crate) struct Page<T> {
    /// The items that parsed; an item that does not is skipped (and logged), not fatal.
    pub items: Vec<T>,
    /// Where the next page is, if any.
    pub next_link: Option<String>,
    /// How many items were skipped because they did not parse.
    pub skipped: usize,
}

/// The envelope as it arrives: each item stays unparsed JSON text borrowed from the body, so a page
/// of thousands of actions is never held as a tree of JSON values (that tree, not the actions,
/// was most of the operator's peak memory when it loaded a large tenant).
#[derive(Deserialize)]
struct RawPage<'a> {
    #[serde(borrow)]
    value: Vec<&'a RawValue>,
    #[serde(
        rename = "@odata.nextLink",
        default,
        deserialize_with = "lenient_string"
    )]
    next_link: Option<String>,
}

impl<T: serde::de::DeserializeOwned> Page<T> {
    /// Parses a page; fails only if the envelope itself is not an object with a `value` array.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        // Only an object is a page: a derived struct would also accept an array of fields.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(serde::de::Error::custom(
                "an OData page must be a JSON object",
            ));
        }
        let raw: RawPage = serde_json::from_slice(body)?;
        let mut items = Vec::with_capacity(raw.value.len());
        let mut skipped = 0;
        for v in raw.value {
            match serde_json::from_str::<T>(v.get()) {
                Ok(item) => items.push(item),
                Err(e) => {
                    skipped += 1;
                    tracing::debug!(error = %e, "MDE list item does not parse");
                }
            }
        }
        Ok(Page {
            items,
            next_link: raw.next_link.filter(|s| !s.is_empty()),
            skipped,
        })
    }
}

/// True for a well-formed MDE machine id: exactly 40 lowercase hexadecimal characters.
pub fn is_valid_machine_id(id: &str) -> bool {
    id.len() == 40
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses an MDE timestamp leniently: RFC 3339 with any number of fraction digits (MDE sends
/// seven) and `Z` or an offset; without an offset it is taken as UTC. Anything else is `None`.
pub fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    if let Ok(dt) = DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Some(dt.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|n| n.and_utc())
}

/// A string field that may be absent, null, or (wrongly) another JSON type: numbers and booleans
/// become their text, anything else `None`.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

fn lenient_datetime<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => parse_datetime(&s),
        _ => None,
    })
}

fn lenient_string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Timelike};
    use serde_json::json;

    fn action(v: Value) -> Result<MachineAction, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn parses_a_real_looking_action() {
        let body = r#"{
            "@odata.context": "https://api-eu.securitycenter.microsoft.com/api/$metadata#MachineActions/$entity",
            "id": "5382f7ea-7557-4ab7-9782-d50480024a4e",
            "type": "Unisolate",
            "scope": null,
            "requestor": "SecOps Operator",
            "requestorComment": "Released after re-image (INC-4711)",
            "status": "Pending",
            "machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07",
            "computerDnsName": "laptop-042",
            "creationDateTimeUtc": "2026-11-28T10:00:00.1234567Z",
            "lastUpdateDateTimeUtc": "2026-11-28T10:01:05.7654321Z",
            "cancellationRequestor": null,
            "cancellationComment": null,
            "cancellationDateTimeUtc": null,
            "errorHResult": 0,
            "externalId": null,
            "requestSource": "PublicApi",
            "relatedFileInfo": null,
            "commands": [],
            "troubleshootInfo": null,
            "title": null
        }"#;
        let a: MachineAction = serde_json::from_str(body).unwrap();
        assert_eq!(a.id, "5382f7ea-7557-4ab7-9782-d50480024a4e");
        assert_eq!(a.action_type, ActionType::Unisolate);
        assert_eq!(a.status, ActionStatus::Pending);
        assert_eq!(
            a.machine_id.as_deref(),
            Some("1e5bc9d7e413ddd7902c2932e418702b84d0cc07")
        );
        assert_eq!(a.requestor.as_deref(), Some("SecOps Operator"));
        assert_eq!(
            a.requestor_comment.as_deref(),
            Some("Released after re-image (INC-4711)")
        );
        assert_eq!(a.scope, None);
        let created = a.created_at.unwrap();
        assert_eq!(
            created.with_nanosecond(0).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap()
        );
        assert_eq!(created.nanosecond(), 123_456_700);
        assert_eq!(a.updated_at.unwrap().nanosecond(), 765_432_100);
    }

    #[test]
    fn accepts_last_update_time_utc_spelling() {
        let a = action(json!({"id": "a", "type": "Isolate", "status": "Succeeded",
            "lastUpdateTimeUtc": "2026-01-02T03:04:05.0000000Z"}))
        .unwrap();
        assert_eq!(
            a.updated_at,
            Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap())
        );
        // The documented spelling wins when both are present.
        let a = action(json!({"id": "a", "type": "Isolate",
            "lastUpdateTimeUtc": "2026-01-02T03:04:05Z",
            "lastUpdateDateTimeUtc": "2026-01-02T03:04:06Z"}))
        .unwrap();
        assert_eq!(
            a.updated_at,
            Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 6).unwrap())
        );
    }

    #[test]
    fn missing_optional_fields_are_none() {
        let a = action(json!({"id": "a", "type": "Isolate"})).unwrap();
        assert_eq!(a.status, ActionStatus::Unknown(String::new()));
        assert!(!a.status.is_final());
        assert_eq!(
            (
                a.machine_id,
                a.requestor,
                a.requestor_comment,
                a.scope,
                a.created_at,
                a.updated_at
            ),
            (None, None, None, None, None, None)
        );
    }

    #[test]
    fn id_and_type_are_required_and_wrong_types_error_without_panicking() {
        assert!(action(json!({"type": "Isolate"})).is_err());
        assert!(action(json!({"id": "a"})).is_err());
        assert!(action(json!({"id": 5, "type": "Isolate"})).is_err());
        assert!(action(json!({"id": "a", "type": ["Isolate"]})).is_err());
        assert!(action(json!([1, 2, 3])).is_err());
        assert!(action(json!(null)).is_err());
        assert!(serde_json::from_str::<MachineAction>("not json").is_err());
        assert!(serde_json::from_str::<MachineAction>("").is_err());
        assert!(serde_json::from_str::<MachineAction>("{\"id\": \"a\", \"ty").is_err());
    }

    #[test]
    fn wrongly_typed_optional_fields_become_none() {
        let a = action(json!({"id": "a", "type": "Isolate", "status": 3,
            "machineId": {"x": 1}, "requestor": 42, "scope": true,
            "creationDateTimeUtc": 12345, "lastUpdateDateTimeUtc": "yesterday"}))
        .unwrap();
        assert_eq!(a.status, ActionStatus::Unknown("3".into()));
        assert_eq!(a.machine_id, None);
        assert_eq!(a.requestor.as_deref(), Some("42"));
        assert_eq!(a.scope.as_deref(), Some("true"));
        assert_eq!((a.created_at, a.updated_at), (None, None));
    }

    #[test]
    fn dates_parse_leniently() {
        let base = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap();
        for s in [
            "2026-11-28T10:00:00Z",
            "2026-11-28T10:00:00.0000000Z",
            "2026-11-28T10:00:00.0000000",
            "2026-11-28T10:00:00",
            "2026-11-28T11:00:00+01:00",
            "2026-11-28T11:00:00.0000000+01:00",
            "2026-11-28T11:00:00+0100",
            "2026-11-28 10:00:00",
            " 2026-11-28T10:00:00Z ",
        ] {
            assert_eq!(parse_datetime(s), Some(base), "{s}");
        }
        assert_eq!(
            parse_datetime("2026-11-28T10:00:00.1234567Z").map(|d| d.nanosecond()),
            Some(123_456_700)
        );
        for s in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-28",
            "10:00",
        ] {
            assert_eq!(parse_datetime(s), None, "{s}");
        }
    }

    #[test]
    fn statuses_and_types_round_trip() {
        for s in [
            "Pending",
            "InProgress",
            "Succeeded",
            "Failed",
            "TimeOut",
            "Cancelled",
        ] {
            let st = ActionStatus::from(s);
            assert!(!matches!(st, ActionStatus::Unknown(_)));
            assert_eq!(st.as_str(), s);
            assert_eq!(serde_json::to_value(&st).unwrap(), Value::String(s.into()));
        }
        let finals: Vec<bool> = [
            "Pending",
            "InProgress",
            "Succeeded",
            "Failed",
            "TimeOut",
            "Cancelled",
        ]
        .iter()
        .map(|s| ActionStatus::from(*s).is_final())
        .collect();
        assert_eq!(finals, [false, false, true, true, true, true]);
        assert_eq!(ActionStatus::from("Timeout"), ActionStatus::TimeOut);
        assert_eq!(
            ActionStatus::from("Weird"),
            ActionStatus::Unknown("Weird".into())
        );
        assert_eq!(ActionType::from("Isolate"), ActionType::Isolate);
        assert_eq!(ActionType::from("Unisolate"), ActionType::Unisolate);
        assert_eq!(
            ActionType::from("RunAntiVirusScan"),
            ActionType::Other("RunAntiVirusScan".into())
        );
        assert_eq!(
            ActionType::from("RunAntiVirusScan").as_str(),
            "RunAntiVirusScan"
        );
    }

    #[test]
    fn action_serializes_with_mde_names_and_parses_back() {
        let a = action(json!({"id": "a", "type": "Isolate", "status": "InProgress",
            "machineId": "m", "scope": "Full",
            "creationDateTimeUtc": "2026-01-01T00:00:00Z"}))
        .unwrap();
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["type"], "Isolate");
        assert_eq!(v["machineId"], "m");
        assert_eq!(v["creationDateTimeUtc"], "2026-01-01T00:00:00Z");
        assert_eq!(action(v).unwrap(), a);
    }

    #[test]
    fn isolation_type_serializes_as_mde_spelling() {
        assert_eq!(
            serde_json::to_value(IsolationType::UnManagedDevice).unwrap(),
            "UnManagedDevice"
        );
        assert_eq!(IsolationType::default(), IsolationType::Full);
        let t: IsolationType = serde_json::from_value(json!("Selective")).unwrap();
        assert_eq!(t, IsolationType::Selective);
        let schema = serde_json::to_value(schemars::schema_for!(IsolationType)).unwrap();
        let text = schema.to_string();
        assert!(text.contains("UnManagedDevice") && text.contains("Selective isolation"));
    }

    #[test]
    fn machine_parses_leniently() {
        let m: Machine = serde_json::from_value(json!({
            "id": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07",
            "computerDnsName": "laptop-042.contoso.com",
            "osPlatform": "Windows11",
            "healthStatus": "Active",
            "rbacGroupId": 17,
            "machineTags": ["vip", 3, null, "finance"],
            "lastSeen": "2026-11-28T09:59:59.1234567Z"
        }))
        .unwrap();
        assert_eq!(m.machine_tags, ["vip", "finance"]);
        assert_eq!(m.os_platform.as_deref(), Some("Windows11"));
        let m: Machine = serde_json::from_value(json!({"id": "x", "machineTags": null})).unwrap();
        assert!(m.machine_tags.is_empty() && m.health_status.is_none());
        assert!(serde_json::from_value::<Machine>(json!({"computerDnsName": "x"})).is_err());
    }

    #[test]
    fn pages_skip_bad_items_and_keep_next_link() {
        let body = br#"{"@odata.context":"x","value":[{"id":"a","type":"Isolate"},{"type":"Isolate"},{"id":"b","type":"Unisolate"}],"@odata.nextLink":"https://h/api/machineactions?$skip=3"}"#;
        let page: Page<MachineAction> = Page::parse(body).unwrap();
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.skipped, 1);
        assert_eq!(
            page.next_link.as_deref(),
            Some("https://h/api/machineactions?$skip=3")
        );
        let page: Page<MachineAction> = Page::parse(br#"{"value":[]}"#).unwrap();
        assert!(page.items.is_empty() && page.next_link.is_none());
        assert!(Page::<MachineAction>::parse(br#"{"error":{}}"#).is_err());
        assert!(Page::<MachineAction>::parse(b"<html>").is_err());
        // An array is no page, even one shaped like the envelope's fields in order.
        assert!(Page::<MachineAction>::parse(br#"[[{"id":"a","type":"Isolate"}], null]"#).is_err());
        // Items with escapes and an array item among objects: the good ones still parse.
        let page: Page<MachineAction> = Page::parse(
            br#" {"value":[{"id":"a\"q","type":"Isolate","requestorComment":"caf\u00e9"},["x"]]}"#,
        )
        .unwrap();
        assert_eq!((page.items.len(), page.skipped), (1, 1));
        assert_eq!(page.items[0].id, "a\"q");
    }

    #[test]
    fn machine_ids_are_validated() {
        assert!(is_valid_machine_id(
            "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"
        ));
        assert!(!is_valid_machine_id(
            "1E5BC9D7E413DDD7902C2932E418702B84D0CC07"
        ));
        assert!(!is_valid_machine_id(
            "1e5bc9d7e413ddd7902c2932e418702b84d0cc0"
        ));
        assert!(!is_valid_machine_id(
            "1e5bc9d7e413ddd7902c2932e418702b84d0cc0g"
        ));
        assert!(!is_valid_machine_id(
            "../../machineactions/xxxxxxxxxxxxxxxxxxxxxxx"
        ));
        assert!(!is_valid_machine_id(""));
    }
}
