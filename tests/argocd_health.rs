//! The Argo CD health check (`charts/mde-isolation-operator/argocd/health.lua`) run by a real Lua
//! interpreter against the planner's phase fixtures (`tests/fixtures/phases/`, see
//! `tests/status_fixtures.rs`) and the rollout's set phase fixtures (`tests/fixtures/set-phases/`,
//! see `tests/set_status_fixtures.rs`). One script serves both kinds: it reads only
//! `metadata.generation`, `status.observedGeneration` and the Ready, Reconciling and Stalled
//! conditions, which a DeviceIsolation and a DeviceIsolationSet report alike.
//!
//! Argo CD evaluates health checks with gopher-lua, a Lua 5.1 implementation, with the live object
//! as the global `obj` and the chunk's return value as the result. Each case here does the same
//! under `lua5.1` and `lua5.4` (both installed by `scripts/install-lua.sh`): the fixture becomes a
//! Lua table literal assigned to `obj`, the script runs with `dofile`, and `status` and `message`
//! of the table it returns are compared. A missing interpreter fails the test: it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The interpreters every case runs under: 5.1 as Argo CD's gopher-lua, 5.4 as current Lua.
const INTERPRETERS: [&str; 2] = ["lua5.1", "lua5.4"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn script_path() -> PathBuf {
    repo().join("charts/mde-isolation-operator/argocd/health.lua")
}

/// A Lua string literal holding `s` exactly (decimal escapes for control characters).
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\{:03}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Lua expression for a JSON value, as Argo CD hands objects to Lua: objects and arrays become
/// tables (arrays 1-based), `null` becomes `nil`.
fn lua_value(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(lua_value).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_value(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

/// Finds `name` on PATH, failing with how to install it.
fn interpreter(name: &str) -> String {
    let found = Command::new(name)
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{name}` is not on PATH: the Argo CD health check is tested with a real Lua interpreter; \
         install it with `scripts/install-lua.sh` (Debian packages lua5.1 and lua5.4)"
    );
    name.to_string()
}

/// Runs the health check on `object` under `lua`; returns `(status, message)`.
fn health(lua: &str, object: &Value) -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let runner = dir.path().join("run.lua");
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(tostring(hs.status), \"\\n\", tostring(hs.message), \"\\n\")\n",
        lua_value(object),
        lua_string(&script_path().display().to_string()),
    );
    std::fs::write(&runner, program).expect("write runner");
    let out = Command::new(lua)
        .arg(&runner)
        .output()
        .unwrap_or_else(|e| panic!("run {lua}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{lua} failed ({}):\n{}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let message = lines.collect::<Vec<_>>().join("\n");
    (status, message)
}

fn fixture(stem: &str) -> Value {
    common::fixtures::read(&common::fixtures::dir("phases"), stem)
}

fn set_fixture(stem: &str) -> Value {
    common::fixtures::read(&common::fixtures::dir("set-phases"), stem)
}

/// `"<reason>: <message>"` of condition `type_` of a fixture.
fn described(object: &Value, type_: &str) -> String {
    let c = object["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("fixture has no {type_} condition: {object}"));
    format!(
        "{}: {}",
        c["reason"].as_str().unwrap_or_default(),
        c["message"].as_str().unwrap_or_default()
    )
}

/// The expected Argo CD health of every phase fixture: `(file stem, status, message)`.
fn expectations() -> Vec<(&'static str, &'static str, String)> {
    let pending = fixture("action-pending");
    let released = fixture("released");
    let stalled = fixture("stalled");
    vec![
        (
            "just-applied",
            "Progressing",
            "Waiting for the operator to report status".into(),
        ),
        (
            "action-pending",
            "Progressing",
            described(&pending, "Reconciling"),
        ),
        ("released", "Healthy", described(&released, "Ready")),
        ("stalled", "Degraded", described(&stalled, "Stalled")),
        (
            "new-generation",
            "Progressing",
            "Waiting for the operator to observe generation 2 (status is for 1)".into(),
        ),
    ]
}

/// The expected Argo CD health of every set phase fixture: `(file stem, status, message)`.
fn set_expectations() -> Vec<(&'static str, &'static str, String)> {
    let paused = set_fixture("set-paused");
    let rolling_out = set_fixture("set-rolling-out");
    let converged = set_fixture("set-converged");
    let too_large = set_fixture("set-too-large");
    vec![
        (
            "set-just-applied",
            "Progressing",
            "Waiting for the operator to report status".into(),
        ),
        // Paused is Reconciling: Argo CD shows it Progressing, as long as it stays paused.
        (
            "set-paused",
            "Progressing",
            described(&paused, "Reconciling"),
        ),
        (
            "set-rolling-out",
            "Progressing",
            described(&rolling_out, "Reconciling"),
        ),
        ("set-converged", "Healthy", described(&converged, "Ready")),
        (
            "set-too-large",
            "Degraded",
            described(&too_large, "Stalled"),
        ),
        (
            "set-new-generation",
            "Progressing",
            "Waiting for the operator to observe generation 2 (status is for 1)".into(),
        ),
    ]
}

/// Runs the script on every `(stem, status, message)` of `cases` (read with `read`) under every
/// interpreter; fails listing every mismatch.
fn check_health(cases: Vec<(&'static str, &'static str, String)>, read: fn(&str) -> Value) {
    let interpreters: Vec<String> = INTERPRETERS.iter().map(|n| interpreter(n)).collect();
    let mut failures = Vec::new();
    for (stem, want_status, want_message) in cases {
        let object = read(stem);
        for lua in &interpreters {
            let (status, message) = health(lua, &object);
            if (status.as_str(), &message) != (want_status, &want_message) {
                failures.push(format!(
                    "{stem} under {lua}: got {status} {message:?}, want {want_status} {want_message:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Fails unless `cases` name exactly the fixtures of `tests/fixtures/<dir>`.
fn check_coverage(dir: &str, cases: Vec<(&'static str, &'static str, String)>) {
    let stems = common::fixtures::stems(&common::fixtures::dir(dir));
    let mut expected: Vec<String> = cases.into_iter().map(|(s, ..)| s.to_string()).collect();
    expected.sort();
    assert!(!stems.is_empty(), "no fixtures in tests/fixtures/{dir}");
    assert_eq!(
        stems, expected,
        "a new fixture in tests/fixtures/{dir} needs its Argo CD health here"
    );
}

#[test]
fn health_of_every_phase_fixture_under_real_lua() {
    check_health(expectations(), fixture);
}

#[test]
fn health_of_every_set_phase_fixture_under_real_lua() {
    check_health(set_expectations(), set_fixture);
}

#[test]
fn every_phase_fixture_has_an_expectation() {
    check_coverage("phases", expectations());
}

#[test]
fn every_set_phase_fixture_has_an_expectation() {
    check_coverage("set-phases", set_expectations());
}

#[test]
fn a_stale_ready_condition_is_not_healthy() {
    // Not a phase the planner produces (it writes every condition for the generation it
    // observes), but the script must not trust a Ready condition computed for another generation.
    let lua = interpreter("lua5.1");
    let mut object = fixture("released");
    object["status"]["conditions"][0]["observedGeneration"] = 0.into();
    let (status, _) = health(&lua, &object);
    assert_eq!(status, "Progressing");
}

#[test]
fn lua_literals_keep_strings_exact() {
    let lua = interpreter("lua5.4");
    let tricky = "quote \" backslash \\ newline \n tab \t bell \x07 unicode é ✓";
    let dir = tempfile::tempdir().expect("tempdir");
    let runner = dir.path().join("echo.lua");
    std::fs::write(&runner, format!("io.write({})", lua_string(tricky))).expect("write");
    let out = Command::new(&lua).arg(&runner).output().expect("run lua");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).expect("utf-8"), tricky);
}

#[test]
fn docs_give_every_kind_the_shipped_script() {
    let script = std::fs::read_to_string(script_path()).expect("health.lua");
    let docs = std::fs::read_to_string(repo().join("docs/gitops.md")).expect("docs/gitops.md");
    // The argocd-cm example: the YAML block of docs/gitops.md that holds a ConfigMap.
    let example = docs
        .split("```yaml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("kind: ConfigMap"))
        .expect("docs/gitops.md has an argocd-cm example");
    let configmap: serde_yaml::Value = serde_yaml::from_str(example)
        .unwrap_or_else(|e| panic!("the argocd-cm example of docs/gitops.md: {e}"));
    assert_eq!(configmap["metadata"]["name"].as_str(), Some("argocd-cm"));
    for kind in [
        "DeviceIsolation",
        "DeviceIsolationSet",
        "MdeConnection",
        "ClusterMdeConnection",
    ] {
        let key = format!("resource.customizations.health.isolation.mde.dev_{kind}");
        assert_eq!(
            configmap["data"][key.as_str()].as_str(),
            Some(script.as_str()),
            "the argocd-cm example of docs/gitops.md must give {key} \
             charts/mde-isolation-operator/argocd/health.lua verbatim"
        );
    }
}

/// A connection as the connection controller writes it in `phase` (`Ready` reason, and the
/// condition that goes with it).
fn connection(reason: &str, extra: Option<&str>) -> Value {
    let ready = if extra.is_none() { "True" } else { "False" };
    let mut conditions = vec![serde_json::json!({
        "type": "Ready", "status": ready, "reason": reason, "message": "m",
        "observedGeneration": 1, "lastTransitionTime": "2026-12-06T00:00:00Z"})];
    if let Some(type_) = extra {
        conditions.push(serde_json::json!({
            "type": type_, "status": "True", "reason": reason, "message": "m",
            "observedGeneration": 1, "lastTransitionTime": "2026-12-06T00:00:00Z"}));
    }
    serde_json::json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "MdeConnection",
        "metadata": {"name": "fabrikam", "generation": 1},
        "status": {"observedGeneration": 1, "conditions": conditions, "callsLastHour": 3},
    })
}

#[test]
fn health_of_a_connection_under_real_lua() {
    for lua in INTERPRETERS.map(interpreter) {
        for (object, want) in [
            (connection("Connected", None), "Healthy"),
            (connection("Verifying", Some("Reconciling")), "Progressing"),
            (
                connection("AuthenticationFailed", Some("Stalled")),
                "Degraded",
            ),
            (connection("CredentialMissing", Some("Stalled")), "Degraded"),
        ] {
            let (status, message) = health(&lua, &object);
            assert_eq!(status, want, "{lua}: {object}: {message}");
        }
    }
}
