//! The whole mutable simulator state, behind one mutex: the global parts (clock, settings,
//! faults, tokens) and one [`Tenant`] per tenant id, with the operations on a tenant shared by
//! the API and the admin endpoints (action creation with overlap ordering, cancellation, ground
//! truth, reset).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::TokenInfo;
use crate::calls::CallRecord;
use crate::clock::{SimClock, add_seconds, fmt7};
use crate::config::{DuplicateMode, OverlapOrder, QuotaKey, RetryAfterMode};
use crate::faults::{FaultSettings, Faults};
use crate::foreign::{self, ForeignLoad, LoadEntry};
use crate::lifecycle::{
    Action, ActionType, ActionView, Cancellation, Delays, IsolationType, Plan, Status, plan,
};
use crate::quota::{Limits, QuotaBook};
use crate::tenant::{
    App, Behaviour, DEFAULT_DOMAIN, IsolatedBy, Machine, SeedTenant, UNASSIGNED_GROUP,
    generate_machines, is_tenant_id, machine_from_seed,
};

/// Settings that can change at run time (`POST /sim/settings`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Calls per quota key per 60 s (0 = unlimited).
    pub quota_per_minute: u32,
    /// Calls per quota key per 3600 s (0 = unlimited).
    pub quota_per_hour: u32,
    /// What a budget belongs to: each API of an app, or the whole app.
    pub quota_key: QuotaKey,
    /// How a 429 names the wait.
    pub retry_after: RetryAfterMode,
    /// Repeated isolate/unisolate handling.
    pub duplicate_mode: DuplicateMode,
    /// Completion order of overlapping actions.
    pub overlap_order: OverlapOrder,
    /// Lifecycle delays (apply to actions created afterwards).
    #[serde(flatten)]
    pub delays: Delays,
    /// Token lifetime, simulated seconds.
    pub token_lifetime: u64,
    /// Server page size.
    pub page_size: usize,
    /// Accepted token audiences.
    pub audiences: Vec<String>,
    /// 404 for machine filters that match nothing.
    pub empty_filter_404: bool,
    /// v1 token numbers as strings.
    pub v1_string_numbers: bool,
}

impl Settings {
    /// The quota limits.
    pub fn limits(&self) -> Limits {
        Limits {
            per_minute: self.quota_per_minute,
            per_hour: self.quota_per_hour,
            key: self.quota_key,
        }
    }

    /// Rejects values that would break the simulation.
    pub fn validate(&self) -> Result<(), String> {
        let d = self.delays;
        for v in [d.pending_delay, d.progress_delay, d.offline_timeout] {
            if !v.is_finite() || !(0.0..=1e9).contains(&v) {
                return Err("delays must be between 0 and 1e9 seconds".into());
            }
        }
        if self.page_size == 0 || self.page_size > 10000 {
            return Err("pageSize must be between 1 and 10000".into());
        }
        if self.audiences.is_empty() {
            return Err("audiences must not be empty".into());
        }
        Ok(())
    }
}

/// Ground truth about one machine (admin API).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroundTruth {
    /// Machine id.
    pub id: String,
    /// Machine name.
    pub computer_dns_name: String,
    /// Behaviour.
    pub behaviour: Behaviour,
    /// Whether the device is isolated right now.
    pub isolated: bool,
    /// Isolation type of the isolate that isolated it (null if released or isolated initially).
    pub isolation_type: Option<IsolationType>,
    /// When the state last changed (null: never during this run).
    pub last_change: Option<String>,
    /// The action that made the last change.
    pub last_change_action_id: Option<String>,
    /// Number of open (Pending/InProgress) actions.
    pub open_actions: usize,
    /// Every action on the machine, oldest first, as the API would show it now.
    pub actions: Vec<ActionView>,
}

/// Which tenant: the default one, which answers for every tenant id that is not named, or a
/// named one (by its id in lower case: tenant ids compare case-insensitively, as in Entra ID).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TenantKey {
    /// The tenant of the command line and the seed file's top level.
    Default,
    /// A tenant of the seed file's `tenants` or of `POST /sim/tenants`.
    Named(String),
}

impl TenantKey {
    /// The key of a named tenant id, in any case.
    pub fn named(id: &str) -> Self {
        TenantKey::Named(id.to_ascii_lowercase())
    }
}

