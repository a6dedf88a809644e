//! Rebuilding the quota gate's ledger from MDE's own record, after a restart or a failover.
//!
//! A new process knows nothing of the calls its predecessor made in the last hour, but MDE
//! counts them. Every isolate/unisolate that MDE admitted created an action, and MDE's record
//! of actions (which the first load of the view reads anyway) keeps its creation time. The
//! application's actions are those whose requestor is the requestor of an action carrying this
//! operator's audit tag (MDE names the application, and so counts the other tools using the same
//! app registration too). Each is placed on this process's clock at its age on MDE's clock,
//! measured against MDE's own `Date` (never against our wall clock), divided by the time scale.
//!
//! Not rebuilt, because MDE keeps no record of them: reads, and requests that created no action
//! (a 400, a refused call). The gate assumes a recent, even use of those instead
//! ([`QuotaGate::assume_recent_use`](crate::quota::QuotaGate::assume_recent_use)).

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::audit;
use crate::mde::model::MachineAction;
use crate::quota::Api;
use crate::reconcile::ActionKind;

/// Whether MDE's record keeps the calls of `api` (those that create an action).
pub fn recorded(api: Api) -> bool {
    matches!(api, Api::Isolate | Api::Unisolate)
}

/// MDE's longest window, in server seconds.
const HOUR_SECS: f64 = 3600.0;

/// The mutating calls of this operator's application in the last hour of MDE's clock
/// (`mde_now`), each with the API it spent and its time on this process's clock (`now` minus its
/// age, the age divided by `time_scale`).
pub fn calls_of_app(
    actions: &[MachineAction],
    mde_now: DateTime<Utc>,
    time_scale: f64,
    now: Instant,
) -> Vec<(Api, Instant)> {
    let app: HashSet<&str> = actions
        .iter()
        .filter(|a| audit::is_tagged(a.requestor_comment.as_deref()))
        .filter_map(|a| a.requestor.as_deref())
        .collect();
    let scale = if time_scale.is_finite() && time_scale > 0.0 {
        time_scale
    } else {
        1.0
    };
    actions
        .iter()
        .filter(|a| a.requestor.as_deref().is_some_and(|r| app.contains(r)))
        .filter_map(|a| {
            let kind = ActionKind::of(&a.action_type)?;
            let age = (mde_now - a.created_at?).num_milliseconds() as f64 / 1e3;
            if age >= HOUR_SECS {
                return None;
            }
            // An action stamped after MDE's `Date` (whole seconds) is as young as can be.
            let local = Duration::from_secs_f64(age.max(0.0) / scale);
            Some((Api::from(kind), now.checked_sub(local).unwrap_or(now)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mde::model::{ActionStatus, ActionType};

    fn action(kind: ActionType, requestor: &str, comment: &str, age_secs: i64) -> MachineAction {
        MachineAction {
            id: format!("{requestor}-{age_secs}"),
            action_type: kind,
            status: ActionStatus::Succeeded,
            machine_id: Some("m".into()),
            requestor: Some(requestor.into()),
            requestor_comment: Some(comment.into()),
            request_source: None,
            scope: None,
            created_at: Some(mde_now() - chrono::Duration::seconds(age_secs)),
            updated_at: None,
        }
    }

    fn mde_now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-05T10:00:00Z")
            .unwrap()
            .to_utc()
    }

    const TAG: &str = "False positive [mde-isolation-operator secops/a gen=1 uid=1a2b3c4d try=1]";

    #[test]
    fn the_apps_actions_of_the_last_hour_at_their_age() {
        let now = Instant::now() + Duration::from_secs(7200);
        let actions = [
            action(ActionType::Unisolate, "mde-operator-app", TAG, 10),
            // Same app, no tag (another tool on the same app registration): counted.
            action(ActionType::Isolate, "mde-operator-app", "by hand", 600),
            // Another requestor: another quota key.
            action(ActionType::Unisolate, "analyst@contoso.com", "manual", 5),
            // Older than the hour: can no longer matter.
            action(ActionType::Unisolate, "mde-operator-app", TAG, 3600),
            // Not an isolation call.
            action(
                ActionType::Other("RunAntiVirusScan".into()),
                "mde-operator-app",
                TAG,
                1,
            ),
        ];
        let calls = calls_of_app(&actions, mde_now(), 1.0, now);
        assert_eq!(
            calls,
            [
                (Api::Unisolate, now - Duration::from_secs(10)),
                (Api::Isolate, now - Duration::from_secs(600)),
            ]
        );
        // At time scale 20, ten server seconds are half a local one.
        let scaled = calls_of_app(&actions[..1], mde_now(), 20.0, now);
        assert_eq!(scaled, [(Api::Unisolate, now - Duration::from_millis(500))]);
    }

    #[test]
    fn without_a_tagged_action_nothing_is_known_to_be_ours() {
        let now = Instant::now();
        let actions = [action(ActionType::Unisolate, "some-app", "manual", 10)];
        assert!(calls_of_app(&actions, mde_now(), 1.0, now).is_empty());
    }

    #[test]
    fn an_action_stamped_after_mdes_date_counts_as_now() {
        let now = Instant::now();
        let actions = [action(ActionType::Unisolate, "app", TAG, -1)];
        assert_eq!(
            calls_of_app(&actions, mde_now(), 1.0, now),
            [(Api::Unisolate, now)]
        );
    }
}
