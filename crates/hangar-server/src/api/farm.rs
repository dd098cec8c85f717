//! The farm's routes: agents registering and reporting (farm token), and the hosts as
//! listed.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use hangar_api::{Heartbeat, HeartbeatReply, HostRegistration, HostView};

use crate::api::commands::{Command, Reply, RequestHandler};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::farm_auth::FarmCaller;
use crate::api::json_body;
use crate::manager::Manager;

/// The hosts VMs run on: the server's own (single-node mode) and the farm's, with state,
/// capacity, use, load, cost, labels and last heartbeat.
#[utoipa::path(
    get,
    path = "/v1/hosts",
    responses(
        (status = 200, body = [HostView]),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn list_hosts(
    State(manager): State<Arc<Manager>>,
) -> Result<Json<Vec<HostView>>, ApiError> {
    match manager.handle(Command::ListHosts).await? {
        Reply::Hosts(hosts) => Ok(Json(hosts)),
        other => Err(other.unexpected()),
    }
}

/// An agent registers its host (farm token as bearer token). The reply names VMs the host
/// must destroy (fencing) and the control plane's addresses.
#[utoipa::path(
    post,
    path = "/v1/hosts",
    request_body = HostRegistration,
    responses(
        (status = 200, body = HeartbeatReply),
        (status = 400, body = ErrorBody, description = "malformed registration"),
        (status = 401, body = ErrorBody, description = "no or a wrong farm token"),
        (status = 409, body = ErrorBody, description = "another agent that is up holds the name"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    ),
    security(("farm_token" = []))
)]
pub(crate) async fn register_host(
    _caller: FarmCaller,
    State(manager): State<Arc<Manager>>,
    body: axum::body::Bytes,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let registration: HostRegistration = json_body(&body)?;
    match manager.handle(Command::RegisterHost(registration)).await? {
        Reply::HostReply(reply) => Ok(Json(reply)),
        other => Err(other.unexpected()),
    }
}

/// An agent's heartbeat: its facts and VMs now (farm token as bearer token).
#[utoipa::path(
    post,
    path = "/v1/hosts/{name}/heartbeat",
    request_body = Heartbeat,
    params(("name" = String, Path, description = "the host")),
    responses(
        (status = 200, body = HeartbeatReply),
        (status = 400, body = ErrorBody, description = "malformed heartbeat"),
        (status = 401, body = ErrorBody, description = "no or a wrong farm token"),
        (status = 404, body = ErrorBody, description = "not registered (or registered again since): register"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    ),
    security(("farm_token" = []))
)]
pub(crate) async fn host_heartbeat(
    _caller: FarmCaller,
    State(manager): State<Arc<Manager>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let heartbeat: Heartbeat = json_body(&body)?;
    match manager
        .handle(Command::HostHeartbeat { name, heartbeat })
        .await?
    {
        Reply::HostReply(reply) => Ok(Json(reply)),
        other => Err(other.unexpected()),
    }
}
