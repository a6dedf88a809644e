//! `MdeConnection` and `ClusterMdeConnection`: a tenant and an app registration to call MDE with
//! (Crossplane's ProviderConfig, external-secrets' SecretStore / ClusterSecretStore). A
//! DeviceIsolation or DeviceIsolationSet names one in `spec.connectionRef`; without it the
//! operator's own connection (its flags) is used. [`crate::connection`] runs them: each has its
//! own token cache, quota gate, batch poller and view of actions.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::conditions::Condition;
use crate::mde::cloud::{Cloud, Region};

/// A connection's settings, the same for both kinds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSettings {
    /// The Entra ID tenant: a GUID or a domain name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
    )]
    pub tenant_id: String,

    /// The application (client) id of the app registration.
    #[schemars(length(min = 1, max = 253))]
    pub client_id: String,

    /// How the app proves who it is: exactly one of clientSecret, certificate and
    /// workloadIdentity.
    pub credential: Credential,

    /// Microsoft cloud: commercial (default), gcc, gcc-high or dod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudName>,

    /// Regional host of the commercial cloud (us, eu, uk, au, swa, ina). Ignored with apiUrl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<RegionName>,

    /// MDE API base URL, overriding the cloud preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub api_url: Option<String>,

    /// Entra ID authority URL, overriding the cloud preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub authority: Option<String>,

    /// OAuth scope requested for tokens, overriding the cloud preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,

    /// Share of MDE's per-API quota (100/min, 1,500/h for this tenant and app) the operator may
    /// use through this connection, in (0, 1]; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub quota_budget: Option<f64>,
}

/// The one credential of a connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.clientSecret) ? 1 : 0) + (has(self.certificate) ? 1 : 0) + \
     (has(self.workloadIdentity) ? 1 : 0) == 1"
).message("exactly one of clientSecret, certificate and workloadIdentity must be set"))]
pub struct Credential {
    /// A client secret: a key of a Secret (in the connection's namespace; for a
    /// ClusterMdeConnection, in the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<SecretKeyRef>,

    /// A certificate credential: a Secret holding the certificate and its private key as PEM
    /// (a kubernetes.io/tls Secret by default keys), in the same namespace as a client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateRef>,

    /// The operator's own workload identity: its projected service-account token
    /// (AZURE_FEDERATED_TOKEN_FILE), which this app registration must trust. No other
    /// identity can be borrowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,
}

/// One key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key whose value is the client secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret with a certificate and its key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The key holding the PEM certificate (default tls.crt).
    #[serde(default = "default_certificate_key")]
    pub certificate_key: String,
    /// The key holding the PEM private key (default tls.key).
    #[serde(default = "default_private_key_key")]
    pub private_key_key: String,
}

fn default_certificate_key() -> String {
    "tls.crt".into()
}

fn default_private_key_key() -> String {
    "tls.key".into()
}

/// The operator's own federated identity (no fields).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
pub struct WorkloadIdentity {}

/// A cloud preset by its flag name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CloudName {
    /// Commercial (worldwide).
    #[serde(rename = "commercial")]
    Commercial,
    /// US Government Community Cloud.
    #[serde(rename = "gcc")]
    Gcc,
    /// GCC High.
    #[serde(rename = "gcc-high")]
    GccHigh,
    /// US Department of Defense.
    #[serde(rename = "dod")]
    Dod,
}

impl From<CloudName> for Cloud {
    fn from(c: CloudName) -> Cloud {
        match c {
            CloudName::Commercial => Cloud::Commercial,
            CloudName::Gcc => Cloud::Gcc,
            CloudName::GccHigh => Cloud::GccHigh,
            CloudName::Dod => Cloud::Dod,
        }
    }
}

/// A regional host by its flag name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RegionName {
    /// United States.
    Us,
    /// Europe.
    Eu,
    /// United Kingdom.
    Uk,
    /// Australia.
    Au,
    /// Switzerland.
    Swa,
    /// India.
    Ina,
}

impl From<RegionName> for Region {
    fn from(r: RegionName) -> Region {
        match r {
            RegionName::Us => Region::Us,
            RegionName::Eu => Region::Eu,
            RegionName::Uk => Region::Uk,
            RegionName::Au => Region::Au,
            RegionName::Swa => Region::Swa,
            RegionName::Ina => Region::Ina,
        }
    }
}

/// A tenant and an app registration the resources of this namespace call MDE with.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "isolation.mde.dev",
    version = "v1alpha1",
    kind = "MdeConnection",
    plural = "mdeconnections",
    namespaced,
    status = "ConnectionStatus",
    shortname = "mdec",
    category = "mde",
    doc = "MdeConnection is a Microsoft Defender for Endpoint tenant and app registration that \
           DeviceIsolations and DeviceIsolationSets of its namespace name in spec.connectionRef. \
           Each connection has its own token cache, quota gate and view of actions.",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenantId"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Calls-1h",
        type_ = "integer",
        json_path = ".status.callsLastHour"
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
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MdeConnectionSpec {
    /// The tenant, the app and its credential.
    #[serde(flatten)]
    pub connection: ConnectionSettings,
}

