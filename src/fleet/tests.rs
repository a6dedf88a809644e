//! The pieces of the set driver that need no API server: children as the set wants them, where a
//! child stands, and when a set holds its children.

use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use serde_json::json;

use super::*;
use crate::crd::DeviceIsolationSetSpec;

fn set(paused: bool, status: Option<serde_json::Value>) -> DeviceIsolationSet {
    let mut v = json!({
        "apiVersion": "isolation.mde.dev/v1alpha1",
        "kind": "DeviceIsolationSet",
        "metadata": {
            "name": "release-inc-4711", "namespace": "secops", "uid": "set-uid", "generation": 3,
            "annotations": {COMMENT_ANNOTATION: " False positive (INC-4711) "},
        },
        "spec": {"isolated": false, "paused": paused, "selector": {"machineTags": ["incident-4711"]}},
    });
    if let Some(s) = status {
        v["status"] = s;
    }
    serde_json::from_value(v).unwrap()
}

fn stores(sets: &[DeviceIsolationSet]) -> SetStores {
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&Event::Init);
    for s in sets {
        writer.apply_watcher_event(&Event::InitApply(s.clone()));
    }
    writer.apply_watcher_event(&Event::InitDone);
    SetStores::new(vec![reader])
}

const M: &str = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";

#[test]
fn a_child_carries_the_sets_wish_label_comment_and_controller_reference() {
    let s = set(false, None);
    let created = child_for(&s, M);
    let child = Cached::from(created.clone());
    assert_eq!(
        child.metadata.name.as_deref(),
        Some(format!("release-inc-4711-{M}").as_str())
    );
    assert_eq!(child.metadata.namespace.as_deref(), Some("secops"));
    assert_eq!(child.spec.machine_id.as_deref(), Some(M));
    assert!(!child.spec.isolated);
    assert_eq!(child.comment(), Some("False positive (INC-4711)"));
    assert_eq!(
        created.metadata.labels.as_ref().unwrap()[SET_LABEL],
        "release-inc-4711"
    );
    assert_eq!(child.owning_set(), Some(("release-inc-4711", "set-uid")));
    let owner = &created.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.block_owner_deletion, Some(true));
    assert!(up_to_date(&child, &s));
    let mut isolate = s.clone();
    isolate.spec = DeviceIsolationSetSpec {
        isolated: true,
        ..s.spec.clone()
    };
    assert!(!up_to_date(&child, &isolate));
    let mut recommented = s.clone();
    recommented
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(COMMENT_ANNOTATION.into(), "INC-4712".into());
    assert!(!up_to_date(&child, &recommented));
    let mut timed = isolate.clone();
    timed.spec.release_at = Some(chrono::Utc::now());
    let timed_child = Cached::from(child_for(&timed, M));
    assert_eq!(timed_child.spec.release_at, timed.spec.release_at);
    assert!(up_to_date(&timed_child, &timed));
    assert!(
        !up_to_date(&Cached::from(child_for(&isolate, M)), &timed),
        "releaseAt edits reach the children"
    );
    let mut taken_over = s.clone();
    taken_over
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(crate::crd::REQUESTED_BY_ANNOTATION.into(), "user-b".into());
    assert_eq!(
        Cached::from(child_for(&taken_over, M)).requested_by(),
        Some("user-b")
    );
    assert!(!up_to_date(&child, &taken_over), "so does a new requester");
}

