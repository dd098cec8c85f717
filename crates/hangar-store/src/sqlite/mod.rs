//! [`SqliteStore`]: the store in one SQLite file (WAL mode), the embedded default.
//!
//! Calls are synchronous and short (one indexed statement or a small transaction on one
//! connection behind a mutex), so the async methods run them in place.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use hangar_core::state::{InvalidTransition, check_transition};
use hangar_core::{Mode, VmState};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::lease::{lease_end, signed_ms};
use crate::{
    ArchiveRecord, AuditRecord, Entity, HostRecord, HostState, HostUse, IdempotencyRecord,
    ImportRecord, LeaseRecord, StepOutcome, Store, StoreError, TaskRecord, TaskState, TaskStep,
    TaskUndo, TemplateRecord, TokenRecord, UserRecord, VmMove, VmRecord, now_ms,
};

mod accounting;
mod alerts;
pub(crate) mod rows;
pub(crate) mod schema;
mod stacks;

use rows::{ARCHIVE_COLUMNS, HOST_COLUMNS, LEASE_COLUMNS, STEP_COLUMNS, TASK_COLUMNS};
use rows::{AUDIT_COLUMNS, IDEMPOTENCY_COLUMNS, TOKEN_COLUMNS, USER_COLUMNS};
use rows::{IMPORT_COLUMNS, UNDO_COLUMNS, import_row, undo_row};
use rows::{TEMPLATE_COLUMNS, VM_COLUMNS, archive_row, host_row, lease_row, step_row, task_row};
use rows::{audit_row, idempotency_row, template_row, token_row, user_row, vm_row};

/// The store in a SQLite database.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// A SQLite error as a backend error.
pub(crate) fn db(err: rusqlite::Error) -> StoreError {
    StoreError::backend("sqlite error", err)
}

/// An insert's error: a unique-key violation is a conflict on `kind` `id`.
pub(super) fn insert_error(err: rusqlite::Error, kind: Entity, id: &str) -> StoreError {
    match err.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::exists(kind, id),
        _ => db(err),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        SqliteStore::with_connection(conn)
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        SqliteStore::with_connection(Connection::open_in_memory().map_err(db)?)
    }

    fn with_connection(mut conn: Connection) -> Result<SqliteStore, StoreError> {
        schema::migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs an UPDATE of VM `id`; [`StoreError::NotFound`] when no row matched.
    fn update_vm(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        id: &str,
    ) -> Result<(), StoreError> {
        match self.conn().execute(sql, params).map_err(db)? {
            0 => Err(StoreError::not_found(Entity::Vm, id)),
            _ => Ok(()),
        }
    }

    fn vm_now(&self, id: &str) -> Result<VmRecord, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"))
            .map_err(db)?;
        let raw = stmt.query_row([id], vm_row).optional().map_err(db)?;
        raw.ok_or_else(|| StoreError::not_found(Entity::Vm, id))?
    }

    fn list<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        decode: fn(&rusqlite::Row<'_>) -> rusqlite::Result<Result<T, StoreError>>,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql).map_err(db)?;
        let rows = stmt.query_map(params, decode).map_err(db)?;
        rows.map(|row| row.map_err(db)?).collect()
    }

    fn one<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        decode: fn(&rusqlite::Row<'_>) -> rusqlite::Result<Result<T, StoreError>>,
    ) -> Result<Option<T>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql).map_err(db)?;
        let row = stmt.query_row(params, decode).optional().map_err(db)?;
        row.transpose()
    }

    fn execute(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
        self.conn().execute(sql, params).map_err(db)
    }
}

