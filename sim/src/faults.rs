//! Fault injection: random rates drawn from a seeded generator, plus one-shot faults for tests
//! that need a fault on exactly the next call of an API.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::calls::ApiName;

/// A kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// 500 InternalServerError, nothing applied.
    #[serde(rename = "5xx")]
    ServerError,
    /// Connection closed without a response, nothing applied, no quota used.
    #[serde(rename = "drop")]
    Drop,
    /// Applied (quota used, action created), then the connection is reset.
    #[serde(rename = "lost-response")]
    LostResponse,
}

impl FaultKind {
    /// The name in the call log.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::ServerError => "5xx",
            FaultKind::Drop => "drop",
            FaultKind::LostResponse => "lost-response",
        }
    }
}

/// A fault for the next `count` calls of `api` (any /api API when absent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OneShot {
    /// What happens.
    pub kind: FaultKind,
    /// API name (`isolate`, `machineactions-list`, `token`, ...).
    #[serde(default)]
    pub api: Option<String>,
    /// How many calls; default 1.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Fault settings (flags at start, `POST /sim/faults` at run time).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSettings {
    /// Share of calls answered 500.
    #[serde(default, rename = "fault5xxRate")]
    pub fault_5xx_rate: f64,
    /// Real milliseconds added to each call.
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of calls dropped.
    #[serde(default)]
    pub drop_rate: f64,
    /// Share of calls applied whose response is lost.
    #[serde(default)]
    pub lost_response_rate: f64,
    /// Restrict the random faults and latency to these API names; default every /api API
    /// (not the token endpoints).
    #[serde(default)]
    pub apis: Option<Vec<String>>,
    /// Queued one-shot faults, consumed in order.
    #[serde(default)]
    pub one_shot: Vec<OneShot>,
}

impl FaultSettings {
    /// Rejects rates outside 0..1 and unknown API names.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("fault5xxRate", self.fault_5xx_rate),
            ("dropRate", self.drop_rate),
            ("lostResponseRate", self.lost_response_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be between 0 and 1"));
            }
        }
        let names = self
            .apis
            .iter()
            .flatten()
            .chain(self.one_shot.iter().filter_map(|o| o.api.as_ref()));
        for name in names {
            if ApiName::parse(name).is_none() {
                return Err(format!("unknown api name {name:?}"));
            }
        }
        Ok(())
    }

    fn applies_to(&self, api: ApiName) -> bool {
        match &self.apis {
            Some(list) => list.iter().any(|a| a == api.as_str()),
            None => api != ApiName::Token,
        }
    }
}

/// Current fault settings and the generator that draws random faults.
#[derive(Debug)]
pub struct Faults {
    /// Settings in force.
    pub settings: FaultSettings,
    rng: StdRng,
}

impl Faults {
    /// Faults with a generator seeded from `seed`.
    pub fn new(settings: FaultSettings, seed: u64) -> Self {
        Self {
            settings,
            // Its own stream, so faults do not shift other seeded choices.
            rng: StdRng::seed_from_u64(seed ^ 0xfa17_fa17_fa17_fa17),
        }
    }

    /// Latency to add to a call of `api`.
    pub fn latency(&self, api: ApiName) -> Duration {
        if self.settings.applies_to(api) {
            Duration::from_millis(self.settings.latency_ms)
        } else {
            Duration::ZERO
        }
    }

    /// Decides the fault of one call. One-shots go first; otherwise three numbers are always
    /// drawn, so the sequence of outcomes depends only on the seed and the call order.
    pub fn draw(&mut self, api: ApiName) -> Option<FaultKind> {
        let shot = self.settings.one_shot.iter().position(|o| {
            o.count > 0
                && o.api
                    .as_deref()
                    .map_or(api != ApiName::Token, |a| a == api.as_str())
        });
        if let Some(i) = shot {
            let kind = self.settings.one_shot[i].kind;
            self.settings.one_shot[i].count -= 1;
            if self.settings.one_shot[i].count == 0 {
                self.settings.one_shot.remove(i);
            }
            return Some(kind);
        }
        if !self.settings.applies_to(api) {
            return None;
        }
        let (d, e, l): (f64, f64, f64) = (self.rng.random(), self.rng.random(), self.rng.random());
        if d < self.settings.drop_rate {
            Some(FaultKind::Drop)
        } else if e < self.settings.fault_5xx_rate {
            Some(FaultKind::ServerError)
        } else if l < self.settings.lost_response_rate {
            Some(FaultKind::LostResponse)
        } else {
            None
        }
    }
}
