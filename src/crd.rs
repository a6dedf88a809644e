//! The `DeviceIsolation` custom resource: its spec (what the user wants), its status (what the
//! operator knows), and the annotations it reads.
//!
//! The CRD under `crds/` is generated from these types (`mde-isolation-operator crd`); a test fails
//! when the committed file drifts from them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSON,
};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::conditions::Condition;
use crate::mde::model::IsolationType;

/// Annotation holding the comment sent to MDE with every action (required).
///
/// It is an annotation, not a spec field, so that editing it never triggers a new action.
pub const COMMENT_ANNOTATION: &str = "isolation.mde.dev/comment";

/// Annotation that requests a fresh attempt (any new value), like Flux's `requestedAt`.
pub const RETRY_ANNOTATION: &str = "isolation.mde.dev/retry-requested-at";

/// Desired isolation state of one Defender for Endpoint device.
// clippy reads the repeated `type_ = "string"` of the printer columns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "isolation.mde.dev",
    version = "v1alpha1",
    kind = "DeviceIsolation",
    namespaced,
    status = "DeviceIsolationStatus",
    shortname = "di",
    category = "mde",
    doc = "DeviceIsolation declares whether one Microsoft Defender for Endpoint device should be \
           isolated from the network or released from isolation. Deleting it leaves the device as \
           it is.",
    printcolumn(name = "Machine", type_ = "string", json_path = ".spec.machineId"),
    // Want is the desired state (spec), Isolated the device's last known real state (status;
    // blank while unknown), so that a release still pending on an offline device never reads as
    // a released device.
    printcolumn(name = "Want", type_ = "boolean", json_path = ".spec.isolated"),
    printcolumn(name = "Isolated", type_ = "boolean", json_path = ".status.isolated"),
    printcolumn(name = "Action", type_ = "string", json_path = ".status.action.status"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Device",
        type_ = "string",
        json_path = ".spec.deviceName",
        priority = 1
    )
)]
#[x_kube(validation = kube::core::Rule::new("has(self.machineId) != has(self.deviceName)")
    .message("exactly one of machineId and deviceName must be set"))]
#[x_kube(validation = kube::core::Rule::new("has(self.machineId) == has(oldSelf.machineId)")
    .message("cannot switch between machineId and deviceName; create a new DeviceIsolation"))]
#[serde(rename_all = "camelCase")]
pub struct DeviceIsolationSpec {
    /// MDE machine id of the device: 40 lowercase hexadecimal characters. Immutable: create a new
    /// DeviceIsolation to manage another device. Exactly one of machineId and deviceName is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 40, max = 40), regex(pattern = r"^[0-9a-f]{40}$"))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("machineId is immutable"))]
    pub machine_id: Option<String>,

    /// The device's name as MDE knows it (computerDnsName, matched exactly, e.g.
    /// laptop-042.contoso.local), as an alternative to machineId. The operator resolves it once
    /// and records the machine id in status; it refuses when several devices carry the name.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("deviceName is immutable"))]
    pub device_name: Option<String>,

    /// Desired state: true isolates the device from the network, false releases it from
    /// isolation.
    pub isolated: bool,

    /// Kind of isolation requested when `isolated` is true: Full, Selective (Outlook, Teams and
    /// Skype keep working) or UnManagedDevice. Ignored when releasing.
    #[serde(default)]
    pub isolation_type: IsolationType,

    /// What to do when someone changes the device's isolation outside the operator (the portal,
    /// automatic attack disruption): Report (default) records it in status and an event and leaves
    /// the person's decision in place; Correct sends a new action to restore the desired state.
    #[serde(default)]
    pub drift_policy: DriftPolicy,
}

/// How the operator reacts to a device changed outside of it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum DriftPolicy {
    /// Report drift in status and events; never undo a person's decision.
    #[default]
    Report,
    /// Re-converge the device to the desired state.
    Correct,
}

/// Observed state of a DeviceIsolation, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIsolationStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The MDE machine id acted on: spec.machineId, or the id resolved from spec.deviceName.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,

    /// Last known real isolation state of the device, when known (from the outcome of the latest
    /// succeeded Isolate or Unisolate action).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolated: Option<bool>,

    /// The MDE machine action serving the observed generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<TrackedAction>,

    /// Recorded before an action is requested, so that a crash between the request and the
    /// status write can be recovered by finding the action whose comment carries the marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,

    /// Isolate/Unisolate requests made for the observed generation; numbers the audit markers so
    /// that every request can be told apart in MDE's history.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requests: u32,

    /// Failed or timed-out attempts for the observed generation (reset by a retry request); the
    /// retry backoff and limit count these.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_attempts: u32,

    /// Earliest time (RFC 3339) of the next attempt after a failed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,

    /// Value of the retry-requested-at annotation that was last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_retry: Option<String>,

    /// Ready, Reconciling and Stalled conditions (kstatus conventions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A machine action as last seen in MDE.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackedAction {
    /// MDE machine action id (a GUID).
    pub id: String,
    /// Action type: Isolate or Unisolate.
    #[serde(rename = "type")]
    pub action_type: String,
    /// Action status: Pending, InProgress, Succeeded, Failed, TimeOut or Cancelled.
    pub status: String,
    /// Who requested the action in MDE (an app name or a person's UPN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requestor: Option<String>,
    /// When MDE created the action (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// When MDE last updated the action (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// The operator's record that it is about to request an action.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    /// Generation the action is for.
    pub generation: i64,
    /// Action type to request: Isolate or Unisolate.
    #[serde(rename = "type")]
    pub action_type: String,
    /// Attempt number for this generation, starting at 1.
    pub attempt: u32,
    /// Audit tag appended to the MDE comment; it identifies the action in MDE's history.
    pub marker: String,
    /// When the intent was recorded (RFC 3339).
    pub recorded_at: String,
}

