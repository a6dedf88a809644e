//! MdeConnection and ClusterMdeConnection end to end, against the real kube-apiserver and
//! `mde-sim`: a connection is verified before its resources use it; a wrong Secret stalls its
//! resources (`AuthenticationFailed`) while the operator's own connection serves the others, and
//! fixing the Secret heals them without a restart; a missing connection is `ConnectionNotReady`;
//! a ClusterMdeConnection refuses a namespace outside its selector (`ConnectionNotAllowed`, no
//! call); the API server refuses a second credential and a changed connectionRef.

mod common;

use std::time::Duration;

use common::cluster::{CHART_REQUIRED_VALUES, SA_NAME, SA_NAMESPACE, cluster};
use common::operator::{
    Operator, OperatorConfig, SIM_SECRET, SeedMachine, condition, create, device_isolation,
    machine_id, seed_file, wait_for,
};
use common::poll::eventually;
use common::sim::Sim;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use mde_isolation_operator::crd::connection::ConnectionStatus;
use mde_isolation_operator::crd::{
    ClusterMdeConnection, ConnectionKind, ConnectionRef, DeviceIsolation, MdeConnection,
};
use serde_json::{Value, json};

const SCALE: f64 = 60.0;
const WITHIN: Duration = Duration::from_secs(60);

/// The Secret `name` holding `client-secret`.
async fn put_secret(client: &kube::Client, ns: &str, name: &str, value: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"client-secret": value},
    });
    api.patch(
        name,
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&secret),
    )
    .await
    .unwrap_or_else(|e| panic!("secret {name}: {e}"));
}

/// A connection's spec to `sim` with the credential in Secret `secret`.
fn connection_spec(sim: &Sim, tenant: &str, secret: &str) -> Value {
    json!({
        "tenantId": tenant,
        "clientId": "mde-sim-client",
        "apiUrl": format!("{}/", sim.base_url),
        "authority": format!("{}/", sim.base_url),
        "credential": {"clientSecret": {"name": secret, "key": "client-secret"}},
    })
}

fn with_connection(mut di: DeviceIsolation, kind: ConnectionKind, name: &str) -> DeviceIsolation {
    di.spec.connection_ref = Some(ConnectionRef {
        kind,
        name: name.into(),
    });
    di
}

/// Creates MdeConnection `name` with `spec` where `conns` points.
async fn create_connection(conns: &Api<MdeConnection>, name: impl Into<String>, spec: Value) {
    let conn: MdeConnection = serde_json::from_value(json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "MdeConnection",
        "metadata": {"name": name.into()}, "spec": spec,
    }))
    .unwrap();
    conns.create(&PostParams::default(), &conn).await.unwrap();
}

/// The Ready condition of connection `name` as (status, reason, message).
async fn connection_ready<K>(api: &Api<K>, name: &str) -> Result<(String, String, String), String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let obj = api.get(name).await.map_err(|e| e.to_string())?;
    let obj = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    let ready = obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .ok_or_else(|| format!("no Ready condition: {}", obj["status"]))?;
    let s = |k: &str| ready[k].as_str().unwrap_or_default().to_string();
    Ok((s("status"), s("reason"), s("message")))
}

/// Waits until connection `name`'s Ready condition passes `pred`.
async fn wait_connection<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    pred: impl Fn(&(String, String, String)) -> bool,
) -> (String, String, String)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let pred = &pred;
    eventually(WITHIN, what, || async move {
        let ready = connection_ready(api, name).await?;
        if pred(&ready) {
            Ok(ready)
        } else {
            Err(format!("{ready:?}"))
        }
    })
    .await
}

/// The isolate/unisolate calls on `machine`.
async fn actions_on(sim: &Sim, machine: &str) -> usize {
    sim.admin_calls()
        .await
        .iter()
        .filter(|c| {
            (c["api"] == "unisolate" || c["api"] == "isolate")
                && c["path"].as_str().is_some_and(|p| p.contains(machine))
        })
        .count()
}

