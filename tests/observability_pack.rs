//! The observability pack shipped with the chart: the Grafana dashboard
//! (`dashboards/mde-isolation-operator.json`), the alert rules (the `PrometheusRule` template and
//! its plain copy `alerts/mde-isolation-operator.rules.yaml`) and their unit tests.
//!
//! What is checked:
//! - every metric name a PromQL expression of the dashboard or the rules selects is exported by
//!   a real operator (started against the test control plane and `mde-sim`, after a scenario
//!   that gives the counters samples);
//! - the rules are structurally complete (expr, for, severity, summary) and, when `promtool` is
//!   installed (`scripts/install-promtool.sh`), pass `promtool check rules` and the alert unit
//!   tests in `alerts/mde-isolation-operator.rules.test.yaml` (`promtool test rules`);
//! - the dashboard is well formed (unique ids, data source variable, every series filtered by
//!   the `$job` variable, every exported metric shown);
//! - `helm lint` and `helm template` pass with the pack on and off, the `PrometheusRule` the
//!   chart renders equals the plain rules file, and the dashboard ConfigMap carries the file.
//!
//! `MDE_UPDATE_ALERTS=1 cargo test --test observability_pack` rewrites the plain rules file from
//! the template after a deliberate change of the rules.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, SeedMachine, apply, device_isolation, machine_id, seed_file,
    wait_ready,
};
use common::sim::Sim;
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// The chart, relative to the repository root.
const CHART: &str = "charts/mde-isolation-operator";
/// The dashboard inside the chart.
const DASHBOARD: &str = "charts/mde-isolation-operator/dashboards/mde-isolation-operator.json";
/// The plain rules file (for Prometheus without the Prometheus Operator).
const RULES: &str = "charts/mde-isolation-operator/alerts/mde-isolation-operator.rules.yaml";
/// promtool unit tests of the plain rules file.
const RULES_TESTS: &str =
    "charts/mde-isolation-operator/alerts/mde-isolation-operator.rules.test.yaml";
