//! The process-wide MDE quota gate.
//!
//! MDE limits every API to 100 calls per minute and 1,500 calls per hour, and the SOC's other tools
//! share those limits, so the operator spends only a configured share of them. Every HTTP call to MDE
//! first asks this gate for admission.
//!
//! # Model
//!
//! Each [`Api`] has its own state: the times of admitted calls, a FIFO queue of reservations (one per
//! waiting key) and an optional pause (a 429's `Retry-After`). The windows are exact sliding windows,
//! widened by a guard margin: with `W' = W + guard`, a call at `x` is admitted only when fewer than
//! `N` earlier calls lie in the half-open interval `(x - W', x]`. Equivalently the earliest admissible
//! time is `e_N + W'`, where `e_N` is the N-th most recent call.
//!
//! # Why no window ever holds more than N calls
//!
//! Admission times are recorded in admission order and are never earlier than the previous one (a
//! caller's `now` is clamped to the last recorded call). Suppose some half-open window `[t, t + W)`
//! held `N + 1` admitted calls and let `x` be the last of them. The other `N` lie in `[t, x]` with
//! `x < t + W`, so each is `> x - W > x - W'`; all were recorded before `x` was admitted, so at that
//! moment `(x - W', x]` already held `N` calls and `x` would have been refused. Every admission is
//! checked directly against the recorded calls (not only against the reservation that brought the
//! caller), so this holds whatever the reservations did. Because the check uses `W + guard`, two calls
//! that the server sees shifted by less than `guard` relative to each other still cannot share one
//! server-side window of length `W`.
//!
//! # Reservations
//!
//! A caller that cannot go now gets the earliest future slot behind every earlier reservation of that
//! API, computed as if every pending reservation were a call at its slot. Slots are non-decreasing in
//! FIFO order and never move earlier. After every admission or pause the slots are recomputed in
//! order (each one against the recorded calls plus the slots ahead of it, and never earlier than the
//! last recorded call), so a caller that came back late, and was therefore recorded later than its
//! slot, pushes the reservations behind it instead of letting them violate a window. A caller that
//! comes back at or after its (current) slot is admitted; one that comes back earlier (woken by
//! another event) is told the same slot and takes no second one. Reservations not claimed within
//! [`QuotaConfig::grace`] after the slot last told to their caller are dropped, so deleted
//! resources do not hold slots forever ([`QuotaGate::release`] drops one at once).
//!
//! A late caller's reservation keeps its place and holds capacity for it until it expires;
//! capacity held for a caller that never comes is not handed to others before then, so a vanished
//! caller costs at most about one call per short window until its reservation expires.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One rate-limited MDE API. MDE counts each of these separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    /// `POST /api/machines/{id}/isolate`.
    Isolate,
    /// `POST /api/machines/{id}/unisolate`.
    Unisolate,
    /// `GET /api/machineactions` and `GET /api/machineactions/{id}`.
    MachineActionsRead,
    /// `GET /api/machines` and `GET /api/machines/{id}`.
    MachinesRead,
    /// `POST /api/machineactions/{id}/cancel`.
    Cancel,
}

impl Api {
    /// Every API, in a fixed order (useful to pre-register metric label values).
    pub const ALL: [Api; 5] = [
        Api::Isolate,
        Api::Unisolate,
        Api::MachineActionsRead,
        Api::MachinesRead,
        Api::Cancel,
    ];

    /// Every API, in a fixed order.
    pub fn all() -> [Api; 5] {
        Self::ALL
    }

    /// A short, stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Isolate => "isolate",
            Api::Unisolate => "unisolate",
            Api::MachineActionsRead => "machineactions_read",
            Api::MachinesRead => "machines_read",
            Api::Cancel => "cancel",
        }
    }

    /// True for the POSTs that may create or change a machine action (their failures can be ambiguous).
    pub fn is_mutation(self) -> bool {
        matches!(self, Api::Isolate | Api::Unisolate | Api::Cancel)
    }

    fn index(self) -> usize {
        match self {
            Api::Isolate => 0,
            Api::Unisolate => 1,
            Api::MachineActionsRead => 2,
            Api::MachinesRead => 3,
            Api::Cancel => 4,
        }
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Budget of one API (the same budget applies to each API separately).
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaConfig {
    /// Calls allowed in any window of length `minute`.
    pub per_minute: u32,
    /// Calls allowed in any window of length `hour`.
    pub per_hour: u32,
    /// Length of the short window (60 s, divided by the time scale).
    pub minute: Duration,
    /// Length of the long window (3600 s, divided by the time scale).
    pub hour: Duration,
    /// Extra width added to both windows to absorb clock and network jitter between client and server.
    pub guard: Duration,
}

impl QuotaConfig {
    /// MDE's documented per-API limit per minute.
    pub const MDE_PER_MINUTE: u32 = 100;
    /// MDE's documented per-API limit per hour.
    pub const MDE_PER_HOUR: u32 = 1500;

    /// A share of MDE's limits (`share` in `(0, 1]`, clamped; at least one call per window) on a clock
    /// compressed by `time_scale` (1.0 = real time; 60.0 = one minute lasts one second).
    pub fn from_budget(share: f64, time_scale: f64) -> Self {
        let share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let scale = if time_scale.is_finite() && time_scale > 0.0 {
            time_scale
        } else {
            1.0
        };
        // The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
        let scaled = |limit: u32| ((f64::from(limit) * share + 1e-9).floor() as u32).max(1);
        QuotaConfig {
            per_minute: scaled(Self::MDE_PER_MINUTE),
            per_hour: scaled(Self::MDE_PER_HOUR),
            minute: Duration::from_secs_f64(60.0 / scale),
            hour: Duration::from_secs_f64(3600.0 / scale),
            // At high time scales 1 s / scale is milliseconds of real time, less than scheduling
            // jitter between the gate and the server: keep at least 50 ms.
            guard: Duration::from_secs_f64(1.0 / scale).max(Duration::from_millis(50)),
        }
    }

    /// How long after its slot an unclaimed reservation is kept: five short windows, long enough for
    /// a busy controller queue to requeue the resource, short enough that deleted resources do not
    /// hold capacity for long.
    pub fn grace(&self) -> Duration {
        self.minute.saturating_mul(5) + self.guard
    }

    fn windows(&self) -> [Window; 2] {
        [
            Window {
                limit: self.per_minute.max(1) as usize,
                span: self.minute + self.guard,
            },
            Window {
                limit: self.per_hour.max(1) as usize,
                span: self.hour + self.guard,
            },
        ]
    }
}

/// Order among waiting callers of one API. Callers of a more urgent class are given slots ahead
/// of less urgent ones that are still waiting; within a class, slots follow arrival order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Status of young actions: what users are watching right now.
    High,
    /// Per-resource lookups and first attempts of requests (the default).
    #[default]
    Normal,
    /// Background work: drift checks, and requests retried after their action failed, which go
    /// after every first attempt still waiting.
    Low,
}