/// A simulator whose default tenant holds `ids`, online and isolated.
fn isolated_devices(dir: &std::path::Path, ids: &[&String]) -> Sim {
    let seeds: Vec<SeedMachine> = ids
        .iter()
        .map(|id| SeedMachine {
            id,
            name: "dev",
            behaviour: "online",
            isolated: true,
        })
        .collect();
    let seed = seed_file(dir, &seeds);
    Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"])
}

fn stalled_with(reason: &'static str) -> impl Fn(&DeviceIsolation) -> bool {
    move |di| condition(di, "Stalled").is_some_and(|c| c.0 == "True" && c.1 == reason)
}

fn released(di: &DeviceIsolation) -> bool {
    condition(di, "Ready").is_some_and(|c| c.0 == "True" && c.1 == "Released")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_verified_a_wrong_secret_stalls_only_its_resources_and_a_fix_heals_them() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("connections").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (via_conn, via_flags, via_missing) =
        (machine_id(0xc01), machine_id(0xc02), machine_id(0xc03));
    let sim = isolated_devices(dir.path(), &[&via_conn, &via_flags, &via_missing]);
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.time_scale = SCALE;
    let op = Operator::start(&sim, cfg);

    // A wrong secret first.
    const WRONG: &str = "not-the-secret-7f3a9c";
    put_secret(&client, &ns, "tenant-a-credential", WRONG).await;
    let conns: Api<MdeConnection> = Api::namespaced(client.clone(), &ns);
    create_connection(
        &conns,
        "tenant-a",
        connection_spec(&sim, "tenant-a", "tenant-a-credential"),
    )
    .await;
    let comment = Some("INC-9 false positive");
    let mk = |name: &str, id: &str| device_isolation(name, id, false, comment);
    create(
        &client,
        &ns,
        &with_connection(
            mk("via-conn", &via_conn),
            ConnectionKind::MdeConnection,
            "tenant-a",
        ),
    )
    .await;
    create(&client, &ns, &mk("via-flags", &via_flags)).await;
    create(
        &client,
        &ns,
        &with_connection(
            mk("via-missing", &via_missing),
            ConnectionKind::MdeConnection,
            "nobody",
        ),
    )
    .await;

    let refused = wait_connection(&conns, "tenant-a", "the connection refused", |r| {
        r.1 == "AuthenticationFailed"
    })
    .await;
    assert_eq!(refused.0, "False");
    wait_for(
        &client,
        &ns,
        "via-conn",
        WITHIN,
        &op,
        "AuthenticationFailed",
        stalled_with("AuthenticationFailed"),
    )
    .await;
    let missing = wait_for(
        &client,
        &ns,
        "via-missing",
        WITHIN,
        &op,
        "ConnectionNotReady",
        stalled_with("ConnectionNotReady"),
    )
    .await;
    assert!(
        condition(&missing, "Stalled")
            .unwrap()
            .2
            .contains("MdeConnection"),
        "{:?}",
        condition(&missing, "Stalled")
    );
    // The operator's own connection serves resources without a reference meanwhile.
    wait_for(&client, &ns, "via-flags", WITHIN, &op, "Released", released).await;
    assert_eq!(
        actions_on(&sim, &via_conn).await,
        0,
        "no call through a refused connection"
    );
    assert_eq!(
        actions_on(&sim, &via_missing).await,
        0,
        "no call without a connection"
    );

    // The Secret is fixed: no restart; the connection is verified and its resource goes on.
    put_secret(&client, &ns, "tenant-a-credential", SIM_SECRET).await;
    let ready = wait_connection(&conns, "tenant-a", "the connection Ready", |r| {
        r.0 == "True"
    })
    .await;
    assert_eq!(ready.1, "Connected");
    wait_for(&client, &ns, "via-conn", WITHIN, &op, "Released", released).await;
    assert_eq!(actions_on(&sim, &via_conn).await, 1, "exactly one action");

    // Its status counts its calls and shows the limits; kubectl prints tenant and readiness.
    let status = eventually(
        WITHIN,
        "the connection's status to count its calls",
        || async {
            let status = conns
                .get("tenant-a")
                .await
                .map_err(|e| e.to_string())?
                .status;
            // Written every recheck: wait for one written after the Unisolate.
            let unisolates = |s: &ConnectionStatus| {
                s.quota
                    .iter()
                    .find(|q| q.api == "unisolate")
                    .map_or(0, |q| q.calls_last_hour)
            };
            match status {
                Some(s) if unisolates(&s) >= 2 => Ok(s),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let unisolate = status
        .quota
        .iter()
        .find(|q| q.api == "unisolate")
        .expect("unisolate quota");
    // Its own Unisolate, and the operator's own connection's: one simulated tenant and app here,
    // so the connection's first load recalled that call from MDE's record into its ledger.
    assert_eq!(
        (unisolate.calls_last_hour, unisolate.limit_per_hour),
        (2, 1500)
    );
    assert!(status.calls_last_hour >= Some(3), "{status:?}");
    let out = c
        .kubectl()
        .args(["get", "mdeconnections", "-n", &ns])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("TENANT") && table.contains("CALLS-1H"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("tenant-a") && l.contains("tenant-a") && l.contains("True")),
        "{table}"
    );

    // The missing connection appears: its resource goes on by itself.
    put_secret(&client, &ns, "nobody-credential", SIM_SECRET).await;
    create_connection(
        &conns,
        "nobody",
        connection_spec(&sim, "tenant-a", "nobody-credential"),
    )
    .await;
    wait_for(
        &client,
        &ns,
        "via-missing",
        WITHIN,
        &op,
        "Released",
        released,
    )
    .await;

    // Deleting a connection: its resources say so (a released device stays released).
    conns.delete("nobody", &Default::default()).await.unwrap();
    wait_for(
        &client,
        &ns,
        "via-missing",
        WITHIN,
        &op,
        "ConnectionNotReady after the delete",
        stalled_with("ConnectionNotReady"),
    )
    .await;

    // The connection's transitions are events: refused, then connected.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons = eventually(WITHIN, "the connection's events", || async {
        let list = events
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?;
        let reasons: Vec<String> = list
            .items
            .iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("MdeConnection")
            })
            .filter_map(|e| e.reason.clone())
            .collect();
        if reasons.iter().any(|r| r == "Connected") {
            Ok(reasons)
        } else {
            Err(format!("{reasons:?}"))
        }
    })
    .await;
    assert!(
        reasons.iter().any(|r| r == "AuthenticationFailed"),
        "{reasons:?}"
    );

    // Neither secret value appears in the operator's output.
    let log = op.output();
    assert!(
        !log.contains(WRONG),
        "the wrong secret leaked into the operator's output"
    );
    assert!(
        !log.contains(SIM_SECRET),
        "the secret leaked into the operator's output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_connection_refuses_a_namespace_outside_its_selector() {
    let c = cluster();
    c.install_crds().await;
    let (home, allowed, other) = (
        c.namespace("conn-home").await,
        c.namespace("conn-allowed").await,
        c.namespace("conn-other").await,
    );
    let client = c.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &allowed,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mde.dev/team": "secops"}}})),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (inside, outside) = (machine_id(0xc11), machine_id(0xc12));
    let sim = isolated_devices(dir.path(), &[&inside, &outside]);
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &allowed);
    cfg.namespaces.push(other.clone());
    cfg.time_scale = SCALE;
    cfg.extra = vec!["--cluster-connections".into()];
    // ClusterMdeConnections' Secrets live in the operator's namespace.
    let op = Operator::start_with_credential(
        &sim,
        cfg,
        &[("MDE_CLIENT_SECRET", SIM_SECRET), ("POD_NAMESPACE", &home)],
    );
    put_secret(&client, &home, "shared-credential", SIM_SECRET).await;
    let conns: Api<ClusterMdeConnection> = Api::all(client.clone());
    let name = format!("shared-{home}");
    let mut spec = connection_spec(&sim, "tenant-s", "shared-credential");
    spec["namespaces"] = json!({"selector": {"matchLabels": {"mde.dev/team": "secops"}}});
    let conn: ClusterMdeConnection = serde_json::from_value(json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "ClusterMdeConnection",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    conns.create(&PostParams::default(), &conn).await.unwrap();

    let comment = Some("INC-10");
    let kind = ConnectionKind::ClusterMdeConnection;
    create(
        &client,
        &allowed,
        &with_connection(device_isolation("in", &inside, false, comment), kind, &name),
    )
    .await;
    create(
        &client,
        &other,
        &with_connection(
            device_isolation("out", &outside, false, comment),
            kind,
            &name,
        ),
    )
    .await;
    wait_for(&client, &allowed, "in", WITHIN, &op, "Released", released).await;
    let refused = wait_for(
        &client,
        &other,
        "out",
        WITHIN,
        &op,
        "ConnectionNotAllowed",
        stalled_with("ConnectionNotAllowed"),
    )
    .await;
    assert!(condition(&refused, "Stalled").unwrap().2.contains(&other));
    assert_eq!(
        actions_on(&sim, &outside).await,
        0,
        "no call for a namespace not allowed"
    );
    assert_eq!(actions_on(&sim, &inside).await, 1);
    let _ = conns.delete(&name, &Default::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_two_credentials_and_a_changed_connection_ref() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("conn-cel").await;
    let client = c.client().await;
    let conns: Api<MdeConnection> = Api::namespaced(client.clone(), &ns);
    let two: MdeConnection = serde_json::from_value(json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "MdeConnection",
        "metadata": {"name": "two"},
        "spec": {
            "tenantId": "t", "clientId": "c",
            "credential": {
                "clientSecret": {"name": "s", "key": "k"},
                "workloadIdentity": {},
            },
        },
    }))
    .unwrap();
    let err = conns
        .create(&PostParams::default(), &two)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("exactly one of clientSecret, certificate and workloadIdentity"),
        "{err}"
    );

    let di = with_connection(
        device_isolation("pinned", &machine_id(0xc21), false, Some("x")),
        ConnectionKind::MdeConnection,
        "a",
    );
    create(&client, &ns, &di).await;
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let changed = api
        .patch(
            "pinned",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"connectionRef": {"kind": "MdeConnection", "name": "b"}}}),
            ),
        )
        .await
        .unwrap_err();
    assert!(
        changed.to_string().contains("connectionRef is immutable"),
        "{changed}"
    );
    let dropped = api
        .patch(
            "pinned",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"connectionRef": null}})),
        )
        .await
        .unwrap_err();
    assert!(
        dropped.to_string().contains("connectionRef is immutable"),
        "{dropped}"
    );

    // The examples are accepted as they are.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/connections");
    let out = c
        .kubectl()
        .args(["apply", "--dry-run=server", "-n", &ns, "-f", examples])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = String::from_utf8_lossy(&out.stdout);
    for object in [
        "mdeconnection.isolation.mde.dev/fabrikam",
        "deviceisolation.isolation.mde.dev/fabrikam-laptop-17",
        "clustermdeconnection.isolation.mde.dev/contoso",
    ] {
        assert!(applied.contains(object), "{applied}");
    }
}

