//! The limit MDE actually enforces, learned from its 429s.
//!
//! The budget is a share of MDE's documented limits, but the SOC's other tools spend the same
//! quota key, and MDE's allowance may be lower than documented. A 429 says that MDE refused a call
//! while this process's ledger held `used` calls (the refused one included) in the window that
//! ended at it: beside whatever the others spent, at most `used - 1` of ours fit. The gate then
//! keeps one below that (`used - 2`: at exactly the edge, any jitter of the others' pace is a
//! 429), and sends evenly spaced (`span / limit` apart) rather than in bursts, so
//! that calls already in flight cannot pile up past the edge. After [`Rules::hold`] without a
//! 429 it probes upward, one [`Rules::step`] per short window; a 429 sets it back. With the
//! budget to itself no 429 comes and nothing here changes a thing.
//!
//! `used` is counted in MDE's window (without the gate's guard margin): that is what MDE
//! counted when it refused, and the gate, which checks the longer guarded window, then never
//! puts more than the learned limit into any of MDE's windows.

use std::time::Duration;

use tokio::time::Instant;

use super::Window;

/// Which of the two windows refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    /// The per-minute window.
    Minute,
    /// The per-hour window.
    Hour,
}

impl Span {
    /// Its position in a `[minute, hour]` pair.
    pub(super) fn index(self) -> usize {
        match self {
            Span::Minute => 0,
            Span::Hour => 1,
        }
    }
}

/// How a learned limit comes back up.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rules {
    /// How long a learned limit is kept before probing above it. Thirty short windows: with a
    /// steady foreign load, at most two 429s an hour come from probing.
    pub hold: Duration,
    /// Time between two raises while probing: one short window.
    pub every: Duration,
}

impl Rules {
    pub(super) fn new(minute: Duration) -> Self {
        Rules {
            hold: minute.saturating_mul(30),
            every: minute,
        }
    }

    /// One raise: a fiftieth of the budget (2 calls a minute, 30 an hour), at least one call.
    fn step(base: Window) -> usize {
        (base.limit / 50).max(1)
    }
}

#[derive(Clone, Copy, Debug)]
struct Learned {
    limit: usize,
    /// Next raise (the end of the hold, then one per `Rules::every`).
    raise_at: Instant,
}

/// Learned limits of one API (or of the one shared budget).
#[derive(Debug, Default)]
pub(super) struct Learning {
    limits: [Option<Learned>; 2],
    episodes: u64,
}

impl Learning {
    /// `base` with the learned limits applied (never above the budget).
    pub(super) fn apply(&self, base: &[Window; 2]) -> [Window; 2] {
        let mut out = *base;
        for (w, learned) in out.iter_mut().zip(&self.limits) {
            if let Some(l) = learned {
                w.limit = w.limit.min(l.limit);
            }
        }
        out
    }

    /// Minimum spacing between two calls while a short-window limit is learned (others share the
    /// key: no bursts), else none.
    pub(super) fn spacing(&self, base: &[Window; 2]) -> Option<Duration> {
        let l = self.limits[0]?;
        Some(base[0].span / u32::try_from(l.limit.max(1)).unwrap_or(u32::MAX))
    }

    /// MDE refused a call while `used` of ours lay in the refusing window up to and including it.
    /// `new_episode`: no pause was in force (the first 429 of an episode). Later 429s of the
    /// same episode (calls already in flight) only ever lower the limit.
    pub(super) fn refused(
        &mut self,
        span: Span,
        used: usize,
        base: &[Window; 2],
        now: Instant,
        new_episode: bool,
        rules: Rules,
    ) {
        if new_episode {
            self.episodes += 1;
        }
        let i = span.index();
        let mut limit = used.saturating_sub(2).clamp(1, base[i].limit);
        if let (false, Some(old)) = (new_episode, self.limits[i]) {
            limit = limit.min(old.limit);
        }
        self.limits[i] = Some(Learned {
            limit,
            raise_at: now + rules.hold,
        });
    }

    /// A pause until `until`: no call goes, so nothing is learned meanwhile; raising resumes
    /// (at the earliest) a short window after it ends.
    pub(super) fn defer(&mut self, until: Instant, rules: Rules) {
        for l in self.limits.iter_mut().flatten() {
            l.raise_at = l.raise_at.max(until + rules.every);
        }
    }

    /// Raises limits whose hold is over, one step per `rules.every`; a limit that reaches the
    /// budget is forgotten.
    pub(super) fn relax(&mut self, now: Instant, base: &[Window; 2], rules: Rules) {
        for (learned, w) in self.limits.iter_mut().zip(base) {
            while let Some(l) = learned {
                if now < l.raise_at {
                    break;
                }
                l.limit += Rules::step(*w);
                l.raise_at += rules.every;
                if l.limit >= w.limit {
                    *learned = None;
                }
            }
        }
    }

    /// The learned limit of `span`, if any.
    #[cfg(test)]
    pub(super) fn limit(&self, span: Span) -> Option<usize> {
        self.limits[span.index()].map(|l| l.limit)
    }