/// The state of VM `id`, read inside `tx`.
fn state_of(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<VmState, StoreError> {
    let current: Option<String> = tx
        .query_row("SELECT state FROM vms WHERE id = ?1", [id], |row| {
            row.get(0)
        })
        .optional()
        .map_err(db)?;
    let current = current.ok_or_else(|| StoreError::not_found(Entity::Vm, id))?;
    current.parse().map_err(|_| StoreError::corrupt(&current))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!(
                    "INSERT INTO vms ({VM_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                             ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)"
                ),
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
                    vm.isolation,
                ],
            )
            .map_err(|err| insert_error(err, Entity::Vm, &vm.id))?;
        Ok(())
    }

    async fn vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        self.one(
            &format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"),
            [id],
            vm_row,
        )
    }

    async fn vms(&self, include_deleted: bool) -> Result<Vec<VmRecord>, StoreError> {
        self.list(
            &format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE ?1 OR state != 'deleted'
                 ORDER BY created_at_ms, id"
            ),
            [include_deleted],
            vm_row,
        )
    }

    async fn vms_owned_by(&self, owner: &str) -> Result<Vec<VmRecord>, StoreError> {
        self.list(
            &format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE owner = ?1 AND state != 'deleted'
                 ORDER BY created_at_ms, id"
            ),
            [owner],
            vm_row,
        )
    }

    async fn vms_on_host(&self, host: &str) -> Result<Vec<VmRecord>, StoreError> {
        self.list(
            &format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE host = ?1 AND state != 'deleted'
                 ORDER BY created_at_ms, id"
            ),
            [host],
            vm_row,
        )
    }

    async fn vm_use_by_host(&self, states: &[VmState]) -> Result<Vec<HostUse>, StoreError> {
        fn host_use(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<HostUse, StoreError>> {
            let host: String = row.get(0)?;
            let sums: [i64; 3] = [row.get(1)?, row.get(2)?, row.get(3)?];
            Ok(HostUse::from_sums(host, sums, row.get(4)?))
        }
        self.list(
            &format!(
                "SELECT host, COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0),
                        GROUP_CONCAT(DISTINCT isolation)
                 FROM vms WHERE state IN ({}) GROUP BY host ORDER BY host",
                crate::state_list(states)
            ),
            [],
            host_use,
        )
    }

    async fn transition(
        &self,
        id: &str,
        to: VmState,
        error: Option<&str>,
    ) -> Result<VmRecord, StoreError> {
        {
            let mut conn = self.conn();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let from = state_of(&tx, id)?;
            check_transition(from, to)?;
            tx.execute(
                "UPDATE vms SET state = ?2, error = ?3, updated_at_ms = ?4, state_since_ms = ?4
                 WHERE id = ?1",
                params![id, to.as_str(), error, now_ms()],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
        }
        self.vm_now(id)
    }

    async fn claim(
        &self,
        id: &str,
        mode: Mode,
        env: &BTreeMap<String, String>,
    ) -> Result<VmRecord, StoreError> {
        {
            let mut conn = self.conn();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let from = state_of(&tx, id)?;
            if from != VmState::Ready {
                return Err(InvalidTransition {
                    from,
                    to: VmState::Active,
                }
                .into());
            }
            tx.execute(
                "UPDATE vms SET state = 'active', pool = NULL, mode = ?2, env = ?3,
                                updated_at_ms = ?4, last_used_at_ms = ?4, state_since_ms = ?4
                 WHERE id = ?1",
                params![id, mode.as_str(), serde_json::to_string(env)?, now_ms()],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
        }
        self.vm_now(id)
    }

    async fn retire_ready(&self, id: &str) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE vms SET state = 'deleted', updated_at_ms = ?2, state_since_ms = ?2
             WHERE id = ?1 AND state = 'ready'",
            params![id, now_ms()],
        )?;
        Ok(changed == 1)
    }

    async fn set_launch(
        &self,
        id: &str,
        pid: Option<u32>,
        spec: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.update_vm(
            "UPDATE vms SET pid = ?2, spec = ?3, updated_at_ms = ?4 WHERE id = ?1",
            params![id, pid, spec.to_string(), now_ms()],
            id,
        )
    }

    async fn move_vm(&self, m: &VmMove) -> Result<bool, StoreError> {
        let moved = self
            .conn()
            .execute(
                "UPDATE vms SET host = ?4, pid = ?5, spec = ?6, direct_endpoints = ?7,
                                updated_at_ms = ?8
                 WHERE id = ?1 AND host = ?2 AND state = ?3",
                params![
                    m.id,
                    m.from,
                    m.state.as_str(),
                    m.to,
                    m.pid,
                    m.spec.to_string(),
                    serde_json::to_string(&m.direct_endpoints)?,
                    now_ms()
                ],
            )
            .map_err(db)?;
        Ok(moved == 1)
    }

    async fn set_offer(
        &self,
        id: &str,
        services: &[String],
        os: &(String, String),
        endpoints: &BTreeMap<String, String>,
        direct_endpoints: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        self.update_vm(
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

    async fn set_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), StoreError> {
        self.update_vm(
            "UPDATE vms SET boot_ms = ?2 WHERE id = ?1",
            params![id, boot_ms],
            id,
        )
    }

    async fn set_owner(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        self.update_vm(
            "UPDATE vms SET owner = ?2, updated_at_ms = ?3 WHERE id = ?1",
            params![id, owner, now_ms()],
            id,
        )
    }

    async fn touch(&self, id: &str) -> Result<(), StoreError> {
        self.update_vm(
            "UPDATE vms SET last_used_at_ms = ?2 WHERE id = ?1",
            params![id, now_ms()],
            id,
        )
    }

    async fn set_last_used(&self, id: &str, at_ms: u64) -> Result<(), StoreError> {
        self.update_vm(
            "UPDATE vms SET last_used_at_ms = max(last_used_at_ms, ?2) WHERE id = ?1",
            params![id, at_ms],
            id,
        )
    }

    async fn pool_bounds(&self) -> Result<BTreeMap<String, (u32, u32)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT name, min, max FROM pool_bounds")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, (row.get(1)?, row.get(2)?)))
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    async fn set_pool_bounds(&self, name: &str, min: u32, max: u32) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO pool_bounds (name, min, max) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET min = excluded.min, max = excluded.max",
            params![name, min, max],
        )?;
        Ok(())
    }

    async fn pool_ready(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.text_map("SELECT name, ready FROM pool_bounds WHERE ready IS NOT NULL")
    }

    async fn set_pool_ready(
        &self,
        name: &str,
        min: u32,
        max: u32,
        ready: Option<&str>,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO pool_bounds (name, min, max, ready) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET min = excluded.min, max = excluded.max,
                                              ready = excluded.ready",
            params![name, min, max, ready],
        )?;
        Ok(())
    }

    async fn policies(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.text_map("SELECT service, policy FROM policies")
    }

    async fn set_policy(&self, service: &str, policy: Option<&str>) -> Result<(), StoreError> {
        match policy {
            Some(policy) => self.execute(
                "INSERT INTO policies (service, policy) VALUES (?1, ?2)
                 ON CONFLICT (service) DO UPDATE SET policy = excluded.policy",
                params![service, policy],
            )?,
            None => self.execute("DELETE FROM policies WHERE service = ?1", [service])?,
        };
        Ok(())
    }

    async fn insert_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!(
                    "INSERT INTO tasks ({TASK_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
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
                    task.owner,
                    task.ended_at_ms,
                ],
            )
            .map_err(|err| insert_error(err, Entity::Task, &task.id))?;
        Ok(())
    }

    async fn update_task(
        &self,
        id: &str,
        state: TaskState,
        stage: &str,
        percent: u8,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let ended = state.ended().then_some(now);
        let changed = self.execute(
            "UPDATE tasks SET state = ?2, stage = ?3, percent = ?4, error = ?5, updated_at_ms = ?6,
                 ended_at_ms = COALESCE(?7, ended_at_ms)
             WHERE id = ?1",
            params![
                id,
                state.as_str(),
                stage,
                percent.min(100),
                error,
                now,
                ended
            ],
        )?;
        match changed {
            0 => Err(StoreError::not_found(Entity::Task, id)),
            _ => Ok(()),
        }
    }

    async fn set_task_vm(&self, id: &str, vm_id: &str) -> Result<(), StoreError> {
        match self.execute(
            "UPDATE tasks SET vm_id = ?2 WHERE id = ?1",
            params![id, vm_id],
        )? {
            0 => Err(StoreError::not_found(Entity::Task, id)),
            _ => Ok(()),
        }
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.one(
            &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"),
            [id],
            task_row,
        )
    }

    async fn tasks(&self, limit: u32) -> Result<Vec<TaskRecord>, StoreError> {
        self.list(
            &format!(
                "SELECT {TASK_COLUMNS} FROM tasks ORDER BY created_at_ms DESC, id DESC LIMIT ?1"
            ),
            [limit],
            task_row,
        )
    }

    async fn fail_running_tasks(&self, reason: &str) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let now = now_ms();
        tx.execute(
            "UPDATE task_steps SET ended_at_ms = ?2, outcome = 'failed', error = ?1
             WHERE ended_at_ms IS NULL
               AND task_id IN (SELECT id FROM tasks WHERE state IN ('running', 'rolling_back'))",
            params![reason, now],
        )
        .map_err(db)?;
        let failed = tx
            .execute(
                "UPDATE tasks SET state = 'failed', error = ?1, updated_at_ms = ?2,
                     ended_at_ms = ?2
                 WHERE state IN ('running', 'rolling_back')",
                params![reason, now],
            )
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(failed)
    }

    async fn unfinished_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.list(
            &format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('running', 'rolling_back')
                 ORDER BY created_at_ms, id"
            ),
            [],
            task_row,
        )
    }

    async fn push_task_undo(&self, task_id: &str, action: &str) -> Result<u32, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let seq = next_task_number(
            &tx,
            task_id,
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM task_undo WHERE task_id = ?1",
        )?;
        tx.execute(
            "INSERT INTO task_undo (task_id, seq, action) VALUES (?1, ?2, ?3)",
            params![task_id, seq, action],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(seq)
    }

    async fn task_undos(&self, task_id: &str) -> Result<Vec<TaskUndo>, StoreError> {
        self.list(
            &format!("SELECT {UNDO_COLUMNS} FROM task_undo WHERE task_id = ?1 ORDER BY seq"),
            [task_id],
            undo_row,
        )
    }

    async fn mark_task_undone(&self, task_id: &str, seq: u32) -> Result<(), StoreError> {
        match self.execute(
            "UPDATE task_undo SET done = 1 WHERE task_id = ?1 AND seq = ?2",
            params![task_id, seq],
        )? {
            0 => Err(StoreError::not_found(
                Entity::TaskUndo,
                format!("{task_id}#{seq}"),
            )),
            _ => Ok(()),
        }
    }

    async fn start_task_step(
        &self,
        task_id: &str,
        stage: &str,
        percent: u8,
        at_ms: u64,
    ) -> Result<u32, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let step = next_task_number(
            &tx,
            task_id,
            "SELECT COALESCE(MAX(step), 0) + 1 FROM task_steps WHERE task_id = ?1",
        )?;
        tx.execute(
            "INSERT INTO task_steps (task_id, step, stage, percent, started_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![task_id, step, stage, percent.min(100), at_ms],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(step)
    }

    async fn end_task_step(
        &self,
        task_id: &str,
        step: u32,
        outcome: StepOutcome,
        error: Option<&str>,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        match self.execute(
            "UPDATE task_steps SET ended_at_ms = ?3, outcome = ?4, error = ?5
             WHERE task_id = ?1 AND step = ?2",
            params![task_id, step, at_ms, outcome.as_str(), error],
        )? {
            0 => Err(StoreError::not_found(
                Entity::TaskStep,
                format!("{task_id}#{step}"),
            )),
            _ => Ok(()),
        }
    }

    async fn task_steps(&self, task_id: &str) -> Result<Vec<TaskStep>, StoreError> {
        self.list(
            &format!("SELECT {STEP_COLUMNS} FROM task_steps WHERE task_id = ?1 ORDER BY step"),
            [task_id],
            step_row,
        )
    }

    async fn upsert_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT INTO hosts ({HOST_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET address = excluded.address,
                     state = CASE WHEN hosts.state = 'draining' AND excluded.state = 'up' THEN 'draining' ELSE excluded.state END,
                     facts = excluded.facts,
                     last_heartbeat_ms = excluded.last_heartbeat_ms"
            ),
            params![
                host.name,
                host.address,
                host.state.as_str(),
                host.facts.to_string(),
                host.last_heartbeat_ms
            ],
        )?;
        Ok(())
    }

    async fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        self.one(
            &format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1"),
            [name],
            host_row,
        )
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.list(
            &format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name"),
            [],
            host_row,
        )
    }

    async fn change_host_state(
        &self,
        name: &str,
        from: HostState,
        to: HostState,
    ) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE hosts SET state = ?3 WHERE name = ?1 AND state IN (?2, ?3)",
            params![name, from.as_str(), to.as_str()],
        )?;
        if changed > 0 {
            return Ok(true);
        }
        match self.host(name).await? {
            Some(_) => Ok(false),
            None => Err(StoreError::not_found(Entity::Host, name)),
        }
    }

    async fn heartbeat(
        &self,
        name: &str,
        state: HostState,
        facts: &serde_json::Value,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        match self.execute(
            "UPDATE hosts SET state = CASE WHEN state = 'draining' AND ?2 = 'up' THEN 'draining' ELSE ?2 END,
                 facts = ?3, last_heartbeat_ms = ?4 WHERE name = ?1",
            params![name, state.as_str(), facts.to_string(), at_ms],
        )? {
            0 => Err(StoreError::not_found(Entity::Host, name)),
            _ => Ok(()),
        }
    }

    async fn put_template(&self, t: &TemplateRecord) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT OR REPLACE INTO templates ({TEMPLATE_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ),
            params![
                t.key,
                t.service,
                t.host,
                t.hash,
                t.size_bytes,
                t.created_at_ms,
                t.last_used_at_ms
            ],
        )?;
        Ok(())
    }

    async fn template(&self, key: &str) -> Result<Option<TemplateRecord>, StoreError> {
        self.one(
            &format!("SELECT {TEMPLATE_COLUMNS} FROM templates WHERE key = ?1"),
            [key],
            template_row,
        )
    }

    async fn templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        self.list(
            &format!("SELECT {TEMPLATE_COLUMNS} FROM templates ORDER BY key"),
            [],
            template_row,
        )
    }

    async fn template_used(&self, key: &str, at_ms: u64) -> Result<(), StoreError> {
        match self.execute(
            "UPDATE templates SET last_used_at_ms = max(last_used_at_ms, ?2) WHERE key = ?1",
            params![key, at_ms],
        )? {
            0 => Err(StoreError::not_found(Entity::Template, key)),
            _ => Ok(()),
        }
    }

    async fn remove_template(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM templates WHERE key = ?1", [key])? == 1)
    }

    async fn insert_import(&self, import: &ImportRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!("INSERT INTO imports ({IMPORT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    import.name,
                    import.owner,
                    import.format,
                    import.spec.to_string(),
                    import.disk_bytes,
                    import.created_at_ms
                ],
            )
            .map_err(|err| insert_error(err, Entity::Import, &import.name))?;
        Ok(())
    }

    async fn import(&self, name: &str) -> Result<Option<ImportRecord>, StoreError> {
        self.one(
            &format!("SELECT {IMPORT_COLUMNS} FROM imports WHERE name = ?1"),
            [name],
            import_row,
        )
    }

    async fn imports(&self) -> Result<Vec<ImportRecord>, StoreError> {
        self.list(
            &format!("SELECT {IMPORT_COLUMNS} FROM imports ORDER BY name"),
            [],
            import_row,
        )
    }

    async fn remove_import(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM imports WHERE name = ?1", [name])? == 1)
    }

    async fn put_archive(&self, a: &ArchiveRecord) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT OR REPLACE INTO archives ({ARCHIVE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"
            ),
            params![a.vm_id, a.tier, a.size_bytes, a.host, a.created_at_ms],
        )?;
        Ok(())
    }

    async fn archive(&self, vm_id: &str) -> Result<Option<ArchiveRecord>, StoreError> {
        self.one(
            &format!("SELECT {ARCHIVE_COLUMNS} FROM archives WHERE vm_id = ?1"),
            [vm_id],
            archive_row,
        )
    }

    async fn archives(&self) -> Result<Vec<ArchiveRecord>, StoreError> {
        self.list(
            &format!("SELECT {ARCHIVE_COLUMNS} FROM archives ORDER BY vm_id"),
            [],
            archive_row,
        )
    }

    async fn remove_archive(&self, vm_id: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM archives WHERE vm_id = ?1", [vm_id])? == 1)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        // An update its WHERE refuses changes no row: the lease is someone else's.
        let changed = self.execute(
            "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                 expires_ms = excluded.expires_ms
             WHERE leases.holder = excluded.holder OR leases.expires_ms <= ?4",
            params![name, holder, lease_end(now_ms, ttl_ms), signed_ms(now_ms)],
        )?;
        Ok(changed == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let deleted = self.execute(
            "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
            [name, holder],
        )?;
        Ok(deleted == 1)
    }

    async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        self.one(
            &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE name = ?1"),
            [name],
            lease_row,
        )
    }

    async fn quotas(&self) -> Result<Vec<(String, crate::Limits)>, StoreError> {
        self.quotas_now()
    }

    async fn set_quota(
        &self,
        owner: &str,
        limits: Option<&crate::Limits>,
    ) -> Result<(), StoreError> {
        self.set_quota_now(owner, limits)
    }

    async fn use_by_owner(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(String, crate::Usage)>, StoreError> {
        self.use_by_owner_now(owner)
    }

    async fn usage_events(&self, since_ms: u64) -> Result<Vec<crate::UsageEvent>, StoreError> {
        self.usage_events_now(since_ms)
    }

    async fn insert_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!("INSERT INTO users ({USER_COLUMNS}) VALUES (?1, ?2, ?3)"),
                params![user.name, user.role.as_str(), user.created_at_ms],
            )
            .map_err(|err| insert_error(err, Entity::User, &user.name))?;
        Ok(())
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.one(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"),
            [name],
            user_row,
        )
    }

    async fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.list(
            &format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"),
            [],
            user_row,
        )
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let user: Option<i64> = tx
            .query_row("SELECT 1 FROM users WHERE name = ?1", [&t.user], |row| {
                row.get(0)
            })
            .optional()
            .map_err(db)?;
        if user.is_none() {
            return Err(StoreError::not_found(Entity::User, &t.user));
        }
        tx.execute(
            &format!(
                "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                t.id,
                t.user,
                t.role.as_str(),
                t.hash,
                t.created_at_ms,
                t.expires_at_ms,
                t.revoked_at_ms,
                t.last_used_at_ms
            ],
        )
        .map_err(|err| insert_error(err, Entity::Token, &t.id))?;
        tx.commit().map_err(db)
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.one(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
            [id],
            token_row,
        )
    }

    async fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
        self.list(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE ?1 IS NULL OR user_name = ?1
                 ORDER BY created_at_ms, id"
            ),
            [user],
            token_row,
        )
    }

    async fn revoke_token(&self, id: &str, at_ms: u64) -> Result<TokenRecord, StoreError> {
        self.execute(
            "UPDATE tokens SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1",
            params![id, at_ms],
        )?;
        self.one(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
            [id],
            token_row,
        )?
        .ok_or_else(|| StoreError::not_found(Entity::Token, id))
    }

    async fn token_used(&self, id: &str, at_ms: u64) -> Result<(), StoreError> {
        match self.execute(
            "UPDATE tokens SET last_used_at_ms = MAX(COALESCE(last_used_at_ms, 0), ?2)
             WHERE id = ?1",
            params![id, at_ms],
        )? {
            0 => Err(StoreError::not_found(Entity::Token, id)),
            _ => Ok(()),
        }
    }

    async fn insert_audit(&self, e: &AuditRecord) -> Result<u64, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO audit (at_ms, user_name, method, route, target, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING seq",
            )
            .map_err(db)?;
        stmt.query_row(
            params![e.at_ms, e.user, e.method, e.route, e.target, e.status],
            |row| row.get(0),
        )
        .map_err(db)
    }

    async fn audit(&self, since_ms: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let mut entries = self.list(
            &format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE at_ms >= ?1 ORDER BY seq DESC LIMIT ?2"
            ),
            params![since_ms, limit],
            audit_row,
        )?;
        entries.reverse();
        Ok(entries)
    }

    async fn claim_idempotency_key(
        &self,
        user: &str,
        key: &str,
        fingerprint: &str,
        now_ms: u64,
        stale_before_ms: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        // Taken when new, or when its holder left it unanswered for too long.
        let changed = tx
            .execute(
                "INSERT INTO idempotency_keys (user_name, key, fingerprint, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_name, key) DO UPDATE SET
                     fingerprint = excluded.fingerprint, created_at_ms = excluded.created_at_ms
                 WHERE idempotency_keys.status IS NULL
                   AND idempotency_keys.created_at_ms < ?5",
                params![user, key, fingerprint, now_ms, stale_before_ms],
            )
            .map_err(db)?;
        let existing = if changed == 1 {
            None
        } else {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_keys
                     WHERE user_name = ?1 AND key = ?2"
                ))
                .map_err(db)?;
            let row = stmt
                .query_row([user, key], idempotency_row)
                .optional()
                .map_err(db)?;
            drop(stmt);
            row.transpose()?
        };
        tx.commit().map_err(db)?;
        Ok(existing)
    }

    async fn answer_idempotency_key(
        &self,
        user: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError> {
        match self.execute(
            "UPDATE idempotency_keys SET status = ?3, body = ?4 WHERE user_name = ?1 AND key = ?2",
            params![user, key, status, body],
        )? {
            0 => Err(StoreError::not_found(Entity::IdempotencyKey, key)),
            _ => Ok(()),
        }
    }

    async fn release_idempotency_key(&self, user: &str, key: &str) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM idempotency_keys WHERE user_name = ?1 AND key = ?2 AND status IS NULL",
            params![user, key],
        )?;
        Ok(())
    }

    async fn insert_stack(&self, stack: &crate::StackRecord) -> Result<(), StoreError> {
        self.insert_stack_now(stack)
    }

    async fn stack(&self, name: &str) -> Result<Option<crate::StackRecord>, StoreError> {
        self.stack_now(name)
    }

    async fn stacks(&self) -> Result<Vec<crate::StackRecord>, StoreError> {
        self.stacks_now()
    }

    async fn update_stack(&self, stack: &crate::StackRecord) -> Result<(), StoreError> {
        self.update_stack_now(stack)
    }

    async fn remove_stack(&self, name: &str) -> Result<bool, StoreError> {
        self.remove_stack_now(name)
    }

    async fn alerts(&self) -> Result<Vec<crate::Alert>, StoreError> {
        self.alerts_now()
    }

    async fn put_alert(&self, alert: &crate::Alert) -> Result<(), StoreError> {
        self.put_alert_now(alert)
    }

    async fn remove_alert(&self, key: &str) -> Result<bool, StoreError> {
        self.remove_alert_now(key)
    }
}

impl SqliteStore {
    /// A two-text-column query as a map.
    fn text_map(&self, sql: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql).map_err(db)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }
}

/// The next number (`next`: a query of the task's highest number plus one) of a row
/// appended to task `task_id` (a step, an undo), inside `tx`; not found when there is no
/// such task.
fn next_task_number(
    tx: &rusqlite::Transaction<'_>,
    task_id: &str,
    next: &str,
) -> Result<u32, StoreError> {
    let known: Option<i64> = tx
        .query_row("SELECT 1 FROM tasks WHERE id = ?1", [task_id], |row| {
            row.get(0)
        })
        .optional()
        .map_err(db)?;
    if known.is_none() {
        return Err(StoreError::not_found(Entity::Task, task_id));
    }
    tx.query_row(next, [task_id], |row| row.get(0)).map_err(db)
}