/// `kubectl auth can-i` as the chart's ServiceAccount.
fn sa_can(args: &[&str]) -> bool {
    let user = format!("--as=system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}");
    let out = cluster()
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(&user)
        .output()
        .unwrap();
    match (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
    ) {
        (Some(0), "yes") => true,
        (Some(1), "no") => false,
        other => panic!(
            "can-i {args:?}: {other:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The chart with connections (and ClusterMdeConnections) enabled grants what the operator needs
/// to serve both kinds, running as its ServiceAccount, and no Secret beyond `get` in the
/// namespaces named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_serves_connections_under_its_service_account() {
    let c = cluster();
    c.install_crds().await;
    let client = c.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SA_NAMESPACE}});
    namespaces
        .patch(
            SA_NAMESPACE,
            &PatchParams::apply("e2e-test"),
            &Patch::Apply(&ns),
        )
        .await
        .unwrap();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mde-isolation-operator");
    let sa_value = format!("serviceAccount.name={SA_NAME}");
    let out = c
        .helm()
        .args([
            "template",
            "mde-isolation-operator",
            chart,
            "-n",
            SA_NAMESPACE,
        ])
        .args(["--set", &sa_value])
        .args(CHART_REQUIRED_VALUES)
        .args(["--set", "connections.enabled=true"])
        .args(["--set", "connections.cluster.enabled=true"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let mut identity = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        let kind = value["kind"].as_str().unwrap_or_default();
        if matches!(
            kind,
            "ServiceAccount" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
        ) {
            identity.push(serde_yaml::to_string(&value).unwrap());
        }
        if kind == "Deployment" {
            let env = &value["spec"]["template"]["spec"]["containers"][0]["env"];
            let names: Vec<&str> = env
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|e| e["name"].as_str())
                .collect();
            assert!(names.contains(&"MDE_CLUSTER_CONNECTIONS"), "{names:?}");
        }
    }
    let mut apply = c.kubectl();
    apply
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = apply.spawn().unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(identity.join("---\n").as_bytes())
            .unwrap();
    }
    let applied = child.wait_with_output().unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // What the chart grants, and what it does not.
    let other = c.namespace("conn-rbac-other").await;
    assert!(sa_can(&["get", "secrets", "-n", SA_NAMESPACE]));
    assert!(!sa_can(&["list", "secrets", "-n", SA_NAMESPACE]));
    assert!(!sa_can(&["watch", "secrets", "-n", SA_NAMESPACE]));
    assert!(!sa_can(&["get", "secrets", "-n", &other]));
    assert!(sa_can(&[
        "watch",
        "mdeconnections.isolation.mde.dev",
        "-n",
        SA_NAMESPACE
    ]));
    assert!(sa_can(&[
        "patch",
        "mdeconnections.isolation.mde.dev",
        "-n",
        SA_NAMESPACE,
        "--subresource",
        "status"
    ]));
    assert!(!sa_can(&[
        "patch",
        "mdeconnections.isolation.mde.dev",
        "-n",
        SA_NAMESPACE
    ]));
    assert!(sa_can(&[
        "watch",
        "clustermdeconnections.isolation.mde.dev"
    ]));
    assert!(sa_can(&["list", "namespaces"]));

    // Both kinds serve a resource, the operator running as the ServiceAccount.
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (machine_id(0xc31), machine_id(0xc32));
    let sim = isolated_devices(dir.path(), &[&one, &two]);
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    put_secret(&client, SA_NAMESPACE, "mde-conn", SIM_SECRET).await;
    let conns: Api<MdeConnection> = Api::namespaced(client.clone(), SA_NAMESPACE);
    create_connection(
        &conns,
        format!("own-{suffix}"),
        connection_spec(&sim, "tenant-o", "mde-conn"),
    )
    .await;
    let cluster_conns: Api<ClusterMdeConnection> = Api::all(client.clone());
    let mut spec = connection_spec(&sim, "tenant-c", "mde-conn");
    spec["namespaces"] = json!({"names": [SA_NAMESPACE]});
    let shared: ClusterMdeConnection = serde_json::from_value(json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "ClusterMdeConnection",
        "metadata": {"name": format!("shared-{suffix}")},
        "spec": spec,
    }))
    .unwrap();
    cluster_conns
        .create(&PostParams::default(), &shared)
        .await
        .unwrap();
    let sa_kubeconfig = c.service_account_kubeconfig(SA_NAMESPACE, SA_NAME);
    let mut cfg = OperatorConfig::new(&sa_kubeconfig, SA_NAMESPACE);
    cfg.time_scale = SCALE;
    cfg.extra = vec!["--cluster-connections".into()];
    let op = Operator::start_with_credential(
        &sim,
        cfg,
        &[
            ("MDE_CLIENT_SECRET", SIM_SECRET),
            ("POD_NAMESPACE", SA_NAMESPACE),
        ],
    );
    let comment = Some("INC-11");
    let (a, b) = (format!("via-own-{suffix}"), format!("via-shared-{suffix}"));
    create(
        &client,
        SA_NAMESPACE,
        &with_connection(
            device_isolation(&a, &one, false, comment),
            ConnectionKind::MdeConnection,
            &format!("own-{suffix}"),
        ),
    )
    .await;
    create(
        &client,
        SA_NAMESPACE,
        &with_connection(
            device_isolation(&b, &two, false, comment),
            ConnectionKind::ClusterMdeConnection,
            &format!("shared-{suffix}"),
        ),
    )
    .await;
    wait_for(&client, SA_NAMESPACE, &a, WITHIN, &op, "Released", released).await;
    wait_for(&client, SA_NAMESPACE, &b, WITHIN, &op, "Released", released).await;
    let log = op.output();
    assert!(
        !log.contains("is forbidden"),
        "a request was forbidden:\n{}",
        op.tail()
    );
    let _ = cluster_conns
        .delete(&format!("shared-{suffix}"), &Default::default())
        .await;
}

