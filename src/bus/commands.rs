//! Fleet commands: what an operator (or the console) asks every process, or one, to do while it
//! runs — pause or resume a topic, a partition or a route; quiet (take no new records, finish
//! what is in flight) and unquiet. JSON, with an explicit [`COMMAND_SCHEMA_VERSION`].
//!
//! Commands travel through a compacted topic (`weir.commands`), keyed by what they address and
//! target ([`FleetCommand::key`], e.g. `all|topic|customer-events`): a resume has the key of the
//! pause it lifts, so once the topic is compacted the latest record of each key is what is in
//! force, and a process that starts later reads exactly that ([`InForce`]). The transport is the
//! Kafka bus's; this module is the schema and the folding, and applies nothing itself.
//!
//! Applying is the engine's pause mechanism with its own source, [`PauseSource::Command`]: a
//! command's pause is lifted only by a command, never by the library API or a breaker, and a
//! command's resume lifts neither of theirs.

// What applies commands (the reader) is the Kafka bus's; without it only the schema is used.
#![cfg_attr(not(feature = "kafka"), allow(dead_code))]

use super::control::{Control, PauseError, PauseSource, PauseTarget};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The command schema's version. A process rejects (logs and counts) commands of another
/// version rather than guess what they mean.
pub const COMMAND_SCHEMA_VERSION: u32 = 1;

/// The default commands topic.
pub const COMMANDS_TOPIC: &str = "weir.commands";

/// The pause reason of a command's pause (a label of `weir_partition_paused`: fixed, so that
/// command ids never become label values).
pub(crate) const PAUSE_REASON: &str = "fleet pause";
/// The pause reason of a quiet process's partitions.
pub(crate) const QUIET_REASON: &str = "fleet quiet";
/// The pause reason of every topic while a starting process reads the commands in force.
const HOLD_REASON: &str = "fleet commands loading";

/// One command, as published to the commands topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FleetCommand {
    /// [`COMMAND_SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// Unique per command (a UUID v7 by [`FleetCommand::new`]); processes acknowledge it by
    /// this id in their status reports.
    pub id: String,
    /// Who issued it (an operator's name, `console`, ...), for the audit trail.
    pub issuer: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// Which processes it is for.
    pub to: Addressee,
    /// What they are to do.
    pub action: CommandAction,
}

/// Which processes a command is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Addressee {
    /// Every process reading the topic, including those that start later.
    All,
    /// The process with this id (the key of its status reports).
    Process(String),
}

/// What a command asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum CommandAction {
    /// Pause a topic, a partition or a route, until a resume of the same target.
    Pause {
        /// What to pause.
        target: CommandTarget,
    },
    /// Lift a command's pause of the same target (not a pause of the API or a breaker).
    Resume {
        /// What to resume.
        target: CommandTarget,
    },
    /// Take no new records of any topic; records in flight finish and commit.
    Quiet,
    /// Lift the quiet.
    Unquiet,
}

/// What a pause or resume applies to, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum CommandTarget {
    /// Every partition of a topic.
    Topic {
        /// The topic.
        topic: String,
    },
    /// One partition of a topic.
    Partition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
    /// Every partition of the topics a handler (by name) consumes.
    Route {
        /// The handler's name.
        route: String,
    },
}

impl CommandTarget {
    /// The engine's pause target.
    pub fn pause_target(&self) -> PauseTarget {
        match self {
            Self::Topic { topic } => PauseTarget::topic(topic),
            Self::Partition { topic, partition } => PauseTarget::partition(topic, *partition),
            Self::Route { route } => PauseTarget::route(route),
        }
    }
}

impl std::fmt::Display for CommandTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Topic { topic } => write!(f, "topic|{topic}"),
            Self::Partition { topic, partition } => write!(f, "partition|{topic}|{partition}"),
            Self::Route { route } => write!(f, "route|{route}"),
        }
    }
}

impl std::fmt::Display for Addressee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Process(id) => write!(f, "process:{id}"),
        }
    }
}

impl CommandAction {
    /// The action's name: the `command` label of `weir_commands_applied_total`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pause { .. } => "pause",
            Self::Resume { .. } => "resume",
            Self::Quiet => "quiet",
            Self::Unquiet => "unquiet",
        }
    }

    /// What the action targets, as in the record's key: `topic|orders`, `quiet`.
    pub fn target_key(&self) -> String {
        match self {
            Self::Pause { target } | Self::Resume { target } => target.to_string(),
            Self::Quiet | Self::Unquiet => "quiet".to_owned(),
        }
    }

    /// Whether the action puts something in force (a pause, a quiet) rather than lifting it.
    fn holds(&self) -> bool {
        matches!(self, Self::Pause { .. } | Self::Quiet)
    }
}