/// The gate's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send the call now; it has been counted.
    Admit,
    /// Do not send; come back at or after this instant (the slot is held for the caller's key).
    WaitUntil(Instant),
}

#[derive(Clone, Copy, Debug)]
struct Window {
    limit: usize,
    /// Window length plus guard.
    span: Duration,
}

#[derive(Debug)]
struct Reservation {
    seq: u64,
    priority: Priority,
    key: String,
    /// Current slot; recomputation may move it later.
    slot: Instant,
    /// The slot last told to the caller. Expiry counts from here, not from `slot`: a dead
    /// reservation is pushed back every time someone passes it, and must still expire.
    told: Instant,
}

#[derive(Debug, Default)]
struct ApiState {
    /// Admitted call times, non-decreasing; only those that can still matter are kept.
    calls: VecDeque<Instant>,
    /// Reservations by priority class, then arrival; `slot` is non-decreasing along the queue.
    pending: VecDeque<Reservation>,
    /// Key → `seq` of its pending reservation.
    keys: HashMap<String, u64>,
    paused_until: Option<Instant>,
    /// After a 429, MDE's real limit is below the budget (other tools share it): once the pause
    /// ends only one probe call goes, and the rest wait until MDE answers it without a 429.
    /// `Some(false)`: probing, the probe not sent yet; `Some(true)`: the probe is out.
    probing: Option<bool>,
    next_seq: u64,
}

impl ApiState {
    /// The `n`-th most recent element (n ≥ 1) of `calls` followed by the first `upto` slots.
    /// Both parts are sorted and every slot is ≥ every call, so this is an index into their
    /// concatenation.
    fn nth_most_recent(&self, upto: usize, n: usize) -> Option<Instant> {
        if n <= upto {
            Some(self.pending[upto - n].slot)
        } else {
            let k = n - upto;
            let len = self.calls.len();
            (k <= len).then(|| self.calls[len - k])
        }
    }

    /// Earliest time ≥ `lower` at which a call fits behind the recorded calls and the first `upto`
    /// reservations.
    fn earliest(&self, upto: usize, lower: Instant, windows: &[Window]) -> Instant {
        windows
            .iter()
            .fold(lower, |t, w| match self.nth_most_recent(upto, w.limit) {
                Some(e) => t.max(e + w.span),
                None => t,
            })
    }

    /// Whether a call at `x` (≥ every recorded call) fits the recorded calls alone.
    fn fits(&self, x: Instant, windows: &[Window]) -> bool {
        let len = self.calls.len();
        windows
            .iter()
            .all(|w| len < w.limit || self.calls[len - w.limit] + w.span <= x)
    }

    fn position(&self, key: &str) -> Option<usize> {
        let seq = *self.keys.get(key)?;
        self.pending.iter().position(|r| r.seq == seq)
    }

    fn remove_at(&mut self, idx: usize) {
        if let Some(r) = self.pending.remove(idx) {
            self.keys.remove(&r.key);
        }
    }

    fn record(&mut self, at: Instant) {
        self.calls.push_back(at);
    }