/// `prometheusRule.selector` the plain rules file is rendered with.
const PLAIN_SELECTOR: &str = r#"job="mde-isolation-operator""#;
/// Release name the plain rules file is rendered with (its full name is the chart name).
const PLAIN_RELEASE: &str = "mde-isolation-operator";
/// Prefix of every metric the operator exports.
const PREFIX: &str = "mde_isolation_";
/// Values without which the chart refuses to render.
const REQUIRED_VALUES: [&str; 6] = [
    "--set",
    "mde.tenantId=00000000-0000-0000-0000-000000000000",
    "--set",
    "mde.clientId=11111111-1111-1111-1111-111111111111",
    "--set",
    "mde.existingSecret=mde-client",
];
/// Series (as stored by Prometheus) the dashboard must show: one per exported metric family.
const ON_DASHBOARD: &[&str] = &[
    "mde_isolation_mde_calls_total",
    "mde_isolation_mde_call_duration_seconds_bucket",
    "mde_isolation_quota_remaining",
    "mde_isolation_quota_limit",
    "mde_isolation_quota_throttle_episodes_total",
    "mde_isolation_quota_wait_seconds_total",
    "mde_isolation_open_actions",
    "mde_isolation_oldest_open_action_age_seconds",
    "mde_isolation_poll_interval_seconds",
    "mde_isolation_reconciles_total",
    "mde_isolation_resources",
    "mde_isolation_tracked_resources",
];
/// Alerts the rules must define.
const ALERTS: &[&str] = &[
    "MdeIsolationOperatorDown",
    "MdeIsolationQuotaNearlyExhausted",
    "MdeIsolationRateLimited",
    "MdeIsolationResourcesStalled",
    "MdeIsolationActionPendingTooLong",
    "MdeIsolationReconcileErrors",
];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// PromQL tokenizer
// ---------------------------------------------------------------------------------------------

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Metric names starting with `mde_isolation_` that a PromQL expression (or a Grafana query
/// such as `label_values(metric, label)`) refers to.
///
/// A small tokenizer, not a parser: string literals (label values, which may contain anything)
/// and `#` comments are skipped, and every other identifier with the prefix counts, whatever
/// follows it (`{`, `[`, `)`, `,`, whitespace, an operator or the end). Label names never carry
/// the prefix, and histogram (`_bucket`, `_sum`, `_count`) and counter (`_total`) suffixes are
/// part of the name, as Prometheus stores it.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            if ident.starts_with(PREFIX) {
                names.insert(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The label matchers (`{...}`) that follow each `mde_isolation_` metric name in `expr`, `None`
/// for a name used without matchers.
fn selectors(expr: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(pos) = rest.find(PREFIX) {
        let preceded_by_ident = rest[..pos].chars().next_back().is_some_and(is_ident_char);
        let tail = &rest[pos..];
        let end = tail.find(|c| !is_ident_char(c)).unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let after = &tail[end..];
        let matchers = after
            .strip_prefix('{')
            .and_then(|m| m.find('}').map(|close| m[..close].to_string()));
        if !preceded_by_ident {
            out.push((name, matchers));
        }
        rest = after;
    }
    out
}

#[test]
fn tokenizer_finds_metric_names_and_skips_strings_and_labels() {
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|s| s.to_string()).collect() };
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (api, le) (rate(mde_isolation_mde_call_duration_seconds_bucket{job=~"$job"}[$__rate_interval])))"#
        ),
        set(&["mde_isolation_mde_call_duration_seconds_bucket"])
    );
    // Followed by `[`, `)`, `,`, whitespace or the end; never inside a string or a comment.
    assert_eq!(
        metric_names(
            "increase(mde_isolation_mde_calls_total[5m]) / max(mde_isolation_open_actions) \
             > on() mde_isolation_poll_interval_seconds # mde_isolation_in_a_comment\n\
             + label_values(mde_isolation_quota_remaining, api) + mde_isolation_reconciles_total"
        ),
        set(&[
            "mde_isolation_mde_calls_total",
            "mde_isolation_open_actions",
            "mde_isolation_poll_interval_seconds",
            "mde_isolation_quota_remaining",
            "mde_isolation_reconciles_total",
        ])
    );
    assert_eq!(
        metric_names(r#"up{job="mde_isolation_not_a_metric", instance='mde_isolation_x'} == 1"#),
        set(&[])
    );
    assert_eq!(
        metric_names("sum(mde_isolation_quota_wait_seconds_total)by(api)"),
        set(&["mde_isolation_quota_wait_seconds_total"])
    );
    assert_eq!(
        selectors(
            r#"max(mde_isolation_open_actions{job=~"$job"}) + mde_isolation_poll_interval_seconds"#
        ),
        vec![
            (
                "mde_isolation_open_actions".to_string(),
                Some(r#"job=~"$job""#.to_string())
            ),
            ("mde_isolation_poll_interval_seconds".to_string(), None),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// What /metrics exports
// ---------------------------------------------------------------------------------------------

/// A parsed Prometheus/OpenMetrics text exposition.
#[derive(Debug, Default)]
struct Exposition {
    /// Metric family name to its `# TYPE`.
    families: BTreeMap<String, String>,
    /// Names of the samples present.
    samples: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut exp = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    exp.families.insert(name.to_string(), kind.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                exp.samples.insert(line[..end].to_string());
            }
        }
        exp
    }

    /// Every series name a query can select once Prometheus has scraped this: the samples,
    /// plus what each `# TYPE` implies even before its family has a sample (a counter `x` is
    /// stored as `x_total`, a histogram as `x_bucket`, `x_sum`, `x_count`).
    fn queryable(&self) -> BTreeSet<String> {
        let mut names = self.samples.clone();
        for (family, kind) in &self.families {
            match kind.as_str() {
                "counter" if family.ends_with("_total") => {
                    names.insert(family.clone());
                }
                "counter" => {
                    names.insert(format!("{family}_total"));
                }
                "histogram" | "gaugehistogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{family}{suffix}"));
                    }
                }
                "summary" => {
                    names.insert(family.clone());
                    for suffix in ["_sum", "_count"] {
                        names.insert(format!("{family}{suffix}"));
                    }
                }
                _ => {
                    names.insert(family.clone());
                }
            }
        }
        names
    }
}