/// The seed of a named tenant's random choices (machine ids, action ids, overlap order):
/// derived from `--rng-seed` and its id, so each tenant has its own sequence, the same on every
/// run. (The default tenant uses `--rng-seed` itself.)
pub fn tenant_rng_seed(rng_seed: u64, tenant_id: &str) -> u64 {
    // FNV-1a: stable across Rust versions, unlike the standard hasher.
    let hash = tenant_id
        .to_ascii_lowercase()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    rng_seed ^ hash
}

/// What a tenant's `reset` restores.
#[derive(Debug, Clone)]
struct Initial {
    machines: Vec<Machine>,
    foreign: Vec<LoadEntry>,
    next_number: usize,
}

/// One tenant: its registered apps, machines and actions, its quota book (MDE counts quota per
/// tenant and app), the foreign load on it, and the calls made with its tokens.
#[derive(Debug)]
pub struct Tenant {
    /// Its id as configured; `None` for the default tenant.
    pub id: Option<String>,
    /// Registered apps.
    pub apps: Vec<App>,
    /// Quota windows of its apps.
    pub quota: QuotaBook,
    /// Another application's calls on the same quota keys.
    pub foreign: ForeignLoad,
    /// Every call attributed to it, in arrival order (the default tenant also has the calls no
    /// token attributes: no or unknown token, unknown path).
    pub calls: Vec<CallRecord>,
    /// Number of the next generated machine (host-NNNN).
    pub next_number: usize,
    /// Domain of generated machine names (`host-0001.<domain>`).
    pub domain: String,
    /// Generator of machine ids for machines added at run time.
    pub machine_rng: StdRng,
    machines: Vec<Machine>,
    machine_index: HashMap<String, usize>,
    actions: Vec<Action>,
    action_index: HashMap<String, usize>,
    by_machine: HashMap<String, Vec<usize>>,
    /// Device group ids by name, in order of first appearance.
    groups: HashMap<String, i64>,
    last_created: Option<DateTime<Utc>>,
    id_rng: StdRng,
    overlap_rng: StdRng,
    rng_seed: u64,
    initial: Initial,
}

impl Tenant {
    /// A fresh tenant; the machines and foreign load given here are what `reset` restores, the
    /// load starting at `now`.
    pub fn new(
        id: Option<String>,
        apps: Vec<App>,
        machines: Vec<Machine>,
        foreign: Vec<LoadEntry>,
        next_number: usize,
        rng_seed: u64,
        now: DateTime<Utc>,
    ) -> Result<Self, String> {
        let initial = Initial {
            machines,
            foreign,
            next_number,
        };
        let mut t = Self {
            id,
            apps,
            quota: QuotaBook::default(),
            foreign: ForeignLoad::new(Vec::new(), now),
            calls: Vec::new(),
            next_number,
            domain: DEFAULT_DOMAIN.to_string(),
            machine_rng: StdRng::seed_from_u64(rng_seed ^ 0x6d61_6368),
            machines: Vec::new(),
            machine_index: HashMap::new(),
            actions: Vec::new(),
            action_index: HashMap::new(),
            by_machine: HashMap::new(),
            groups: HashMap::new(),
            last_created: None,
            id_rng: StdRng::seed_from_u64(rng_seed ^ 0xac71_0000),
            overlap_rng: StdRng::seed_from_u64(rng_seed ^ 0x0e1a_9000),
            rng_seed,
            initial,
        };
        t.restart(now)?;
        Ok(t)
    }