    /// Re-derive every slot in FIFO order so that each fits the recorded calls plus the slots ahead
    /// of it. Slots only move later; that keeps answers stable for callers that did nothing wrong.
    fn recompute(&mut self, windows: &[Window]) {
        let floor = match (self.calls.back().copied(), self.paused_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let mut prev: Option<Instant> = None;
        for i in 0..self.pending.len() {
            let mut lower = self.pending[i].slot;
            if let Some(p) = prev {
                lower = lower.max(p);
            }
            if let Some(f) = floor {
                lower = lower.max(f);
            }
            let slot = self.earliest(i, lower, windows);
            self.pending[i].slot = slot;
            prev = Some(slot);
        }
    }

    /// Forget calls that can no longer fall in any window, expired reservations and past pauses.
    fn prune(&mut self, now: Instant, keep: Duration, grace: Duration) {
        while self.calls.front().is_some_and(|&c| c + keep <= now) {
            self.calls.pop_front();
        }
        if self.pending.iter().any(|r| r.told + grace < now) {
            let keys = &mut self.keys;
            self.pending.retain(|r| {
                let keep = r.told + grace >= now;
                if !keep {
                    keys.remove(&r.key);
                }
                keep
            });
        }
        if self.paused_until.is_some_and(|p| p <= now) {
            self.paused_until = None;
        }
    }

    fn reserve(
        &mut self,
        key: &str,
        priority: Priority,
        now: Instant,
        windows: &[Window],
        record: bool,
    ) -> Admission {
        if let Some(idx) = self.position(key) {
            let slot = self.pending[idx].slot;
            if now < slot {
                self.pending[idx].told = slot;
                return Admission::WaitUntil(slot);
            }
            if self.fits(now, windows) {
                if !record {
                    return Admission::Admit;
                }
                self.remove_at(idx);
                self.record(now);
                self.recompute(windows);
                return Admission::Admit;
            }
            // Unreachable while the slot invariant holds; recomputing restores it without ever
            // admitting beyond the budget.
            self.recompute(windows);
            return match self.position(key) {
                Some(i) => {
                    self.pending[i].told = self.pending[i].slot;
                    Admission::WaitUntil(self.pending[i].slot)
                }
                None => Admission::WaitUntil(now + windows[0].span),
            };
        }

        // Behind every waiting caller of the same or a more urgent class.
        let at = self
            .pending
            .iter()
            .position(|r| r.priority > priority)
            .unwrap_or(self.pending.len());
        let mut lower = now;
        if at > 0 {
            lower = lower.max(self.pending[at - 1].slot);
        }
        if let Some(p) = self.paused_until {
            lower = lower.max(p);
        }
        let slot = self.earliest(at, lower, windows);
        if at == self.pending.len() && slot <= now && self.fits(now, windows) {
            if !record {
                return Admission::Admit;
            }
            self.record(now);
            // Reservations whose callers are late now sit before the last call: move them behind it.
            self.recompute(windows);
            return Admission::Admit;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.keys.insert(key.to_owned(), seq);
        self.pending.insert(
            at,
            Reservation {
                seq,
                priority,
                key: key.to_owned(),
                slot,
                told: slot,
            },
        );
        if at + 1 < self.pending.len() {
            // Less urgent callers behind it move later (slots only ever move later).
            self.recompute(windows);
        }
        let slot = self.pending[at].slot;
        self.pending[at].told = slot;
        Admission::WaitUntil(slot)
    }

    fn count_within(&self, now: Instant, span: Duration) -> usize {
        self.calls
            .iter()
            .rev()
            .take_while(|&&c| c + span > now)
            .count()
    }
}

/// The process-wide quota gate: one per process, shared (behind an `Arc`) by every MDE call.
///
/// Pure bookkeeping: it never sleeps or blocks on time, and the clock is passed in, so it can be
/// tested on a fake clock.
#[derive(Debug)]
pub struct QuotaGate {
    cfg: QuotaConfig,
    windows: [Window; 2],
    keep: Duration,
    grace: Duration,
    state: Mutex<[ApiState; 5]>,
    /// Priority class per key; keys not listed are [`Priority::Normal`].
    priorities: Mutex<HashMap<String, Priority>>,
}

impl QuotaGate {
    /// A gate applying `cfg` to each API separately.
    pub fn new(cfg: QuotaConfig) -> Self {
        let windows = cfg.windows();
        let keep = windows[0].span.max(windows[1].span);
        let grace = cfg.grace();
        QuotaGate {
            cfg,
            windows,
            keep,
            grace,
            state: Mutex::new(Default::default()),
            priorities: Mutex::new(HashMap::new()),
        }
    }

    /// Puts every future reservation of `key` in `priority`'s class (e.g. the batch poller's keys).
    /// [`Priority::Normal`] is the default and is not stored, so per-resource keys set back to it
    /// leave nothing behind.
    pub fn set_priority(&self, key: &str, priority: Priority) {
        let mut map = self.priorities.lock().unwrap_or_else(|e| e.into_inner());
        if priority == Priority::Normal {
            map.remove(key);
        } else {
            map.insert(key.to_owned(), priority);
        }
    }

    fn priority_of(&self, key: &str) -> Priority {
        self.priorities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or_default()
    }

    /// The configuration this gate enforces.
    pub fn config(&self) -> &QuotaConfig {
        &self.cfg
    }

    fn with_state<T>(&self, api: Api, f: impl FnOnce(&mut ApiState) -> T) -> T {
        // A panic while holding the lock cannot leave the bookkeeping half-updated in a way that
        // breaks the window guarantee, so a poisoned lock is simply reused.
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard[api.index()])
    }

    /// Ask to make one call to `api` now on behalf of `key` (e.g. a resource's namespace/name).
    ///
    /// [`Admission::Admit`] counts the call at `now` (or at the last recorded call if `now` is
    /// earlier, which happens when threads race). [`Admission::WaitUntil`] holds a slot for `key`;
    /// asking again with the same key before then returns the same slot, and asking at or after
    /// it admits the call.
    pub fn reserve(&self, api: Api, key: &str, now: Instant) -> Admission {
        self.ask(api, key, now, true)
    }

    /// Like [`reserve`](Self::reserve), but a call that could go now is neither counted nor
    /// held: `None` means "it could go now", `Some(slot)` holds `slot` for `key` exactly as
    /// `reserve`'s [`Admission::WaitUntil`] does. Lets a caller that must persist something
    /// before sending (the intent of a POST) skip that write while it would only wait, and
    /// make it once, together with the reason it waits.
    pub fn hold(&self, api: Api, key: &str, now: Instant) -> Option<Instant> {
        match self.ask(api, key, now, false) {
            Admission::Admit => None,
            Admission::WaitUntil(slot) => Some(slot),
        }
    }

    /// [`reserve`](Self::reserve) when `record`, [`hold`](Self::hold) otherwise: only an
    /// admission that is recorded can be the probe after a pause.
    fn ask(&self, api: Api, key: &str, now: Instant, record: bool) -> Admission {
        let (windows, keep, grace) = (self.windows, self.keep, self.grace);
        let priority = self.priority_of(key);
        self.with_state(api, |st| {
            let now = st.calls.back().map_or(now, |&last| now.max(last));
            st.prune(now, keep, grace);
            if st.probing == Some(true) {
                // The probe is out: wait a little for its answer rather than pile on.
                return Admission::WaitUntil(now + windows[0].span / 20);
            }
            let answer = st.reserve(key, priority, now, &windows, record);
            if record && answer == Admission::Admit && st.probing == Some(false) {
                st.probing = Some(true);
            }
            answer
        })
    }

    /// Pause `api` for everyone until `until` (a 429's `Retry-After`). Pending reservations move
    /// behind the pause. A shorter pause never shortens a longer one.
    pub fn pause_until(&self, api: Api, until: Instant) {
        let windows = self.windows;
        self.with_state(api, |st| {
            st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
            st.probing = Some(false);
            st.recompute(&windows);
        });
    }

    /// MDE answered a call to `api` without a 429: probing after a pause is over, the full
    /// budget applies again.
    pub fn record_answer(&self, api: Api) {
        self.with_state(api, |st| st.probing = None);
    }

    /// Drop `key`'s reservation for `api`, if any (e.g. its resource was deleted).
    pub fn release(&self, api: Api, key: &str) {
        self.with_state(api, |st| {
            if let Some(idx) = st.position(key) {
                st.remove_at(idx);
            }
        });
    }

    /// Forgets everything held for `key` (its resource was deleted): its reservations of every
    /// API and its priority class.
    pub fn forget(&self, key: &str) {
        for api in Api::all() {
            self.release(api, key);
        }
        self.set_priority(key, Priority::Normal);
    }

    /// Keys passing `wanted` that the gate holds anything for: a reservation of any API or a
    /// priority class (for the tracked-resources gauge).
    pub fn keys(&self, wanted: impl Fn(&str) -> bool) -> usize {
        let priorities = self.priorities.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = state.iter().flat_map(|st| st.keys.keys());
        let keys: std::collections::HashSet<&str> = priorities
            .keys()
            .chain(reserved)
            .map(String::as_str)
            .filter(|k| wanted(k))
            .collect();
        keys.len()
    }

    /// Calls still allowed right now in the (minute, hour) windows ending at `now`, counting only
    /// admitted calls (pending reservations are not subtracted).
    pub fn remaining(&self, api: Api, now: Instant) -> (u32, u32) {
        let [m, h] = self.windows;
        self.with_state(api, |st| {
            let left = |w: Window| {
                let used = st.count_within(now, w.span);
                u32::try_from(w.limit.saturating_sub(used)).unwrap_or(u32::MAX)
            };
            (left(m), left(h))
        })
    }

    /// Number of reservations waiting for `api` (for a gauge).
    pub fn pending(&self, api: Api) -> usize {
        self.with_state(api, |st| st.pending.len())
    }

    /// Whether `api` is held back by MDE itself at `now`: a 429's pause is in force, or its probe
    /// has not been answered yet. Callers waiting then are waiting for MDE, not for the budget.
    pub fn throttled(&self, api: Api, now: Instant) -> bool {
        self.with_state(api, |st| {
            st.probing.is_some() || st.paused_until.is_some_and(|p| p > now)
        })
    }

    /// The end of the current pause of `api`, if one is in force or was never pruned.
    pub fn paused_until(&self, api: Api) -> Option<Instant> {
        self.with_state(api, |st| st.paused_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn full() -> QuotaConfig {
        QuotaConfig::from_budget(1.0, 1.0)
    }

    fn small(per_minute: u32, per_hour: u32) -> QuotaConfig {
        QuotaConfig {
            per_minute,
            per_hour,
            minute: secs(60),
            hour: secs(3600),
            guard: secs(1),
        }
    }

    /// Deterministic xorshift, so the simulations are reproducible without a seeded RNG crate API.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Max number of `times` (sorted) in any half-open window `[t, t + w)`.
    fn max_in_window(times: &[Instant], w: Duration) -> usize {
        let mut best = 0;
        let mut j = 0;
        for i in 0..times.len() {
            if j < i {
                j = i;
            }
            while j < times.len() && times[j] < times[i] + w {
                j += 1;
            }
            best = best.max(j - i);
        }
        best
    }

    #[derive(Clone, Copy)]
    enum Behaviour {
        OnTime,
        /// Comes back late by up to this much (less than the grace period).
        Late(Duration),
        /// Sometimes never comes back (then asks again much later, as a newcomer).
        Flaky,
        /// Sometimes wakes before its slot (another event) and must get the same slot.
        Early,
        /// A random mix of all of the above, lateness up to half the grace period.
        Mixed,
    }

    struct Sim {
        admissions: Vec<(Instant, usize)>,
        /// Slots in the order reservations were created.
        created_slots: Vec<Instant>,
        /// Creation index of each admitted reservation, in admission order.
        admitted_reservations: Vec<usize>,
    }

    /// Greedy callers: each key wants one call after another, forever. Events at the same instant
    /// are processed in the order they were scheduled.
    fn simulate(cfg: QuotaConfig, keys: usize, span: Duration, behaviour: Behaviour) -> Sim {
        simulate_seeded(cfg, keys, span, behaviour, 0x9e37_79b9_7f4a_7c15)
    }

    fn simulate_seeded(
        cfg: QuotaConfig,
        keys: usize,
        span: Duration,
        behaviour: Behaviour,
        seed: u64,
    ) -> Sim {
        let gate = QuotaGate::new(cfg.clone());
        let base = Instant::now();
        let end = base + span;
        let grace = cfg.grace();
        let mut rng = Rng(seed);
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut push = |heap: &mut BinaryHeap<_>, t: Instant, k: usize| {
            heap.push(Reverse((t, seq, k)));
            seq += 1;
        };
        for k in 0..keys {
            push(&mut heap, base, k);
        }
        // Per key: (slot it was told, creation index of its reservation).
        let mut told: Vec<Option<(Instant, usize)>> = vec![None; keys];
        let mut sim = Sim {
            admissions: Vec::new(),
            created_slots: Vec::new(),
            admitted_reservations: Vec::new(),
        };
        while let Some(Reverse((t, _, k))) = heap.pop() {
            if t >= end {
                break;
            }
            let key = format!("ns/res-{k}");
            match gate.reserve(Api::Unisolate, &key, t) {
                Admission::Admit => {
                    if let Some((slot, created)) = told[k].take() {
                        assert!(t >= slot, "admitted before its slot");
                        sim.admitted_reservations.push(created);
                    }
                    sim.admissions.push((t, k));
                    // Greedy: immediately wants the next call.
                    push(&mut heap, t, k);
                }
                Admission::WaitUntil(slot) => {
                    assert!(slot > t, "a wait must end in the future");
                    match told[k] {
                        Some((prev, _)) if t < prev => {
                            // Woken early by "another event": same slot, and the return at
                            // the slot is still scheduled.
                            if matches!(behaviour, Behaviour::Mixed) {
                                // Late callers ahead may have pushed it, never earlier.
                                assert!(slot >= prev, "a reservation moved earlier");
                            } else {
                                assert_eq!(slot, prev, "idempotent reservation changed its slot");
                            }
                            continue;
                        }
                        Some((_, created)) => {
                            assert!(
                                !matches!(behaviour, Behaviour::OnTime | Behaviour::Early),
                                "a caller back exactly at its slot was refused"
                            );
                            told[k] = Some((slot, created));
                        }
                        None => {
                            if let Some(&last) = sim.created_slots.last() {
                                assert!(
                                    slot >= last,
                                    "FIFO: a later reservation got an earlier slot"
                                );
                            }
                            told[k] = Some((slot, sim.created_slots.len()));
                            sim.created_slots.push(slot);
                        }
                    }
                    let behaviour = match behaviour {
                        Behaviour::Mixed => match rng.below(4) {
                            0 => Behaviour::OnTime,
                            1 => Behaviour::Late(grace / 2),
                            2 => Behaviour::Flaky,
                            _ => Behaviour::Early,
                        },
                        b => b,
                    };
                    let back = match behaviour {
                        Behaviour::OnTime => slot,
                        Behaviour::Late(max) => {
                            slot + Duration::from_millis(rng.below(max.as_millis() as u64 + 1))
                        }
                        Behaviour::Flaky => {
                            if rng.below(50) == 0 {
                                // Vanishes: the reservation must expire; it asks again much later.
                                told[k] = None;
                                slot + grace * 2
                            } else {
                                slot + Duration::from_millis(rng.below(3000))
                            }
                        }
                        Behaviour::Mixed => slot,
                        Behaviour::Early => {
                            if rng.below(4) == 0 && slot - t > Duration::from_millis(2) {
                                push(&mut heap, t + (slot - t) / 2, k);
                            }
                            slot
                        }
                    };
                    push(&mut heap, back, k);
                }
            }
        }
        sim
    }

    fn assert_windows(cfg: &QuotaConfig, sim: &Sim) {
        let times: Vec<Instant> = sim.admissions.iter().map(|a| a.0).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(max_in_window(&times, cfg.minute) <= cfg.per_minute as usize);
        assert!(max_in_window(&times, cfg.hour) <= cfg.per_hour as usize);
        // The guard margin holds too: no N + 1 calls within W + guard.
        assert!(max_in_window(&times, cfg.minute + cfg.guard) <= cfg.per_minute as usize);
        assert!(max_in_window(&times, cfg.hour + cfg.guard) <= cfg.per_hour as usize);
    }

    #[test]
    fn greedy_day_on_time_is_safe_fifo_and_uses_the_budget_fully() {
        let cfg = full();
        let sim = simulate(cfg.clone(), 300, secs(86_400), Behaviour::OnTime);
        assert_windows(&cfg, &sim);
        let base = sim.admissions[0].0;
        let times: Vec<Duration> = sim.admissions.iter().map(|a| a.0 - base).collect();

        // First hour: a batch of 100 every 61 s (minute + guard) until 1500 are used.
        assert_eq!(times.iter().filter(|&&t| t < secs(3600)).count(), 1500);
        for k in 0..15u64 {
            let at = secs(61 * k);
            assert_eq!(times.iter().filter(|&&t| t == at).count(), 100, "batch {k}");
        }
        // The hour pattern repeats every 3601 s: 24 full hours fit in one day.
        assert_eq!(times.len(), 24 * 1500);

        // FIFO: reservations are admitted in the order they were created.
        assert!(sim.admitted_reservations.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn greedy_day_with_late_callers_never_exceeds_the_budget() {
        let cfg = full();
        let sim = simulate(cfg.clone(), 250, secs(86_400), Behaviour::Late(secs(20)));
        assert_windows(&cfg, &sim);
        eprintln!("late callers: {} admissions in a day", sim.admissions.len());
        // Being late only shifts slots; almost the whole budget is still used.
        assert!(
            sim.admissions.len() >= 24 * 1500 * 95 / 100,
            "{}",
            sim.admissions.len()
        );
    }

    #[test]
    fn greedy_day_with_vanishing_callers_expires_their_slots() {
        let cfg = full();
        let sim = simulate(cfg.clone(), 250, secs(86_400), Behaviour::Flaky);
        assert_windows(&cfg, &sim);
        eprintln!(
            "vanishing callers: {} admissions in a day",
            sim.admissions.len()
        );
        assert!(
            sim.admissions.len() >= 24 * 1500 * 90 / 100,
            "{}",
            sim.admissions.len()
        );
    }

    #[test]
    fn greedy_day_with_early_wakeups_keeps_slots_and_budget() {
        let cfg = full();
        let sim = simulate(cfg.clone(), 300, secs(86_400), Behaviour::Early);
        assert_windows(&cfg, &sim);
        assert_eq!(sim.admissions.len(), 24 * 1500);
    }

    #[test]
    fn random_small_budgets_and_mixed_callers_never_exceed_any_window() {
        let mut rng = Rng(42);
        for seed in 1..=40u64 {
            let per_minute = 1 + rng.below(5) as u32;
            let per_hour = per_minute + rng.below(20) as u32;
            let cfg = QuotaConfig {
                per_minute,
                per_hour,
                minute: Duration::from_millis(500 + rng.below(60_000)),
                hour: Duration::from_millis(60_000 + rng.below(600_000)),
                guard: Duration::from_millis(rng.below(2_000)),
            };
            let keys = 1 + rng.below(12) as usize;
            let sim = simulate_seeded(cfg.clone(), keys, secs(6 * 3600), Behaviour::Mixed, seed);
            assert_windows(&cfg, &sim);
            assert!(!sim.admissions.is_empty());
        }
    }

    #[test]
    fn small_budget_simulation_is_exact() {
        let cfg = small(3, 7);
        let sim = simulate(cfg.clone(), 5, secs(4 * 3600), Behaviour::Late(secs(2)));
        assert_windows(&cfg, &sim);
        let sim = simulate(cfg.clone(), 5, secs(4 * 3600), Behaviour::OnTime);
        assert_windows(&cfg, &sim);
        // 7 per (3600 + 1) s.
        assert_eq!(sim.admissions.len(), 4 * 7);
    }

    #[test]
    fn hold_counts_nothing_when_the_call_could_go_and_holds_a_slot_when_it_must_wait() {
        let gate = QuotaGate::new(small(1, 100));
        let t0 = Instant::now();
        // Free quota: nothing counted, nothing held; the real call is admitted afterwards.
        assert_eq!(gate.hold(Api::Isolate, "a", t0), None);
        assert_eq!(gate.remaining(Api::Isolate, t0), (1, 100));
        assert_eq!(gate.pending(Api::Isolate), 0);
        assert_eq!(gate.reserve(Api::Isolate, "a", t0), Admission::Admit);
        // Full: b's slot is held exactly as reserve would hold it, and c lines up behind it.
        let slot_b = t0 + secs(61);
        assert_eq!(gate.hold(Api::Isolate, "b", t0), Some(slot_b));
        assert_eq!(gate.pending(Api::Isolate), 1);
        assert_eq!(
            gate.reserve(Api::Isolate, "c", t0),
            Admission::WaitUntil(slot_b + secs(61))
        );
        // At its slot b may go: hold says so without taking it, reserve admits.
        assert_eq!(gate.hold(Api::Isolate, "b", slot_b), None);
        assert_eq!(gate.pending(Api::Isolate), 2);
        assert_eq!(gate.reserve(Api::Isolate, "b", slot_b), Admission::Admit);
        assert_eq!(gate.pending(Api::Isolate), 1);
    }

    #[test]
    fn throttled_while_paused_and_until_the_probe_is_answered() {
        let gate = QuotaGate::new(small(100, 1000));
        let t0 = Instant::now();
        assert!(!gate.throttled(Api::Unisolate, t0));
        gate.pause_until(Api::Unisolate, t0 + secs(10));
        assert!(gate.throttled(Api::Unisolate, t0));
        assert!(
            !gate.throttled(Api::Isolate, t0),
            "other APIs are not paused"
        );
        // After the pause one probe goes; until MDE answers it, still throttled.
        assert_eq!(
            gate.reserve(Api::Unisolate, "probe", t0 + secs(10)),
            Admission::Admit
        );
        assert!(gate.throttled(Api::Unisolate, t0 + secs(11)));
        gate.record_answer(Api::Unisolate);
        assert!(!gate.throttled(Api::Unisolate, t0 + secs(11)));
    }

    #[test]
    fn retries_in_the_low_class_go_after_every_first_attempt_waiting() {
        let gate = QuotaGate::new(small(1, 100));
        let t0 = Instant::now();
        assert_eq!(
            gate.reserve(Api::Unisolate, "first-1", t0),
            Admission::Admit
        );
        gate.set_priority("retry", Priority::Low);
        let retry_slot = match gate.reserve(Api::Unisolate, "retry", t0) {
            Admission::WaitUntil(s) => s,
            other => panic!("{other:?}"),
        };
        // A first attempt arriving later still goes first; the retry moves behind it.
        assert_eq!(
            gate.reserve(Api::Unisolate, "first-2", t0 + secs(1)),
            Admission::WaitUntil(retry_slot)
        );
        assert_eq!(
            gate.reserve(Api::Unisolate, "retry", t0 + secs(2)),
            Admission::WaitUntil(retry_slot + secs(61))
        );
        // Back to Normal leaves no entry behind.
        gate.set_priority("retry", Priority::Normal);
        assert!(gate.priorities.lock().unwrap().is_empty());
    }

    #[test]
    fn reservation_is_idempotent_and_takes_one_slot() {
        let gate = QuotaGate::new(small(1, 100));
        let t0 = Instant::now();
        assert_eq!(gate.reserve(Api::Isolate, "a", t0), Admission::Admit);
        let slot_b = t0 + secs(61);
        assert_eq!(
            gate.reserve(Api::Isolate, "b", t0),
            Admission::WaitUntil(slot_b)
        );
        // Woken early, several times: same slot, no extra slot taken.
        for dt in [1, 10, 60] {
            assert_eq!(
                gate.reserve(Api::Isolate, "b", t0 + secs(dt)),
                Admission::WaitUntil(slot_b)
            );
        }
        assert_eq!(gate.pending(Api::Isolate), 1);
        // The next key lines up right behind b.
        assert_eq!(
            gate.reserve(Api::Isolate, "c", t0 + secs(5)),
            Admission::WaitUntil(slot_b + secs(61))
        );
        assert_eq!(gate.reserve(Api::Isolate, "b", slot_b), Admission::Admit);
        assert_eq!(gate.pending(Api::Isolate), 1);
    }

    #[test]
    fn apis_and_keys_are_independent_per_api() {
        let gate = QuotaGate::new(small(1, 100));
        let t0 = Instant::now();
        for api in Api::all() {
            assert_eq!(gate.reserve(api, "a", t0), Admission::Admit);
        }
        assert!(matches!(
            gate.reserve(Api::Isolate, "a", t0),
            Admission::WaitUntil(_)
        ));
    }

    #[test]
    fn late_claim_pushes_later_reservations() {
        let gate = QuotaGate::new(small(1, 100));
        let t0 = Instant::now();
        assert_eq!(gate.reserve(Api::Isolate, "a", t0), Admission::Admit);
        let s1 = t0 + secs(61);
        let s2 = s1 + secs(61);
        assert_eq!(
            gate.reserve(Api::Isolate, "p1", t0),
            Admission::WaitUntil(s1)
        );
        assert_eq!(
            gate.reserve(Api::Isolate, "p2", t0),
            Admission::WaitUntil(s2)
        );
        // p1 comes back 39 s late: admitted, recorded at the actual time.
        let late = s1 + secs(39);
        assert_eq!(gate.reserve(Api::Isolate, "p1", late), Admission::Admit);
        // p2 at its original slot would be only 22 s after p1: it must wait for late + 61 s.
        assert_eq!(
            gate.reserve(Api::Isolate, "p2", s2),
            Admission::WaitUntil(late + secs(61))
        );
        assert_eq!(
            gate.reserve(Api::Isolate, "p2", late + secs(61)),
            Admission::Admit
        );
    }

    #[test]
    fn a_later_reservation_may_go_at_its_slot_while_an_earlier_one_is_late() {
        let gate = QuotaGate::new(small(2, 100));
        let t0 = Instant::now();
        assert_eq!(gate.reserve(Api::Cancel, "x", t0), Admission::Admit);
        assert_eq!(gate.reserve(Api::Cancel, "y", t0), Admission::Admit);
        let s = t0 + secs(61);
        assert_eq!(gate.reserve(Api::Cancel, "p1", t0), Admission::WaitUntil(s));
        assert_eq!(gate.reserve(Api::Cancel, "p2", t0), Admission::WaitUntil(s));
        assert_eq!(
            gate.reserve(Api::Cancel, "p3", t0),
            Admission::WaitUntil(s + secs(61))
        );
        // p2 on time, p1 late: p2 goes; p1's capacity stays held for it, so a newcomer lines up
        // behind p3 (both fit at s + 61, when p1's and p2's slots leave the window).
        assert_eq!(gate.reserve(Api::Cancel, "p2", s), Admission::Admit);
        assert_eq!(
            gate.reserve(Api::Cancel, "newcomer", s + secs(1)),
            Admission::WaitUntil(s + secs(61))
        );
        assert_eq!(
            gate.reserve(Api::Cancel, "p1", s + secs(2)),
            Admission::Admit
        );
        // p1 actually went at s + 2, not s: p3 still fits at s + 61, the newcomer is pushed.
        assert_eq!(
            gate.reserve(Api::Cancel, "p3", s + secs(61)),
            Admission::Admit
        );
        assert_eq!(
            gate.reserve(Api::Cancel, "newcomer", s + secs(61)),
            Admission::WaitUntil(s + secs(63))
        );
        assert_eq!(
            gate.reserve(Api::Cancel, "newcomer", s + secs(63)),
            Admission::Admit
        );
    }

    #[test]
    fn newcomers_queue_behind_pending_reservations() {
        let gate = QuotaGate::new(small(1, 100));
        let t0 = Instant::now();
        assert_eq!(gate.reserve(Api::Isolate, "a", t0), Admission::Admit);
        assert_eq!(
            gate.reserve(Api::Isolate, "b", t0),
            Admission::WaitUntil(t0 + secs(61))
        );
        // At b's slot a newcomer that arrives first must not take b's slot.
        assert_eq!(
            gate.reserve(Api::Isolate, "c", t0 + secs(61)),
            Admission::WaitUntil(t0 + secs(122))
        );
        assert_eq!(
            gate.reserve(Api::Isolate, "b", t0 + secs(61)),
            Admission::Admit
        );
    }

    #[test]
    fn pause_blocks_admission_and_pushes_reservations() {
        let gate = QuotaGate::new(small(10, 100));
        let t0 = Instant::now();
        assert_eq!(gate.reserve(Api::Unisolate, "a", t0), Admission::Admit);
        let until = t0 + secs(120);
        gate.pause_until(Api::Unisolate, until);
        // A shorter pause does not shorten it.
        gate.pause_until(Api::Unisolate, t0 + secs(5));
        assert_eq!(gate.paused_until(Api::Unisolate), Some(until));
        assert_eq!(
            gate.reserve(Api::Unisolate, "b", t0 + secs(1)),
            Admission::WaitUntil(until)
        );
        assert_eq!(
            gate.reserve(Api::Unisolate, "b", t0 + secs(119)),
            Admission::WaitUntil(until)
        );
        // Other APIs are not paused.
        assert_eq!(
            gate.reserve(Api::Isolate, "b", t0 + secs(1)),
            Admission::Admit
        );
        assert_eq!(gate.reserve(Api::Unisolate, "b", until), Admission::Admit);
        // "b" is the probe after the 429; once MDE answers it, the budget applies again.
        gate.record_answer(Api::Unisolate);
        assert_eq!(gate.reserve(Api::Unisolate, "c", until), Admission::Admit);

        // A pause arriving after a reservation was handed out moves it.
        let gate = QuotaGate::new(small(1, 100));
        assert_eq!(gate.reserve(Api::Cancel, "a", t0), Admission::Admit);
        assert_eq!(
            gate.reserve(Api::Cancel, "b", t0),
            Admission::WaitUntil(t0 + secs(61))
        );
        gate.pause_until(Api::Cancel, t0 + secs(300));
        assert_eq!(
            gate.reserve(Api::Cancel, "b", t0 + secs(61)),
            Admission::WaitUntil(t0 + secs(300))
        );
        assert_eq!(
            gate.reserve(Api::Cancel, "b", t0 + secs(300)),
            Admission::Admit
        );
    }

    #[test]
    fn unclaimed_reservations_expire_after_grace() {
        let cfg = small(1, 100);
        let grace = cfg.grace();
        let t0 = Instant::now();
        let s = t0 + secs(61);
        let setup = || {
            let gate = QuotaGate::new(cfg.clone());
            assert_eq!(gate.reserve(Api::Isolate, "a", t0), Admission::Admit);
            assert_eq!(
                gate.reserve(Api::Isolate, "gone", t0),
                Admission::WaitUntil(s)
            );
            // While "gone" holds its slot, the next caller lines up behind it.
            assert_eq!(
                gate.reserve(Api::Isolate, "other", s + secs(30)),
                Admission::WaitUntil(s + secs(61))
            );
            assert_eq!(
                gate.reserve(Api::Isolate, "other", s + secs(61)),
                Admission::Admit
            );
            gate
        };

        // Within grace (counted from the slot it was told), "gone" is still served first.
        let gate = setup();
        assert_eq!(gate.pending(Api::Isolate), 1);
        assert_eq!(
            gate.reserve(Api::Isolate, "gone", s + grace),
            Admission::Admit
        );

        // After grace it is dropped, even though others passing it kept pushing its slot.
        let gate = setup();
        let after = s + grace + Duration::from_millis(1);
        assert_eq!(gate.reserve(Api::Isolate, "third", after), Admission::Admit);
        assert_eq!(gate.pending(Api::Isolate), 0);
        assert_eq!(
            gate.reserve(Api::Isolate, "gone", after),
            Admission::WaitUntil(after + secs(61))
        );
    }

    #[test]
    fn release_frees_the_slot() {
        let gate = QuotaGate::new(small(1, 100));
        let t0 = Instant::now();
        assert_eq!(gate.reserve(Api::Isolate, "a", t0), Admission::Admit);
        assert_eq!(
            gate.reserve(Api::Isolate, "b", t0),
            Admission::WaitUntil(t0 + secs(61))
        );
        gate.release(Api::Isolate, "b");
        assert_eq!(gate.pending(Api::Isolate), 0);
        assert_eq!(
            gate.reserve(Api::Isolate, "c", t0 + secs(61)),
            Admission::Admit
        );
    }

    #[test]
    fn racing_clocks_are_clamped() {
        let gate = QuotaGate::new(small(2, 100));
        let t0 = Instant::now();
        assert_eq!(
            gate.reserve(Api::Isolate, "a", t0 + secs(60)),
            Admission::Admit
        );
        // A caller whose `now` was read earlier is recorded at t0 + 60, not t0.
        assert_eq!(gate.reserve(Api::Isolate, "b", t0), Admission::Admit);
        assert_eq!(
            gate.reserve(Api::Isolate, "c", t0 + secs(61)),
            Admission::WaitUntil(t0 + secs(121))
        );
    }

    #[test]
    fn hour_window_caps_after_minute_batches() {
        let gate = QuotaGate::new(small(2, 3));
        let t0 = Instant::now();
        assert_eq!(gate.reserve(Api::MachinesRead, "a", t0), Admission::Admit);
        assert_eq!(gate.reserve(Api::MachinesRead, "b", t0), Admission::Admit);
        assert_eq!(
            gate.reserve(Api::MachinesRead, "c", t0),
            Admission::WaitUntil(t0 + secs(61))
        );
        assert_eq!(
            gate.reserve(Api::MachinesRead, "d", t0),
            Admission::WaitUntil(t0 + secs(3601))
        );
        assert_eq!(
            gate.reserve(Api::MachinesRead, "e", t0),
            Admission::WaitUntil(t0 + secs(3601))
        );
        assert_eq!(
            gate.reserve(Api::MachinesRead, "f", t0),
            Admission::WaitUntil(t0 + secs(3662))
        );
    }

    #[test]
    fn remaining_counts_admitted_calls_in_each_window() {
        let gate = QuotaGate::new(small(3, 5));
        let t0 = Instant::now();
        assert_eq!(gate.remaining(Api::Isolate, t0), (3, 5));
        gate.reserve(Api::Isolate, "a", t0);
        gate.reserve(Api::Isolate, "b", t0);
        assert_eq!(gate.remaining(Api::Isolate, t0 + secs(10)), (1, 3));
        assert_eq!(gate.remaining(Api::Isolate, t0 + secs(61)), (3, 3));
        assert_eq!(gate.remaining(Api::Isolate, t0 + secs(3601)), (3, 5));
    }

    #[test]
    fn memory_is_bounded() {
        let gate = QuotaGate::new(small(100, 1500));
        let t0 = Instant::now();
        for i in 0..20_000u64 {
            let t = t0 + Duration::from_secs(i * 3);
            gate.reserve(Api::MachineActionsRead, "poller", t);
        }
        let st = gate.state.lock().unwrap();
        assert!(st[Api::MachineActionsRead.index()].calls.len() <= 1500);
        assert!(st[Api::MachineActionsRead.index()].pending.len() <= 1);
    }

    #[test]
    fn from_budget_scales_limits_and_windows() {
        let c = QuotaConfig::from_budget(1.0, 1.0);
        assert_eq!((c.per_minute, c.per_hour), (100, 1500));
        assert_eq!((c.minute, c.hour, c.guard), (secs(60), secs(3600), secs(1)));

        let c = QuotaConfig::from_budget(0.5, 60.0);
        assert_eq!((c.per_minute, c.per_hour), (50, 750));
        assert_eq!((c.minute, c.hour), (secs(1), secs(60)));
        assert_eq!(
            c.guard,
            Duration::from_millis(50),
            "at least 50 ms of real time"
        );
        let c = QuotaConfig::from_budget(1.0, 10.0);
        assert_eq!(c.guard, Duration::from_millis(100));

        let c = QuotaConfig::from_budget(0.29, 1.0);
        assert_eq!((c.per_minute, c.per_hour), (29, 435));
        let c = QuotaConfig::from_budget(0.8, 1.0);
        assert_eq!((c.per_minute, c.per_hour), (80, 1200));
        let c = QuotaConfig::from_budget(0.333, 1.0);
        assert_eq!((c.per_minute, c.per_hour), (33, 499));
        // Floors, but never below one call.
        let c = QuotaConfig::from_budget(0.001, 1.0);
        assert_eq!((c.per_minute, c.per_hour), (1, 1));
        let c = QuotaConfig::from_budget(0.0, 1.0);
        assert_eq!((c.per_minute, c.per_hour), (1, 1));
        // Above 100 % is clamped; nonsense scale falls back to real time.
        let c = QuotaConfig::from_budget(3.0, 0.0);
        assert_eq!((c.per_minute, c.per_hour, c.minute), (100, 1500, secs(60)));
        let c = QuotaConfig::from_budget(f64::NAN, f64::NAN);
        assert_eq!((c.per_minute, c.minute), (100, secs(60)));
    }

    #[test]
    fn api_labels_are_stable() {
        let labels: Vec<&str> = Api::all().iter().map(|a| a.as_str()).collect();
        assert_eq!(
            labels,
            [
                "isolate",
                "unisolate",
                "machineactions_read",
                "machines_read",
                "cancel"
            ]
        );
        assert!(Api::Cancel.is_mutation() && !Api::MachinesRead.is_mutation());
    }

    #[test]
    fn gate_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<QuotaGate>();
    }

    #[test]
    fn an_urgent_caller_is_served_before_waiting_background_callers() {
        let gate = QuotaGate::new(small(2, 100));
        let t0 = Instant::now();
        gate.set_priority("poller", Priority::High);
        gate.set_priority("drift", Priority::Low);
        let api = Api::MachineActionsRead;
        assert_eq!(gate.reserve(api, "a", t0), Admission::Admit);
        assert_eq!(gate.reserve(api, "b", t0), Admission::Admit);
        // The window is full: a background read and a lookup wait, in arrival order.
        let Admission::WaitUntil(drift) = gate.reserve(api, "drift", t0) else {
            panic!("must wait")
        };
        let Admission::WaitUntil(lookup) = gate.reserve(api, "lookup", t0) else {
            panic!("must wait")
        };
        assert!(lookup >= drift);
        // The urgent poller arrives last and is given the first slot; the others move later.
        let Admission::WaitUntil(poller) = gate.reserve(api, "poller", t0) else {
            panic!("must wait")
        };
        let Admission::WaitUntil(lookup_now) = gate.reserve(api, "lookup", t0) else {
            panic!("still waiting")
        };
        let Admission::WaitUntil(drift_now) = gate.reserve(api, "drift", t0) else {
            panic!("still waiting")
        };
        assert!(poller <= lookup_now && lookup_now <= drift_now);
        assert!(poller < drift_now, "the background read gave way");
        // Served in that order, and never more than the budget in a window.
        let mut admitted = Vec::new();
        for (key, at) in [
            ("poller", poller),
            ("lookup", lookup_now),
            ("drift", drift_now),
        ] {
            assert_eq!(gate.reserve(api, key, at), Admission::Admit, "{key}");
            admitted.push(at);
        }
        let mut all = vec![t0, t0];
        all.extend(admitted);
        assert!(max_in_window(&all, secs(61)) <= 2);
    }

    #[test]
    fn after_a_429_one_probe_goes_and_the_rest_wait_for_its_answer() {
        let gate = QuotaGate::new(small(100, 1500));
        let api = Api::Unisolate;
        let t0 = Instant::now();
        gate.pause_until(api, t0 + secs(10));
        let at = t0 + secs(10);
        assert_eq!(gate.reserve(api, "probe", at), Admission::Admit);
        // Budget is plenty, but the probe's answer is not in yet.
        assert!(matches!(
            gate.reserve(api, "b", at),
            Admission::WaitUntil(_)
        ));
        assert!(matches!(
            gate.reserve(api, "c", at),
            Admission::WaitUntil(_)
        ));
        gate.record_answer(api);
        assert_eq!(gate.reserve(api, "b", at), Admission::Admit);
        assert_eq!(gate.reserve(api, "c", at), Admission::Admit);
    }
}
