//! The selector as reads and as an exact match.

use super::*;
use crate::mde::model::ActionStatus;

fn machine(id: &str, name: &str, tags: &[&str], group: &str) -> Machine {
    serde_json::from_value(serde_json::json!({
        "id": id, "computerDnsName": name, "machineTags": tags, "rbacGroupName": group,
    }))
    .unwrap()
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn action(kind: ActionKind, requestor: &str, source: &str, created: &str) -> ActionFact {
    ActionFact {
        id: format!("{requestor}-{created}"),
        kind,
        status: ActionStatus::Succeeded,
        requestor: Some(requestor.into()),
        comment: None,
        request_source: Some(source.into()),
        created_at: Some(at(created)),
        updated_at: Some(at(created)),
    }
}

fn ids(p: &Picked) -> Vec<&str> {
    p.machines.iter().map(|m| m.machine_id.as_str()).collect()
}

#[test]
fn tags_are_filtered_by_mde_and_ids_and_names_go_in_batches() {
    let by_tag = DeviceSelector {
        machine_tags: vec!["incident-4711".into(), "it's".into()],
        ..DeviceSelector::default()
    };
    let q = queries(&by_tag);
    assert_eq!(q.len(), 1);
    assert_eq!(
        q[0].filter.as_ref().unwrap().to_string(),
        "machineTags/any(x: x eq 'incident-4711') and machineTags/any(x: x eq 'it''s')"
    );
    assert_eq!(q[0].top, Some(10_000));

    let by_ids = DeviceSelector {
        machine_ids: (0..250).map(|i| format!("{i:040x}")).collect(),
        machine_tags: vec!["t".into()],
        ..DeviceSelector::default()
    };
    let q = queries(&by_ids);
    assert_eq!(q.len(), 3, "100 ids a read");
    let first = q[0].filter.as_ref().unwrap().to_string();
    assert!(first.starts_with("id in ('"), "{first}");
    assert!(
        first.ends_with("and machineTags/any(x: x eq 't')"),
        "{first}"
    );

    let by_names = DeviceSelector {
        device_names: (0..21).map(|i| format!("h{i}.contoso.local")).collect(),
        ..DeviceSelector::default()
    };
    assert_eq!(queries(&by_names).len(), 2, "20 names a read");

    // Groups and isolatedBy are matched here: one read of every machine.
    let by_group = DeviceSelector {
        rbac_group_names: vec!["Laptops".into()],
        ..DeviceSelector::default()
    };
    let q = queries(&by_group);
    assert_eq!(q.len(), 1);
    assert!(q[0].filter.is_none());
}

#[test]
fn every_criterion_must_hold_and_exclusions_win() {
    let read = vec![
        machine(
            &"b".repeat(40),
            "b.contoso.local",
            &["incident-4711"],
            "Laptops",
        ),
        machine(
            &"a".repeat(40),
            "a.contoso.local",
            &["incident-4711", "vip"],
            "Laptops",
        ),
        machine(
            &"c".repeat(40),
            "c.contoso.local",
            &["incident-4711"],
            "Servers",
        ),
        machine(
            &"d".repeat(40),
            "d.contoso.local",
            &["incident-4711", "domain-controller"],
            "Laptops",
        ),
        machine(&"e".repeat(40), "e.contoso.local", &["other"], "Laptops"),
        // A page boundary can repeat a machine: counted once.
        machine(
            &"a".repeat(40),
            "a.contoso.local",
            &["incident-4711", "vip"],
            "Laptops",
        ),
    ];
    let selector = DeviceSelector {
        machine_tags: vec!["incident-4711".into()],
        rbac_group_names: vec!["Laptops".into()],
        ..DeviceSelector::default()
    };
    let exclude = Exclusion {
        machine_tags: vec!["domain-controller".into()],
        ..Exclusion::default()
    };
    let picked = pick(&read, &selector, &exclude, |_| vec![]);
    let (a, b) = ("a".repeat(40), "b".repeat(40));
    assert_eq!(ids(&picked), [a.as_str(), b.as_str()], "by name, then id");
    assert_eq!(picked.excluded, 1);

    // An explicit id that carries an excluded tag is still excluded.
    let explicit = DeviceSelector {
        machine_ids: vec!["d".repeat(40)],
        ..DeviceSelector::default()
    };
    let picked = pick(&read, &explicit, &exclude, |_| vec![]);
    assert!(picked.machines.is_empty());
    assert_eq!(picked.excluded, 1);

    // Names match exactly: no prefix, no case folding.
    let names = DeviceSelector {
        device_names: vec![
            "a.contoso".into(),
            "B.contoso.local".into(),
            "c.contoso.local".into(),
        ],
        ..DeviceSelector::default()
    };
    let c = "c".repeat(40);
    assert_eq!(
        ids(&pick(&read, &names, &Exclusion::default(), |_| vec![])),
        [c.as_str()]
    );
}

#[test]
fn isolated_by_reads_the_latest_succeeded_isolation_action() {
    let aad = "Automatic Attack Disruption";
    let by = IsolatedBy {
        requestor: Some(aad.into()),
        request_source: Some(String::new()), // empty: not given
        since: Some("2026-12-01T00:00:00Z".into()),
    };
    let isolate =
        |who: &str, when: &str| action(ActionKind::Isolate, who, "AutomaticAttackDisruption", when);
    assert!(isolated_by(&[isolate(aad, "2026-12-02T00:00:00Z")], &by));
    assert!(!isolated_by(
        &[isolate("alice@contoso.com", "2026-12-02T00:00:00Z")],
        &by
    ));
    assert!(
        !isolated_by(&[isolate(aad, "2026-11-30T00:00:00Z")], &by),
        "before since"
    );
    let released = action(
        ActionKind::Unisolate,
        "alice@contoso.com",
        "Portal",
        "2026-12-03T00:00:00Z",
    );
    assert!(
        !isolated_by(
            &[isolate(aad, "2026-12-02T00:00:00Z"), released.clone()],
            &by
        ),
        "released since"
    );
    let mut failed = isolate("alice@contoso.com", "2026-12-04T00:00:00Z");
    failed.status = ActionStatus::Failed;
    assert!(
        isolated_by(&[isolate(aad, "2026-12-02T00:00:00Z"), failed], &by),
        "a failed action changes nothing"
    );
    assert!(!isolated_by(&[], &by), "never isolated");
    let by_source = IsolatedBy {
        request_source: Some("Portal".into()),
        ..IsolatedBy::default()
    };
    assert!(!isolated_by(
        &[isolate(aad, "2026-12-02T00:00:00Z")],
        &by_source
    ));
}

#[test]
fn criteria_change_with_the_selector_and_exclusions_only() {
    let s = DeviceSelector {
        machine_tags: vec!["t".into()],
        ..DeviceSelector::default()
    };
    let base = criteria(&s, &Exclusion::default());
    assert_eq!(base, criteria(&s.clone(), &Exclusion::default()));
    assert_eq!(base.len(), 24);
    let other = DeviceSelector {
        machine_tags: vec!["u".into()],
        ..DeviceSelector::default()
    };
    assert_ne!(base, criteria(&other, &Exclusion::default()));
    let ex = Exclusion {
        machine_ids: vec!["a".repeat(40)],
        ..Exclusion::default()
    };
    assert_ne!(base, criteria(&s, &ex));
}
