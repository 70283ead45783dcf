//! Testing your own handlers: run a [`Router`] on the in-memory bus, publish events, and await
//! what Weir decided for each record, with the attempts made and the delays between them.
//!
//! Everything runs in your test's process and on Tokio's clock. With a paused clock
//! (`#[tokio::test(start_paused = true)]`), retry backoffs take no real time and the delays
//! reported are exactly the ones the retry policy chose: no sleeps, no polling loops.
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! # struct OrderPlaced { order_id: String, total_cents: u64 }
//! # impl weir::Event for OrderPlaced {
//! #     const TYPE: weir::EventType = weir::EventType::new("order.placed");
//! #     const TOPIC: &'static str = "orders";
//! #     fn key(&self) -> String { self.order_id.clone() }
//! # }
//! use weir::testing::TestApp;
//! use weir::{HandlerError, Router};
//!
//! async fn reserve(order: OrderPlaced) -> Result<(), HandlerError> {
//!     if order.total_cents == 0 {
//!         return Err(HandlerError::acknowledged("an empty order"));
//!     }
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut app = TestApp::new(Router::new().on(reserve));
//! app.publish(OrderPlaced { order_id: "o-1".into(), total_cents: 0 }).await;
//! let outcome = app.next_outcome().await;
//! assert!(outcome.is_dead_lettered_with("acknowledged"));
//! # }
//! ```

use crate::bus::{
    Bus, ConsumerConfig, Delivery, MemoryBus, OutboundRecord, PublishExt, Publisher, StopReport,
    StoredRecord, Subscription,
};
use crate::contracts::{Envelope, Event};
use crate::handlers::{Inbound, Observe, Outcome as DispatchOutcome, Router};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A router running on a fresh in-memory bus, for one test.
#[derive(Debug)]
pub struct TestApp {
    bus: MemoryBus,
    config: ConsumerConfig,
    subscription: Option<Subscription>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
}

impl TestApp {
    /// Subscribes `router` on a new [`MemoryBus`] as group `weir-test`. Call it inside a Tokio
    /// runtime, ideally one whose clock is paused.
    pub fn new<S>(router: Router<S>) -> Self {
        Self::with_config(router, ConsumerConfig::new("weir-test"))
    }

    /// As [`new`](Self::new), with consumer settings of your own (order, limits, dead-letter
    /// topics).
    ///
    /// # Panics
    /// If the router has no handler or the settings are invalid: a test set-up mistake.
    pub fn with_config<S>(router: Router<S>, config: ConsumerConfig) -> Self {
        let (sender, outcomes) = mpsc::unbounded_channel();
        let mut router = router.into_stateless();
        router.observer = Some(Arc::new(Recorder {
            calls: Mutex::default(),
            sender,
        }));
        let bus = MemoryBus::default();
        let subscription = bus
            .subscribe(router, config.clone())
            .expect("the test router subscribes");
        Self {
            bus,
            config,
            subscription: Some(subscription),
            outcomes,
        }
    }

    /// Publishes an event as Weir's producer would (a structured CloudEvent keyed by its
    /// entity id).
    ///
    /// # Panics
    /// If the event cannot be encoded or the bus refuses it.
    pub async fn publish<T: Event>(&self, event: T) -> Delivery {
        self.bus
            .publish(&Envelope::new(event))
            .await
            .expect("the memory bus takes the event")
    }

    /// Publishes a record as it is: bytes that are not a valid event, headers of your own.
    ///
    /// # Panics
    /// If the bus refuses it.
    pub async fn publish_record(&self, record: OutboundRecord) -> Delivery {
        self.bus
            .publish_record(record)
            .await
            .expect("the memory bus takes the record")
    }

    /// The outcome of the next record to reach one, in the order they are reached.
    ///
    /// # Panics
    /// If the subscription has ended, so no outcome can come.
    pub async fn next_outcome(&mut self) -> Outcome {
        self.outcomes
            .recv()
            .await
            .expect("the subscription is running")
    }

    /// The records in the dead-letter topic of `topic`.
    pub fn dead_letters(&self, topic: &str) -> Vec<StoredRecord> {
        self.bus.records(&self.config.dead_letter.topic_for(topic))
    }

    /// The bus, to publish or read anything else.
    pub fn bus(&self) -> &MemoryBus {
        &self.bus
    }