    /// A named tenant from its seed (the seed file's `tenants` or `POST /sim/tenants`);
    /// certificate and key files are relative to `base`.
    pub fn from_seed(
        seed: SeedTenant,
        base: &Path,
        rng_seed: u64,
        now: DateTime<Utc>,
    ) -> Result<Self, String> {
        let id = seed.tenant_id;
        if !is_tenant_id(&id) {
            return Err(format!(
                "tenant id {id:?} is not a GUID or domain name (letters, digits, '-' and '.')"
            ));
        }
        let within = |e: String| format!("tenant {id}: {e}");
        if seed.apps.is_empty() {
            return Err(within("needs at least one app".into()));
        }
        let apps = seed
            .apps
            .into_iter()
            .map(|a| a.into_app(base))
            .collect::<Result<Vec<_>, _>>()
            .map_err(within)?;
        foreign::validate(&seed.foreign_load, &apps).map_err(within)?;
        let rng_seed = tenant_rng_seed(rng_seed, &id);
        let mut rng = StdRng::seed_from_u64(rng_seed);
        let mut machines = Vec::new();
        for m in seed.machines {
            machines.push(machine_from_seed(m, &mut rng, now).map_err(within)?);
        }
        let generate = seed.generate.unwrap_or_default();
        generate.validate().map_err(within)?;
        let domain = generate.domain.unwrap_or_else(|| DEFAULT_DOMAIN.into());
        machines.extend(generate_machines(
            &mut rng,
            1,
            generate.count,
            generate.offline_ratio,
            generate.failing_ratio,
            &domain,
            now,
        ));
        let mut t = Self::new(
            Some(id.clone()),
            apps,
            machines,
            seed.foreign_load,
            generate.count + 1,
            rng_seed,
            now,
        )
        .map_err(within)?;
        t.domain = domain;
        Ok(t)
    }

    /// The tenant id a token of this tenant carries (`tid`): its own, or for the default tenant
    /// the one the token was asked for.
    pub fn tid(&self, asked: &str) -> String {
        self.id.clone().unwrap_or_else(|| asked.to_string())
    }

    /// Back to the start: machines and foreign load as at creation (the load from `now` on); no
    /// calls, actions or quota use.
    pub fn reset(&mut self, now: DateTime<Utc>) {
        // The machines were unique at creation, so this cannot fail.
        let _ = self.restart(now);
    }

    fn restart(&mut self, now: DateTime<Utc>) -> Result<(), String> {
        let init = self.initial.clone();
        self.quota.clear();
        self.foreign = ForeignLoad::new(init.foreign, now);
        self.calls.clear();
        self.next_number = init.next_number;
        self.machine_rng = StdRng::seed_from_u64(self.rng_seed ^ 0x6d61_6368);
        self.machines.clear();
        self.machine_index.clear();
        self.actions.clear();
        self.action_index.clear();
        self.by_machine.clear();
        self.groups.clear();
        self.last_created = None;
        self.id_rng = StdRng::seed_from_u64(self.rng_seed ^ 0xac71_0000);
        self.overlap_rng = StdRng::seed_from_u64(self.rng_seed ^ 0x0e1a_9000);
        for m in init.machines {
            self.add_machine(m)?;
        }
        Ok(())
    }

    /// Runs the foreign calls due at or before `now` through the quota. Call it before every
    /// quota check, settings change and statistics read.
    pub fn play_foreign(&mut self, now: DateTime<Utc>, limits: Limits) {
        self.foreign.play(now, &mut self.quota, &self.apps, limits);
    }

    /// `{"tenantId", "apps", "machines", "actions"}` (admin API; `tenantId` null for the
    /// default tenant).
    pub fn describe(&self) -> Value {
        json!({
            "tenantId": self.id,
            "apps": self.apps,
            "machines": self.machines.len(),
            "actions": self.actions.len(),
        })
    }

    /// Adds a machine; its id must be new. It gets the id of its device group (`UnassignedGroup`
    /// 0, the others 1, 2, ... in order of first appearance, so the same name always has the
    /// same id), and a seed's `isolatedBy` becomes a Succeeded Isolate in its history.
    pub fn add_machine(&mut self, mut m: Machine) -> Result<(), String> {
        if self.machine_index.contains_key(&m.id) {
            return Err(format!("machine id {} already exists", m.id));
        }
        m.rbac_group_id = self.group_id(&m.rbac_group_name);
        let by = m.isolated_by.clone();
        self.machine_index.insert(m.id.clone(), self.machines.len());
        self.machines.push(m.clone());
        if let Some(by) = by {
            self.seed_isolation(&m, by);
        }
        Ok(())
    }

    fn group_id(&mut self, name: &str) -> i64 {
        if name == UNASSIGNED_GROUP {
            return 0;
        }
        let next = self.groups.len() as i64 + 1;
        *self.groups.entry(name.to_string()).or_insert(next)
    }

