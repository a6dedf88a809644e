//! Table tests of the rollout decision.
