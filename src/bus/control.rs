//! Pausing: which partitions the engine takes no records of, who asked, and why.
//!
//! A pause names a [`PauseTarget`] (a topic, one partition, or a route) and comes from a
//! [`PauseSource`] with a reason. The engine keeps pauses as *rules*, not as flags on the
//! partitions it owns now: a partition is paused while any rule covers it, so a pause also
//! covers partitions assigned later (it outlives a rebalance), and a resume removes only the
//! rule its own source made for that same target. No source resumes what another paused: a
//! partition runs again only once no rule covers it.
//!
//! A route is a handler's name ([`HandlerOptions::name`](crate::HandlerOptions::name), by
//! default its function's name). Fetching is per partition, not per handler, so pausing a route
//! pauses every partition of every topic the route handles: when a topic has several routes
//! (several handlers, or several event types), pausing one of them pauses the others' records of
//! that topic too.
//!
//! A paused partition is closed at the source (no record of it is handed to the engine; on
//! Kafka its fetching is paused in librdkafka as well). Records already admitted — running, or
//! waiting in their lane behind one that runs — finish, and their offsets keep committing.
//! Records fetched and not yet admitted stay where they are, in order, and come first on resume.

use crate::telemetry::events::PartitionPaused;
use crate::telemetry::{Metrics, PartitionStatus};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What a pause applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PauseTarget {
    /// Every partition of a topic, assigned now or later.
    Topic(String),
    /// One partition of a topic.
    Partition(String, i32),
    /// Every partition of each topic the named handler consumes.
    Route(String),
}

impl PauseTarget {
    /// Every partition of `topic`.
    pub fn topic(topic: impl Into<String>) -> Self {
        Self::Topic(topic.into())
    }

    /// Partition `partition` of `topic`.
    pub fn partition(topic: impl Into<String>, partition: i32) -> Self {
        Self::Partition(topic.into(), partition)
    }

    /// Every partition of the topics the handler named `name` consumes.
    pub fn route(name: impl Into<String>) -> Self {
        Self::Route(name.into())
    }
}

impl std::fmt::Display for PauseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Topic(t) => write!(f, "topic {t}"),
            Self::Partition(t, p) => write!(f, "partition {t}/{p}"),
            Self::Route(r) => write!(f, "route {r}"),
        }
    }
}

/// Who paused. Each source resumes only its own pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum PauseSource {
    /// The library API: [`Subscription::pause`](crate::Subscription::pause).
    Api,
    /// A route's circuit breaker.
    Breaker,
    /// An operator's command (the console's fleet commands).
    Command,
}

impl PauseSource {
    /// The source's name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Breaker => "breaker",
            Self::Command => "command",
        }
    }
}

/// One pause in force: what, who, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// What it applies to.
    pub target: PauseTarget,
    /// Who paused.
    pub source: PauseSource,
    /// Why, as given when pausing.
    pub reason: String,
}

/// Why a pause or resume was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PauseError {
    /// The subscription consumes no such topic.
    #[error("the subscription consumes no topic `{0}`")]
    UnknownTopic(String),
    /// The subscription has no handler of that name.
    #[error("the subscription has no route (handler) named `{0}`")]
    UnknownRoute(String),
    /// The subscription has stopped.
    #[error("the subscription has stopped")]
    Stopped,
}

/// What a [`Control`] handle asks of the engine loop.
pub(crate) enum Command {
    /// A change of pauses.
    Pause(PauseCommand),
    /// The owned partitions' status, built on demand (for status reports): nothing is kept per
    /// record for it.
    Status(oneshot::Sender<Vec<PartitionStatus>>),
}

/// A change of pauses, sent to the engine loop; `done` is answered once it applies.
pub(crate) struct PauseCommand {
    pub(crate) source: PauseSource,
    pub(crate) target: PauseTarget,
    /// `Some(reason)` pauses; `None` resumes.
    pub(crate) reason: Option<String>,
    pub(crate) done: oneshot::Sender<Vec<Pause>>,
}

/// The topics of a subscription and the topics of each of its routes.
#[derive(Debug, Default)]
pub(crate) struct Scope {
    pub(crate) topics: BTreeSet<String>,
    /// Route (handler name) → its topics.
    pub(crate) routes: HashMap<String, BTreeSet<String>>,
}