    /// Records the isolation a seed names: an Isolate created and Succeeded at `by.at`, made
    /// by someone else (no call, no quota).
    fn seed_isolation(&mut self, m: &Machine, by: IsolatedBy) {
        let id = self.next_id();
        // Later API actions are created after it, even on a frozen clock.
        self.last_created = Some(self.last_created.map_or(by.at, |l| l.max(by.at)));
        let action = Action {
            id: id.clone(),
            action_type: ActionType::Isolate,
            isolation_type: Some(by.isolation_type),
            requestor: by.requestor,
            comment: by.comment,
            request_source: by.request_source,
            machine_id: m.id.clone(),
            computer_dns_name: m.computer_dns_name.clone(),
            created: by.at,
            plan: Plan {
                in_progress_at: Some(by.at),
                final_at: by.at,
                final_status: Status::Succeeded,
            },
            cancellation: None,
        };
        let idx = self.actions.len();
        self.actions.push(action);
        self.action_index.insert(id, idx);
        self.by_machine.entry(m.id.clone()).or_default().push(idx);
    }

    /// All machines in listing order.
    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// The machine with this id.
    pub fn machine(&self, id: &str) -> Option<&Machine> {
        self.machine_index.get(id).map(|i| &self.machines[*i])
    }

    /// The machine with this id, or else the only machine with this name.
    pub fn find_machine(&self, id_or_name: &str) -> Option<&Machine> {
        self.machine(id_or_name).or_else(|| {
            let mut it = self
                .machines
                .iter()
                .filter(|m| m.computer_dns_name == id_or_name);
            let first = it.next();
            if it.next().is_some() { None } else { first }
        })
    }

    /// Changes a machine's behaviour and re-plans its Pending actions, as a device coming
    /// online picks them up (and one going offline stops doing so).
    pub fn set_behaviour(
        &mut self,
        id: &str,
        behaviour: Behaviour,
        now: DateTime<Utc>,
        delays: Delays,
    ) {
        let Some(i) = self.machine_index.get(id).copied() else {
            return;
        };
        self.machines[i].behaviour = behaviour;
        for &a in self.by_machine.get(id).into_iter().flatten() {
            let action = &mut self.actions[a];
            if action.status_at(now) == Status::Pending {
                action.plan = plan(behaviour, action.created, now, delays);
            }
        }
    }

    /// Mutable access to a machine's descriptive fields.
    pub fn machine_mut(&mut self, id: &str) -> Option<&mut Machine> {
        self.machine_index.get(id).map(|i| &mut self.machines[*i])
    }

    /// Every action, oldest first.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    /// Mutable access to an action (admin changes to its plan).
    pub fn action_mut(&mut self, id: &str) -> Option<&mut Action> {
        self.action_index.get(id).map(|i| &mut self.actions[*i])
    }

    /// The action with this id.
    pub fn action(&self, id: &str) -> Option<&Action> {
        self.action_index.get(id).map(|i| &self.actions[*i])
    }

    /// Open Isolate/Unisolate actions of a machine at `t`, oldest first.
    pub fn open_actions(&self, machine_id: &str, t: DateTime<Utc>) -> Vec<&Action> {
        self.by_machine
            .get(machine_id)
            .into_iter()
            .flatten()
            .map(|i| &self.actions[*i])
            .filter(|a| a.is_open_at(t))
            .collect()
    }

    fn next_id(&mut self) -> String {
        let bytes: [u8; 16] = self.id_rng.random();
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }

