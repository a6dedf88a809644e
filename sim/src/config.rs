//! Command-line (and `MDE_SIM_*` environment) configuration of the simulator.

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

/// What a second isolate/unisolate does while an Isolate/Unisolate action is open on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicateMode {
    /// 400 `ActiveRequestAlreadyExists` "Action is already in progress" (the documented answer).
    Reject,
    /// 201 with the open action of the same type (the other answer the seed page allows);
    /// a request of the opposite type is still rejected with 400.
    ReturnExisting,
    /// Create a second action, to demonstrate the out-of-order completion hazard.
    Allow,
}

/// In which order overlapping actions on one machine complete (only reachable in `allow` mode
/// or through the admin "external" actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlapOrder {
    /// The newest action completes first, the older ones after it (the reported hazard).
    Reversed,
    /// A seeded coin flip per overlap decides between `reversed` and `fifo`.
    Random,
    /// Actions complete in creation order.
    Fifo,
}

/// What the per-minute and per-hour budgets are counted per (always per app).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuotaKey {
    /// Each API name has its own budget (isolate, unisolate, each read...).
    Endpoint,
    /// One budget shared by every quota-counted API of the app.
    App,
}

/// How a 429 tells the client when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterMode {
    /// `Retry-After: N` and a body naming the same N.
    Header,
    /// No header; the body still says "You can send requests again in N seconds".
    BodyOnly,
    /// Neither: no header and a body without the wait.
    None,
    /// The header says N plus the length of the window that refused (too long); body as `header`.
    Long,
}

/// `mde-sim`: a simulator of the Microsoft Defender for Endpoint machine-action API.
///
/// All delays, windows, token lifetimes and Retry-After values are in simulated seconds; the
/// simulated clock runs `--time-scale` times faster than real time. The admin API under `/sim/`
/// (no auth) exposes ground truth, the call log and statistics; see docs/mde-sim.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "mde-sim", version)]
pub struct Cli {
    /// Address to listen on (port 0 picks a free port). Once bound, exactly one line
    /// `LISTENING http://ADDR` (or https) is printed on stdout.
    #[arg(long, env = "MDE_SIM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Serve HTTPS with a freshly generated self-signed CA and server certificate
    /// (SAN 127.0.0.1, localhost and every --tls-san).
    #[arg(long, env = "MDE_SIM_TLS")]
    pub tls: bool,

    /// With --tls: file to write the CA certificate (PEM) to, for clients to trust.
    #[arg(long, env = "MDE_SIM_CA_OUT", requires = "tls")]
    pub ca_out: Option<PathBuf>,

    /// With --tls: extra subject alternative names (DNS names or IPs), comma separated.
    #[arg(long, env = "MDE_SIM_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,

    /// Number of machines to generate (ids, names host-0001.contoso.local, ...), after the
    /// machines of --seed. Deterministic for a given --rng-seed.
    #[arg(long, env = "MDE_SIM_MACHINES", default_value_t = 0)]
    pub machines: usize,

    /// YAML seed file with `machines` and `apps` (format in docs/mde-sim.md).
    #[arg(long, env = "MDE_SIM_SEED")]
    pub seed: Option<PathBuf>,

    /// Seed of every random choice (generated machines, faults, overlap order, action ids).
    #[arg(long, env = "MDE_SIM_RNG_SEED", default_value_t = 1)]
    pub rng_seed: u64,

    /// Share (0..1) of generated machines that are offline (actions stay Pending, then TimeOut).
    #[arg(long, env = "MDE_SIM_OFFLINE_RATIO", default_value_t = 0.0)]
    pub offline_ratio: f64,

    /// Share (0..1) of generated machines whose actions fail.
    #[arg(long, env = "MDE_SIM_FAILING_RATIO", default_value_t = 0.0)]
    pub failing_ratio: f64,

    /// Client id of the default app (used only when the seed file defines no apps).
    #[arg(long, env = "MDE_SIM_CLIENT_ID", default_value = "mde-sim-client")]
    pub client_id: String,

    /// Client secret of the default app.
    #[arg(long, env = "MDE_SIM_CLIENT_SECRET", default_value = "mde-sim-secret")]
    pub client_secret: String,

