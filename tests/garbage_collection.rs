//! The test control plane runs Kubernetes' own garbage collector (tests/control-plane): deleting
//! an owner deletes the objects whose `ownerReferences` name it, in the background and in the
//! foreground cascade, also for a CRD installed after the control plane started. Nothing here
//! deletes a dependent itself; the collector does.

mod common;

use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::operator::{create, device_isolation, machine_id};
use common::poll::eventually;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use mde_isolation_operator::crd::DeviceIsolation;

/// How long the collector may take: its discovery resync (2 s) plus the cascade.
const CASCADE_TIMEOUT: Duration = Duration::from_secs(30);

/// A finalizer of this test, to hold a dependent in `Terminating`.
const HOLD: &str = "mde.dev/test-hold";

/// A controller reference to `owner`, blocking its foreground deletion.
fn controller_ref(owner: &DeviceIsolation) -> OwnerReference {
    OwnerReference {
        api_version: DeviceIsolation::api_version(&()).into_owned(),
        kind: DeviceIsolation::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().expect("created owner has a uid"),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Creates an owner DeviceIsolation and two dependents: a ConfigMap (built-in type) and a
/// DeviceIsolation (the CRD's type), each with a controller reference to the owner.
async fn owner_with_dependents(
    client: &Client,
    ns: &str,
    name: &str,
    n: u32,
    finalizers: Option<Vec<String>>,
) -> (DeviceIsolation, ConfigMap, DeviceIsolation) {
    let owner = create(
        client,
        ns,
        &device_isolation(name, &machine_id(n), true, None),
    )
    .await;
    let meta = |child: &str| ObjectMeta {
        name: Some(format!("{name}-{child}")),
        owner_references: Some(vec![controller_ref(&owner)]),
        finalizers: finalizers.clone(),
        ..Default::default()
    };
    let cm = ConfigMap {
        metadata: meta("cm"),
        ..Default::default()
    };
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await
        .expect("create dependent ConfigMap");
    let mut di = device_isolation("", &machine_id(n + 1), true, None);
    di.metadata = meta("di");
    let di = create(client, ns, &di).await;
    (owner, cm, di)
}

/// `Ok` once `name` is gone (404), else what is there.
async fn gone<K>(api: &Api<K>, name: &str) -> Result<(), String>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(None) => Ok(()),
        Ok(Some(o)) => Err(format!(
            "{name} still there: deletionTimestamp {:?}, finalizers {:?}",
            o.meta().deletion_timestamp,
            o.meta().finalizers
        )),
        Err(e) => Err(format!("get {name}: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_deletion_of_the_owner_deletes_its_dependents() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("gc-background").await;
    let client = c.client().await;
    let dis: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let (owner, cm, di) = owner_with_dependents(&client, &ns, "owner-bg", 0x6c1, None).await;

    let start = Instant::now();
    // The default propagation of a custom resource is background: the owner goes at once,
    // the collector deletes the dependents afterwards.
    dis.delete(&owner.name_any(), &DeleteParams::default())
        .await
        .expect("delete owner");
    eventually(CASCADE_TIMEOUT, "the owner to be gone", || {
        gone(&dis, "owner-bg")
    })
    .await;
    eventually(
        CASCADE_TIMEOUT,
        "the collector to delete the ConfigMap",
        || gone(&cms, cm.metadata.name.as_deref().unwrap()),
    )
    .await;
    eventually(
        CASCADE_TIMEOUT,
        "the collector to delete the dependent DeviceIsolation",
        || gone(&dis, di.metadata.name.as_deref().unwrap()),
    )
    .await;
    eprintln!(
        "background cascade: dependents gone {:?} after the owner's deletion",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_waits_for_the_dependents() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("gc-foreground").await;
    let client = c.client().await;
    let dis: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    // The dependents carry a finalizer of the test, so the ordering is observable: the owner
    // must wait while they are Terminating.
    let (owner, cm, di) =
        owner_with_dependents(&client, &ns, "owner-fg", 0x6c3, Some(vec![HOLD.into()])).await;
    let cm_name = cm.metadata.name.clone().unwrap();
    let di_name = di.metadata.name.clone().unwrap();

    let start = Instant::now();
    dis.delete(&owner.name_any(), &DeleteParams::foreground())
        .await
        .expect("delete owner");
    let o = dis.get(&owner.name_any()).await.expect("owner still there");
    assert!(
        o.metadata.deletion_timestamp.is_some()
            && o.finalizers().iter().any(|f| f == "foregroundDeletion"),
        "a foreground deletion marks the owner: {:?}",
        o.metadata
    );

    // The collector deletes the dependents (they stay Terminating on the test's finalizer).
    eventually(
        CASCADE_TIMEOUT,
        "the collector to delete the dependents",
        || async {
            let cm = cms.get(&cm_name).await.map_err(|e| e.to_string())?;
            let di = dis.get(&di_name).await.map_err(|e| e.to_string())?;
            match (
                &cm.metadata.deletion_timestamp,
                &di.metadata.deletion_timestamp,
            ) {
                (Some(_), Some(_)) => Ok(()),
                _ => Err(format!(
                    "ConfigMap {:?}, DeviceIsolation {:?}",
                    cm.metadata.deletion_timestamp, di.metadata.deletion_timestamp
                )),
            }
        },
    )
    .await;
    let marked = start.elapsed();
    // ... and the owner waits for them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let o = dis
        .get(&owner.name_any())
        .await
        .expect("the owner waits for its dependents");
    assert!(
        o.finalizers().iter().any(|f| f == "foregroundDeletion"),
        "{:?}",
        o.metadata
    );

    // Release the dependents: the API server removes them, then the collector removes the
    // owner's foregroundDeletion finalizer and the owner goes.
    let release = serde_json::json!({ "metadata": { "finalizers": null } });
    let released = Instant::now();
    cms.patch(&cm_name, &PatchParams::default(), &Patch::Merge(&release))
        .await
        .expect("release ConfigMap");
    eventually(CASCADE_TIMEOUT, "the ConfigMap to be gone", || {
        gone(&cms, &cm_name)
    })
    .await;
    // One dependent left: the owner still waits.
    let o = dis.get(&owner.name_any()).await.expect("owner still waits");
    assert!(o.finalizers().iter().any(|f| f == "foregroundDeletion"));
    dis.patch(&di_name, &PatchParams::default(), &Patch::Merge(&release))
        .await
        .expect("release DeviceIsolation");
    eventually(
        CASCADE_TIMEOUT,
        "the dependent DeviceIsolation to be gone",
        || gone(&dis, &di_name),
    )
    .await;
    eventually(
        CASCADE_TIMEOUT,
        "the owner to be gone after its dependents",
        || gone(&dis, "owner-fg"),
    )
    .await;
    eprintln!(
        "foreground cascade: dependents marked for deletion {marked:?} after the owner's \
         deletion; owner gone {:?} after the last dependent was released",
        released.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_without_blockers_removes_owner_after_dependents() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("gc-foreground-plain").await;
    let client = c.client().await;
    let dis: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let (owner, cm, di) = owner_with_dependents(&client, &ns, "owner-fg2", 0x6c5, None).await;

    let start = Instant::now();
    dis.delete(&owner.name_any(), &DeleteParams::foreground())
        .await
        .expect("delete owner");
    eventually(CASCADE_TIMEOUT, "the owner to be gone", || {
        gone(&dis, "owner-fg2")
    })
    .await;
    let owner_gone = start.elapsed();
    // Foreground: by the time the owner is gone, its blocking dependents are gone too.
    gone(&cms, cm.metadata.name.as_deref().unwrap())
        .await
        .expect("ConfigMap gone before its owner");
    gone(&dis, di.metadata.name.as_deref().unwrap())
        .await
        .expect("dependent DeviceIsolation gone before its owner");
    eprintln!("foreground cascade: owner and dependents gone {owner_gone:?} after the deletion");
}
