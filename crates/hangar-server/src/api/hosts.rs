//! An operator's routes on farm hosts (admins only): drain, resume, evacuate, and what an
//! evacuation did (`crate::evacuation`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use hangar_api::{EvacuationView, HostStateView};

use crate::api::auth::{AuditTarget, Caller};
use crate::api::error::{ApiError, ErrorBody};
use crate::manager::Manager;
use crate::rebalance::MigrationMover;

/// Drain a farm host: nothing new is placed there; its paused pool VMs are removed (the
/// pools refill on other hosts); the VMs in use stay. Heartbeats keep it draining until
/// `resume`. Draining again answers the same.
#[utoipa::path(
    post,
    path = "/v1/hosts/{name}/drain",
    params(("name" = String, Path, description = "the farm host")),
    responses(
        (status = 200, body = HostStateView),
        (status = 404, body = ErrorBody, description = "no such farm host"),
        (status = 409, body = ErrorBody, description = "the host is down or lost, or the server's own"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn drain_host(
    State(manager): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let view = manager.drain_host(&name).await?;
    Ok((Extension(AuditTarget(name)), Json(view)).into_response())
}

/// Resume a draining farm host: placement uses it again. Resuming a host that is up
/// answers the same.
#[utoipa::path(
    post,
    path = "/v1/hosts/{name}/resume",
    params(("name" = String, Path, description = "the farm host")),
    responses(
        (status = 200, body = HostStateView),
        (status = 404, body = ErrorBody, description = "no such farm host"),
        (status = 409, body = ErrorBody, description = "the host is down or lost (it comes back up by itself), being evacuated, or the server's own"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn resume_host(
    State(manager): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let view = manager.resume_host(&name).await?;
    Ok((Extension(AuditTarget(name)), Json(view)).into_response())
}

/// Evacuate a farm host: drain it, then move every active, sleeping and archived VM to
/// the best other host (placement's rules), two at a time; its pool VMs are removed and
/// the pools refill elsewhere. Answers 202 with the `evacuate` task (percent: VMs handled
/// of all; the stage names the VM being moved; cancelling it starts no new move). The
/// task fails naming the VMs that could not move; the host stays draining.
#[utoipa::path(
    post,
    path = "/v1/hosts/{name}/evacuate",
    params(("name" = String, Path, description = "the farm host")),
    responses(
        (status = 202, body = hangar_api::AcceptedView, description = "the host is being evacuated by this task"),
        (status = 404, body = ErrorBody, description = "no such farm host"),
        (status = 409, body = ErrorBody, description = "the host is down or lost, being evacuated already, or the server's own"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn evacuate_host(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let mover = Arc::new(MigrationMover(manager.clone()));
    let task = crate::evacuation::evacuate(&manager, &name, &caller.user, mover).await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Extension(AuditTarget(name)),
        Json(hangar_api::AcceptedView { task }),
    )
        .into_response())
}

/// The host's last evacuation run by this server, VM by VM: from, to, outcome, error and
/// time (while it runs, as it stands).
#[utoipa::path(
    get,
    path = "/v1/hosts/{name}/evacuation",
    params(("name" = String, Path, description = "the farm host")),
    responses(
        (status = 200, body = EvacuationView),
        (status = 404, body = ErrorBody, description = "this server has no evacuation of that host on record"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn get_evacuation(
    State(manager): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<EvacuationView>, ApiError> {
    Ok(Json(manager.evacuation_report(&name)?))
}
