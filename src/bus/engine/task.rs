//! What runs for one record, inside its task: dispatch, dead letters, and the last resort
//! when something in there panics.

use super::super::config::DeadLetterTopics;
use super::super::{dead_letter, Publisher};
use crate::handlers::{
    BlockingCalls, DeadLetterKind, Dispatcher, Failure, Inbound, Outcome, Resume,
};
use crate::telemetry::events::RecordTaskPanicked;
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A partition's tokens, shared with its records' tasks: one reference count per record
/// rather than two tokens' (each clone of a token takes its tree's lock).
pub(super) struct Tokens {
    /// Ends the partition's retry backoffs and dead-letter retries (a child of the engine's
    /// stop token): at a revoke, and at stop.
    pub(super) stop: CancellationToken,
    /// Drops the partition's running record futures: at a revoke's deadline.
    pub(super) abort: CancellationToken,
    /// The partition's `cpu_bound` calls that have not returned: an aborted record's call goes
    /// on until it returns, and the partition is not given up before (up to a bound).
    pub(super) blocking: Arc<BlockingCalls>,
}

/// A record to its final outcome: dispatched (from where the engine's first call left off, with
/// `resume`), then each failure dead-lettered. `false` if it ended unfinished (`stop` fired
/// during a backoff or a dead-letter retry).
pub(super) async fn handle(
    rec: &Arc<Inbound>,
    resume: Option<Resume>,
    dispatcher: &Dispatcher,
    publisher: &dyn Publisher,
    naming: &(String, DeadLetterTopics),
    tokens: &Tokens,
    span: &tracing::Span,
) -> bool {
    let stop = &tokens.stop;
    let failures = match dispatcher
        .dispatch(rec, resume, stop, &tokens.blocking, span)
        .await
    {
        Outcome::Abandoned => return false,
        Outcome::Done(failures) => failures,
    };
    for failure in &failures {
        if !dead_letter_one(rec, failure, dispatcher, publisher, naming, stop).await {
            return false;
        }
    }
    true
}

async fn dead_letter_one(
    rec: &Inbound,
    failure: &Failure,
    dispatcher: &Dispatcher,
    publisher: &dyn Publisher,
    naming: &(String, DeadLetterTopics),
    stop: &CancellationToken,
) -> bool {
    let record = dead_letter::record(rec, failure, &naming.0, naming.1.topic_for(&rec.topic));
    dead_letter::publish(publisher, dispatcher.metrics(), record, failure, rec, stop).await
}

/// After a panic in a record's task outside the handler (building or publishing a dead letter,
/// say): dead-letters the record with kind `panic`. If that panics too, the record is logged
/// and counted final anyway: a record that cannot even be dead-lettered must not hold its
/// partition's commits back for good.
pub(super) async fn dead_letter_panic(
    rec: &Inbound,
    message: String,
    dispatcher: &Dispatcher,
    publisher: &dyn Publisher,
    naming: &(String, DeadLetterTopics),
    stop: &CancellationToken,
) -> bool {
    let failure = Failure {
        kind: DeadLetterKind::Panic,
        detail: DeadLetterKind::Panic.as_str(),
        message,
        attempts: 0,
        handler: None,
        event_id: None,
    };
    let again = AssertUnwindSafe(dead_letter_one(
        rec, &failure, dispatcher, publisher, naming, stop,
    ))
    .catch_unwind()
    .await;
    match again {
        Ok(published) => published,
        Err(panic) => {
            RecordTaskPanicked {
                at: rec.at(),
                error: &panic_message(&*panic),
                dead_lettering: false,
            }
            .emit();
            true
        }
    }
}

/// The text of a panic payload, for the log and the dead-letter message.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    format!("record task panicked: {text}")
}
