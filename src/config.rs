//! Command-line and environment configuration. Every flag has an environment variable; the client
//! secret has no flag at all (command lines are visible to every local user and in `ps`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use url::Url;

use crate::mde::assertion::AssertionAlgorithm;
use crate::mde::cloud::Cloud;
use crate::telemetry::LogFormat;

/// Environment variable holding the client secret, when no secret file is given.
pub const CLIENT_SECRET_ENV: &str = "MDE_CLIENT_SECRET";

/// mde-isolation-operator: Microsoft Defender for Endpoint device isolation as code.
#[derive(Parser, Debug)]
#[command(name = "mde-isolation-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print a CustomResourceDefinition as YAML.
    Crd {
        /// Which one.
        #[arg(long, value_enum, default_value = "DeviceIsolation")]
        kind: crate::crd::Kind,
    },
}

/// Settings of `run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Namespace to watch; repeat the flag or separate with commas. Ignored with --all-namespaces.
    #[arg(
        long = "namespace",
        env = "MDE_WATCH_NAMESPACES",
        value_delimiter = ',',
        required_unless_present = "all_namespaces"
    )]
    pub namespaces: Vec<String>,

    /// Watch DeviceIsolations in every namespace (needs a ClusterRole).
    #[arg(long, env = "MDE_ALL_NAMESPACES")]
    pub all_namespaces: bool,

    /// Serve ClusterMdeConnections (cluster-scoped; needs a ClusterRole to read them and the
    /// namespaces' labels). Their Secrets are read in the operator's namespace (POD_NAMESPACE).
    #[arg(long, env = "MDE_CLUSTER_CONNECTIONS")]
    pub cluster_connections: bool,

    /// Microsoft cloud whose MDE API and sign-in authority to use.
    #[arg(long, env = "MDE_CLOUD", value_enum, default_value = "commercial")]
    pub cloud: Cloud,

    /// Regional host of the commercial cloud (us, eu, uk, au, swa, ina): faster, data stays in
    /// the region. Ignored when --api-url is given.
    #[arg(long, env = "MDE_REGION", value_enum)]
    pub region: Option<crate::mde::cloud::Region>,

    /// MDE API base URL, overriding the cloud preset (regional hosts, the simulator).
    #[arg(long, env = "MDE_API_URL")]
    pub api_url: Option<Url>,

    /// Entra ID authority URL, overriding the cloud preset. Falls back to AZURE_AUTHORITY_HOST
    /// (set by Azure workload identity).
    #[arg(long, env = "MDE_AUTHORITY", default_value = azure_env("AZURE_AUTHORITY_HOST"))]
    pub authority: Option<Url>,

    /// OAuth scope requested for tokens, overriding the cloud preset.
    #[arg(long, env = "MDE_SCOPE")]
    pub scope: Option<String>,

    /// Entra ID tenant id. Falls back to AZURE_TENANT_ID (set by Azure workload identity).
    #[arg(
        long,
        env = "MDE_TENANT_ID",
        default_value = azure_env("AZURE_TENANT_ID"),
        required = azure_env("AZURE_TENANT_ID").is_none()
    )]
    pub tenant_id: String,

    /// Application (client) id of the app registration. Falls back to AZURE_CLIENT_ID (set by
    /// Azure workload identity).
    #[arg(
        long,
        env = "MDE_CLIENT_ID",
        default_value = azure_env("AZURE_CLIENT_ID"),
        required = azure_env("AZURE_CLIENT_ID").is_none()
    )]
    pub client_id: String,

    /// File holding the client secret (e.g. a mounted Secret). Without it the secret is read from
    /// the MDE_CLIENT_SECRET environment variable.
    #[arg(long, env = "MDE_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,

    /// Certificate credential: PEM file with the certificate registered on the app (the first
    /// certificate in the file is used). It may also hold the private key.
    #[arg(long, env = "MDE_CLIENT_CERTIFICATE_FILE")]
    pub client_certificate_file: Option<PathBuf>,

    /// PEM file with the certificate's unencrypted RSA private key (PKCS#8 or PKCS#1). Without
    /// it the key is read from --client-certificate-file.
    #[arg(long, env = "MDE_CLIENT_KEY_FILE")]
    pub client_key_file: Option<PathBuf>,

    /// Signature algorithm of certificate assertions.
    #[arg(
        long,
        env = "MDE_ASSERTION_ALGORITHM",
        value_enum,
        ignore_case = true,
        default_value_t = AssertionAlgorithm::Ps256
    )]
    pub assertion_algorithm: AssertionAlgorithm,

    /// Workload identity: file holding a federated token (the projected service-account token
    /// that Azure workload identity mounts), read again for every token request.
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    pub federated_token_file: Option<PathBuf>,

    /// PEM file of extra CA certificates to trust for MDE and the authority (e.g. the
    /// simulator's). TLS verification is never switched off.
    #[arg(long, env = "MDE_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Share of MDE's per-API quota (100/min, 1,500/h) this operator may use, in (0, 1]. Leave
    /// room for the SOC's other tools that share the app's quota.
    #[arg(long, env = "MDE_QUOTA_BUDGET", default_value_t = 1.0, value_parser = parse_share)]
    pub quota_budget: f64,

    /// What MDE counts the budget against: `endpoint` (each API its own 100/min and 1,500/h, as
    /// documented) or `app` (one budget for all APIs of the app registration). Either way the
    /// operator learns from 429s what MDE actually allows.
    #[arg(long, env = "MDE_QUOTA_KEY", value_enum, default_value_t = crate::quota::QuotaKey::Endpoint)]
    pub quota_key: crate::quota::QuotaKey,

    /// Time compression for tests and demos against mde-sim's --time-scale: quota windows, poll
    /// intervals, retry delays and Retry-After are divided by it. 1 in production.
    #[arg(long, env = "MDE_TIME_SCALE", default_value_t = 1.0, value_parser = parse_scale)]
    pub time_scale: f64,

    /// Address of the HTTP endpoint serving /metrics, /livez and /readyz.
    #[arg(long, env = "MDE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "MDE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Plan and report in status what would be called; make no mutating MDE call.
    #[arg(long, env = "MDE_DRY_RUN")]
    pub dry_run: bool,

    /// Timeout of one MDE request, in seconds.
    #[arg(long, env = "MDE_REQUEST_TIMEOUT_SECONDS", default_value_t = 30)]
    pub request_timeout_seconds: u64,

    /// A DeviceIsolationSet selecting more devices than this waits (Reconciling,
    /// AwaitingApproval) until a second person approves it with the annotations
    /// isolation.mde.dev/approved-by and approved-generation; 0 turns the rule off.
    #[arg(long, env = "MDE_APPROVAL_THRESHOLD", default_value_t = 0)]
    pub approval_threshold: u32,

    /// Failed or timed-out actions before a resource stalls with RetriesExhausted.
    #[arg(long, env = "MDE_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    /// How often anyone's new isolation actions are read to detect drift while no action is
    /// open, in seconds (one list call per interval for the whole tenant).
    #[arg(long, env = "MDE_DRIFT_INTERVAL_SECONDS", default_value_t = 360)]
    pub drift_interval_seconds: u64,

    /// Resources reconciled at once.
    #[arg(long, env = "MDE_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,

    /// Elect a leader through a coordination.k8s.io/v1 Lease so that several replicas can run:
    /// only the holder reconciles and talks to MDE, the others keep their watch caches warm and
    /// take over when it stops renewing.
    #[arg(long, env = "MDE_LEADER_ELECTION")]
    pub leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "MDE_LEASE_NAME", default_value = "mde-isolation-operator")]
    pub lease_name: String,

    /// Namespace of the leader-election Lease [default: the POD_NAMESPACE environment variable,
    /// else the first watched namespace].
    #[arg(long, env = "MDE_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a leader's lease lasts without renewal, in seconds: a standby takes over this
    /// long after the leader's last renewal (at once when it released the lease). Not divided
    /// by --time-scale: it concerns Kubernetes, not MDE.
    #[arg(
        long,
        env = "MDE_LEASE_DURATION_SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub lease_duration_seconds: u64,
}

