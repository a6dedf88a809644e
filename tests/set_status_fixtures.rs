//! DeviceIsolationSet objects in each phase a GitOps tool sees, produced by the real rollout.
//!
//! `tests/fixtures/set-phases/*.json` are what Flux (kstatus, `tests/control-plane/kstatus_test.go`),
//! Argo CD (`tests/argocd_health.rs`) and the docs are checked against, as
//! `tests/fixtures/phases/` are for DeviceIsolation (`tests/status_fixtures.rs`). They are not
//! written by hand: this test builds each status the way the set controller does, at fixed times:
//! the selection is picked by [`mde_isolation_operator::fleet::select::pick`] from machines MDE
//! would list and written as `status.selection`, then each
//! [`mde_isolation_operator::fleet::rollout::plan`] decision is written as its
//! [`Decision::status_patch`] (a JSON merge patch, as the controller sends it), over the status
//! the API server serves for a new object (the CRD's defaults). It fails when a committed file
//! differs from what is produced now. Regenerate with
//! `UPDATE_FIXTURES=1 cargo test --test set_status_fixtures`.
//!
//! | file | phase |
//! |---|---|
//! | `set-just-applied.json` | created, the operator has not written status yet |
//! | `set-paused.json` | `spec.paused`, the selection resolved (`Reconciling`, `Paused`) |
//! | `set-rolling-out.json` | children requested, some working (`Reconciling`, `RollingOut`) |
//! | `set-converged.json` | every selected device Ready (`Ready=True`, `Converged`) |
//! | `set-too-large.json` | the selection is larger than `maxDevices` (`Stalled`, `SelectionTooLarge`) |
//! | `set-new-generation.json` | `set-converged.json` after a spec edit (generation 2) the operator has not observed yet |

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use mde_isolation_operator::conditions::{self, READY, RECONCILING, STALLED};
use mde_isolation_operator::crd::{
    COMMENT_ANNOTATION, DeviceIsolationSetSpec, DeviceIsolationSetStatus, Selection,
};
use mde_isolation_operator::fleet::rollout::{self, ChildState, Decision};
use mde_isolation_operator::fleet::{SetReason, select};
use mde_isolation_operator::mde::model::Machine;
use serde_json::{Value, json};

/// Namespace of every fixture object.
const NAMESPACE: &str = "secops";
/// The comment annotation of every fixture object.
const COMMENT: &str = "Contain the devices beaconing to the C2 of INC-4711";
/// The MDE tag the fixtures select by.
const TAG: &str = "INC-4711";
/// The tagged machines MDE lists, by DNS name; the last one is excluded by the spec.
const MACHINES: [(&str, &str); 4] = [
    (
        "1e5bc9d7e413ddd7902c2932e418702b84d0cc07",
        "ws-0042.corp.example",
    ),
    (
        "2b7f0c1d9a8e6f5d4c3b2a1908f7e6d5c4b3a291",
        "ws-0107.corp.example",
    ),
    (
        "3c8e1d2f0a9b7c6d5e4f3a2b1c0d9e8f7a6b5c40",
        "ws-0213.corp.example",
    ),
    (
        "4d9f2e3a1b0c8d7e6f5a4b3c2d1e0f9a8b7c6d51",
        "jump-01.corp.example",
    ),
];

/// A fixed instant: 2026-11-28T10:00:00Z plus `min` minutes.
fn t(min: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
        .expect("valid time")
        .with_timezone(&Utc)
        + chrono::Duration::minutes(min)
}

/// The machines `GET /api/machines` returns for the selector's tag.
fn listed_machines() -> Vec<Machine> {
    MACHINES
        .iter()
        .map(|(id, name)| {
            serde_json::from_value(json!({
                "id": id,
                "computerDnsName": name,
                "osPlatform": "Windows11",
                "healthStatus": "Active",
                "machineTags": [TAG],
                "rbacGroupName": "Workstations",
            }))
            .expect("a valid machine")
        })
        .collect()
}

/// A spec built from its JSON form, as a manifest would hold it: isolate every device tagged
/// [`TAG`] but the jump host, with `extra` fields on top.
fn spec(extra: Value) -> DeviceIsolationSetSpec {
    let mut spec = json!({
        "isolated": true,
        "isolationType": "Full",
        "driftPolicy": "Report",
        "selector": { "machineTags": [TAG] },
        "exclude": { "machineIds": [MACHINES[3].0] },
    });
    merge_patch(&mut spec, &extra);
    serde_json::from_value(spec).expect("a valid DeviceIsolationSet spec")
}

