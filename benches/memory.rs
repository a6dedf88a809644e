//! Diagnosis: heap bytes per resource of each per-resource structure of the operator, measured
//! with a counting allocator over 10,000 resources shaped like the benchmark's settled ones
//! (`--set`: each also with the label and the owner reference of a DeviceIsolationSet child).
//! Bytes asked of the allocator, before its own overhead; the process's RSS is in
//! `docs/benchmarks.md` (the `rss` and `rss10k` scenarios of `benches/operator.rs`).
//!
//! ```sh
//! cargo bench --bench memory
//! cargo bench --bench memory -- --set
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::runtime::reflector;
use kube::runtime::watcher;
use mde_isolation_operator::cache::slim;
use mde_isolation_operator::crd::DeviceIsolation;
use mde_isolation_operator::mde::model::ActionStatus;
use mde_isolation_operator::reconcile::{ActionFact, ActionKind, Memory, ResourceRef};
use mde_isolation_operator::view::ActionView;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator; only counters move.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        COUNT.fetch_sub(1, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: usize = 10_000;

fn live() -> (usize, usize) {
    (LIVE.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed))
}

fn report(what: &str, before: (usize, usize)) -> (usize, usize) {
    let now = live();
    println!(
        "{what:<55} {:>8.0} B/resource {:>6.1} allocations/resource",
        (now.0 as f64 - before.0 as f64) / N as f64,
        (now.1 as f64 - before.1 as f64) / N as f64
    );
    live()
}

fn object(i: usize, set: bool) -> serde_json::Value {
    let id = format!("{:08x}-9a26-4ea6-bef0-cd290653e0ee", i);
    let machine = format!("{:040x}", i + 1);
    let action = format!("{:08x}-d425-4b4d-8ca4-ce55f91a1264", i);
    let msg = format!(
        "Unisolate action {action} is Pending since 2026-12-06T00:00:17Z; offline devices can take up to 3 days"
    );
    let mut labels = serde_json::json!({});
    let mut owners = serde_json::json!([]);
    if set {
        labels = serde_json::json!({"isolation.mde.dev/set": "fleet-release"});
        owners = serde_json::json!([{
            "apiVersion": "isolation.mde.dev/v1alpha1", "kind": "DeviceIsolationSet",
            "name": "fleet-release", "uid": "74c50e66-9a26-4ea6-bef0-cd290653e0ee",
            "controller": true, "blockOwnerDeletion": true}]);
    }
    serde_json::json!({
      "apiVersion": "isolation.mde.dev/v1alpha1",
      "kind": "DeviceIsolation",
      "metadata": {
        "annotations": {"isolation.mde.dev/comment": "Released after clean re-image (bench)"},
        "labels": labels,
        "ownerReferences": owners,
        "creationTimestamp": "2026-12-05T23:50:08Z",
        "generation": 1,
        "name": format!("d{i:05}"),
        "namespace": "bench-rss10k-3b5c5953",
        "resourceVersion": format!("{}", 1000 + i),
        "uid": id,
        "managedFields": [
          {"manager": "bench", "operation": "Update", "apiVersion": "isolation.mde.dev/v1alpha1",
           "time": "2026-12-05T23:50:08Z", "fieldsType": "FieldsV1",
           "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:isolation.mde.dev/comment": {}}},
                        "f:spec": {".": {}, "f:driftPolicy": {}, "f:isolated": {}, "f:isolationType": {}, "f:machineId": {}}}},
          {"manager": "mde-isolation-operator", "operation": "Update", "apiVersion": "isolation.mde.dev/v1alpha1",
           "time": "2026-12-05T23:50:09Z", "fieldsType": "FieldsV1", "subresource": "status",
           "fieldsV1": {"f:status": {".": {}, "f:action": {".": {}, "f:createdAt": {}, "f:id": {}}, "f:conditions": {}, "f:machineId": {}, "f:observedGeneration": {}, "f:requests": {}}}}
        ]
      },
      "spec": {"driftPolicy": "Report", "isolated": false, "isolationType": "Full", "machineId": machine},
      "status": {
        "action": {"createdAt": "2026-12-06T00:00:17Z", "id": action, "requestor": "mde-sim-client",
                   "status": "Pending", "type": "Unisolate", "updatedAt": "2026-12-06T00:00:17Z"},
        "conditions": [
          {"lastTransitionTime": "2026-12-05T23:50:09Z", "message": msg, "observedGeneration": 1,
           "reason": "ActionPending", "status": "False", "type": "Ready"},
          {"lastTransitionTime": "2026-12-05T23:50:09Z", "message": msg, "observedGeneration": 1,
           "reason": "ActionPending", "status": "True", "type": "Reconciling"}
        ],
        "machineId": machine,
        "observedGeneration": 1,
        "requests": 1
      }
    })
}

fn main() {
    let set = std::env::args().any(|a| a == "--set");
    println!(
        "size_of DeviceIsolation = {} B, ObjectMeta = {} B, ResourceRef = {} B",
        std::mem::size_of::<DeviceIsolation>(),
        std::mem::size_of::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(),
        std::mem::size_of::<ResourceRef>()
    );
    let json: Vec<String> = (0..N).map(|i| object(i, set).to_string()).collect();
    println!(
        "JSON per object: {} B",
        json.iter().map(String::len).sum::<usize>() / N
    );

    let b = live();
    let mut objects: Vec<DeviceIsolation> = json
        .iter()
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    objects.shrink_to_fit();
    let b = report("DeviceIsolation as parsed (managedFields kept)", b);
    for o in objects.iter_mut() {
        slim(o);
    }
    let b = report("  ... after slim()", b);
    drop(objects);
    let b0 = live();
    let _ = b;

    let (reader, mut writer) = reflector::store::<DeviceIsolation>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for j in &json {
        let mut o: DeviceIsolation = serde_json::from_str(j).unwrap();
        slim(&mut o);
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let b = report("reflector store (slimmed objects, keys, Arc, map)", b0);
    let refs: Vec<ResourceRef> = reader
        .state()
        .iter()
        .map(|o| ResourceRef::from_obj(&**o))
        .collect();
    let b = report("  a Vec<ResourceRef> of them (for scale)", b);

    let view = ActionView::new();
    view.upsert(reader.state().iter().map(|o| {
        let st = o.status.as_ref().unwrap();
        let a = st.action.as_ref().unwrap();
        (
            o.spec.machine_id.clone().unwrap(),
            ActionFact {
                id: a.id.clone(),
                kind: ActionKind::Unisolate,
                status: ActionStatus::Pending,
                requestor: Some("mde-sim-client".into()),
                comment: Some(format!(
                    "Released after clean re-image (bench) [mde-op:{}:1:1:Unisolate]",
                    &a.id[..8]
                )),
                request_source: Some("PublicApi".into()),
                created_at: Some(chrono::Utc::now()),
                updated_at: Some(chrono::Utc::now()),
            },
        )
    }));
    let b = report("ActionView facts (one open action per machine)", b);
    for (r, o) in refs.iter().zip(reader.state()) {
        view.watch(r, o.spec.machine_id.as_deref().unwrap());
    }
    let b = report("ActionView watchers + machine_of", b);
    let memory = Memory::default();
    for r in &refs {
        memory.track(r);
    }
    let _ = report("reconcile Memory entries", b);
    std::hint::black_box((&reader, &view, &memory, &refs));
}