/// A connection every namespace its `namespaces` allows may use.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "isolation.mde.dev",
    version = "v1alpha1",
    kind = "ClusterMdeConnection",
    plural = "clustermdeconnections",
    status = "ConnectionStatus",
    shortname = "cmdec",
    category = "mde",
    doc = "ClusterMdeConnection is a Microsoft Defender for Endpoint tenant and app registration \
           that DeviceIsolations and DeviceIsolationSets of the namespaces it allows name in \
           spec.connectionRef. Its Secrets live in the operator's namespace.",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenantId"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Calls-1h",
        type_ = "integer",
        json_path = ".status.callsLastHour"
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
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMdeConnectionSpec {
    /// The tenant, the app and its credential.
    #[serde(flatten)]
    pub connection: ConnectionSettings,

    /// The namespaces whose resources may use this connection: those listed, and those whose
    /// labels match the selector. Neither given: none.
    #[serde(default)]
    pub namespaces: AllowedNamespaces,
}

/// Which namespaces may use a ClusterMdeConnection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Namespaces by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Namespaces by label (an empty selector matches every namespace, as Kubernetes selectors
    /// do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// What the operator last saw of a connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready once a token was obtained and the read permission verified; Stalled with
    /// AuthenticationFailed, Forbidden or CredentialMissing otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Calls sent through this connection in the last hour, every API together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_last_hour: Option<u32>,

    /// Use and limits of each API's quota, as the connection's gate counts and has learned them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quota: Vec<ApiQuota>,

    /// MDE's last 429 on this connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_throttled: Option<Throttled>,
}

/// One API's quota on one connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiQuota {
    /// The API (isolate, unisolate, listActions, getMachine, listMachines).
    pub api: String,
    /// Calls in the last minute.
    pub calls_last_minute: u32,
    /// Calls in the last hour.
    pub calls_last_hour: u32,
    /// Calls a minute the gate allows now (the budget, or less if MDE answered 429 earlier).
    pub limit_per_minute: u32,
    /// Calls an hour the gate allows now.
    pub limit_per_hour: u32,
}

/// A 429.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Throttled {
    /// The API that was refused.
    pub api: String,
    /// When (RFC 3339).
    pub at: String,
}

/// Which connection a resource calls MDE through.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRef {
    /// MdeConnection (in the resource's namespace) or ClusterMdeConnection.
    pub kind: ConnectionKind,
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The two kinds of connection.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum ConnectionKind {
    /// A namespaced MdeConnection.
    MdeConnection,
    /// A cluster-scoped ClusterMdeConnection.
    ClusterMdeConnection,
}

impl ConnectionKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::MdeConnection => "MdeConnection",
            ConnectionKind::ClusterMdeConnection => "ClusterMdeConnection",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn spec_of(
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> serde_json::Value {
        let schema = crd.spec.versions[0].schema.as_ref().unwrap();
        serde_json::to_value(schema.open_api_v3_schema.as_ref().unwrap()).unwrap()["properties"]
            ["spec"]
            .clone()
    }

    #[test]
    fn both_kinds_carry_the_same_settings_and_one_credential() {
        let namespaced = MdeConnection::crd();
        let cluster = ClusterMdeConnection::crd();
        assert_eq!(namespaced.spec.scope, "Namespaced");
        assert_eq!(cluster.spec.scope, "Cluster");
        for crd in [&namespaced, &cluster] {
            let spec = spec_of(crd);
            let required: Vec<&str> = spec["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(required.contains(&"tenantId") && required.contains(&"clientId"));
            assert!(required.contains(&"credential"));
            let rule = &spec["properties"]["credential"]["x-kubernetes-validations"][0]["rule"];
            assert!(rule.as_str().unwrap().ends_with("== 1"), "{rule}");
        }
        assert!(spec_of(&cluster)["properties"]["namespaces"].is_object());
        assert!(
            spec_of(&namespaced)["properties"]
                .get("namespaces")
                .is_none()
        );
    }

    #[test]
    fn a_connection_ref_names_its_kind() {
        let r: ConnectionRef = serde_json::from_value(
            serde_json::json!({"kind": "ClusterMdeConnection", "name": "t"}),
        )
        .unwrap();
        assert_eq!(r.kind, ConnectionKind::ClusterMdeConnection);
        assert!(
            serde_json::from_value::<ConnectionRef>(
                serde_json::json!({"kind": "Secret", "name": "t"})
            )
            .is_err()
        );
    }
}
