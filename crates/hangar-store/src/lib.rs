//! Persistence: the server state table (seed 000 FIG. 4: VM, host, services, address,
//! state) and tasks, in SQLite (embedded, WAL mode).
//!
//! Every state change goes through [`Store::transition`], which checks
//! [`hangar_core::valid_transition`] inside a transaction, so concurrent writers cannot
//! move a VM along an edge the state machine does not have. Deleted VMs keep their row (the
//! record of what existed); listings leave them out unless asked.
//!
//! Calls are synchronous and short (one indexed statement or a small transaction); async
//! callers may call them directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hangar_core::state::{InvalidTransition, check_transition};
use hangar_core::{Mode, VmState};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

mod schema;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON is malformed")]
    Json(#[from] serde_json::Error),
    #[error("no VM {0}")]
    NoVm(String),
    #[error("no task {0}")]
    NoTask(String),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("stored value {0:?} is not valid")]
    Corrupt(String),
    #[error(
        "database schema version {found} is newer than this hangar ({supported}); upgrade hangar"
    )]
    SchemaTooNew { found: i64, supported: i64 },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One row of the state table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    /// Host the VM runs on (`local` in single-node mode).
    pub host: String,
    /// Services the VM offers.
    pub services: Vec<String>,
    /// Environment the VM was made for (shared requests only match equal environments).
    pub env: BTreeMap<String, String>,
    pub mode: Mode,
    pub owner: String,
    pub state: VmState,
    /// Port name → `HOST:PORT` clients are given: stable while the VM sleeps, is archived
    /// and wakes (hangar's forwarder holds them).
    pub endpoints: BTreeMap<String, String>,
    /// Port name → `HOST:PORT` of the VM's own port forwards behind `endpoints` (equal to
    /// them when no forwarder is used); these answer only while the VM's process runs.
    pub direct_endpoints: BTreeMap<String, String>,
    /// Backend launch spec (opaque to the store), kept so a restarted server can adopt.
    pub spec: serde_json::Value,
    pub pid: Option<u32>,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Last time it was granted, woken, or used through its endpoint.
    pub last_used_at_ms: u64,
    /// When it entered its current state (set by every state change).
    pub state_since_ms: u64,
    /// Launch → ready, when it booted.
    pub boot_ms: Option<u64>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The warm pool holding this VM while it is paused and unclaimed.
    pub pool: Option<String>,
    /// OS name and version; `None` for a hardware shell with no OS attached yet.
    pub os: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
}

impl TaskState {
    fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<TaskState, StoreError> {
        match s {
            "running" => Ok(TaskState::Running),
            "succeeded" => Ok(TaskState::Succeeded),
            "failed" => Ok(TaskState::Failed),
            other => Err(StoreError::Corrupt(other.to_owned())),
        }
    }
}

