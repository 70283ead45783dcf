//! The provenance headers of a dead-letter record: part of the wire contract (operators and
//! replay tools read them), so their names live with the other contracts. The bus writes them;
//! the contract documents of `weir::schema` describe them.

/// `weir.original.topic`
pub const ORIGINAL_TOPIC: &str = "weir.original.topic";
/// `weir.original.partition`
pub const ORIGINAL_PARTITION: &str = "weir.original.partition";
/// `weir.original.offset`
pub const ORIGINAL_OFFSET: &str = "weir.original.offset";
/// `weir.original.timestamp`
pub const ORIGINAL_TIMESTAMP: &str = "weir.original.timestamp";
/// `weir.consumer.group`
pub const CONSUMER_GROUP: &str = "weir.consumer.group";
/// `weir.error.kind`
pub const ERROR_KIND: &str = "weir.error.kind";
/// `weir.error.reason`
pub const ERROR_REASON: &str = "weir.error.reason";
/// `weir.error.message`
pub const ERROR_MESSAGE: &str = "weir.error.message";
/// `weir.attempts`
pub const ATTEMPTS: &str = "weir.attempts";
/// `weir.handler`
pub const HANDLER: &str = "weir.handler";

/// One provenance header as the documents describe it.
#[cfg_attr(not(feature = "schema"), allow(dead_code))]
pub(crate) struct HeaderDoc {
    pub(crate) name: &'static str,
    /// Set on every dead letter (`weir.original.timestamp` is not: a record may have none).
    pub(crate) always: bool,
    /// The value is a decimal integer, written as text like every Kafka header Weir sets.
    pub(crate) integer: bool,
    pub(crate) description: &'static str,
}

/// Every provenance header, in the order the bus sets them.
#[cfg_attr(not(feature = "schema"), allow(dead_code))]
pub(crate) const HEADERS: &[HeaderDoc] = &[
    HeaderDoc {
        name: ORIGINAL_TOPIC,
        always: true,
        integer: false,
        description: "Topic the record was consumed from.",
    },
    HeaderDoc {
        name: ORIGINAL_PARTITION,
        always: true,
        integer: true,
        description: "Partition the record was consumed from.",
    },
    HeaderDoc {
        name: ORIGINAL_OFFSET,
        always: true,
        integer: true,
        description: "Offset of the record in that partition.",
    },
    HeaderDoc {
        name: ORIGINAL_TIMESTAMP,
        always: false,
        integer: true,
        description: "The record's timestamp, in milliseconds since the Unix epoch, if it had one.",
    },
    HeaderDoc {
        name: CONSUMER_GROUP,
        always: true,
        integer: false,
        description: "Consumer group that gave up on the record.",
    },
    HeaderDoc {
        name: ERROR_KIND,
        always: true,
        integer: false,
        description: "Why: decode, acknowledged, retries_exhausted or panic.",
    },
    HeaderDoc {
        name: ERROR_REASON,
        always: true,
        integer: false,
        description: "The decode error's kind (missing_field, not_json, ...) for decode \
                      failures; otherwise the same as weir.error.kind.",
    },
    HeaderDoc {
        name: ERROR_MESSAGE,
        always: true,
        integer: false,
        description: "The error's message, for people.",
    },
    HeaderDoc {
        name: ATTEMPTS,
        always: true,
        integer: true,
        description: "How many times the handler ran (0 when the record did not decode).",
    },
    HeaderDoc {
        name: HANDLER,
        always: true,
        integer: false,
        description: "The handler that failed, so it can be replayed alone; empty when no \
                      handler ran.",
    },
];
