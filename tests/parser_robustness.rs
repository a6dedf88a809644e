//! Property tests: the operator's MDE response parsers and error classification never panic on
//! whatever comes over the wire, and valid input keeps its fields.
//!
//! - `MachineAction` and `Machine` (`serde_json::from_str`) against arbitrary JSON, arbitrary
//!   bytes, mutated valid bodies, missing/extra/wrongly typed fields, multi-megabyte bodies and
//!   deep nesting; generated valid actions and machines round-trip every field the operator uses.
//! - `parse_datetime` against generated instants in every spelling MDE and its docs use (7
//!   fraction digits, no `Z`, offsets, a space instead of `T`) and against garbage.
//! - The list-page parser is crate-private, so it is driven through the public `MdeClient`
//!   against a local fake server that answers generated pages (valid and broken items, odd
//!   `@odata.nextLink`s). Error classification is also private; the same fake server answers
//!   generated statuses, bodies and `Retry-After` headers, and the test checks the class the
//!   client reports and that the condition message stays short, single-line and free of the
//!   per-request `target` id.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Response};
use chrono::{DateTime, FixedOffset, TimeZone, Timelike, Utc};
use mde_isolation_operator::audit::{AuditTag, carries_marker, comment_with_marker};
use mde_isolation_operator::mde::client::{MdeClient, MdeClientConfig};
use mde_isolation_operator::mde::cloud::Endpoints;
use mde_isolation_operator::mde::error::ErrorClass;
use mde_isolation_operator::mde::model::{
    ActionStatus, ActionType, IsolationType, Machine, MachineAction, parse_datetime,
};
use mde_isolation_operator::mde::odata::ListQuery;
use mde_isolation_operator::mde::token::ClientSecret;
use mde_isolation_operator::quota::{QuotaConfig, QuotaGate};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Any JSON value, a few levels deep, with keys that sometimes hit the fields the parsers read.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        odd_date_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Field names: mostly the ones MDE sends (so that wrong types reach the lenient parsers),
/// sometimes in the wrong case, sometimes anything.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "id", "type", "status", "machineId", "requestor", "requestorComment", "scope",
            "creationDateTimeUtc", "lastUpdateDateTimeUtc", "lastUpdateTimeUtc", "computerDnsName",
            "osPlatform", "healthStatus", "machineTags", "value", "@odata.nextLink",
            "@odata.context", "errorHResult", "commands", "Id", "TYPE", "Status",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// An object with any subset of the action/machine fields, each of any JSON type.
fn arb_entity_object() -> impl Strategy<Value = Value> {
    prop::collection::vec((field_name(), arb_json()), 0..14)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
}

/// Strings that look like dates, some valid, some not.
fn odd_date_string() -> impl Strategy<Value = String> {
    prop_oneof![
        (arb_instant(), date_spelling()).prop_map(|(t, s)| s.render(t)),
        "[0-9]{1,5}-[0-9]{1,3}-[0-9]{1,3}[T ][0-9]{1,3}:[0-9]{1,3}:[0-9]{1,3}(\\.[0-9]{0,12})?(Z|z|[+-][0-9]{2}:?[0-9]{2})?",
        any::<String>(),
    ]
}

/// An instant between 1970 and 2200, on a 100 ns grid (MDE's precision).
fn arb_instant() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..7_258_118_400, 0u32..10_000_000)
        .prop_map(|(secs, ticks)| Utc.timestamp_opt(secs, ticks * 100).unwrap())
}

/// The ways a timestamp is spelled in MDE answers and its documentation.
#[derive(Clone, Debug)]
enum DateSpelling {
    /// `2026-11-28T10:00:00.1234567Z` (what MDE sends).
    SevenDigitsZ,
    /// `2026-11-28T10:00:00Z` (no fraction; exact only for whole seconds).
    NoFractionZ,
    /// `2026-11-28T10:00:00.1234567` (no zone: taken as UTC).
    SevenDigitsNoZone,
    /// `2026-11-28T11:30:00.1234567+01:30`.
    Offset(i32),
    /// `2026-11-28T11:30:00.1234567+0130`.
    OffsetNoColon(i32),
    /// `2026-11-28 10:00:00.1234567` (space separator, no zone).
    Space,
    /// Three fraction digits (JavaScript's spelling).
    MillisZ,
}

impl DateSpelling {
    fn render(&self, t: DateTime<Utc>) -> String {
        let seven = |t: &DateTime<FixedOffset>| {
            format!(
                "{}.{:07}",
                t.format("%Y-%m-%dT%H:%M:%S"),
                t.nanosecond() / 100
            )
        };
        let zoned = |mins: i32| t.with_timezone(&FixedOffset::east_opt(mins * 60).unwrap());
        let sign = |mins: i32| if mins < 0 { '-' } else { '+' };
        match self {
            DateSpelling::SevenDigitsZ => format!("{}Z", seven(&zoned(0))),
            DateSpelling::NoFractionZ => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            DateSpelling::SevenDigitsNoZone => seven(&zoned(0)),
            DateSpelling::Offset(m) => format!(
                "{}{}{:02}:{:02}",
                seven(&zoned(*m)),
                sign(*m),
                m.abs() / 60,
                m.abs() % 60
            ),
            DateSpelling::OffsetNoColon(m) => format!(
                "{}{}{:02}{:02}",
                seven(&zoned(*m)),
                sign(*m),
                m.abs() / 60,
                m.abs() % 60
            ),
            DateSpelling::Space => seven(&zoned(0)).replacen('T', " ", 1),
            DateSpelling::MillisZ => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        }
    }

