//! End to end as a user: the real `kubectl` and `helm` binaries (from `.tools/bin`) against the
//! real kube-apiserver harness, the operator binary and `mde-sim`.
//!
//! What a user of the project does is what these tests do: install the CRD with `kubectl apply`,
//! read `kubectl explain`, apply the manifests of `examples/`, `kubectl wait` for Ready, read
//! `kubectl get di` and the events, lint and render the chart, and run the operator under the
//! chart's own ServiceAccount and RBAC. Every assertion reads what the tools print (exit code,
//! stdout, stderr) or the simulator's ground truth.
//!
//! Nothing waits a fixed time to make an assertion pass: conditions are polled up to generous
//! deadlines (two busy cores), and the only fixed pause is the quiet window in which an
//! unwatched resource must stay untouched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::cluster::{CHART_REQUIRED_VALUES, SA_NAME, SA_NAMESPACE, cluster};
use common::operator::{
    Operator, OperatorConfig, SeedMachine, condition, machine_id, seed_file, wait_ready,
};
use common::poll::eventually;
use common::sim::Sim;
use kube::api::Api;
use mde_isolation_operator::crd::DeviceIsolation;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Name of the CRD in `crds/`.
const CRD: &str = "deviceisolations.isolation.mde.dev";
/// The chart, relative to the repository root.
const CHART: &str = "charts/mde-isolation-operator";
/// Time scale of the simulator and the operator: a simulated minute per real second.
const SCALE: &str = "60";
/// Longest any single kubectl or helm invocation may take before the test fails; far above
/// what they need, so that only a hang trips it.
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);
/// The ServiceAccount identity the harness issued a token for, as RBAC sees it.
const SA_USER: &str = "system:serviceaccount:mde-sa-test:mde-isolation-operator";

/// Absolute path of a file or directory of the repository.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// What a finished kubectl or helm invocation printed.
struct Out {
    /// The command line, for failure messages.
    cmd: String,
    /// Exit code (`None` when killed by a signal).
    code: Option<i32>,
    /// Standard output, lossily decoded.
    stdout: String,
    /// Standard error, lossily decoded.
    stderr: String,
}

impl Out {
    /// Asserts a zero exit code and returns the output.
    #[track_caller]
    fn ok(self) -> Out {
        assert_eq!(
            self.code,
            Some(0),
            "`{}` failed:\n{}",
            self.cmd,
            self.dump()
        );
        self
    }

