//! mde-isolation-operator: Microsoft Defender for Endpoint device isolation as Kubernetes resources.
//!
//! A `DeviceIsolation` resource declares whether one MDE device should be isolated or released.
//! The [`controller`] reconciles it: it gathers what the shared [`view`] knows of the machine's
//! actions, asks the pure [`planner`] for the next step, and performs that step through the
//! [`mde`] client, whose every call passes the [`quota`] gate. The [`poller`] keeps the view fresh
//! with a few batched reads per cycle, whatever the number of resources.

pub mod audit;
pub mod cache;
pub mod conditions;
pub mod config;
pub mod controller;
pub mod crd;
pub mod events;
pub mod http;
pub mod leader;
pub mod mde;
pub mod metrics;
pub mod planner;
pub mod poller;
pub mod quota;
pub mod resolver;
pub mod run;
pub mod telemetry;
pub mod view;