    /// The instant a correct parser must return for `render(t)`.
    fn expected(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            DateSpelling::NoFractionZ => t.with_nanosecond(0).unwrap(),
            DateSpelling::MillisZ => t
                .with_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000)
                .unwrap(),
            _ => t,
        }
    }
}

fn date_spelling() -> impl Strategy<Value = DateSpelling> {
    // Real offsets run from -12:00 to +14:00, in quarter hours.
    let offset = (-48i32..=56).prop_map(|q| q * 15);
    prop_oneof![
        Just(DateSpelling::SevenDigitsZ),
        Just(DateSpelling::NoFractionZ),
        Just(DateSpelling::SevenDigitsNoZone),
        offset.clone().prop_map(DateSpelling::Offset),
        offset.prop_map(DateSpelling::OffsetNoColon),
        Just(DateSpelling::Space),
        Just(DateSpelling::MillisZ),
    ]
}

/// A valid machine action as MDE would send it, with what the parser must make of it.
#[derive(Clone, Debug)]
struct GenAction {
    body: Value,
    id: String,
    action_type: ActionType,
    status: ActionStatus,
    machine_id: Option<String>,
    requestor: Option<String>,
    comment: Option<String>,
    scope: Option<String>,
    created: Option<DateTime<Utc>>,
    updated: Option<DateTime<Utc>>,
}

fn known_type() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "Isolate", "Unisolate", "RunAntiVirusScan", "Offboard", "LiveResponse",
            "CollectInvestigationPackage", "StopAndQuarantineFile", "RestrictCodeExecution",
            "UnrestrictCodeExecution",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

fn known_status() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "Pending", "InProgress", "Succeeded", "Failed", "TimeOut", "Cancelled",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// An optional string field: absent, null, or a value.
fn opt_string() -> impl Strategy<Value = Option<Option<String>>> {
    prop_oneof![
        Just(None),
        Just(Some(None)),
        any::<String>().prop_map(|s| Some(Some(s))),
    ]
}

fn arb_action() -> impl Strategy<Value = GenAction> {
    (
        any::<String>(),
        known_type(),
        prop::option::of(known_status()),
        (opt_string(), opt_string(), opt_string(), opt_string()),
        prop::option::of((arb_instant(), date_spelling())),
        prop::option::of((arb_instant(), date_spelling(), any::<bool>())),
        prop::collection::vec(("x[A-Za-z]{0,12}", arb_json()), 0..5),
    )
        .prop_map(
            |(id, ty, status, (machine, requestor, comment, scope), created, updated, extra)| {
                let mut body = Map::new();
                for (k, v) in extra {
                    body.insert(k, v);
                }
                body.insert("id".into(), json!(id));
                body.insert("type".into(), json!(ty));
                if let Some(s) = &status {
                    body.insert("status".into(), json!(s));
                }
                let mut put = |name: &str, v: &Option<Option<String>>| {
                    if let Some(v) = v {
                        body.insert(name.into(), json!(v));
                    }
                };
                put("machineId", &machine);
                put("requestor", &requestor);
                put("requestorComment", &comment);
                put("scope", &scope);
                let created_at = created.as_ref().map(|(t, s)| {
                    body.insert("creationDateTimeUtc".into(), json!(s.render(*t)));
                    s.expected(*t)
                });
                let updated_at = updated.as_ref().map(|(t, s, doc_spelling)| {
                    // The documentation's `lastUpdateTimeUtc` must be read as well.
                    let name = if *doc_spelling {
                        "lastUpdateTimeUtc"
                    } else {
                        "lastUpdateDateTimeUtc"
                    };
                    body.insert(name.into(), json!(s.render(*t)));
                    s.expected(*t)
                });
                GenAction {
                    body: Value::Object(body),
                    action_type: ActionType::from(ty.as_str()),
                    status: status
                        .map(|s| ActionStatus::from(s.as_str()))
                        .unwrap_or_else(|| ActionStatus::Unknown(String::new())),
                    id,
                    machine_id: machine.flatten(),
                    requestor: requestor.flatten(),
                    comment: comment.flatten(),
                    scope: scope.flatten(),
                    created: created_at,
                    updated: updated_at,
                }
            },
        )
}

/// Ways to damage a valid body.
#[derive(Clone, Debug)]
enum Damage {
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, String),
    Replace(prop::sample::Index, u8),
    DropQuote(prop::sample::Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                Just(",".to_string()),
                Just("}".to_string()),
                Just("]".to_string()),
                Just("\"".to_string()),
                Just("\\".to_string()),
                Just("\\u".to_string()),
                Just("\u{0}".to_string()),
                Just("NaN".to_string()),
                any::<String>(),
            ]
        )
            .prop_map(|(i, s)| Damage::Insert(i, s)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Replace(i, b)),
        any::<prop::sample::Index>().prop_map(Damage::DropQuote),
    ]
}

