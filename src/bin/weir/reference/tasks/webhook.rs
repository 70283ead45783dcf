//! `POST /webhooks/task-processing`: another system asks for a task's processing, signed with a
//! shared secret (`tasks.webhook_secret`).
//!
//! The caller sends the JSON body `{"task_id": "...", "triggered_by": "webhook"}`
//! (`triggered_by` may be left out) with two headers:
//! - `X-Weir-Timestamp`: the Unix time in seconds when it signed;
//! - `X-Weir-Signature`: `sha256=` and the hex HMAC-SHA256, keyed by the secret, of
//!   `<timestamp>.<body>` (the timestamp is signed, so it cannot be moved into the window).
//!
//! Answers, and nothing is published unless it is 202:
//! - 503 `webhook_disabled`: no secret is configured;
//! - 401 `invalid_signature`: a header is missing or malformed, or the signature is wrong;
//! - 401 `stale_timestamp`: the timestamp is further than `tasks.webhook_window` from now;
//! - 409 `replayed`: this exact signed request was already accepted (inside the window);
//! - 400 `invalid_body`: not the JSON above; 422 `invalid_trigger`: `triggered_by` is not
//!   `webhook`;
//! - 404 `not_found`: no such task;
//! - 202: `task.processing_requested` (`triggered_by: webhook`) was written to the outbox.

use super::store;
use crate::reference::api::ApiError;
use crate::reference::events::TriggeredBy;
use crate::reference::Services;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Json;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::time::Duration;
use uuid::Uuid;

/// The header carrying the signing time (Unix seconds).
pub(crate) const TIMESTAMP_HEADER: &str = "x-weir-timestamp";
/// The header carrying `sha256=<hex>`.
pub(crate) const SIGNATURE_HEADER: &str = "x-weir-signature";

pub(super) fn routes(services: &Services) -> axum::Router {
    axum::Router::new()
        .route("/webhooks/task-processing", post(receive))
        .with_state(services.clone())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    task_id: Uuid,
    #[serde(default)]
    triggered_by: Option<TriggeredBy>,
}

fn unauthorized(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, kind, message)
}

/// The hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`: what a caller puts after
/// `sha256=`.
#[cfg(test)]
fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks the headers against the body: the timestamp if the signature is right.
fn verify(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    window: Duration,
) -> Result<String, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let timestamp: i64 = header(TIMESTAMP_HEADER)
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| {
            unauthorized(
                "invalid_signature",
                "X-Weir-Timestamp is missing or not Unix seconds",
            )
        })?;
    let signature = header(SIGNATURE_HEADER)
        .and_then(|s| s.trim().strip_prefix("sha256="))
        .and_then(|hex_digest| hex::decode(hex_digest).ok())
        .ok_or_else(|| {
            unauthorized(
                "invalid_signature",
                "X-Weir-Signature is missing or not sha256=<hex>",
            )
        })?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    // Constant time: the comparison does not tell how many bytes matched.
    mac.verify_slice(&signature)
        .map_err(|_| unauthorized("invalid_signature", "the signature does not match"))?;
    if now.abs_diff(timestamp) > window.as_secs() {
        return Err(unauthorized(
            "stale_timestamp",
            format!(
                "the request was signed {}s from now, outside the {}s window",
                // Saturating: a signed timestamp may be any i64, and the answer is a 401, not
                // a panic (an overflow in a debug build).
                now.saturating_sub(timestamp),
                window.as_secs()
            ),
        ));
    }
    Ok(hex::encode(signature))
}