impl DeviceIsolation {
    /// The comment annotation, trimmed; `None` when missing or blank.
    pub fn comment(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(COMMENT_ANNOTATION))
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
    }

    /// The machine acted on: spec.machineId, else the id resolved from spec.deviceName.
    pub fn machine_id(&self) -> Option<&str> {
        self.spec
            .machine_id
            .as_deref()
            .or_else(|| self.status.as_ref()?.machine_id.as_deref())
    }

    /// The retry-request annotation value, if any.
    pub fn retry_request(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RETRY_ANNOTATION))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// The CRD as installed: the derived one, with `status` defaulted to `{observedGeneration: 0}`.
///
/// The API server drops status on create, so without a default a resource the operator has not
/// reconciled yet has no status at all, and kstatus (Flux's `wait: true`) reads that as Current:
/// a just-applied release would look done. With the default it reads observedGeneration 0 below
/// metadata.generation, which is InProgress, until the operator writes status.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = DeviceIsolation::crd();
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        if let Some(status) = status {
            status.default = Some(JSON(serde_json::json!({ "observedGeneration": 0 })));
        }
    }
    crd
}

/// The CRD rendered as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    let crd = crd();
    // serde_yaml output is deterministic for a given struct order, which is what the drift test needs.
    serde_yaml::to_string(&crd).expect("a CRD always serialises to YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_matches_the_rust_types() {
        let committed = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crds/deviceisolations.isolation.mde.dev.yaml"
        ))
        .expect("crds/deviceisolations.isolation.mde.dev.yaml is committed");
        assert!(
            committed == crd_yaml(),
            "crds/ drifted from the Rust types: run `make crd`"
        );
    }

    #[test]
    fn the_charts_crd_is_the_committed_crd() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let file = "deviceisolations.isolation.mde.dev.yaml";
        let chart =
            std::fs::read_to_string(format!("{dir}/charts/mde-isolation-operator/crds/{file}"))
                .expect("the chart ships the CRD");
        let committed = std::fs::read_to_string(format!("{dir}/crds/{file}")).unwrap();
        assert!(
            chart == committed,
            "charts/mde-isolation-operator/crds/ drifted: run `make crd`"
        );
    }

    #[test]
    fn every_schema_property_has_a_description() {
        let crd = serde_json::to_value(crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        fn walk(path: &str, node: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
                for (name, child) in props {
                    let here = format!("{path}.{name}");
                    // metadata/apiVersion/kind are Kubernetes' own and documented by the server.
                    let own = !matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
                    if own && child.get("description").is_none() {
                        missing.push(here.clone());
                    }
                    walk(&here, child, missing);
                }
            }
            if let Some(items) = node.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        walk("", schema, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }

    #[test]
    fn machine_id_is_validated_and_immutable_in_the_schema() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let machine = &spec["properties"]["machineId"];
        assert_eq!(machine["pattern"], "^[0-9a-f]{40}$");
        assert_eq!(
            machine["x-kubernetes-validations"][0]["rule"],
            "self == oldSelf"
        );
        let required: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            required,
            ["isolated"],
            "machineId or deviceName, by a CEL rule"
        );
        let rules: Vec<&str> = spec["x-kubernetes-validations"]
            .as_array()
            .expect("spec-level CEL rules")
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert!(rules.contains(&"has(self.machineId) != has(self.deviceName)"));
        assert_eq!(spec["properties"]["isolationType"]["default"], "Full");
        let status =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert_eq!(
            status["default"],
            serde_json::json!({"observedGeneration": 0})
        );
    }

    #[test]
    fn comment_annotation_is_trimmed_and_blank_means_missing() {
        let mut di = DeviceIsolation::new(
            "x",
            DeviceIsolationSpec {
                machine_id: Some("a".repeat(40)),
                device_name: None,
                isolated: false,
                isolation_type: IsolationType::Full,
                drift_policy: DriftPolicy::Report,
            },
        );
        assert_eq!(di.comment(), None);
        di.metadata.annotations = Some([(COMMENT_ANNOTATION.to_string(), "  ".into())].into());
        assert_eq!(di.comment(), None);
        di.metadata.annotations = Some([(COMMENT_ANNOTATION.to_string(), " ok ".into())].into());
        assert_eq!(di.comment(), Some("ok"));
    }
}
