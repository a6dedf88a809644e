//! The `DeviceIsolationSet` custom resource: one reviewed manifest that selects many devices and
//! owns one child `DeviceIsolation` per selected device ([`crate::fleet`] drives it).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Annotations, DriftPolicy, is_zero};
use crate::conditions::Condition;
use crate::mde::model::IsolationType;

/// Label every child DeviceIsolation carries: the name of its set.
pub const SET_LABEL: &str = "isolation.mde.dev/set";

/// Annotation that asks for the selection to be resolved again (any new value).
pub const REFRESH_ANNOTATION: &str = "isolation.mde.dev/refresh-requested-at";

/// Default of spec.maxDevices: Microsoft's advice is to contain up to 100 devices at a time.
pub const DEFAULT_MAX_DEVICES: u32 = 100;

/// Largest spec.maxDevices: the snapshot of the selection is kept in status (43 bytes a device),
/// and an object must stay well under the API server's 1.5 MiB.
pub const MAX_DEVICES_LIMIT: u32 = 20_000;

/// Devices listed in status.selection.preview.
pub const PREVIEW_LEN: usize = 50;

/// Desired isolation state of every device a selector picks out.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "isolation.mde.dev",
    version = "v1alpha1",
    kind = "DeviceIsolationSet",
    namespaced,
    status = "DeviceIsolationSetStatus",
    shortname = "dis",
    category = "mde",
    doc = "DeviceIsolationSet isolates or releases every Microsoft Defender for Endpoint device its \
           selector picks out, through one child DeviceIsolation per device. The selection is a \
           snapshot; paused, a canary and a failure budget steer the rollout.",
    printcolumn(name = "Desired", type_ = "boolean", json_path = ".spec.isolated"),
    printcolumn(
        name = "Selected",
        type_ = "integer",
        json_path = ".status.selection.count"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.devices.ready"),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.devices.pending"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.devices.failed"
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
        name = "Paused",
        type_ = "boolean",
        json_path = ".spec.paused",
        priority = 1
    ),
    printcolumn(
        name = "Release-At",
        type_ = "date",
        json_path = ".spec.releaseAt",
        priority = 1
    )
)]
#[x_kube(validation = kube::core::Rule::new("!has(self.releaseAt) || self.isolated")
    .message("releaseAt ends an isolation: it needs isolated: true"))]
#[x_kube(validation = kube::core::Rule::new("has(self.connectionRef) == has(oldSelf.connectionRef)")
    .message("connectionRef is immutable: create a new DeviceIsolationSet to use another connection"))]
#[serde(rename_all = "camelCase")]
pub struct DeviceIsolationSetSpec {
    /// Desired state of every selected device: true isolates, false releases.
    pub isolated: bool,

    /// Kind of isolation requested when `isolated` is true: Full, Selective or UnManagedDevice.
    #[serde(default)]
    pub isolation_type: IsolationType,

    /// What each child does when someone changes its device outside the operator: Report
    /// (default) or Correct.
    #[serde(default)]
    pub drift_policy: DriftPolicy,

    /// Which devices: every given criterion must hold (AND); at least one is required.
    pub selector: DeviceSelector,

    /// Devices never acted on, whatever the selector says.
    #[serde(default, skip_serializing_if = "Exclusion::is_empty")]
    pub exclude: Exclusion,

    /// Largest selection the set acts on; a larger one stalls (SelectionTooLarge) until this is
    /// raised. Default 100 (Microsoft's advice for containment at a time), at most 20000.
    #[serde(default = "default_max_devices")]
    #[schemars(range(min = 1, max = 20000))]
    pub max_devices: u32,

    /// True: resolve the selection and show it (status.selection), request nothing new.
    /// Requests already sent are followed to their end.
    #[serde(default)]
    pub paused: bool,

    /// How the children are admitted.
    #[serde(default)]
    pub rollout: Rollout,

    /// When the isolation of every selected device ends by itself (RFC 3339, only with
    /// isolated: true): each child carries it (see DeviceIsolation's releaseAt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub release_at: Option<chrono::DateTime<chrono::Utc>>,

    /// The MdeConnection (of this namespace) or ClusterMdeConnection to select and act through;
    /// each child carries it. Without it, the operator's own connection. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("connectionRef is immutable"))]
    pub connection_ref: Option<super::ConnectionRef>,
}

fn default_max_devices() -> u32 {
    DEFAULT_MAX_DEVICES
}

/// Which devices a set selects.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.machineIds) && size(self.machineIds) > 0) || \
     (has(self.deviceNames) && size(self.deviceNames) > 0) || \
     (has(self.machineTags) && size(self.machineTags) > 0) || \
     (has(self.rbacGroupNames) && size(self.rbacGroupNames) > 0) || has(self.isolatedBy)"
).message("the selector must name at least one criterion: machineIds, deviceNames, machineTags, rbacGroupNames or isolatedBy"))]
pub struct DeviceSelector {
    /// Explicit MDE machine ids (40 lowercase hexadecimal characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20000), inner(regex(pattern = r"^[0-9a-f]{40}$")))]
    pub machine_ids: Vec<String>,