#[test]
fn exposition_names_follow_the_metric_types() {
    let exp = Exposition::parse(
        "# HELP mde_isolation_reconciles Reconciles by result.\n\
         # TYPE mde_isolation_reconciles counter\n\
         mde_isolation_reconciles_total{result=\"ok\"} 3\n\
         # TYPE mde_isolation_mde_call_duration_seconds histogram\n\
         # TYPE mde_isolation_open_actions gauge\n\
         mde_isolation_open_actions 0\n\
         # EOF\n",
    );
    let q = exp.queryable();
    for name in [
        "mde_isolation_reconciles_total",
        "mde_isolation_mde_call_duration_seconds_bucket",
        "mde_isolation_mde_call_duration_seconds_count",
        "mde_isolation_open_actions",
    ] {
        assert!(q.contains(name), "{name} in {q:?}");
    }
    // The family name of a counter or histogram is not a series.
    assert!(!q.contains("mde_isolation_reconciles"));
    assert!(!q.contains("mde_isolation_mde_call_duration_seconds"));
}

// ---------------------------------------------------------------------------------------------
// The dashboard and the rules
// ---------------------------------------------------------------------------------------------

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every PromQL expression of the dashboard, with where it is: panel targets (rows nested or
/// not) and the queries of template variables.
fn dashboard_exprs(dash: &Json) -> Vec<(String, String)> {
    fn walk(v: &Json, place: &str, out: &mut Vec<(String, String)>) {
        match v {
            Json::Object(map) => {
                let place = match map.get("title").and_then(Json::as_str) {
                    Some(t) => format!("panel {t:?}"),
                    None => place.to_string(),
                };
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Json::String(e)) => out.push((place.clone(), e.clone())),
                        _ => walk(v, &place, out),
                    }
                }
            }
            Json::Array(items) => items.iter().for_each(|i| walk(i, place, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], "panels", &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or("?");
        let query = match &var["query"] {
            Json::String(q) if var["type"] == "query" => Some(q.clone()),
            Json::Object(q) => q.get("query").and_then(Json::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(q) = query {
            out.push((format!("variable ${name}"), q));
        }
    }
    out
}

fn parse_yaml(text: &str, what: &str) -> Yaml {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The rules of a rules file (or of a PrometheusRule's spec), as (alert name, rule).
fn rules_of(doc: &Yaml) -> Vec<(String, Yaml)> {
    let groups = doc["groups"].as_sequence().expect("groups: a list");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .map(|r| {
            let name = r["alert"]
                .as_str()
                .or_else(|| r["record"].as_str())
                .unwrap_or("<unnamed>")
                .to_string();
            (name, r)
        })
        .collect()
}

/// Every PromQL expression the pack queries, with where it is.
fn pack_exprs() -> Vec<(String, String)> {
    let mut exprs = dashboard_exprs(&dashboard());
    for (name, rule) in rules_of(&parse_yaml(&read(RULES), RULES)) {
        let expr = rule["expr"].as_str().unwrap_or_default().to_string();
        exprs.push((format!("alert {name}"), expr));
    }
    exprs
}

#[test]
fn dashboard_is_well_formed_and_shows_every_metric() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "mde-isolation-operator");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "job"], "template variables");

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().expect("x"),
            g["y"].as_u64().expect("y"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: description"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no target");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }

    let exprs = dashboard_exprs(&dash);
    let mut shown = BTreeSet::new();
    for (place, expr) in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty() || expr.contains("up{"),
            "{place}: no metric in {expr}"
        );
        if !place.starts_with("variable") {
            for (name, matchers) in selectors(expr) {
                assert!(
                    matchers
                        .as_deref()
                        .is_some_and(|m| m.contains(r#"job=~"$job""#)),
                    "{place}: {name} is not filtered by the $job variable: {expr}"
                );
            }
        }
        shown.extend(names);
    }
    for name in ON_DASHBOARD {
        assert!(shown.contains(*name), "the dashboard does not show {name}");
    }
    // The panels the issue asks for, by title.
    let titles: Vec<String> = panels
        .iter()
        .filter_map(|p| p["title"].as_str().map(str::to_lowercase))
        .collect();
    for wanted in [
        "calls by api and outcome",
        "429",
        "quota remaining",
        "waiting for quota",
        "open actions",
        "oldest open action",
        "poll interval",
        "reconciles by result",
        "reconcile error",
        "latency p50 / p99",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted:?}: {titles:?}"
        );
    }
}

