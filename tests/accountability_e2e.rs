//! Accountable changes (`policies/accountability.yaml`) against the real kube-apiserver, users
//! impersonated with `kubectl --as`: `isolation.mde.dev/requested-by` must name whoever creates or
//! changes the request, `isolation.mde.dev/approved-by` whoever approves, never the requester, for
//! the generation they saw. Its own test binary: the policy binds cluster-wide.

mod common;

use std::process::Output;
use std::time::Duration;

use common::cluster::{CHART_REQUIRED_VALUES, TestCluster, cluster};
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

/// Applies the policy (after a server-side dry run) and waits until the API server enforces it.
async fn install_policy(c: &TestCluster, ns: &str) {
    let file = repo_file(POLICY_FILE);
    let dry = kubectl(
        c,
        None,
        &["apply", "--server-side", "--dry-run=server", "-f", &file],
        "",
    );
    assert!(ok(&dry), "{}", said(&dry));
    let out = kubectl(c, None, &["apply", "--server-side", "-f", &file], "");
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

    // user-b changing the spec or the comment must take the request over.
    let patch_spec = r#"{"spec":{"isolated":true}}"#;
    let out = kubectl(
        c,
        Some("user-b"),
        &[
            "patch",
            "deviceisolation",
            "release",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            patch_spec,
        ],
        "",
    );
    assert!(!ok(&out), "{}", said(&out));
    let out = kubectl(
        c,
        Some("user-b"),
        &[
            "annotate",
            "deviceisolation",
            "release",
            "-n",
            &ns,
            "--overwrite",
            "isolation.mde.dev/comment=INC-4712",
        ],
        "",
    );
    assert!(!ok(&out), "{}", said(&out));
    // An unrelated label is no change of the request.
    let out = kubectl(
        c,
        Some("user-b"),
        &["label", "deviceisolation", "release", "-n", &ns, "team=soc"],
        "",
    );
    assert!(ok(&out), "{}", said(&out));
    let takeover = r#"{"metadata":{"annotations":{"isolation.mde.dev/requested-by":"user-b"}},"spec":{"isolated":true}}"#;
    let out = kubectl(
        c,
        Some("user-b"),
        &[
            "patch",
            "deviceisolation",
            "release",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            takeover,
        ],
        "",
    );
    assert!(ok(&out), "{}", said(&out));

    // Approval: never by the requester, only by whoever sets it, for the generation seen.
    let approve = |user: &str, approver: &str, generation: &str| {
        kubectl(
            c,
            Some(user),
            &[
                "annotate",
                "deviceisolation",
                "release",
                "-n",
                &ns,
                "--overwrite",
                &format!("isolation.mde.dev/approved-by={approver}"),
                &format!("isolation.mde.dev/approved-generation={generation}"),
            ],
            "",
        )
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
    let chart = repo_file("charts/mde-isolation-operator");
    let out = c
        .helm()
        .args(["template", "soc", &chart, "-n", "secops"])
        .args(CHART_REQUIRED_VALUES)
        .args([
            "--set",
            "admissionPolicy.enabled=true",
            "--show-only",
            "templates/admission-policy.yaml",
        ])
        .output()
        .expect("helm");
    let rendered = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", said(&out));
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