async fn receive(
    State(services): State<Services>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let settings = &services.settings.tasks;
    let Some(secret) = settings.webhook_secret.as_deref().filter(|s| !s.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhook_disabled",
            "no webhook secret is configured (tasks.webhook_secret)",
        ));
    };
    let now = chrono::Utc::now().timestamp();
    let signature = verify(
        secret.as_bytes(),
        &headers,
        &body,
        now,
        settings.webhook_window,
    )?;
    let request: WebhookBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    if !matches!(request.triggered_by, None | Some(TriggeredBy::Webhook)) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_trigger",
            "a webhook call can only ask with triggered_by \"webhook\"",
        ));
    }

    let mut tx = services.pool.begin().await?;
    // Remembered for twice the window (clocks on both sides may be off by one window).
    sqlx::query(
        "DELETE FROM task_webhook_deliveries
          WHERE received_at < now() - make_interval(secs => $1)",
    )
    .bind(2.0 * settings.webhook_window.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    let fresh = sqlx::query(
        "INSERT INTO task_webhook_deliveries (signature) VALUES ($1) ON CONFLICT DO NOTHING",
    )
    .bind(&signature)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "replayed",
            "this signed request was already accepted",
        ));
    }
    let Some(event_id) =
        store::request_processing(&mut tx, request.task_id, TriggeredBy::Webhook).await?
    else {
        // Rolled back on drop: the delivery is not remembered either.
        return Err(ApiError::not_found(format!("no task {}", request.task_id)));
    };
    tx.commit().await?;
    tracing::info!(task = %request.task_id, %event_id, "Webhook accepted; processing requested.");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "task_id": request.task_id,
            "event_id": event_id,
            "triggered_by": "webhook",
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const WINDOW: Duration = Duration::from_secs(300);

    fn headers(timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TIMESTAMP_HEADER, HeaderValue::from_str(timestamp).unwrap());
        headers.insert(SIGNATURE_HEADER, HeaderValue::from_str(signature).unwrap());
        headers
    }

    fn kind(result: Result<String, ApiError>) -> (StatusCode, String) {
        let error = result.expect_err("rejected");
        let status = error.status();
        let body = format!("{error:?}");
        (status, body)
    }

    #[test]
    fn accepts_a_fresh_correct_signature() {
        let body = br#"{"task_id":"0190d6a2-0000-7000-8000-000000000000"}"#;
        let signature = format!("sha256={}", sign(b"secret", 1_000, body));
        assert!(verify(b"secret", &headers("1000", &signature), body, 1_100, WINDOW).is_ok());
    }

    #[test]
    fn rejects_wrong_missing_or_altered_signatures_and_stale_timestamps() {
        let body = br#"{"task_id":"0190d6a2-0000-7000-8000-000000000000"}"#;
        let good = format!("sha256={}", sign(b"secret", 1_000, body));
        let other_key = format!("sha256={}", sign(b"other", 1_000, body));
        let cases = [
            (
                headers("1000", &other_key),
                body.as_slice(),
                "invalid_signature",
            ),
            (
                headers("1000", "sha256=zz"),
                body.as_slice(),
                "invalid_signature",
            ),
            (
                headers("1000", &good[7..]),
                body.as_slice(),
                "invalid_signature",
            ),
            (headers("1001", &good), body.as_slice(), "invalid_signature"),
            (
                headers("1000", &good),
                b"{}".as_slice(),
                "invalid_signature",
            ),
            (HeaderMap::new(), body.as_slice(), "invalid_signature"),
        ];
        for (headers, body, expected) in cases {
            let (status, text) = kind(verify(b"secret", &headers, body, 1_000, WINDOW));
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
            assert!(text.contains(expected), "{text}");
        }
        let (status, text) = kind(verify(
            b"secret",
            &headers("1000", &good),
            body,
            1_301,
            WINDOW,
        ));
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(text.contains("stale_timestamp"), "{text}");
        let (_, text) = kind(verify(
            b"secret",
            &headers("1000", &good),
            body,
            699,
            WINDOW,
        ));
        assert!(text.contains("stale_timestamp"), "{text}");
    }

    #[test]
    fn a_signed_timestamp_at_the_ends_of_i64_is_stale_not_a_panic() {
        let body = br#"{"task_id":"0190d6a2-0000-7000-8000-000000000000"}"#;
        for timestamp in [i64::MIN, i64::MAX] {
            let signature = format!("sha256={}", sign(b"secret", timestamp, body));
            let headers = headers(&timestamp.to_string(), &signature);
            let (status, text) = kind(verify(b"secret", &headers, body, 1_000, WINDOW));
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
            assert!(text.contains("stale_timestamp"), "{text}");
        }
    }
}
