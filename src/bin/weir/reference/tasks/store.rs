//! The task row as clients see it, and the one way a trigger asks for processing.

use crate::reference::events::{TaskFields, TaskProcessingRequested, TriggeredBy};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, PgPool, Row};
use uuid::Uuid;
use weir::{Envelope, OutboxError, OutboxWriter};

/// `GET /tasks/{id}`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TaskView {
    pub(crate) id: Uuid,
    pub(crate) tenant_id: String,
    pub(crate) environment_id: String,
    pub(crate) file_url: String,
    pub(crate) entity_type: String,
    /// `pending`, `processing`, `completed` or `failed`.
    pub(crate) status: String,
    /// Records read so far by the current (or last) run: good plus bad.
    pub(crate) processed_records: i64,
    pub(crate) good_records: i64,
    pub(crate) bad_records: i64,
    /// Fraction of the file read (0 to 1); null while the file's size is unknown.
    pub(crate) progress: Option<f64>,
    /// Why the task failed, or the transient error being retried.
    pub(crate) error: Option<String>,
    /// Processing runs so far (each trigger is one run; a redelivery is not a new one).
    pub(crate) runs: i64,
    pub(crate) last_triggered_by: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
}

impl FromRow<'_, PgRow> for TaskView {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            tenant_id: row.try_get("tenant_id")?,
            environment_id: row.try_get("environment_id")?,
            file_url: row.try_get("file_url")?,
            entity_type: row.try_get("entity_type")?,
            status: row.try_get("status")?,
            processed_records: row.try_get("processed_records")?,
            good_records: row.try_get("good_records")?,
            bad_records: row.try_get("bad_records")?,
            progress: row.try_get("progress")?,
            error: row.try_get("error")?,
            runs: row.try_get("runs")?,
            last_triggered_by: row.try_get("last_triggered_by")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

const VIEW: &str = "
    SELECT t.id, t.tenant_id, t.environment_id, t.file_url, t.entity_type, t.status,
           t.processed_records, t.good_records, t.bad_records,
           CASE WHEN t.status = 'completed' THEN 1.0::float8
                WHEN t.bytes_total > 0 THEN LEAST(t.bytes_read::float8 / t.bytes_total, 1.0)
                WHEN t.status = 'pending' THEN 0.0::float8
           END AS progress,
           t.error,
           (SELECT count(*) FROM task_runs r WHERE r.task_id = t.id) AS runs,
           (SELECT r.triggered_by FROM task_runs r WHERE r.task_id = t.id
             ORDER BY r.id DESC LIMIT 1) AS last_triggered_by,
           t.created_at, t.updated_at
      FROM tasks t
     WHERE t.id = $1";

/// The task, if it exists.
pub(crate) async fn find(pool: &PgPool, id: Uuid) -> Result<Option<TaskView>, sqlx::Error> {
    sqlx::query_as(VIEW).bind(id).fetch_optional(pool).await
}

/// Writes `task.processing_requested` for `task_id`, made by `triggered_by`, through the outbox
/// on `conn` (a transaction), after locking the task row (so a request for a task that does not exist publishes
/// nothing, and requests of one task are written in the order they are made). Returns the
/// event id, or `None` if there is no such task. The caller commits.
pub(crate) async fn request_processing(
    conn: &mut PgConnection,
    task_id: Uuid,
    triggered_by: TriggeredBy,
) -> Result<Option<Uuid>, OutboxError> {
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "UPDATE tasks SET last_requested_at = now()
          WHERE id = $1
         RETURNING tenant_id, environment_id, file_url, entity_type",
    )
    .bind(task_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((tenant_id, environment_id, file_url, entity_type)) = row else {
        return Ok(None);
    };
    let envelope = Envelope::new(TaskProcessingRequested::new(TaskFields::new(
        task_id,
        tenant_id,
        environment_id,
        file_url,
        entity_type,
        triggered_by,
    )));
    OutboxWriter::write(conn, &envelope).await?;
    Ok(Some(envelope.meta.id))
}

/// The wire name of a trigger (`api`, `manual`, `scheduled`, `webhook`).
pub(crate) fn trigger_name(triggered_by: TriggeredBy) -> &'static str {
    match triggered_by {
        TriggeredBy::Api => "api",
        TriggeredBy::Manual => "manual",
        TriggeredBy::Scheduled => "scheduled",
        TriggeredBy::Webhook => "webhook",
    }
}
