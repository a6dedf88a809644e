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

/// Greedy single caller from `from` to `to`: asks again at every answer's slot; returns the
/// admission times.
fn greedy(gate: &QuotaGate, api: Api, from: Instant, to: Instant) -> Vec<Instant> {
    let (mut t, mut out) = (from, Vec::new());
    while t < to {
        match gate.reserve(api, "k", t) {
            Admission::Admit => out.push(t),
            Admission::WaitUntil(slot) => t = slot,
        }
    }
    out
}

#[test]
fn a_429_teaches_the_limit_others_leave_and_spaces_the_calls() {
    let gate = QuotaGate::new(small(10, 100));
    let (api, t0) = (Api::Unisolate, Instant::now());
    for i in 0..6 {
        assert_eq!(gate.reserve(api, "k", t0 + secs(i)), Admission::Admit);
    }
    // The sixth was refused: another tool spends 5 of the 10 in this window; the gate keeps
    // one below the 5 that fit.
    let now = t0 + secs(5);
    gate.refused(api, t0 + secs(5), Some(Span::Minute), now + secs(2), now);
    assert_eq!(gate.limit(api, Span::Minute), 4);
    assert_eq!(gate.limit(api, Span::Hour), 100);
    assert_eq!(gate.episodes(api), 1);
    assert!(gate.throttled(api, now));
    // After the pause one probe at a time, each answered; never more than 4 in a window, and
    // 61/4 s apart.
    let (mut t, mut times) = (now, Vec::new());
    while t < t0 + secs(900) {
        match gate.reserve(api, "k", t) {
            Admission::Admit => {
                times.push(t);
                gate.record_answer(api);
            }
            Admission::WaitUntil(slot) => t = slot,
        }
    }
    assert!(times[0] >= now + secs(2), "nothing before the pause ends");
    assert!(max_in_window(&times, secs(61)) <= 4);
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(15_250),
            "{pair:?}"
        );
    }
    assert!(times.len() >= 50, "{} calls in 15 minutes", times.len());
}

#[test]
fn calls_in_flight_refused_in_the_same_episode_are_one_episode() {
    let gate = QuotaGate::new(small(10, 100));
    let (api, t0) = (Api::Unisolate, Instant::now());
    for i in 0..8 {
        assert_eq!(gate.reserve(api, "k", t0 + secs(i)), Admission::Admit);
    }
    let now = t0 + secs(8);
    gate.refused(api, t0 + secs(5), None, now + secs(3), now);
    gate.refused(api, t0 + secs(7), None, now + secs(3), now);
    assert_eq!(gate.limit(api, Span::Minute), 4);
    assert_eq!(gate.episodes(api), 1);
    // A long pause without a window named means the hour refused.
    gate.record_answer(api);
    let later = t0 + secs(100);
    gate.refused(api, t0 + secs(7), None, later + secs(1800), later);
    assert_eq!(gate.limit(api, Span::Hour), 6);
    assert_eq!(gate.episodes(api), 2);
}

#[test]
fn with_the_budget_to_itself_nothing_is_learned() {
    let gate = QuotaGate::new(small(10, 100));
    let t0 = Instant::now();
    let times = greedy(&gate, Api::Isolate, t0, t0 + secs(3600));
    assert_eq!(times.len(), 100);
    assert_eq!(
        &times[..10],
        &[t0; 10],
        "a burst while nobody else is known"
    );
    assert_eq!(gate.limit(Api::Isolate, Span::Minute), 10);
    assert_eq!(gate.episodes(Api::Isolate), 0);
}

#[test]
fn recalled_calls_of_a_previous_process_count_like_our_own() {
    let gate = QuotaGate::new(small(10, 100));
    let (api, t0) = (Api::Unisolate, Instant::now() + secs(3600));
    // The previous process sent 10 in the last 30 s and 90 earlier in the hour.
    let recent = (0..10).map(|i| t0 - secs(30) + secs(i));
    let earlier = (0..90).map(|i| t0 - secs(3000) + secs(i * 10));
    gate.recall(api, recent.chain(earlier), t0);
    assert_eq!(gate.remaining(api, t0), (0, 0));
    // Nothing goes before the oldest of the hour leaves it.
    let first = greedy(&gate, api, t0, t0 + secs(7200))[0];
    assert_eq!(first, t0 - secs(3000) + secs(3601));
    // Calls "after now" (a skewed record) count as now.
    let other = QuotaGate::new(small(10, 100));
    other.recall(api, [t0 + secs(50)], t0);
    assert_eq!(other.remaining(api, t0), (9, 99));
}

#[test]
fn an_assumed_recent_use_paces_the_first_window_instead_of_a_burst() {
    let gate = QuotaGate::new(small(10, 100));
    let (api, t0) = (Api::MachineActionsRead, Instant::now() + secs(60));
    gate.assume_recent_use(api, t0);
    let times = greedy(&gate, api, t0, t0 + secs(61));
    assert!(
        times[0] > t0,
        "the first read waits for the oldest assumed call"
    );
    assert!(times.len() <= 10);
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(6_000),
            "{pair:?}"
        );
    }
    // Assuming twice adds nothing: the window is already full.
    gate.assume_recent_use(api, t0);
    assert_eq!(gate.remaining(api, t0).0, 0);
}

#[test]
fn the_app_key_puts_every_api_in_one_budget() {
    let gate = QuotaGate::with_key(small(3, 100), QuotaKey::App);
    let t0 = Instant::now();
    assert_eq!(gate.reserve(Api::Unisolate, "a", t0), Admission::Admit);
    assert_eq!(gate.reserve(Api::Isolate, "b", t0), Admission::Admit);
    assert_eq!(
        gate.reserve(Api::MachineActionsRead, "c", t0),
        Admission::Admit
    );
    assert!(matches!(
        gate.reserve(Api::MachinesRead, "d", t0),
        Admission::WaitUntil(_)
    ));
    let apart = QuotaGate::new(small(3, 100));
    for api in Api::all() {
        assert_eq!(apart.reserve(api, "a", t0), Admission::Admit);
    }
}

