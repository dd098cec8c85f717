//! Persistence: the server state table (VM, host, services, address, state), tasks and
//! their steps, hosts, templates and archives, behind one async [`Store`] trait with two
//! backends: [`SqliteStore`] (embedded, WAL mode; the default) and [`PgStore`] (a
//! PostgreSQL server, for several control-plane processes sharing one state).
//!
//! Every state change goes through [`Store::transition`], which checks
//! [`hangar_core::valid_transition`] inside a transaction, so concurrent writers cannot
//! move a VM along an edge the state machine does not have; [`Store::claim`] hands a ready
//! pool VM to exactly one claimer. Deleted VMs keep their row (the record of what existed);
//! listings leave them out unless asked.
//!
//! Both backends pass the same conformance suite (`conformance.rs`).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use hangar_core::Mode;
use hangar_core::VmState;
pub use hangar_core::alerts::Alert;
pub use hangar_core::quota::{Limits, Usage};
pub use hangar_core::usage::UsageEvent;

mod access;
mod alerts;
mod error;
mod lease;
mod postgres;
mod records;
mod sqlite;
mod stacks;

pub use access::{AuditRecord, IdempotencyRecord, TokenRecord, UserRecord};
pub use error::{BackendSource, Conflict, Entity, StoreError};
pub use lease::LeaseRecord;
pub use postgres::PgStore;
pub use records::{
    ArchiveRecord, HostRecord, HostState, HostUse, ImportRecord, StepOutcome, TaskRecord,
    TaskState, TaskStep, TaskUndo, TemplateRecord, VmMove, VmRecord,
};
pub use sqlite::SqliteStore;
pub use stacks::StackRecord;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Opens the store `location` names and migrates it: a `postgres://` or `postgresql://`
/// URL opens a [`PgStore`], anything else is the path of a SQLite file (created if
/// missing).
pub async fn open(location: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if is_postgres_url(location) {
        Ok(std::sync::Arc::new(PgStore::connect(location).await?))
    } else {
        Ok(std::sync::Arc::new(SqliteStore::open(
            std::path::Path::new(location),
        )?))
    }
}