fn apply_damage(text: &str, d: &Damage) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    match d {
        Damage::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
        Damage::Insert(i, s) => {
            let at = i.index(bytes.len() + 1);
            bytes.splice(at..at, s.bytes());
        }
        Damage::Replace(i, b) => {
            if !bytes.is_empty() {
                let at = i.index(bytes.len());
                bytes[at] = *b;
            }
        }
        Damage::DropQuote(i) => {
            let quotes: Vec<usize> = (0..bytes.len()).filter(|&k| bytes[k] == b'"').collect();
            if !quotes.is_empty() {
                bytes.remove(quotes[i.index(quotes.len())]);
            }
        }
    }
    bytes
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Parses with every public parser; only panics matter here.
fn parse_all(bytes: &[u8]) {
    let _ = serde_json::from_slice::<MachineAction>(bytes);
    let _ = serde_json::from_slice::<Machine>(bytes);
    let _ = serde_json::from_slice::<Vec<MachineAction>>(bytes);
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = serde_json::from_str::<MachineAction>(text);
        let _ = serde_json::from_str::<Machine>(text);
        let _ = parse_datetime(text);
    }
}

// ---------------------------------------------------------------------------------------------
// The model parsers
// ---------------------------------------------------------------------------------------------

#[test]
fn entity_parsers_never_panic_on_arbitrary_json() {
    runner(1024)
        .run(&prop_oneof![arb_json(), arb_entity_object()], |v| {
            let text = v.to_string();
            parse_all(text.as_bytes());
            let _ = serde_json::from_value::<MachineAction>(v.clone());
            let _ = serde_json::from_value::<Machine>(v);
            Ok(())
        })
        .unwrap();
}

