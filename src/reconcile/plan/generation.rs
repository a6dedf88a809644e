//! What a new generation or a retry request resets, and the stalls that wait for one.

use super::*;

impl Planner<'_> {
    /// Drops what belonged to an older generation: its attempts, its intent, and its action unless
    /// that action is of the desired type and still open (then it serves the new generation too).
    /// A finished action is dropped: whether the device is already in the desired state is then
    /// decided from MDE's history, which also sees actions of generations in between.
    pub(super) fn start_generation(&mut self) {
        if self.status.observed_generation == Some(self.generation()) {
            return;
        }
        let desired = self.desired.as_str();
        if self.status.action.as_ref().is_some_and(|a| {
            a.action_type != desired || ActionStatus::from(a.status.as_str()).is_final()
        }) {
            self.status.action = None;
        }
        if self
            .status
            .intent
            .as_ref()
            .is_some_and(|i| i.generation != self.generation())
        {
            self.status.intent = None;
        }
        self.status.requests = 0;
        self.status.failed_attempts = 0;
        self.status.next_attempt_at = None;
    }

    /// A new value of the retry annotation clears a sticky stall and the failure count once.
    pub(super) fn take_retry_request(&mut self) -> bool {
        let Some(request) = self.input.retry_request else {
            return false;
        };
        if self.status.last_handled_retry.as_deref() == Some(request) {
            return false;
        }
        self.status.last_handled_retry = Some(request.to_string());
        self.status.failed_attempts = 0;
        self.status.next_attempt_at = None;
        true
    }

    /// A stall that needs a person stays until the generation changes or a retry is requested, so
    /// that a 404 or 403 is not retried against the quota on every resync.
    pub(super) fn sticky_stall(&self) -> Option<Decision> {
        let cond = conditions::find(&self.input.status.conditions, STALLED)?;
        let same_generation = cond.observed_generation == Some(self.generation())
            && self.input.status.observed_generation == Some(self.generation());
        if !same_generation {
            return None;
        }
        let reason = Reason::parse(&cond.reason)?;
        if reason.is_sticky() {
            return Some(stalled(reason, cond.message.to_string()));
        }
        // A refused credential or permission is tried again at its recheck time, not on every
        // event (our own status write is one).
        if reason.is_rechecked()
            && let Some(due) = self.status.next_attempt_at.as_deref().and_then(parse_time)
            && due > self.input.now
        {
            let wait = (due - self.input.now).to_std().unwrap_or_default();
            return Some(stalled_until(reason, cond.message.to_string(), wait));
        }
        None
    }
}
