//! The task API: create a task, read it, ask for its processing again.
//!
//! None of it processes anything: creating writes the row and `task.created` in one
//! transaction (`create::create_task`), and `POST /tasks/{id}/process` writes
//! `task.processing_requested` through the outbox (the API trigger).

use super::create::{create_task, NewTask};
use super::parse::EntityType;
use super::source::Location;
use super::store::{self, TaskView};
use crate::reference::api::ApiError;
use crate::reference::events::TriggeredBy;
use crate::reference::Services;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

pub(super) fn routes(services: &Services) -> axum::Router {
    axum::Router::new()
        .route("/tasks", post(create))
        .route("/tasks/{id}", get(read))
        .route("/tasks/{id}/process", post(process))
        .with_state(services.clone())
}

/// `POST /tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    file_url: String,
    entity_type: String,
    #[serde(default = "default_scope")]
    tenant_id: String,
    #[serde(default = "default_scope")]
    environment_id: String,
}

fn default_scope() -> String {
    "default".to_owned()
}

/// 201 with the task and its `Location`; 400 for a body that is not a valid task.
async fn create(
    State(services): State<Services>,
    body: Result<Json<CreateTask>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
    if EntityType::parse(&body.entity_type).is_none() {
        return Err(ApiError::bad_request(
            "invalid_entity_type",
            format!(
                "entity_type {:?} is not one of {}",
                body.entity_type,
                EntityType::NAMES.join(", ")
            ),
        ));
    }
    Location::parse(&body.file_url).map_err(|e| ApiError::bad_request("invalid_file_url", e))?;
    for (name, value) in [
        ("tenant_id", &body.tenant_id),
        ("environment_id", &body.environment_id),
    ] {
        if value.trim().is_empty() {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("{name} is empty"),
            ));
        }
    }
    let id = create_task(
        &services.pool,
        NewTask {
            tenant_id: body.tenant_id,
            environment_id: body.environment_id,
            file_url: body.file_url,
            entity_type: body.entity_type,
        },
    )
    .await?;
    let task = store::find(&services.pool, id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("task {id} vanished after its creation")))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/tasks/{id}"))],
        Json(task),
    ))
}

fn task_id(path: Result<Path<Uuid>, PathRejection>) -> Result<Uuid, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request("invalid_task_id", e.body_text()))
}

/// 200 with the task; 404 if there is none.
async fn read(
    State(services): State<Services>,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<TaskView>, ApiError> {
    let id = task_id(id)?;
    store::find(&services.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))
}

/// 202 with the request's event id; 404 (nothing published) if there is no such task.
async fn process(
    State(services): State<Services>,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = task_id(id)?;
    let mut tx = services.pool.begin().await?;
    let Some(event_id) = store::request_processing(&mut tx, id, TriggeredBy::Api).await? else {
        return Err(ApiError::not_found(format!("no task {id}")));
    };
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "task_id": id,
            "event_id": event_id,
            "triggered_by": "api",
        })),
    ))
}