/// `states` as an SQL list of literals (`'a', 'b'`), or `NULL` (matching nothing) when
/// empty. The names are the store's own constants, never input.
pub(crate) fn state_list(states: &[hangar_core::VmState]) -> String {
    if states.is_empty() {
        return "NULL".into();
    }
    states
        .iter()
        .map(|state| format!("'{}'", state.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `location` is a PostgreSQL URL (rather than a SQLite path).
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// hangar's persistent state. Every method is one short atomic operation; those that
/// name a record fail with [`StoreError::NotFound`] when it does not exist, unless they
/// return an `Option` or `bool` for it.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    // ---- VMs ----

    /// Adds a VM. [`Conflict::Exists`] when its id is taken.
    async fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError>;

    async fn vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError>;

    /// VMs in creation order; deleted ones only when `include_deleted`.
    async fn vms(&self, include_deleted: bool) -> Result<Vec<VmRecord>, StoreError>;

    /// The VMs (deleted ones left out) made for `owner`, in creation order.
    async fn vms_owned_by(&self, owner: &str) -> Result<Vec<VmRecord>, StoreError>;

    /// The VMs (deleted ones left out) recorded on host `host`, in creation order: what a
    /// host's heartbeat is checked against, without reading the whole farm's VMs.
    async fn vms_on_host(&self, host: &str) -> Result<Vec<VmRecord>, StoreError>;

    /// Per host, the count, vCPUs and memory of its VMs in one of `states`, summed by the
    /// store (no VM is read out): what placement weighs, at a cost that does not grow with
    /// the VMs' records. Hosts without such VMs are left out; ordered by host.
    async fn vm_use_by_host(&self, states: &[VmState]) -> Result<Vec<HostUse>, StoreError>;

    /// Active VMs offering `service` to shared requests with exactly this environment,
    /// in creation order.
    async fn shared_candidates(
        &self,
        service: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Vec<VmRecord>, StoreError> {
        Ok(self
            .vms(false)
            .await?
            .into_iter()
            .filter(|vm| {
                vm.state == VmState::Active
                    && vm.mode == Mode::Shared
                    && vm.services.iter().any(|s| s == service)
                    && vm.env == *env
            })
            .collect())
    }

    /// Moves a VM to `to`, if the state machine allows it from its current state (checked
    /// in the same transaction as the write), stamps `state_since_ms`, and sets or clears
    /// its error. Returns the updated record; [`Conflict::Transition`] when the edge does
    /// not exist.
    async fn transition(
        &self,
        id: &str,
        to: VmState,
        error: Option<&str>,
    ) -> Result<VmRecord, StoreError>;

    /// Claims a paused pool VM for a request: `ready` → `active`, out of its pool, with the
    /// given sharing mode and environment, marked used now. Of concurrent claimers exactly
    /// one wins; the others get [`Conflict::Transition`].
    async fn claim(
        &self,
        id: &str,
        mode: Mode,
        env: &BTreeMap<String, String>,
    ) -> Result<VmRecord, StoreError>;

    /// Takes a paused pool VM out of its pool for removal: `ready` → `deleted` in one step,
    /// only if it is still ready (a request may have claimed it since it was listed).
    /// Returns whether it was.
    async fn retire_ready(&self, id: &str) -> Result<bool, StoreError>;

    /// Records the host process and the launch spec of a VM.
    async fn set_launch(
        &self,
        id: &str,
        pid: Option<u32>,
        spec: &serde_json::Value,
    ) -> Result<(), StoreError>;

    /// Moves a VM to another host (a migration): host, process, launch record and direct
    /// endpoints written at once, only if it is still on `m.from` in state `m.state`
    /// (checked in the same statement). Returns whether it was moved; `false` when it was
    /// not there in that state any more (nothing written). [`StoreError::NotFound`] is not
    /// used: an unknown VM is `false` too.
    async fn move_vm(&self, m: &VmMove) -> Result<bool, StoreError>;

    /// Records what a VM offers after an OS image was attached to a shell: services, OS,
    /// endpoints and the direct endpoints behind them.
    async fn set_offer(
        &self,
        id: &str,
        services: &[String],
        os: &(String, String),
        endpoints: &BTreeMap<String, String>,
        direct_endpoints: &BTreeMap<String, String>,
    ) -> Result<(), StoreError>;

    async fn set_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), StoreError>;

    /// Gives a VM to another owner.
    async fn set_owner(&self, id: &str, owner: &str) -> Result<(), StoreError>;

    /// Marks a VM as used now.
    async fn touch(&self, id: &str) -> Result<(), StoreError>;

    /// Sets when a VM was last used (never earlier than it was).
    async fn set_last_used(&self, id: &str, at_ms: u64) -> Result<(), StoreError>;

    // ---- pools and policies ----

    /// Run-time pool bounds (name → (min, max)), overriding the catalog's.
    async fn pool_bounds(&self) -> Result<BTreeMap<String, (u32, u32)>, StoreError>;

    async fn set_pool_bounds(&self, name: &str, min: u32, max: u32) -> Result<(), StoreError>;

    /// Ready criteria set at run time (pool name → JSON).
    async fn pool_ready(&self) -> Result<BTreeMap<String, String>, StoreError>;

    /// Sets (or with `None` clears) a pool's run-time ready criterion, with its bounds.
    async fn set_pool_ready(
        &self,
        name: &str,
        min: u32,
        max: u32,
        ready: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Lifecycle policies set at run time (service → JSON).
    async fn policies(&self) -> Result<BTreeMap<String, String>, StoreError>;

    /// Sets a service's run-time policy (JSON), or with `None` goes back to the catalog's.
    async fn set_policy(&self, service: &str, policy: Option<&str>) -> Result<(), StoreError>;

    // ---- tasks ----

    /// Adds a task. [`Conflict::Exists`] when its id is taken.
    async fn insert_task(&self, task: &TaskRecord) -> Result<(), StoreError>;

    /// Updates a task's progress; `error` with a `Failed` state says why. `percent` is
    /// capped at 100. An ended state ([`TaskState::ended`]) also sets `ended_at_ms`.
    async fn update_task(
        &self,
        id: &str,
        state: TaskState,
        stage: &str,
        percent: u8,
        error: Option<&str>,
    ) -> Result<(), StoreError>;

    async fn set_task_vm(&self, id: &str, vm_id: &str) -> Result<(), StoreError>;

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;

    /// The most recent `limit` tasks, newest first.
    async fn tasks(&self, limit: u32) -> Result<Vec<TaskRecord>, StoreError>;

    /// Marks every task still `running` as failed with `reason`, and ends its open steps
    /// as failed (used at start-up: a task cannot survive the process that ran it).
    /// Returns how many tasks.
    async fn fail_running_tasks(&self, reason: &str) -> Result<usize, StoreError>;

    /// The tasks not ended (`running` or `rolling_back`), oldest first: at start-up, those
    /// a stopped server left to finish or undo.
    async fn unfinished_tasks(&self) -> Result<Vec<TaskRecord>, StoreError>;

    /// Appends an entry to task `task_id`'s undo journal; returns its number (1, 2, ...).
    /// [`StoreError::NotFound`] for an unknown task.
    async fn push_task_undo(&self, task_id: &str, action: &str) -> Result<u32, StoreError>;

    /// Task `task_id`'s undo journal, in the order it was recorded.
    async fn task_undos(&self, task_id: &str) -> Result<Vec<TaskUndo>, StoreError>;

    /// Marks journal entry `seq` of task `task_id` undone. [`StoreError::NotFound`] for
    /// an unknown entry.
    async fn mark_task_undone(&self, task_id: &str, seq: u32) -> Result<(), StoreError>;

    /// Starts the next step of a task at `at_ms`; returns its number (1, 2, ...).
    async fn start_task_step(
        &self,
        task_id: &str,
        stage: &str,
        percent: u8,
        at_ms: u64,
    ) -> Result<u32, StoreError>;

    /// Ends a step with its outcome. [`StoreError::NotFound`] for an unknown step.
    async fn end_task_step(
        &self,
        task_id: &str,
        step: u32,
        outcome: StepOutcome,
        error: Option<&str>,
        at_ms: u64,
    ) -> Result<(), StoreError>;

    /// A task's steps in order.
    async fn task_steps(&self, task_id: &str) -> Result<Vec<TaskStep>, StoreError>;

    // ---- hosts ----

    /// Adds a host or replaces what is known of it. A `draining` host stays `draining` when
    /// `up` is written (an agent registering again does not end a drain; only
    /// [`Store::change_host_state`] does); any other state is written as given.
    async fn upsert_host(&self, host: &HostRecord) -> Result<(), StoreError>;

    /// Sets host `name`'s state to `to` if it is `from` now, in one conditional write (an
    /// operator's drain or resume racing a heartbeat or the loss loop). Returns whether the
    /// host is in `to` now: true when it was `from` (or already `to`, so a retried write
    /// answers alike), false when it is in another state. [`StoreError::NotFound`] for no
    /// such host.
    async fn change_host_state(
        &self,
        name: &str,
        from: HostState,
        to: HostState,
    ) -> Result<bool, StoreError>;

    async fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError>;

    /// Hosts by name.
    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError>;

    /// Records a host's heartbeat: its state and facts now. As in [`Store::upsert_host`], a
    /// `draining` host stays `draining` when `up` is written.
    async fn heartbeat(
        &self,
        name: &str,
        state: HostState,
        facts: &serde_json::Value,
        at_ms: u64,
    ) -> Result<(), StoreError>;

    // ---- templates ----

    /// Adds a template or replaces the one with its key.
    async fn put_template(&self, template: &TemplateRecord) -> Result<(), StoreError>;

    async fn template(&self, key: &str) -> Result<Option<TemplateRecord>, StoreError>;

    /// Templates by key.
    async fn templates(&self) -> Result<Vec<TemplateRecord>, StoreError>;

    /// Marks a template as used at `at_ms` (never earlier than it was).
    async fn template_used(&self, key: &str, at_ms: u64) -> Result<(), StoreError>;

    /// Forgets a template; returns whether it was known.
    async fn remove_template(&self, key: &str) -> Result<bool, StoreError>;

    // ---- imported machines ----

    /// Records an imported machine; [`StoreError::Conflict`] when its name is taken.
    async fn insert_import(&self, import: &ImportRecord) -> Result<(), StoreError>;

    async fn import(&self, name: &str) -> Result<Option<ImportRecord>, StoreError>;

    /// Imported machines by name.
    async fn imports(&self) -> Result<Vec<ImportRecord>, StoreError>;

    /// Forgets an imported machine; returns whether it was known.
    async fn remove_import(&self, name: &str) -> Result<bool, StoreError>;

    // ---- archives ----

    /// Records a VM's archive, replacing an earlier one.
    async fn put_archive(&self, archive: &ArchiveRecord) -> Result<(), StoreError>;

    async fn archive(&self, vm_id: &str) -> Result<Option<ArchiveRecord>, StoreError>;

    /// Archives by VM id.
    async fn archives(&self) -> Result<Vec<ArchiveRecord>, StoreError>;

    /// Forgets a VM's archive; returns whether there was one.
    async fn remove_archive(&self, vm_id: &str) -> Result<bool, StoreError>;

    // ---- leases ----

    /// Takes or renews lease `name` for `holder` until `now_ms + ttl_ms`: succeeds when
    /// the lease is free, expired (`expires_ms <= now_ms`) or already held by `holder`,
    /// and returns whether it did. One conditional write: of concurrent callers (in any
    /// process sharing the store) with different holders, at most one takes a lease.
    /// Times are the callers' clocks, so replicas sharing a lease need clocks that agree
    /// to well within `ttl_ms`.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError>;

    /// Gives lease `name` up, if `holder` holds it (expired or not); returns whether it
    /// did. Anyone may take it at once afterwards.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError>;

    /// Lease `name` as stored (possibly expired), or `None` when nobody has taken it or
    /// it was released.
    async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError>;

    // ---- quotas and usage ----

    /// Quotas set per user (a VM's owner), by user.
    async fn quotas(&self) -> Result<Vec<(String, Limits)>, StoreError>;

    /// Sets a user's quota, replacing theirs; `None` removes it (the default applies).
    async fn set_quota(&self, owner: &str, limits: Option<&Limits>) -> Result<(), StoreError>;

    /// What the VMs of each owner take, summed by the store ([`hangar_core::quota`]): VMs
    /// not in a pool and neither deleted nor failed; of those, the vCPUs and memory of the
    /// ones taking room on a host (creating, booting, ready, active, sleeping) and the
    /// archive size (its [`ArchiveRecord`]) of the archived ones. By owner; only `owner`'s
    /// when given (an owner without such VMs is left out).
    async fn use_by_owner(&self, owner: Option<&str>) -> Result<Vec<(String, Usage)>, StoreError>;

    /// The recorded state changes ([`UsageEvent`]) of every VM alive at `since_ms` or later
    /// (not deleted or failed before it), in order of VM and of record. Every change of a
    /// VM's state, owner, host, services or size is recorded in the statement that makes
    /// it, so none is missed however the change is made.
    async fn usage_events(&self, since_ms: u64) -> Result<Vec<UsageEvent>, StoreError>;

    // ---- users and API tokens ----

    /// Adds a user. [`Conflict::Exists`] when the name is taken.
    async fn insert_user(&self, user: &UserRecord) -> Result<(), StoreError>;

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;

    /// Users by name.
    async fn users(&self) -> Result<Vec<UserRecord>, StoreError>;

    /// Adds a token. [`Conflict::Exists`] when its id is taken; [`StoreError::NotFound`]
    /// when its user does not exist.
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Tokens (revoked and expired ones too) in creation order: `user`'s, or everyone's.
    async fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, StoreError>;

    /// Revokes a token at `at_ms`; revoking it again keeps the first time. Returns the
    /// token as it is now.
    async fn revoke_token(&self, id: &str, at_ms: u64) -> Result<TokenRecord, StoreError>;

    /// Records that a token was used at `at_ms` (never earlier than it was).
    async fn token_used(&self, id: &str, at_ms: u64) -> Result<(), StoreError>;

    // ---- audit log ----

    /// Appends an entry (its `seq` is assigned here); returns the `seq` given.
    async fn insert_audit(&self, entry: &AuditRecord) -> Result<u64, StoreError>;

    /// The latest `limit` entries made at or after `since_ms`, oldest first.
    async fn audit(&self, since_ms: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError>;

    // ---- idempotency keys ----

    /// Claims `key` for `user`'s call: one conditional write. Returns `None` when the
    /// caller now holds it (the key was new, or its earlier holder left it unanswered
    /// since before `stale_before_ms`), otherwise the record as stored (answered, or
    /// still running under another call). Of concurrent claimers exactly one gets `None`.
    async fn claim_idempotency_key(
        &self,
        user: &str,
        key: &str,
        fingerprint: &str,
        now_ms: u64,
        stale_before_ms: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Stores the answer of the call holding `key`.
    async fn answer_idempotency_key(
        &self,
        user: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError>;

    /// Forgets a claimed key that has no answer (its call failed; a retry runs again).
    async fn release_idempotency_key(&self, user: &str, key: &str) -> Result<(), StoreError>;

    // ---- stacks ----

    /// Records a new stack; [`StoreError::Conflict`] when its name or its segment is
    /// taken by another stack.
    async fn insert_stack(&self, stack: &StackRecord) -> Result<(), StoreError>;

    async fn stack(&self, name: &str) -> Result<Option<StackRecord>, StoreError>;

    /// Every stack, by name.
    async fn stacks(&self) -> Result<Vec<StackRecord>, StoreError>;

    /// Writes a stack's spec, state, members and update time (its name, owner, segment and
    /// creation time stay); [`StoreError::NotFound`] when there is no such stack.
    async fn update_stack(&self, stack: &StackRecord) -> Result<(), StoreError>;

    /// Forgets a stack; returns whether it was known.
    async fn remove_stack(&self, name: &str) -> Result<bool, StoreError>;

    // ---- alerts ----

    /// Every alert kept (pending, firing and resolved), by key.
    async fn alerts(&self) -> Result<Vec<Alert>, StoreError>;

    /// Writes `alert`, inserted or replacing the one of its key.
    async fn put_alert(&self, alert: &Alert) -> Result<(), StoreError>;

    /// Removes the alert of `key`; returns whether there was one.
    async fn remove_alert(&self, key: &str) -> Result<bool, StoreError>;
}

/// The states in which a VM counts with its vCPUs and memory against its owner's quota.
pub const QUOTA_ROOM_STATES: &str = "'creating', 'booting', 'ready', 'active', 'sleeping'";

/// A recorded services column (a JSON list) as usage metering names it: joined with `+`.
pub(crate) fn joined_services(json: &str) -> String {
    serde_json::from_str::<Vec<String>>(json)
        .map(|services| services.join("+"))
        .unwrap_or_else(|_| json.to_owned())
}

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
