//! `POST /v1/stacks`, `GET /v1/stacks`, `GET|DELETE /v1/stacks/{name}`,
//! `POST /v1/stacks/{name}/sleep|wake|archive` (see [`crate::stacks`]). A stack is its
//! owner's: only they and admins see it or act on it (a stack another user owns answers 404).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hangar_api::{StackAccepted, StackSpec, StackView};

use crate::api::auth::Caller;
use crate::api::error::{ApiError, ErrorBody};
use crate::manager::Manager;

fn who(caller: &Caller) -> Option<(&str, hangar_core::Role)> {
    Some((caller.user.as_str(), caller.role))
}

/// Make a stack: the body is a stack file as JSON (`examples/shop.toml`'s shape). Answered
/// (202) once the file is checked and the stack recorded; its `stack` task makes the
/// members (peers first; follow it with `GET /v1/tasks/{id}`, cancel it to undo
/// everything).
#[utoipa::path(
    post,
    path = "/v1/stacks",
    request_body = StackSpec,
    responses(
        (status = 202, body = StackAccepted),
        (status = 400, body = ErrorBody, description = "the stack file is not valid: names, public ports, settings, peer references, a cycle, too many members"),
        (status = 404, body = ErrorBody, description = "a member names no service (with the closest names)"),
        (status = 409, body = ErrorBody, description = "a stack of that name exists, or no segment is free"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn create_stack(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Json(spec): Json<StackSpec>,
) -> Result<(StatusCode, Json<StackAccepted>), ApiError> {
    let (task, stack) = manager.stack_up(&caller.user, spec).await?;
    Ok((StatusCode::ACCEPTED, Json(StackAccepted { task, stack })))
}

/// The caller's stacks (an admin's: every stack), by name, with their members.
#[utoipa::path(
    get,
    path = "/v1/stacks",
    responses(
        (status = 200, body = [StackView]),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn list_stacks(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<StackView>>, ApiError> {
    Ok(Json(manager.stacks(who(&caller)).await?))
}

/// One stack: its state, segment, and members (VM, state, private address, public
/// endpoints).
#[utoipa::path(
    get,
    path = "/v1/stacks/{name}",
    params(("name" = String, Path, description = "the stack")),
    responses(
        (status = 200, body = StackView),
        (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn get_stack(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<StackView>, ApiError> {
    Ok(Json(manager.stack(&name, who(&caller)).await?))
}

/// Delete a stack: every member's VM (process, files, endpoints) and the stack. Answers
/// the stack as it was. 409 while it is being made (cancel its task instead).
#[utoipa::path(
    delete,
    path = "/v1/stacks/{name}",
    params(("name" = String, Path, description = "the stack")),
    responses(
        (status = 200, body = StackView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the stack is being made"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn delete_stack(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<StackView>, ApiError> {
    Ok(Json(manager.stack_down(&name, who(&caller)).await?))
}

/// Put every member to sleep (paused in memory), the front first.
#[utoipa::path(
    post,
    path = "/v1/stacks/{name}/sleep",
    params(("name" = String, Path, description = "the stack")),
    responses(
        (status = 200, body = StackView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not in a state that allows it"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn sleep_stack(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<StackView>, ApiError> {
    Ok(Json(manager.stack_sleep(&name, who(&caller)).await?))
}

/// Archive every member (memory to disk, no process), the front first; each with its
/// service's archive tier.
#[utoipa::path(
    post,
    path = "/v1/stacks/{name}/archive",
    params(("name" = String, Path, description = "the stack")),
    responses(
        (status = 200, body = StackView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not in a state that allows it"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn archive_stack(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<StackView>, ApiError> {
    Ok(Json(manager.stack_archive(&name, who(&caller)).await?))
}

/// Wake every member: peers before the members that refer to them, the front last. (A
/// connection to a sleeping stack's public endpoint does the same.)
#[utoipa::path(
    post,
    path = "/v1/stacks/{name}/wake",
    params(("name" = String, Path, description = "the stack")),
    responses(
        (status = 200, body = StackView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not in a state that allows it"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn wake_stack(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<StackView>, ApiError> {
    Ok(Json(manager.stack_wake(&name, who(&caller)).await?))
}
