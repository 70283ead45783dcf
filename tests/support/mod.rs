//! Shared helpers for the integration tests: include with `mod support;`.
//!
//! Each test binary uses only part of this module, hence the blanket allows
//! (`pub` items in a private test module would otherwise trip `unreachable_pub`).
#![allow(dead_code, unreachable_pub)]

pub mod broker;
pub mod db;
pub mod foreign;
pub mod kafka;
pub mod orders;
pub mod process;
pub mod tasks;
pub mod temporal;
pub mod webdriver;

use std::process::{Child, Command, Stdio};

/// Kills and reaps a child, if there is one.
pub(crate) fn kill_wait(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `sh` blocked reading a pipe whose write end only this process holds (std opens pipes
/// close-on-exec): when this process exits, however it exits, the read returns and the watchdog
/// kills `pid`, so a crashed test never leaves a broker or a service behind. Best effort: `None`
/// if `sh` is missing.
pub(crate) fn watchdog(pid: u32) -> Option<Child> {
    Command::new("sh")
        .args([
            "-c",
            "read _ignored; kill -9 \"$1\" 2>/dev/null",
            "weir-test-watchdog",
        ])
        .arg(pid.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}
