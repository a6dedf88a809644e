//! Whether the API server vouches for `isolation.mde.dev/requested-by`: it does when the
//! accountability ValidatingAdmissionPolicy (`policies/accountability.yaml`) is installed, fails
//! closed, and is bound cluster-wide with the Deny action. One task ([`run`]) owns the answer and
//! checks it again every interval; everyone else reads it ([`Accountability::verified`]). Until the
//! first check, and whenever the check cannot tell (no permission to read the policy, an API
//! error), the annotation is reported as unverified, never trusted silently.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::Api;
use tokio_util::sync::CancellationToken;

/// Name of the policy and of its binding.
pub const POLICY_NAME: &str = "mde-isolation-accountability";

/// The answer of the last check (see the module docs): `None` before the first.
#[derive(Debug)]
pub struct Accountability(tokio::sync::watch::Sender<Option<bool>>);

impl Default for Accountability {
    fn default() -> Self {
        Accountability(tokio::sync::watch::Sender::new(None))
    }
}

impl Accountability {
    /// Whether the last check found the policy enforced.
    pub fn verified(&self) -> bool {
        self.0.borrow().unwrap_or(false)
    }

    /// Waits for the first check (a request made before it would be tagged unverified).
    pub async fn checked(&self) {
        let _ = self.0.subscribe().wait_for(Option::is_some).await;
    }
}

/// Why the policy does not vouch for the annotation, when it does not.
pub fn unenforced(
    policy: Option<&ValidatingAdmissionPolicy>,
    binding: Option<&ValidatingAdmissionPolicyBinding>,
) -> Option<&'static str> {
    let Some(policy) = policy else {
        return Some("the policy is not installed");
    };
    if policy
        .spec
        .as_ref()
        .and_then(|s| s.failure_policy.as_deref())
        .is_some_and(|f| f != "Fail")
    {
        return Some("the policy does not fail closed (failurePolicy is not Fail)");
    }
    let Some(spec) = binding.and_then(|b| b.spec.as_ref()) else {
        return Some("the policy is not bound");
    };
    if spec.policy_name.as_deref() != Some(POLICY_NAME) {
        return Some("the binding names another policy");
    }
    if !spec
        .validation_actions
        .iter()
        .flatten()
        .any(|a| a == "Deny")
    {
        return Some("the binding does not deny (validationActions lacks Deny)");
    }
    if spec.match_resources.is_some() || spec.param_ref.is_some() {
        return Some("the binding is limited to some resources or namespaces");
    }
    None
}

/// Checks now and every `interval` until `shutdown`; logs each change of the answer.
pub async fn run(
    client: kube::Client,
    state: std::sync::Arc<Accountability>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client);
    let mut last: Option<String> = None;
    loop {
        let why = match (
            policies.get_opt(POLICY_NAME).await,
            bindings.get_opt(POLICY_NAME).await,
        ) {
            (Ok(p), Ok(b)) => unenforced(p.as_ref(), b.as_ref()).map(str::to_string),
            (Err(e), _) | (_, Err(e)) => Some(format!("cannot read the policy: {e}")),
        };
        state.0.send_replace(Some(why.is_none()));
        let said = why.clone().unwrap_or_default();
        if last.as_deref() != Some(said.as_str()) {
            match &why {
                None => tracing::info!(
                    policy = POLICY_NAME,
                    "requested-by is enforced by the admission policy: reported as verified"
                ),
                Some(why) => tracing::warn!(
                    policy = POLICY_NAME,
                    why = %why,
                    "requested-by is reported as unverified in MDE comments and events"
                ),
            }
            last = Some(said);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(failure: &str) -> ValidatingAdmissionPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": POLICY_NAME},
            "spec": {"failurePolicy": failure},
        }))
        .unwrap()
    }

    fn binding(spec: serde_json::Value) -> ValidatingAdmissionPolicyBinding {
        serde_json::from_value(json!({"metadata": {"name": POLICY_NAME}, "spec": spec})).unwrap()
    }

    #[tokio::test]
    async fn unverified_until_a_check_says_otherwise_and_waiting_ends_with_the_first_check() {
        let state = std::sync::Arc::new(Accountability::default());
        assert!(!state.verified());
        let waiter = tokio::spawn({
            let state = state.clone();
            async move { state.checked().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        state.0.send_replace(Some(true));
        waiter.await.unwrap();
        assert!(state.verified());
        state.0.send_replace(Some(false));
        assert!(!state.verified());
    }

    #[test]
    fn only_a_fail_closed_cluster_wide_deny_binding_vouches() {
        let deny = binding(json!({"policyName": POLICY_NAME, "validationActions": ["Deny"]}));
        assert_eq!(unenforced(Some(&policy("Fail")), Some(&deny)), None);
        let cases = [
            (None, Some(deny.clone()), "not installed"),
            (Some(policy("Fail")), None, "not bound"),
            (Some(policy("Ignore")), Some(deny.clone()), "fail closed"),
            (
                Some(policy("Fail")),
                Some(binding(
                    json!({"policyName": POLICY_NAME, "validationActions": ["Warn", "Audit"]}),
                )),
                "does not deny",
            ),
            (
                Some(policy("Fail")),
                Some(binding(
                    json!({"policyName": "other", "validationActions": ["Deny"]}),
                )),
                "another policy",
            ),
            (
                Some(policy("Fail")),
                Some(binding(json!({
                    "policyName": POLICY_NAME, "validationActions": ["Deny"],
                    "matchResources": {"namespaceSelector": {"matchLabels": {"x": "y"}}},
                }))),
                "limited",
            ),
        ];
        for (p, b, want) in cases {
            let why = unenforced(p.as_ref(), b.as_ref()).expect(want);
            assert!(why.contains(want), "{why}");
        }
    }
}
