//! Fleet commands through Kafka: the reader every process runs ([`CommandListener`]) and the
//! publisher operators and the console use ([`CommandPublisher`]).
//!
//! The reader stays outside any consumer group: it assigns every partition of the commands
//! topic from the beginning and never commits, so each process reads every command, and no
//! rebalance of the service's group waits on it. At start it reads the topic to its end and
//! folds it ([`InForce`]: the latest command of each key; a resume or unquiet removes its key),
//! applies what is in force, then follows new commands as they come. A late replica therefore
//! comes up with a fleet-wide pause already in force, before its group hands it a partition.
//!
//! Applying is reconciling: from the commands in force the reader computes the command-source
//! pauses each watched subscription should have (a quiet is a pause of every topic it
//! consumes), and sets or lifts the difference with [`PauseSource::Command`]. So a resume of a
//! topic under a quiet leaves the topic quiet, an unquiet leaves a topic pause in force, and
//! neither touches a pause of the library API or of a breaker.
//!
//! A record that is not a command this process reads (unparseable, or of another schema
//! version) is logged and counted as `result="rejected"`; nothing stops the process.

use super::status::create_compacted_topic;
use super::{KafkaBus, LogContext};
use crate::bus::commands::{Applier, InForce};
use crate::bus::control::PauseError;
use crate::bus::{Delivery, FleetCommand, OutboundRecord, PublishError, Publisher, Subscription};
use crate::contracts::Headers;
use crate::telemetry::events::CommandApplied;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

impl ConsumerContext for LogContext {}

/// How long a start waits to read the commands in force before it goes on without the rest
/// (they are applied as they arrive then).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(15);
/// After every partition reported its end, how long to wait for records of a last batch (some
/// brokers, Tansu among them, report a high watermark short of it).
const QUIET: Duration = Duration::from_millis(300);
/// Between attempts to reach the commands topic.
const RETRY: Duration = Duration::from_secs(2);
/// How long one metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the commands topic and applies the commands for this process; see the module doc.
pub struct CommandListener {
    bus: KafkaBus,
    topic: String,
    in_force: InForce,
    applier: Applier,
    reader: Option<Arc<StreamConsumer<LogContext>>>,
    caught_up: bool,
    started: bool,
}

impl std::fmt::Debug for CommandListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandListener")
            .field("topic", &self.topic)
            .field("process_id", &self.applier.process_id())
            .field("in_force", &self.in_force)
            .finish_non_exhaustive()
    }
}

impl CommandListener {
    /// A reader of `topic` (`weir.commands` by default) for the process `process_id` (the key
    /// of its status reports, [`StatusReporter::process_id`](crate::StatusReporter::process_id)),
    /// counting into `bus`'s metrics, whose status reports then acknowledge each command.
    pub fn new(bus: &KafkaBus, topic: impl Into<String>, process_id: impl Into<String>) -> Self {
        Self {
            bus: bus.clone(),
            topic: topic.into(),
            in_force: InForce::default(),
            applier: Applier::new(process_id),
            reader: None,
            caught_up: false,
            started: false,
        }
    }

    /// Applies commands to this subscription too. A process that consumes nothing (an outbox
    /// relay) watches none: it acknowledges commands as `ignored`.
    pub fn watch(mut self, subscription: &Subscription) -> Self {
        self.applier.watch(subscription.control.clone());
        self
    }

    /// Pauses every topic of the watched subscriptions (a [`PauseSource::Command`] pause,
    /// reason `fleet commands loading`) until the commands in force are applied, which lifts
    /// what they do not call for. Await it right after subscribing, then [`run`](Self::run):
    /// the process starts at once, and no partition a command paused is handled in between.
    /// If the commands cannot be read within 15 s (an unreachable broker), the hold is lifted
    /// anyway and commands are applied as they arrive.
    ///
    /// [`PauseSource::Command`]: crate::PauseSource::Command
    pub async fn hold(&mut self) {
        for error in self.applier.hold().await {
            tracing::warn!(%error, "Could not hold the topics while reading the fleet commands.");
        }
    }

    /// The commands in force, as read so far.
    pub fn in_force(&self) -> &InForce {
        &self.in_force
    }

