//! DeviceIsolation objects in each phase a GitOps tool sees, produced by the real planner.
//!
//! `tests/fixtures/phases/*.json` are what Flux (kstatus, `tests/control-plane/kstatus_test.go`),
//! Argo CD (`tests/argocd_health.rs`) and the docs are checked against. They are not written by
//! hand: this test drives [`mde_isolation_operator::reconcile::plan`] the way the controller does
//! (plan, perform the effect, feed the outcome back) at fixed times, and fails when a committed
//! file differs from what the planner produces now. Regenerate with
//! `UPDATE_FIXTURES=1 cargo test --test status_fixtures`.
//!
//! | file | phase |
//! |---|---|
//! | `just-applied.json` | created, the operator has not written status yet |
//! | `action-pending.json` | the Unisolate action is Pending in MDE (`Reconciling`, `ActionPending`) |
//! | `released.json` | the action succeeded (`Ready=True`, `Released`) |
//! | `stalled.json` | MDE answered 404 for the machine (`Stalled`, `MachineNotFound`) |
//! | `new-generation.json` | `released.json` after a spec edit (generation 2) the operator has not observed yet |

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mde_isolation_operator::conditions::{self, READY, RECONCILING, STALLED};
use mde_isolation_operator::crd::{COMMENT_ANNOTATION, DeviceIsolationSpec, DeviceIsolationStatus};
use mde_isolation_operator::mde::model::ActionStatus;
use mde_isolation_operator::reconcile::{
    ActionFact, ActionKind, CallFailure, Effect, Facts, Input, Plan, PostOutcome, Timing, plan,
};
use serde_json::{Value, json};

/// Namespace of every fixture object.
const NAMESPACE: &str = "secops";
/// The machine of the fixtures that MDE knows.
const MACHINE: &str = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";
/// A machine id MDE answers 404 for.
const UNKNOWN_MACHINE: &str = "00000000000000000000000000000000deadbeef";
/// The comment annotation of every fixture object.
const COMMENT: &str = "Released after clean re-image (INC-4711)";
/// Id of the Unisolate action MDE creates for the released fixtures.
const ACTION_ID: &str = "5382f7ea-7557-4ab7-9782-d50480024a4e";
/// Who MDE records as the requestor of the operator's actions.
const REQUESTOR: &str = "mde-isolation-operator";

/// A fixed instant: 2026-11-28T10:00:00Z plus `min` minutes.
fn t(min: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
        .expect("valid time")
        .with_timezone(&Utc)
        + chrono::Duration::minutes(min)
}

/// A spec built from its JSON form, as a manifest would hold it.
fn spec(machine_id: &str, isolated: bool, isolation_type: &str) -> DeviceIsolationSpec {
    serde_json::from_value(json!({
        "machineId": machine_id,
        "isolated": isolated,
        "isolationType": isolation_type,
        "driftPolicy": "Report",
    }))
    .expect("a valid DeviceIsolation spec")
}

/// One DeviceIsolation as the planner and the API server see it.
struct Resource {
    name: &'static str,
    uid: &'static str,
    generation: i64,
    spec: DeviceIsolationSpec,
    status: Option<DeviceIsolationStatus>,
}

impl Resource {
    /// A freshly applied resource: generation 1, no status.
    fn applied(name: &'static str, uid: &'static str, spec: DeviceIsolationSpec) -> Self {
        Resource {
            name,
            uid,
            generation: 1,
            spec,
            status: None,
        }
    }

    /// One planner step at `now` with `facts`; the plan's status becomes the persisted one, as
    /// the controller writes it.
    fn step(&mut self, facts: &Facts, now: DateTime<Utc>) -> Plan {
        let status = self.status.clone().unwrap_or_default();
        let timing = Timing::default();
        let plan = plan(&Input {
            namespace: NAMESPACE,
            name: self.name,
            uid: self.uid,
            generation: self.generation,
            spec: &self.spec,
            comment: Some(COMMENT),
            retry_request: None,
            requested_by: None,
            approved_by: None,
            status: &status,
            siblings: &[],
            facts,
            now,
            dry_run: false,
            timing: &timing,
        });
        self.status = Some(plan.status.clone());
        plan
    }

    /// The object as `kubectl get -o json` shows it (without server-set metadata).
    fn to_json(&self) -> Value {
        let mut object = json!({
            "apiVersion": "isolation.mde.dev/v1alpha1",
            "kind": "DeviceIsolation",
            "metadata": {
                "name": self.name,
                "namespace": NAMESPACE,
                "generation": self.generation,
                "annotations": { COMMENT_ANNOTATION: COMMENT },
            },
            "spec": serde_json::to_value(&self.spec).expect("spec serialises"),
        });
        if let Some(status) = &self.status {
            object["status"] = serde_json::to_value(status).expect("status serialises");
        }
        object
    }
}

/// Facts once the shared view of the tenant's actions is loaded.
fn synced() -> Facts {
    Facts {
        synced: true,
        ..Facts::default()
    }
}

/// The comment of the POST a plan asks for.
fn posted_comment(plan: &Plan) -> String {
    match &plan.effect {
        Effect::Post { comment, .. } => comment.clone(),
        other => panic!("expected the planner to request a POST, got {other:?}"),
    }
}

