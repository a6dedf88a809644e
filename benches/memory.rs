//! Diagnosis: heap bytes per resource of each per-resource structure of the operator, measured
//! with a counting allocator over 10,000 resources shaped like the benchmark's settled ones
//! (`--set`: each also with the label and the owner reference of a DeviceIsolationSet child;
//! `--waiting`: a set's child as most of the `fleet10000` benchmark's children are at its peak,
//! waiting for quota with its intent recorded, and named `<set>-<machine id>`).
//! Bytes asked of the allocator, and the bytes glibc's malloc takes for them (each allocation is
//! a chunk of its size plus an 8-byte header, rounded up to 16 bytes, at least 32: many small
//! allocations cost more than their bytes); the process's RSS is in `docs/benchmarks.md` (the
//! `rss` and `rss10k` scenarios of `benches/operator.rs`).
//!
//! ```sh
//! cargo bench --bench memory
//! cargo bench --bench memory -- --set
//! cargo bench --bench memory -- --waiting
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::runtime::reflector;
use kube::runtime::watcher;
use mde_isolation_operator::cache::{Cached, Interner, Machines, slim_device};
use mde_isolation_operator::crd::DeviceIsolation;
use mde_isolation_operator::mde::model::ActionStatus;
use mde_isolation_operator::reconcile::{ActionFact, ActionKind, Memory, ResourceRef};
use mde_isolation_operator::view::ActionView;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static CHUNKS: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// The chunk glibc's malloc (64-bit) takes for `size` bytes.
fn chunk(size: usize) -> usize {
    (size + 8).div_ceil(16).max(2) * 16
}

struct Counting;

// SAFETY: forwards every call to the system allocator; only counters move.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        CHUNKS.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        CHUNKS.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        COUNT.fetch_sub(1, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        CHUNKS.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        CHUNKS.fetch_add(chunk(new_size), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: usize = 10_000;

fn live() -> [usize; 3] {
    [
        LIVE.load(Ordering::Relaxed),
        CHUNKS.load(Ordering::Relaxed),
        COUNT.load(Ordering::Relaxed),
    ]
}

fn report(what: &str, before: [usize; 3]) -> [usize; 3] {
    let now = live();
    let per = |i: usize| (now[i] as f64 - before[i] as f64) / N as f64;
    println!(
        "{what:<55} {:>6.0} B/resource {:>6.0} B in malloc chunks {:>5.1} allocations",
        per(0),
        per(1),
        per(2)
    );
    live()
}

/// The resources' shape (see the module docs).
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Single,
    Set,
    Waiting,
}

fn object(i: usize, shape: Shape) -> serde_json::Value {
    let set = shape != Shape::Single;
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
    let mut status = serde_json::json!({
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
    });
    let mut name = format!("d{i:05}");
    if shape == Shape::Waiting {
        name = format!("fleet-release-{machine}");
        let msg = "waiting for a slot in the MDE API quota";
        status = serde_json::json!({
            "conditions": [
              {"lastTransitionTime": "2026-12-06T05:57:02Z", "message": msg, "observedGeneration": 1,
               "reason": "WaitingForQuota", "status": "False", "type": "Ready"},
              {"lastTransitionTime": "2026-12-06T05:57:02Z", "message": msg, "observedGeneration": 1,
               "reason": "WaitingForQuota", "status": "True", "type": "Reconciling"}
            ],
            "intent": {"attempt": 1, "generation": 1, "recordedAt": "2026-12-06T05:57:02Z",
                       "type": "Unisolate",
                       "marker": format!("[mde-isolation-operator bench-rss10k-3b5c5953/{name} gen=1 uid={} try=1]", &id[..8])},
            "machineId": machine,
            "observedGeneration": 1,
            "requests": 1
        });
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
        "name": name,
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
      "status": status
    })
}

fn main() {
    let arg = |a: &str| std::env::args().any(|x| x == a);
    let shape = if arg("--waiting") {
        Shape::Waiting
    } else if arg("--set") {
        Shape::Set
    } else {
        Shape::Single
    };
    println!(
        "size_of DeviceIsolation = {} B, Cached = {} B, ObjectMeta = {} B, ResourceRef = {} B",
        std::mem::size_of::<DeviceIsolation>(),
        std::mem::size_of::<Cached>(),
        std::mem::size_of::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(),
        std::mem::size_of::<ResourceRef>()
    );
    let json: Vec<String> = (0..N).map(|i| object(i, shape).to_string()).collect();
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
    let mut interner = Interner::default();
    let cached: Vec<Cached> = objects
        .into_iter()
        .map(|o| slim_device(o, &mut interner))
        .collect();
    let b = report("  ... as cached (slim_device)", b);
    drop(cached);
    let b0 = live();
    let _ = b;

    let (reader, mut writer) = reflector::store::<Cached>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for j in &json {
        let o: DeviceIsolation = serde_json::from_str(j).unwrap();
        let o = slim_device(o, &mut interner);
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let b = report("reflector store (slimmed objects, keys, Arc, map)", b0);
    let machines = Machines::default();
    machines.reset(reader.state());
    let b = report("  its index of machines (Machines)", b);
    let refs: Vec<ResourceRef> = reader
        .state()
        .iter()
        .map(|o| ResourceRef::from_obj(&**o))
        .collect();
    let b = report("  a Vec<ResourceRef> of them (for scale)", b);

    let view = ActionView::new();
    // The action each resource's request created (a waiting one's, once it is sent).
    view.upsert(reader.state().iter().map(|o| {
        let uid = o.metadata.uid.as_deref().unwrap();
        (
            o.spec.machine_id.clone().unwrap(),
            ActionFact {
                id: format!("{}-d425-4b4d-8ca4-ce55f91a1264", &uid[..8]),
                kind: ActionKind::Unisolate,
                status: ActionStatus::Pending,
                requestor: Some("mde-sim-client".into()),
                comment: Some(format!(
                    "Released after clean re-image (bench) [mde-isolation-operator {}/{} gen=1 uid={} try=1]",
                    o.metadata.namespace.as_deref().unwrap(),
                    o.metadata.name.as_deref().unwrap(),
                    &uid[..8]
                )),
                request_source: Some("PublicApi".into()),
                created_at: Some(chrono::Utc::now()),
                updated_at: Some(chrono::Utc::now()),
            },
        )
    }));
    let b = report("ActionView facts (one open action per machine)", b);
    // As a reconcile does: tracked first, then watching its machine.
    let memory = Memory::default();
    for r in &refs {
        memory.track(r);
    }
    let b = report("reconcile Memory entries", b);
    for (r, o) in refs.iter().zip(reader.state()) {
        view.watch(&memory.shared(r), o.spec.machine_id.as_deref().unwrap());
    }
    let _ = report("ActionView watchers + machine_of", b);
    std::hint::black_box((&reader, &machines, &view, &memory, &refs));
}
