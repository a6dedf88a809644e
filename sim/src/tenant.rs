//! What a simulated tenant holds: machines (with the behaviour that drives their actions) and
//! the registered apps, built from the seed file and/or generated deterministically, and the
//! seed shapes of named tenants.

use std::path::Path;

use chrono::{DateTime, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::clock::{add_seconds, fmt7, truncate};
use crate::credentials::{FederatedCredential, RegisteredCertificate, TOKEN_EXCHANGE_AUDIENCE};
use crate::foreign::LoadEntry;
use crate::lifecycle::IsolationType;

/// `requestSource` of actions made outside the public API when nothing else is named: a person
/// in the portal (`isolate-external`) and, by default, a seed's `isolatedBy`.
pub const PORTAL_SOURCE: &str = "Portal";

/// The device group of machines in no group (its `rbacGroupId` is 0).
pub const UNASSIGNED_GROUP: &str = "UnassignedGroup";

/// Domain of generated machine names unless a tenant names another.
pub const DEFAULT_DOMAIN: &str = "contoso.local";

/// How a machine reacts to isolation actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behaviour {
    /// Picks actions up after the pending delay and completes them.
    #[default]
    Online,
    /// Never picks actions up: they stay Pending, then end as TimeOut.
    Offline,
    /// Picks actions up and fails them.
    Failing,
    /// Its platform cannot be isolated: isolate/unisolate answer 400 OsPlatformNotSupported.
    Unsupported,
}

/// One device record.
#[derive(Debug, Clone)]
pub struct Machine {
    /// 40 lowercase hex characters.
    pub id: String,
    /// FQDN as MDE reports it.
    pub computer_dns_name: String,
    /// `Windows11`, `WindowsServer2022`, `Linux`, ...
    pub os_platform: String,
    /// `Active`, `Inactive`, ...
    pub health_status: String,
    /// `Onboarded` normally.
    pub onboarding_status: String,
    /// Tags set in the portal.
    pub machine_tags: Vec<String>,
    /// Device group name.
    pub rbac_group_name: String,
    /// Device group id (a number, as in real responses).
    pub rbac_group_id: i64,
    /// First time the sensor reported.
    pub first_seen: DateTime<Utc>,
    /// Last time the sensor reported.
    pub last_seen: DateTime<Utc>,
    /// Last internal IP address.
    pub last_ip_address: String,
    /// Reaction to actions.
    pub behaviour: Behaviour,
    /// Isolation state before any action of this run.
    pub initially_isolated: bool,
    /// Who isolated it before the run (a Succeeded Isolate put into its history); implies
    /// `initially_isolated`.
    pub isolated_by: Option<IsolatedBy>,
}

/// The isolation of a seeded machine by someone else before (or at) the simulated start.
#[derive(Debug, Clone)]
pub struct IsolatedBy {
    /// `requestor` of the action (a UPN, an app name, `Automatic Attack Disruption`, ...).
    pub requestor: String,
    /// `requestSource` of the action.
    pub request_source: String,
    /// Its creation (and completion) time.
    pub at: DateTime<Utc>,
    /// `requestorComment`.
    pub comment: String,
    /// Its `scope`.
    pub isolation_type: IsolationType,
}

impl Machine {
    /// The API representation (GET /api/machines/{id}).
    pub fn view(&self) -> MachineView<'_> {
        MachineView {
            id: &self.id,
            computer_dns_name: &self.computer_dns_name,
            first_seen: fmt7(self.first_seen),
            last_seen: fmt7(self.last_seen),
            os_platform: &self.os_platform,
            version: os_version(&self.os_platform),
            os_processor: "x64",
            last_ip_address: &self.last_ip_address,
            last_external_ip_address: "203.0.113.10",
            agent_version: "10.8760.19041.5247",
            os_build: 19045,
            health_status: &self.health_status,
            device_value: DEVICE_VALUE,
            rbac_group_id: self.rbac_group_id,
            rbac_group_name: &self.rbac_group_name,
            risk_score: RISK_SCORE,
            exposure_level: EXPOSURE_LEVEL,
            is_aad_joined: false,
            aad_device_id: None,
            machine_tags: &self.machine_tags,
            defender_av_status: "Updated",
            onboarding_status: &self.onboarding_status,
            os_architecture: "64-bit",
            managed_by: "MicrosoftDefenderForEndpoint",
            managed_by_status: "Success",
            ip_addresses: Vec::new(),
            vm_metadata: None,
            is_potential_duplication: false,
            merged_into_machine_id: None,
        }
    }
}