impl RunArgs {
    /// Scales a production duration to the configured time scale.
    pub fn scaled(&self, d: Duration) -> Duration {
        d.div_f64(self.time_scale)
    }

    /// Namespace of the leader-election Lease: `--lease-namespace`, else the pod's namespace
    /// (`POD_NAMESPACE`, which the chart sets), else the first watched namespace. `None` with
    /// `--all-namespaces` and neither of the first two.
    pub fn lease_namespace(&self) -> Option<String> {
        lease_namespace_from(
            self.lease_namespace.as_deref(),
            std::env::var("POD_NAMESPACE").ok().as_deref(),
            self.all_namespaces,
            &self.namespaces,
        )
    }
}

fn lease_namespace_from(
    flag: Option<&str>,
    pod_namespace: Option<&str>,
    all_namespaces: bool,
    watched: &[String],
) -> Option<String> {
    fn non_empty(s: Option<&str>) -> Option<&str> {
        s.map(str::trim).filter(|s| !s.is_empty())
    }
    non_empty(flag)
        .or(non_empty(pod_namespace))
        .or_else(|| {
            // --namespace is ignored with --all-namespaces, so it names no namespace then.
            (!all_namespaces)
                .then(|| non_empty(watched.first().map(String::as_str)))
                .flatten()
        })
        .map(str::to_string)
}

