//! Set driver helpers.
