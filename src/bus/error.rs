//! Why a bus could not start or run a subscription. A leaf: the configuration's checks, the
//! engine and every transport report in its terms.

/// Why a bus could not start or run a subscription.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A setting is invalid; the message names it.
    #[error("invalid setting `{key}`: {message}")]
    Config {
        /// The setting.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The subscription has no handler, so it would consume nothing.
    #[error("the router has no handlers; nothing to subscribe to")]
    NoHandlers,
    /// The transport failed in a way the consumer cannot recover from.
    #[error("transport error: {0}")]
    Transport(String),
    /// The consumer task ended abnormally.
    #[error("the consumer task failed: {0}")]
    Task(String),
}
