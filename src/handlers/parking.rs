//! The consumer's side of durable retries, as the dispatcher sees it: which keys have parked
//! records, and parking one more. The store behind it (PostgreSQL) lives in `outbox`; keeping
//! only this trait here keeps `handlers` free of any database.
//!
//! Per key, records are handled in offset order across in-place retries, parking and the
//! parked-record worker:
//! - a record whose handler still fails `Retryable` after the in-place attempts is parked, and
//!   its offset may be committed only once the park is durable;
//! - a later record of a key that has parked records (for that handler and consumer group) is
//!   parked behind them without calling the handler;
//! - a partition's parked keys are learned from the store before its first record is handled,
//!   so a new owner (after a rebalance or a restart) sees what the previous owner parked.

use super::record::Inbound;
use std::future::Future;
use std::pin::Pin;

pub(crate) type ParkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Where a subscription parks records for durable retries.
pub(crate) trait Parking: Send + Sync + 'static {
    /// Loads the parked keys of the record's partition, once per ownership of the partition.
    fn learn<'a>(&'a self, topic: &'a str, partition: i32) -> ParkFuture<'a, ()>;
    /// Whether `handler` has parked records of this record's key in its partition, as far as this
    /// consumer knows (cheap, in memory).
    fn is_parked(&self, handler: &str, rec: &Inbound) -> bool;
    /// Asks the store whether the key still has parked records (the worker may have finished
    /// them); forgets the key if not.
    fn confirm<'a>(&'a self, handler: &'a str, rec: &'a Inbound) -> ParkFuture<'a, bool>;
    /// Parks the record for `handler` after `attempts` calls, to be tried again after `delay`;
    /// resolves once it is durable.
    fn park<'a>(
        &'a self,
        handler: &'a str,
        rec: &'a Inbound,
        attempts: u32,
        error: &'a str,
        delay: std::time::Duration,
    ) -> ParkFuture<'a, ()>;
    /// Forgets partitions given up, so that owning them again learns them again.
    fn forget(&self, partitions: &[(String, i32)]);
}