/// `deviceValue` of every machine.
pub const DEVICE_VALUE: &str = "Normal";
/// `riskScore` of every machine.
pub const RISK_SCORE: &str = "None";
/// `exposureLevel` of every machine.
pub const EXPOSURE_LEVEL: &str = "Low";

/// `version` of a platform ("" when it has none).
pub fn os_version(platform: &str) -> &'static str {
    match platform {
        "Windows10" => "22H2",
        "Windows11" => "23H2",
        "WindowsServer2019" => "1809",
        "WindowsServer2022" => "21H2",
        _ => "",
    }
}

/// Wire shape of a machine (a representative subset of the real fields).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineView<'a> {
    id: &'a str,
    computer_dns_name: &'a str,
    first_seen: String,
    last_seen: String,
    os_platform: &'a str,
    version: &'static str,
    os_processor: &'static str,
    last_ip_address: &'a str,
    last_external_ip_address: &'static str,
    agent_version: &'static str,
    os_build: i64,
    health_status: &'a str,
    device_value: &'static str,
    rbac_group_id: i64,
    rbac_group_name: &'a str,
    risk_score: &'static str,
    exposure_level: &'static str,
    is_aad_joined: bool,
    aad_device_id: Option<String>,
    machine_tags: &'a [String],
    defender_av_status: &'static str,
    onboarding_status: &'a str,
    os_architecture: &'static str,
    managed_by: &'static str,
    managed_by_status: &'static str,
    ip_addresses: Vec<serde_json::Value>,
    vm_metadata: Option<serde_json::Value>,
    is_potential_duplication: bool,
    merged_into_machine_id: Option<String>,
}

/// A registered application (client credentials).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct App {
    /// Client id.
    pub client_id: String,
    /// Client secret; `None` for apps that only use assertions.
    #[serde(skip_serializing)]
    pub client_secret: Option<String>,
    /// Application roles (`Machine.Isolate`, `Machine.Read.All`, ...).
    pub roles: Vec<String>,
    /// Display name, written as `requestor` on the actions it creates.
    pub display_name: String,
    /// Accept `client_assertion` JWTs without verifying them (structure and `iss` = `sub` =
    /// client id only). Only for apps with no certificates and no federated credentials.
    pub allow_assertion: bool,
    /// Registered certificates (certificate credentials).
    #[serde(skip)]
    pub certificates: Vec<RegisteredCertificate>,
    /// Federated identity credentials (workload identity).
    #[serde(skip)]
    pub federated: Vec<FederatedCredential>,
}

/// The YAML seed file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedFile {
    /// Machines, in listing order.
    #[serde(default)]
    pub machines: Vec<SeedMachine>,
    /// Apps; when empty the default app of the command line is used.
    #[serde(default)]
    pub apps: Vec<SeedApp>,
    /// Named tenants besides the default one (the top level).
    #[serde(default)]
    pub tenants: Vec<SeedTenant>,
}

/// A named tenant in the seed file (or the body of `POST /sim/tenants`): its token URL's tenant
/// id selects it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedTenant {
    /// A GUID or domain name, compared case-insensitively.
    pub tenant_id: String,
    /// Its apps (at least one): a named tenant has no default app.
    pub apps: Vec<SeedApp>,
    /// Machines, in listing order (before the generated ones).
    #[serde(default)]
    pub machines: Vec<SeedMachine>,
    /// Machines generated as `--machines` does for the default tenant.
    #[serde(default)]
    pub generate: Option<SeedGenerate>,
    /// Foreign load on its apps' quota, as `--foreign-load` for the default tenant.
    #[serde(default)]
    pub foreign_load: Vec<LoadEntry>,
}

/// `generate` of a named tenant.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedGenerate {
    /// How many (`host-0001.<domain>`, ...).
    pub count: usize,
    /// Share of them that is offline.
    #[serde(default)]
    pub offline_ratio: f64,
    /// Share of them that fails actions.
    #[serde(default)]
    pub failing_ratio: f64,
    /// Domain of their names; default `contoso.local`.
    pub domain: Option<String>,
}

impl SeedGenerate {
    /// Rejects what the simulator cannot generate.
    pub fn validate(&self) -> Result<(), String> {
        if self.count > 100_000 {
            return Err("generate.count must be 0..=100000".into());
        }
        let ratio = |r: f64| r.is_finite() && (0.0..=1.0).contains(&r);
        if !ratio(self.offline_ratio)
            || !ratio(self.failing_ratio)
            || self.offline_ratio + self.failing_ratio > 1.0
        {
            return Err(
                "generate: offlineRatio and failingRatio must be 0..1, their sum at most 1".into(),
            );
        }
        if self.domain.as_deref().is_some_and(|d| !is_tenant_id(d)) {
            return Err("generate.domain must be a domain name".into());
        }
        Ok(())
    }
}

