//! The custom resources: `DeviceIsolation` (one device; its spec is what the user wants, its
//! status what the operator knows) and [`DeviceIsolationSet`] (many devices, through one child
//! DeviceIsolation each), and the annotations they read.
//!
//! The CRDs under `crds/` are generated from these types (`mde-isolation-operator crd`); a test
//! fails when the committed files drift from them.

pub mod connection;
pub mod set;

pub use connection::{ClusterMdeConnection, ConnectionKind, ConnectionRef, MdeConnection};
pub use set::*;

use chrono::{DateTime, Utc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSON, ValidationRule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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

/// Annotation naming who asked for the current spec and comment (enforced by the accountability
/// admission policy, `policies/accountability.yaml`, when it is installed).
pub const REQUESTED_BY_ANNOTATION: &str = "isolation.mde.dev/requested-by";

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
    ),
    printcolumn(
        name = "Release-At",
        type_ = "date",
        json_path = ".spec.releaseAt",
        priority = 1
    )
)]
#[x_kube(validation = kube::core::Rule::new("has(self.machineId) != has(self.deviceName)")
    .message("exactly one of machineId and deviceName must be set"))]
#[x_kube(validation = kube::core::Rule::new("has(self.machineId) == has(oldSelf.machineId)")
    .message("cannot switch between machineId and deviceName; create a new DeviceIsolation"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.releaseAt) || self.isolated")
    .message("releaseAt ends an isolation: it needs isolated: true"))]
#[x_kube(validation = kube::core::Rule::new("has(self.connectionRef) == has(oldSelf.connectionRef)")
    .message("connectionRef is immutable: create a new DeviceIsolation to use another connection"))]
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

    /// When an isolation ends by itself (RFC 3339, only with isolated: true): at that instant the
    /// device is released through the usual path (one Unisolate, its comment says why) and the
    /// resource becomes Ready with reason ReleasedOnSchedule. Editing it extends or shortens the
    /// isolation; a later instant after the release isolates again until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub release_at: Option<DateTime<Utc>>,

    /// True: no request is sent until a second person approves this generation (annotations
    /// isolation.mde.dev/approved-by and approved-generation); Reconciling with reason
    /// AwaitingApproval until then. A DeviceIsolationSet is gated by the operator's approval
    /// threshold instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_approval: bool,

    /// The MdeConnection (of this namespace) or ClusterMdeConnection whose tenant and app
    /// registration to call MDE with; without it, the operator's own (its flags). Immutable: the
    /// device's actions live in that tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("connectionRef is immutable"))]
    pub connection_ref: Option<ConnectionRef>,
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

pub(crate) fn is_zero(n: &u32) -> bool {
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

/// Annotation naming who approved the current generation (a second person: never the requester).
pub const APPROVED_BY_ANNOTATION: &str = "isolation.mde.dev/approved-by";

/// Annotation naming the generation the approval is for: a spec change needs a new approval.
pub const APPROVED_GENERATION_ANNOTATION: &str = "isolation.mde.dev/approved-generation";

/// Who approved generation `generation` of the object annotated so: `approved-by` when it is
/// set, is not the requester, and `approved-generation` is that generation. `None` otherwise.
pub fn approver<A: Annotations + ?Sized>(annotations: &A, generation: i64) -> Option<&str> {
    let by = annotations.trimmed(APPROVED_BY_ANNOTATION)?;
    let approved_generation = annotations.trimmed(APPROVED_GENERATION_ANNOTATION)?;
    let requester = annotations.trimmed(REQUESTED_BY_ANNOTATION);
    (approved_generation.parse::<i64>() == Ok(generation) && requester != Some(by)).then_some(by)
}

/// The annotations the operator reads of a DeviceIsolation (its watch cache keeps these and no
/// other, [`crate::cache::Notes`]).
pub const READ_ANNOTATIONS: [&str; 5] = [
    COMMENT_ANNOTATION,
    REQUESTED_BY_ANNOTATION,
    RETRY_ANNOTATION,
    APPROVED_BY_ANNOTATION,
    APPROVED_GENERATION_ANNOTATION,
];

/// Where an object's annotations are read: its metadata, or what the watch cache keeps of them.
pub trait Annotations {
    /// The annotation's value, as written.
    fn annotation(&self, key: &str) -> Option<&str>;

    /// The annotation's value, trimmed; `None` when missing or blank.
    fn trimmed(&self, key: &str) -> Option<&str> {
        self.annotation(key)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }
}

impl Annotations for ObjectMeta {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

impl DeviceIsolation {
    /// The machine acted on: spec.machineId, else the id resolved from spec.deviceName.
    pub fn machine_id(&self) -> Option<&str> {
        machine_of(&self.spec, self.status.as_ref())
    }
}

/// The machine a DeviceIsolation with `spec` and `status` acts on: spec.machineId, else the id
/// resolved from spec.deviceName.
pub fn machine_of<'a>(
    spec: &'a DeviceIsolationSpec,
    status: Option<&'a DeviceIsolationStatus>,
) -> Option<&'a str> {
    spec.machine_id
        .as_deref()
        .or_else(|| status?.machine_id.as_deref())
}

/// The operator's CRDs, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// `DeviceIsolation`.
    #[value(name = "DeviceIsolation")]
    DeviceIsolation,
    /// `DeviceIsolationSet`.
    #[value(name = "DeviceIsolationSet")]
    DeviceIsolationSet,
    /// `MdeConnection`.
    #[value(name = "MdeConnection")]
    MdeConnection,
    /// `ClusterMdeConnection`.
    #[value(name = "ClusterMdeConnection")]
    ClusterMdeConnection,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [
        Kind::DeviceIsolation,
        Kind::DeviceIsolationSet,
        Kind::MdeConnection,
        Kind::ClusterMdeConnection,
    ];

    /// The file under `crds/` (and the chart's `crds/`).
    pub fn file_name(self) -> &'static str {
        match self {
            Kind::DeviceIsolation => "deviceisolations.isolation.mde.dev.yaml",
            Kind::DeviceIsolationSet => "deviceisolationsets.isolation.mde.dev.yaml",
            Kind::MdeConnection => "mdeconnections.isolation.mde.dev.yaml",
            Kind::ClusterMdeConnection => "clustermdeconnections.isolation.mde.dev.yaml",
        }
    }
}

