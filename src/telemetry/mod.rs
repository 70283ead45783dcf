//! Telemetry: the Prometheus metrics and the typed internal events through which every metric and
//! log line about a message is emitted, so names stay consistent and one grep finds each signal.
//! Other modules call this one; it calls none of them.

pub(crate) mod events;
mod health;
mod metrics;
#[cfg(feature = "otlp")]
pub(crate) mod otlp;
#[cfg(feature = "postgres")]
pub(crate) mod outbox;
#[cfg(feature = "postgres")]
pub(crate) mod parked;
mod recent_commands;
mod recent_errors;
mod report;
pub(crate) mod trace;

pub use health::{Health, HealthStatus};
pub use metrics::Metrics;
pub(crate) use metrics::{LocalRouteSeries, LocalSeries, RouteSeries};
pub use recent_commands::CommandAck;
pub use recent_errors::ErrorEntry;
pub use report::{
    PartitionStatus, PauseReason, ProcessInfo, ReportBuilder, RouteStatus, StatusReport,
    MAX_REPORTED_PARTITIONS, REPORT_SCHEMA_VERSION,
};
