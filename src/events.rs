//! Kubernetes Events about DeviceIsolations: one `events.k8s.io/v1` Event per note the planner
//! makes, created and forgotten.
//!
//! kube's `Recorder` keeps every event it published for six minutes to fold repeats into a
//! series, keyed without the note: a second `ActionFailed` within that time would only bump a
//! counter on the first one and show the first attempt's note. The planner already emits an event
//! only on a change, so there is nothing to fold, and holding thousands of events (a burst, or any
//! run of the simulator at a time scale, where six real minutes are hours) was the largest part
//! of the operator's memory.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// Longest note the events API accepts, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// Whether an event reports something normal or something a person should look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Progress: an action created, a device released.
    Normal,
    /// Trouble: a failed action, drift, a stall.
    Warning,
}

impl EventKind {
    /// Warning when `warning`, else Normal.
    pub fn of(warning: bool) -> Self {
        if warning {
            EventKind::Warning
        } else {
            EventKind::Normal
        }
    }
}

/// Creates Events in the namespace of the object they are about.
#[derive(Clone)]
pub struct EventPublisher {
    client: kube::Client,
    controller: String,
    instance: String,
}

impl EventPublisher {
    /// A publisher that reports as `controller`, from `instance` (the pod name; the controller
    /// name when unknown).
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        EventPublisher {
            client,
            instance: instance.unwrap_or_else(|| controller.to_string()),
            controller: controller.to_string(),
        }
    }

    /// Creates one Event about `regarding`.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        kind: EventKind,
        reason: &str,
        note: &str,
        action: &str,
    ) -> Result<(), kube::Error> {
        let event = self.event(regarding, kind, reason, note, action, Timestamp::now());
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        Api::<Event>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &event)
            .await
            .map(|_| ())
    }

    /// Creates one Event about `regarding`; a failure is logged, never fatal (status holds the
    /// truth).
    pub async fn publish_logged(
        &self,
        regarding: &ObjectReference,
        kind: EventKind,
        reason: &str,
        note: &str,
        action: &str,
    ) {
        if let Err(e) = self.publish(regarding, kind, reason, note, action).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }

    fn event(
        &self,
        regarding: &ObjectReference,
        kind: EventKind,
        reason: &str,
        note: &str,
        action: &str,
        now: Timestamp,
    ) -> Event {
        Event {
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(event_name(
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now,
                )),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(action.to_string()),
            reason: Some(reason.to_string()),
            note: Some(truncate(note, MAX_NOTE_BYTES).to_string()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(
                match kind {
                    EventKind::Normal => "Normal",
                    EventKind::Warning => "Warning",
                }
                .to_string(),
            ),
            ..Event::default()
        }
    }
}

/// `{object}.{nanoseconds since the epoch, hex}`, the form kubectl and client-go use, within the
/// 253 characters a name may have. (A `generateName` would have to end in an alphanumeric
/// character, which makes the generated names harder to read.)
fn event_name(object: &str, now: Timestamp) -> String {
    format!(
        "{}.{:x}",
        truncate(object, 253 - 1 - 32),
        now.as_nanosecond()
    )
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> ObjectReference {
        ObjectReference {
            api_version: Some("isolation.mde.dev/v1alpha1".into()),
            kind: Some("DeviceIsolation".into()),
            name: Some("laptop-042".into()),
            namespace: Some("soc".into()),
            uid: Some("u-1".into()),
            ..ObjectReference::default()
        }
    }

    #[tokio::test]
    async fn events_name_their_object_reporter_and_kind() {
        // A client is needed only to build the publisher; nothing is sent.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let p = EventPublisher::new(client, "mde-isolation-operator", None);
        let e = p.event(
            &reference(),
            EventKind::Warning,
            "ActionFailed",
            "attempt 2 failed",
            "Reconcile",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("soc"));
        assert_eq!(e.metadata.name.as_deref(), Some("laptop-042.0"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("ActionFailed"));
        assert_eq!(e.note.as_deref(), Some("attempt 2 failed"));
        assert_eq!(e.regarding, Some(reference()));
        assert_eq!(
            e.reporting_instance.as_deref(),
            Some("mde-isolation-operator")
        );
        assert!(e.series.is_none());
    }

    #[test]
    fn event_names_are_unique_per_instant_and_fit_the_limit() {
        let a = event_name("x", Timestamp::from_second(1).unwrap());
        let b = event_name("x", Timestamp::from_second(2).unwrap());
        assert_ne!(a, b);
        assert_eq!(a, "x.3b9aca00");
        assert!(event_name(&"n".repeat(253), Timestamp::now()).len() <= 253);
    }

    #[test]
    fn notes_are_cut_to_the_api_limit_on_a_character_boundary() {
        let long = "é".repeat(MAX_NOTE_BYTES);
        let cut = truncate(&long, MAX_NOTE_BYTES);
        assert!(cut.len() <= MAX_NOTE_BYTES && cut.len() >= MAX_NOTE_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate("short", MAX_NOTE_BYTES), "short");
    }
}
