use std::borrow::Cow;

/// Any error a handler wants to report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How a handler failed, which decides what happens next.
///
/// The choice is the handler's, because only it knows whether trying again can help: a timeout
/// talking to a database is `Retryable`; a record that refers to a customer that does not exist
/// is `Acknowledged`. Decode failures never reach here: they are rejected before any handler runs.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Transient: retry with backoff under the retry policy; dead-letter when attempts run out.
    #[error("retryable: {source}")]
    Retryable {
        /// What went wrong.
        source: BoxError,
        /// An optional error kind; the policy's `non_retryable_kinds` can veto the retry.
        kind: Option<Cow<'static, str>>,
    },
    /// Permanent: do not retry; dead-letter (or drop, where configured) after this one call.
    #[error("acknowledged: {source}")]
    Acknowledged {
        /// What went wrong.
        source: BoxError,
        /// An optional error kind, for logs.
        kind: Option<Cow<'static, str>>,
    },
}

impl HandlerError {
    /// A transient failure: `.map_err(HandlerError::retryable)?`.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Self::Retryable {
            source: source.into(),
            kind: None,
        }
    }

    /// A permanent failure: `.map_err(HandlerError::acknowledged)?`.
    pub fn acknowledged(source: impl Into<BoxError>) -> Self {
        Self::Acknowledged {
            source: source.into(),
            kind: None,
        }
    }

    /// Tags the error with a kind (e.g. `"rate_limited"`), matched by the retry policy.
    pub fn with_kind(self, kind: impl Into<Cow<'static, str>>) -> Self {
        match self {
            Self::Retryable { source, .. } => Self::Retryable {
                source,
                kind: Some(kind.into()),
            },
            Self::Acknowledged { source, .. } => Self::Acknowledged {
                source,
                kind: Some(kind.into()),
            },
        }
    }

    /// The kind given with [`with_kind`](Self::with_kind), if any.
    pub fn kind(&self) -> Option<&str> {
        match self {
            Self::Retryable { kind, .. } | Self::Acknowledged { kind, .. } => kind.as_deref(),
        }
    }
}