    /// Creates an action. When other actions on the machine are open, their completion order
    /// follows the overlap setting: `reversed` makes the new one finish first, as in the public
    /// report of duplicates completing out of order. `settings` give the delays and the order.
    #[allow(clippy::too_many_arguments)]
    pub fn create_action(
        &mut self,
        settings: &Settings,
        machine_id: &str,
        action_type: ActionType,
        isolation_type: Option<IsolationType>,
        requestor: String,
        comment: String,
        request_source: String,
        now: DateTime<Utc>,
    ) -> Option<&Action> {
        let m = self.machine(machine_id)?.clone();
        // Strictly increasing creation times keep $orderby and datetime filters unambiguous.
        let created = match self.last_created {
            Some(last) if now <= last => add_seconds(last, 1e-7),
            _ => now,
        };
        self.last_created = Some(created);
        let mut p = plan(m.behaviour, created, created, settings.delays);
        let open: Vec<usize> = self
            .by_machine
            .get(&m.id)
            .into_iter()
            .flatten()
            .copied()
            .filter(|i| self.actions[*i].is_open_at(created))
            .collect();
        let completes = |s: Status| matches!(s, Status::Succeeded | Status::Failed);
        if !open.is_empty() && completes(p.final_status) {
            let reverse = match settings.overlap_order {
                OverlapOrder::Reversed => true,
                OverlapOrder::Fifo => false,
                OverlapOrder::Random => self.overlap_rng.random_bool(0.5),
            };
            if reverse {
                // Newest first: the older open actions end one second apart after this one.
                for (k, &i) in open.iter().rev().enumerate() {
                    let a = &mut self.actions[i];
                    if completes(a.plan.final_status) {
                        let at = add_seconds(p.final_at, (k + 1) as f64);
                        a.plan.final_at = a.plan.final_at.max(at);
                    }
                }
            } else if let Some(latest) = open.iter().map(|i| self.actions[*i].plan.final_at).max() {
                p.final_at = p.final_at.max(add_seconds(latest, 1.0));
            }
        }
        let id = self.next_id();
        let action = Action {
            id: id.clone(),
            action_type,
            isolation_type,
            requestor,
            comment,
            request_source,
            machine_id: m.id.clone(),
            computer_dns_name: m.computer_dns_name.clone(),
            created,
            plan: p,
            cancellation: None,
        };
        let idx = self.actions.len();
        self.actions.push(action);
        self.action_index.insert(id, idx);
        self.by_machine.entry(m.id).or_default().push(idx);
        self.actions.get(idx)
    }

    /// Cancels an open action; `Err(status)` when it is already final.
    pub fn cancel(
        &mut self,
        id: &str,
        requestor: String,
        comment: String,
        now: DateTime<Utc>,
    ) -> Result<&Action, Option<Status>> {
        let i = *self.action_index.get(id).ok_or(None)?;
        let status = self.actions[i].status_at(now);
        if status.is_final() {
            return Err(Some(status));
        }
        self.actions[i].cancellation = Some(Cancellation {
            at: now,
            requestor,
            comment,
        });
        Ok(&self.actions[i])
    }

    /// The real isolation state of a machine at `t`: the initial state, changed by every
    /// Succeeded Isolate/Unisolate in the order they completed.
    pub fn ground_truth(&self, machine_id: &str, t: DateTime<Utc>) -> Option<GroundTruth> {
        let m = self.machine(machine_id)?;
        let mine: Vec<&Action> = self
            .by_machine
            .get(machine_id)
            .into_iter()
            .flatten()
            .map(|i| &self.actions[*i])
            .collect();
        let mut done: Vec<(DateTime<Utc>, &Action)> = mine
            .iter()
            .filter_map(|a| a.succeeded_at(t).map(|at| (at, *a)))
            .collect();
        done.sort_by_key(|(at, a)| (*at, a.created));
        let mut isolated = m.initially_isolated;
        let mut isolation_type = None;
        let mut last = None;
        for (at, a) in &done {
            isolated = a.action_type == ActionType::Isolate;
            isolation_type = if isolated { a.isolation_type } else { None };
            last = Some((*at, a.id.clone()));
        }
        Some(GroundTruth {
            id: m.id.clone(),
            computer_dns_name: m.computer_dns_name.clone(),
            behaviour: m.behaviour,
            isolated,
            isolation_type,
            last_change: last.as_ref().map(|(at, _)| fmt7(*at)),
            last_change_action_id: last.map(|(_, id)| id),
            open_actions: mine.iter().filter(|a| a.is_open_at(t)).count(),
            actions: mine.iter().map(|a| a.view(t)).collect(),
        })
    }
}

/// The whole mutable simulator state, behind one mutex: what is global (clock, settings,
/// faults, issued tokens) and the tenants.
#[derive(Debug)]
pub struct SimState {
    /// Simulated clock.
    pub clock: SimClock,
    /// Run-time settings.
    pub settings: Settings,
    /// Fault injection.
    pub faults: Faults,
    /// Issued tokens, of every tenant (each knows its own).
    pub tokens: HashMap<String, TokenInfo>,
    /// The default tenant and the named ones.
    pub tenants: BTreeMap<TenantKey, Tenant>,
    /// Sequence number of the next logged call (one sequence across tenants).
    next_seq: u64,
    rng_seed: u64,
    initial_settings: Settings,
    initial_faults: FaultSettings,
}

