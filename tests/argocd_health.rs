//! The Argo CD health check (`charts/mde-isolation-operator/argocd/health.lua`) run by a real Lua
//! interpreter against the planner's phase fixtures (`tests/fixtures/phases/`, see
//! `tests/status_fixtures.rs`).
//!
//! Argo CD evaluates health checks with gopher-lua, a Lua 5.1 implementation, with the live object
//! as the global `obj` and the chunk's return value as the result. Each case here does the same
//! under `lua5.1` and `lua5.4` (both installed by `scripts/install-lua.sh`): the fixture becomes a
//! Lua table literal assigned to `obj`, the script runs with `dofile`, and `status` and `message`
//! of the table it returns are compared. A missing interpreter fails the test: it never skips.

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
    let path = repo().join(format!("tests/fixtures/phases/{stem}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (see tests/status_fixtures.rs)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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

#[test]
fn health_of_every_phase_fixture_under_real_lua() {
    let interpreters: Vec<String> = INTERPRETERS.iter().map(|n| interpreter(n)).collect();
    let mut failures = Vec::new();
    for (stem, want_status, want_message) in expectations() {
        let object = fixture(stem);
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

#[test]
fn every_phase_fixture_has_an_expectation() {
    let dir = repo().join("tests/fixtures/phases");
    let mut stems: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "json").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    stems.sort();
    let mut expected: Vec<String> = expectations()
        .into_iter()
        .map(|(s, ..)| s.to_string())
        .collect();
    expected.sort();
    assert_eq!(
        stems, expected,
        "a new phase fixture needs its Argo CD health here"
    );
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
fn docs_embed_the_shipped_script() {
    let script = std::fs::read_to_string(script_path()).expect("health.lua");
    let docs = std::fs::read_to_string(repo().join("docs/gitops.md")).expect("docs/gitops.md");
    // The argocd-cm example indents the script by four spaces under its key.
    let indented: String = script
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    assert!(
        docs.contains(&indented),
        "docs/gitops.md must embed charts/mde-isolation-operator/argocd/health.lua verbatim \
         (indented by 4 spaces) in its argocd-cm example"
    );
}