impl Scope {
    fn check(&self, target: &PauseTarget) -> Result<(), PauseError> {
        match target {
            PauseTarget::Topic(t) | PauseTarget::Partition(t, _) if !self.topics.contains(t) => {
                Err(PauseError::UnknownTopic(t.clone()))
            }
            PauseTarget::Route(r) if !self.routes.contains_key(r) => {
                Err(PauseError::UnknownRoute(r.clone()))
            }
            _ => Ok(()),
        }
    }
}

/// A handle that sends pause commands to one engine. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Control {
    commands: mpsc::UnboundedSender<Command>,
    scope: Arc<Scope>,
}

impl Control {
    /// A handle and the engine's end of its channel.
    pub(crate) fn new(scope: Arc<Scope>) -> (Self, mpsc::UnboundedReceiver<Command>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        (Self { commands, scope }, receiver)
    }

    /// Adds (`Some(reason)`) or removes (`None`) `source`'s pause of `target`; returns once the
    /// engine applied it, with every pause then in force.
    pub(crate) async fn set(
        &self,
        source: PauseSource,
        target: PauseTarget,
        reason: Option<String>,
    ) -> Result<Vec<Pause>, PauseError> {
        self.scope.check(&target)?;
        let (done, answer) = oneshot::channel();
        self.commands
            .send(Command::Pause(PauseCommand {
                source,
                target,
                reason,
                done,
            }))
            .map_err(|_| PauseError::Stopped)?;
        answer.await.map_err(|_| PauseError::Stopped)
    }

    /// Whether the engine's subscription has `target` (its topic, or its route) at all.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // For the commands reader.
    pub(crate) fn accepts(&self, target: &PauseTarget) -> bool {
        self.scope.check(target).is_ok()
    }

    /// The topics the engine's subscription consumes.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // For the commands reader.
    pub(crate) fn topics(&self) -> impl Iterator<Item = &String> {
        self.scope.topics.iter()
    }

    /// The status of each partition the engine owns now; `None` once it has stopped.
    pub(crate) async fn status(&self) -> Option<Vec<PartitionStatus>> {
        let (done, answer) = oneshot::channel();
        self.commands.send(Command::Status(done)).ok()?;
        answer.await.ok()
    }
}

/// The pauses in force, kept by the engine.
#[derive(Default)]
pub(crate) struct Pauses {
    rules: Vec<Pause>,
    scope: Arc<Scope>,
}

/// The (source, reason) pairs that hold one partition paused; empty when it runs.
pub(crate) type Reasons = BTreeSet<(PauseSource, String)>;

impl Pauses {
    pub(crate) fn new(scope: Arc<Scope>) -> Self {
        Self {
            rules: Vec::new(),
            scope,
        }
    }

    /// Every pause in force.
    pub(crate) fn list(&self) -> Vec<Pause> {
        self.rules.clone()
    }

    /// Whether no pause is in force (the engine's fast path).
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What holds partition `partition` of `topic` paused.
    pub(crate) fn reasons(&self, topic: &str, partition: i32) -> Reasons {
        self.rules
            .iter()
            .filter(|rule| self.covers(&rule.target, topic, partition))
            .map(|rule| (rule.source, rule.reason.clone()))
            .collect()
    }

    fn covers(&self, target: &PauseTarget, topic: &str, partition: i32) -> bool {
        match target {
            PauseTarget::Topic(t) => t == topic,
            PauseTarget::Partition(t, p) => t == topic && *p == partition,
            PauseTarget::Route(r) => self
                .scope
                .routes
                .get(r)
                .is_some_and(|topics| topics.contains(topic)),
        }
    }

    /// Applies a command: a pause replaces the same source's pause of the same target (a new
    /// reason); a resume removes it, and only it.
    pub(crate) fn apply(
        &mut self,
        source: PauseSource,
        target: PauseTarget,
        reason: Option<String>,
    ) {
        self.rules
            .retain(|rule| !(rule.source == source && rule.target == target));
        if let Some(reason) = reason {
            self.rules.push(Pause {
                target,
                source,
                reason,
            });
        }
    }
}

