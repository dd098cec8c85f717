//! Users, API tokens and the audit log: `/v1/users`, `/v1/tokens`, `/v1/whoami`,
//! `/v1/audit`.

use hangar_core::Role;
use serde::{Deserialize, Serialize};

/// `POST /v1/users`: a new user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    /// 1-64 characters of `a-z A-Z 0-9 . _ -`.
    pub name: String,
    pub role: Role,
}

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub name: String,
    pub role: Role,
    /// RFC 3339.
    pub created_at: String,
}

/// `POST /v1/tokens`: a new API token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// Whose token; none: the caller's own. Only an admin names another user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Its scope; none: its user's role. Never more than its user's role, nor the
    /// caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// How long it lasts (`30d`, `12h`); none: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
}

/// An API token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    pub user: String,
    pub role: Role,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; none: never.
    pub expires_at: Option<String>,
    /// RFC 3339, when revoked.
    pub revoked_at: Option<String>,
    /// RFC 3339 (recorded at most about once a minute).
    pub last_used_at: Option<String>,
}

/// A token just made: the only answer that carries its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedTokenView {
    /// The token to send as `Authorization: Bearer <token>`; shown this once.
    pub token: String,
    pub info: TokenView,
}

/// `GET /v1/whoami`: who the token speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoamiView {
    pub user: String,
    /// The token's scope (its user's role or less).
    pub role: Role,
    pub token: String,
}

/// One mutating call in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditView {
    pub seq: u64,
    /// RFC 3339.
    pub at: String,
    /// The caller: a user, `farm` (the farm token) or `-` (not authenticated).
    pub user: String,
    pub method: String,
    /// The route as `/v1/openapi.json` names it.
    pub route: String,
    /// What it acted on (a VM, a service, a user, a token), when known.
    pub target: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

/// `GET /v1/audit` query string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Entries from this long ago (`1h`, `2d`) or this RFC 3339 time on; none: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The latest this many (at most 10000; default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}