/// A DeviceIsolationSet selects and acts through its connection: the tenant's tagged devices are
/// released, the same tag in the operator's own tenant is not touched, and each child carries
/// the set's connectionRef. An app without the read permission makes its connection Forbidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_selects_and_releases_in_its_connections_tenant_only() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("conn-set").await;
    let client = c.client().await;
    let tagged = |base: u32| -> Vec<Value> {
        (0..3)
            .map(|i| {
                json!({"id": machine_id(base + i), "computerDnsName": format!("t{i}.local"),
                       "behaviour": "online", "isolated": true, "machineTags": ["incident-88"]})
            })
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.yaml");
    let app = |id: &str, roles: &[&str]| json!({"clientId": id, "clientSecret": "s3cret", "roles": roles});
    std::fs::write(
        &seed,
        json!({
            "machines": tagged(0xd00),
            "tenants": [
                {"tenantId": "woodgrove.example", "machines": tagged(0xe00),
                 "apps": [app("app-w", &["Machine.Isolate", "Machine.Read.All"])]},
                {"tenantId": "blind.example", "apps": [app("app-b", &["Machine.Isolate"])]},
            ],
        })
        .to_string(),
    )
    .unwrap();
    let sim = Sim::start(&["--seed", seed.to_str().unwrap(), "--time-scale", "60"]);
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.time_scale = SCALE;
    let op = Operator::start(&sim, cfg);
    put_secret(&client, &ns, "app-secret", "s3cret").await;
    let conns: Api<MdeConnection> = Api::namespaced(client.clone(), &ns);
    for (name, tenant, app) in [
        ("woodgrove", "woodgrove.example", "app-w"),
        ("blind", "blind.example", "app-b"),
    ] {
        let mut spec = connection_spec(&sim, tenant, "app-secret");
        spec["clientId"] = app.into();
        create_connection(&conns, name, spec).await;
    }
    let sets: Api<mde_isolation_operator::crd::DeviceIsolationSet> =
        Api::namespaced(client.clone(), &ns);
    let set = json!({
        "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "DeviceIsolationSet",
        "metadata": {"name": "release-88",
                     "annotations": {"isolation.mde.dev/comment": "INC-88 false positive"}},
        "spec": {"isolated": false, "selector": {"machineTags": ["incident-88"]},
                 "connectionRef": {"kind": "MdeConnection", "name": "woodgrove"}},
    });
    sets.patch(
        "release-88",
        &PatchParams::apply("e2e-test"),
        &Patch::Apply(&set),
    )
    .await
    .unwrap();
    eventually(WITHIN, "the set Converged", || async {
        let set = sets.get("release-88").await.map_err(|e| e.to_string())?;
        let status = set.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status.clone(), c.reason.clone()));
        match ready {
            Some((s, r)) if s == "True" && r == "Converged" => Ok(()),
            other => Err(format!("{other:?} {:?}", status.devices)),
        }
    })
    .await;
    for i in 0..3 {
        let truth = sim
            .ground_truth_in("woodgrove.example", &machine_id(0xe00 + i))
            .await;
        assert_eq!(truth["isolated"], false, "{truth}");
        let own = sim.ground_truth(&machine_id(0xd00 + i)).await;
        assert_eq!(
            own["isolated"], true,
            "the operator's own tenant was touched: {own}"
        );
    }
    let children: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let list = children.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 3);
    for child in &list.items {
        assert_eq!(
            child.spec.connection_ref,
            Some(ConnectionRef {
                kind: ConnectionKind::MdeConnection,
                name: "woodgrove".into()
            })
        );
    }
    // No read permission: the connection says which permission is missing.
    let forbidden = wait_connection(&conns, "blind", "the connection Forbidden", |r| {
        r.1 == "Forbidden"
    })
    .await;
    assert!(
        forbidden
            .2
            .contains("lacks the Machine.Read.All application permission"),
        "{forbidden:?}"
    );
    drop(op);
}