/// Reports a partition's change of reasons: a log line per reason added or removed, and the
/// `weir_partition_paused{topic,partition,reason}` gauge (1 while a reason holds it; 0 once
/// none of that name does; the series removed when the partition is `gone`, revoked).
pub(crate) fn report(
    metrics: &Metrics,
    topic: &str,
    partition: i32,
    before: &Reasons,
    after: &Reasons,
    gone: bool,
) {
    for (source, reason) in after.difference(before) {
        PartitionPaused {
            topic,
            partition,
            source: source.as_str(),
            reason,
            paused: true,
            held: true,
            gone,
        }
        .emit(metrics);
    }
    for (source, reason) in before.difference(after) {
        // Another source may hold it for a reason of the same name: the gauge stays 1 then.
        let held = after.iter().any(|(_, r)| r == reason);
        PartitionPaused {
            topic,
            partition,
            source: source.as_str(),
            reason,
            paused: false,
            held,
            gone,
        }
        .emit(metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Arc<Scope> {
        Arc::new(Scope {
            topics: ["a".to_owned(), "b".to_owned()].into(),
            routes: HashMap::from([("on_a".to_owned(), ["a".to_owned()].into())]),
        })
    }

    #[test]
    fn a_resume_removes_only_its_own_sources_pause() {
        let mut pauses = Pauses::new(scope());
        pauses.apply(PauseSource::Api, PauseTarget::topic("a"), Some("x".into()));
        pauses.apply(
            PauseSource::Breaker,
            PauseTarget::route("on_a"),
            Some("y".into()),
        );
        assert_eq!(pauses.reasons("a", 3).len(), 2);
        pauses.apply(PauseSource::Api, PauseTarget::route("on_a"), None);
        pauses.apply(PauseSource::Api, PauseTarget::topic("a"), None);
        assert_eq!(
            pauses.reasons("a", 3),
            Reasons::from([(PauseSource::Breaker, "y".to_owned())])
        );
        pauses.apply(PauseSource::Breaker, PauseTarget::route("on_a"), None);
        assert!(pauses.reasons("a", 3).is_empty());
    }

    #[test]
    fn a_pause_covers_its_targets_partitions_only() {
        let mut pauses = Pauses::new(scope());
        pauses.apply(
            PauseSource::Api,
            PauseTarget::partition("b", 1),
            Some("x".into()),
        );
        assert!(!pauses.reasons("b", 1).is_empty());
        assert!(pauses.reasons("b", 0).is_empty());
        assert!(pauses.reasons("a", 1).is_empty());
    }

    #[test]
    fn pausing_again_replaces_the_reason() {
        let mut pauses = Pauses::new(scope());
        pauses.apply(PauseSource::Api, PauseTarget::topic("b"), Some("x".into()));
        pauses.apply(PauseSource::Api, PauseTarget::topic("b"), Some("y".into()));
        assert_eq!(
            pauses.reasons("b", 0),
            Reasons::from([(PauseSource::Api, "y".to_owned())])
        );
    }

    #[test]
    fn unknown_topics_and_routes_are_refused() {
        let scope = scope();
        assert_eq!(
            scope.check(&PauseTarget::topic("c")),
            Err(PauseError::UnknownTopic("c".into()))
        );
        assert_eq!(
            scope.check(&PauseTarget::route("nope")),
            Err(PauseError::UnknownRoute("nope".into()))
        );
        assert_eq!(scope.check(&PauseTarget::partition("a", 9)), Ok(()));
    }

    /// Two sources pause one topic: the API's resume leaves the breaker's pause in force, and
    /// the topic's record is handled only once the breaker resumes too.
    #[tokio::test(start_paused = true)]
    async fn resuming_one_source_does_not_resume_what_another_paused() {
        use crate::bus::{Bus, ConsumerConfig, MemoryBus, Publisher as _};
        use crate::contracts::{Envelope, Event, EventType};
        use crate::handlers::{Ctx, Router};

        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        struct Ping {}
        impl Event for Ping {
            const TYPE: EventType = EventType::new("test.ping");
            const TOPIC: &'static str = "pings";
            fn key(&self) -> String {
                String::new()
            }
        }

        let bus = MemoryBus::default();
        bus.create_topic("pings", 1);
        let (tx, mut handled) = mpsc::unbounded_channel::<i64>();
        let router = Router::new().on(move |_: Ping, ctx: Ctx| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ctx.offset());
                Ok(())
            }
        });
        let subscription = bus
            .subscribe(router, ConsumerConfig::new("pausers"))
            .expect("subscribes");
        let topic = PauseTarget::topic("pings");
        subscription
            .pause_as(PauseSource::Breaker, topic.clone(), Some("open".into()))
            .await
            .expect("the breaker pauses");
        subscription
            .pause(topic.clone(), "maintenance")
            .await
            .expect("the API pauses");
        let record = crate::bus::publish::encode(&Envelope::new(Ping {})).expect("encodes");
        bus.publish_record(record).await.expect("publishes");

        let left = subscription.resume(topic.clone()).await.expect("resumes");
        assert_eq!(
            left,
            vec![Pause {
                target: topic.clone(),
                source: PauseSource::Breaker,
                reason: "open".into()
            }]
        );
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(
            handled.try_recv().is_err(),
            "the API's resume lifted the breaker's pause"
        );
        let gauge = |reason: &str| {
            bus.metrics()
                .partition_paused
                .get_metric_with_label_values(&["pings", "0", reason])
                .map(|g| g.get())
                .ok()
        };
        assert_eq!((gauge("maintenance"), gauge("open")), (Some(0), Some(1)));

        let left = subscription
            .pause_as(PauseSource::Breaker, topic, None)
            .await
            .expect("the breaker resumes");
        assert!(left.is_empty());
        let offset = tokio::time::timeout(std::time::Duration::from_secs(5), handled.recv())
            .await
            .expect("handled once nothing holds it");
        assert_eq!(offset, Some(0));
        subscription.stop().await.expect("stops");
    }

    /// The engine's snapshot: the next offset it admitted, records in flight (running, and
    /// waiting behind their key), the pause and its reason, and the commit once the broker
    /// confirmed it.
    #[tokio::test(start_paused = true)]
    async fn status_shows_positions_in_flight_records_pauses_and_confirmed_commits() {
        use crate::bus::{Bus, ConsumerConfig, MemoryBus, Publisher as _};
        use crate::contracts::{Envelope, Event, EventType};
        use crate::handlers::Router;
        use std::time::Duration;

        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        struct Ping {}
        impl Event for Ping {
            const TYPE: EventType = EventType::new("test.ping");
            const TOPIC: &'static str = "pings";
            fn key(&self) -> String {
                "one-key".to_owned()
            }
        }

        let bus = MemoryBus::default();
        bus.create_topic("pings", 1);
        let release = Arc::new(tokio::sync::Notify::new());
        let gate = release.clone();
        let router = Router::new().on(move |_: Ping| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                Ok(())
            }
        });
        let subscription = bus
            .subscribe(router, ConsumerConfig::new("reporters"))
            .expect("subscribes");
        for _ in 0..3 {
            let record = crate::bus::publish::encode(&Envelope::new(Ping {})).expect("encodes");
            bus.publish_record(record).await.expect("publishes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        subscription
            .pause(PauseTarget::topic("pings"), "maintenance")
            .await
            .expect("pauses");

        let status = subscription.status().await.expect("running");
        assert_eq!(status.len(), 1);
        let partition = &status[0];
        assert_eq!(
            (partition.topic.as_str(), partition.partition),
            ("pings", 0)
        );
        assert_eq!(partition.position, Some(3), "admitted 0, 1 and 2");
        assert_eq!(partition.in_flight, 3, "one running, two behind it");
        assert_eq!(partition.committed, None);
        assert!(partition.paused);
        assert_eq!(partition.pause_reasons.len(), 1);
        assert_eq!(partition.pause_reasons[0].source, "api");
        assert_eq!(partition.pause_reasons[0].reason, "maintenance");

        for _ in 0..3 {
            release.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        subscription
            .resume(PauseTarget::topic("pings"))
            .await
            .expect("resumes");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = subscription.status_probe().status().await.expect("running");
        assert_eq!(status[0].in_flight, 0);
        assert_eq!(status[0].committed, Some(3));
        assert!(!status[0].paused);
        subscription.stop().await.expect("stops");
    }
}
