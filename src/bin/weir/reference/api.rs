//! What the reference service's HTTP API shares: the state its routes hold and one error type
//! whose JSON body is the same on every route (`{"error": "<kind>", "message": "..."}`).

use super::settings::ReferenceSettings;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use std::sync::Arc;

/// What routes, handlers and background jobs of the reference service need.
#[derive(Clone)]
pub(crate) struct Services {
    /// The service's database (its tables and the outbox).
    pub(crate) pool: PgPool,
    /// The reference service's part of the configuration, read once at start.
    pub(crate) settings: Arc<ReferenceSettings>,
}

/// An API error: a status, a stable machine-readable kind and a message for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400: the request cannot be understood as it is.
    pub(crate) fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, message)
    }

    /// 404: no such resource or task.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500: our fault. The cause is logged here; the client gets no internals.
    pub(crate) fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "Request failed.");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the service's logs",
        )
    }
}

#[cfg(test)]
impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::internal(e)
    }
}

impl From<weir::OutboxError> for ApiError {
    fn from(e: weir::OutboxError) -> Self {
        Self::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.kind, "message": self.message });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status.is_client_error() {
            // A refusal may come before the request's body was read (an upload over the
            // limit, of a refused type or name): the rest of the body is still on the
            // connection, which the server then closes. Saying so keeps the client from
            // sending its next request on it (and getting no answer).
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}