/// A long operation (VM creation, ...), with progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    /// What the task does, e.g. `create_vm`.
    pub kind: String,
    pub service: Option<String>,
    pub vm_id: Option<String>,
    pub state: TaskState,
    /// Current step, e.g. `assets`, `image`, `launch`, `boot`, `ready`.
    pub stage: String,
    pub percent: u8,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Store::with_connection(conn)
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::with_connection(Connection::open_in_memory()?)
    }

    fn with_connection(mut conn: Connection) -> Result<Store, StoreError> {
        schema::migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO vms (id, host, services, env, mode, owner, state, endpoints, spec, pid,
                              error, created_at_ms, updated_at_ms, last_used_at_ms, boot_ms,
                              memory_mib, vcpus, pool, os_name, os_version, state_since_ms,
                              direct_endpoints)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                     ?18, ?19, ?20, ?21, ?22)",
            params![
                vm.id,
                vm.host,
                serde_json::to_string(&vm.services)?,
                serde_json::to_string(&vm.env)?,
                vm.mode.as_str(),
                vm.owner,
                vm.state.as_str(),
                serde_json::to_string(&vm.endpoints)?,
                vm.spec.to_string(),
                vm.pid,
                vm.error,
                vm.created_at_ms,
                vm.updated_at_ms,
                vm.last_used_at_ms,
                vm.boot_ms,
                vm.memory_mib,
                vm.vcpus,
                vm.pool,
                vm.os.as_ref().map(|(name, _)| name),
                vm.os.as_ref().map(|(_, version)| version),
                vm.state_since_ms,
                serde_json::to_string(&vm.direct_endpoints)?,
            ],
        )?;
        Ok(())
    }

    pub fn vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"))?;
        let raw = stmt.query_row([id], RawVm::from_row).optional()?;
        raw.map(RawVm::into_record).transpose()
    }

    /// VMs in creation order; deleted ones only when `include_deleted`.
    pub fn vms(&self, include_deleted: bool) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE ?1 OR state != 'deleted' ORDER BY created_at_ms, id"
        ))?;
        let rows = stmt.query_map([include_deleted], RawVm::from_row)?;
        rows.map(|raw| raw?.into_record()).collect()
    }

    /// Active VMs offering `service` to shared requests with exactly this environment,
    /// least recently used first.
    pub fn shared_candidates(
        &self,
        service: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Vec<VmRecord>, StoreError> {
        Ok(self
            .vms(false)?
            .into_iter()
            .filter(|vm| {
                vm.state == VmState::Active
                    && vm.mode == Mode::Shared
                    && vm.services.iter().any(|s| s == service)
                    && vm.env == *env
            })
            .collect())
    }

    /// Moves a VM to `to`, if the state machine allows it from its current state, and sets
    /// or clears its error. Returns the updated record.
    pub fn transition(
        &self,
        id: &str,
        to: VmState,
        error: Option<&str>,
    ) -> Result<VmRecord, StoreError> {
        {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let from = state_of(&tx, id)?;
            check_transition(from, to)?;
            tx.execute(
                "UPDATE vms SET state = ?2, error = ?3, updated_at_ms = ?4, state_since_ms = ?4 WHERE id = ?1",
                params![id, to.as_str(), error, now_ms()],
            )?;
            tx.commit()?;
        }
        self.vm(id)?.ok_or_else(|| StoreError::NoVm(id.to_owned()))
    }

    /// Records the host process and the launch spec of a VM.
    pub fn set_launch(
        &self,
        id: &str,
        pid: Option<u32>,
        spec: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET pid = ?2, spec = ?3, updated_at_ms = ?4 WHERE id = ?1",
            params![id, pid, spec.to_string(), now_ms()],
            id,
        )
    }

    /// Takes a paused pool VM out of its pool for removal: `ready` → `deleted` in one step,
    /// only if it is still ready (a request may have claimed it since it was listed).
    /// Returns whether it was.
    pub fn retire_ready(&self, id: &str) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE vms SET state = 'deleted', updated_at_ms = ?2, state_since_ms = ?2
             WHERE id = ?1 AND state = 'ready'",
            params![id, now_ms()],
        )?;
        Ok(changed == 1)
    }

    /// Claims a paused pool VM for a request: `ready` → `active`, out of its pool, with the
    /// given sharing mode and environment. Fails with a transition error when another
    /// request claimed it first.
    pub fn claim(
        &self,
        id: &str,
        mode: Mode,
        env: &BTreeMap<String, String>,
    ) -> Result<VmRecord, StoreError> {
        {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let from = state_of(&tx, id)?;
            if from != VmState::Ready {
                return Err(InvalidTransition {
                    from,
                    to: VmState::Active,
                }
                .into());
            }
            let now = now_ms();
            tx.execute(
                "UPDATE vms SET state = 'active', pool = NULL, mode = ?2, env = ?3, updated_at_ms = ?4,
                                last_used_at_ms = ?4, state_since_ms = ?4 WHERE id = ?1",
                params![id, mode.as_str(), serde_json::to_string(env)?, now],
            )?;
            tx.commit()?;
        }
        self.vm(id)?.ok_or_else(|| StoreError::NoVm(id.to_owned()))
    }

    /// Records what a VM offers after an OS image was attached to a shell: services, OS,
    /// endpoints and the direct endpoints behind them.
    pub fn set_offer(
        &self,
        id: &str,
        services: &[String],
        os: &(String, String),
        endpoints: &BTreeMap<String, String>,
        direct_endpoints: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET services = ?2, os_name = ?3, os_version = ?4, endpoints = ?5,
                            direct_endpoints = ?6 WHERE id = ?1",
            params![
                id,
                serde_json::to_string(services)?,
                os.0,
                os.1,
                serde_json::to_string(endpoints)?,
                serde_json::to_string(direct_endpoints)?
            ],
            id,
        )
    }

    /// Run-time pool bounds (name → (min, max)), overriding the catalog's.
    pub fn pool_bounds(&self) -> Result<BTreeMap<String, (u32, u32)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT name, min, max FROM pool_bounds")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, (row.get(1)?, row.get(2)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Ready criteria set at run time (pool name → JSON).
    pub fn pool_ready(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT name, ready FROM pool_bounds WHERE ready IS NOT NULL")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets (or with `None` clears) a pool's run-time ready criterion, with its bounds.
    pub fn set_pool_ready(
        &self,
        name: &str,
        min: u32,
        max: u32,
        ready: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO pool_bounds (name, min, max, ready) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET min = excluded.min, max = excluded.max, ready = excluded.ready",
            params![name, min, max, ready],
        )?;
        Ok(())
    }

    pub fn set_pool_bounds(&self, name: &str, min: u32, max: u32) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO pool_bounds (name, min, max) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET min = excluded.min, max = excluded.max",
            params![name, min, max],
        )?;
        Ok(())
    }

    pub fn set_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET boot_ms = ?2 WHERE id = ?1",
            params![id, boot_ms],
            id,
        )
    }

    /// Marks a VM as used now.
    pub fn touch(&self, id: &str) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET last_used_at_ms = ?2 WHERE id = ?1",
            params![id, now_ms()],
            id,
        )
    }

    /// Sets when a VM was last used (never earlier than it was).
    pub fn set_last_used(&self, id: &str, at_ms: u64) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET last_used_at_ms = max(last_used_at_ms, ?2) WHERE id = ?1",
            params![id, at_ms],
            id,
        )
    }

    /// Lifecycle policies set at run time (service → JSON).
    pub fn policies(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT service, policy FROM policies")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a service's run-time policy (JSON), or with `None` goes back to the catalog's.
    pub fn set_policy(&self, service: &str, policy: Option<&str>) -> Result<(), StoreError> {
        let conn = self.conn();
        match policy {
            Some(policy) => conn.execute(
                "INSERT INTO policies (service, policy) VALUES (?1, ?2)
                 ON CONFLICT (service) DO UPDATE SET policy = excluded.policy",
                params![service, policy],
            )?,
            None => conn.execute("DELETE FROM policies WHERE service = ?1", [service])?,
        };
        Ok(())
    }

    fn update(&self, sql: &str, params: impl rusqlite::Params, id: &str) -> Result<(), StoreError> {
        match self.conn().execute(sql, params)? {
            0 => Err(StoreError::NoVm(id.to_owned())),
            _ => Ok(()),
        }
    }

    pub fn insert_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO tasks (id, kind, service, vm_id, state, stage, percent, error, created_at_ms, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                task.id,
                task.kind,
                task.service,
                task.vm_id,
                task.state.as_str(),
                task.stage,
                task.percent,
                task.error,
                task.created_at_ms,
                task.updated_at_ms,
            ],
        )?;
        Ok(())
    }

    /// Updates a task's progress; `error` with a `Failed` state says why.
    pub fn update_task(
        &self,
        id: &str,
        state: TaskState,
        stage: &str,
        percent: u8,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE tasks SET state = ?2, stage = ?3, percent = ?4, error = ?5, updated_at_ms = ?6 WHERE id = ?1",
            params![id, state.as_str(), stage, percent.min(100), error, now_ms()],
        )?;
        match changed {
            0 => Err(StoreError::NoTask(id.to_owned())),
            _ => Ok(()),
        }
    }

    pub fn set_task_vm(&self, id: &str, vm_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE tasks SET vm_id = ?2 WHERE id = ?1",
            params![id, vm_id],
        )?;
        Ok(())
    }

    pub fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))?;
        let raw = stmt.query_row([id], RawTask::from_row).optional()?;
        raw.map(RawTask::into_record).transpose()
    }

    /// The most recent `limit` tasks, newest first.
    pub fn tasks(&self, limit: u32) -> Result<Vec<TaskRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks ORDER BY created_at_ms DESC, id DESC LIMIT ?1"
        ))?;
        let rows = stmt.query_map([limit], RawTask::from_row)?;
        rows.map(|raw| raw?.into_record()).collect()
    }

    /// Marks every task still `running` as failed with `reason` (used at start-up: a task
    /// cannot survive the process that ran it). Returns how many.
    pub fn fail_running_tasks(&self, reason: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE tasks SET state = 'failed', error = ?1, updated_at_ms = ?2 WHERE state = 'running'",
            params![reason, now_ms()],
        )?)
    }
}