/// Whether `id` can be a tenant id in a token URL: a GUID or a domain name.
pub fn is_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A machine in the seed file (or in POST /sim/machines).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedMachine {
    /// 40 lowercase hex characters; generated when absent.
    pub id: Option<String>,
    /// FQDN.
    pub computer_dns_name: String,
    /// Default `Windows11`.
    pub os_platform: Option<String>,
    /// Default `Active` (`Inactive` for offline machines).
    pub health_status: Option<String>,
    /// Default none.
    #[serde(default)]
    pub machine_tags: Vec<String>,
    /// Default online.
    #[serde(default, alias = "behavior")]
    pub behaviour: Behaviour,
    /// Isolated before the run starts (default false, or true with `isolatedBy`).
    #[serde(default, alias = "initiallyIsolated")]
    pub isolated: Option<bool>,
    /// Isolated before the run by a named requestor: a Succeeded Isolate in its history.
    pub isolated_by: Option<SeedIsolatedBy>,
    /// Default `UnassignedGroup`.
    pub rbac_group_name: Option<String>,
    /// Default `Onboarded`.
    pub onboarding_status: Option<String>,
}

/// `isolatedBy` of a seed machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedIsolatedBy {
    /// Required, not empty.
    pub requestor: String,
    /// Default `Portal`.
    pub request_source: Option<String>,
    /// RFC 3339 time, not later than the simulated start (or now, at run time); default: that.
    pub at: Option<String>,
    /// Default `Isolated by {requestor}`.
    pub comment: Option<String>,
    /// `Full` (default), `Selective` or `UnManagedDevice`.
    pub isolation_type: Option<IsolationType>,
}

impl SeedIsolatedBy {
    /// Checks and completes it; `now` is the default and latest `at`.
    pub fn resolve(self, now: DateTime<Utc>) -> Result<IsolatedBy, String> {
        if self.requestor.trim().is_empty() {
            return Err("isolatedBy.requestor must not be empty".into());
        }
        let request_source = self
            .request_source
            .unwrap_or_else(|| PORTAL_SOURCE.to_string());
        if request_source.trim().is_empty() {
            return Err("isolatedBy.requestSource must not be empty".into());
        }
        let at = match self.at {
            None => now,
            Some(s) => DateTime::parse_from_rfc3339(s.trim())
                .map(|t| truncate(t.with_timezone(&Utc)))
                .map_err(|e| {
                    format!("isolatedBy.at {s:?} is not an RFC 3339 time such as 2026-12-01T10:00:00Z: {e}")
                })?,
        };
        if at > now {
            return Err(format!(
                "isolatedBy.at {} is later than the simulated time {}",
                fmt7(at),
                fmt7(now)
            ));
        }
        Ok(IsolatedBy {
            comment: self
                .comment
                .unwrap_or_else(|| format!("Isolated by {}", self.requestor)),
            requestor: self.requestor,
            request_source,
            at,
            isolation_type: self.isolation_type.unwrap_or(IsolationType::Full),
        })
    }
}

/// An app in the seed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedApp {
    /// Client id.
    pub client_id: String,
    /// Client secret (omit for assertion-only apps).
    pub client_secret: Option<String>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Default: the client id.
    pub display_name: Option<String>,
    /// Default false: accept `client_assertion` JWTs without verifying their signature (for
    /// apps without certificates or federated credentials).
    #[serde(default)]
    pub allow_assertion: bool,
    /// Certificates for certificate credentials: PEM text, or the path of a PEM file
    /// (relative to the seed file).
    #[serde(default)]
    pub certificates: Vec<String>,
    /// Federated identity credentials.
    #[serde(default)]
    pub federated: Vec<SeedFederated>,
}

/// A federated identity credential in the seed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedFederated {
    /// Exact `iss` of accepted tokens (e.g. the cluster's service-account issuer URL).
    pub issuer: String,
    /// Exact `sub` (e.g. `system:serviceaccount:NAMESPACE:NAME`).
    pub subject: String,
    /// Required audience; default `api://AzureADTokenExchange`.
    #[serde(default = "exchange_audience")]
    pub audience: String,
    /// The issuer's keys as a JWKS: JSON text or a file path.
    pub jwks: Option<String>,
    /// The issuer's key as PEM (public key or certificate): text or a file path.
    pub public_key: Option<String>,
}

fn exchange_audience() -> String {
    TOKEN_EXCHANGE_AUDIENCE.to_string()
}

