//! The web console's routes: `/v1/session` (sign-in for a cookie), `/v1/events` (what
//! changed, as server-sent events) and a request answered before it finishes.

use hangar_core::Role;
use serde::{Deserialize, Serialize};

/// `POST /v1/session`: sign in with an API token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    /// An API token (`hgr_...`); the session gets its user and role.
    pub token: String,
}

/// A web session: who is signed in, until when, and the value of the `X-Hangar-CSRF`
/// header that requests changing something must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionView {
    pub user: String,
    pub role: Role,
    /// Send as `X-Hangar-CSRF` with every request but GET, HEAD and OPTIONS.
    pub csrf: String,
    /// RFC 3339: when the session ends (sign in again then).
    pub expires_at: String,
}

/// `POST /v1/requests` with `Prefer: respond-async`: the request goes on as this task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AcceptedView {
    /// The creation task (`GET /v1/tasks/{id}`; its `vm` is set when it succeeds).
    pub task: String,
}

/// `event: vm` of `GET /v1/events`: a VM appeared, changed state or went (`state`
/// `deleted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmEvent {
    pub id: String,
    pub state: String,
    pub owner: String,
}

/// `event: task`: a task began or moved on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskEvent {
    pub id: String,
    pub state: String,
    pub stage: String,
    pub percent: u8,
    pub vm: Option<String>,
}

/// `event: pool` (admins): a pool's counts changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolEvent {
    pub name: String,
    pub ready: u32,
    pub booting: u32,
    pub target: u32,
}

/// `event: host` (admins): a farm host's record changed (state, load, VMs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostEvent {
    pub name: String,
}

/// `event: template` (admins): a service's template appeared, changed or went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateEvent {
    pub service: String,
}
