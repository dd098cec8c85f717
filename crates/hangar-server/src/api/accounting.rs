//! `GET /v1/quotas`, `PUT /v1/quotas/{user}` and `GET /v1/usage`: quotas per user and
//! usage metering (see [`crate::quotas`] and [`crate::usage`]).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use hangar_api::{Limits, QuotaView, QuotasView, UsageQuery, UsageView};

use crate::api::auth::Caller;
use crate::api::commands::{Command, Reply, RequestHandler};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::json_body;
use crate::manager::Manager;

/// The default quota, and every user with a quota or with VMs: their limits and what
/// their VMs take (VMs being made included).
#[utoipa::path(
    get,
    path = "/v1/quotas",
    responses(
        (status = 200, body = QuotasView),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn list_quotas(
    State(manager): State<Arc<Manager>>,
) -> Result<Json<QuotasView>, ApiError> {
    match manager.handle(Command::ListQuotas).await? {
        Reply::Quotas(quotas) => Ok(Json(quotas)),
        other => Err(other.unexpected()),
    }
}

/// Set a user's quota (kept across restarts): most VMs, vCPUs, MiB of memory and bytes
/// of archives their VMs may take together; a limit left out or `null` is no limit.
/// Lowering it below what they hold takes nothing away; it refuses their next VMs (429).
#[utoipa::path(
    put,
    path = "/v1/quotas/{user}",
    request_body = Limits,
    params(("user" = String, Path, description = "the user (a VM's owner)")),
    responses(
        (status = 200, body = QuotaView),
        (status = 400, body = ErrorBody, description = "malformed body or user name"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn set_quota(
    State(manager): State<Arc<Manager>>,
    Path(user): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<QuotaView>, ApiError> {
    let limits: Limits = json_body(&body)?;
    match manager.handle(Command::SetQuota { user, limits }).await? {
        Reply::Quota(quota) => Ok(Json(quota)),
        other => Err(other.unexpected()),
    }
}

/// What VMs used in a window (VM-seconds by state, vCPU- and GiB-hours, archive
/// GB-hours), summed by user, service, host or VM, with its cost at the server's prices.
/// An admin sees everyone's; anyone else only their own VMs' time.
#[utoipa::path(
    get,
    path = "/v1/usage",
    params(UsageQuery),
    responses(
        (status = 200, body = UsageView),
        (status = 400, body = ErrorBody, description = "malformed since or by"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn get_usage(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<UsageView>, ApiError> {
    let command = Command::Usage {
        since: query.since,
        by: query.by.unwrap_or_default(),
        owner: (caller.role != hangar_core::Role::Admin).then_some(caller.user),
    };
    match manager.handle(command).await? {
        Reply::Usage(usage) => Ok(Json(usage)),
        other => Err(other.unexpected()),
    }
}
