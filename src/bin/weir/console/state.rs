//! What every page handler shares: the configuration it reads Kafka with, the fleet, the
//! commands (in force and recent) and their publisher, the tokens and sessions, the route
//! table and the database.

use super::auth::Auth;
use super::commands::Commands;
use super::fleet::Fleet;
use super::route_table::RouteTable;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use weir::{CommandPublisher, DeadLetterTopics, KafkaConfig};

/// What every handler shares.
pub(crate) struct Console {
    pub(super) kafka: KafkaConfig,
    pub(super) status_topic: String,
    pub(super) dead_letter: DeadLetterTopics,
    pub(super) fleet: Arc<RwLock<Fleet>>,
    /// The commands topic (`[control] commands_topic`).
    pub(super) commands_topic: String,
    /// The commands in force and the latest ones, folded from the commands topic.
    pub(super) commands: Arc<RwLock<Commands>>,
    /// Publishes the Controls page's commands to the commands topic.
    pub(super) publisher: CommandPublisher,
    pub(super) auth: Auth,
    /// Replay ids being confirmed right now.
    pub(super) running: Mutex<HashSet<String>>,
    /// The service's routes and contracts.
    pub(super) routes: RouteTable,
    /// The database of parked records and the outbox, when one is configured (connected on
    /// first use: the console starts without it).
    pub(super) database: Option<sqlx::PgPool>,
}