    /// Reads the topic to its end, folding the commands in force, without applying them;
    /// bounded (15 s). [`run`](Self::run) does it first; call it yourself (before subscribing,
    /// then [`apply_in_force`](Self::apply_in_force)) to start with the commands in force
    /// instead of [`hold`](Self::hold)ing.
    pub async fn catch_up(&mut self) {
        if self.caught_up {
            return;
        }
        let topic = self.topic.clone();
        if tokio::time::timeout(CATCH_UP_LIMIT, self.read_to_end())
            .await
            .is_err()
        {
            tracing::warn!(topic = %topic, "Could not read the fleet commands in force in time; applying them as they arrive.");
        }
        self.caught_up = true;
    }

    /// Applies the commands in force (read by [`catch_up`](Self::catch_up)) to the watched
    /// subscriptions, and acknowledges each one addressed to this process. Once.
    pub async fn apply_in_force(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        let failed = self.reconcile().await;
        tracing::info!(
            topic = %self.topic,
            in_force = self.in_force.commands().count(),
            "Applied the fleet commands in force; following new ones."
        );
        let commands: Vec<FleetCommand> = self
            .in_force
            .commands()
            .filter(|c| c.is_for(self.applier.process_id()))
            .cloned()
            .collect();
        for command in commands {
            self.acknowledge(&command, &failed, true);
        }
    }

