//! The audit tag appended to every MDE comment.
//!
//! MDE has no correlation-id field that survives a round trip, but the comment comes back as
//! `requestorComment`. The tag names the resource (namespace/name), the generation, a uid prefix
//! and the attempt, so that MDE's action history points back to the manifest, and so that after a
//! crash or an ambiguous response the operator can find the action it may already have created.

/// Identity of one request attempt, as carried in the tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditTag<'a> {
    /// Resource namespace.
    pub namespace: &'a str,
    /// Resource name.
    pub name: &'a str,
    /// Resource uid; only its first 8 characters are used (enough to tell a re-created resource
    /// of the same name apart).
    pub uid: &'a str,
    /// metadata.generation the action serves.
    pub generation: i64,
    /// Attempt number for that generation, from 1.
    pub attempt: u32,
}

impl AuditTag<'_> {
    /// The marker string, e.g. `[mde-isolation-operator secops/laptop-042 gen=2 uid=1a2b3c4d try=1]`.
    pub fn marker(&self) -> String {
        let uid: String = self.uid.chars().take(8).collect();
        format!(
            "[mde-isolation-operator {}/{} gen={} uid={} try={}]",
            self.namespace, self.name, self.generation, uid, self.attempt
        )
    }
}

/// The comment sent to MDE: the user's text followed by the marker.
pub fn comment_with_marker(comment: &str, marker: &str) -> String {
    format!("{} {}", comment.trim(), marker)
}

/// A person's part of a comment, before the marker: `<role>=<name>` (`requested-by`,
/// `approved-by`), followed by ` (unverified)` when no admission policy vouches that the
/// annotation names that person.
pub fn person_tag(role: &str, name: &str, verified: bool) -> String {
    if verified {
        format!("{role}={name}")
    } else {
        format!("{role}={name} (unverified)")
    }
}

/// Whether a `requestorComment` carries an audit tag of this operator (of any resource, any
/// process): the action was requested through this operator's application.
pub fn is_tagged(requestor_comment: Option<&str>) -> bool {
    requestor_comment.is_some_and(|c| c.contains("[mde-isolation-operator "))
}

/// Whether an action's `requestorComment` carries `marker`.
pub fn carries_marker(requestor_comment: Option<&str>, marker: &str) -> bool {
    requestor_comment.is_some_and(|c| c.trim_end().ends_with(marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(attempt: u32) -> AuditTag<'static> {
        AuditTag {
            namespace: "secops",
            name: "laptop-042",
            uid: "1a2b3c4d-5e6f-7a8b-9c0d-112233445566",
            generation: 2,
            attempt,
        }
    }

    #[test]
    fn marker_names_resource_generation_uid_prefix_and_attempt() {
        assert_eq!(
            tag(1).marker(),
            "[mde-isolation-operator secops/laptop-042 gen=2 uid=1a2b3c4d try=1]"
        );
    }

    #[test]
    fn comment_starts_with_the_user_text_and_ends_with_the_marker() {
        let m = tag(1).marker();
        let c = comment_with_marker("  Released after re-image (INC-4711) ", &m);
        assert!(c.starts_with("Released after re-image (INC-4711) [mde-isolation-operator"));
        assert!(carries_marker(Some(&c), &m));
    }

    #[test]
    fn another_attempt_or_no_comment_does_not_match() {
        let c = comment_with_marker("x", &tag(1).marker());
        assert!(!carries_marker(Some(&c), &tag(2).marker()));
        assert!(!carries_marker(None, &tag(1).marker()));
    }
}
