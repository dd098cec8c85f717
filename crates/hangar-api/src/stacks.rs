//! `POST /v1/stacks`, `GET /v1/stacks`, `GET /v1/stacks/{name}`, `DELETE /v1/stacks/{name}`,
//! `POST /v1/stacks/{name}/sleep|wake`: several services deployed, slept, woken and
//! deleted as one unit, each member its own VM on the stack's private segment (issue 18).
//! The body of `POST /v1/stacks` is a stack file as JSON ([`StackSpec`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use hangar_core::stack::{MemberSpec, StackSpec, StackState};

/// A stack: its state, segment and members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StackView {
    pub name: String,
    pub owner: String,
    pub state: StackState,
    /// The stack's private /24.
    pub segment: String,
    /// In the order they are made and woken (peers first).
    pub members: Vec<StackMemberView>,
    /// The task that is making it (while `creating`) or made it.
    pub task: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// One member of a stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StackMemberView {
    pub name: String,
    pub service: String,
    /// Its VM, once made.
    pub vm: Option<String>,
    /// Its VM's state (`active`, `sleeping`, …), once made.
    pub state: Option<String>,
    /// Private address on the segment (`10.213.0.10`); also its host name `name`.
    pub address: String,
    pub mac: String,
    /// What it may reach besides its peers (`segment` by default: nothing else).
    pub egress: crate::vms::EgressView,
    /// Stable endpoints of its public ports, by port name (`127.0.0.1:40001`); the
    /// member's other ports are reachable only from the segment.
    pub endpoints: BTreeMap<String, String>,
    /// The peers its settings refer to.
    pub peers: Vec<String>,
}

/// The answer to `POST /v1/stacks` (202): the stack as recorded and the `stack` task making
/// it (follow it with `GET /v1/tasks/{id}`; cancel it to undo everything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StackAccepted {
    pub task: String,
    pub stack: StackView,
}