impl SeedApp {
    /// The registered app; file paths are relative to `base` (the seed file's directory).
    pub fn into_app(self, base: &Path) -> Result<App, String> {
        let id = self.client_id.clone();
        if self.allow_assertion && (!self.certificates.is_empty() || !self.federated.is_empty()) {
            return Err(format!(
                "app {id}: allowAssertion (unverified assertions) cannot be combined with certificates or federated credentials"
            ));
        }
        let certificates = self
            .certificates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                RegisteredCertificate::parse(c, base)
                    .map_err(|e| format!("app {id}: certificate {}: {e}", i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let federated = self
            .federated
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                FederatedCredential::new(
                    f.issuer,
                    f.subject,
                    f.audience,
                    f.jwks.as_deref(),
                    f.public_key.as_deref(),
                    base,
                )
                .map_err(|e| format!("app {id}: federated credential {}: {e}", i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(App {
            display_name: self.display_name.unwrap_or_else(|| self.client_id.clone()),
            client_id: self.client_id,
            client_secret: self.client_secret,
            roles: self.roles,
            allow_assertion: self.allow_assertion,
            certificates,
            federated,
        })
    }
}

/// Whether `id` looks like an MDE machine id.
pub fn is_machine_id(id: &str) -> bool {
    id.len() == 40
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A random machine id from the seeded generator.
pub fn random_machine_id(rng: &mut StdRng) -> String {
    (0..20)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// Builds a machine from a seed entry; `now` anchors lastSeen.
pub fn machine_from_seed(
    seed: SeedMachine,
    rng: &mut StdRng,
    now: DateTime<Utc>,
) -> Result<Machine, String> {
    let id = match seed.id {
        Some(id) if is_machine_id(&id) => id,
        Some(id) => {
            return Err(format!(
                "machine id {id:?} is not 40 lowercase hex characters"
            ));
        }
        None => random_machine_id(rng),
    };
    if seed.computer_dns_name.is_empty() {
        return Err(format!("machine {id} has an empty computerDnsName"));
    }
    let isolated_by = match seed.isolated_by {
        None => None,
        Some(_) if seed.isolated == Some(false) => {
            return Err(format!(
                "machine {id}: isolatedBy cannot be combined with isolated: false"
            ));
        }
        Some(_) if seed.behaviour == Behaviour::Unsupported => {
            return Err(format!(
                "machine {id}: isolatedBy on an unsupported platform (behaviour unsupported)"
            ));
        }
        Some(by) => Some(by.resolve(now).map_err(|e| format!("machine {id}: {e}"))?),
    };
    let default_health = if seed.behaviour == Behaviour::Offline {
        "Inactive"
    } else {
        "Active"
    };
    let last_seen = if seed.behaviour == Behaviour::Offline {
        add_seconds(now, -3.0 * 86400.0)
    } else {
        add_seconds(now, -(rng.random_range(1..600) as f64))
    };
    Ok(Machine {
        id,
        computer_dns_name: seed.computer_dns_name,
        os_platform: seed.os_platform.unwrap_or_else(|| "Windows11".into()),
        health_status: seed.health_status.unwrap_or_else(|| default_health.into()),
        onboarding_status: seed.onboarding_status.unwrap_or_else(|| "Onboarded".into()),
        machine_tags: seed.machine_tags,
        rbac_group_name: seed
            .rbac_group_name
            .unwrap_or_else(|| UNASSIGNED_GROUP.into()),
        rbac_group_id: 0,
        first_seen: add_seconds(now, -90.0 * 86400.0),
        last_seen,
        last_ip_address: format!(
            "10.0.{}.{}",
            rng.random_range(0..255),
            rng.random_range(1..255)
        ),
        behaviour: seed.behaviour,
        initially_isolated: seed.isolated.unwrap_or(false) || isolated_by.is_some(),
        isolated_by,
    })
}

const PLATFORMS: [&str; 5] = [
    "Windows11",
    "Windows10",
    "WindowsServer2022",
    "WindowsServer2019",
    "Linux",
];

/// Generates `count` machines numbered from `first_number` (`host-0001.<domain>`, ...);
/// behaviours follow the ratios, drawn from the seeded generator.
pub fn generate_machines(
    rng: &mut StdRng,
    first_number: usize,
    count: usize,
    offline_ratio: f64,
    failing_ratio: f64,
    domain: &str,
    now: DateTime<Utc>,
) -> Vec<Machine> {
    (0..count)
        .map(|i| {
            let n = first_number + i;
            let roll: f64 = rng.random();
            let behaviour = if roll < offline_ratio {
                Behaviour::Offline
            } else if roll < offline_ratio + failing_ratio {
                Behaviour::Failing
            } else {
                Behaviour::Online
            };
            let seed = SeedMachine {
                id: None,
                computer_dns_name: format!("host-{n:04}.{domain}"),
                os_platform: Some(PLATFORMS[n % PLATFORMS.len()].into()),
                health_status: None,
                machine_tags: Vec::new(),
                behaviour,
                isolated: None,
                isolated_by: None,
                rbac_group_name: None,
                onboarding_status: None,
            };
            machine_from_seed(seed, rng, now).expect("generated machines are valid")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-05T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// Parses one seed machine (YAML) and builds it.
    fn build(yaml: &str) -> Result<Machine, String> {
        let seed: SeedFile = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        let m = seed.machines.into_iter().next().expect("one machine");
        machine_from_seed(m, &mut StdRng::seed_from_u64(1), now())
    }

    fn err(yaml: &str) -> String {
        build(yaml).expect_err("should be refused")
    }

    #[test]
    fn isolated_by_with_every_field() {
        let m = build(
            r#"
machines:
  - computerDnsName: a.contoso.local
    isolatedBy:
      requestor: Automatic Attack Disruption
      requestSource: AutomaticAttackDisruption
      at: "2026-12-01T10:00:00.12345678+01:00"
      comment: Contained by attack disruption
      isolationType: Selective
"#,
        )
        .unwrap();
        assert!(m.initially_isolated);
        let by = m.isolated_by.unwrap();
        assert_eq!(by.requestor, "Automatic Attack Disruption");
        assert_eq!(by.request_source, "AutomaticAttackDisruption");
        // Converted to UTC and truncated to the 100 ns of the wire format.
        assert_eq!(fmt7(by.at), "2026-12-01T09:00:00.1234567Z");
        assert_eq!(by.comment, "Contained by attack disruption");
        assert_eq!(by.isolation_type, IsolationType::Selective);
    }

    #[test]
    fn isolated_by_defaults() {
        let m = build(
            r#"
machines:
  - computerDnsName: a.contoso.local
    isolated: true
    isolatedBy: {requestor: soc-analyst@contoso.com}
"#,
        )
        .unwrap();
        assert!(m.initially_isolated);
        let by = m.isolated_by.unwrap();
        assert_eq!(by.request_source, PORTAL_SOURCE);
        assert_eq!(by.at, now());
        assert_eq!(by.comment, "Isolated by soc-analyst@contoso.com");
        assert_eq!(by.isolation_type, IsolationType::Full);
        let plain = build("machines: [{computerDnsName: b.contoso.local}]").unwrap();
        assert!(!plain.initially_isolated && plain.isolated_by.is_none());
    }

    #[test]
    fn isolated_by_errors() {
        let m = "machines:\n  - computerDnsName: a.contoso.local\n";
        for (yaml, says) in [
            (
                "    isolatedBy: {requestor: x, requestsource: PublicApi}\n",
                "unknown field `requestsource`",
            ),
            (
                "    isolatedBy: {requestor: x, when: now}\n",
                "unknown field `when`",
            ),
            (
                "    isolatedBy: {requestSource: Portal}\n",
                "missing field `requestor`",
            ),
            (
                "    isolatedBy: {requestor: \" \"}\n",
                "requestor must not be empty",
            ),
            (
                "    isolatedBy: {requestor: x, requestSource: \"\"}\n",
                "requestSource must not be empty",
            ),
            (
                "    isolated: false\n    isolatedBy: {requestor: x}\n",
                "cannot be combined with isolated: false",
            ),
            (
                "    isolatedBy: {requestor: x, at: 2026-12-01}\n",
                "is not an RFC 3339 time",
            ),
            (
                "    isolatedBy: {requestor: x, at: \"2026-12-01T10:00:00\"}\n",
                "is not an RFC 3339 time",
            ),
            (
                "    isolatedBy: {requestor: x, at: yesterday}\n",
                "is not an RFC 3339 time",
            ),
            (
                "    isolatedBy: {requestor: x, at: \"2026-12-05T08:00:00.0000001Z\"}\n",
                "later than the simulated time",
            ),
            (
                "    isolatedBy: {requestor: x, isolationType: full}\n",
                "unknown variant `full`",
            ),
            (
                "    behaviour: unsupported\n    isolatedBy: {requestor: x}\n",
                "unsupported platform",
            ),
            (
                "    isolatedBy: Automatic Attack Disruption\n",
                "invalid type",
            ),
        ] {
            let e = err(&format!("{m}{yaml}"));
            assert!(e.contains(says), "{yaml}: {e}");
        }
    }
}
