//! Helpers shared by the integration tests (`mod common;` in each tests/*.rs).
pub mod cluster;
pub mod operator;
pub mod sim;
