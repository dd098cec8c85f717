//! `POST /v1/placements`: where a VM would go now, and why (a dry run).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use hangar_api::{PlacementBody, PlacementView};

use crate::api::commands::{Command, Reply, RequestHandler};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json_body;
use crate::manager::Manager;

/// Where a VM of a service (or of a size) would be placed now, and why: the decision a
/// request or pool fill would make over the hosts' live facts. Nothing is made or reserved.
#[utoipa::path(
    post,
    path = "/v1/placements",
    request_body = PlacementBody,
    responses(
        (status = 200, body = PlacementView, description = "the host chosen, and why"),
        (status = 400, body = ErrorBody, description = "malformed body: no service and no size, a zero size, settings without a service"),
        (status = 404, body = ErrorBody, description = "no such service; alternatives given"),
        (status = 422, body = ErrorBody, description = "this combination will never be available"),
        (status = 503, body = ErrorBody, description = "no host can take it now (down, full, isolation); try again shortly"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn preview_placement(
    State(manager): State<Arc<Manager>>,
    body: axum::body::Bytes,
) -> Result<Json<PlacementView>, ApiError> {
    let body: PlacementBody = json_body(&body)?;
    match manager.handle(Command::PreviewPlacement(body)).await? {
        Reply::Placement(placement) => Ok(Json(placement)),
        other => Err(other.unexpected()),
    }
}