    /// Application roles of the default app, comma separated.
    #[arg(
        long,
        env = "MDE_SIM_APP_ROLES",
        value_delimiter = ',',
        default_value = "Machine.Isolate,Machine.Read.All"
    )]
    pub app_roles: Vec<String>,

    /// Token audiences the API accepts (scope without `/.default`, or v1 `resource`), comma
    /// separated. A token for any other audience answers 403.
    #[arg(
        long,
        env = "MDE_SIM_AUDIENCE",
        value_delimiter = ',',
        default_value = "https://api.securitycenter.microsoft.com,https://api.security.microsoft.com"
    )]
    pub audience: Vec<String>,

    /// Lifetime of issued access tokens, simulated seconds.
    #[arg(long, env = "MDE_SIM_TOKEN_LIFETIME", default_value_t = 3599)]
    pub token_lifetime: u64,

    /// Make the v1 token endpoint send `expires_in` and friends as strings, as the real v1
    /// endpoint does.
    #[arg(long, env = "MDE_SIM_V1_STRING_NUMBERS")]
    pub v1_string_numbers: bool,

    /// Server page size of list calls; longer results carry `@odata.nextLink` (1..=10000).
    #[arg(long, env = "MDE_SIM_PAGE_SIZE", default_value_t = 10000)]
    pub page_size: usize,

    /// Answer 404 (instead of 200 with an empty `value`) when a machines $filter matches nothing.
    /// An empty tenant always answers 404.
    #[arg(long, env = "MDE_SIM_EMPTY_FILTER_404")]
    pub empty_filter_404: bool,

    /// Behaviour of a repeated isolate/unisolate while one is open on the machine.
    #[arg(long, env = "MDE_SIM_DUPLICATE_MODE", value_enum, default_value_t = DuplicateMode::Reject)]
    pub duplicate_mode: DuplicateMode,

    /// Completion order of overlapping actions on one machine.
    #[arg(long, env = "MDE_SIM_OVERLAP_ORDER", value_enum, default_value_t = OverlapOrder::Reversed)]
    pub overlap_order: OverlapOrder,

    /// Simulated seconds an action on an online machine stays Pending.
    #[arg(long, env = "MDE_SIM_PENDING_DELAY", default_value_t = 10.0)]
    pub pending_delay: f64,

    /// Simulated seconds an action stays InProgress before it Succeeds (or Fails).
    #[arg(long, env = "MDE_SIM_PROGRESS_DELAY", default_value_t = 50.0)]
    pub progress_delay: f64,

    /// Simulated seconds after which an action on an offline machine ends as TimeOut (3 days).
    #[arg(long, env = "MDE_SIM_OFFLINE_TIMEOUT", default_value_t = 259200.0)]
    pub offline_timeout: f64,

    /// Calls per quota key in any sliding 60 s window (0 = unlimited).
    #[arg(long, env = "MDE_SIM_QUOTA_PER_MINUTE", default_value_t = 100)]
    pub quota_per_minute: u32,

    /// Calls per quota key in any sliding 3600 s window (0 = unlimited).
    #[arg(long, env = "MDE_SIM_QUOTA_PER_HOUR", default_value_t = 1500)]
    pub quota_per_hour: u32,

    /// What a quota budget belongs to: `endpoint` (each API of each app has its own) or `app`
    /// (one budget shared by every API of the app).
    #[arg(long, env = "MDE_SIM_QUOTA_KEY", value_enum, default_value_t = QuotaKey::Endpoint)]
    pub quota_key: QuotaKey,

    /// How a 429 names the wait: `header` (Retry-After and the body), `body-only`, `none`, or
    /// `long` (a Retry-After longer than the window that refused).
    #[arg(long, env = "MDE_SIM_RETRY_AFTER", value_enum, default_value_t = RetryAfterMode::Header)]
    pub retry_after: RetryAfterMode,

    /// Another application spending the same quota as the tenant's app(s): comma-separated
    /// `<api>:<calls per simulated minute>[:burst]`, e.g. `unisolate:50` (spread evenly over
    /// each minute) or `unisolate:80:burst` (all at the start of each minute).
    #[arg(
        long,
        env = "MDE_SIM_FOREIGN_LOAD",
        value_name = "SPEC",
        value_parser = crate::foreign::parse_spec
    )]
    pub foreign_load: Option<crate::foreign::LoadSpec>,

    /// Speed of the simulated clock relative to real time (0 freezes it; move it with
    /// POST /sim/time/advance).
    #[arg(long, env = "MDE_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,

    /// Simulated time at start (RFC 3339); default: the real current time.
    #[arg(long, env = "MDE_SIM_START_TIME")]
    pub start_time: Option<DateTime<Utc>>,

    /// Share (0..1) of API calls answered 500 InternalServerError before anything is applied.
    #[arg(
        long = "fault-5xx-rate",
        env = "MDE_SIM_FAULT_5XX_RATE",
        default_value_t = 0.0
    )]
    pub fault_5xx_rate: f64,

    /// Real milliseconds added to every API call.
    #[arg(long, env = "MDE_SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Share (0..1) of API calls whose connection is dropped without a response; nothing is
    /// applied and no quota is consumed.
    #[arg(long, env = "MDE_SIM_DROP_RATE", default_value_t = 0.0)]
    pub drop_rate: f64,

    /// Share (0..1) of API calls that are applied (e.g. the action IS created) but whose
    /// connection is then reset, so the client sees an error.
    #[arg(long, env = "MDE_SIM_LOST_RESPONSE_RATE", default_value_t = 0.0)]
    pub lost_response_rate: f64,
}

impl Cli {
    /// Rejects values clap cannot check by itself, so that nothing downstream has to.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("--offline-ratio", self.offline_ratio),
            ("--failing-ratio", self.failing_ratio),
            ("--fault-5xx-rate", self.fault_5xx_rate),
            ("--drop-rate", self.drop_rate),
            ("--lost-response-rate", self.lost_response_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be between 0 and 1, got {v}"));
            }
        }
        if self.offline_ratio + self.failing_ratio > 1.0 {
            return Err("--offline-ratio + --failing-ratio must not exceed 1".into());
        }
        if !self.time_scale.is_finite() || self.time_scale < 0.0 {
            return Err("--time-scale must be a finite number >= 0".into());
        }
        for (name, v) in [
            ("--pending-delay", self.pending_delay),
            ("--progress-delay", self.progress_delay),
            ("--offline-timeout", self.offline_timeout),
        ] {
            if !v.is_finite() || !(0.0..=1e9).contains(&v) {
                return Err(format!("{name} must be between 0 and 1e9 seconds"));
            }
        }
        if self.page_size == 0 || self.page_size > 10000 {
            return Err("--page-size must be between 1 and 10000".into());
        }
        if self.audience.is_empty() {
            return Err("--audience needs at least one value".into());
        }
        Ok(())
    }
}
