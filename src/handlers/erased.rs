//! The erased shapes every part of `handlers` shares: a boxed future, an event behind `Any`, and
//! a handler's default name. A leaf, so the router (which erases types), the layers and batches
//! (which wrap erased calls) and the dispatcher (which runs them) all import it and never each
//! other for it.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A handler call, erased: what every registered handler becomes in the router.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A decoded event, erased: decoded once per record, shared by every handler of its type.
pub(crate) type ErasedEvent = Arc<dyn Any + Send + Sync>;

/// A readable default name: the function's own name, or `function::{{closure}}` for closures,
/// without module paths or generic arguments.
pub(crate) fn handler_name<H>() -> String {
    let mut plain = String::new();
    let mut depth = 0usize;
    for c in std::any::type_name::<H>().chars() {
        match c {
            '<' => depth += 1,
            '>' => depth = depth.saturating_sub(1),
            _ if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    let mut parts = plain.rsplit("::");
    match (parts.next(), parts.next()) {
        (Some(last), Some(parent)) if last.starts_with('{') => format!("{parent}::{last}"),
        (Some(last), _) => last.to_owned(),
        _ => plain,
    }
}