impl SimState {
    /// A fresh state with the default tenant; the settings and faults given here are what
    /// `reset` restores.
    pub fn new(
        clock: SimClock,
        settings: Settings,
        faults: FaultSettings,
        default: Tenant,
        rng_seed: u64,
    ) -> Self {
        Self {
            clock,
            faults: Faults::new(faults.clone(), rng_seed),
            initial_settings: settings.clone(),
            initial_faults: faults,
            settings,
            tokens: HashMap::new(),
            tenants: BTreeMap::from([(TenantKey::Default, default)]),
            next_seq: 1,
            rng_seed,
        }
    }

    /// `--rng-seed`.
    pub fn rng_seed(&self) -> u64 {
        self.rng_seed
    }

    /// The default tenant.
    pub fn default_tenant(&self) -> &Tenant {
        &self.tenants[&TenantKey::Default]
    }

    /// The tenant that answers for a tenant id of a token URL: the named one, else the default.
    pub fn resolve(&self, tenant_id: &str) -> TenantKey {
        let key = TenantKey::named(tenant_id);
        if self.tenants.contains_key(&key) {
            key
        } else {
            TenantKey::Default
        }
    }

    /// Adds a named tenant, or replaces the one with the same id (its tokens are revoked: it
    /// starts fresh). Returns whether it replaced one.
    pub fn put_tenant(&mut self, tenant: Tenant) -> bool {
        let id = tenant.id.as_deref().expect("a named tenant has an id");
        let key = TenantKey::named(id);
        self.tokens.retain(|_, t| t.tenant != key);
        self.tenants.insert(key, tenant).is_some()
    }

    /// Removes a named tenant and revokes its tokens; false when there is none.
    pub fn remove_tenant(&mut self, key: &TenantKey) -> bool {
        if *key == TenantKey::Default {
            return false;
        }
        self.tokens.retain(|_, t| t.tenant != *key);
        self.tenants.remove(key).is_some()
    }

    /// Back to the start: settings and faults as at start, every tenant as created (tenants
    /// added at run time stay), no tokens and an empty call log. The clock keeps running (time
    /// never goes back).
    pub fn reset(&mut self) {
        let now = self.clock.now();
        self.settings = self.initial_settings.clone();
        self.faults = Faults::new(self.initial_faults.clone(), self.rng_seed);
        self.tokens.clear();
        self.next_seq = 1;
        for t in self.tenants.values_mut() {
            t.reset(now);
        }
    }

    /// Resets one tenant (as `Tenant::reset`) and revokes its tokens; false when there is none.
    pub fn reset_tenant(&mut self, key: &TenantKey) -> bool {
        let now = self.clock.now();
        let Some(t) = self.tenants.get_mut(key) else {
            return false;
        };
        t.reset(now);
        self.tokens.retain(|_, t| t.tenant != *key);
        true
    }

    /// Plays every tenant's foreign load up to now (before a settings change).
    pub fn play_all_foreign(&mut self) {
        let now = self.clock.now();
        let limits = self.settings.limits();
        for t in self.tenants.values_mut() {
            t.play_foreign(now, limits);
        }
    }

