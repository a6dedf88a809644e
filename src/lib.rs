//! mde-isolation-operator: Microsoft Defender for Endpoint device isolation as Kubernetes resources.
//!
//! A `DeviceIsolation` resource declares whether one MDE device should be isolated or released.
//! [`reconcile`] drives it: it gathers what the shared [`view`] knows of the machine's actions,
//! asks the pure planner ([`reconcile::plan()`]) for the next step, and performs that step through
//! its effects ([`reconcile::effects`]): the [`mde`] client, whose every call passes the [`quota`]
//! gate, and the API server. The [`poller`] keeps the view fresh with a few batched reads per
//! cycle, whatever the number of resources; its first load also rebuilds the gate's ledger from
//! MDE's record ([`recall`]), so a restart does not start with a full budget in a spent window,
//! and the gate learns from 429s what MDE allows beside other tools. The watch caches ([`cache`])
//! keep a compact form of each resource and an index of each machine's resources (rule 6), and
//! report deletions, so that what the process remembers per resource ([`reconcile::memory`], its
//! requeues in [`reconcile::requeue`]) is freed with it, and changes among a machine's resources.
//! [`accountability`] tells whether the API server vouches for who asked (requested-by).
//! Every tenant and app the operator talks to is a [`connection`]: its own client (token cache,
//! quota gate), poller and view, built from the flags or from an `MdeConnection`, and named by a
//! resource's `spec.connectionRef`.

// The docs are the team's, read with `cargo doc --document-private-items`: a module's table of
// contents links its private steps.
#![allow(rustdoc::private_intra_doc_links)]

pub mod accountability;
pub mod audit;
pub mod cache;
pub mod conditions;
pub mod config;
pub mod connection;
pub mod crd;
pub mod events;
pub mod fleet;
pub mod http;
pub mod leader;
pub mod mde;
pub mod metrics;
pub mod poller;
pub mod quota;
pub mod recall;
pub mod reconcile;
pub mod resolver;
pub mod run;
pub mod telemetry;
pub mod view;
