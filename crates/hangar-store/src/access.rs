//! Who uses hangar and what they did: users, their API tokens (stored as hashes), the
//! audit log of mutating calls, and the answers kept for idempotency keys.

use hangar_core::Role;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// A user: a name and a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub role: Role,
    pub created_at_ms: u64,
}

/// An API token. The secret itself is never stored: only the SHA-256 of it (`hash`, hex),
/// which the server compares in constant time with the hash of what a caller presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public part of the token (`hgr_<id>_<secret>`): how it is found.
    pub id: String,
    /// The user it speaks for.
    pub user: String,
    /// What it may do: its user's role or less.
    pub role: Role,
    /// SHA-256 of the whole token text, lowercase hex.
    pub hash: String,
    pub created_at_ms: u64,
    /// From this instant on the token is refused; `None`: never.
    pub expires_at_ms: Option<u64>,
    /// When it was revoked; a revoked token is refused.
    pub revoked_at_ms: Option<u64>,
    /// When it last authenticated a call (recorded at most about once a minute).
    pub last_used_at_ms: Option<u64>,
}

impl TokenRecord {
    /// Whether the token is accepted at `now_ms`: not revoked and not expired.
    pub fn usable_at(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|at| now_ms < at)
    }
}

/// One mutating call as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its place in the log (assigned by the store on insert; ignored there).
    pub seq: u64,
    pub at_ms: u64,
    /// Who: a user name, `farm` for the farm token, `-` for a caller not authenticated.
    pub user: String,
    pub method: String,
    /// The route as the API document names it (`/v1/vms/{id}`).
    pub route: String,
    /// What it acted on (a VM, a service, a token id), when known.
    pub target: Option<String>,
    /// The HTTP status it was answered with.
    pub status: u16,
}

/// An idempotency key as stored: claimed by the first call, then its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub user: String,
    pub key: String,
    /// A digest of the request the key was first used with; another request under the
    /// same key is refused.
    pub fingerprint: String,
    pub created_at_ms: u64,
    /// The first call's answer (status and JSON body); `None` while it runs.
    pub answer: Option<(u16, String)>,
}

pub(crate) fn parse_role(text: &str) -> Result<Role, StoreError> {
    text.parse().map_err(|_| StoreError::corrupt(text))
}