/// Why a record of the commands topic is not a command this process can apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// Not JSON, or not a command of the version it claims.
    #[error("not a fleet command: {0}")]
    Unparseable(String),
    /// A schema version this process does not know.
    #[error("command schema version {0} is not supported (this process reads version {COMMAND_SCHEMA_VERSION})")]
    UnknownVersion(u32),
}

impl FleetCommand {
    /// A new command with a fresh id, issued now.
    pub fn new(issuer: impl Into<String>, to: Addressee, action: CommandAction) -> Self {
        Self {
            schema_version: COMMAND_SCHEMA_VERSION,
            id: uuid::Uuid::now_v7().to_string(),
            issuer: issuer.into(),
            issued_at: Utc::now(),
            to,
            action,
        }
    }

    /// The record key: addressee and target, so that a compacted topic keeps the latest
    /// command of each (`all|topic|customer-events`, `process:<id>|quiet`).
    pub fn key(&self) -> String {
        format!("{}|{}", self.to, self.action.target_key())
    }

    /// The record value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command serializes")
    }

    /// Reads a record value: its version first, so that a command of a newer schema is
    /// refused by its version rather than half-read.
    pub fn decode(value: &[u8]) -> Result<Self, CommandError> {
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let version: Version =
            serde_json::from_slice(value).map_err(|e| CommandError::Unparseable(e.to_string()))?;
        if version.schema_version != COMMAND_SCHEMA_VERSION {
            return Err(CommandError::UnknownVersion(version.schema_version));
        }
        serde_json::from_slice(value).map_err(|e| CommandError::Unparseable(e.to_string()))
    }

    /// Whether this process (by its id) is one the command is for.
    pub fn is_for(&self, process_id: &str) -> bool {
        match &self.to {
            Addressee::All => true,
            Addressee::Process(id) => id == process_id,
        }
    }
}

/// The commands in force: the latest command of each key, with the lifting ones (resume,
/// unquiet, a tombstone) removing their key. The same fold a compacted topic makes, so reading
/// it from the beginning gives the same answer whether or not it was compacted yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InForce {
    held: BTreeMap<String, FleetCommand>,
}

impl InForce {
    /// Folds in one record: a command under its own key, or the tombstone (`None`) of `key`.
    pub fn fold(&mut self, key: Option<&str>, command: Option<FleetCommand>) {
        match command {
            Some(command) => {
                let key = command.key();
                if command.action.holds() {
                    self.held.insert(key, command);
                } else {
                    self.held.remove(&key);
                }
            }
            None => {
                if let Some(key) = key {
                    self.held.remove(key);
                }
            }
        }
    }

    /// The commands in force, by key.
    pub fn commands(&self) -> impl Iterator<Item = &FleetCommand> {
        self.held.values()
    }

    /// The engine pauses these commands call for in the process `process_id`, whose
    /// subscriptions consume `topics`: each target with its reason. A quiet pauses every topic.
    pub(crate) fn pauses(&self, process_id: &str, topics: &[String]) -> Desired {
        let mut desired = Desired::new();
        for command in self.held.values().filter(|c| c.is_for(process_id)) {
            match &command.action {
                CommandAction::Pause { target } => {
                    desired.insert(target.pause_target(), PAUSE_REASON);
                }
                CommandAction::Quiet => {
                    for topic in topics {
                        desired
                            .entry(PauseTarget::topic(topic))
                            .or_insert(QUIET_REASON);
                    }
                }
                CommandAction::Resume { .. } | CommandAction::Unquiet => {}
            }
        }
        desired
    }
}

/// The command-source pauses one process should have: target → reason.
pub(crate) type Desired = HashMap<PauseTarget, &'static str>;

/// The source every command pauses as.
const SOURCE: PauseSource = PauseSource::Command;

/// Applies the commands in force to a process's subscriptions: for each, sets and lifts
/// [`PauseSource::Command`] pauses until it has exactly the ones the commands call for (so a
/// resume of a topic under a quiet leaves it quiet, and an unquiet leaves a topic pause).
pub(crate) struct Applier {
    process_id: String,
    watched: Vec<Watched>,
}

