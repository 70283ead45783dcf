//! The transactional outbox and the idempotent inbox, on PostgreSQL.
//!
//! - [`OutboxWriter`] stores an event in `weir_outbox` inside the caller's transaction.
//! - [`OutboxRelay`] publishes committed rows through a [`Publisher`](crate::Publisher), in order
//!   per key, marking each published; several relays may run at once.
//! - [`inbox`] wraps a handler so its writes and "event applied" commit together.
//! - [`migrate`] applies embedded schema migrations ([`OUTBOX_MIGRATIONS`], and a service's own).
//!
//! Depends on `contracts`, the publishing side of `bus` and the handler types; never on the
//! consumer engine. The table format is documented in the README ("The outbox table") for
//! services in other languages.

mod claim;
mod inbox;
mod migrate;
mod relay;
mod row;
mod writer;

pub use inbox::{inbox, purge_inbox, InboxFuture, InboxTx};
pub use migrate::{migrate, Migration, OUTBOX_MIGRATIONS};
pub use relay::{OutboxRelay, RelayConfig, OUTBOX_CHANNEL};
pub use writer::OutboxWriter;

/// Why an outbox, inbox or migration operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The event or its headers could not be encoded for storage.
    #[error("could not encode the event: {0}")]
    Encode(String),
    /// The record cannot go through the outbox as it is.
    #[error("invalid outbox record: {0}")]
    InvalidRecord(&'static str),
    /// A migration failed or conflicts with what was applied.
    #[error("migration `{id}`: {message}")]
    Migration {
        /// The migration's id.
        id: String,
        /// What went wrong.
        message: String,
    },
}
