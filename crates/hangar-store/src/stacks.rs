//! Stacks as kept in the store (`hangar_core::stack`): several VMs made, slept, woken and
//! deleted as one unit, each stack on its own private /24.

use std::collections::BTreeMap;

use hangar_core::stack::StackState;
use serde::{Deserialize, Serialize};

use crate::StoreError;

pub(crate) const STACK_COLUMNS: &str =
    "name, owner, spec, segment, state, members, created_at_ms, updated_at_ms";

/// A stack: its file as given, its segment, its state and its members' VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackRecord {
    /// Unique among stacks.
    pub name: String,
    /// The user who made it (its members are theirs).
    pub owner: String,
    /// The stack file as given (`hangar_core::stack::StackSpec`, JSON).
    pub spec: serde_json::Value,
    /// The stack's private /24 (`10.213.N.0/24`); unique among stacks.
    pub segment: String,
    pub state: StackState,
    /// Member name → VM id, for the members made so far.
    pub members: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// A stack's columns as read, before decoding.
pub(crate) struct StackColumns {
    pub name: String,
    pub owner: String,
    pub spec: String,
    pub segment: String,
    pub state: String,
    pub members: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl StackColumns {
    pub(crate) fn decode(self) -> Result<StackRecord, StoreError> {
        Ok(StackRecord {
            state: StackState::parse(&self.state)
                .ok_or_else(|| StoreError::corrupt(&self.state))?,
            spec: serde_json::from_str(&self.spec)?,
            members: serde_json::from_str(&self.members)?,
            name: self.name,
            owner: self.owner,
            segment: self.segment,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

/// A stack's members as stored (a JSON object).
pub(crate) fn members_json(stack: &StackRecord) -> String {
    serde_json::to_string(&stack.members).expect("string maps serialize")
}
