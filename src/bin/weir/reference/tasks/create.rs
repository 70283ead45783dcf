//! Creating a task writes its row and its `task.created` event in one transaction, so a task
//! exists if and only if its event will be published: the outbox's worked example.

use crate::reference::events::{TaskCreated, TaskFields, TriggeredBy};
use sqlx::PgPool;
use uuid::Uuid;
use weir::{Envelope, OutboxError, OutboxWriter};

/// What a client says when it creates a task; the id and status are the service's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewTask {
    /// Owning tenant.
    pub(crate) tenant_id: String,
    /// Environment within the tenant.
    pub(crate) environment_id: String,
    /// Where the file to process is.
    pub(crate) file_url: String,
    /// What kind of records the file holds.
    pub(crate) entity_type: String,
}

/// Inserts a `pending` task and its `task.created` event (through the outbox) in one
/// transaction; returns the task id, which is also the event's key.
pub(crate) async fn create_task(pool: &PgPool, task: NewTask) -> Result<Uuid, OutboxError> {
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO tasks (id, tenant_id, environment_id, file_url, entity_type, status)
         VALUES ($1, $2, $3, $4, $5, 'pending')",
    )
    .bind(id)
    .bind(&task.tenant_id)
    .bind(&task.environment_id)
    .bind(&task.file_url)
    .bind(&task.entity_type)
    .execute(&mut *tx)
    .await?;
    let event = TaskCreated::new(TaskFields::new(
        id,
        task.tenant_id,
        task.environment_id,
        task.file_url,
        task.entity_type,
        TriggeredBy::Api,
    ));
    OutboxWriter::write(&mut tx, &Envelope::new(event)).await?;
    tx.commit().await?;
    Ok(id)
}
