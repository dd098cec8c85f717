//! `/v1/whoami`, `/v1/users`, `/v1/tokens` and `/v1/audit`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use hangar_api::{
    AuditQuery, AuditView, CreatedTokenView, TokenBody, TokenView, UserBody, UserView, WhoamiView,
};
use hangar_core::Role;
use hangar_store::{TokenRecord, UserRecord, now_ms};

use super::{AuditTarget, Caller, tokens};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::{json_body, rfc3339};
use crate::manager::Manager;

/// The most audit entries one call answers.
const AUDIT_LIMIT_MAX: u32 = 10_000;

fn user_view(user: UserRecord) -> UserView {
    UserView {
        name: user.name,
        role: user.role,
        created_at: rfc3339(user.created_at_ms),
    }
}

fn token_view(token: TokenRecord) -> TokenView {
    TokenView {
        id: token.id,
        user: token.user,
        role: token.role,
        created_at: rfc3339(token.created_at_ms),
        expires_at: token.expires_at_ms.map(rfc3339),
        revoked_at: token.revoked_at_ms.map(rfc3339),
        last_used_at: token.last_used_at_ms.map(rfc3339),
    }
}

/// Who the token speaks for.
#[utoipa::path(
    get,
    path = "/v1/whoami",
    responses((status = 200, body = WhoamiView), (status = 401, body = ErrorBody, description = "no or a bad token"))
)]
pub(crate) async fn whoami(Extension(caller): Extension<Caller>) -> Json<WhoamiView> {
    Json(WhoamiView {
        user: caller.user,
        role: caller.role,
        token: caller.token_id,
    })
}

/// Users by name (admin).
#[utoipa::path(
    get,
    path = "/v1/users",
    responses(
        (status = 200, body = [UserView]),
        (status = 401, body = ErrorBody, description = "no or a bad token"),
        (status = 403, body = ErrorBody, description = "not an admin"),
    )
)]
pub(crate) async fn list_users(
    State(manager): State<Arc<Manager>>,
) -> Result<Json<Vec<UserView>>, ApiError> {
    let users = manager.store().users().await?;
    Ok(Json(users.into_iter().map(user_view).collect()))
}

/// Whether `name` may name a user: 1-64 of `a-z A-Z 0-9 . _ -`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Adds a user (admin); give them a token with `POST /v1/tokens`.
#[utoipa::path(
    post,
    path = "/v1/users",
    request_body = UserBody,
    responses(
        (status = 201, body = UserView),
        (status = 400, body = ErrorBody, description = "malformed body or name"),
        (status = 401, body = ErrorBody, description = "no or a bad token"),
        (status = 403, body = ErrorBody, description = "not an admin"),
        (status = 409, body = ErrorBody, description = "the name is taken"),
    )
)]
pub(crate) async fn add_user(
    State(manager): State<Arc<Manager>>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let body: UserBody = json_body(&body)?;
    if !valid_name(&body.name) {
        return Err(ApiError::BadRequest(format!(
            "user name {:?}: 1-64 characters of a-z A-Z 0-9 . _ -",
            body.name
        )));
    }
    let user = UserRecord {
        name: body.name,
        role: body.role,
        created_at_ms: now_ms(),
    };
    manager.store().insert_user(&user).await?;
    let target = AuditTarget(user.name.clone());
    Ok((
        StatusCode::CREATED,
        Extension(target),
        Json(user_view(user)),
    ))
}

/// The caller's tokens (an admin's: everyone's), never their secrets.
#[utoipa::path(
    get,
    path = "/v1/tokens",
    responses((status = 200, body = [TokenView]), (status = 401, body = ErrorBody, description = "no or a bad token"))
)]
pub(crate) async fn list_tokens(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let whose = (caller.role != Role::Admin).then_some(caller.user.as_str());
    let tokens = manager.store().tokens(whose).await?;
    Ok(Json(tokens.into_iter().map(token_view).collect()))
}

