//! `GET /metrics`: the server's metrics in Prometheus's text format (see
//! [`crate::metrics`] for what it holds). It shows the farm's shape (hosts, their load,
//! VMs by state, pools), so it wants the metrics token (`DATA_DIR/metrics.token`, the
//! one credential a scraper needs and all it opens) or an admin's token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::api::commands::{Command, Reply, RequestHandler};
use crate::api::error::{ApiError, ErrorBody};
use crate::manager::Manager;

/// The server's metrics, for Prometheus: what this server recorded (grants, request and
/// wake latencies, task outcomes, migrations) and what the store says now (VMs by host and
/// state, pools, hosts, archives). Wants the metrics token or an admin's token.
#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        (status = 200, body = String, content_type = "text/plain; version=0.0.4; charset=utf-8", description = "the metrics in Prometheus's text exposition format"),
        (status = 401, body = ErrorBody, description = "no token, or not the metrics token nor a valid API token"),
        (status = 403, body = ErrorBody, description = "a token whose role is not admin"),
        (status = 500, body = ErrorBody, description = "the store could not be read"),
    ),
    security(("metrics_token" = []), ("api_token" = []))
)]
pub(crate) async fn metrics(
    State(manager): State<Arc<Manager>>,
) -> Result<axum::response::Response, ApiError> {
    match manager.handle(Command::Metrics).await? {
        Reply::Metrics(page) => Ok((
            [(header::CONTENT_TYPE, hangar_host::metrics::CONTENT_TYPE)],
            page,
        )
            .into_response()),
        other => Err(other.unexpected()),
    }
}