/// A Prometheus duration (`5m`, `1h30m`, `100ms`): one or more number-unit pairs.
fn is_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

/// Structural lint of a rules document: what `promtool check rules` does not require but every
/// alert of this pack must have.
fn lint_rules(doc: &Yaml, what: &str) {
    let rules = rules_of(doc);
    assert!(!rules.is_empty(), "{what}: no rule");
    let mut seen = BTreeSet::new();
    for (name, rule) in &rules {
        assert!(seen.insert(name.clone()), "{what}: {name} defined twice");
        let field = |path: &[&str]| -> String {
            let mut v = rule;
            for p in path {
                v = &v[*p];
            }
            v.as_str()
                .unwrap_or_else(|| panic!("{what}: {name} has no {}", path.join(".")))
                .to_string()
        };
        assert!(rule["alert"].is_string(), "{what}: {name} is not an alert");
        let expr = field(&["expr"]);
        assert!(!expr.trim().is_empty(), "{what}: {name}: empty expr");
        let r#for = field(&["for"]);
        assert!(is_duration(&r#for), "{what}: {name}: for {for:?}");
        let severity = field(&["labels", "severity"]);
        assert!(
            ["critical", "warning", "info"].contains(&severity.as_str()),
            "{what}: {name}: severity {severity:?}"
        );
        assert!(!field(&["annotations", "summary"]).is_empty());
        assert!(!field(&["annotations", "description"]).is_empty());
    }
    for alert in ALERTS {
        assert!(seen.contains(*alert), "{what}: no alert {alert}");
    }
}

#[test]
fn is_duration_accepts_prometheus_durations_only() {
    for ok in ["5m", "0s", "1h30m", "100ms", "1d"] {
        assert!(is_duration(ok), "{ok}");
    }
    for bad in ["", "5", "m", "5 m", "5x", "-5m"] {
        assert!(!is_duration(bad), "{bad}");
    }
}

/// `promtool`, when installed; prints why a sub-check is skipped otherwise.
fn promtool(skipped: &str) -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        Some(PathBuf::from("promtool"))
    } else {
        eprintln!(
            "note: promtool is not installed (scripts/install-promtool.sh installs it from \
             Debian's prometheus package); skipping {skipped}"
        );
        None
    }
}

fn run_ok(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn alert_rules_are_well_formed_and_pass_promtool() {
    let doc = parse_yaml(&read(RULES), RULES);
    lint_rules(&doc, RULES);
    let Some(promtool) = promtool("promtool check rules / test rules") else {
        return;
    };
    let mut check = Command::new(&promtool);
    check.args(["check", "rules"]).arg(repo(RULES));
    let out = run_ok(check, "promtool check rules");
    assert!(out.contains("SUCCESS"), "{out}");
    // The unit tests: each alert fires (with its labels and annotations) when it should, and
    // not before.
    let mut test = Command::new(&promtool);
    test.args(["test", "rules"]).arg(repo(RULES_TESTS));
    let out = run_ok(test, "promtool test rules");
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a unit test.
    let tests = read(RULES_TESTS);
    for alert in ALERTS {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{RULES_TESTS}: no test of {alert}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The chart
// ---------------------------------------------------------------------------------------------

/// `.tools/bin/helm`, installed by `scripts/install-tools.sh` when missing.
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let helm = repo(".tools/bin/helm");
        if !helm.exists() {
            let mut install = Command::new("bash");
            install.arg(repo("scripts/install-tools.sh"));
            run_ok(install, "scripts/install-tools.sh");
        }
        helm
    })
}