/// The value of `AZURE_*` variable `name` (set by Azure workload identity), when set and not
/// blank: the default of the matching `MDE_*` setting. Leaked: clap defaults are `'static`, and
/// the command is built once per process.
fn azure_env(name: &str) -> Option<&'static str> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    (!value.is_empty()).then(|| &*Box::leak(value.to_owned().into_boxed_str()))
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not in (0, 1]"))
    }
}

fn parse_scale(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v >= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} must be a number >= 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(
            [
                "mde-isolation-operator",
                "run",
                "--tenant-id",
                "t",
                "--client-id",
                "c",
            ]
            .iter()
            .chain(args),
        )
    }

    #[test]
    fn namespaces_repeat_or_split_on_commas() {
        let Command::Run(run) = parse(&["--namespace", "a,b", "--namespace", "c"])
            .unwrap()
            .command
        else {
            panic!("run expected")
        };
        assert_eq!(run.namespaces, ["a", "b", "c"]);
        assert_eq!(run.quota_budget, 1.0);
    }

    #[test]
    fn a_namespace_or_all_namespaces_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--all-namespaces"]).is_ok());
    }

    #[test]
    fn certificate_and_workload_identity_flags() {
        let Command::Run(run) = parse(&[
            "--all-namespaces",
            "--client-certificate-file",
            "/c.pem",
            "--client-key-file",
            "/k.pem",
            "--assertion-algorithm",
            "rs256",
            "--federated-token-file",
            "/token",
        ])
        .unwrap()
        .command
        else {
            panic!("run expected")
        };
        assert_eq!(run.client_certificate_file, Some(PathBuf::from("/c.pem")));
        assert_eq!(run.client_key_file, Some(PathBuf::from("/k.pem")));
        assert_eq!(run.assertion_algorithm, AssertionAlgorithm::Rs256);
        assert_eq!(run.federated_token_file, Some(PathBuf::from("/token")));
        let Command::Run(run) = parse(&["--all-namespaces"]).unwrap().command else {
            panic!("run expected")
        };
        assert_eq!(run.assertion_algorithm, AssertionAlgorithm::Ps256);
        assert!(parse(&["--all-namespaces", "--assertion-algorithm", "ES256"]).is_err());
    }

    #[test]
    fn bad_budget_and_scale_are_rejected_with_a_message() {
        let err = parse(&["--all-namespaces", "--quota-budget", "1.5"]).unwrap_err();
        assert!(err.to_string().contains("not in (0, 1]"));
        assert!(parse(&["--all-namespaces", "--time-scale", "0"]).is_err());
    }

    #[test]
    fn leader_election_is_off_by_default_with_a_15_second_lease() {
        let Command::Run(run) = parse(&["--namespace", "a"]).unwrap().command else {
            panic!("run expected")
        };
        assert!(!run.leader_election);
        assert_eq!(run.lease_name, "mde-isolation-operator");
        assert_eq!(run.lease_duration_seconds, 15);
        let Command::Run(run) = parse(&[
            "--namespace",
            "a",
            "--leader-election",
            "--lease-name",
            "l",
            "--lease-namespace",
            "n",
            "--lease-duration-seconds",
            "4",
        ])
        .unwrap()
        .command
        else {
            panic!("run expected")
        };
        assert!(run.leader_election);
        assert_eq!(run.lease_name, "l");
        assert_eq!(run.lease_namespace(), Some("n".into()));
        assert_eq!(run.lease_duration_seconds, 4);
        assert!(parse(&["--namespace", "a", "--lease-duration-seconds", "0"]).is_err());
    }

    #[test]
    fn the_lease_namespace_defaults_to_the_pods_then_the_first_watched() {
        let watched = ["w1".to_string(), "w2".to_string()];
        assert_eq!(
            lease_namespace_from(Some("flag"), Some("pod"), false, &watched),
            Some("flag".into())
        );
        assert_eq!(
            lease_namespace_from(None, Some("pod"), false, &watched),
            Some("pod".into())
        );
        assert_eq!(
            lease_namespace_from(Some(""), Some(" "), false, &watched),
            Some("w1".into())
        );
        assert_eq!(lease_namespace_from(None, None, true, &watched), None);
        assert_eq!(
            lease_namespace_from(None, Some("pod"), true, &[]),
            Some("pod".into())
        );
    }

    #[test]
    fn there_is_no_flag_for_the_client_secret() {
        assert!(parse(&["--all-namespaces", "--client-secret", "s"]).is_err());
    }
}