/// A certificate credential from a `kubernetes.io/tls` Secret: the connection signs its client
/// assertions with it, and the key appears nowhere in the operator's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_signs_in_with_the_certificate_of_a_tls_secret() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("conn-cert").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("app.crt"), dir.path().join("app.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=mde-conn", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("the openssl command is needed to make an RSA test certificate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (crt_pem, key_pem) = (
        std::fs::read_to_string(&crt).unwrap(),
        std::fs::read_to_string(&key).unwrap(),
    );
    let machine = machine_id(0xc41);
    let sim = isolated_devices(dir.path(), &[]);
    sim.put_tenant(json!({
        "tenantId": "certs.example",
        "apps": [{"clientId": "app-cert", "certificates": [crt_pem],
                  "roles": ["Machine.Isolate", "Machine.Read.All"]}],
        "machines": [{"id": machine, "computerDnsName": "c.local", "behaviour": "online",
                      "isolated": true}],
    }))
    .await;
    let mut cfg = OperatorConfig::new(&c.kubeconfig, &ns);
    cfg.time_scale = SCALE;
    let op = Operator::start(&sim, cfg);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let tls = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "app-cert"},
        "stringData": {"tls.crt": crt_pem, "tls.key": key_pem}});
    secrets
        .patch(
            "app-cert",
            &PatchParams::apply("e2e-test"),
            &Patch::Apply(&tls),
        )
        .await
        .unwrap();
    let mut spec = connection_spec(&sim, "certs.example", "unused");
    spec["clientId"] = "app-cert".into();
    spec["credential"] = json!({"certificate": {"secretName": "app-cert"}});
    let conns: Api<MdeConnection> = Api::namespaced(client.clone(), &ns);
    create_connection(&conns, "certs", spec).await;
    create(
        &client,
        &ns,
        &with_connection(
            device_isolation("by-cert", &machine, false, Some("INC-12")),
            ConnectionKind::MdeConnection,
            "certs",
        ),
    )
    .await;
    wait_for(&client, &ns, "by-cert", WITHIN, &op, "Released", released).await;
    let tokens: Vec<Value> = sim
        .admin_calls_in("certs.example")
        .await
        .into_iter()
        .filter(|c| c["api"] == "token")
        .collect();
    assert!(!tokens.is_empty());
    assert!(
        tokens.iter().all(|t| t["credential"]
            .as_str()
            .is_some_and(|c| c.starts_with("certificate:"))),
        "{tokens:?}"
    );
    let log = op.output();
    assert!(
        !log.contains("PRIVATE KEY") && !log.contains("eyJ"),
        "key or assertion logged"
    );
}
