//! Microsoft Defender for Endpoint API client.
//!
//! One concern per module: [`model`] (entities, lenient parsing), [`error`] (classification),
//! [`odata`] (query building), [`cloud`] (endpoints), [`token`] (Entra ID tokens),
//! [`assertion`] (certificate credentials) and [`client`] (HTTP calls through the
//! [`crate::quota`] gate).

pub mod assertion;
pub mod client;
pub mod cloud;
pub mod error;
pub mod model;
pub mod odata;
pub mod token;

pub use assertion::AssertionAlgorithm;
pub use client::{CallObserver, MdeClient, MdeClientConfig};
pub use cloud::{Cloud, Endpoints, resolve_endpoints};
pub use error::{ErrorClass, MdeError};
pub use model::{ActionStatus, ActionType, IsolationType, Machine, MachineAction};
pub use odata::{Filter, ListQuery};
pub use token::{ClientSecret, CredentialError, CredentialSources, TokenSource};