    /// Exact computerDnsName values (no prefix or case-folded matching).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20000), inner(length(min = 1, max = 255)))]
    pub device_names: Vec<String>,

    /// The device carries every listed MDE tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(min = 1, max = 200)))]
    pub machine_tags: Vec<String>,

    /// The device is in one of these MDE device groups (rbacGroupName).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(min = 1, max = 255)))]
    pub rbac_group_names: Vec<String>,

    /// The device is isolated now, by an action matching every given field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolated_by: Option<IsolatedBy>,
}

/// Who isolated a device: matched against the latest succeeded Isolate/Unisolate action of the
/// device, which must be an Isolate. Empty strings count as not given.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.requestor) && self.requestor != '') || \
     (has(self.requestSource) && self.requestSource != '') || has(self.since)"
).message("isolatedBy needs requestor, requestSource or since"))]
pub struct IsolatedBy {
    /// The action's requestor, exactly (an app's name, a person's UPN, "Automatic Attack
    /// Disruption").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requestor: Option<String>,
    /// The action's requestSource, exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_source: Option<String>,
    /// The action was created at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub since: Option<String>,
}

/// Devices a set never acts on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exclusion {
    /// These machine ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20000), inner(regex(pattern = r"^[0-9a-f]{40}$")))]
    pub machine_ids: Vec<String>,
    /// Devices carrying any of these MDE tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(min = 1, max = 200)))]
    pub machine_tags: Vec<String>,
}

impl Exclusion {
    /// Nothing excluded.
    pub fn is_empty(&self) -> bool {
        self.machine_ids.is_empty() && self.machine_tags.is_empty()
    }
}

/// How a set admits its children.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Request this many devices first; the rest follow once they are all Ready. 0: no canary.
    #[serde(default)]
    pub canary: u32,
    /// More failed devices than this pause the set (FailureBudgetExceeded).
    #[serde(default)]
    pub max_failures: u32,
}

/// Observed state of a DeviceIsolationSet, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIsolationSetStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The snapshot of selected devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,

    /// Where the selected devices stand.
    #[serde(default)]
    pub devices: DeviceCounts,

    /// The generation whose canary passed (all canary devices Ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_passed_generation: Option<i64>,

    /// Ready, Reconciling and Stalled conditions (kstatus conventions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The devices a selector picked out when it was resolved.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    /// Devices selected (after exclusions).
    pub count: u32,
    /// When the selection was resolved (RFC 3339).
    pub resolved_at: String,
    /// Devices the exclusions removed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub excluded: u32,
    /// The first 50 selected devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preview: Vec<DevicePreview>,
    /// Every selected machine id, in rollout order (empty when the selection is larger than
    /// maxDevices allows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine_ids: Vec<String>,
    /// Digest of the selector and exclusions it was resolved for; another digest resolves anew.
    pub criteria: String,
    /// The refresh-requested-at annotation value it was resolved for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
}

/// One selected device as shown in the preview.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevicePreview {
    /// MDE machine id.
    pub machine_id: String,
    /// The device's DNS name, when MDE has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_dns_name: Option<String>,
}

/// Counts of the selected devices by where their child stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCounts {
    /// Devices in the selection.
    pub selected: u32,
    /// Devices with a child DeviceIsolation (admitted by the rollout).
    pub requested: u32,
    /// Children Ready.
    pub ready: u32,
    /// Children working (an action pending, an offline device, waiting for quota).
    pub pending: u32,
    /// Children stalled on something outside the device (a missing comment, a permission, a
    /// conflict, drift).
    pub stalled: u32,
    /// Children failed on the device itself (not found, unsupported, retries exhausted,
    /// cancelled).
    pub failed: u32,
    /// Selected devices another DeviceIsolation already manages (reported, not duplicated).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub managed_elsewhere: u32,
}

impl DeviceIsolationSet {
    /// The comment annotation, trimmed; `None` when missing or blank.
    pub fn comment(&self) -> Option<&str> {
        self.metadata.trimmed(super::COMMENT_ANNOTATION)
    }

    /// The requested-by annotation, trimmed; `None` when missing or blank.
    pub fn requested_by(&self) -> Option<&str> {
        self.metadata.trimmed(super::REQUESTED_BY_ANNOTATION)
    }

    /// The refresh-request annotation value, if any.
    pub fn refresh_request(&self) -> Option<&str> {
        self.metadata
            .annotation(REFRESH_ANNOTATION)
            .filter(|v| !v.is_empty())
    }
}