/// The DeviceIsolation CRD as installed (see [`crd_of`]).
pub fn crd() -> CustomResourceDefinition {
    crd_of(Kind::DeviceIsolation)
}

/// A CRD as installed: the derived one, with `status` defaulted to `{observedGeneration: 0}`.
///
/// The API server drops status on create, so without a default a resource the operator has not
/// reconciled yet has no status at all, and kstatus (Flux's `wait: true`) reads that as Current:
/// a just-applied release would look done. With the default it reads observedGeneration 0 below
/// metadata.generation, which is InProgress, until the operator writes status.
///
/// A set's name is its children's label value, so it is limited to 63 characters.
pub fn crd_of(kind: Kind) -> CustomResourceDefinition {
    let mut crd = match kind {
        Kind::DeviceIsolation => DeviceIsolation::crd(),
        Kind::DeviceIsolationSet => DeviceIsolationSet::crd(),
        Kind::MdeConnection => MdeConnection::crd(),
        Kind::ClusterMdeConnection => ClusterMdeConnection::crd(),
    };
    for version in &mut crd.spec.versions {
        let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        if kind == Kind::DeviceIsolationSet {
            root.x_kubernetes_validations = Some(vec![ValidationRule {
                rule: "size(self.metadata.name) <= 63".into(),
                message: Some(
                    "a DeviceIsolationSet's name is the value of its children's label \
                     isolation.mde.dev/set: at most 63 characters"
                        .into(),
                ),
                ..ValidationRule::default()
            }]);
        }
        if let Some(status) = root.properties.as_mut().and_then(|p| p.get_mut("status")) {
            status.default = Some(JSON(serde_json::json!({ "observedGeneration": 0 })));
        }
    }
    crd
}

/// The DeviceIsolation CRD rendered as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    crd_yaml_of(Kind::DeviceIsolation)
}

/// A CRD rendered as YAML, exactly as committed under `crds/`.
pub fn crd_yaml_of(kind: Kind) -> String {
    // serde_yaml output is deterministic for a given struct order, which is what the drift test needs.
    serde_yaml::to_string(&crd_of(kind)).expect("a CRD always serialises to YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_rust_types() {
        let dir = env!("CARGO_MANIFEST_DIR");
        for kind in Kind::ALL {
            let file = kind.file_name();
            let committed = std::fs::read_to_string(format!("{dir}/crds/{file}"))
                .unwrap_or_else(|_| panic!("crds/{file} is committed"));
            assert!(
                committed == crd_yaml_of(kind),
                "crds/{file} drifted from the Rust types: run `make crd`"
            );
        }
    }

    #[test]
    fn the_charts_crds_are_the_committed_crds() {
        let dir = env!("CARGO_MANIFEST_DIR");
        for kind in Kind::ALL {
            let file = kind.file_name();
            let chart =
                std::fs::read_to_string(format!("{dir}/charts/mde-isolation-operator/crds/{file}"))
                    .unwrap_or_else(|_| panic!("the chart ships {file}"));
            let committed = std::fs::read_to_string(format!("{dir}/crds/{file}")).unwrap();
            assert!(
                chart == committed,
                "charts/mde-isolation-operator/crds/{file} drifted: run `make crd`"
            );
        }
    }

    #[test]
    fn every_schema_property_has_a_description() {
        for kind in Kind::ALL {
            every_property_described(kind);
        }
    }

    fn every_property_described(kind: Kind) {
        let crd = serde_json::to_value(crd_of(kind)).unwrap();
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
            "{kind:?}: fields without a description: {missing:?}"
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
    fn an_approval_counts_for_its_generation_and_never_from_the_requester() {
        let meta = |pairs: &[(&str, &str)]| ObjectMeta {
            annotations: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        };
        let approved = meta(&[
            (REQUESTED_BY_ANNOTATION, "user-a"),
            (APPROVED_BY_ANNOTATION, "user-b"),
            (APPROVED_GENERATION_ANNOTATION, "2"),
        ]);
        assert_eq!(approver(&approved, 2), Some("user-b"));
        assert_eq!(
            approver(&approved, 3),
            None,
            "a spec change needs a new approval"
        );
        let own = meta(&[
            (REQUESTED_BY_ANNOTATION, "user-a"),
            (APPROVED_BY_ANNOTATION, "user-a"),
            (APPROVED_GENERATION_ANNOTATION, "2"),
        ]);
        assert_eq!(approver(&own, 2), None);
        let no_generation = meta(&[(APPROVED_BY_ANNOTATION, "user-b")]);
        assert_eq!(approver(&no_generation, 1), None);
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
                release_at: None,
                require_approval: false,
                connection_ref: None,
            },
        );
        assert_eq!(di.metadata.trimmed(COMMENT_ANNOTATION), None);
        di.metadata.annotations = Some([(COMMENT_ANNOTATION.to_string(), "  ".into())].into());
        assert_eq!(di.metadata.trimmed(COMMENT_ANNOTATION), None);
        di.metadata.annotations = Some([(COMMENT_ANNOTATION.to_string(), " ok ".into())].into());
        assert_eq!(di.metadata.trimmed(COMMENT_ANNOTATION), Some("ok"));
    }
}