/// The state of VM `id`, read inside `tx`.
fn state_of(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<VmState, StoreError> {
    let current: Option<String> = tx
        .query_row("SELECT state FROM vms WHERE id = ?1", [id], |row| {
            row.get(0)
        })
        .optional()?;
    let current = current.ok_or_else(|| StoreError::NoVm(id.to_owned()))?;
    current
        .parse()
        .map_err(|_| StoreError::Corrupt(current.clone()))
}

const VM_COLUMNS: &str = "id, host, services, env, mode, owner, state, endpoints, spec, pid, error, \
     created_at_ms, updated_at_ms, last_used_at_ms, boot_ms, memory_mib, vcpus, pool, os_name, os_version, \
     state_since_ms, direct_endpoints";

const TASK_COLUMNS: &str =
    "id, kind, service, vm_id, state, stage, percent, error, created_at_ms, updated_at_ms";

/// A row as stored, before its JSON and enum columns are decoded.
struct RawVm {
    id: String,
    host: String,
    services: String,
    env: String,
    mode: String,
    owner: String,
    state: String,
    endpoints: String,
    spec: String,
    pid: Option<u32>,
    error: Option<String>,
    created_at_ms: u64,
    updated_at_ms: u64,
    last_used_at_ms: u64,
    boot_ms: Option<u64>,
    memory_mib: u32,
    vcpus: u32,
    pool: Option<String>,
    os_name: Option<String>,
    os_version: Option<String>,
    state_since_ms: u64,
    direct_endpoints: String,
}

impl RawVm {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<RawVm> {
        Ok(RawVm {
            id: row.get(0)?,
            host: row.get(1)?,
            services: row.get(2)?,
            env: row.get(3)?,
            mode: row.get(4)?,
            owner: row.get(5)?,
            state: row.get(6)?,
            endpoints: row.get(7)?,
            spec: row.get(8)?,
            pid: row.get(9)?,
            error: row.get(10)?,
            created_at_ms: row.get(11)?,
            updated_at_ms: row.get(12)?,
            last_used_at_ms: row.get(13)?,
            boot_ms: row.get(14)?,
            memory_mib: row.get(15)?,
            vcpus: row.get(16)?,
            pool: row.get(17)?,
            os_name: row.get(18)?,
            os_version: row.get(19)?,
            state_since_ms: row.get(20)?,
            direct_endpoints: row.get(21)?,
        })
    }

    fn into_record(self) -> Result<VmRecord, StoreError> {
        let mode = match self.mode.as_str() {
            "shared" => Mode::Shared,
            "dedicated" => Mode::Dedicated,
            other => return Err(StoreError::Corrupt(other.to_owned())),
        };
        Ok(VmRecord {
            state: self
                .state
                .parse()
                .map_err(|_| StoreError::Corrupt(self.state.clone()))?,
            services: serde_json::from_str(&self.services)?,
            env: serde_json::from_str(&self.env)?,
            endpoints: serde_json::from_str(&self.endpoints)?,
            direct_endpoints: serde_json::from_str(&self.direct_endpoints)?,
            spec: serde_json::from_str(&self.spec)?,
            mode,
            id: self.id,
            host: self.host,
            owner: self.owner,
            pid: self.pid,
            error: self.error,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            last_used_at_ms: self.last_used_at_ms,
            state_since_ms: self.state_since_ms,
            boot_ms: self.boot_ms,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            pool: self.pool,
            os: self.os_name.zip(self.os_version),
        })
    }
}

struct RawTask {
    record: TaskRecord,
    state: String,
}

impl RawTask {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<RawTask> {
        Ok(RawTask {
            state: row.get(4)?,
            record: TaskRecord {
                id: row.get(0)?,
                kind: row.get(1)?,
                service: row.get(2)?,
                vm_id: row.get(3)?,
                state: TaskState::Running,
                stage: row.get(5)?,
                percent: row.get(6)?,
                error: row.get(7)?,
                created_at_ms: row.get(8)?,
                updated_at_ms: row.get(9)?,
            },
        })
    }

    fn into_record(self) -> Result<TaskRecord, StoreError> {
        Ok(TaskRecord {
            state: TaskState::parse(&self.state)?,
            ..self.record
        })
    }
}

#[cfg(test)]
mod tests;