/// Runs helm with private cache/config/data homes.
fn helm(args: &[&str]) -> Output {
    let homes = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(helm_bin());
    for (var, sub) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        cmd.env(var, homes.path().join(sub));
    }
    cmd.args(args)
        .current_dir(repo("."))
        .stdin(Stdio::null())
        .output()
        .expect("run helm")
}

fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `helm template RELEASE CHART -n NS` with the required values and `extra`, as documents.
fn render(release: &str, ns: &str, extra: &[&str]) -> Vec<Yaml> {
    let mut args = vec!["template", release, CHART, "-n", ns];
    args.extend(REQUIRED_VALUES);
    args.extend(extra);
    let text = helm_ok(&args);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Yaml::deserialize(d).expect("rendered YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The rules the chart renders for the plain file's selector.
fn rendered_plain_rules() -> Yaml {
    let selector = format!("prometheusRule.selector={PLAIN_SELECTOR}");
    let docs = render(
        PLAIN_RELEASE,
        "monitoring",
        &["--set", "prometheusRule.enabled=true", "--set", &selector],
    );
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules[0]["spec"].clone()
}

#[test]
fn chart_lints_and_renders_the_pack_on_and_off() {
    let on = [
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "serviceMonitor.enabled=true",
    ];
    for extra in [&[][..], &on[..]] {
        let mut args = vec!["lint", CHART];
        args.extend(REQUIRED_VALUES);
        args.extend(extra);
        let out = helm_ok(&args);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }

    // Off by default.
    let docs = render("x", "secops", &[]);
    assert!(of_kind(&docs, "PrometheusRule").is_empty());
    assert!(of_kind(&docs, "ConfigMap").is_empty());

    // On: the rule selects this release's job and namespace, the dashboard ConfigMap carries
    // the file for the Grafana sidecar.
    let docs = render("x", "secops", &on);
    let rule = of_kind(&docs, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    assert_eq!(rule[0]["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule[0]["metadata"]["namespace"], "secops");
    lint_rules(&rule[0]["spec"], "rendered PrometheusRule");
    for (name, r) in rules_of(&rule[0]["spec"]) {
        let expr = r["expr"].as_str().unwrap_or_default();
        assert!(
            expr.contains(r#"job="x-mde-isolation-operator",namespace="secops""#),
            "{name}: {expr}"
        );
    }
    let cms = of_kind(&docs, "ConfigMap");
    assert_eq!(cms.len(), 1);
    assert_eq!(cms[0]["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = cms[0]["data"]["mde-isolation-operator.json"]
        .as_str()
        .expect("dashboard in the ConfigMap");
    assert_eq!(
        serde_json::from_str::<Json>(json).expect("dashboard JSON"),
        dashboard(),
        "the ConfigMap carries the dashboard file"
    );

    // Options: another namespace for the dashboard, extra alert labels, disabled alerts.
    let docs = render(
        "x",
        "secops",
        &[
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.additionalRuleLabels.team=secops",
            "--set",
            "prometheusRule.labels.release=kube-prometheus",
            "--set",
            "prometheusRule.disabledAlerts={MdeIsolationActionPendingTooLong}",
            "--set",
            "prometheusRule.thresholds.quotaRemaining=7",
            "--set",
            "grafanaDashboard.enabled=true",
            "--set",
            "grafanaDashboard.namespace=grafana",
        ],
    );
    let spec = &of_kind(&docs, "PrometheusRule")[0]["spec"];
    let rules = rules_of(spec);
    assert!(
        rules.iter().all(
            |(n, r)| n != "MdeIsolationActionPendingTooLong" && r["labels"]["team"] == "secops"
        )
    );
    let quota = rules
        .iter()
        .find(|(n, _)| n == "MdeIsolationQuotaNearlyExhausted")
        .expect("quota alert");
    assert!(
        quota.1["expr"]
            .as_str()
            .unwrap_or_default()
            .ends_with("<= 7")
    );
    assert_eq!(
        of_kind(&docs, "PrometheusRule")[0]["metadata"]["labels"]["release"],
        "kube-prometheus"
    );
    assert_eq!(
        of_kind(&docs, "ConfigMap")[0]["metadata"]["namespace"],
        "grafana"
    );

    // What the chart renders passes promtool too (it is the same rules with another selector).
    if let Some(promtool) = promtool("promtool check rules of the rendered PrometheusRule") {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rendered.rules.yaml");
        std::fs::write(
            &file,
            serde_yaml::to_string(&rule[0]["spec"]).expect("yaml"),
        )
        .expect("write rules");
        let mut check = Command::new(promtool);
        check.args(["check", "rules"]).arg(&file);
        run_ok(check, "promtool check rules (rendered PrometheusRule)");
    }
}

/// Header of the generated plain rules file.
const RULES_HEADER: &str = "\
# Alert rules of mde-isolation-operator, for a Prometheus without the Prometheus Operator
# (add this file to rule_files). With the Prometheus Operator, use the chart's PrometheusRule
# instead (prometheusRule.enabled=true).
#
# GENERATED from charts/mde-isolation-operator/templates/prometheusrule.yaml with
# prometheusRule.selector='job=\"mde-isolation-operator\"' and the default thresholds; do not edit
# by hand. After changing the template: MDE_UPDATE_ALERTS=1 cargo test --test observability_pack
#
# Every expression selects the operator's series with job=\"mde-isolation-operator\": replace it
# with the job name of your scrape configuration. Unit tests: mde-isolation-operator.rules.test.yaml
# (promtool test rules).
";

#[test]
fn plain_rules_file_is_the_rendered_prometheus_rule() {
    let rendered = rendered_plain_rules();
    if std::env::var_os("MDE_UPDATE_ALERTS").is_some() {
        let body = serde_yaml::to_string(&rendered).expect("yaml");
        std::fs::write(repo(RULES), format!("{RULES_HEADER}{body}")).expect("write rules");
        eprintln!("rewrote {RULES}");
    }
    let committed = parse_yaml(&read(RULES), RULES);
    assert!(
        committed == rendered,
        "{RULES} differs from what templates/prometheusrule.yaml renders; after a deliberate \
         change run: MDE_UPDATE_ALERTS=1 cargo test --test observability_pack\nrendered:\n{}",
        serde_yaml::to_string(&rendered).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------------------------
// Against a running operator
// ---------------------------------------------------------------------------------------------

/// GETs `/metrics` of the operator at `addr`.
async fn scrape(http: &reqwest::Client, addr: &str) -> String {
    let r = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("/metrics answers");
    assert_eq!(r.status().as_u16(), 200);
    r.text().await.expect("/metrics body")
}

/// The value of an unlabelled sample, if present.
fn sample_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_pack_queries_is_exported_by_a_running_operator() {
    let referenced: BTreeMap<String, Vec<String>> =
        pack_exprs()
            .into_iter()
            .fold(BTreeMap::new(), |mut acc, (place, expr)| {
                for name in metric_names(&expr) {
                    acc.entry(name).or_insert_with(Vec::new).push(place.clone());
                }
                acc
            });
    assert!(
        referenced.len() >= ON_DASHBOARD.len(),
        "the tokenizer found too few names: {referenced:?}"
    );

    let started = Instant::now();
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("observability").await;
    eprintln!("control plane ready after {:?}", started.elapsed());
    let client = c.client().await;

    // Three online machines to release and one offline (its action stays open), with a quota
    // budget of 2 calls a minute per API so that the releases wait for quota.
    let online: Vec<String> = (0..3).map(|i| machine_id(0x0b50 + i)).collect();
    let offline = machine_id(0x0b5f);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut machines: Vec<SeedMachine<'_>> = online
        .iter()
        .map(|id| SeedMachine {
            id,
            name: "obs.contoso.local",
            behaviour: "online",
            isolated: true,
        })
        .collect();
    machines.push(SeedMachine {
        id: &offline,
        name: "obs-offline.contoso.local",
        behaviour: "offline",
        isolated: true,
    });
    let seed = seed_file(dir.path(), &machines);
    let sim = Sim::start(&[
        "--seed",
        seed.to_str().expect("utf-8"),
        "--time-scale",
        "60",
    ]);
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.extra = vec!["--quota-budget".into(), "0.02".into()];
    let op = Operator::start(&sim, cfg);
    let addr = op.http_addr(Duration::from_secs(60));

    for (i, id) in online.iter().chain([&offline]).enumerate() {
        let di = device_isolation(&format!("obs-{i}"), id, false, Some("observability pack"));
        apply(&client, &ns, &di).await;
    }
    for i in 0..online.len() {
        wait_ready(&client, &ns, &format!("obs-{i}"), &op).await;
    }
    eprintln!("releases Ready after {:?}", started.elapsed());

    // Samples for the counters the scenario drives, the open action and the Ready resources in
    // the gauges.
    let http = reqwest::Client::new();
    let end = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = scrape(&http, &addr).await;
        let exp = Exposition::parse(&text);
        let ready = [
            "mde_isolation_reconciles_total",
            "mde_isolation_mde_calls_total",
            "mde_isolation_mde_call_duration_seconds_bucket",
            "mde_isolation_quota_remaining",
            "mde_isolation_quota_wait_seconds_total",
        ]
        .iter()
        .all(|n| exp.samples.contains(*n))
            && sample_value(&text, "mde_isolation_open_actions").is_some_and(|v| v >= 1.0)
            && sample_value(&text, r#"mde_isolation_resources{phase="ready"}"#)
                .is_some_and(|v| v >= online.len() as f64);
        if ready {
            break text;
        }
        assert!(
            Instant::now() < end,
            "the scenario did not produce every sample:\n{text}\noperator log tail:\n{}",
            op.tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    eprintln!("every sample present after {:?}", started.elapsed());
    let exported = Exposition::parse(&text);
    let queryable = exported.queryable();
    let mut missing = Vec::new();
    for (name, places) in &referenced {
        if queryable.contains(name) {
            continue;
        }
        missing.push(format!("{name} (used by {})", places.join(", ")));
    }
    assert!(
        missing.is_empty(),
        "the pack queries metrics the operator does not export:\n  {}\nexported: {queryable:?}",
        missing.join("\n  ")
    );
    // And the reverse, as a note: a family the dashboard does not show yet.
    let shown: BTreeSet<&str> = referenced.keys().map(String::as_str).collect();
    for (family, kind) in &exported.families {
        let series = match kind.as_str() {
            "counter" => format!("{family}_total"),
            "histogram" => format!("{family}_bucket"),
            _ => family.clone(),
        };
        if family.starts_with(PREFIX) && !shown.contains(series.as_str()) {
            eprintln!("note: {series} is exported but neither the dashboard nor an alert uses it");
        }
    }

    // The dashboard ConfigMap the chart renders is one the API server accepts.
    let docs = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || render("obs", &ns, &["--set", "grafanaDashboard.enabled=true"])
    })
    .await
    .expect("render");
    let cm: k8s_openapi::api::core::v1::ConfigMap =
        serde_yaml::from_value(of_kind(&docs, "ConfigMap")[0].clone()).expect("ConfigMap");
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), &ns);
    let params = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&params, &cm)
        .await
        .unwrap_or_else(|e| panic!("server dry-run of the dashboard ConfigMap: {e}"));
}
