//! The store's one error type, the same for every backend.

use hangar_core::state::InvalidTransition;

/// What a [`crate::Store`] operation can fail with. No backend's own error type appears
/// here: a database error is a [`StoreError::Backend`] that keeps it as its source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The operation conflicts with what is stored (a state change the state machine does
    /// not allow, a claim someone else won, an id already taken). Retrying the same call
    /// gives the same answer until the stored state changes.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The record the operation names does not exist.
    #[error("no {kind} {id}")]
    NotFound { kind: Entity, id: String },
    /// The database failed or holds something this hangar cannot read.
    #[error("{what}")]
    Backend {
        what: &'static str,
        #[source]
        source: BackendSource,
    },
    /// No database server that takes writes answered: it is down, the database is failing
    /// over to a standby, or the server reached is read-only. The store retried for a
    /// short while first (PostgreSQL: `postgres::retry`). Try again shortly. A write that
    /// fails so may or may not have happened (its commit's answer may have been lost):
    /// read before acting on the assumption that it did not.
    #[error("{what}")]
    Unavailable {
        what: &'static str,
        #[source]
        source: BackendSource,
    },
    /// The database was migrated by a newer hangar; this one refuses to touch it.
    #[error(
        "database schema version {found} is newer than this hangar ({supported}); upgrade hangar"
    )]
    SchemaTooNew { found: i64, supported: i64 },
}

/// The database's own error, opaque to callers (read it through `Error::source`).
pub type BackendSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an operation conflicts with the stored state.
#[derive(Debug, thiserror::Error)]
pub enum Conflict {
    /// The VM's current state has no edge to the requested one (for a claim: the pool VM
    /// is no longer `ready`, another request took it).
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// A record with this key exists already.
    #[error("{kind} {id} exists already")]
    Exists { kind: Entity, id: String },
}

/// The kinds of record the store keeps, for error messages and matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Vm,
    Task,
    TaskStep,
    TaskUndo,
    Host,
    Template,
    Archive,
    User,
    Token,
    IdempotencyKey,
    Import,
    Stack,
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Entity::Vm => "VM",
            Entity::Task => "task",
            Entity::TaskStep => "task step",
            Entity::TaskUndo => "task undo entry",
            Entity::Host => "host",
            Entity::Template => "template",
            Entity::Archive => "archive",
            Entity::User => "user",
            Entity::Token => "token",
            Entity::IdempotencyKey => "idempotency key",
            Entity::Import => "imported machine",
            Entity::Stack => "stack",
        })
    }
}

impl StoreError {
    pub(crate) fn not_found(kind: Entity, id: impl Into<String>) -> StoreError {
        StoreError::NotFound {
            kind,
            id: id.into(),
        }
    }

    pub(crate) fn exists(kind: Entity, id: impl Into<String>) -> StoreError {
        StoreError::Conflict(Conflict::Exists {
            kind,
            id: id.into(),
        })
    }

    pub(crate) fn backend(what: &'static str, source: impl Into<BackendSource>) -> StoreError {
        StoreError::Backend {
            what,
            source: source.into(),
        }
    }

    /// A stored value this hangar cannot decode.
    pub(crate) fn corrupt(value: &str) -> StoreError {
        StoreError::backend("stored value is not valid", format!("{value:?}"))
    }

    /// Whether no database server that takes writes answered ([`StoreError::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// Whether this is a state-machine conflict (the VM moved on, or another request
    /// claimed it first).
    pub fn is_transition_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(Conflict::Transition(_)))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(err: serde_json::Error) -> StoreError {
        StoreError::backend("stored JSON is malformed", err)
    }
}

impl From<InvalidTransition> for StoreError {
    fn from(err: InvalidTransition) -> StoreError {
        StoreError::Conflict(Conflict::Transition(err))
    }
}