/// Applies a JSON merge patch (RFC 7386) to `target`, as the API server applies the
/// controller's status patches: `null` removes a field, objects merge, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().expect("an object");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// One DeviceIsolationSet as the controller and the API server see it.
struct Set {
    name: &'static str,
    generation: i64,
    spec: DeviceIsolationSetSpec,
    /// The status as stored: JSON, since the controller writes it as merge patches.
    status: Value,
}

impl Set {
    /// A freshly applied set: generation 1, the status the API server serves for it (the CRD
    /// defaults `status` to `{observedGeneration: 0}`, and `status.devices` to zero counts).
    fn applied(name: &'static str, spec: DeviceIsolationSetSpec) -> Self {
        let served = DeviceIsolationSetStatus {
            observed_generation: Some(0),
            ..DeviceIsolationSetStatus::default()
        };
        Set {
            name,
            generation: 1,
            spec,
            status: serde_json::to_value(served).expect("status serialises"),
        }
    }

    /// The stored status, typed.
    fn typed_status(&self) -> DeviceIsolationSetStatus {
        serde_json::from_value(self.status.clone()).expect("a valid DeviceIsolationSet status")
    }

    /// Resolves the selector at `now` as the controller's `resolve` does, against the machines
    /// MDE lists, and writes the selection.
    fn resolve(&mut self, now: DateTime<Utc>) -> Selection {
        let selector = &self.spec.selector;
        let picked = select::pick(&listed_machines(), selector, &self.spec.exclude, |_| {
            Vec::new()
        });
        let selection = Selection {
            count: picked.machines.len() as u32,
            resolved_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            excluded: picked.excluded,
            preview: picked.preview(),
            machine_ids: picked.machine_ids(),
            criteria: select::criteria(selector, &self.spec.exclude),
            refresh: None,
        };
        merge_patch(&mut self.status, &json!({ "selection": selection }));
        selection
    }

    /// One rollout decision at `now`, with the children standing as `children` say; its status
    /// patch is written as the controller writes it.
    fn step(&mut self, children: &[(usize, ChildState)], now: DateTime<Utc>) -> Decision {
        let status = self.typed_status();
        let selection = status.selection.clone().expect("a resolved selection");
        let children: HashMap<&str, ChildState> = children
            .iter()
            .map(|(i, state)| (MACHINES[*i].0, *state))
            .collect();
        let decision = rollout::plan(&rollout::Input {
            generation: self.generation,
            spec: &self.spec,
            has_comment: true,
            selection: &selection,
            children: &children,
            managed_elsewhere: &HashSet::new(),
            canary_passed_generation: status.canary_passed_generation,
            approval_threshold: 0,
            approved_by: None,
            requester: None,
            conditions: &status.conditions,
            now,
        });
        merge_patch(
            &mut self.status,
            &decision.status_patch(Some(self.generation)),
        );
        decision
    }

    /// `(type, status, reason)` of every condition of the stored status.
    fn conditions(&self) -> Vec<(String, String, String)> {
        self.typed_status()
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

    /// The object as `kubectl get -o json` shows it (without server-set metadata).
    fn to_json(&self) -> Value {
        // The status must be one the operator's own type reads back unchanged.
        let typed = serde_json::to_value(self.typed_status()).expect("status serialises");
        assert_eq!(typed, self.status, "{}: status round trip", self.name);
        json!({
            "apiVersion": "isolation.mde.dev/v1alpha1",
            "kind": "DeviceIsolationSet",
            "metadata": {
                "name": self.name,
                "namespace": NAMESPACE,
                "generation": self.generation,
                "annotations": { COMMENT_ANNOTATION: COMMENT },
            },
            "spec": serde_json::to_value(&self.spec).expect("spec serialises"),
            "status": self.status,
        })
    }
}

fn triple(type_: &str, status: &str, reason: SetReason) -> (String, String, String) {
    (type_.into(), status.into(), reason.as_str().into())
}

/// Every fixture, by file stem, driven through the rollout.
fn phases() -> BTreeMap<&'static str, Value> {
    use ChildState::{Pending, Ready};
    let mut out = BTreeMap::new();

