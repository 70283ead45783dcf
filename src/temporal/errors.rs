//! What a failed workflow start means for the record that asked for it.

use crate::handlers::HandlerError;
use temporalio_client::errors::{ClientConnectError, WorkflowStartError};
use temporalio_client::tonic::Code;

/// Why Weir could not talk to Temporal.
#[derive(Debug, thiserror::Error)]
pub enum TemporalError {
    /// The address is not a URL the client accepts (checked when the settings are read).
    #[error("invalid Temporal address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as configured.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// The server could not be reached (or did not answer its first call).
    #[error("cannot connect to Temporal at {address}: {source}")]
    Connect {
        /// The address tried.
        address: String,
        /// The client's error.
        #[source]
        source: Box<ClientConnectError>,
    },
}

impl TemporalError {
    /// A connection failure is worth retrying (the server may come back); a bad address is not.
    pub fn into_handler_error(self) -> HandlerError {
        match self {
            TemporalError::Connect { .. } => {
                HandlerError::retryable(self).with_kind("temporal_unavailable")
            }
            TemporalError::InvalidAddress { .. } => {
                HandlerError::acknowledged(self).with_kind("temporal_config")
            }
        }
    }
}

/// Maps a failed start to the record's outcome, in one `match`.
///
/// `AlreadyStarted` is not an error here: the caller treats it as success before calling this
/// (see [`super::StartOutcome::AlreadyStarted`]). Transient server states are `Retryable`;
/// requests the server refuses on their content are `Acknowledged` with its message, since
/// sending them again cannot succeed.
pub fn classify_start_error(error: WorkflowStartError) -> HandlerError {
    match error {
        WorkflowStartError::Rpc(status) => {
            let code = status.code();
            let message = format!(
                "Temporal refused the workflow start ({code:?}): {}",
                status.message()
            );
            match code {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Internal
                | Code::Unknown
                | Code::Cancelled => {
                    HandlerError::retryable(message).with_kind("temporal_unavailable")
                }
                Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::Unimplemented
                | Code::DataLoss
                | Code::AlreadyExists
                | Code::Ok => HandlerError::acknowledged(message).with_kind("temporal_rejected"),
            }
        }
        WorkflowStartError::PayloadConversion(e) => {
            HandlerError::acknowledged(format!("the workflow input cannot be encoded: {e}"))
                .with_kind("temporal_rejected")
        }
        // Normally handled by the caller; a duplicate is success, never a failure to retry.
        WorkflowStartError::AlreadyStarted { source, .. } => {
            HandlerError::acknowledged(format!("workflow already started: {}", source.message()))
                .with_kind("temporal_duplicate")
        }
        // `WorkflowStartError` is non-exhaustive: a kind this version does not know is retried,
        // the safe side for at-least-once.
        other => HandlerError::retryable(other.to_string()).with_kind("temporal_unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use temporalio_client::tonic::Status;

    fn outcome(code: Code) -> HandlerError {
        classify_start_error(WorkflowStartError::Rpc(Status::new(code, "server says no")))
    }

    #[test]
    fn unavailable_deadline_and_exhaustion_are_retried() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            let error = outcome(code);
            assert!(
                matches!(error, HandlerError::Retryable { .. }),
                "{code:?}: {error}"
            );
            assert_eq!(error.kind(), Some("temporal_unavailable"));
        }
    }

    #[test]
    fn invalid_argument_and_not_found_are_acknowledged_with_the_servers_message() {
        for code in [Code::InvalidArgument, Code::NotFound] {
            let error = outcome(code);
            assert!(
                matches!(error, HandlerError::Acknowledged { .. }),
                "{code:?}: {error}"
            );
            assert!(error.to_string().contains("server says no"), "{error}");
            assert_eq!(error.kind(), Some("temporal_rejected"));
        }
    }

    #[test]
    fn a_bad_address_is_acknowledged_not_retried() {
        let bad = TemporalError::InvalidAddress {
            address: "::".into(),
            reason: "not a URL".into(),
        };
        assert!(matches!(
            bad.into_handler_error(),
            HandlerError::Acknowledged { .. }
        ));
    }
}
