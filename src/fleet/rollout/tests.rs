//! Table tests of the rollout decision: one row per rule.

use super::*;
use crate::crd::{DeviceSelector, Rollout};

fn spec(paused: bool, canary: u32, max_failures: u32, max_devices: u32) -> DeviceIsolationSetSpec {
    DeviceIsolationSetSpec {
        isolated: false,
        isolation_type: Default::default(),
        drift_policy: Default::default(),
        selector: DeviceSelector {
            machine_tags: vec!["incident-4711".into()],
            ..DeviceSelector::default()
        },
        exclude: Default::default(),
        max_devices,
        paused,
        rollout: Rollout {
            canary,
            max_failures,
        },
        release_at: None,
        connection_ref: None,
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:040x}")).collect()
}

fn selection(n: usize) -> Selection {
    Selection {
        count: n as u32,
        machine_ids: ids(n),
        ..Selection::default()
    }
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-05T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

struct Row {
    name: &'static str,
    spec: DeviceIsolationSetSpec,
    comment: bool,
    selected: usize,
    /// Children by index into the selection.
    children: Vec<(usize, ChildState)>,
    elsewhere: Vec<usize>,
    canary_passed: bool,
    /// The operator's approval threshold, and who approved.
    threshold: u32,
    approved_by: Option<&'static str>,
    want_reason: SetReason,
    /// Indexes admitted now.
    want_admit: Vec<usize>,
}

fn row(name: &'static str, spec: DeviceIsolationSetSpec, selected: usize) -> Row {
    Row {
        name,
        spec,
        comment: true,
        selected,
        children: vec![],
        elsewhere: vec![],
        canary_passed: false,
        threshold: 0,
        approved_by: None,
        want_reason: SetReason::RollingOut,
        want_admit: vec![],
    }
}

fn decide(r: &Row) -> Decision {
    let sel = selection(r.selected);
    let children: HashMap<&str, ChildState> = r
        .children
        .iter()
        .map(|(i, s)| (sel.machine_ids[*i].as_str(), *s))
        .collect();
    let elsewhere: HashSet<String> = r
        .elsewhere
        .iter()
        .map(|i| sel.machine_ids[*i].clone())
        .collect();
    plan(&Input {
        generation: 2,
        spec: &r.spec,
        has_comment: r.comment,
        selection: &sel,
        children: &children,
        managed_elsewhere: &elsewhere,
        canary_passed_generation: r.canary_passed.then_some(2),
        approval_threshold: r.threshold,
        approved_by: r.approved_by,
        requester: Some("requested-by=user-a".into()),
        conditions: &[],
        now: now(),
    })
}

#[test]
fn the_rules_in_order() {
    use ChildState::*;
    let all = |n: usize, s: ChildState| (0..n).map(|i| (i, s)).collect::<Vec<_>>();
    let rows = vec![
        Row {
            want_admit: (0..5).collect(),
            ..row("no children yet: all admitted", spec(false, 0, 0, 100), 5)
        },
        Row {
            comment: false,
            want_reason: SetReason::CommentMissing,
            ..row("no comment: nothing", spec(false, 0, 0, 100), 5)
        },
        Row {
            want_reason: SetReason::SelectionTooLarge,
            ..row("over maxDevices: nothing", spec(false, 0, 0, 4), 5)
        },
        Row {
            want_reason: SetReason::NothingSelected,
            ..row("nothing selected", spec(false, 0, 0, 100), 0)
        },
        Row {
            want_reason: SetReason::Paused,
            ..row("paused at creation: nothing", spec(true, 0, 0, 100), 5)
        },
        Row {
            threshold: 4,
            want_reason: SetReason::AwaitingApproval,
            ..row(
                "over the approval threshold: nothing",
                spec(false, 0, 0, 100),
                5,
            )
        },
        Row {
            threshold: 4,
            approved_by: Some("user-b"),
            want_admit: (0..5).collect(),
            ..row(
                "over the threshold, approved: all",
                spec(false, 0, 0, 100),
                5,
            )
        },
        Row {
            threshold: 5,
            want_admit: (0..5).collect(),
            ..row(
                "at the threshold: no approval needed",
                spec(false, 0, 0, 100),
                5,
            )
        },
        Row {
            children: vec![(0, Ready), (1, Pending)],
            want_reason: SetReason::Paused,
            ..row(
                "paused while running: nothing new",
                spec(true, 0, 0, 100),
                5,
            )
        },
        Row {
            want_admit: vec![0, 1],
            want_reason: SetReason::Canary,
            ..row("canary first", spec(false, 2, 0, 100), 5)
        },
        Row {
            children: vec![(0, Ready), (1, Pending)],
            want_reason: SetReason::Canary,
            ..row("canary not Ready yet: waits", spec(false, 2, 0, 100), 5)
        },
        Row {
            children: vec![(0, Ready), (1, Ready)],
            want_admit: vec![2, 3, 4],
            ..row("canary Ready: the rest", spec(false, 2, 0, 100), 5)
        },
        Row {
            children: vec![(0, Ready), (1, Failed)],
            want_reason: SetReason::FailureBudgetExceeded,
            ..row(
                "a failing canary device stops the set",
                spec(false, 2, 0, 100),
                5,
            )
        },
        Row {
            children: vec![(0, Ready), (1, Failed)],
            want_reason: SetReason::Canary,
            ..row(
                "a failure within the budget: canary still waits",
                spec(false, 2, 1, 100),
                5,
            )
        },
        Row {
            children: vec![(0, Ready), (1, Failed), (2, Failed)],
            canary_passed: true,
            want_reason: SetReason::FailureBudgetExceeded,
            ..row(
                "failures over budget after the canary",
                spec(false, 2, 1, 100),
                5,
            )
        },
        Row {
            children: all(5, Ready),
            want_reason: SetReason::Converged,
            ..row("all Ready", spec(false, 0, 0, 100), 5)
        },
        Row {
            children: vec![(0, Ready), (1, Ready), (2, Failed)],
            want_reason: SetReason::ConvergedWithFailures,
            ..row("settled within the budget", spec(false, 0, 1, 100), 3)
        },
        Row {
            children: vec![(0, Ready), (1, Stalled)],
            want_reason: SetReason::DevicesStalled,
            ..row("nothing pending, one stalled", spec(false, 0, 0, 100), 2)
        },
        Row {
            children: vec![(0, Ready)],
            elsewhere: vec![1],
            want_reason: SetReason::Converged,
            ..row(
                "managed elsewhere: not duplicated",
                spec(false, 0, 0, 100),
                2,
            )
        },
        Row {
            elsewhere: vec![0],
            want_admit: vec![1, 2],
            ..row(
                "managed elsewhere: never admitted",
                spec(false, 0, 0, 100),
                3,
            )
        },
    ];
    for r in &rows {
        let d = decide(r);
        let sel = selection(r.selected);
        let want: Vec<String> = r
            .want_admit
            .iter()
            .map(|i| sel.machine_ids[*i].clone())
            .collect();
        assert_eq!(d.reason, r.want_reason, "{}", r.name);
        assert_eq!(d.admit, want, "{}", r.name);
        if r.want_reason.holds_children() {
            assert!(d.holds(), "{}", r.name);
            assert!(d.admit.is_empty(), "{}", r.name);
        }
    }
}

#[test]
fn counts_add_up_and_unadmitted_devices_are_pending() {
    use ChildState::*;
    let r = Row {
        children: vec![(0, Ready), (1, Pending), (2, Stalled), (3, Failed)],
        elsewhere: vec![4],
        ..row("counts", spec(false, 0, 5, 100), 7)
    };
    let d = decide(&r);
    assert_eq!(
        d.devices,
        DeviceCounts {
            selected: 7,
            requested: 4,
            ready: 1,
            pending: 3, // one child, two not yet created
            stalled: 1,
            failed: 1,
            managed_elsewhere: 1,
        }
    );
}

#[test]
fn events_mark_the_transitions() {
    use ChildState::*;
    let reasons = |d: &Decision| d.events.iter().map(|e| e.reason).collect::<Vec<_>>();
    let start = decide(&row("start", spec(false, 0, 0, 100), 3));
    assert_eq!(reasons(&start), [SetReason::RolloutStarted]);
    assert!(
        start.events[0].note.ends_with("; requested-by=user-a"),
        "{}",
        start.events[0].note
    );
    let canary = decide(&Row {
        children: vec![(0, Ready)],
        ..row("canary passes", spec(false, 1, 0, 100), 3)
    });
    assert_eq!(reasons(&canary), [SetReason::CanaryPassed]);
    assert_eq!(canary.canary_passed_generation, Some(2));
    let failed = decide(&Row {
        children: vec![(0, Failed)],
        ..row("budget", spec(false, 1, 0, 100), 3)
    });
    assert_eq!(reasons(&failed), [SetReason::FailureBudgetExceeded]);
    assert!(failed.events[0].warning);
    let paused = decide(&row("pause", spec(true, 0, 0, 100), 3));
    assert_eq!(reasons(&paused), [SetReason::Paused]);
    let done = decide(&Row {
        children: (0..3).map(|i| (i, Ready)).collect(),
        ..row("done", spec(false, 0, 0, 100), 3)
    });
    assert_eq!(reasons(&done), [SetReason::Done]);

    // The same decision again: the conditions say it already, no second event.
    let sel = selection(3);
    let children: HashMap<&str, ChildState> = sel
        .machine_ids
        .iter()
        .map(|m| (m.as_str(), Ready))
        .collect();
    let again = plan(&Input {
        generation: 2,
        spec: &spec(false, 0, 0, 100),
        has_comment: true,
        selection: &sel,
        children: &children,
        managed_elsewhere: &HashSet::new(),
        canary_passed_generation: None,
        approval_threshold: 0,
        approved_by: None,
        requester: None,
        conditions: &done.conditions,
        now: now(),
    });
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert_eq!(again.conditions, done.conditions);
}

#[test]
fn an_approval_is_announced_once_when_the_rollout_starts() {
    let waiting = decide(&Row {
        threshold: 2,
        ..row("waiting", spec(false, 0, 0, 100), 3)
    });
    assert_eq!(waiting.reason, SetReason::AwaitingApproval);
    assert!(waiting.holds());
    let sel = selection(3);
    let approved = plan(&Input {
        generation: 2,
        spec: &spec(false, 0, 0, 100),
        has_comment: true,
        selection: &sel,
        children: &HashMap::new(),
        managed_elsewhere: &HashSet::new(),
        canary_passed_generation: None,
        approval_threshold: 2,
        approved_by: Some("user-b"),
        requester: None,
        conditions: &waiting.conditions,
        now: now(),
    });
    let events: Vec<_> = approved.events.iter().map(|e| e.reason).collect();
    assert_eq!(events, [SetReason::Approved, SetReason::RolloutStarted]);
    assert_eq!(approved.events[0].note, "generation 2 approved by user-b");
    assert_eq!(approved.admit.len(), 3);
}
