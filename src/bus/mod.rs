//! Buses: publishing (typed and raw) and running subscriptions. The engine, offset tracking and
//! dead-lettering are shared; the in-memory and Kafka buses only differ in where records come
//! from and go to. Only `kafka` imports rdkafka.

mod commands;
mod config;
mod control;
pub(crate) mod dead_letter;
mod engine;
mod error;
#[cfg(feature = "kafka")]
mod kafka;
mod memory;
mod offsets;
mod publish;

/// Header names of dead-letter records, re-exported at the crate root.
pub(crate) mod dead_letter_header_names {
    pub use super::dead_letter::header::*;
}

pub use commands::{
    Addressee, CommandAction, CommandError, CommandTarget, FleetCommand, InForce, COMMANDS_TOPIC,
    COMMAND_SCHEMA_VERSION,
};
pub use config::{ConsumerConfig, DeadLetterTopics, ProcessingOrder};
pub use control::{Pause, PauseError, PauseSource, PauseTarget};
pub use error::BusError;
#[cfg(feature = "kafka")]
pub use kafka::{
    CommandListener, CommandPublisher, KafkaBus, KafkaConfig, ReporterConfig, StatusReporter,
};
pub use memory::{MemoryBus, MemoryConfig, StoredRecord};
/// The record Weir publishes for an event; the outbox stores exactly this.
#[cfg(feature = "postgres")]
pub(crate) use publish::encode;
pub use publish::{Delivery, OutboundRecord, PublishError, PublishExt, Publisher};

use crate::handlers::Router;
use crate::telemetry::{Health, PartitionStatus};
use control::Control;
use engine::StopReport as EngineReport;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What a stopped subscription left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopReport {
    /// The last position the broker confirmed committing for each partition it owned at the
    /// end, `(topic, partition, next offset)`; a partition none of its commits reached (or whose
    /// final commit was refused before any other succeeded) is not listed.
    pub committed: Vec<(String, i32, i64)>,
    /// Records fetched but not finished when it stopped: they were not committed and will be
    /// delivered again.
    pub abandoned: usize,
    /// `cpu_bound` calls still running on a blocking thread when their partition was given up
    /// (revoked, or at this stop), after the engine waited for them as long as it could: their
    /// records may run again elsewhere while these calls finish. Also logged and counted in
    /// `weir_blocking_calls_orphaned_total`.
    pub orphaned: usize,
}

impl From<EngineReport> for StopReport {
    fn from(r: EngineReport) -> Self {
        Self {
            committed: r.committed,
            abandoned: r.abandoned,
            orphaned: r.orphaned,
        }
    }
}

/// A running subscription: a consumer group member dispatching records to a router.
///
/// Dropping it stops it the way [`stop`](Self::stop) does — no more fetching, running handlers
/// get the drain timeout to finish, finished records are committed, the member leaves the
/// group — in the background, with nobody to see the report. A drain rather than an abort:
/// aborting would throw away handlers' finished work, which would then be redelivered, and the
/// drain is bounded by `drain_timeout` anyway. Await `stop` to know when it is over.
#[derive(Debug)]
pub struct Subscription {
    shutdown: CancellationToken,
    health: Health,
    control: Control,
    task: Option<JoinHandle<Result<StopReport, BusError>>>,
}

impl Subscription {
    pub(crate) fn new(
        shutdown: CancellationToken,
        health: Health,
        control: Control,
        task: JoinHandle<Result<StopReport, BusError>>,
    ) -> Self {
        Self {
            shutdown,
            health,
            control,
            task: Some(task),
        }
    }

    /// Pauses `target` (a topic, a partition, or a route: every partition of the topics a named
    /// handler consumes) for `reason`. Once this returns, no record of a paused partition is
    /// admitted: its fetching stops, records already running (or waiting in their key's lane
    /// behind one) finish, and offsets keep committing. The pause covers partitions assigned
    /// later too, until [`resume`](Self::resume). Pausing the same target again replaces the
    /// reason. Returns every pause in force.
    ///
    /// Pauses have sources ([`PauseSource`]): this is [`PauseSource::Api`]. A partition runs
    /// only while no source holds it paused, and no source resumes what another paused (a
    /// circuit breaker's pause, say). While paused, `weir_partition_paused{topic,partition,reason}`
    /// is 1.
    pub async fn pause(
        &self,
        target: PauseTarget,
        reason: impl Into<String>,
    ) -> Result<Vec<Pause>, PauseError> {
        self.control
            .set(PauseSource::Api, target, Some(reason.into()))
            .await
    }

    /// Lifts the API's pause of `target` (the same target given to [`pause`](Self::pause): a
    /// topic's resume does not lift a pause of one of its partitions). Its partitions run again
    /// unless another pause holds them, and their records come in order from where they
    /// stopped. Returns every pause still in force.
    pub async fn resume(&self, target: PauseTarget) -> Result<Vec<Pause>, PauseError> {
        self.control.set(PauseSource::Api, target, None).await
    }

    /// Pauses or resumes on behalf of another source (the breaker, an operator's command).
    /// Tests use it; the breaker and the fleet commands reader (`CommandListener::watch`) hold
    /// the engine's control handle and set pauses through it with their own source.
    #[allow(dead_code)]
    pub(crate) async fn pause_as(
        &self,
        source: PauseSource,
        target: PauseTarget,
        reason: Option<String>,
    ) -> Result<Vec<Pause>, PauseError> {
        self.control.set(source, target, reason).await
    }

    /// The status of each partition this subscription owns now: position, confirmed commit,
    /// log end and lag (on Kafka), records in flight, pauses. Built by the engine when asked,
    /// so it costs nothing between asks. `None` once the subscription has stopped.
    pub async fn status(&self) -> Option<Vec<PartitionStatus>> {
        self.control.status().await
    }

    /// A handle that asks for [`status`](Self::status) from elsewhere (a reporter's task).
    pub fn status_probe(&self) -> StatusProbe {
        StatusProbe(self.control.clone())
    }

    /// Readiness of this subscription, for `/readyz`.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// A token that stops the subscription when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops fetching, lets in-flight handlers finish within the drain timeout, commits, and
    /// reports what was committed.
    pub async fn stop(self) -> Result<StopReport, BusError> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Waits until the subscription ends (its shutdown token was cancelled, or it failed).
    /// A failure of the consumer's own machinery (a panic in its poll thread or engine) is an
    /// error here, never a clean report.
    pub async fn join(mut self) -> Result<StopReport, BusError> {
        let task = self.task.take().expect("only join and stop take the task");
        task.await.map_err(|e| BusError::Task(e.to_string()))?
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // After `join` this is a no-op: the subscription has ended. If `join` was abandoned
        // half-way (its future dropped), the subscription is dropped with it, and stops.
        self.shutdown.cancel();
    }
}

/// Asks a subscription's engine for its partitions' status; cheap to clone, and it does not
/// keep the subscription running.
#[derive(Debug, Clone)]
pub struct StatusProbe(Control);

impl StatusProbe {
    /// The same as [`Subscription::status`].
    pub async fn status(&self) -> Option<Vec<PartitionStatus>> {
        self.0.status().await
    }
}

/// A transport Weir can consume from and publish to.
pub trait Bus: Publisher + Clone + Send + Sync + 'static {
    /// Starts consuming the router's topics as a member of `config.group_id`. Must be called
    /// inside a Tokio runtime; processing runs on spawned tasks until the subscription stops.
    ///
    /// The router's state, if it has one, is already inside its handlers.
    fn subscribe<S>(
        &self,
        router: Router<S>,
        config: ConsumerConfig,
    ) -> Result<Subscription, BusError>;
}
