//! Accountable changes (`policies/accountability.yaml`) against the real kube-apiserver, users
//! impersonated with `kubectl --as`: `isolation.mde.dev/requested-by` must name whoever creates or
//! changes the request, `isolation.mde.dev/approved-by` whoever approves, never the requester, for
//! the generation they saw. Its own test binary: the policy binds cluster-wide.

mod common;

use std::process::Output;
use std::time::Duration;

use common::cluster::{CHART_REQUIRED_VALUES, SA_NAME, SA_NAMESPACE, TestCluster, cluster};
use common::poll::eventually;

const POLICY_FILE: &str = "policies/accountability.yaml";
const MACHINE: &str = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";

fn repo_file(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl ARGS` as `user` (`None`: the admin), feeding `stdin`.
fn kubectl(c: &TestCluster, user: Option<&str>, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut cmd = c.kubectl();
    if let Some(user) = user {
        cmd.args(["--as", user]);
    }
    let mut child = cmd
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().expect("kubectl output")
}

fn ok(out: &Output) -> bool {
    out.status.success()
}

/// Asserts that kubectl was refused with a message containing `why`.
fn refused(out: &Output, why: &str) {
    assert!(!ok(out) && said(out).contains(why), "{}", said(out));
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Users a and b may create and edit DeviceIsolations and sets anywhere.
fn grant_users(c: &TestCluster) {
    let rbac = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: accountability-test-editor}
rules:
  - apiGroups: [isolation.mde.dev]
    resources: [deviceisolations, deviceisolationsets]
    verbs: [get, list, create, update, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: accountability-test-editor}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: accountability-test-editor}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: user-a}
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: user-b}
"#;
    let out = kubectl(c, None, &["apply", "--server-side", "-f", "-"], rbac);
    assert!(ok(&out), "{}", said(&out));
}

fn device_isolation(ns: &str, name: &str, requested_by: &str, comment: &str) -> String {
    format!(
        r#"
apiVersion: isolation.mde.dev/v1alpha1
kind: DeviceIsolation
metadata:
  name: {name}
  namespace: {ns}
  annotations:
    isolation.mde.dev/comment: "{comment}"
    isolation.mde.dev/requested-by: {requested_by}
spec:
  machineId: "{MACHINE}"
  isolated: false
"#
    )
}

/// The chart's policy template for a release `soc` in `namespace` whose ServiceAccount is `sa`.
fn chart_policy(c: &TestCluster, namespace: &str, sa: &str) -> String {
    let chart = repo_file("charts/mde-isolation-operator");
    let out = c
        .helm()
        .args(["template", "soc", &chart, "-n", namespace])
        .args(CHART_REQUIRED_VALUES)
        .args([
            "--set",
            "admissionPolicy.enabled=true",
            "--set",
            &format!("serviceAccount.name={sa}"),
            "--show-only",
            "templates/admission-policy.yaml",
        ])
        .output()
        .expect("helm");
    assert!(out.status.success(), "{}", said(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Installs the policy as the chart does for the harness's ServiceAccount (the identity the
/// operator runs as where it creates a set's children), after a server-side dry run of the
/// committed file, and waits until the API server enforces it.
async fn install_policy(c: &TestCluster, ns: &str) {
    let file = repo_file(POLICY_FILE);
    let dry = kubectl(
        c,
        None,
        &["apply", "--server-side", "--dry-run=server", "-f", &file],
        "",
    );
    assert!(ok(&dry), "{}", said(&dry));
    let rendered = chart_policy(c, SA_NAMESPACE, SA_NAME);
    let out = kubectl(c, None, &["apply", "--server-side", "-f", "-"], &rendered);
    assert!(ok(&out), "{}", said(&out));
    // The API server loads a new policy within a few seconds: until then a lie is admitted.
    let probe = device_isolation(ns, "probe", "user-b", "probe");
    eventually(Duration::from_secs(60), "the policy enforced", || {
        let out = kubectl(
            c,
            Some("user-a"),
            &["create", "--dry-run=server", "-f", "-"],
            &probe,
        );
        async move { if ok(&out) { Err(said(&out)) } else { Ok(()) } }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_by_and_approved_by_must_name_who_asks() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("accountable").await;
    grant_users(c);
    install_policy(c, &ns).await;

    // user-a cannot name user-b as the requester; naming itself is admitted.
    let lie = kubectl(
        c,
        Some("user-a"),
        &["create", "-f", "-"],
        &device_isolation(&ns, "release", "user-b", "INC-4711"),
    );
    refused(
        &lie,
        "isolation.mde.dev/requested-by must name you (user-a)",
    );
    let truth = kubectl(
        c,
        Some("user-a"),
        &["create", "-f", "-"],
        &device_isolation(&ns, "release", "user-a", "INC-4711"),
    );
    assert!(ok(&truth), "{}", said(&truth));

    // `kubectl VERB deviceisolation release -n NS ARGS` as `user`.
    let on_release = |user: &str, verb: &str, args: &[&str]| {
        let mut all = vec![verb, "deviceisolation", "release", "-n", &ns];
        all.extend(args);
        kubectl(c, Some(user), &all, "")
    };
    let merge = |patch: &'static str| ["--type=merge", "-p", patch];

    // user-b changing the spec or the comment must take the request over.
    let spec = merge(r#"{"spec":{"isolated":true}}"#);
    refused(
        &on_release("user-b", "patch", &spec),
        "requested-by must name you (user-b)",
    );
    let comment = ["--overwrite", "isolation.mde.dev/comment=INC-4712"];
    refused(
        &on_release("user-b", "annotate", &comment),
        "requested-by must name you (user-b)",
    );
    // An unrelated label is no change of the request.
    let out = on_release("user-b", "label", &["team=soc"]);
    assert!(ok(&out), "{}", said(&out));
    let takeover = merge(
        r#"{"metadata":{"annotations":{"isolation.mde.dev/requested-by":"user-b"}},"spec":{"isolated":true}}"#,
    );
    let out = on_release("user-b", "patch", &takeover);
    assert!(ok(&out), "{}", said(&out));

    // Approval: never by the requester, only by whoever sets it, for the generation seen.
    let approve = |user: &str, approver: &str, generation: &str| {
        let by = format!("isolation.mde.dev/approved-by={approver}");
        let at = format!("isolation.mde.dev/approved-generation={generation}");
        on_release(user, "annotate", &["--overwrite", &by, &at])
    };
    refused(
        &approve("user-b", "user-b", "2"),
        "cannot approve their own change",
    );
    refused(
        &approve("user-a", "user-c", "2"),
        "approved-by must name you (user-a)",
    );
    refused(
        &approve("user-a", "user-a", "1"),
        "approved-generation must be the generation you approve (2)",
    );
    let approved = approve("user-a", "user-a", "2");
    assert!(ok(&approved), "{}", said(&approved));
}

#[test]
fn the_charts_policy_is_the_committed_policy() {
    let chart = std::fs::read_to_string(repo_file(
        "charts/mde-isolation-operator/policies/accountability.yaml",
    ))
    .unwrap();
    let committed = std::fs::read_to_string(repo_file(POLICY_FILE)).unwrap();
    assert!(
        chart == committed,
        "charts/mde-isolation-operator/policies/accountability.yaml drifted: run `make crd`"
    );
}

/// The chart with `admissionPolicy.enabled=true` renders the policy for its own ServiceAccount,
/// and the API server accepts what it renders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_the_policy_for_its_own_service_account() {
    let c = cluster();
    let rendered = chart_policy(c, "secops", "soc-mde-isolation-operator");
    assert!(
        rendered.contains(
            "request.userInfo.username != 'system:serviceaccount:secops:soc-mde-isolation-operator'"
        ),
        "{rendered}"
    );
    for kind in [
        "kind: ValidatingAdmissionPolicy\n",
        "kind: ValidatingAdmissionPolicyBinding\n",
        "kind: ClusterRole\n",
        "kind: ClusterRoleBinding\n",
    ] {
        assert!(rendered.contains(kind), "no {kind}in {rendered}");
    }
    let dry = kubectl(
        c,
        None,
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        &rendered,
    );
    assert!(ok(&dry), "{}", said(&dry));
}

/// With the policy enforced, the operator passes who asked on to MDE as verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mde_comment_names_the_verified_requester() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("accountable-run").await;
    grant_users(c);
    install_policy(c, &ns).await;
    let dir = tempfile::tempdir().unwrap();
    let seed = common::operator::seed_file(
        dir.path(),
        &[common::operator::SeedMachine {
            id: MACHINE,
            name: "laptop-042.contoso.local",
            behaviour: "online",
            isolated: true,
        }],
    );
    let sim = common::sim::Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let op = common::operator::Operator::start(
        &sim,
        common::operator::OperatorConfig::new(&c.kubeconfig, &ns),
    );
    let out = kubectl(
        c,
        Some("user-a"),
        &["create", "-f", "-"],
        &device_isolation(&ns, "release", "user-a", "INC-4711"),
    );
    assert!(ok(&out), "{}", said(&out));
    common::operator::wait_ready(&c.client().await, &ns, "release", &op).await;
    let truth = sim.ground_truth(MACHINE).await;
    let comment = truth["actions"][0]["requestorComment"].as_str().unwrap();
    assert!(
        comment.starts_with("INC-4711 requested-by=user-a [mde-isolation-operator "),
        "{comment}"
    );
    assert!(
        op.output()
            .contains("requested-by is enforced by the admission policy"),
        "{}",
        op.tail()
    );
}

/// The operator as the harness's ServiceAccount (the policy exempts it), allowed everything.
fn operator_identity(c: &TestCluster) -> std::path::PathBuf {
    let binding = format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: accountability-test-operator}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}
subjects:
  - {{kind: ServiceAccount, name: {SA_NAME}, namespace: {SA_NAMESPACE}}}
"#
    );
    let out = kubectl(c, None, &["apply", "--server-side", "-f", "-"], &binding);
    assert!(ok(&out), "{}", said(&out));
    c.service_account_kubeconfig(SA_NAMESPACE, SA_NAME)
}

/// The two-person rule: a set of 150 devices over a threshold of 100 requests nothing until a
/// second person approves; the requester cannot; a spec change needs a new approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_set_waits_for_a_second_person_and_a_spec_change_needs_a_new_approval() {
    use mde_isolation_operator::crd::DeviceIsolationSet;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("approval").await;
    grant_users(c);
    install_policy(c, &ns).await;
    let kubeconfig = operator_identity(c);
    let dir = tempfile::tempdir().unwrap();
    let mut seed = String::from("machines:\n");
    for i in 0..150u32 {
        seed.push_str(&format!(
            "- {{id: '{}', computerDnsName: big-{i}, behaviour: online, isolated: true, \
             machineTags: [big]}}\n",
            common::operator::machine_id(0x9000 + i)
        ));
    }
    let seed_path = dir.path().join("seed.yaml");
    std::fs::write(&seed_path, seed).unwrap();
    let sim = common::sim::Sim::start(&[
        "--seed",
        seed_path.to_str().unwrap(),
        "--time-scale",
        "60",
        "--duplicate-mode",
        "allow",
    ]);
    let mut cfg = common::operator::OperatorConfig::new(&kubeconfig, &ns);
    cfg.extra = vec!["--approval-threshold".into(), "100".into()];
    let op = common::operator::Operator::start(&sim, cfg);

    let set = format!(
        r#"
apiVersion: isolation.mde.dev/v1alpha1
kind: DeviceIsolationSet
metadata:
  name: big
  namespace: {ns}
  annotations:
    isolation.mde.dev/comment: "False positive, rule 77 (INC-4711)"
    isolation.mde.dev/requested-by: user-a
spec:
  isolated: false
  maxDevices: 200
  selector: {{machineTags: [big]}}
"#
    );
    let out = kubectl(c, Some("user-a"), &["create", "-f", "-"], &set);
    assert!(ok(&out), "{}", said(&out));
    let api: kube::Api<DeviceIsolationSet> = kube::Api::namespaced(c.client().await, &ns);
    let reason_is = |want: &'static str| {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move {
                let set = api.get("big").await.map_err(|e| e.to_string())?;
                let ready = set
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
                match ready {
                    Some(r) if r.reason == want => Ok(r.message),
                    other => Err(format!("{other:?}")),
                }
            }
        }
    };
    let waiting = eventually(
        Duration::from_secs(60),
        "AwaitingApproval",
        reason_is("AwaitingApproval"),
    )
    .await;
    assert!(waiting.contains("150 devices selected"), "{waiting}");
    let mutating = |calls: Vec<serde_json::Value>| {
        calls
            .iter()
            .filter(|c| c["api"] == "unisolate" || c["api"] == "isolate")
            .count()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mutating(sim.admin_calls().await), 0, "{}", op.tail());

    let approve = |user: &str, generation: &str| {
        kubectl(
            c,
            Some(user),
            &[
                "annotate",
                "dis",
                "big",
                "-n",
                &ns,
                "--overwrite",
                &format!("isolation.mde.dev/approved-by={user}"),
                &format!("isolation.mde.dev/approved-generation={generation}"),
            ],
            "",
        )
    };
    refused(&approve("user-a", "1"), "cannot approve their own change");
    let out = approve("user-b", "1");
    assert!(ok(&out), "{}", said(&out));
    eventually(
        Duration::from_secs(120),
        "Converged",
        reason_is("Converged"),
    )
    .await;
    assert_eq!(mutating(sim.admin_calls().await), 150);

    // A spec change by the requester: the approval was for generation 1.
    let out = kubectl(
        c,
        Some("user-a"),
        &[
            "patch",
            "dis",
            "big",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"rollout":{"maxFailures":1}}}"#,
        ],
        "",
    );
    assert!(ok(&out), "{}", said(&out));
    let again = eventually(
        Duration::from_secs(60),
        "AwaitingApproval again",
        reason_is("AwaitingApproval"),
    )
    .await;
    assert!(again.contains("generation 2"), "{again}");
    let out = approve("user-b", "2");
    assert!(ok(&out), "{}", said(&out));
    eventually(
        Duration::from_secs(60),
        "Converged again",
        reason_is("Converged"),
    )
    .await;
    assert_eq!(mutating(sim.admin_calls().await), 150, "no second action");
    let truth = sim
        .ground_truth(&common::operator::machine_id(0x9000))
        .await;
    let released_by = truth["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"] == "Unisolate")
        .filter_map(|a| a["requestorComment"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(released_by.len(), 1, "{truth}");
    // The children carry the set's requester; the approval is the set's (its Approved event).
    assert!(released_by[0].contains("requested-by=user-a ["), "{truth}");
}
