//! The call log (every API call received) and the statistics computed exactly from it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::{add_seconds, fmt7};

/// The APIs the simulator distinguishes; quotas and statistics are kept per API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ApiName {
    /// Both token endpoints.
    #[serde(rename = "token")]
    Token,
    /// GET /api/machines.
    #[serde(rename = "machines-list")]
    MachinesList,
    /// GET /api/machines/{id}.
    #[serde(rename = "machines-get")]
    MachinesGet,
    /// GET /api/machines/findbytag.
    #[serde(rename = "machines-findbytag")]
    MachinesFindByTag,
    /// POST /api/machines/{id}/isolate.
    #[serde(rename = "isolate")]
    Isolate,
    /// POST /api/machines/{id}/unisolate.
    #[serde(rename = "unisolate")]
    Unisolate,
    /// GET /api/machineactions.
    #[serde(rename = "machineactions-list")]
    ActionsList,
    /// GET /api/machineactions/{id}.
    #[serde(rename = "machineactions-get")]
    ActionsGet,
    /// POST /api/machineactions/{id}/cancel.
    #[serde(rename = "machineactions-cancel")]
    ActionsCancel,
    /// Anything else under /api or an unknown path.
    #[serde(rename = "unknown")]
    Unknown,
}

impl ApiName {
    /// Every API, for lookups by name.
    pub const ALL: [ApiName; 10] = [
        ApiName::Token,
        ApiName::MachinesList,
        ApiName::MachinesGet,
        ApiName::MachinesFindByTag,
        ApiName::Isolate,
        ApiName::Unisolate,
        ApiName::ActionsList,
        ApiName::ActionsGet,
        ApiName::ActionsCancel,
        ApiName::Unknown,
    ];

    /// The name used in the call log, stats and fault settings.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiName::Token => "token",
            ApiName::MachinesList => "machines-list",
            ApiName::MachinesGet => "machines-get",
            ApiName::MachinesFindByTag => "machines-findbytag",
            ApiName::Isolate => "isolate",
            ApiName::Unisolate => "unisolate",
            ApiName::ActionsList => "machineactions-list",
            ApiName::ActionsGet => "machineactions-get",
            ApiName::ActionsCancel => "machineactions-cancel",
            ApiName::Unknown => "unknown",
        }
    }

    /// Parses a name as written by `as_str`.
    pub fn parse(s: &str) -> Option<ApiName> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// One received call.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    /// 1-based sequence number.
    pub seq: u64,
    /// Simulated time the call was evaluated (quota time).
    pub sim_time: String,
    /// Real wall-clock time.
    pub real_time: String,
    /// The tenant id of its token (`tid`), once the token was recognised; of token requests,
    /// the tenant id of the URL (a named tenant's id as configured).
    pub tenant: Option<String>,
    /// Client id, once the token was recognised.
    pub app: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// Status answered; 0 when the connection was dropped without a response.
    pub status: u16,
    /// API name.
    pub api: ApiName,
    /// Whether it consumed quota.
    pub counted: bool,
    /// Injected fault: `drop`, `5xx` or `lost-response`.
    pub fault: Option<&'static str>,
    /// The action created or returned by an isolate/unisolate/cancel.
    pub action_id: Option<String>,
    /// Token requests: the credential presented (`secret`, `certificate:<x5t#S256>`,
    /// `federated:<subject>`, `assertion-unverified`), like the credential details of Entra
    /// ID's sign-in logs. Absent from other calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// Parsed `sim_time`, for statistics.
    #[serde(skip)]
    pub sim_at: DateTime<Utc>,
}

/// Statistics of one API.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiStats {
    /// Calls received (any outcome).
    pub calls: usize,
    /// Calls answered 429.
    pub throttled: usize,
    /// Calls that consumed quota.
    pub counted: usize,
    /// Calls answered 5xx.
    pub server_errors: usize,
    /// Calls dropped or whose response was lost.
    pub faulted: usize,
    /// Most calls received (any outcome) in any 60 s window.
    pub max_calls_per_minute: usize,
    /// Most calls received (any outcome) in any 3600 s window.
    pub max_calls_per_hour: usize,
    /// Most quota-consuming calls in any 60 s window.
    pub max_counted_per_minute: usize,
    /// Most quota-consuming calls in any 3600 s window.
    pub max_counted_per_hour: usize,
}

/// Statistics per API name, computed from the whole log.
pub fn stats(calls: &[CallRecord]) -> BTreeMap<&'static str, ApiStats> {
    let mut out: BTreeMap<&'static str, ApiStats> = BTreeMap::new();
    // Per API: times of all calls, and of the quota-consuming ones.
    type Times = Vec<DateTime<Utc>>;
    let mut times: BTreeMap<&'static str, (Times, Times)> = BTreeMap::new();
    for c in calls {
        let s = out.entry(c.api.as_str()).or_default();
        s.calls += 1;
        s.throttled += usize::from(c.status == 429);
        s.counted += usize::from(c.counted);
        s.server_errors += usize::from(c.status >= 500);
        s.faulted += usize::from(matches!(c.fault, Some("drop" | "lost-response")));
        let (all, counted) = times.entry(c.api.as_str()).or_default();
        all.push(c.sim_at);
        if c.counted {
            counted.push(c.sim_at);
        }
    }
    for (api, (mut all, mut counted)) in times {
        all.sort();
        counted.sort();
        let s = out.get_mut(api).expect("entry created above");
        s.max_calls_per_minute = max_in_window(&all, 60.0);
        s.max_calls_per_hour = max_in_window(&all, 3600.0);
        s.max_counted_per_minute = max_in_window(&counted, 60.0);
        s.max_counted_per_hour = max_in_window(&counted, 3600.0);
    }
    out
}

/// The largest number of sorted `times` inside any half-open window `[t, t + secs)`; the same
/// windows the quota uses, so a client that never got a 429 scores at most the limit.
pub fn max_in_window(times: &[DateTime<Utc>], secs: f64) -> usize {
    let mut best = 0;
    let mut end = 0;
    for (start, t) in times.iter().enumerate() {
        let limit = add_seconds(*t, secs);
        while end < times.len() && times[end] < limit {
            end += 1;
        }
        best = best.max(end - start);
    }
    best
}

/// Formats a simulated time for the log.
pub fn sim_time_string(t: DateTime<Utc>) -> String {
    fmt7(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_maximum_is_exact() {
        let t0 = Utc::now();
        let times: Vec<_> = [0.0, 10.0, 59.9, 60.0, 61.0, 200.0]
            .iter()
            .map(|s| add_seconds(t0, *s))
            .collect();
        // [0, 60) holds 0, 10, 59.9; [10, 70) holds 10, 59.9, 60, 61.
        assert_eq!(max_in_window(&times, 60.0), 4);
        assert_eq!(max_in_window(&times, 3600.0), 6);
        assert_eq!(max_in_window(&[], 60.0), 0);
    }
}
