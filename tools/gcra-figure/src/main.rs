//! Measures how many calls a pair of `governor` (GCRA) limiters, one per MDE window, admits in
//! the worst sliding 60 s and 3600 s window, against an exact sliding-window ledger of 100/min and
//! 1,500/h. Deterministic: the limiters run on `governor::clock::FakeRelativeClock`.
//!
//! The client is greedy: the fake clock steps in `STEP` increments over `RUN` of fake time, and at
//! every step the client offers calls until one is refused. The admitted timestamps are then
//! scanned for the most calls in any half-open window `[t, t + W)` (the convention of the
//! operator's ledger) and, for reference, in any closed window `[t, t + W]`.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const PER_MINUTE: usize = 100;
const PER_HOUR: usize = 1500;
const STEP: Duration = Duration::from_millis(1);
const RUN: Duration = Duration::from_secs(4 * 3600);

/// Builds a variant's gate on a given fake clock.
type MakeGate = Box<dyn Fn(&FakeRelativeClock) -> Box<dyn Gate>>;

type Limiter = RateLimiter<NotKeyed, InMemoryState, FakeRelativeClock, StateInformationMiddleware>;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// A burst-1 quota that replenishes one cell per `d`.
fn period(d: Duration) -> Quota {
    Quota::with_period(d).expect("non-zero period")
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).expect("fits in u64")
}

/// Something that decides, at the fake clock's current time, whether one more call may go.
trait Gate {
    fn offer(&mut self, now: u64) -> bool;
}

/// Both limiters must admit a call, and neither is charged for a call the other refuses.
///
/// `governor` has no side-effect-free peek, but its documented outcomes are enough to know, before
/// charging anything, whether a limiter will admit: a refusal (`NotUntil`) charges nothing and says
/// when it will admit again; an admission (via `StateInformationMiddleware`) reports the remaining
/// burst capacity, and when that is 0 an immediate re-check is certain to be refused, which again
/// charges nothing and yields the next admission time. So each limiter's next admission instant is
/// always known, and both are charged only when both will admit (asserted).
struct Joint {
    clock: FakeRelativeClock,
    limiters: Vec<(Limiter, u64)>, // (limiter, earliest instant at which it admits)
}

impl Joint {
    fn new(clock: &FakeRelativeClock, quotas: &[Quota]) -> Self {
        let limiters = quotas
            .iter()
            .map(|&q| {
                (
                    RateLimiter::direct_with_clock(q, clock.clone()).with_middleware(),
                    0,
                )
            })
            .collect();
        Joint {
            clock: clock.clone(),
            limiters,
        }
    }
}

impl Gate for Joint {
    fn offer(&mut self, now: u64) -> bool {
        if self.limiters.iter().any(|&(_, ready)| ready > now) {
            return false;
        }
        for (limiter, ready) in &mut self.limiters {
            let snapshot = limiter.check().expect("a limiter known to be ready admits");
            if snapshot.remaining_burst_capacity() == 0 {
                let not_until = limiter.check().expect_err(
                    "no burst capacity left: the re-check is refused, charging nothing",
                );
                *ready = now + nanos(not_until.wait_time_from(self.clock.now()));
            }
        }
        true
    }
}

/// What a first attempt looks like: check the minute limiter, and only if it admits, the hour one.
/// A refused hour check leaves the minute limiter charged for a call that never went.
struct MinuteThenHour {
    minute: Limiter,
    hour: Limiter,
}

impl Gate for MinuteThenHour {
    fn offer(&mut self, _now: u64) -> bool {
        self.minute.check().is_ok() && self.hour.check().is_ok()
    }
}

/// Exact sliding-window ledger: a call at `x` goes if, for each window, fewer than N calls are in
/// `(x - W, x]`, i.e. every half-open window `[t, t + W)` holds at most N calls.
struct Ledger {
    calls: VecDeque<u64>,
}

impl Gate for Ledger {
    fn offer(&mut self, now: u64) -> bool {
        let fits = [(PER_MINUTE, MINUTE), (PER_HOUR, HOUR)]
            .iter()
            .all(|&(n, w)| {
                let len = self.calls.len();
                len < n || self.calls[len - n] + nanos(w) <= now
            });
        if fits {
            self.calls.push_back(now);
            if self.calls.len() > PER_HOUR {
                self.calls.pop_front();
            }
        }
        fits
    }
}