    /// Catches up and applies (unless done already), then applies new commands until `stop`
    /// completes. Failures are logged, never returned: commands must not stop a service.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::select! {
            () = stop => {}
            () = self.follow() => {}
        }
        // Closing the client waits on librdkafka: off the runtime's threads.
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || drop(reader)).await;
        }
    }

    async fn follow(&mut self) {
        self.catch_up().await;
        self.apply_in_force().await;
        loop {
            let reader = self.reader().await;
            let next = reader.recv().await.map(|m| owned(&m));
            match next {
                Ok((key, value)) => self.take(key.as_deref(), value.as_deref(), true).await,
                Err(KafkaError::PartitionEOF(_)) => {}
                Err(error) => {
                    tracing::warn!(topic = %self.topic, %error, "Reading the fleet commands failed; retrying.");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Reads every partition to its end (the partition-EOF events, then a short quiet).
    async fn read_to_end(&mut self) {
        let reader = self.reader().await;
        let mut pending: BTreeSet<i32> = reader
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        loop {
            let next = if pending.is_empty() {
                match tokio::time::timeout(QUIET, reader.recv()).await {
                    Ok(next) => next.map(|m| owned(&m)),
                    Err(_) => return,
                }
            } else {
                reader.recv().await.map(|m| owned(&m))
            };
            match next {
                Ok((key, value)) => self.take(key.as_deref(), value.as_deref(), false).await,
                Err(KafkaError::PartitionEOF(partition)) => {
                    pending.remove(&partition);
                }
                Err(error) => {
                    tracing::warn!(topic = %self.topic, %error, "Reading the fleet commands failed; retrying.");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// The reader, assigned every partition of the topic from the beginning; made on first
    /// use, retrying until the topic can be read.
    async fn reader(&mut self) -> Arc<StreamConsumer<LogContext>> {
        loop {
            if let Some(reader) = &self.reader {
                return reader.clone();
            }
            match self.connect().await {
                Ok(reader) => self.reader = Some(Arc::new(reader)),
                Err(error) => {
                    tracing::warn!(topic = %self.topic, %error, "Cannot read the fleet commands topic yet; retrying.");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    async fn connect(&self) -> Result<StreamConsumer<LogContext>, String> {
        if let Err(error) = create_compacted_topic(&self.bus, &self.topic).await {
            tracing::debug!(topic = %self.topic, %error, "Could not create the compacted commands topic; reading it anyway.");
        }
        let mut config = self
            .bus
            .config()
            .consumer_config(&format!("weir-commands-{}", self.applier.process_id()));
        config
            .set("enable.partition.eof", "true")
            .set("statistics.interval.ms", "0")
            // librdkafka's default: an idle reader asks twice a second, and a command takes
            // effect within half a second of its publish.
            .set("fetch.wait.max.ms", "500")
            .set("auto.offset.reset", "earliest");
        let reader: StreamConsumer<LogContext> = config
            .create_with_context(LogContext)
            .map_err(|e| e.to_string())?;
        let topic = self.topic.clone();
        let (reader, assigned) = tokio::task::spawn_blocking(move || {
            let assigned = (|| {
                let metadata = reader
                    .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                let mut tpl = TopicPartitionList::new();
                for partition in metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .flat_map(|t| t.partitions())
                {
                    tpl.add_partition_offset(&topic, partition.id(), Offset::Beginning)
                        .map_err(|e| e.to_string())?;
                }
                if tpl.count() == 0 {
                    return Err(format!("topic {topic} has no partitions yet"));
                }
                reader.assign(&tpl).map_err(|e| e.to_string())
            })();
            (reader, assigned)
        })
        .await
        .map_err(|e| e.to_string())?;
        assigned.map(|()| reader)
    }

    /// One record: folded in; when `live`, applied and acknowledged.
    async fn take(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, live: bool) {
        let key = key.map(String::from_utf8_lossy);
        let Some(value) = value else {
            self.in_force.fold(key.as_deref(), None);
            if live {
                self.reconcile().await;
            }
            return;
        };
        let command = match FleetCommand::decode(value) {
            Ok(command) => command,
            Err(error) => {
                CommandApplied {
                    id: "",
                    issuer: "",
                    command: "unknown",
                    target: key.as_deref().unwrap_or(""),
                    to: "",
                    result: "rejected",
                    in_force_at_start: !live,
                    error: Some(&error),
                }
                .emit(self.bus.metrics());
                return;
            }
        };
        let mine = command.is_for(self.applier.process_id());
        self.in_force.fold(key.as_deref(), Some(command.clone()));
        if live && mine {
            let failed = self.reconcile().await;
            self.acknowledge(&command, &failed, false);
        }
    }

    async fn reconcile(&mut self) -> Vec<PauseError> {
        self.applier.reconcile(&self.in_force).await
    }

    /// The audit line, the count and the acknowledgement of one command for this process.
    fn acknowledge(&self, command: &FleetCommand, failed: &[PauseError], at_start: bool) {
        let result = match (self.applier.reaches(&command.action), failed.first()) {
            (false, _) => "ignored",
            (true, Some(_)) => "failed",
            (true, None) => "applied",
        };
        let target = command.action.target_key();
        let to = command.to.to_string();
        CommandApplied {
            id: &command.id,
            issuer: &command.issuer,
            command: command.action.name(),
            target: &target,
            to: &to,
            result,
            in_force_at_start: at_start,
            error: failed.first().map(|e| e as &dyn std::fmt::Display),
        }
        .emit(self.bus.metrics());
    }
}

/// A message's key and value, owned (the message borrows the reader).
fn owned(message: &impl Message) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    (
        message.key().map(<[u8]>::to_vec),
        message.payload().map(<[u8]>::to_vec),
    )
}

/// Publishes fleet commands: the library side of `weir fleet` and of the console's controls.
#[derive(Debug, Clone)]
pub struct CommandPublisher {
    bus: KafkaBus,
    topic: String,
    created: Arc<tokio::sync::OnceCell<()>>,
}

impl CommandPublisher {
    /// A publisher to `topic` (`weir.commands` by default) through `bus`.
    pub fn new(bus: &KafkaBus, topic: impl Into<String>) -> Self {
        Self {
            bus: bus.clone(),
            topic: topic.into(),
            created: Arc::default(),
        }
    }

    /// Publishes `command` under its key ([`FleetCommand::key`]), creating the topic compacted
    /// first if it is missing. Returns once the broker has it; processes acknowledge it in
    /// their next status reports.
    pub async fn publish(&self, command: &FleetCommand) -> Result<Delivery, PublishError> {
        self.created
            .get_or_init(|| async {
                if let Err(error) = create_compacted_topic(&self.bus, &self.topic).await {
                    tracing::warn!(topic = %self.topic, %error, "Could not create the compacted commands topic; publishing anyway.");
                }
            })
            .await;
        self.bus
            .publish_record(OutboundRecord {
                topic: self.topic.clone(),
                key: Some(command.key().into_bytes()),
                value: Some(command.encode()),
                headers: Headers::new(),
            })
            .await
    }
}