    /// Stops the subscription (draining in-flight records) and reports what was committed.
    ///
    /// # Panics
    /// If the subscription failed.
    pub async fn stop(mut self) -> StopReport {
        let subscription = self.subscription.take().expect("stopped once");
        subscription.stop().await.expect("the subscription stops")
    }
}

/// What Weir decided for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The record's topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Each handler that ran, in the order of their first call.
    pub handlers: Vec<HandlerRun>,
    /// What went to the dead-letter topic (one per failed handler; one for a decode error).
    pub dead_letters: Vec<DeadLetter>,
}

/// The calls of one handler on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerRun {
    /// The handler's name.
    pub name: String,
    /// How many times it was called.
    pub attempts: u32,
    /// The wait between the end of each call and the start of the next.
    pub delays: Vec<Duration>,
}

/// A dead-lettered failure, as its headers will say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `weir.error.kind`: `decode`, `acknowledged`, `retries_exhausted` or `panic`.
    pub kind: String,
    /// The failed handler; none for a decode error.
    pub handler: Option<String>,
    /// The error message.
    pub message: String,
    /// Calls made before giving up.
    pub attempts: u32,
}

impl Outcome {
    /// Handled (or skipped) with nothing dead-lettered.
    pub fn is_success(&self) -> bool {
        self.dead_letters.is_empty()
    }

    /// Dead-lettered with this `weir.error.kind`, by any handler.
    pub fn is_dead_lettered_with(&self, kind: &str) -> bool {
        self.dead_letters.iter().any(|d| d.kind == kind)
    }

    /// Calls of the first handler (the only one, unless the event fans out).
    pub fn attempts(&self) -> u32 {
        self.handlers.first().map_or(0, |h| h.attempts)
    }

    /// Delays between the first handler's calls.
    pub fn delays(&self) -> &[Duration] {
        self.handlers.first().map_or(&[], |h| &h.delays)
    }

    /// The calls of the handler registered under `name`.
    pub fn handler(&self, name: &str) -> Option<&HandlerRun> {
        self.handlers.iter().find(|h| h.name == name)
    }
}

type RecordKey = (String, i32, i64);

/// One finished call: handler, start, end.
type Call = (String, Instant, Instant);

struct Recorder {
    calls: Mutex<HashMap<RecordKey, Vec<Call>>>,
    sender: mpsc::UnboundedSender<Outcome>,
}

fn key(rec: &Inbound) -> RecordKey {
    (rec.topic.to_string(), rec.partition, rec.offset)
}

impl Observe for Recorder {
    fn call(&self, rec: &Inbound, handler: &str, _attempt: u32, started: Instant) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls
            .entry(key(rec))
            .or_default()
            .push((handler.to_owned(), started, Instant::now()));
    }

    fn outcome(&self, rec: &Inbound, outcome: &DispatchOutcome) {
        let calls = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            calls.remove(&key(rec)).unwrap_or_default()
        };
        let DispatchOutcome::Done(failures) = outcome else {
            // Abandoned at shutdown: no outcome; it will be delivered again.
            return;
        };
        let mut handlers: Vec<HandlerRun> = Vec::new();
        let mut last_end: HashMap<String, Instant> = HashMap::new();
        for (name, started, ended) in calls {
            let run = match handlers.iter_mut().position(|h| h.name == name) {
                Some(i) => &mut handlers[i],
                None => {
                    handlers.push(HandlerRun {
                        name: name.clone(),
                        attempts: 0,
                        delays: Vec::new(),
                    });
                    handlers.last_mut().expect("just pushed")
                }
            };
            if let Some(previous) = last_end.get(&name) {
                run.delays
                    .push(started.saturating_duration_since(*previous));
            }
            run.attempts += 1;
            last_end.insert(name, ended);
        }
        let dead_letters = failures
            .iter()
            .map(|f| DeadLetter {
                kind: f.kind.as_str().to_owned(),
                handler: f.handler.as_deref().map(str::to_owned),
                message: f.message.clone(),
                attempts: f.attempts,
            })
            .collect();
        let _ = self.sender.send(Outcome {
            topic: rec.topic.to_string(),
            partition: rec.partition,
            offset: rec.offset,
            handlers,
            dead_letters,
        });
    }
}
