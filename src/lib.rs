//! mde-isolation-operator: Microsoft Defender for Endpoint device isolation as Kubernetes resources.
pub mod mde;
pub mod quota;