/// Runs a greedy client for `RUN` of fake time and returns the admitted timestamps (ns).
fn run(clock: &FakeRelativeClock, gate: &mut dyn Gate) -> Vec<u64> {
    let (step, end) = (nanos(STEP), nanos(RUN));
    let mut admitted = Vec::new();
    let mut now = clock.now().as_u64();
    assert_eq!(now, 0);
    while now < end {
        while gate.offer(now) {
            admitted.push(now);
        }
        clock.advance(STEP);
        now += step;
        debug_assert_eq!(now, clock.now().as_u64());
    }
    admitted
}

/// Most of the sorted `times` in any window of length `w`: half-open `[t, t + w)` or closed.
fn max_in_window(times: &[u64], w: Duration, closed: bool) -> usize {
    let w = nanos(w);
    let (mut best, mut j) = (0, 0);
    for i in 0..times.len() {
        j = j.max(i);
        while j < times.len() && (times[j] < times[i] + w || (closed && times[j] == times[i] + w)) {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

fn main() {
    let variants: Vec<(&str, MakeGate)> = vec![
        (
            "exact sliding-window ledger (reference)",
            Box::new(|_| {
                Box::new(Ledger {
                    calls: VecDeque::new(),
                })
            }),
        ),
        (
            "GCRA per_minute(100) + per_hour(1500)",
            Box::new(|c| {
                Box::new(Joint::new(
                    c,
                    &[Quota::per_minute(nz(100)), Quota::per_hour(nz(1500))],
                ))
            }),
        ),
        (
            "  same, minute-then-hour check (no rollback)",
            Box::new(|c| {
                Box::new(MinuteThenHour {
                    minute: RateLimiter::direct_with_clock(Quota::per_minute(nz(100)), c.clone())
                        .with_middleware(),
                    hour: RateLimiter::direct_with_clock(Quota::per_hour(nz(1500)), c.clone())
                        .with_middleware(),
                })
            }),
        ),
        (
            "GCRA exact, burst 1: period 600ms + 2.4s",
            Box::new(|c| {
                Box::new(Joint::new(
                    c,
                    &[
                        period(Duration::from_millis(600)),
                        period(Duration::from_millis(2400)),
                    ],
                ))
            }),
        ),
        (
            "GCRA exact, split: 1.2s burst 51 + 4.8s burst 751",
            Box::new(|c| {
                Box::new(Joint::new(
                    c,
                    &[
                        period(Duration::from_millis(1200)).allow_burst(nz(51)),
                        period(Duration::from_millis(4800)).allow_burst(nz(751)),
                    ],
                ))
            }),
        ),
    ];

    println!(
        "greedy client, fake clock, {} ms steps over {} h; windows half-open [t, t+W) (closed [t, t+W] in brackets)",
        STEP.as_millis(),
        RUN.as_secs() / 3600
    );
    println!(
        "{:<50} {:>11} {:>13} {:>13} {:>16}",
        "limiter", "max in 60s", "max in 3600s", "sustained/h", "1,500th call at"
    );
    for (name, make) in &variants {
        let clock = FakeRelativeClock::default();
        let mut gate = make(&clock);
        let times = run(&clock, gate.as_mut());
        let minute = max_in_window(&times, MINUTE, false);
        let minute_closed = max_in_window(&times, MINUTE, true);
        let hour = max_in_window(&times, HOUR, false);
        let hour_closed = max_in_window(&times, HOUR, true);
        // Calls in the last full hour of the run: the long-run rate.
        let last_hour_start = nanos(RUN) - nanos(HOUR);
        let sustained = times.iter().filter(|&&t| t >= last_hour_start).count();
        let backlog = times
            .get(PER_HOUR - 1)
            .map(|&t| format!("{:.1} s", t as f64 / 1e9))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<50} {:>5} [{:>3}] {:>6} [{:>4}] {:>13} {:>16}",
            name, minute, minute_closed, hour, hour_closed, sustained, backlog
        );
    }
    println!(
        "budget: {PER_MINUTE} in any 60 s, {PER_HOUR} in any 3600 s; governor {}",
        env!("GOVERNOR_VERSION")
    );
}
