//! Committed JSON fixtures checked against what a test produces now: the drift check shared by
//! `tests/status_fixtures.rs` (DeviceIsolation phases) and `tests/set_status_fixtures.rs`
//! (DeviceIsolationSet phases).
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// `tests/fixtures/<name>` of this repository.
pub fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Whether `UPDATE_FIXTURES` asks to rewrite the committed fixtures (set, not empty, not `0`).
pub fn updating() -> bool {
    std::env::var_os("UPDATE_FIXTURES").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Checks `dir` holds exactly `produced` (`<stem>.json` each, pretty-printed JSON): fails naming
/// every file that differs, is missing, or is not produced any more. With `UPDATE_FIXTURES=1`,
/// writes them instead and removes the stale ones. `test` names the cargo test target that
/// produces them, for the hint.
pub fn check(dir: &Path, produced: &BTreeMap<&'static str, Value>, test: &str) {
    let update = updating();
    let hint =
        format!("regenerate with `UPDATE_FIXTURES=1 cargo test --test {test}` and review the diff");

    if update {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    }
    let mut problems = Vec::new();
    for (stem, object) in produced {
        let path = dir.join(format!("{stem}.json"));
        let text = serde_json::to_string_pretty(object).expect("JSON") + "\n";
        if update {
            std::fs::write(&path, &text)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            continue;
        }
        match std::fs::read_to_string(&path) {
            Err(e) => problems.push(format!("{}: {e}", path.display())),
            Ok(committed) => {
                let parsed: Value = serde_json::from_str(&committed)
                    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
                if &parsed != object {
                    problems.push(format!(
                        "{} drifted from what {test} produces; it now produces:\n{text}",
                        path.display()
                    ));
                }
            }
        }
    }
    // A fixture no longer produced would go on being tested against: remove it.
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}; {hint}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"));
    for path in entries {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if !produced.contains_key(stem) {
            if update {
                std::fs::remove_file(&path)
                    .unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
            } else {
                problems.push(format!(
                    "{} is not produced by {test} any more",
                    path.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}\n{hint}", problems.join("\n"));
}

/// The stems of the `*.json` files in `dir`, sorted (for the coverage checks of the consumers).
pub fn stems(dir: &Path) -> Vec<String> {
    let mut stems: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "json").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    stems.sort();
    stems
}

/// The fixture `<dir>/<stem>.json`, parsed.
pub fn read(dir: &Path, stem: &str) -> Value {
    let path = dir.join(format!("{stem}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (see tests/*status_fixtures.rs)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
