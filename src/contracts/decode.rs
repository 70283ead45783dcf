//! Why a record could not be decoded, and the limits applied before decoding. A leaf: the
//! envelope decoder and `EventFactory` both report in these terms, and neither imports the other
//! for them.

/// Why a record could not be decoded. Every variant is permanent: retrying cannot fix the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record has no value, or an empty one.
    #[error("empty record value")]
    Empty,
    /// The value is over the configured size limit.
    #[error("record value is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Size of the value.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The value is not UTF-8, so it cannot be JSON.
    #[error("record value is not valid UTF-8 (valid up to byte {valid_up_to})")]
    InvalidUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The value is not well-formed JSON.
    #[error("record value is not JSON: {detail}")]
    NotJson {
        /// The parser's message, with line and column.
        detail: String,
    },
    /// A required field or attribute is absent.
    #[error("missing field `{field}`")]
    MissingField {
        /// Path of the field, e.g. `data.task_id` or `ce_type`.
        field: String,
    },
    /// A field is present but has the wrong type or an invalid value.
    #[error("invalid field `{field}`: {detail}")]
    InvalidField {
        /// Path of the field.
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The event type is not one this consumer knows on this topic.
    #[error("unknown event type {event_type:?}")]
    UnknownEventType {
        /// The type the record declared.
        event_type: String,
    },
}

impl DecodeError {
    /// A stable snake_case name for the kind, used as a dead-letter header and a log field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLarge { .. } => "too_large",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::NotJson { .. } => "not_json",
            Self::MissingField { .. } => "missing_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownEventType { .. } => "unknown_event_type",
        }
    }

    /// Classifies a serde_json error, keeping the path of the offending field.
    pub(crate) fn from_json(err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        Self::from_json_at("", err)
    }

    pub(super) fn from_json_at(
        prefix: &str,
        err: serde_path_to_error::Error<serde_json::Error>,
    ) -> Self {
        use serde_json::error::Category;
        let path = err.path().to_string();
        let inner = err.into_inner();
        let join = |leaf: &str| {
            let mut parts: Vec<&str> = Vec::new();
            for p in [prefix, path.as_str(), leaf] {
                if !p.is_empty() && p != "." {
                    parts.push(p);
                }
            }
            parts.join(".")
        };
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => Self::NotJson {
                detail: inner.to_string(),
            },
            Category::Data => {
                let msg = inner.to_string();
                match msg
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    Some(field) => Self::MissingField { field: join(field) },
                    None => Self::InvalidField {
                        field: join(""),
                        detail: msg,
                    },
                }
            }
        }
    }
}

/// Limits applied before parsing, so one huge record cannot exhaust memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest record value accepted, in bytes. Default 1 MiB, Kafka's default message size.
    pub max_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
        }
    }
}