/// The Unisolate action MDE answers the POST with.
fn unisolate(status: ActionStatus, comment: &str, updated_min: i64) -> ActionFact {
    ActionFact {
        id: ACTION_ID.into(),
        kind: ActionKind::Unisolate,
        status,
        requestor: Some(REQUESTOR.into()),
        comment: Some(comment.into()),
        request_source: None,
        created_at: Some(t(0)),
        updated_at: Some(t(updated_min)),
    }
}

/// `(type, status, reason)` of every condition of a status.
fn conditions_of(status: &DeviceIsolationStatus) -> Vec<(String, String, String)> {
    status
        .conditions
        .iter()
        .map(|c| {
            (
                c.type_.to_string(),
                c.status.to_string(),
                c.reason.to_string(),
            )
        })
        .collect()
}

fn triple(type_: &str, status: &str, reason: &str) -> (String, String, String) {
    (type_.into(), status.into(), reason.into())
}

/// Every fixture, by file stem, driven through the planner.
fn phases() -> BTreeMap<&'static str, Value> {
    let mut out = BTreeMap::new();

    // Created: the operator has not reconciled it yet.
    let applied = Resource::applied(
        "just-applied",
        "11111111-1111-4111-8111-111111111111",
        spec(MACHINE, false, "Full"),
    );
    // As the API server serves it: the CRD defaults status to observedGeneration 0.
    let mut applied = applied.to_json();
    applied["status"] = serde_json::json!({ "observedGeneration": 0 });
    out.insert("just-applied", applied);

    // First reconcile: intent written, POST unisolate; MDE answers with a Pending action.
    let mut pending = Resource::applied(
        "action-pending",
        "22222222-2222-4222-8222-222222222222",
        spec(MACHINE, false, "Full"),
    );
    let request = pending.step(&synced(), t(0));
    let comment = posted_comment(&request);
    let answered = pending.step(
        &Facts {
            post: Some(PostOutcome::Action(unisolate(
                ActionStatus::Pending,
                &comment,
                0,
            ))),
            ..synced()
        },
        t(0),
    );
    assert_eq!(answered.effect, Effect::None, "nothing to do while Pending");
    assert_eq!(
        conditions_of(&answered.status),
        [
            triple(READY, "False", "ActionPending"),
            triple(RECONCILING, "True", "ActionPending"),
        ]
    );
    out.insert("action-pending", pending.to_json());

    // The same path, then the batch poller sees the action succeed.
    let mut released = Resource::applied(
        "released",
        "33333333-3333-4333-8333-333333333333",
        spec(MACHINE, false, "Full"),
    );
    let request = released.step(&synced(), t(0));
    let comment = posted_comment(&request);
    released.step(
        &Facts {
            post: Some(PostOutcome::Action(unisolate(
                ActionStatus::Pending,
                &comment,
                0,
            ))),
            ..synced()
        },
        t(0),
    );
    let done = released.step(
        &Facts {
            actions: vec![unisolate(ActionStatus::Succeeded, &comment, 1)],
            ..synced()
        },
        t(2),
    );
    assert_eq!(
        conditions_of(&done.status),
        [triple(READY, "True", "Released")]
    );
    assert_eq!(done.status.isolated, Some(false));
    out.insert("released", released.to_json());

    // MDE answers the POST with 404: Stalled until the spec changes or a retry is requested.
    let mut stalled = Resource::applied(
        "stalled",
        "44444444-4444-4444-8444-444444444444",
        spec(UNKNOWN_MACHINE, false, "Full"),
    );
    stalled.step(&synced(), t(0));
    let failed = stalled.step(
        &Facts {
            post: Some(PostOutcome::Failed(CallFailure::MachineNotFound(format!(
                "MDE has no machine with id {UNKNOWN_MACHINE} (404)"
            )))),
            ..synced()
        },
        t(0),
    );
    assert_eq!(
        conditions_of(&failed.status),
        [
            triple(READY, "False", "MachineNotFound"),
            triple(STALLED, "True", "MachineNotFound"),
        ]
    );
    out.insert("stalled", stalled.to_json());

    // `released` after someone committed `isolated: true`: generation 2, status still for 1.
    let new_generation = Resource {
        name: "new-generation",
        uid: "55555555-5555-4555-8555-555555555555",
        generation: 2,
        spec: spec(MACHINE, true, "Selective"),
        status: released.status.clone(),
    };
    let status = new_generation
        .status
        .as_ref()
        .expect("status of generation 1");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        conditions::find(&status.conditions, READY).map(|c| c.status.as_str()),
        Some("True"),
        "a stale Ready=True is what this fixture is about"
    );
    out.insert("new-generation", new_generation.to_json());

    out
}

#[test]
fn committed_phase_fixtures_match_the_planner() {
    common::fixtures::check(
        &common::fixtures::dir("phases"),
        &phases(),
        "status_fixtures",
    );
}

#[test]
fn phases_are_deterministic() {
    assert_eq!(
        phases(),
        phases(),
        "fixed inputs must give identical fixtures"
    );
}
