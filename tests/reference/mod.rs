//! The reference service's events, for the tests that drive the `weir` binary. They live in the
//! binary, not the library; the tests compile the binary's own file, so what they publish and
//! decode is exactly what the service does.

#[allow(dead_code, unreachable_pub)]
#[path = "../../src/bin/weir/reference/events.rs"]
mod events;

#[allow(unused_imports)]
pub(crate) use events::*;