/// One subscription: its engine's control handle and the command pauses set on it.
struct Watched {
    control: Control,
    applied: HashMap<PauseTarget, &'static str>,
}

impl Watched {
    /// Sets (`Some` reason) or lifts (`None`) the command pause on `target`, and records it
    /// as applied only once the engine took it; a failure goes to `failed`.
    async fn set(
        &mut self,
        target: PauseTarget,
        reason: Option<&'static str>,
        failed: &mut Vec<PauseError>,
    ) {
        match self
            .control
            .set(SOURCE, target.clone(), reason.map(str::to_owned))
            .await
        {
            Ok(_) => match reason {
                Some(reason) => {
                    self.applied.insert(target, reason);
                }
                None => {
                    self.applied.remove(&target);
                }
            },
            Err(e) => failed.push(e),
        }
    }
}

impl Applier {
    pub(crate) fn new(process_id: impl Into<String>) -> Self {
        Self {
            process_id: process_id.into(),
            watched: Vec::new(),
        }
    }

    /// The id commands are addressed to.
    pub(crate) fn process_id(&self) -> &str {
        &self.process_id
    }

    /// Applies commands to this subscription's engine too.
    pub(crate) fn watch(&mut self, control: Control) {
        self.watched.push(Watched {
            control,
            applied: HashMap::new(),
        });
    }

    /// Pauses every topic of the subscriptions until the next [`reconcile`](Self::reconcile),
    /// which lifts what the commands in force do not call for: a process holds its topics
    /// while it reads the commands in force, so that a partition paused fleet-wide is never
    /// handled by a replica that has not read that yet.
    pub(crate) async fn hold(&mut self) -> Vec<PauseError> {
        let mut failed = Vec::new();
        for watched in &mut self.watched {
            let topics: Vec<String> = watched.control.topics().cloned().collect();
            for topic in topics {
                watched
                    .set(PauseTarget::topic(topic), Some(HOLD_REASON), &mut failed)
                    .await;
            }
        }
        failed
    }

    /// Whether `action` concerns anything a watched subscription consumes.
    pub(crate) fn reaches(&self, action: &CommandAction) -> bool {
        match action {
            CommandAction::Pause { target } | CommandAction::Resume { target } => {
                let target = target.pause_target();
                self.watched.iter().any(|w| w.control.accepts(&target))
            }
            CommandAction::Quiet | CommandAction::Unquiet => !self.watched.is_empty(),
        }
    }