#[test]
fn after_a_restart_posts_wait_for_the_record_and_reads_do_not() {
    let gate = QuotaGate::new(small(10, 100));
    let t0 = Instant::now();
    gate.await_record(Api::Unisolate);
    assert!(matches!(
        gate.reserve(Api::Unisolate, "a", t0),
        Admission::WaitUntil(t) if t > t0
    ));
    assert!(matches!(
        gate.hold(Api::Unisolate, "a", t0),
        Some(t) if t > t0
    ));
    assert_eq!(
        gate.reserve(Api::MachineActionsRead, "poller", t0),
        Admission::Admit
    );
    // The record: the previous process sent 9 in the last 10 s; one more fits, not two.
    gate.recall(Api::Unisolate, (0..9).map(|i| t0 - secs(10) + secs(i)), t0);
    assert_eq!(gate.reserve(Api::Unisolate, "a", t0), Admission::Admit);
    assert!(matches!(
        gate.reserve(Api::Unisolate, "b", t0),
        Admission::WaitUntil(_)
    ));
}

/// A model of MDE's own quota for one key: exact sliding windows over every admitted call,
/// whoever made it; a refusal names its window and the whole seconds until a slot frees.
struct MdeKey {
    admitted: VecDeque<Instant>,
}

impl MdeKey {
    const WINDOWS: [(usize, u64, Span); 2] = [(100, 60, Span::Minute), (1500, 3600, Span::Hour)];

    fn call(&mut self, t: Instant) -> Result<(), (Span, Duration)> {
        let mut refusal: Option<(Span, Duration)> = None;
        for (limit, secs, span) in Self::WINDOWS {
            let w = Duration::from_secs(secs);
            let inside: Vec<&Instant> = self.admitted.iter().filter(|&&c| c + w > t).collect();
            if inside.len() >= limit {
                let frees = *inside[inside.len() - limit] + w;
                let wait = Duration::from_secs((frees - t).as_secs_f64().ceil().max(1.0) as u64);
                if refusal.is_none_or(|(_, d)| wait > d) {
                    refusal = Some((span, wait));
                }
            }
        }
        match refusal {
            Some(r) => Err(r),
            None => {
                self.admitted.push_back(t);
                while self
                    .admitted
                    .front()
                    .is_some_and(|&c| c + Duration::from_secs(3600) <= t)
                {
                    self.admitted.pop_front();
                }
                Ok(())
            }
        }
    }
}

/// Another tool spends 50 of MDE's 100 calls a minute (one every 1.2 s) for two hours while the
/// gate, with the full budget, sends greedily: it learns, keeps to the rest, and probes rarely.
#[test]
fn a_steady_foreign_load_is_learned_and_what_it_leaves_is_used() {
    let gate = QuotaGate::new(full());
    let api = Api::Unisolate;
    let t0 = Instant::now();
    let end = t0 + secs(7200);
    let mut mde = MdeKey {
        admitted: VecDeque::new(),
    };
    let (mut foreign_at, mut ours_at) = (t0, t0);
    let (mut ours, mut foreign) = (0usize, 0usize);
    // Our 429s, each with whether an admitted call of ours came before it since the last one.
    let mut refusals: Vec<(Instant, bool)> = Vec::new();
    let mut admitted_since_refusal = true;
    while foreign_at < end || ours_at < end {
        if foreign_at <= ours_at {
            foreign += usize::from(mde.call(foreign_at).is_ok());
            foreign_at += Duration::from_millis(1200);
            continue;
        }
        let t = ours_at;
        match gate.reserve(api, "k", t) {
            Admission::WaitUntil(slot) => ours_at = slot.max(t + Duration::from_millis(1)),
            Admission::Admit => match mde.call(t) {
                Ok(()) => {
                    gate.record_answer(api);
                    ours += 1;
                    admitted_since_refusal = true;
                }
                Err((span, wait)) => {
                    gate.refused(api, t, Some(span), t + wait, t);
                    refusals.push((t, admitted_since_refusal));
                    admitted_since_refusal = false;
                }
            },
        }
    }
    // What one client alone could have got in the same two hours: 1,500 in each hour.
    let capacity = 3000;
    let utilisation = ours as f64 / (capacity - foreign) as f64;
    let per_episode_max = refusals
        .split(|(_, new)| *new)
        .map(|run| run.len() + 1)
        .skip(1)
        .max()
        .unwrap_or(0);
    let learned_at = refusals.first().map_or(t0, |r| r.0) + secs(600);
    let late: Vec<u64> = refusals
        .iter()
        .filter(|r| r.0 >= learned_at)
        .map(|r| (r.0 - t0).as_secs())
        .collect();
    eprintln!(
        "ours {ours}, foreign {foreign}, utilisation {utilisation:.3}, 429s {} at {:?}",
        refusals.len(),
        refusals
            .iter()
            .map(|r| (r.0 - t0).as_secs())
            .collect::<Vec<_>>()
    );
    assert!(
        utilisation >= 0.85,
        "used {utilisation:.3} of what the other tool left"
    );
    assert!(
        per_episode_max <= 1,
        "an episode held {per_episode_max} 429s"
    );
    let hours = (end - learned_at).as_secs_f64() / 3600.0;
    assert!(
        late.len() as f64 <= 3.0 * hours.ceil(),
        "{} 429s in {hours:.2} h once learned: {late:?}",
        late.len()
    );
}