    // Created: the operator has not reconciled it yet; only the CRD's defaults.
    let applied = Set::applied("set-just-applied", spec(json!({})));
    assert!(applied.typed_status().conditions.is_empty());
    out.insert("set-just-applied", applied.to_json());

    // Paused: the selection is resolved and shown, nothing is requested.
    let mut paused = Set::applied("set-paused", spec(json!({ "paused": true })));
    let selection = paused.resolve(t(0));
    assert_eq!((selection.count, selection.excluded), (3, 1));
    let decision = paused.step(&[], t(0));
    assert!(decision.admit.is_empty(), "a paused set requests nothing");
    assert_eq!(
        paused.conditions(),
        [
            triple(READY, "False", SetReason::Paused),
            triple(RECONCILING, "True", SetReason::Paused),
        ]
    );
    out.insert("set-paused", paused.to_json());

    // Rolling out: every selected device admitted at once (no canary), one child Ready so far.
    let roll_out = |name| {
        let mut set = Set::applied(name, spec(json!({})));
        set.resolve(t(0));
        let first = set.step(&[], t(0));
        assert_eq!(first.admit.len(), 3, "no canary: every device is requested");
        assert_eq!(first.reason, SetReason::RollingOut);
        let second = set.step(&[(0, Ready), (1, Pending), (2, Pending)], t(2));
        assert!(second.admit.is_empty(), "every child exists");
        assert_eq!(second.reason, SetReason::RollingOut);
        set
    };
    let rolling_out = roll_out("set-rolling-out");
    assert_eq!(
        rolling_out.conditions(),
        [
            triple(READY, "False", SetReason::RollingOut),
            triple(RECONCILING, "True", SetReason::RollingOut),
        ]
    );
    out.insert("set-rolling-out", rolling_out.to_json());

    // The same path, then every child is Ready.
    let mut converged = roll_out("set-converged");
    let done = converged.step(&[(0, Ready), (1, Ready), (2, Ready)], t(5));
    assert_eq!(done.reason, SetReason::Converged);
    assert_eq!(
        converged.conditions(),
        [triple(READY, "True", SetReason::Converged)]
    );
    out.insert("set-converged", converged.to_json());

    // Three devices selected, maxDevices 2: Stalled until the selector or the limit changes.
    let mut too_large = Set::applied("set-too-large", spec(json!({ "maxDevices": 2 })));
    too_large.resolve(t(0));
    let stalled = too_large.step(&[], t(0));
    assert!(stalled.admit.is_empty(), "a set too large requests nothing");
    assert_eq!(
        too_large.conditions(),
        [
            triple(READY, "False", SetReason::SelectionTooLarge),
            triple(STALLED, "True", SetReason::SelectionTooLarge),
        ]
    );
    out.insert("set-too-large", too_large.to_json());

    // `set-converged` after someone committed `isolated: false` (release the fleet): generation
    // 2, status still for 1.
    let new_generation = Set {
        name: "set-new-generation",
        generation: 2,
        spec: spec(json!({ "isolated": false })),
        status: converged.status.clone(),
    };
    let status = new_generation.typed_status();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        conditions::find(&status.conditions, READY).map(|c| c.status.as_str()),
        Some("True"),
        "a stale Ready=True is what this fixture is about"
    );
    assert_eq!(
        status.selection.map(|s| s.criteria),
        Some(select::criteria(
            &new_generation.spec.selector,
            &new_generation.spec.exclude
        )),
        "the edit keeps the selector: the selection stays"
    );
    out.insert("set-new-generation", new_generation.to_json());

    out
}

#[test]
fn committed_set_phase_fixtures_match_the_rollout() {
    common::fixtures::check(
        &common::fixtures::dir("set-phases"),
        &phases(),
        "set_status_fixtures",
    );
}

#[test]
fn set_phases_are_deterministic() {
    assert_eq!(
        phases(),
        phases(),
        "fixed inputs must give identical fixtures"
    );
}

#[test]
fn merge_patch_follows_rfc_7386() {
    let mut target = json!({ "a": 1, "b": { "c": 2, "d": 3 }, "e": [1, 2] });
    merge_patch(
        &mut target,
        &json!({ "a": null, "b": { "c": 4 }, "e": [3], "f": { "g": 5 } }),
    );
    assert_eq!(
        target,
        json!({ "b": { "c": 4, "d": 3 }, "e": [3], "f": { "g": 5 } })
    );
}