    /// Asserts a non-zero exit code (the tool ran and refused) and returns the output.
    #[track_caller]
    fn failed(self) -> Out {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "`{}` should have failed:\n{}",
            self.cmd,
            self.dump()
        );
        self
    }

    /// Exit code and both streams, for failure messages.
    fn dump(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// kubectl and helm with private cache and config directories.
///
/// kubectl caches discovery and OpenAPI per server address under `~/.kube/cache`; harnesses of
/// earlier runs may have listened on the same port with other resources, and concurrent tests
/// would share the files, so each test gets its own cache. Helm likewise gets its own homes so
/// that nothing outside the test's temporary directory is read or written.
struct Tools {
    dir: tempfile::TempDir,
}

impl Tools {
    /// Fresh, empty cache and config directories.
    fn new() -> Tools {
        Tools {
            dir: tempfile::tempdir().expect("tempdir for tool caches"),
        }
    }

    /// Runs `kubectl ARGS` (admin kubeconfig), feeding `stdin` when given.
    async fn kubectl(&self, args: &[&str], stdin: Option<&[u8]>) -> Out {
        let mut cmd = cluster().kubectl();
        cmd.arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"));
        cmd.args(args);
        run(cmd, "kubectl", args, stdin).await
    }

    /// Runs `helm ARGS`, feeding `stdin` when given.
    async fn helm(&self, args: &[&str], stdin: Option<&[u8]>) -> Out {
        let mut cmd = cluster().helm();
        for (var, sub) in [
            ("HELM_CACHE_HOME", "helm-cache"),
            ("HELM_CONFIG_HOME", "helm-config"),
            ("HELM_DATA_HOME", "helm-data"),
        ] {
            cmd.env(var, self.dir.path().join(sub));
        }
        cmd.args(args);
        run(cmd, "helm", args, stdin).await
    }
}

/// Runs a tool without blocking the runtime (the operator and the simulator are separate
/// processes, but the test's own kube client shares these two worker threads), killing it if it
/// outlives [`TOOL_TIMEOUT`].
async fn run(cmd: std::process::Command, tool: &str, args: &[&str], stdin: Option<&[u8]>) -> Out {
    let line = format!("{tool} {}", args.join(" "));
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.current_dir(repo(""))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `{line}`: {e}"));
    // Feed stdin from its own task so that a tool writing before it has read everything can
    // never deadlock against us.
    let feeder = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            let _ = pipe.write_all(&bytes).await;
            // Dropping the pipe closes it: the tool sees end of input.
        })
    });
    let output = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{line}` did not finish within {TOOL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("wait for `{line}`: {e}"));
    if let Some(f) = feeder {
        let _ = f.await;
    }
    Out {
        cmd: line,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A DeviceIsolation manifest as `kubectl apply -f -` takes it. Specs quote machine ids: an
/// all-digit id such as `machine_id(1)` would otherwise be read by YAML as an integer.
fn manifest(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: isolation.mde.dev/v1alpha1\n\
         kind: DeviceIsolation\n\
         metadata:\n  name: {name}\n  annotations:\n    isolation.mde.dev/comment: \"e2e\"\n\
         spec:\n{spec}"
    )
}

/// The header and rows of a `kubectl get` table, each row cut at the header's column starts
/// (kubectl aligns every cell under its header), so that a blank cell, a field the object does
/// not have, reads as "" instead of shifting the cells after it.
fn table(stdout: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = stdout.lines();
    let header = lines.next().unwrap_or_default();
    let bytes = header.as_bytes();
    let starts: Vec<usize> = (0..bytes.len())
        .filter(|&i| bytes[i] != b' ' && (i == 0 || bytes[i - 1] == b' '))
        .collect();
    let cells = |line: &str| -> Vec<String> {
        let cut = |i: usize| i.min(line.len());
        starts
            .iter()
            .enumerate()
            .map(|(k, &start)| {
                let end = starts.get(k + 1).copied().unwrap_or(line.len());
                line.get(cut(start)..cut(end))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .collect()
    };
    (cells(header), lines.map(cells).collect())
}

/// `kubectl apply -f crds/...`, retried when another test's concurrent installation created the
/// CRD between kubectl's read and its create (the only expected failure).
async fn kubectl_apply_crd(tools: &Tools) -> Out {
    let file = repo(&format!("crds/{CRD}.yaml"));
    let file = file.to_str().expect("utf-8 path");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let out = tools.kubectl(&["apply", "-f", file], None).await;
        let raced = out.stderr.contains("AlreadyExists")
            || out.stderr.contains("already exists")
            || out.stderr.contains("the object has been modified");
        if out.code == Some(0) || !raced || attempt == 3 {
            return out.ok();
        }
    }
}

/// `kubectl apply` installs the CRD, it becomes Established, and `kubectl explain` shows the
/// field documentation generated from the Rust types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_installs_with_kubectl_and_explain_documents_the_spec() {
    let tools = Tools::new();
    let out = kubectl_apply_crd(&tools).await;
    assert!(
        out.stdout.contains(&format!(
            "customresourcedefinition.apiextensions.k8s.io/{CRD}"
        )),
        "{}",
        out.dump()
    );
    let out = tools
        .kubectl(
            &[
                "wait",
                "--for=condition=Established",
                &format!("crd/{CRD}"),
                "--timeout=60s",
            ],
            None,
        )
        .await
        .ok();
    assert!(out.stdout.contains("condition met"), "{}", out.dump());

    // The API server publishes a new CRD's OpenAPI schema shortly after it is Established;
    // until then `explain` does not know the resource. Poll until it does, then assert.
    let explain = eventually(
        Duration::from_secs(90),
        "kubectl explain deviceisolation.spec",
        || async {
            let out = tools
                .kubectl(&["explain", "deviceisolation.spec"], None)
                .await;
            if out.code == Some(0) && out.stdout.contains("machineId") {
                Ok(out.stdout)
            } else {
                Err(out.dump())
            }
        },
    )
    .await;
    // kubectl wraps long descriptions: compare with runs of whitespace collapsed.
    let flat = explain.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "GROUP: isolation.mde.dev",
        "KIND: DeviceIsolation",
        "VERSION: v1alpha1",
        "Desired isolation state of one Defender for Endpoint device.",
        // machineId or deviceName: exactly one, by a CEL rule, so neither is -required-.
        "machineId <string>",
        "deviceName <string>",
        "computerDnsName, matched exactly",
        "isolated <boolean> -required-",
        "isolationType <string>",
        "driftPolicy <string>",
        "40 lowercase hexadecimal characters",
        "Immutable",
        "Kind of isolation requested when `isolated` is true",
        "Selective (Outlook, Teams and Skype keep working)",
        "Report (default) records it in status and an event",
        "true isolates the device from the network, false releases it",
    ] {
        assert!(
            flat.contains(needle),
            "explain lacks {needle:?}:\n{explain}"
        );
    }
    // The enum values and defaults are part of the documentation as well.
    let explain_type = tools
        .kubectl(&["explain", "deviceisolation.spec.isolationType"], None)
        .await
        .ok();
    let flat = explain_type
        .stdout
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for needle in [
        "FIELD: isolationType <string>",
        "ENUM: Full Selective UnManagedDevice",
    ] {
        assert!(
            flat.contains(needle),
            "{needle:?}:\n{}",
            explain_type.stdout
        );
    }
}

/// The API server (OpenAPI schema and CEL rule) refuses bad manifests with a message that names
/// the field, and kubectl shows it on stderr with a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_rejects_bad_manifests_naming_the_field() {
    let c = cluster();
    c.install_crds().await;
    let tools = Tools::new();
    let ns = c.namespace("kubectl-invalid").await;
    let apply = |yaml: String| {
        let tools = &tools;
        let ns = ns.clone();
        async move {
            tools
                .kubectl(&["apply", "-n", &ns, "-f", "-"], Some(yaml.as_bytes()))
                .await
        }
    };

    let cases = [
        (
            "short-id",
            "  machineId: XYZ\n  isolated: false\n".to_string(),
            vec![
                "DeviceIsolation \"short-id\" is invalid",
                "spec.machineId",
                "at least 40 chars long",
            ],
        ),
        (
            // The right length, but upper case: only the pattern catches it.
            "upper-id",
            format!(
                "  machineId: \"{}\"\n  isolated: false\n",
                machine_id(0xabc).to_uppercase()
            ),
            vec![
                "DeviceIsolation \"upper-id\" is invalid",
                "spec.machineId",
                "should match '^[0-9a-f]{40}$'",
            ],
        ),
        (
            "bad-type",
            format!(
                "  machineId: \"{}\"\n  isolated: true\n  isolationType: Partial\n",
                machine_id(1)
            ),
            vec![
                "DeviceIsolation \"bad-type\" is invalid",
                "spec.isolationType",
                "Unsupported value: \"Partial\"",
            ],
        ),
        (
            "no-isolated",
            format!("  machineId: \"{}\"\n", machine_id(1)),
            vec![
                "DeviceIsolation \"no-isolated\" is invalid",
                "spec.isolated",
                "Required value",
            ],
        ),
    ];
    for (name, spec, needles) in cases {
        let out = apply(manifest(name, &spec)).await.failed();
        for needle in needles {
            assert!(
                out.stderr.contains(needle),
                "{name}: stderr lacks {needle:?}:\n{}",
                out.dump()
            );
        }
    }

    let good = format!("  machineId: \"{}\"\n  isolated: false\n", machine_id(1));
    let out = apply(manifest("ok", &good)).await.ok();
    assert!(
        out.stdout
            .contains("deviceisolation.isolation.mde.dev/ok created"),
        "{}",
        out.dump()
    );
    // machineId is immutable (CEL `self == oldSelf`): kubectl's patch is refused as a whole.
    let edited = format!("  machineId: \"{}\"\n  isolated: true\n", machine_id(2));
    let out = apply(manifest("ok", &edited)).await.failed();
    for needle in [
        "DeviceIsolation \"ok\" is invalid",
        "spec.machineId",
        "machineId is immutable",
    ] {
        assert!(
            out.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            out.dump()
        );
    }

    // Only the valid resource exists, unchanged.
    let out = tools
        .kubectl(&["get", "di", "-n", &ns, "-o", "name"], None)
        .await
        .ok();
    assert_eq!(
        out.stdout.trim(),
        "deviceisolation.isolation.mde.dev/ok",
        "{}",
        out.dump()
    );
    let out = tools
        .kubectl(
            &[
                "get",
                "di",
                "ok",
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.machineId} {.spec.isolated}",
            ],
            None,
        )
        .await
        .ok();
    assert_eq!(out.stdout, format!("{} false", machine_id(1)));
}

/// One manifest of `examples/`, as the test reads it.
struct Example {
    file: PathBuf,
    name: String,
    machine_id: String,
    isolated: bool,
    isolation_type: Option<String>,
}

/// Every DeviceIsolation in `examples/*.yaml`, sorted by file name.
fn examples() -> Vec<Example> {
    let dir = repo("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("example");
            let doc: serde_yaml::Value =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let field = |path: &[&str]| {
                path.iter()
                    .try_fold(&doc, |v, k| v.get(k))
                    .cloned()
                    .unwrap_or(serde_yaml::Value::Null)
            };
            assert_eq!(
                field(&["kind"]).as_str(),
                Some("DeviceIsolation"),
                "{}",
                file.display()
            );
            Example {
                name: field(&["metadata", "name"])
                    .as_str()
                    .expect("metadata.name")
                    .to_string(),
                machine_id: field(&["spec", "machineId"])
                    .as_str()
                    .expect("spec.machineId")
                    .to_string(),
                isolated: field(&["spec", "isolated"])
                    .as_bool()
                    .expect("spec.isolated"),
                isolation_type: field(&["spec", "isolationType"])
                    .as_str()
                    .map(str::to_string),
                file,
            }
        })
        .collect()
}

/// Simulator calls that name `machine` (its POSTs, and lookups filtered on it).
async fn calls_for(sim: &Sim, machine: &str) -> Vec<Value> {
    sim.admin_calls()
        .await
        .into_iter()
        .filter(|c| {
            let path = c["path"].as_str().unwrap_or("");
            let query = c["query"].as_str().unwrap_or("");
            path.contains(machine) || query.contains(machine)
        })
        .collect()
}

/// Events (events.k8s.io/v1) of namespace `ns` as JSON, read with kubectl.
async fn events(tools: &Tools, ns: &str) -> Result<Vec<Value>, String> {
    let out = tools
        .kubectl(
            &["get", "events.events.k8s.io", "-n", ns, "-o", "json"],
            None,
        )
        .await;
    if out.code != Some(0) {
        return Err(out.dump());
    }
    let list: Value =
        serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.stdout))?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// Waits until the events of `ns` include each `(object name, reason)` pair and returns the
/// matching events.
async fn wait_events(tools: &Tools, ns: &str, wanted: &[(String, &str)]) -> Vec<Value> {
    eventually(Duration::from_secs(60), "the operator's events", || async {
        let items = events(tools, ns).await?;
        let mut found = Vec::new();
        for (name, reason) in wanted {
            match items
                .iter()
                .find(|e| e["regarding"]["name"] == name.as_str() && e["reason"] == *reason)
            {
                Some(e) => found.push(e.clone()),
                None => return Err(format!("no {reason} event for {name} in {items:#?}")),
            }
        }
        Ok(found)
    })
    .await
}

/// The manifests of `examples/` as a user applies them: `kubectl wait` sees Ready, `kubectl get
/// di` shows the printer columns (the desired state, and the device's state once known),
/// `kubectl get events` the operator's events, and each device ends in its manifest's state
/// after one action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_apply_wait_and_show_in_get_and_events() {
    let c = cluster();
    c.install_crds().await;
    let tools = Tools::new();
    let ns = c.namespace("kubectl-examples").await;
    let examples = examples();
    let names: Vec<&str> = examples.iter().map(|e| e.name.as_str()).collect();
    for wanted in ["laptop-042", "workstation-17"] {
        assert!(
            names.contains(&wanted),
            "examples/ lost {wanted}: {names:?}"
        );
    }

    // Every example's machine exists and is online, in the opposite state of its manifest, so
    // that each needs exactly one action (the release example's machine starts isolated).
    let dns: Vec<String> = examples
        .iter()
        .map(|e| format!("{}.contoso.local", e.name))
        .collect();
    let seed: Vec<SeedMachine<'_>> = examples
        .iter()
        .zip(&dns)
        .map(|(e, dns)| SeedMachine {
            id: &e.machine_id,
            name: dns,
            behaviour: "online",
            isolated: !e.isolated,
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = seed_file(dir.path(), &seed);
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", SCALE]);

    let mut args = vec!["apply", "-n", &ns];
    for e in &examples {
        args.extend(["-f", e.file.to_str().expect("utf-8 path")]);
    }
    let out = tools.kubectl(&args, None).await.ok();
    for e in &examples {
        assert!(
            out.stdout.contains(&format!(
                "deviceisolation.isolation.mde.dev/{} created",
                e.name
            )),
            "{}",
            out.dump()
        );
    }

    // The printer columns of the CRD, exactly. Before the operator runs, WANT shows each
    // manifest's desired state while ISOLATED (the device's known state) and every other status
    // column are blank: nothing is known about the devices yet.
    const HEADER: [&str; 8] = [
        "NAME", "MACHINE", "WANT", "ISOLATED", "ACTION", "READY", "REASON", "AGE",
    ];
    let out = tools.kubectl(&["get", "di", "-n", &ns], None).await.ok();
    let (header, rows) = table(&out.stdout);
    assert_eq!(header, HEADER, "{}", out.dump());
    assert_eq!(rows.len(), examples.len(), "{}", out.dump());
    for e in &examples {
        let row = rows
            .iter()
            .find(|r| r[0] == e.name)
            .unwrap_or_else(|| panic!("no row for {}:\n{}", e.name, out.dump()));
        let want = if e.isolated { "true" } else { "false" };
        assert_eq!(
            row[..7],
            [e.name.as_str(), e.machine_id.as_str(), want, "", "", "", ""],
            "{}",
            out.dump()
        );
    }

    let op = Operator::start(&sim, OperatorConfig::new(&c.kubeconfig, &ns));
    let mut args = vec!["wait", "--for=condition=Ready", "-n", &ns, "--timeout=90s"];
    let refs: Vec<String> = examples
        .iter()
        .map(|e| format!("deviceisolation/{}", e.name))
        .collect();
    args.extend(refs.iter().map(String::as_str));
    let out = tools.kubectl(&args, None).await;
    assert_eq!(
        out.code,
        Some(0),
        "kubectl wait failed:\n{}\noperator log tail:\n{}",
        out.dump(),
        op.tail()
    );
    for e in &examples {
        let met = format!("deviceisolation.isolation.mde.dev/{} condition met", e.name);
        assert!(out.stdout.contains(&met), "{}", out.dump());
    }

    // One converged row per example. ISOLATED, blank before the operator ran, now shows the
    // state the operator saw MDE reach, which is WANT's (the released examples' devices started
    // isolated).
    let out = tools.kubectl(&["get", "di", "-n", &ns], None).await.ok();
    let (header, rows) = table(&out.stdout);
    assert_eq!(header, HEADER, "{}", out.dump());
    assert_eq!(rows.len(), examples.len(), "{}", out.dump());
    assert!(
        examples.iter().any(|e| !e.isolated),
        "examples/ lost its released device"
    );
    for e in &examples {
        let row = rows
            .iter()
            .find(|r| r[0] == e.name)
            .unwrap_or_else(|| panic!("no row for {}:\n{}", e.name, out.dump()));
        let (state, reason) = if e.isolated {
            ("true", "Isolated")
        } else {
            ("false", "Released")
        };
        assert_eq!(
            row[..7],
            [
                e.name.as_str(),
                e.machine_id.as_str(),
                state,
                state,
                "Succeeded",
                "True",
                reason
            ],
            "{}",
            out.dump()
        );
        assert!(!row[7].is_empty(), "no AGE for {}:\n{}", e.name, out.dump());
    }

    // The operator's events: one ActionRequested and one Released/Isolated per example,
    // reported by the operator as controller.
    let wanted: Vec<(String, &str)> = examples
        .iter()
        .flat_map(|e| {
            let done = if e.isolated { "Isolated" } else { "Released" };
            [(e.name.clone(), "ActionRequested"), (e.name.clone(), done)]
        })
        .collect();
    for ev in wait_events(&tools, &ns, &wanted).await {
        assert_eq!(
            ev["reportingController"], "mde-isolation-operator",
            "{ev:#}"
        );
        assert_eq!(ev["type"], "Normal", "{ev:#}");
        assert_eq!(ev["regarding"]["kind"], "DeviceIsolation", "{ev:#}");
        assert_eq!(ev["regarding"]["namespace"], ns.as_str(), "{ev:#}");
    }
    // The same events in the core/v1 view that a plain `kubectl get events` shows.
    let out = tools
        .kubectl(&["get", "events", "-n", &ns], None)
        .await
        .ok();
    for e in &examples {
        let done = if e.isolated { "Isolated" } else { "Released" };
        for reason in ["ActionRequested", done] {
            assert!(
                out.stdout
                    .lines()
                    .any(|l| l.contains(reason)
                        && l.contains(&format!("deviceisolation/{}", e.name))),
                "no {reason} line for {}:\n{}",
                e.name,
                out.dump()
            );
        }
    }

    // Ground truth: every device is in its manifest's state after exactly one action, of the
    // manifest's isolation type.
    for e in &examples {
        let truth = sim.ground_truth(&e.machine_id).await;
        assert_eq!(truth["isolated"], e.isolated, "{}: {truth}", e.name);
        let actions = truth["actions"].as_array().expect("actions");
        assert_eq!(actions.len(), 1, "{}: {truth}", e.name);
        let kind = if e.isolated { "Isolate" } else { "Unisolate" };
        assert_eq!(actions[0]["type"], kind, "{}: {truth}", e.name);
        if let Some(t) = &e.isolation_type {
            assert_eq!(actions[0]["scope"], t.as_str(), "{}: {truth}", e.name);
        }
    }
}

/// `helm lint` passes with the required values, rendering without them fails, and what `helm
/// template` renders passes a server-side dry-run apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_chart_lints_and_renders_what_the_server_accepts() {
    let c = cluster();
    c.install_crds().await;
    let tools = Tools::new();
    let chart = repo(CHART);
    let chart = chart.to_str().expect("utf-8 path");

    let mut args = vec!["lint", chart];
    args.extend(CHART_REQUIRED_VALUES);
    let out = tools.helm(&args, None).await.ok();
    assert!(
        out.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{}",
        out.dump()
    );
    // With the values set, lint has nothing to warn about (helm only logs missing `required`
    // values as warnings during lint).
    assert!(
        !out.stderr.contains("missing required values"),
        "{}",
        out.dump()
    );
    // Without them the chart refuses to render, naming the first missing one: the chart's
    // `required` checks really run.
    let out = tools.helm(&["template", "x", chart], None).await.failed();
    assert!(
        out.stderr.contains("mde.tenantId is required"),
        "{}",
        out.dump()
    );

    // Defaults, and a variant that switches on the optional templates the server can validate
    // (ServiceMonitor needs the Prometheus Operator's CRDs, absent here).
    let variants: [(&str, &[&str], &[&str]); 2] = [
        (
            "defaults",
            &[],
            &[
                "serviceaccount/x-mde-isolation-operator",
                "role.rbac.authorization.k8s.io/x-mde-isolation-operator",
                "rolebinding.rbac.authorization.k8s.io/x-mde-isolation-operator",
                "service/x-mde-isolation-operator",
                "deployment.apps/x-mde-isolation-operator",
            ],
        ),
        (
            "leader-election",
            &[
                "--set",
                "leaderElection.enabled=true",
                "--set",
                "replicas=2",
                "--set",
                "strategyType=RollingUpdate",
                "--set",
                "networkPolicy.enabled=true",
                "--set",
                "metrics.scrapeAnnotations=true",
            ],
            &[
                "role.rbac.authorization.k8s.io/x-mde-isolation-operator-leader-election",
                "rolebinding.rbac.authorization.k8s.io/x-mde-isolation-operator-leader-election",
                "networkpolicy.networking.k8s.io/x-mde-isolation-operator",
                "deployment.apps/x-mde-isolation-operator",
            ],
        ),
    ];
    for (variant, extra, expected) in variants {
        let ns = c.namespace(&format!("helm-{variant}")).await;
        let mut args = vec!["template", "x", chart, "-n", &ns];
        args.extend(CHART_REQUIRED_VALUES);
        args.extend(extra);
        let rendered = tools.helm(&args, None).await.ok();
        let out = tools
            .kubectl(
                &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
                Some(rendered.stdout.as_bytes()),
            )
            .await
            .ok();
        for object in expected {
            assert!(
                out.stdout
                    .contains(&format!("{object} created (server dry run)")),
                "{variant}: {object} not accepted:\n{}",
                out.dump()
            );
        }
        // A dry run persists nothing.
        let out = tools
            .kubectl(
                &[
                    "get",
                    "serviceaccounts,roles,rolebindings,services,deployments,networkpolicies",
                    "-n",
                    &ns,
                    "-o",
                    "name",
                ],
                None,
            )
            .await
            .ok();
        assert_eq!(out.stdout.trim(), "", "{variant}: {}", out.dump());
    }
}

/// The chart's ServiceAccount and RBAC objects (and nothing else) for release namespace
/// [`SA_NAMESPACE`], as a YAML stream for `kubectl apply -f -`, with their kinds.
async fn chart_identity_objects(tools: &Tools) -> (String, Vec<String>) {
    let chart = repo(CHART);
    let mut args = vec![
        "template",
        "mde-isolation-operator",
        chart.to_str().expect("utf-8 path"),
        "-n",
        SA_NAMESPACE,
        "--set",
    ];
    let sa_value = format!("serviceAccount.name={SA_NAME}");
    args.push(&sa_value);
    args.extend(CHART_REQUIRED_VALUES);
    let rendered = tools.helm(&args, None).await.ok();
    let mut docs = Vec::new();
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&rendered.stdout) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
            .unwrap_or_else(|e| panic!("helm template output: {e}\n{}", rendered.stdout));
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        if matches!(
            kind.as_str(),
            "ServiceAccount" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
        ) {
            docs.push(serde_yaml::to_string(&value).expect("yaml"));
            kinds.push(kind);
        }
    }
    (docs.join("---\n"), kinds)
}

/// `kubectl auth can-i VERB RESOURCE -n NS [--subresource SUB]` as the operator's
/// ServiceAccount: `true` for "yes", `false` for "no" (anything else fails the test).
async fn sa_can(tools: &Tools, verb: &str, resource: &str, ns: &str, sub: Option<&str>) -> bool {
    let as_user = format!("--as={SA_USER}");
    let mut args = vec!["auth", "can-i", verb, resource, "-n", ns, &as_user];
    if let Some(s) = sub {
        args.extend(["--subresource", s]);
    }
    let out = tools.kubectl(&args, None).await;
    match (out.code, out.stdout.trim()) {
        (Some(0), "yes") => true,
        (Some(1), "no") => false,
        _ => panic!("unexpected can-i answer:\n{}", out.dump()),
    }
}

/// The chart's ServiceAccount, Role and RoleBinding are enough for the operator (list/watch,
/// status patch, events, a set's children), grant nothing more (no Secrets, no set spec writes,
/// no update), and the operator
/// leaves DeviceIsolations of unwatched namespaces alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_under_the_charts_service_account_and_rbac() {
    let c = cluster();
    c.install_crds().await;
    let tools = Tools::new();
    assert_eq!(
        SA_USER,
        format!("system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}")
    );

    // The namespace may exist already when the cluster is shared (MDE_TEST_KUBECONFIG): apply,
    // not create.
    let ns_yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SA_NAMESPACE}\n");
    tools
        .kubectl(&["apply", "-f", "-"], Some(ns_yaml.as_bytes()))
        .await
        .ok();
    let (rbac, mut kinds) = chart_identity_objects(&tools).await;
    kinds.sort();
    // The default chart watches the release namespace with a Role; its one cluster-wide grant is
    // reading the accountability policy and its binding, by name.
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ],
        "{rbac}"
    );
    let out = tools
        .kubectl(&["apply", "-f", "-"], Some(rbac.as_bytes()))
        .await
        .ok();
    assert!(
        out.stdout.contains(&format!("serviceaccount/{SA_NAME} ")),
        "{}",
        out.dump()
    );

    // What the chart grants, and what it does not.
    let policy = "validatingadmissionpolicies.admissionregistration.k8s.io";
    assert!(
        sa_can(
            &tools,
            "get",
            &format!("{policy}/mde-isolation-accountability"),
            SA_NAMESPACE,
            None
        )
        .await
    );
    assert!(
        !sa_can(
            &tools,
            "get",
            &format!("{policy}/another-policy"),
            SA_NAMESPACE,
            None
        )
        .await
    );
    assert!(!sa_can(&tools, "list", policy, SA_NAMESPACE, None).await);
    let other = c.namespace("sa-unwatched").await;
    assert!(!sa_can(&tools, "get", "secrets", SA_NAMESPACE, None).await);
    assert!(!sa_can(&tools, "get", "secrets", &other, None).await);
    assert!(
        !sa_can(
            &tools,
            "update",
            "deviceisolations.isolation.mde.dev",
            SA_NAMESPACE,
            None
        )
        .await
    );
    // Patch and create (server-side apply) and delete: a DeviceIsolationSet's children only; a
    // set's own spec is never written.
    for verb in ["patch", "create", "delete"] {
        assert!(
            sa_can(
                &tools,
                verb,
                "deviceisolations.isolation.mde.dev",
                SA_NAMESPACE,
                None
            )
            .await,
            "{verb} deviceisolations"
        );
    }
    assert!(
        !sa_can(
            &tools,
            "patch",
            "deviceisolationsets.isolation.mde.dev",
            SA_NAMESPACE,
            None
        )
        .await
    );
    for resource in [
        "deviceisolations.isolation.mde.dev",
        "deviceisolationsets.isolation.mde.dev",
    ] {
        assert!(
            sa_can(&tools, "patch", resource, SA_NAMESPACE, Some("status")).await,
            "patch {resource}/status"
        );
        assert!(
            sa_can(&tools, "watch", resource, SA_NAMESPACE, None).await,
            "watch {resource}"
        );
    }
    assert!(
        sa_can(
            &tools,
            "watch",
            "deviceisolations.isolation.mde.dev",
            SA_NAMESPACE,
            None
        )
        .await
    );
    assert!(sa_can(&tools, "create", "events.events.k8s.io", SA_NAMESPACE, None).await);
    assert!(
        !sa_can(
            &tools,
            "list",
            "deviceisolations.isolation.mde.dev",
            &other,
            None
        )
        .await
    );
    assert!(
        !sa_can(
            &tools,
            "patch",
            "deviceisolations.isolation.mde.dev",
            &other,
            Some("status")
        )
        .await
    );

    // Two machines: one managed from the watched namespace, one from a namespace the operator
    // does not watch. Both start isolated, so either resource would need an action.
    let watched_machine = machine_id(0x5a01);
    let unwatched_machine = machine_id(0x5a02);
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = seed_file(
        dir.path(),
        &[
            SeedMachine {
                id: &watched_machine,
                name: "watched.contoso.local",
                behaviour: "online",
                isolated: true,
            },
            SeedMachine {
                id: &unwatched_machine,
                name: "unwatched.contoso.local",
                behaviour: "online",
                isolated: true,
            },
        ],
    );
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", SCALE]);

    // Unique names: repeated runs against a shared cluster must not meet their predecessors.
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let watched = format!("sa-release-{suffix}");
    let unwatched = format!("sa-ignored-{suffix}");
    let spec = |m: &str| format!("  machineId: \"{m}\"\n  isolated: false\n");
    // The unwatched one first, so that it has existed all along when the other becomes Ready.
    tools
        .kubectl(
            &["apply", "-n", &other, "-f", "-"],
            Some(manifest(&unwatched, &spec(&unwatched_machine)).as_bytes()),
        )
        .await
        .ok();

    let sa_kubeconfig = c.service_account_kubeconfig(SA_NAMESPACE, SA_NAME);
    let op = Operator::start(
        &sim,
        OperatorConfig {
            kubeconfig: &sa_kubeconfig,
            namespaces: vec![SA_NAMESPACE.to_string()],
            time_scale: 60.0,
            client_id: common::sim::CLIENT_ID.to_string(),
            extra: vec![],
        },
    );
    tools
        .kubectl(
            &["apply", "-n", SA_NAMESPACE, "-f", "-"],
            Some(manifest(&watched, &spec(&watched_machine)).as_bytes()),
        )
        .await
        .ok();

    let client = c.client().await;
    let ready = wait_ready(&client, SA_NAMESPACE, &watched, &op).await;
    let (_, reason, _) = condition(&ready, "Ready").expect("Ready condition");
    assert_eq!(reason, "Released");
    assert_eq!(sim.ground_truth(&watched_machine).await["isolated"], false);
    // Events need their own RBAC rule; a refused event is only logged by the operator, so
    // look for the events themselves.
    let evs = wait_events(
        &tools,
        SA_NAMESPACE,
        &[
            (watched.clone(), "ActionRequested"),
            (watched.clone(), "Released"),
        ],
    )
    .await;
    for ev in evs {
        assert_eq!(
            ev["reportingController"], "mde-isolation-operator",
            "{ev:#}"
        );
    }

    // Five simulated minutes more (the operator runs at the same scale): long enough for a
    // watch of the other namespace, had there been one, to reconcile and call MDE.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &other);
    let ignored = api.get(&unwatched).await.expect("unwatched resource");
    // Only the CRD's default status (observedGeneration 0), nothing the operator writes.
    let untouched = mde_isolation_operator::crd::DeviceIsolationStatus {
        observed_generation: Some(0),
        ..Default::default()
    };
    assert!(
        ignored.status.as_ref() == Some(&untouched),
        "a resource outside the watched namespaces got a status: {:#?}\noperator log tail:\n{}",
        ignored.status,
        op.tail()
    );
    let calls = calls_for(&sim, &unwatched_machine).await;
    assert!(
        calls.is_empty(),
        "calls for the unwatched machine: {calls:#?}"
    );
    assert_eq!(sim.ground_truth(&unwatched_machine).await["isolated"], true);
    // The operator never hit a permission it lacks: the API server's refusals read
    // `<resource> ... is forbidden: User "system:serviceaccount:..." cannot <verb> ...`.
    let log = op.output();
    assert!(
        !log.contains("is forbidden"),
        "operator log mentions an RBAC refusal:\n{}",
        op.tail()
    );
}