    /// Sets and lifts command pauses until each subscription has the ones `in_force` calls
    /// for. Returns the failures (an engine that has stopped).
    pub(crate) async fn reconcile(&mut self, in_force: &InForce) -> Vec<PauseError> {
        let mut failed = Vec::new();
        for watched in &mut self.watched {
            let topics: Vec<String> = watched.control.topics().cloned().collect();
            let desired: Desired = in_force
                .pauses(&self.process_id, &topics)
                .into_iter()
                .filter(|(target, _)| watched.control.accepts(target))
                .collect();
            let lifted: Vec<PauseTarget> = watched
                .applied
                .keys()
                .filter(|t| !desired.contains_key(*t))
                .cloned()
                .collect();
            for target in lifted {
                watched.set(target, None, &mut failed).await;
            }
            for (target, reason) in desired {
                if watched.applied.get(&target) != Some(&reason) {
                    watched.set(target, Some(reason), &mut failed).await;
                }
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> CommandTarget {
        CommandTarget::Topic {
            topic: name.to_owned(),
        }
    }

    fn command(to: Addressee, action: CommandAction) -> FleetCommand {
        FleetCommand::new("tester", to, action)
    }

    #[test]
    fn a_command_round_trips_and_is_keyed_by_addressee_and_target() {
        let pause = command(
            Addressee::All,
            CommandAction::Pause {
                target: topic("customer-events"),
            },
        );
        assert_eq!(pause.key(), "all|topic|customer-events");
        assert_eq!(FleetCommand::decode(&pause.encode()), Ok(pause.clone()));
        let json: serde_json::Value = serde_json::from_slice(&pause.encode()).unwrap();
        assert_eq!(json["to"], "all");
        assert_eq!(json["action"]["kind"], "pause");
        assert_eq!(json["action"]["target"]["topic"], "customer-events");

        let quiet = command(Addressee::Process("h-1-ab".into()), CommandAction::Quiet);
        assert_eq!(quiet.key(), "process:h-1-ab|quiet");
        let resume = command(
            Addressee::All,
            CommandAction::Resume {
                target: CommandTarget::Partition {
                    topic: "t".into(),
                    partition: 3,
                },
            },
        );
        assert_eq!(resume.key(), "all|partition|t|3");
        assert_ne!(pause.id, resume.id, "every command has its own id");
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        let mut json: serde_json::Value =
            serde_json::from_slice(&command(Addressee::All, CommandAction::Quiet).encode())
                .unwrap();
        json["schema_version"] = 2.into();
        json["action"] = serde_json::json!({"kind": "reboot"});
        let newer = serde_json::to_vec(&json).unwrap();
        assert_eq!(
            FleetCommand::decode(&newer),
            Err(CommandError::UnknownVersion(2))
        );
        json["schema_version"] = 1.into();
        let unknown_action = serde_json::to_vec(&json).unwrap();
        assert!(matches!(
            FleetCommand::decode(&unknown_action),
            Err(CommandError::Unparseable(_))
        ));
        assert!(matches!(
            FleetCommand::decode(b"pause everything"),
            Err(CommandError::Unparseable(_))
        ));
    }

    #[test]
    fn the_latest_command_of_each_target_is_in_force_and_a_resume_removes_it() {
        let mut in_force = InForce::default();
        let fold = |in_force: &mut InForce, c: FleetCommand| in_force.fold(None, Some(c));
        let a = topic("a");
        let b = topic("b");
        fold(
            &mut in_force,
            command(Addressee::All, CommandAction::Pause { target: a.clone() }),
        );
        fold(
            &mut in_force,
            command(Addressee::All, CommandAction::Pause { target: b.clone() }),
        );
        let again = command(Addressee::All, CommandAction::Pause { target: a.clone() });
        fold(&mut in_force, again.clone());
        assert_eq!(in_force.commands().count(), 2, "one per target");
        assert!(
            in_force.commands().any(|c| c.id == again.id),
            "the latest pause of a is the one in force"
        );
        fold(
            &mut in_force,
            command(Addressee::All, CommandAction::Resume { target: b.clone() }),
        );
        let topics = ["a".to_owned(), "b".to_owned()];
        assert_eq!(
            in_force.pauses("p", &topics),
            Desired::from([(PauseTarget::topic("a"), PAUSE_REASON)])
        );
        // A resume addressed to one process does not lift a fleet-wide pause.
        fold(
            &mut in_force,
            command(
                Addressee::Process("p".into()),
                CommandAction::Resume { target: a.clone() },
            ),
        );
        assert_eq!(in_force.pauses("p", &topics).len(), 1);
        // A tombstone of the key removes it, as compaction would.
        in_force.fold(Some("all|topic|a"), None);
        assert!(in_force.pauses("p", &topics).is_empty());
    }

    /// On the memory bus: a command pause and an API pause of one topic; the command's resume
    /// leaves the API's pause, a quiet pauses the other topic too, and the unquiet leaves a
    /// topic pause of its own in force.
    #[tokio::test(start_paused = true)]
    async fn commands_set_and_lift_only_their_own_pauses() {
        use crate::bus::{Bus, ConsumerConfig, MemoryBus, Pause};
        use crate::contracts::{Event, EventType};
        use crate::handlers::Router;

        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        struct A {}
        impl Event for A {
            const TYPE: EventType = EventType::new("test.a");
            const TOPIC: &'static str = "a";
            fn key(&self) -> String {
                String::new()
            }
        }
        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        struct B {}
        impl Event for B {
            const TYPE: EventType = EventType::new("test.b");
            const TOPIC: &'static str = "b";
            fn key(&self) -> String {
                String::new()
            }
        }

        let bus = MemoryBus::default();
        bus.create_topic("a", 1);
        bus.create_topic("b", 1);
        let router = Router::new()
            .on(|_: A| async { Ok(()) })
            .on(|_: B| async { Ok(()) });
        let subscription = bus
            .subscribe(router, ConsumerConfig::new("commanded"))
            .expect("subscribes");
        let mut applier = Applier::new("p1");
        applier.watch(subscription.control.clone());
        // Held while the commands in force are read; the first reconcile lifts the hold.
        assert!(applier.hold().await.is_empty());
        let held = subscription
            .resume(PauseTarget::topic("a"))
            .await
            .expect("lists");
        assert_eq!(held.len(), 2, "{held:?}");
        assert!(applier.reconcile(&InForce::default()).await.is_empty());
        let held = subscription
            .resume(PauseTarget::topic("a"))
            .await
            .expect("lists");
        assert!(held.is_empty(), "{held:?}");
        let mut in_force = InForce::default();
        let mut run = |action: CommandAction, to: Addressee| {
            in_force.fold(None, Some(command(to, action)));
            in_force.clone()
        };
        let pauses = |list: Vec<Pause>| {
            let mut list: Vec<(String, PauseSource, String)> = list
                .into_iter()
                .map(|p| (p.target.to_string(), p.source, p.reason))
                .collect();
            list.sort();
            list
        };
        let api = (
            "topic a".to_owned(),
            PauseSource::Api,
            "maintenance".to_owned(),
        );

        subscription
            .pause(PauseTarget::topic("a"), "maintenance")
            .await
            .expect("the API pauses");
        let now = run(CommandAction::Pause { target: topic("a") }, Addressee::All);
        assert!(applier.reconcile(&now).await.is_empty());
        let now = run(CommandAction::Resume { target: topic("a") }, Addressee::All);
        assert!(applier.reconcile(&now).await.is_empty());
        // The API's resume of a target it never paused changes nothing and lists every pause.
        let left = subscription
            .resume(PauseTarget::topic("b"))
            .await
            .expect("lists");
        assert_eq!(
            pauses(left),
            vec![api.clone()],
            "the command's resume left the API's pause"
        );

        let now = run(CommandAction::Pause { target: topic("b") }, Addressee::All);
        applier.reconcile(&now).await;
        let now = run(CommandAction::Quiet, Addressee::Process("p1".into()));
        applier.reconcile(&now).await;
        let left = subscription
            .resume(PauseTarget::topic("b"))
            .await
            .expect("lists");
        assert_eq!(
            pauses(left),
            vec![
                api.clone(),
                (
                    "topic a".to_owned(),
                    PauseSource::Command,
                    QUIET_REASON.to_owned()
                ),
                (
                    "topic b".to_owned(),
                    PauseSource::Command,
                    PAUSE_REASON.to_owned()
                ),
            ],
            "quiet: every topic paused by the command source"
        );
        let now = run(CommandAction::Unquiet, Addressee::Process("p1".into()));
        applier.reconcile(&now).await;
        let left = subscription
            .resume(PauseTarget::topic("b"))
            .await
            .expect("lists");
        assert_eq!(
            pauses(left),
            vec![
                api,
                (
                    "topic b".to_owned(),
                    PauseSource::Command,
                    PAUSE_REASON.to_owned()
                ),
            ],
            "the unquiet left the fleet pause of b and the API's pause of a"
        );
        assert!(applier.reaches(&CommandAction::Pause { target: topic("b") }));
        assert!(!applier.reaches(&CommandAction::Pause {
            target: topic("elsewhere")
        }));
        subscription.stop().await.expect("stops");
    }

    #[test]
    fn a_quiet_pauses_every_topic_of_the_process_it_is_for_only() {
        let mut in_force = InForce::default();
        in_force.fold(
            None,
            Some(command(
                Addressee::Process("p1".into()),
                CommandAction::Quiet,
            )),
        );
        in_force.fold(
            None,
            Some(command(
                Addressee::All,
                CommandAction::Pause { target: topic("a") },
            )),
        );
        let topics = ["a".to_owned(), "b".to_owned()];
        assert_eq!(
            in_force.pauses("p1", &topics),
            Desired::from([
                (PauseTarget::topic("a"), PAUSE_REASON),
                (PauseTarget::topic("b"), QUIET_REASON),
            ])
        );
        assert_eq!(
            in_force.pauses("p2", &topics),
            Desired::from([(PauseTarget::topic("a"), PAUSE_REASON)])
        );
        in_force.fold(
            None,
            Some(command(
                Addressee::Process("p1".into()),
                CommandAction::Unquiet,
            )),
        );
        assert_eq!(
            in_force.pauses("p1", &topics),
            in_force.pauses("p2", &topics),
            "the unquiet leaves the fleet-wide pause in force"
        );
    }
}
