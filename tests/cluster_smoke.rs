//! Smoke tests of the test control plane itself (tests/common/cluster.rs): the
//! API server answers, namespaces can be made, the kubectl from .tools works,
//! and RBAC is really enforced for the ServiceAccount identity.

mod common;

use std::time::Duration;

use common::cluster::{SA_NAME, SA_NAMESPACE, cluster};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

#[tokio::test]
async fn server_answers_and_namespaces_work() {
    let c = cluster();
    let client = c.client().await;
    let namespaces: Api<Namespace> = Api::all(client);
    let list = namespaces
        .list(&ListParams::default())
        .await
        .expect("list namespaces");
    assert!(
        list.items
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some("default")),
        "the default namespace exists"
    );

    let name = c.namespace("smoke").await;
    assert!(name.starts_with("smoke-"), "{name}");
    let ns = namespaces
        .get(&name)
        .await
        .expect("created namespace can be read");
    assert_eq!(ns.metadata.name.as_deref(), Some(name.as_str()));
}

#[tokio::test]
async fn kubectl_from_tools_reaches_the_server() {
    let c = cluster();
    let name = c.namespace("kubectl").await;
    let out = c
        .kubectl()
        .args(["get", "namespace", &name, "-o", "jsonpath={.metadata.name}"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), name);
}

#[tokio::test]
async fn crds_install_once_and_are_established() {
    let c = cluster();
    // Concurrent callers share one installation.
    tokio::join!(c.install_crds(), c.install_crds());
    c.install_crds().await;

    let crds: Api<CustomResourceDefinition> = Api::all(c.client().await);
    let list = crds.list(&ListParams::default()).await.expect("list CRDs");
    assert!(
        !list.items.is_empty(),
        "crds/*.yaml installed at least one CRD"
    );
    let out = c
        .kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=10s",
        ])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "CRDs not Established: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn service_account_identity_is_subject_to_rbac() {
    let c = cluster();
    let ns = c.namespace("rbac").await;
    let sa_client = c.service_account_client(SA_NAMESPACE, SA_NAME).await;
    let username = format!("system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}");

    // The token authenticates as the ServiceAccount, with its groups.
    let review: Api<SelfSubjectReview> = Api::all(sa_client.clone());
    let me = review
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview as the ServiceAccount");
    let user = me.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(user.username.as_deref(), Some(username.as_str()));
    let groups = user.groups.unwrap_or_default();
    for g in [
        "system:serviceaccounts",
        &format!("system:serviceaccounts:{SA_NAMESPACE}"),
    ] {
        assert!(groups.iter().any(|x| x == g), "group {g} in {groups:?}");
    }

    // Without a binding, reading secrets is forbidden: RBAC is enforced.
    let secrets: Api<Secret> = Api::namespaced(sa_client, &ns);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "expected Forbidden, got {s:?}"),
        other => panic!("listing secrets without RBAC must be forbidden, got {other:?}"),
    }

    // A Role bound to the ServiceAccount grants exactly that.
    let admin = c.client().await;
    let meta = |name: &str| ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    let role = Role {
        metadata: meta("read-secrets"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["list".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("create Role");
    let binding = RoleBinding {
        metadata: meta("read-secrets"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "read-secrets".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: SA_NAME.into(),
            namespace: Some(SA_NAMESPACE.into()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, &ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create RoleBinding");

    // The authorizer reads RBAC objects from an informer: allow it a moment.
    let mut last = None;
    for _ in 0..50 {
        match secrets.list(&ListParams::default()).await {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the RoleBinding never took effect: {last:?}");
}
