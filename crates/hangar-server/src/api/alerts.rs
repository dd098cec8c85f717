//! `GET /v1/alerts`: the alerts the leader keeps in the store (see [`crate::alerts`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use hangar_api::{AlertQuery, AlertView};

use crate::api::commands::{Command, Reply, RequestHandler};
use crate::api::error::{ApiError, ErrorBody};
use crate::manager::Manager;

/// Firing alerts (host down, pool empty while requested, host disk or memory, pool
/// memory budget, VMs crashing, failed migrations), firing first; with `all=true`,
/// pending and resolved ones too. Every replica answers the same (they are kept in the
/// store).
#[utoipa::path(
    get,
    path = "/v1/alerts",
    params(AlertQuery),
    responses(
        (status = 200, body = Vec<AlertView>),
        (status = 400, body = ErrorBody, description = "malformed query string"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn list_alerts(
    State(manager): State<Arc<Manager>>,
    Query(query): Query<AlertQuery>,
) -> Result<Json<Vec<AlertView>>, ApiError> {
    match manager
        .handle(Command::ListAlerts { all: query.all })
        .await?
    {
        Reply::Alerts(alerts) => Ok(Json(alerts)),
        other => Err(other.unexpected()),
    }
}