#[test]
fn a_child_is_held_while_its_set_is_paused_stopped_deleted_or_gone() {
    let created = child_for(&set(false, None), M);
    let child = Cached::from(created.clone());
    let stopped = |reason: &str| {
        set(
            false,
            Some(
                json!({"conditions": [{"type": "Ready", "status": "False", "reason": reason,
                "message": "", "lastTransitionTime": "2026-12-05T10:00:00Z"}]}),
            ),
        )
    };
    assert_eq!(hold_of(&child, &stores(&[set(false, None)])), None);
    assert_eq!(hold_of(&child, &stores(&[stopped("RollingOut")])), None);
    for (sets, why) in [
        (vec![set(true, None)], "is paused"),
        (
            vec![stopped("FailureBudgetExceeded")],
            "stopped: FailureBudgetExceeded",
        ),
        (vec![], "is gone"),
    ] {
        let held = hold_of(&child, &stores(&sets)).expect("held");
        assert!(held.ends_with(why), "{held}");
    }
    let mut deleting = set(false, None);
    deleting.metadata.deletion_timestamp =
        serde_json::from_value(json!("2026-12-05T10:00:00Z")).ok();
    assert!(
        hold_of(&child, &stores(&[deleting]))
            .unwrap()
            .ends_with("is being deleted")
    );
    // Another set of the same name (deleted and created again) is not this child's.
    let mut other = set(false, None);
    other.metadata.uid = Some("another-uid".into());
    assert!(
        hold_of(&child, &stores(&[other]))
            .unwrap()
            .ends_with("is gone")
    );
    // A resource of no set is never held.
    let mut single = created;
    single.metadata.owner_references = None;
    assert_eq!(hold_of(&Cached::from(single), &stores(&[])), None);
}

#[test]
fn a_childs_conditions_say_where_it_stands() {
    let with = |conditions: serde_json::Value, observed: i64| {
        let mut c = child_for(&set(false, None), M);
        c.metadata.generation = Some(1);
        c.status = Some(
            serde_json::from_value(
                json!({"observedGeneration": observed, "conditions": conditions}),
            )
            .unwrap(),
        );
        Cached::from(c)
    };
    let cond = |t: &str, s: &str, r: &str| json!({"type": t, "status": s, "reason": r, "message": "", "lastTransitionTime": "t"});
    let ready = json!([cond("Ready", "True", "Released")]);
    assert_eq!(child_state(&with(ready.clone(), 1)), ChildState::Ready);
    assert_eq!(
        child_state(&with(ready, 0)),
        ChildState::Pending,
        "older generation"
    );
    let stalled = |r: &str| json!([cond("Ready", "False", r), cond("Stalled", "True", r)]);
    assert_eq!(
        child_state(&with(stalled("UnsupportedPlatform"), 1)),
        ChildState::Failed
    );
    assert_eq!(
        child_state(&with(stalled("RetriesExhausted"), 1)),
        ChildState::Failed
    );
    assert_eq!(
        child_state(&with(stalled("Forbidden"), 1)),
        ChildState::Stalled
    );
    let pending = json!([
        cond("Ready", "False", "ActionPending"),
        cond("Reconciling", "True", "ActionPending")
    ]);
    assert_eq!(child_state(&with(pending, 1)), ChildState::Pending);
    let mut fresh = child_for(&set(false, None), M);
    fresh.status = None;
    assert_eq!(child_state(&Cached::from(fresh)), ChildState::Pending);
}

#[test]
fn set_reasons_are_documented_in_the_readme() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("## Release a fleet")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Release a fleet section");
    for r in SetReason::ALL {
        assert!(
            section.contains(&format!("`{}`", r.as_str())),
            "{r:?} is not in the README's Release a fleet section"
        );
    }
}

#[test]
fn a_written_selection_stands_until_the_cache_shows_it() {
    let memo = Selections::default();
    let first = Selection {
        count: 2,
        criteria: "c1".into(),
        ..Selection::default()
    };
    let current =
        |cached: Option<&Selection>| memo.current("u", cached).map(|c| Selection::clone(&c));
    assert_eq!(current(None), None);
    memo.written("u", Arc::new(first.clone()));
    // The cache is older than the write: the written selection, not a new resolution.
    assert_eq!(current(None), Some(first.clone()));
    let older = Selection {
        count: 9,
        criteria: "c0".into(),
        ..Selection::default()
    };
    assert_eq!(current(Some(&older)), Some(first.clone()));
    assert_eq!(memo.len(), 1);
    // The cache caught up: the copy goes, and the cached selection is lent, not copied.
    assert!(matches!(
        memo.current("u", Some(&first)),
        Some(Current::Cached(s)) if *s == first
    ));
    assert!(memo.is_empty());
    assert_eq!(current(Some(&first)), Some(first));
}