    /// 429 episodes so far (first 429s after a time without a pause).
    pub(super) fn episodes(&self) -> u64 {
        self.episodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> [Window; 2] {
        [
            Window {
                limit: 100,
                span: Duration::from_secs(61),
            },
            Window {
                limit: 1500,
                span: Duration::from_secs(3601),
            },
        ]
    }

    fn rules() -> Rules {
        Rules::new(Duration::from_secs(60))
    }

    #[test]
    fn a_refusal_teaches_what_fit_and_spaces_the_calls() {
        let (b, t0) = (base(), Instant::now());
        let mut l = Learning::default();
        assert_eq!(l.apply(&b)[0].limit, 100);
        assert_eq!(l.spacing(&b), None);
        // 52 of ours in the minute, the 52nd refused: 51 fit beside the other tool; one is kept
        // in reserve.
        l.refused(Span::Minute, 52, &b, t0, true, rules());
        assert_eq!(l.apply(&b)[0].limit, 50);
        assert_eq!(l.apply(&b)[1].limit, 1500);
        assert_eq!(l.spacing(&b), Some(Duration::from_millis(1220)));
        assert_eq!(l.episodes(), 1);
    }

    #[test]
    fn calls_in_flight_refused_in_the_same_episode_only_lower_it() {
        let (b, t0) = (base(), Instant::now());
        let mut l = Learning::default();
        l.refused(Span::Minute, 52, &b, t0, true, rules());
        l.refused(Span::Minute, 54, &b, t0, false, rules());
        assert_eq!(l.limit(Span::Minute), Some(50));
        l.refused(Span::Minute, 41, &b, t0, false, rules());
        assert_eq!(l.limit(Span::Minute), Some(39));
        assert_eq!(l.episodes(), 1);
        // A new episode starts from what it sees.
        l.refused(Span::Minute, 62, &b, t0, true, rules());
        assert_eq!(l.limit(Span::Minute), Some(60));
        assert_eq!(l.episodes(), 2);
    }

    #[test]
    fn never_above_the_budget_nor_below_one() {
        let (b, t0) = (base(), Instant::now());
        let mut l = Learning::default();
        l.refused(Span::Minute, 0, &b, t0, true, rules());
        assert_eq!(l.limit(Span::Minute), Some(1));
        l.refused(Span::Hour, 5000, &b, t0, true, rules());
        assert_eq!(l.limit(Span::Hour), Some(1500));
    }

    #[test]
    fn held_then_raised_a_step_per_minute_until_forgotten() {
        let (b, t0) = (base(), Instant::now());
        let mut l = Learning::default();
        l.refused(Span::Minute, 52, &b, t0, true, rules());
        let min = Duration::from_secs(60);
        l.relax(t0 + min * 29, &b, rules());
        assert_eq!(l.limit(Span::Minute), Some(50), "held for 30 minutes");
        l.relax(t0 + min * 30, &b, rules());
        assert_eq!(l.limit(Span::Minute), Some(52));
        l.relax(t0 + min * 32, &b, rules());
        assert_eq!(
            l.limit(Span::Minute),
            Some(56),
            "one step per minute, caught up"
        );
        l.relax(t0 + min * 54, &b, rules());
        assert_eq!(l.limit(Span::Minute), None, "back at the budget");
        assert_eq!(l.spacing(&b), None);
    }

    #[test]
    fn a_refusal_while_probing_sets_it_back_and_holds_again() {
        let (b, t0) = (base(), Instant::now());
        let mut l = Learning::default();
        let min = Duration::from_secs(60);
        l.refused(Span::Minute, 52, &b, t0, true, rules());
        l.relax(t0 + min * 30, &b, rules());
        // Probing at 52, MDE refuses the 53rd: back to 51 (one below what fit), held again.
        l.refused(Span::Minute, 53, &b, t0 + min * 30, true, rules());
        l.relax(t0 + min * 59, &b, rules());
        assert_eq!(l.limit(Span::Minute), Some(51));
        // So a steady foreign load costs at most one probing 429 per 30 minutes.
        assert_eq!(l.episodes(), 2);
    }

    #[test]
    fn a_pause_is_no_evidence_raising_waits_until_after_it() {
        let (b, t0) = (base(), Instant::now());
        let mut l = Learning::default();
        let min = Duration::from_secs(60);
        l.refused(Span::Minute, 52, &b, t0, true, rules());
        // Another window (the hour) pauses everything from minute 10 to minute 55.
        l.defer(t0 + min * 55, rules());
        l.relax(t0 + min * 55, &b, rules());
        assert_eq!(l.limit(Span::Minute), Some(50));
        l.relax(t0 + min * 56, &b, rules());
        assert_eq!(l.limit(Span::Minute), Some(52));
        // A pause that ends before the hold is over changes nothing.
        let mut l = Learning::default();
        l.refused(Span::Minute, 52, &b, t0, true, rules());
        l.defer(t0 + min, rules());
        l.relax(t0 + min * 30, &b, rules());
        assert_eq!(l.limit(Span::Minute), Some(52));
    }

    #[test]
    fn the_hour_is_learned_apart_and_raised_in_bigger_steps() {
        let (b, t0) = (base(), Instant::now());
        let mut l = Learning::default();
        l.refused(Span::Hour, 752, &b, t0, true, rules());
        assert_eq!(l.apply(&b)[1].limit, 750);
        assert_eq!(l.apply(&b)[0].limit, 100);
        assert_eq!(l.spacing(&b), None, "the minute is not learned: no spacing");
        l.relax(t0 + Duration::from_secs(30 * 60), &b, rules());
        assert_eq!(l.limit(Span::Hour), Some(780));
    }
}
