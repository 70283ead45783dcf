//! Shared helpers for the integration tests: include with `mod support;`.
//!
//! Each test binary uses only part of this module, hence the blanket allows
//! (`pub` items in a private test module would otherwise trip `unreachable_pub`).
#![allow(dead_code, unreachable_pub)]

pub mod broker;
pub mod db;
pub mod kafka;
pub mod process;
