//! Helpers shared by the integration tests (`mod common;` in each tests/*.rs).
pub mod cluster;
pub mod fixtures;
pub mod http;
pub mod operator;
pub mod poll;
pub mod sim;
