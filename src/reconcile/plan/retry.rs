//! The next attempt after an action ended Failed or TimeOut: exponential backoff, aligned.

use super::*;

impl Planner<'_> {
    pub(super) fn schedule_retry(&mut self, failed: &ActionFact) -> Decision {
        let t = self.input.timing;
        let attempts = self.status.failed_attempts;
        if attempts >= t.max_attempts {
            self.status.next_attempt_at = None;
            return stalled(
                Reason::RetriesExhausted,
                format!(
                    "{attempts} attempts failed (last: action {} {}); request a retry to try again",
                    failed.id,
                    failed.status.as_str()
                ),
            );
        }
        let due = match self.status.next_attempt_at.as_deref().and_then(parse_time) {
            Some(due) => due,
            None => {
                let exp = t
                    .backoff_base
                    .saturating_mul(1u32 << (attempts.saturating_sub(1)).min(16))
                    .min(t.backoff_max);
                let due = align_up(
                    self.input.now + chrono::Duration::from_std(exp).unwrap_or_default(),
                    exp / 2,
                );
                self.status.next_attempt_at = Some(rfc3339(due));
                due
            }
        };
        if due <= self.input.now {
            // Time for the next attempt: a new action under a new marker.
            self.status.action = None;
            self.status.next_attempt_at = None;
            return self.new_action();
        }
        let wait = (due - self.input.now).to_std().unwrap_or_default();
        reconciling(
            Reason::RetryScheduled,
            format!(
                "action {} ended {}; attempt {} of {} at {}",
                failed.id,
                failed.status.as_str(),
                attempts + 1,
                t.max_attempts,
                rfc3339(due)
            ),
            Some(wait),
            Effect::None,
        )
    }
}
