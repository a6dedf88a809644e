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
//!
//! # Sharing the key with others, and with a previous process
//!
//! The windows checked are the budget's, lowered to what MDE was learned to allow after a 429
//! ([`learn`]; while a short-window limit is learned, calls are also spaced evenly, as a third,
//! one-call window). Lowering a limit only makes the check stricter, so the guarantee above holds
//! for whatever limit is in force. Calls a previous process made ([`QuotaGate::recall`]) or may
//! have made ([`QuotaGate::assume_recent_use`]) are merged into the recorded calls, which again
//! only makes the check stricter. With [`QuotaKey::App`] every API shares one state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

mod learn;

pub use learn::Span;
use learn::{Learning, Rules};

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

/// What MDE counts a budget against. Microsoft documents limits per API (the 429 body names
/// the key `Destination+TenantID+AppID`); whether isolate, unisolate and reads share one budget
/// is not documented, so both are supported, and learning from 429s covers a wrong guess.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QuotaKey {
    /// Each API has its own budget (MDE's documentation).
    #[default]
    Endpoint,
    /// One budget for every API of the application.
    App,
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
    /// Shared with [`ApiState::keys`]: a resource's key is its namespace and name, and a fleet
    /// has thousands of resources waiting here at once (with the `fleet10000` benchmark's 8,500,
    /// a second copy was 0.7 MB, heaptrack).
    key: Arc<str>,
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
    keys: HashMap<Arc<str>, u64>,
    paused_until: Option<Instant>,
    /// After a 429, MDE's real limit is below the budget (other tools share it): once the pause
    /// ends only one probe call goes, and the rest wait until MDE answers it without a 429.
    /// `Some(false)`: probing, the probe not sent yet; `Some(true)`: the probe is out.
    probing: Option<bool>,
    /// The limits MDE enforced when it refused calls (below the budget: others share it).
    learning: Learning,
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
            self.keys.remove(&*r.key);
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
                    keys.remove(&*r.key);
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
        let key: Arc<str> = Arc::from(key);
        self.keys.insert(key.clone(), seq);
        self.pending.insert(
            at,
            Reservation {
                seq,
                priority,
                key,
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

    /// Paused, or probing after a pause.
    fn held_back(&self, now: Instant) -> bool {
        self.probing.is_some() || self.paused_until.is_some_and(|p| p > now)
    }

    /// Pause until `until` (a shorter pause never shortens a longer one); then one probe.
    fn pause(&mut self, until: Instant, windows: &[Window], rules: Rules) {
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
        self.probing = Some(false);
        self.learning.defer(until, rules);
        self.recompute(windows);
    }

    /// Recorded calls in `(at - span, at]`.
    fn count_ending_at(&self, at: Instant, span: Duration) -> usize {
        self.calls
            .iter()
            .rev()
            .skip_while(|&&c| c > at)
            .take_while(|&&c| c + span > at)
            .count()
    }

    /// Adds calls made elsewhere (they only make the ledger stricter) and re-derives the slots.
    fn merge(&mut self, times: impl IntoIterator<Item = Instant>, windows: &[Window]) {
        self.calls.extend(times);
        self.calls.make_contiguous().sort();
        self.recompute(windows);
    }

    /// The windows in force: the budget's with the learned limits applied, and, while others are
    /// known to share the short window, a minimum spacing expressed as a one-call window.
    fn in_force(&self, base: &[Window; 2]) -> [Window; 3] {
        let [m, h] = self.learning.apply(base);
        let spacing = match self.learning.spacing(base) {
            Some(span) => Window { limit: 1, span },
            None => Window {
                limit: usize::MAX,
                span: Duration::ZERO,
            },
        };
        [m, h, spacing]
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
    rules: Rules,
    key: QuotaKey,
    /// Per API: calls wait until MDE's record of a previous process's calls was recalled.
    awaiting_record: [std::sync::atomic::AtomicBool; 5],
    state: Mutex<[ApiState; 5]>,
    /// Priority class per key; keys not listed are [`Priority::Normal`].
    priorities: Mutex<HashMap<String, Priority>>,
    /// MDE's last 429: the API and when it was seen.
    last_refused: Mutex<Option<(Api, Instant)>>,
}

impl QuotaGate {
    /// A gate applying `cfg` to each API separately.
    pub fn new(cfg: QuotaConfig) -> Self {
        Self::with_key(cfg, QuotaKey::Endpoint)
    }

    /// A gate applying `cfg` per API ([`QuotaKey::Endpoint`]) or once to all APIs together
    /// ([`QuotaKey::App`]).
    pub fn with_key(cfg: QuotaConfig, key: QuotaKey) -> Self {
        let windows = cfg.windows();
        let keep = windows[0].span.max(windows[1].span);
        let grace = cfg.grace();
        QuotaGate {
            rules: Rules::new(cfg.minute),
            key,
            awaiting_record: Default::default(),
            cfg,
            windows,
            keep,
            grace,
            state: Mutex::new(Default::default()),
            priorities: Mutex::new(HashMap::new()),
            last_refused: Mutex::new(None),
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
        let slot = match self.key {
            QuotaKey::Endpoint => api.index(),
            QuotaKey::App => 0,
        };
        f(&mut guard[slot])
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
        let (base, keep, grace, rules) = (self.windows, self.keep, self.grace, self.rules);
        if self.awaiting_record[api.index()].load(std::sync::atomic::Ordering::Acquire) {
            // Not a slot: the record decides when the first one is.
            return Admission::WaitUntil(now + base[0].span / 20);
        }
        let priority = self.priority_of(key);
        self.with_state(api, |st| {
            let now = st.calls.back().map_or(now, |&last| now.max(last));
            st.prune(now, keep, grace);
            st.learning.relax(now, &base, rules);
            let windows = st.in_force(&base);
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

    /// Pause `api` for everyone until `until`, learning nothing (tests of the pause alone; MDE's
    /// 429s go through [`refused`](Self::refused)). A shorter pause never shortens a longer one.
    #[cfg(test)]
    pub fn pause_until(&self, api: Api, until: Instant) {
        let (base, rules) = (self.windows, self.rules);
        self.with_state(api, |st| st.pause(until, &st.in_force(&base), rules));
    }

    /// MDE refused with a 429 the call to `api` that this gate admitted at `sent`, and asked for
    /// a pause until `until`; `span` is the window that refused it when the 429 said so (else a
    /// pause longer than the short window means the hour). Pauses `api` for everyone, and
    /// learns the limit MDE enforces: the calls of ours that fit in that window before the
    /// refused one (see [`learn`]).
    pub fn refused(
        &self,
        api: Api,
        sent: Instant,
        span: Option<Span>,
        until: Instant,
        now: Instant,
    ) {
        *self.last_refused.lock().unwrap_or_else(|e| e.into_inner()) = Some((api, now));
        let (base, rules) = (self.windows, self.rules);
        let (minute, hour) = (self.cfg.minute, self.cfg.hour);
        self.with_state(api, |st| {
            let new_episode = !st.held_back(now);
            let span = span.unwrap_or(if until.saturating_duration_since(now) > base[0].span {
                Span::Hour
            } else {
                Span::Minute
            });
            // MDE's window, without the guard: what MDE counted when it refused.
            let window = [minute, hour][span.index()];
            // A call recorded a little after `sent` (threads racing) is not counted: the limit
            // learned is then one lower, never higher.
            let used = st.count_ending_at(sent, window);
            st.learning
                .refused(span, used, &base, now, new_episode, rules);
            st.pause(until, &st.in_force(&base), rules);
        });
    }

    /// Holds every call of `api` (each asker is told to come back shortly) until
    /// [`recall`](Self::recall) brings MDE's record of the calls a previous process made: after
    /// a restart or a failover, no call goes into a window that process may have spent.
    pub fn await_record(&self, api: Api) {
        self.awaiting_record[api.index()].store(true, std::sync::atomic::Ordering::Release);
    }

    /// Adds to `api`'s ledger calls this process did not make but MDE counted: a previous
    /// process's, rebuilt from MDE's record after a restart or a failover (times after `now`
    /// count as `now`), and ends [`await_record`](Self::await_record).
    pub fn recall(&self, api: Api, calls: impl IntoIterator<Item = Instant>, now: Instant) {
        let base = self.windows;
        self.with_state(api, |st| {
            let windows = st.in_force(&base);
            st.merge(calls.into_iter().map(|c| c.min(now)), &windows);
        });
        self.awaiting_record[api.index()].store(false, std::sync::atomic::Ordering::Release);
    }

    /// Assumes that just before `now` someone else (a previous process, whose calls to `api`
    /// MDE keeps no record of, e.g. reads) used the whole short window at an even pace: the
    /// first window after a start then goes at that even pace rather than in a burst.
    pub fn assume_recent_use(&self, api: Api, now: Instant) {
        let base = self.windows;
        self.with_state(api, |st| {
            let windows = st.in_force(&base);
            let w = windows[0];
            let missing = w.limit.saturating_sub(st.count_within(now, w.span));
            let step = w.span / u32::try_from(w.limit.max(1)).unwrap_or(u32::MAX);
            let phantoms = (0..missing)
                .map(|j| now.checked_sub(step * u32::try_from(j).unwrap_or(u32::MAX)))
                .map(|t| t.unwrap_or(now));
            st.merge(phantoms, &windows);
        });
    }

    /// The limit in force for `api` in `span`: the budget, or below it what MDE was learned to
    /// allow.
    pub fn limit(&self, api: Api, span: Span) -> u32 {
        let base = self.windows;
        self.with_state(api, |st| {
            let w = st.learning.apply(&base)[span.index()];
            u32::try_from(w.limit).unwrap_or(u32::MAX)
        })
    }

    /// 429 episodes of `api` so far (a first 429 after a time without a pause).
    pub fn episodes(&self, api: Api) -> u64 {
        self.with_state(api, |st| st.learning.episodes())
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
        let reserved = state.iter().flat_map(|st| st.keys.keys()).map(|k| &**k);
        let keys: std::collections::HashSet<&str> = priorities
            .keys()
            .map(String::as_str)
            .chain(reserved)
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

    /// Calls admitted for `api` in the (minute, hour) windows ending at `now`. With
    /// [`QuotaKey::App`] every API reports the app's one count.
    pub fn used(&self, api: Api, now: Instant) -> (u32, u32) {
        let [m, h] = self.windows;
        self.with_state(api, |st| {
            let used = |w: Window| u32::try_from(st.count_within(now, w.span)).unwrap_or(u32::MAX);
            (used(m), used(h))
        })
    }

    /// What MDE counts the budget against.
    pub fn key(&self) -> QuotaKey {
        self.key
    }

    /// MDE's last 429 seen through this gate: the API and when.
    pub fn last_refused(&self) -> Option<(Api, Instant)> {
        *self.last_refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of reservations waiting for `api` (for a gauge).
    pub fn pending(&self, api: Api) -> usize {
        self.with_state(api, |st| st.pending.len())
    }

    /// Whether `api` is held back by MDE itself at `now`: a 429's pause is in force, or its probe
    /// has not been answered yet. Callers waiting then are waiting for MDE, not for the budget.
    pub fn throttled(&self, api: Api, now: Instant) -> bool {
        self.with_state(api, |st| st.held_back(now))
    }

    /// The end of the current pause of `api`, if one is in force or was never pruned.
    pub fn paused_until(&self, api: Api) -> Option<Instant> {
        self.with_state(api, |st| st.paused_until)
    }
}

#[cfg(test)]
mod tests;