/// Makes a token: for the caller, or (admin) for any user; scoped to at most its user's
/// role and the caller's. Its secret is in this answer only.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    request_body = TokenBody,
    responses(
        (status = 201, body = CreatedTokenView),
        (status = 400, body = ErrorBody, description = "malformed body or duration"),
        (status = 401, body = ErrorBody, description = "no or a bad token"),
        (status = 403, body = ErrorBody, description = "for another user (not an admin), or a role above the user's or the caller's"),
        (status = 404, body = ErrorBody, description = "no such user"),
    )
)]
pub(crate) async fn create_token(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let body: TokenBody = if body.is_empty() {
        TokenBody::default()
    } else {
        json_body(&body)?
    };
    let name = body.user.unwrap_or_else(|| caller.user.clone());
    if name != caller.user && caller.role != Role::Admin {
        return Err(ApiError::Forbidden(
            "only an admin makes tokens for other users".into(),
        ));
    }
    let user = manager
        .store()
        .user(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            message: format!("no user {name}"),
            alternatives: Vec::new(),
        })?;
    let role = body.role.unwrap_or(user.role.min(caller.role));
    if !user.role.covers(role) || !caller.role.covers(role) {
        return Err(ApiError::Forbidden(format!(
            "a token of role {role} for {} ({}) cannot be made by a token of role {}",
            user.name, user.role, caller.role
        )));
    }
    let now = now_ms();
    let expires_at_ms = body
        .expires_in
        .map(|text| {
            humantime::parse_duration(&text)
                .map(|d| now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
                .map_err(|err| {
                    ApiError::BadRequest(format!("expires_in: {text:?} is not a duration: {err}"))
                })
        })
        .transpose()?;
    let minted = tokens::mint(&user.name, role, expires_at_ms, now);
    manager.store().insert_token(&minted.record).await?;
    let target = AuditTarget(minted.record.id.clone());
    Ok((
        StatusCode::CREATED,
        Extension(target),
        Json(CreatedTokenView {
            token: minted.text,
            info: token_view(minted.record),
        }),
    ))
}

/// Revokes a token (the caller's own; an admin: any). Refused from now on.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    params(("id" = String, Path, description = "the token's id (the part after hgr_)")),
    responses(
        (status = 200, body = TokenView, description = "the token as revoked"),
        (status = 401, body = ErrorBody, description = "no or a bad token"),
        (status = 404, body = ErrorBody, description = "no such token of the caller's"),
    )
)]
pub(crate) async fn revoke_token(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let not_found = || ApiError::NotFound {
        message: format!("no token {id}"),
        alternatives: Vec::new(),
    };
    let token = manager.store().token(&id).await?.ok_or_else(not_found)?;
    if caller.role != Role::Admin && token.user != caller.user {
        return Err(not_found());
    }
    let revoked = manager.store().revoke_token(&id, now_ms()).await?;
    manager.auth.forget(&id);
    Ok(Json(token_view(revoked)))
}

/// `since` as milliseconds since the epoch: a duration ago (`1h`) or an RFC 3339 time.
fn since_ms(since: &str, now: u64) -> Result<u64, ApiError> {
    if let Ok(ago) = humantime::parse_duration(since) {
        return Ok(now.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)));
    }
    let at = humantime::parse_rfc3339_weak(since).map_err(|_| {
        ApiError::BadRequest(format!(
            "since: {since:?} is neither a duration (1h) nor an RFC 3339 time"
        ))
    })?;
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0))
}

/// The audit log (admin): the latest mutating calls, oldest first.
#[utoipa::path(
    get,
    path = "/v1/audit",
    params(AuditQuery),
    responses(
        (status = 200, body = [AuditView]),
        (status = 400, body = ErrorBody, description = "malformed query string"),
        (status = 401, body = ErrorBody, description = "no or a bad token"),
        (status = 403, body = ErrorBody, description = "not an admin"),
    )
)]
pub(crate) async fn audit(
    State(manager): State<Arc<Manager>>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    let since = match &query.since {
        Some(since) => since_ms(since, now_ms())?,
        None => 0,
    };
    let limit = query.limit.unwrap_or(1000).clamp(1, AUDIT_LIMIT_MAX);
    let entries = manager.store().audit(since, limit).await?;
    Ok(Json(
        entries
            .into_iter()
            .map(|entry| AuditView {
                seq: entry.seq,
                at: rfc3339(entry.at_ms),
                user: entry.user,
                method: entry.method,
                route: entry.route,
                target: entry.target,
                status: entry.status,
            })
            .collect(),
    ))
}