    /// Appends a call to the log of tenant `key` (the default tenant's if it is gone), with
    /// the next sequence number.
    pub fn log_call(&mut self, key: &TenantKey, mut record: CallRecord) {
        record.seq = self.next_seq;
        self.next_seq += 1;
        let key = if self.tenants.contains_key(key) {
            key
        } else {
            &TenantKey::Default
        };
        if let Some(t) = self.tenants.get_mut(key) {
            t.calls.push(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::ApiName;
    use crate::config::{DuplicateMode, OverlapOrder, QuotaKey, RetryAfterMode};

    fn settings() -> Settings {
        Settings {
            quota_per_minute: 1,
            quota_per_hour: 0,
            quota_key: QuotaKey::Endpoint,
            retry_after: RetryAfterMode::Header,
            duplicate_mode: DuplicateMode::Reject,
            overlap_order: OverlapOrder::Reversed,
            delays: Delays {
                pending_delay: 10.0,
                progress_delay: 50.0,
                offline_timeout: 100.0,
            },
            token_lifetime: 3599,
            page_size: 100,
            audiences: vec!["https://api.securitycenter.microsoft.com".into()],
            empty_filter_404: false,
            v1_string_numbers: false,
        }
    }

    fn app(id: &str) -> App {
        App {
            client_id: id.into(),
            client_secret: Some("s".into()),
            roles: vec![],
            display_name: id.into(),
            allow_assertion: false,
            certificates: vec![],
            federated: vec![],
        }
    }

    fn tenant(id: Option<&str>, now: DateTime<Utc>) -> Tenant {
        let seed = id.map_or(1, |id| tenant_rng_seed(1, id));
        let mut rng = StdRng::seed_from_u64(seed);
        let machines = generate_machines(&mut rng, 1, 2, 0.0, 0.0, DEFAULT_DOMAIN, now);
        Tenant::new(
            id.map(String::from),
            vec![app("op")],
            machines,
            vec![],
            3,
            seed,
            now,
        )
        .unwrap()
    }

    fn token(tenant: TenantKey) -> TokenInfo {
        TokenInfo {
            tid: "x".into(),
            tenant,
            client_id: "op".into(),
            display_name: "op".into(),
            roles: vec![],
            audience: "a".into(),
            expires_at: Utc::now(),
        }
    }

    fn record(api: ApiName, at: DateTime<Utc>) -> CallRecord {
        CallRecord {
            seq: 0,
            sim_time: fmt7(at),
            real_time: String::new(),
            tenant: None,
            app: None,
            method: "GET".into(),
            path: "/".into(),
            query: None,
            status: 200,
            api,
            counted: false,
            fault: None,
            action_id: None,
            credential: None,
            sim_at: at,
        }
    }

    fn state() -> SimState {
        let clock = SimClock::new(Utc::now(), 0.0);
        let now = clock.now();
        let mut st = SimState::new(
            clock,
            settings(),
            FaultSettings::default(),
            tenant(None, now),
            1,
        );
        assert!(!st.put_tenant(tenant(Some("Fabrikam.com"), now)));
        st
    }

    #[test]
    fn tenant_seeds_differ_per_tenant_whatever_the_case() {
        assert_eq!(
            tenant_rng_seed(1, "Fabrikam.com"),
            tenant_rng_seed(1, "fabrikam.COM")
        );
        assert_ne!(
            tenant_rng_seed(1, "fabrikam.com"),
            tenant_rng_seed(1, "contoso.com")
        );
        assert_ne!(
            tenant_rng_seed(1, "fabrikam.com"),
            tenant_rng_seed(2, "fabrikam.com")
        );
    }

    #[test]
    fn a_tenant_id_selects_its_tenant_and_any_other_the_default() {
        let st = state();
        let fab = TenantKey::named("fabrikam.com");
        assert_eq!(st.resolve("FABRIKAM.com"), fab);
        assert_eq!(st.resolve("contoso.com"), TenantKey::Default);
        assert_eq!(st.tenants[&fab].tid("ignored"), "Fabrikam.com");
        assert_eq!(st.default_tenant().tid("contoso.com"), "contoso.com");
        // Same generator seed for the default tenant as before tenants existed; another for each.
        let ids = |k: &TenantKey| -> Vec<String> {
            st.tenants[k]
                .machines()
                .iter()
                .map(|m| m.id.clone())
                .collect()
        };
        assert_ne!(ids(&fab), ids(&TenantKey::Default));
    }

    #[test]
    fn actions_stay_in_their_tenant() {
        let mut st = state();
        let now = st.clock.now();
        let fab = TenantKey::named("fabrikam.com");
        let theirs = st.tenants[&fab].machines()[0].id.clone();
        let settings = st.settings.clone();
        let default = st.tenants.get_mut(&TenantKey::Default).unwrap();
        assert!(
            default
                .create_action(
                    &settings,
                    &theirs,
                    ActionType::Isolate,
                    None,
                    "op".into(),
                    "c".into(),
                    "PublicApi".into(),
                    now
                )
                .is_none(),
            "another tenant's machine is not found"
        );
        let ours = st.tenants[&fab].machines()[0].id.clone();
        let fabrikam = st.tenants.get_mut(&fab).unwrap();
        let id = fabrikam
            .create_action(
                &settings,
                &ours,
                ActionType::Isolate,
                None,
                "op".into(),
                "c".into(),
                "PublicApi".into(),
                now,
            )
            .unwrap()
            .id
            .clone();
        assert!(st.default_tenant().action(&id).is_none());
        assert!(st.default_tenant().actions().is_empty());
        assert_eq!(st.tenants[&fab].actions().len(), 1);
    }

    #[test]
    fn quota_is_kept_per_tenant_and_app() {
        let mut st = state();
        let now = st.clock.now();
        let limits = st.settings.limits();
        let fab = TenantKey::named("fabrikam.com");
        let t = st.tenants.get_mut(&fab).unwrap();
        t.quota.consume("op", ApiName::MachinesList, now);
        assert!(
            t.quota
                .check("op", ApiName::MachinesList, now, limits)
                .is_err()
        );
        // The same client id in the default tenant has its own budget.
        let d = st.tenants.get_mut(&TenantKey::Default).unwrap();
        assert!(
            d.quota
                .check("op", ApiName::MachinesList, now, limits)
                .is_ok()
        );
    }

    #[test]
    fn the_call_log_is_one_sequence_across_tenants() {
        let mut st = state();
        let now = st.clock.now();
        let fab = TenantKey::named("fabrikam.com");
        st.log_call(&TenantKey::Default, record(ApiName::Token, now));
        st.log_call(&fab, record(ApiName::Token, now));
        st.log_call(&TenantKey::named("gone.com"), record(ApiName::Unknown, now));
        fn seqs(st: &SimState, k: &TenantKey) -> Vec<u64> {
            st.tenants[k].calls.iter().map(|c| c.seq).collect()
        }
        assert_eq!(
            seqs(&st, &TenantKey::Default),
            [1, 3],
            "a vanished tenant's call goes to the default log"
        );
        assert_eq!(seqs(&st, &fab), [2]);
        st.reset();
        assert!(st.tenants.values().all(|t| t.calls.is_empty()));
        st.log_call(&fab, record(ApiName::Token, now));
        assert_eq!(seqs(&st, &fab), [1]);
    }

    #[test]
    fn replacing_removing_and_resetting_a_tenant_revoke_only_its_tokens() {
        let mut st = state();
        let now = st.clock.now();
        let fab = TenantKey::named("fabrikam.com");
        let fill = |st: &mut SimState| {
            st.tokens.insert("d".into(), token(TenantKey::Default));
            st.tokens.insert("f".into(), token(fab.clone()));
        };
        let kept = |st: &SimState| -> Vec<String> {
            let mut k: Vec<String> = st.tokens.keys().cloned().collect();
            k.sort();
            k
        };
        fill(&mut st);
        assert!(
            st.put_tenant(tenant(Some("FABRIKAM.com"), now)),
            "same id in another case"
        );
        assert_eq!(kept(&st), ["d"]);
        fill(&mut st);
        assert!(st.reset_tenant(&fab));
        assert_eq!(kept(&st), ["d"]);
        fill(&mut st);
        assert!(st.remove_tenant(&fab));
        assert!(!st.remove_tenant(&fab));
        assert!(
            !st.remove_tenant(&TenantKey::Default),
            "the default tenant stays"
        );
        assert_eq!(kept(&st), ["d"]);
        assert!(!st.reset_tenant(&fab));
    }

    #[test]
    fn a_full_reset_keeps_tenants_as_created() {
        let mut st = state();
        let now = st.clock.now();
        let fab = TenantKey::named("fabrikam.com");
        let before: Vec<String> = st.tenants[&fab]
            .machines()
            .iter()
            .map(|m| m.id.clone())
            .collect();
        let t = st.tenants.get_mut(&fab).unwrap();
        let mut rng = StdRng::seed_from_u64(9);
        for m in generate_machines(&mut rng, 9, 1, 0.0, 0.0, "x.local", now) {
            t.add_machine(m).unwrap();
        }
        st.tokens.insert("f".into(), token(fab.clone()));
        st.reset();
        assert!(st.tokens.is_empty());
        let after: Vec<String> = st.tenants[&fab]
            .machines()
            .iter()
            .map(|m| m.id.clone())
            .collect();
        assert_eq!(
            before, after,
            "machines added at run time are dropped, the tenant stays"
        );
    }
}