#[test]
fn entity_parsers_never_panic_on_arbitrary_or_damaged_bytes() {
    runner(512)
        .run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
            parse_all(&bytes);
            Ok(())
        })
        .unwrap();
    runner(1024)
        .run(
            &(arb_action(), prop::collection::vec(damage(), 1..4)),
            |(a, damages)| {
                let mut text = a.body.to_string();
                for d in &damages {
                    text = String::from_utf8_lossy(&apply_damage(&text, d)).into_owned();
                    parse_all(text.as_bytes());
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn valid_actions_keep_every_field_and_round_trip() {
    runner(1024)
        .run(&arb_action(), |a| {
            let text = a.body.to_string();
            let parsed: MachineAction = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("valid action rejected: {e}: {text}")))?;
            prop_assert_eq!(&parsed.id, &a.id);
            prop_assert_eq!(&parsed.action_type, &a.action_type);
            prop_assert_eq!(&parsed.status, &a.status);
            prop_assert_eq!(&parsed.machine_id, &a.machine_id);
            prop_assert_eq!(&parsed.requestor, &a.requestor);
            prop_assert_eq!(&parsed.requestor_comment, &a.comment);
            prop_assert_eq!(&parsed.scope, &a.scope);
            prop_assert_eq!(parsed.created_at, a.created, "creation time of {}", text);
            prop_assert_eq!(parsed.updated_at, a.updated, "update time of {}", text);
            // What the operator writes back out (status, logs) parses to the same action.
            let again: MachineAction =
                serde_json::from_value(serde_json::to_value(&parsed).unwrap())
                    .map_err(|e| TestCaseError::fail(format!("re-parse: {e}")))?;
            prop_assert_eq!(again, parsed);
            Ok(())
        })
        .unwrap();
}

#[test]
fn actions_without_id_or_type_are_errors_and_wrong_optional_types_are_tolerated() {
    runner(512)
        .run(
            &(arb_action(), prop::sample::select(vec!["id", "type"])),
            |(a, drop)| {
                let mut body = a.body.clone();
                body.as_object_mut().unwrap().remove(drop);
                prop_assert!(serde_json::from_value::<MachineAction>(body).is_err());
                Ok(())
            },
        )
        .unwrap();
    let optional = [
        "status",
        "machineId",
        "requestor",
        "requestorComment",
        "scope",
        "creationDateTimeUtc",
        "lastUpdateDateTimeUtc",
        "lastUpdateTimeUtc",
    ];
    runner(1024)
        .run(
            &(
                arb_action(),
                prop::sample::select(optional.to_vec()),
                arb_json(),
            ),
            |(a, field, value)| {
                let mut body = a.body.clone();
                body[field] = value.clone();
                let parsed =
                    serde_json::from_value::<MachineAction>(body.clone()).map_err(|e| {
                        TestCaseError::fail(format!("{field} = {value} rejected the action: {e}"))
                    })?;
                prop_assert_eq!(&parsed.id, &a.id);
                prop_assert_eq!(&parsed.action_type, &a.action_type);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn machines_keep_their_fields_and_tolerate_wrong_types() {
    let machine = (
        "[0-9a-f]{40}",
        opt_string(),
        opt_string(),
        opt_string(),
        prop::collection::vec(
            prop_oneof![3 => any::<String>().prop_map(Value::String), 1 => arb_json()],
            0..6,
        ),
        prop::collection::vec(("x[A-Za-z]{0,12}", arb_json()), 0..5),
    );
    runner(1024)
        .run(&machine, |(id, name, os, health, tags, extra)| {
            let mut body: Map<String, Value> = extra.into_iter().collect();
            body.insert("id".into(), json!(id));
            for (k, v) in [
                ("computerDnsName", &name),
                ("osPlatform", &os),
                ("healthStatus", &health),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), json!(v));
                }
            }
            body.insert("machineTags".into(), Value::Array(tags.clone()));
            let text = Value::Object(body).to_string();
            let m: Machine = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("valid machine rejected: {e}")))?;
            prop_assert_eq!(&m.id, &id);
            prop_assert_eq!(m.computer_dns_name, name.flatten());
            prop_assert_eq!(m.os_platform, os.flatten());
            prop_assert_eq!(m.health_status, health.flatten());
            let string_tags: Vec<String> = tags
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            prop_assert_eq!(m.machine_tags, string_tags);
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------------------

#[test]
fn dates_in_every_spelling_parse_to_the_same_instant() {
    runner(2048)
        .run(&(arb_instant(), date_spelling()), |(t, spelling)| {
            let text = spelling.render(t);
            prop_assert_eq!(
                parse_datetime(&text),
                Some(spelling.expected(t)),
                "{}",
                text
            );
            // Surrounding whitespace, as a hand-edited document might have.
            prop_assert_eq!(
                parse_datetime(&format!("  {text}\t")),
                Some(spelling.expected(t))
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn odd_and_garbage_dates_never_panic() {
    runner(2048)
        .run(&odd_date_string(), |s| {
            let _ = parse_datetime(&s);
            let action = json!({"id": "a", "type": "Isolate", "creationDateTimeUtc": s,
                "lastUpdateTimeUtc": s});
            prop_assert!(serde_json::from_value::<MachineAction>(action).is_ok());
            Ok(())
        })
        .unwrap();
    // Hand-picked edge cases: each must answer (Some or None) without panicking, and the
    // impossible ones must be None rather than a made-up instant.
    for (s, valid) in [
        ("2026-11-28T10:00:00.1234567Z", true),
        ("2026-11-28T10:00:00.123456789Z", true),
        ("2026-11-28T10:00:00.1234567891234Z", true),
        ("2026-11-28t10:00:00z", true),
        ("2026-11-28T10:00:00.0000000", true),
        ("2026-11-28T10:00:00+14:00", true),
        ("2026-11-28T10:00:00-12:00", true),
        ("9999-12-31T23:59:59.9999999Z", true),
        ("0000-01-01T00:00:00Z", true),
        ("2026-02-29T00:00:00Z", false),
        ("2026-11-28T24:00:00Z", false),
        ("2026-11-28T10:60:00Z", false),
        ("2026-11-28T10:00:00+24:00", false),
        ("2026-11-28T10:00:00ZZ", false),
        ("2026-11-28", false),
        ("", false),
        ("\u{0}", false),
        ("null", false),
        ("/Date(1764324000000)/", false),
        ("1764324000", false),
        ("+275760-09-13T00:00:00Z", false),
        ("-000001-01-01T00:00:00Z", false),
    ] {
        let parsed = parse_datetime(s);
        if !valid {
            assert_eq!(parsed, None, "{s:?} is not a valid timestamp");
        }
    }
    // A leap second is representable in chrono; whatever comes back must be within that minute.
    if let Some(t) = parse_datetime("2016-12-31T23:59:60Z") {
        let start = Utc.with_ymd_and_hms(2016, 12, 31, 23, 59, 0).unwrap();
        assert!(
            t >= start && t < start + chrono::Duration::seconds(61),
            "{t}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Huge and deep bodies
// ---------------------------------------------------------------------------------------------

#[test]
fn huge_and_deeply_nested_bodies_are_handled() {
    // An 8 MB comment is kept whole.
    let comment = "x".repeat(8 << 20);
    let body = json!({"id": "a", "type": "Unisolate", "status": "Pending",
        "requestorComment": comment});
    let a: MachineAction = serde_json::from_str(&body.to_string()).unwrap();
    assert_eq!(a.requestor_comment.map(|c| c.len()), Some(8 << 20));

    // 4 MB of unknown fields around a small action.
    let mut big = Map::new();
    for i in 0..40_000 {
        big.insert(format!("extra{i}"), json!("y".repeat(100)));
    }
    big.insert("id".into(), json!("a"));
    big.insert("type".into(), json!("Isolate"));
    let a: MachineAction = serde_json::from_value(Value::Object(big)).unwrap();
    assert_eq!(a.action_type, ActionType::Isolate);

    // Deep nesting in an ignored field, in a lenient field, and as the whole body: an error
    // (serde_json's recursion limit), never a stack overflow.
    let handle = std::thread::Builder::new()
        // The stack of a tokio worker thread, where the operator parses responses.
        .stack_size(2 << 20)
        .spawn(|| {
            let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
            let obj_deep = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
            for nested in [&deep, &obj_deep] {
                for text in [
                    format!(r#"{{"id":"a","type":"Isolate","extra":{nested}}}"#),
                    format!(r#"{{"id":"a","type":"Isolate","scope":{nested}}}"#),
                    format!(r#"{{"id":"a","type":"Isolate","creationDateTimeUtc":{nested}}}"#),
                    format!(r#"{{"id":"m","machineTags":{nested}}}"#),
                    nested.clone(),
                ] {
                    let _ = serde_json::from_str::<MachineAction>(&text);
                    let _ = serde_json::from_str::<Machine>(&text);
                }
            }
            // A moderately nested extra field (below the limit) is simply ignored.
            let ok = format!(
                r#"{{"id":"a","type":"Isolate","extra":{}{}}}"#,
                "[".repeat(100),
                "]".repeat(100)
            );
            serde_json::from_str::<MachineAction>(&ok).is_ok()
        })
        .unwrap();
    assert!(handle.join().expect("no stack overflow or panic"));

    // A list of 20,000 actions (two MDE pages' worth) parses item by item.
    let items: Vec<Value> = (0..20_000)
        .map(|i| {
            json!({"id": format!("id-{i}"), "type": "Isolate", "status": "Pending",
            "creationDateTimeUtc": "2026-11-28T10:00:00.0000000Z"})
        })
        .collect();
    let list: Vec<MachineAction> = serde_json::from_str(&Value::Array(items).to_string()).unwrap();
    assert_eq!(list.len(), 20_000);
}

#[test]
fn audit_markers_are_found_only_at_the_end_of_the_comment() {
    runner(1024)
        .run(
            &(
                "[a-z0-9-]{1,20}",
                "[a-z0-9-]{1,20}",
                "[0-9a-f-]{0,36}",
                1i64..1000,
                1u32..50,
                any::<String>(),
                any::<String>(),
            ),
            |(ns, name, uid, generation, attempt, comment, noise)| {
                let tag = AuditTag {
                    namespace: &ns,
                    name: &name,
                    uid: &uid,
                    generation,
                    attempt,
                };
                let marker = tag.marker();
                let sent = comment_with_marker(&comment, &marker);
                prop_assert!(carries_marker(Some(&sent), &marker));
                let padded = format!("{sent}  \n");
                prop_assert!(carries_marker(Some(&padded), &marker));
                // Another attempt's marker is not this one.
                let other = AuditTag {
                    attempt: attempt + 1,
                    ..tag.clone()
                }
                .marker();
                prop_assert!(!carries_marker(Some(&sent), &other));
                let _ = carries_marker(Some(&noise), &marker);
                prop_assert!(!carries_marker(None, &marker));
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The client against a fake server: list pages and error classification
// ---------------------------------------------------------------------------------------------

/// One canned answer of the fake server.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }
}

#[derive(Default)]
struct FakeState {
    /// Answers consumed in order by `/api/...` requests.
    queue: VecDeque<Reply>,
    /// Answer once the queue is empty.
    sticky: Option<Reply>,
    /// `/api/...` requests received (path and query).
    api_requests: Vec<String>,
    token_requests: usize,
}

struct Fake {
    state: Arc<Mutex<FakeState>>,
    base: String,
}

async fn fake_handler(State(st): State<Arc<Mutex<FakeState>>>, req: Request) -> Response<Body> {
    let path = req.uri().path().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut st = st.lock().unwrap();
    if path.ends_with("/oauth2/v2.0/token") {
        st.token_requests += 1;
        let n = st.token_requests;
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"token_type": "Bearer", "expires_in": 3599,
                    "access_token": format!("fake-token-{n}")})
                .to_string(),
            ))
            .unwrap();
    }
    st.api_requests.push(target);
    let reply = st
        .queue
        .pop_front()
        .or_else(|| st.sticky.clone())
        .unwrap_or_else(|| Reply::json(500, &json!({"error": {"code": "NoReplyQueued"}})));
    let mut resp = Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) {
            resp = resp.header(k, v);
        }
    }
    resp.body(Body::from(reply.body)).unwrap()
}

impl Fake {
    async fn start() -> Fake {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .fallback(fake_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake {
            state,
            base: format!("http://{addr}"),
        }
    }

    /// A client with a budget so large that the quota gate never refuses.
    fn client(&self, time_scale: f64) -> MdeClient {
        let gate = Arc::new(QuotaGate::new(QuotaConfig {
            per_minute: 1_000_000,
            per_hour: 10_000_000,
            minute: Duration::from_secs(60),
            hour: Duration::from_secs(3600),
            guard: Duration::ZERO,
        }));
        let url = |s: &str| url::Url::parse(s).unwrap();
        MdeClient::new(
            MdeClientConfig {
                endpoints: Endpoints {
                    api_url: url(&format!("{}/", self.base)),
                    authority: url(&format!("{}/", self.base)),
                    scope: "https://api.securitycenter.microsoft.com/.default".into(),
                },
                tenant_id: "contoso.onmicrosoft.com".into(),
                client_id: "app".into(),
                secret: ClientSecret::from_value("fake-secret".into()),
                ca_file: None,
                request_timeout: Duration::from_secs(20),
                time_scale,
                observer: None,
            },
            gate,
        )
        .unwrap()
    }

    fn set(&self, queue: Vec<Reply>, sticky: Option<Reply>) {
        let mut st = self.state.lock().unwrap();
        st.queue = queue.into();
        st.sticky = sticky;
        st.api_requests.clear();
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().api_requests.clone()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A generated list page: items (valid or not) and how it links to the next page.
#[derive(Clone, Debug)]
enum ItemGen {
    Valid(GenAction),
    Broken(Value),
}

#[derive(Clone, Debug)]
enum LinkGen {
    /// An absolute link on the API host.
    Absolute,
    /// A link relative to the page.
    Relative,
    /// A link naming another host (must be followed on the configured host only).
    OtherHost,
    /// Null or an object (must read as "no next page"; numbers and booleans are read as text).
    NotAString(Value),
    /// An empty string (no next page).
    Empty,
}

fn arb_item() -> impl Strategy<Value = ItemGen> {
    prop_oneof![
        4 => arb_action().prop_map(ItemGen::Valid),
        1 => prop_oneof![
            arb_json(),
            arb_entity_object(),
            Just(json!({"type": "Isolate"})),
            Just(json!({"id": "x"})),
            Just(json!({"id": 5, "type": "Isolate"})),
        ]
        .prop_filter("must not be a valid action", |v| {
            serde_json::from_value::<MachineAction>(v.clone()).is_err()
        })
        .prop_map(ItemGen::Broken),
    ]
}

fn arb_link() -> impl Strategy<Value = LinkGen> {
    prop_oneof![
        Just(LinkGen::Absolute),
        Just(LinkGen::Relative),
        Just(LinkGen::OtherHost),
        prop_oneof![Just(Value::Null), Just(json!({"href": "x"}))].prop_map(LinkGen::NotAString),
        Just(LinkGen::Empty),
    ]
}

#[test]
fn list_pages_with_broken_items_and_odd_links_never_panic_and_keep_every_valid_item() {
    let rt = runtime();
    let fake = rt.block_on(Fake::start());
    let client = rt.block_on(async { fake.client(1.0) });
    let pages = prop::collection::vec((prop::collection::vec(arb_item(), 0..6), arb_link()), 1..5);
    runner(256)
        .run(&pages, |pages| {
            // Build the chain: every page but the last links to the next one with its link kind;
            // a link kind that means "no next page" ends the chain early.
            let mut replies = Vec::new();
            let mut expected = Vec::new();
            let mut ended = false;
            for (i, (items, link)) in pages.iter().enumerate() {
                if ended {
                    break;
                }
                let mut page = Map::new();
                page.insert(
                    "@odata.context".into(),
                    json!("https://elsewhere/$metadata"),
                );
                page.insert(
                    "value".into(),
                    Value::Array(
                        items
                            .iter()
                            .map(|it| match it {
                                ItemGen::Valid(a) => a.body.clone(),
                                ItemGen::Broken(v) => v.clone(),
                            })
                            .collect(),
                    ),
                );
                for it in items {
                    if let ItemGen::Valid(a) = it {
                        expected.push(a.id.clone());
                    }
                }
                let last = i + 1 == pages.len();
                let skip = format!("$skip={}", i + 1);
                let next = match link {
                    _ if last => None,
                    LinkGen::Absolute => {
                        Some(json!(format!("{}/api/machineactions?{skip}", fake.base)))
                    }
                    LinkGen::Relative => Some(json!(format!("machineactions?{skip}"))),
                    LinkGen::OtherHost => Some(json!(format!(
                        "https://backend.invalid:8443/api/machineactions?{skip}"
                    ))),
                    LinkGen::NotAString(v) => {
                        ended = true;
                        Some(v.clone())
                    }
                    LinkGen::Empty => {
                        ended = true;
                        Some(json!(""))
                    }
                };
                if let Some(n) = next {
                    page.insert("@odata.nextLink".into(), n);
                }
                replies.push(Reply::json(200, &Value::Object(page)));
            }
            let n_pages = replies.len();
            fake.set(replies, None);
            let got = rt.block_on(client.list_actions(&ListQuery::default(), "k"));
            let got = got.map_err(|e| TestCaseError::fail(format!("list failed: {e}")))?;
            let ids: Vec<String> = got.into_iter().map(|a| a.id).collect();
            prop_assert_eq!(ids, expected);
            let requests = fake.requests();
            prop_assert_eq!(requests.len(), n_pages, "{:?}", requests);
            for (i, r) in requests.iter().enumerate().skip(1) {
                prop_assert!(r.starts_with("/api/machineactions"), "page {} at {}", i, r);
                prop_assert!(r.ends_with(&format!("$skip={i}")), "page {} at {}", i, r);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn broken_list_envelopes_and_runaway_paging_are_transient_errors() {
    let rt = runtime();
    let fake = rt.block_on(Fake::start());
    let client = rt.block_on(async { fake.client(1.0) });
    let envelope = prop_oneof![
        arb_json().prop_filter("not a page", |v| !v
            .get("value")
            .is_some_and(Value::is_array)),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(Value::from),
        any::<String>().prop_map(|s| json!({"value": s})),
    ];
    runner(256)
        .run(&envelope, |body| {
            // Bytes are sent raw when the generator produced an array of numbers.
            let raw = match &body {
                Value::Array(a) if a.iter().all(Value::is_u64) && !a.is_empty() => {
                    a.iter().map(|n| n.as_u64().unwrap() as u8).collect()
                }
                other => other.to_string().into_bytes(),
            };
            let parsed = serde_json::from_slice::<Value>(&raw).ok();
            // A page, or a top-level array (accepted by serde as a struct written as a
            // sequence: see `json_arrays_are_not_pages_or_actions`).
            if parsed
                .as_ref()
                .is_some_and(|v| v.is_array() || v.get("value").is_some_and(Value::is_array))
            {
                return Ok(());
            }
            fake.set(
                vec![Reply {
                    status: 200,
                    headers: vec![],
                    body: raw,
                }],
                None,
            );
            match rt.block_on(client.list_actions(&ListQuery::default(), "k")) {
                Ok(v) => Err(TestCaseError::fail(format!(
                    "accepted a broken page: {v:?}"
                ))),
                Err(e) => {
                    prop_assert_eq!(e.class(), ErrorClass::Transient, "{}", e);
                    Ok(())
                }
            }
        })
        .unwrap();

    // A nextLink that points back at the same page, and an endless chain of fresh pages.
    rt.block_on(async {
        let same = Reply::json(
            200,
            &json!({"value": [], "@odata.nextLink": format!("{}/api/machineactions?$skip=1", fake.base)}),
        );
        fake.set(vec![], Some(same));
        let e = client
            .list_actions(&ListQuery::default(), "k")
            .await
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        assert!(fake.requests().len() <= 3, "{:?}", fake.requests());
    });
}

/// serde reads a struct from a JSON array too (its fields in declaration order), so a list
/// answer `[[...]]` passes as a page whose `value` is the inner array, and `["a", "Isolate"]`
/// passes as an Isolate action with id `a`. Neither is anything MDE sends; they should be errors.
#[test]
fn json_arrays_are_not_pages_or_actions() {
    assert!(
        serde_json::from_str::<MachineAction>(r#"["a", "Isolate", "Succeeded"]"#).is_err(),
        "a JSON array parsed as a MachineAction"
    );
    assert!(
        serde_json::from_str::<Machine>(r#"["1e5bc9d7e413ddd7902c2932e418702b84d0cc07"]"#).is_err(),
        "a JSON array parsed as a Machine"
    );
    let rt = runtime();
    let fake = rt.block_on(Fake::start());
    let client = rt.block_on(async { fake.client(1.0) });
    fake.set(
        vec![Reply::json(
            200,
            &json!([[{"id": "a", "type": "Isolate", "status": "Pending"}]]),
        )],
        None,
    );
    let got = rt.block_on(client.list_actions(&ListQuery::default(), "k"));
    assert!(
        got.is_err(),
        "a JSON array accepted as a list page: {got:?}"
    );
}

/// What the documented MDE errors must be classified as (mde-api.md §6, design.md §2).
fn expected_class(
    status: u16,
    code: Option<&str>,
    message: Option<&str>,
    post: bool,
) -> &'static str {
    let in_progress =
        message.is_some_and(|m| m.to_lowercase().contains("action is already in progress"));
    match status {
        200..=299 if post => "ambiguous",
        200..=299 => "transient",
        400 => match code {
            Some("OsPlatformNotSupported" | "ClientVersionNotSupported") => "unsupported_platform",
            Some("ActiveRequestAlreadyExists") => "already_in_progress",
            _ if in_progress => "already_in_progress",
            _ => "invalid_request",
        },
        401 => "authentication_failed",
        403 => "forbidden",
        404 if post => "machine_not_found",
        404 => "action_not_found",
        429 => "rate_limited",
        408 | 500..=599 if post => "ambiguous",
        408 | 500..=599 => "transient",
        _ => "invalid_request",
    }
}

#[derive(Clone, Debug)]
struct ErrGen {
    status: u16,
    code: Option<String>,
    message: Option<String>,
    target: Option<String>,
    /// The body as sent.
    body: Vec<u8>,
}

fn arb_error() -> impl Strategy<Value = ErrGen> {
    let status = prop_oneof![
        Just(400u16),
        Just(401),
        Just(403),
        Just(404),
        Just(405),
        Just(408),
        Just(409),
        Just(413),
        Just(418),
        Just(429),
        Just(500),
        Just(502),
        Just(503),
        Just(504),
        Just(301),
        Just(302),
        Just(307),
        Just(200),
        Just(201),
        Just(204),
    ];
    let code = prop_oneof![
        Just(None),
        prop::sample::select(vec![
            "BadRequest",
            "ODataError",
            "InvalidInput",
            "InvalidRequestBody",
            "MissingRequiredParameter",
            "OsPlatformNotSupported",
            "ClientVersionNotSupported",
            "ActiveRequestAlreadyExists",
            "Unauthorized",
            "Forbidden",
            "DisabledFeature",
            "ResourceNotFound",
            "TooManyRequests",
            "InternalServerError",
        ])
        .prop_map(|s| Some(s.to_string())),
        any::<String>().prop_map(Some),
    ];
    let message = prop_oneof![
        Just(None),
        Just(Some("Action is already in progress".to_string())),
        any::<String>().prop_map(Some),
        // Long, multi-line, with control characters and a correlation id.
        ("[ -~\\x00-\\x1f]{0,80}", 1usize..200).prop_map(|(s, n)| Some(s.repeat(n))),
    ];
    let target = prop_oneof![
        Just(None),
        Just(Some("43f4cb08-8fac-4b65-9db1-745c2ae65f3a".to_string())),
    ];
    let shape = 0u8..6;
    (status, code, message, target, shape, any::<String>()).prop_map(
        |(status, code, message, target, shape, junk)| {
            let mut message = message;
            if let (Some(m), Some(t)) = (&mut message, &target) {
                // MDE-style messages sometimes repeat the correlation id.
                m.push_str(&format!(" (correlation {t})"));
            }
            let well_formed =
                json!({"error": {"code": code, "message": message, "target": target}});
            let (body, code, message, target) = match shape {
                0..=2 => (well_formed.to_string().into_bytes(), code, message, target),
                // Wrong types where strings are expected.
                3 => (
                    json!({"error": {"code": 42, "message": ["a"], "target": {"x": 1}}})
                        .to_string()
                        .into_bytes(),
                    None,
                    None,
                    None,
                ),
                // HTML from a proxy.
                4 => (
                    format!("<html><body><h1>{status}</h1>{junk}</body></html>").into_bytes(),
                    None,
                    None,
                    None,
                ),
                // Empty, or raw junk.
                _ => (junk.into_bytes(), None, None, None),
            };
            let code = code.filter(|c| !c.is_empty());
            let message = message.filter(|m| !m.is_empty());
            ErrGen {
                status,
                code,
                message,
                target,
                body,
            }
        },
    )
}

#[test]
fn error_responses_are_classified_and_their_messages_stay_safe() {
    let rt = runtime();
    let fake = rt.block_on(Fake::start());
    runner(768)
        .run(&(arb_error(), 0u8..3), |(e, call)| {
            let post = call > 0;
            // A fresh client (and quota gate) per case: a generated 429 pauses the API.
            let client = rt.block_on(async { fake.client(1.0) });
            // A 2xx with a valid action body is a success, not an error; only junk 2xx bodies
            // are interesting here.
            let success_action = (200..300).contains(&e.status)
                && serde_json::from_slice::<MachineAction>(&e.body).is_ok();
            if success_action {
                return Ok(());
            }
            let reply = Reply {
                status: e.status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: e.body.clone(),
            };
            fake.set(vec![], Some(reply));
            let machine = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";
            let result = rt.block_on(async {
                if call == 1 {
                    client.unisolate(machine, "c", "k").await
                } else if call == 2 {
                    client
                        .isolate(machine, "c", IsolationType::Selective, "k")
                        .await
                } else {
                    client
                        .get_action("5382f7ea-7557-4ab7-9782-d50480024a4e", "k")
                        .await
                }
            });
            let err = match result {
                Ok(a) => {
                    return Err(TestCaseError::fail(format!(
                        "{} accepted as {a:?}",
                        e.status
                    )));
                }
                Err(err) => err,
            };
            // A parseable 2xx body with a missing id is still "unreadable": same class.
            let want = expected_class(e.status, e.code.as_deref(), e.message.as_deref(), post);
            prop_assert_eq!(
                err.class().label(),
                want,
                "status {} body {:?}: {}",
                e.status,
                String::from_utf8_lossy(&e.body),
                err
            );
            let text = err.to_string();
            prop_assert!(
                !text.chars().any(char::is_control),
                "control characters in {:?}",
                text
            );
            prop_assert!(
                text.chars().count() <= 700,
                "{} chars: {}",
                text.chars().count(),
                text
            );
            if let Some(t) = &e.target {
                prop_assert!(!text.contains(t.as_str()), "target id in {}", text);
            }
            prop_assert!(!text.contains("fake-token"), "token in {}", text);
            // 401 is retried once with a fresh token, never more.
            let sent = fake.requests().len();
            let max = if e.status == 401 { 2 } else { 1 };
            prop_assert!(sent <= max, "{} requests for one call", sent);
            Ok(())
        })
        .unwrap();
}

#[test]
fn odd_retry_after_headers_pause_for_a_sane_time() {
    let rt = runtime();
    let fake = rt.block_on(Fake::start());
    let header = prop_oneof![
        Just(None),
        (0u32..100_000).prop_map(|n| Some(n.to_string())),
        Just(Some("-5".to_string())),
        Just(Some("NaN".to_string())),
        Just(Some("inf".to_string())),
        Just(Some("1e308".to_string())),
        Just(Some("0.5".to_string())),
        Just(Some("Wed, 21 Oct 2015 07:28:00 GMT".to_string())),
        Just(Some("Fri, 31 Dec 9999 23:59:59 GMT".to_string())),
        "[ -~]{0,40}".prop_map(Some),
    ];
    runner(256)
        .run(&(header, prop::sample::select(vec![1.0f64, 60.0, 1000.0])), |(h, scale)| {
            let client = rt.block_on(async { fake.client(scale) });
            let mut headers = vec![];
            if let Some(h) = &h {
                headers.push(("retry-after".to_string(), h.clone()));
            }
            fake.set(
                vec![],
                Some(Reply {
                    status: 429,
                    headers,
                    body: br#"{"error":{"code":"TooManyRequests","message":"Rate limit is exceeded. Try again in 7 seconds."}}"#.to_vec(),
                }),
            );
            let err = rt
                .block_on(client.get_action("5382f7ea-7557-4ab7-9782-d50480024a4e", "k"))
                .unwrap_err();
            match err.class() {
                ErrorClass::RateLimited { retry_after } => {
                    // At most a day of server time, scaled to the local clock.
                    prop_assert!(retry_after <= Duration::from_secs_f64(86_400.0 / scale) + Duration::from_millis(1),
                        "{:?} for {:?}", retry_after, h);
                }
                other => return Err(TestCaseError::fail(format!("{other:?} for a 429"))),
            }
            // The message does not carry the changing "try again in N seconds" text.
            prop_assert!(!err.to_string().contains("7 seconds"), "{}", err);
            Ok(())
        })
        .unwrap();
}
