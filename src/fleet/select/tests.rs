//! Selection tests.
