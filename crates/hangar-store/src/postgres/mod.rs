//! [`PgStore`]: the store on a PostgreSQL server, through a pool of connections.
//!
//! Race-freedom does not rest on the pool: [`Store::transition`] reads the VM's state with
//! `SELECT … FOR UPDATE` and writes it in the same transaction, and [`Store::claim`] and
//! [`Store::retire_ready`] are single conditional `UPDATE … WHERE state = 'ready'`
//! statements, so of concurrent claimers exactly one changes the row.
//!
//! Every operation runs through [`PgStore::run`] (`retry.rs`): it follows the primary
//! through a failover and runs the operation again when an attempt failed because of one,
//! so each operation here is written to be safe to run again after an attempt whose
//! commit may have happened unacknowledged (see `retry.rs`; the one exception is the audit
//! log, which may then hold an entry twice).

use std::collections::BTreeMap;

use deadpool_postgres::Pool;
use hangar_core::state::{InvalidTransition, check_transition};
use hangar_core::{Mode, VmState};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use crate::lease::lease_end;
use crate::{
    ArchiveRecord, AuditRecord, Entity, HostRecord, HostState, HostUse, IdempotencyRecord,
    ImportRecord, LeaseRecord, StepOutcome, Store, StoreError, TaskRecord, TaskState, TaskStep,
    TaskUndo, TemplateRecord, TokenRecord, UserRecord, VmMove, VmRecord, now_ms,
};

mod accounting;
mod alerts;
mod retry;
pub(crate) mod rows;
mod schema;
mod stacks;

use retry::Attempt;

use rows::{ARCHIVE_COLUMNS, HOST_COLUMNS, LEASE_COLUMNS, STEP_COLUMNS, TASK_COLUMNS};
use rows::{AUDIT_COLUMNS, IDEMPOTENCY_COLUMNS, TOKEN_COLUMNS, USER_COLUMNS};
use rows::{IMPORT_COLUMNS, UNDO_COLUMNS, import_row, undo_row};
use rows::{TEMPLATE_COLUMNS, VM_COLUMNS, archive_row, host_row, lease_row, signed, step_row};
use rows::{audit_row, idempotency_row, task_row, template_row, token_row, user_row, vm_row};

/// The store in a PostgreSQL database.
pub struct PgStore {
    pool: Pool,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A PostgreSQL error as a backend error.
pub(crate) fn pg(err: tokio_postgres::Error) -> StoreError {
    StoreError::backend("postgresql error", err)
}

/// An insert's error: a unique-key violation is a conflict on `kind` `id`.
fn insert_error(err: tokio_postgres::Error, kind: Entity, id: &str) -> StoreError {
    match err.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::exists(kind, id),
        _ => pg(err),
    }
}

/// An insert's outcome on `attempt`: a key taken already after a broken attempt is that
/// attempt's own row (ids are fresh, names are the caller's), so the insert is done.
fn inserted(
    result: Result<u64, tokio_postgres::Error>,
    attempt: Attempt,
    kind: Entity,
    id: &str,
) -> Result<(), StoreError> {
    match result {
        Ok(_) => Ok(()),
        Err(err) if attempt.after_broken && err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            Ok(())
        }
        Err(err) => Err(insert_error(err, kind, id)),
    }
}

impl PgStore {
    /// Connects to the database `url` names (`postgres://user:password@host:port/db`, or
    /// several servers: `postgres://h1:5432,h2:5432/db?target_session_attrs=read-write`,
    /// to follow whichever takes writes), checks that it answers, and migrates it.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let store = PgStore {
            pool: retry::pool(url)?,
        };
        let mut client = store.client().await?;
        schema::migrate(&mut client).await?;
        Ok(store)
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        self.run(|client, _| async move {
            let stmt = client.prepare_cached(sql).await.map_err(pg)?;
            client.execute(&stmt, params).await.map_err(pg)
        })
        .await
    }

    /// Runs the conditional write `sql` and answers whether it changed a row. When it
    /// changed none on an attempt after a broken one, `trace` (a `SELECT` of the row as the
    /// write leaves it, stamped with this call's instant) answers whether the broken attempt
    /// did.
    async fn changed_once(
        &self,
        sql: &str,
        params: Params<'_>,
        trace: &str,
        trace_params: Params<'_>,
    ) -> Result<bool, StoreError> {
        self.run(|client, attempt| async move {
            let changed = client.execute(sql, params).await.map_err(pg)?;
            if changed == 1 || !attempt.after_broken {
                return Ok(changed == 1);
            }
            let ours = client.query_opt(trace, trace_params).await.map_err(pg)?;
            Ok(ours.is_some())
        })
        .await
    }

    /// Runs an UPDATE of `kind` `id`; [`StoreError::NotFound`] when no row matched.
    async fn update(
        &self,
        sql: &str,
        params: Params<'_>,
        kind: Entity,
        id: &str,
    ) -> Result<(), StoreError> {
        match self.execute(sql, params).await? {
            0 => Err(StoreError::not_found(kind, id)),
            _ => Ok(()),
        }
    }

    async fn query<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        decode: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.run(|client, _| async move {
            let stmt = client.prepare_cached(sql).await.map_err(pg)?;
            let rows = client.query(&stmt, params).await.map_err(pg)?;
            rows.iter().map(decode).collect()
        })
        .await
    }

    /// Appends a numbered row to task `task_id` (a step, an undo) with `insert`, whose
    /// `RETURNING` gives the row's number, under the task's row lock (which orders
    /// concurrent appends to one task); not found when there is no such task. After a
    /// broken attempt, `existing` (when given) is asked first for the number of the row
    /// that attempt may have appended.
    async fn append_to_task(
        &self,
        task_id: &str,
        insert: &str,
        params: Params<'_>,
        existing: Option<(&str, Params<'_>)>,
    ) -> Result<u32, StoreError> {
        let number: i64 = self
            .run(|mut client, attempt| async move {
                let tx = client.transaction().await.map_err(pg)?;
                tx.query_opt("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", &[&task_id])
                    .await
                    .map_err(pg)?
                    .ok_or_else(|| StoreError::not_found(Entity::Task, task_id))?;
                if let Some((sql, params)) = existing.filter(|_| attempt.after_broken)
                    && let Some(row) = tx.query_opt(sql, params).await.map_err(pg)?
                {
                    return row.try_get(0).map_err(pg);
                }
                let number = tx
                    .query_one(insert, params)
                    .await
                    .map_err(pg)?
                    .try_get(0)
                    .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
                Ok(number)
            })
            .await?;
        u32::try_from(number).map_err(|_| StoreError::corrupt(&number.to_string()))
    }

    async fn query_opt<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        decode: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.query(sql, params, decode).await?.into_iter().next())
    }

    async fn text_map(&self, sql: &str) -> Result<BTreeMap<String, String>, StoreError> {
        fn pair(row: &Row) -> Result<(String, String), StoreError> {
            Ok((row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?))
        }
        Ok(self.query(sql, &[], pair).await?.into_iter().collect())
    }

    /// Runs an INSERT of `kind` `id`; a conflict when the key is taken (see [`inserted`]).
    async fn insert(
        &self,
        sql: &str,
        params: Params<'_>,
        kind: Entity,
        id: &str,
    ) -> Result<(), StoreError> {
        self.run(|client, attempt| async move {
            let stmt = client.prepare_cached(sql).await.map_err(pg)?;
            inserted(client.execute(&stmt, params).await, attempt, kind, id)
        })
        .await
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO vms ({VM_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                     $17, $18, $19, $20, $21, $22, $23)"
        );
        let (os_name, os_version) = vm.os.clone().unzip();
        let (services, env) = (
            serde_json::to_string(&vm.services)?,
            serde_json::to_string(&vm.env)?,
        );
        let endpoints = serde_json::to_string(&vm.endpoints)?;
        let direct_endpoints = serde_json::to_string(&vm.direct_endpoints)?;
        let spec = vm.spec.to_string();
        let params: &[&(dyn ToSql + Sync)] = &[
            &vm.id,
            &vm.host,
            &services,
            &env,
            &vm.mode.as_str(),
            &vm.owner,
            &vm.state.as_str(),
            &endpoints,
            &spec,
            &vm.pid.map(i64::from),
            &vm.error,
            &signed(vm.created_at_ms),
            &signed(vm.updated_at_ms),
            &signed(vm.last_used_at_ms),
            &vm.boot_ms.map(signed),
            &i64::from(vm.memory_mib),
            &i64::from(vm.vcpus),
            &vm.pool,
            &os_name,
            &os_version,
            &signed(vm.state_since_ms),
            &direct_endpoints,
            &vm.isolation,
        ];
        self.insert(&sql, params, Entity::Vm, &vm.id).await
    }

    async fn vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1");
        self.query_opt(&sql, &[&id], vm_row).await
    }

    async fn vms(&self, include_deleted: bool) -> Result<Vec<VmRecord>, StoreError> {
        let sql = format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE $1 OR state != 'deleted' ORDER BY created_at_ms, id"
        );
        self.query(&sql, &[&include_deleted], vm_row).await
    }

    async fn vms_owned_by(&self, owner: &str) -> Result<Vec<VmRecord>, StoreError> {
        let sql = format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE owner = $1 AND state != 'deleted'
             ORDER BY created_at_ms, id"
        );
        self.query(&sql, &[&owner], vm_row).await
    }

    async fn vms_on_host(&self, host: &str) -> Result<Vec<VmRecord>, StoreError> {
        let sql = format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE host = $1 AND state != 'deleted'
             ORDER BY created_at_ms, id"
        );
        self.query(&sql, &[&host], vm_row).await
    }

    async fn vm_use_by_host(&self, states: &[VmState]) -> Result<Vec<HostUse>, StoreError> {
        fn host_use(row: &Row) -> Result<HostUse, StoreError> {
            let host: String = row.try_get(0).map_err(pg)?;
            let mut sums = [0i64; 3];
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = row.try_get(i + 1).map_err(pg)?;
            }
            HostUse::from_sums(host, sums, row.try_get(4).map_err(pg)?)
        }
        let sql = format!(
            "SELECT host, COUNT(*)::BIGINT, COALESCE(SUM(vcpus), 0)::BIGINT,
                    COALESCE(SUM(memory_mib), 0)::BIGINT, STRING_AGG(DISTINCT isolation, ',')
             FROM vms WHERE state IN ({}) GROUP BY host ORDER BY host",
            crate::state_list(states)
        );
        self.query(&sql, &[], host_use).await
    }

    async fn transition(
        &self,
        id: &str,
        to: VmState,
        error: Option<&str>,
    ) -> Result<VmRecord, StoreError> {
        let select = format!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1 FOR UPDATE");
        let update = format!(
            "UPDATE vms SET state = $2, error = $3, updated_at_ms = $4, state_since_ms = $4
             WHERE id = $1 RETURNING {VM_COLUMNS}"
        );
        let (select, update) = (select.as_str(), update.as_str());
        let now = signed(now_ms());
        self.run(|mut client, attempt| async move {
            let tx = client.transaction().await.map_err(pg)?;
            let row = tx
                .query_opt(select, &[&id])
                .await
                .map_err(pg)?
                .ok_or_else(|| StoreError::not_found(Entity::Vm, id))?;
            let vm = vm_row(&row)?;
            if attempt.after_broken && vm.state == to && signed(vm.state_since_ms) == now {
                return Ok(vm); // the broken attempt made this change
            }
            check_transition(vm.state, to)?;
            let row = tx
                .query_one(update, &[&id, &to.as_str(), &error, &now])
                .await
                .map_err(pg)?;
            let vm = vm_row(&row)?;
            tx.commit().await.map_err(pg)?;
            Ok(vm)
        })
        .await
    }

    async fn claim(
        &self,
        id: &str,
        mode: Mode,
        env: &BTreeMap<String, String>,
    ) -> Result<VmRecord, StoreError> {
        let sql = format!(
            "UPDATE vms SET state = 'active', pool = NULL, mode = $2, env = $3,
                            updated_at_ms = $4, last_used_at_ms = $4, state_since_ms = $4
             WHERE id = $1 AND state = 'ready' RETURNING {VM_COLUMNS}"
        );
        let select = format!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1");
        let (sql, select) = (sql.as_str(), select.as_str());
        let env = serde_json::to_string(env)?;
        let env = env.as_str();
        let now = signed(now_ms());
        self.run(|client, attempt| async move {
            let claimed = client
                .query_opt(sql, &[&id, &mode.as_str(), &env, &now])
                .await
                .map_err(pg)?;
            if let Some(row) = claimed {
                return vm_row(&row);
            }
            let vm = client
                .query_opt(select, &[&id])
                .await
                .map_err(pg)?
                .ok_or_else(|| StoreError::not_found(Entity::Vm, id))?;
            let vm = vm_row(&vm)?;
            // The broken attempt claimed it when the row carries this claim's instant.
            if attempt.after_broken
                && vm.state == VmState::Active
                && signed(vm.state_since_ms) == now
                && vm.mode == mode
            {
                return Ok(vm);
            }
            Err(InvalidTransition {
                from: vm.state,
                to: VmState::Active,
            }
            .into())
        })
        .await
    }

    async fn retire_ready(&self, id: &str) -> Result<bool, StoreError> {
        let now = signed(now_ms());
        self.changed_once(
            "UPDATE vms SET state = 'deleted', updated_at_ms = $2, state_since_ms = $2
             WHERE id = $1 AND state = 'ready'",
            &[&id, &now],
            "SELECT 1 FROM vms WHERE id = $1 AND state = 'deleted' AND state_since_ms = $2",
            &[&id, &now],
        )
        .await
    }

    async fn set_launch(
        &self,
        id: &str,
        pid: Option<u32>,
        spec: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET pid = $2, spec = $3, updated_at_ms = $4 WHERE id = $1",
            &[
                &id,
                &pid.map(i64::from),
                &spec.to_string(),
                &signed(now_ms()),
            ],
            Entity::Vm,
            id,
        )
        .await
    }

    async fn move_vm(&self, m: &VmMove) -> Result<bool, StoreError> {
        let now = signed(now_ms());
        let spec = m.spec.to_string();
        let direct = serde_json::to_string(&m.direct_endpoints)?;
        let pid = m.pid.map(i64::from);
        let state = m.state.as_str();
        self.changed_once(
            "UPDATE vms SET host = $4, pid = $5, spec = $6, direct_endpoints = $7,
                            updated_at_ms = $8
             WHERE id = $1 AND host = $2 AND state = $3",
            &[&m.id, &m.from, &state, &m.to, &pid, &spec, &direct, &now],
            // The broken attempt moved it when the row is on `to` with this call's instant
            // and launch record.
            "SELECT 1 FROM vms WHERE id = $1 AND host = $2 AND state = $3
                                AND updated_at_ms = $4 AND spec = $5",
            &[&m.id, &m.to, &state, &now, &spec],
        )
        .await
    }

    async fn set_offer(
        &self,
        id: &str,
        services: &[String],
        os: &(String, String),
        endpoints: &BTreeMap<String, String>,
        direct_endpoints: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET services = $2, os_name = $3, os_version = $4, endpoints = $5,
                            direct_endpoints = $6 WHERE id = $1",
            &[
                &id,
                &serde_json::to_string(services)?,
                &os.0,
                &os.1,
                &serde_json::to_string(endpoints)?,
                &serde_json::to_string(direct_endpoints)?,
            ],
            Entity::Vm,
            id,
        )
        .await
    }

    async fn set_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET boot_ms = $2 WHERE id = $1",
            &[&id, &signed(boot_ms)],
            Entity::Vm,
            id,
        )
        .await
    }

    async fn set_owner(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET owner = $2, updated_at_ms = $3 WHERE id = $1",
            &[&id, &owner, &signed(now_ms())],
            Entity::Vm,
            id,
        )
        .await
    }

    async fn touch(&self, id: &str) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET last_used_at_ms = $2 WHERE id = $1",
            &[&id, &signed(now_ms())],
            Entity::Vm,
            id,
        )
        .await
    }

    async fn set_last_used(&self, id: &str, at_ms: u64) -> Result<(), StoreError> {
        self.update(
            "UPDATE vms SET last_used_at_ms = GREATEST(last_used_at_ms, $2) WHERE id = $1",
            &[&id, &signed(at_ms)],
            Entity::Vm,
            id,
        )
        .await
    }

    async fn pool_bounds(&self) -> Result<BTreeMap<String, (u32, u32)>, StoreError> {
        fn bounds(row: &Row) -> Result<(String, (u32, u32)), StoreError> {
            let bound = |idx| {
                let value: i64 = row.try_get(idx).map_err(pg)?;
                u32::try_from(value).map_err(|_| StoreError::corrupt(&value.to_string()))
            };
            Ok((row.try_get(0).map_err(pg)?, (bound(1)?, bound(2)?)))
        }
        let rows = self
            .query("SELECT name, min, max FROM pool_bounds", &[], bounds)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn set_pool_bounds(&self, name: &str, min: u32, max: u32) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO pool_bounds (name, min, max) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET min = excluded.min, max = excluded.max",
            &[&name, &i64::from(min), &i64::from(max)],
        )
        .await?;
        Ok(())
    }

    async fn pool_ready(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.text_map("SELECT name, ready FROM pool_bounds WHERE ready IS NOT NULL")
            .await
    }

    async fn set_pool_ready(
        &self,
        name: &str,
        min: u32,
        max: u32,
        ready: Option<&str>,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO pool_bounds (name, min, max, ready) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET min = excluded.min, max = excluded.max,
                                              ready = excluded.ready",
            &[&name, &i64::from(min), &i64::from(max), &ready],
        )
        .await?;
        Ok(())
    }

    async fn policies(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.text_map("SELECT service, policy FROM policies").await
    }

    async fn set_policy(&self, service: &str, policy: Option<&str>) -> Result<(), StoreError> {
        match policy {
            Some(policy) => {
                self.execute(
                    "INSERT INTO policies (service, policy) VALUES ($1, $2)
                     ON CONFLICT (service) DO UPDATE SET policy = excluded.policy",
                    &[&service, &policy],
                )
                .await?
            }
            None => {
                self.execute("DELETE FROM policies WHERE service = $1", &[&service])
                    .await?
            }
        };
        Ok(())
    }

    async fn insert_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO tasks ({TASK_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        );
        let params: &[&(dyn ToSql + Sync)] = &[
            &task.id,
            &task.kind,
            &task.service,
            &task.vm_id,
            &task.state.as_str(),
            &task.stage,
            &i32::from(task.percent),
            &task.error,
            &signed(task.created_at_ms),
            &signed(task.updated_at_ms),
            &task.owner,
            &task.ended_at_ms.map(signed),
        ];
        self.insert(&sql, params, Entity::Task, &task.id).await
    }

    async fn update_task(
        &self,
        id: &str,
        state: TaskState,
        stage: &str,
        percent: u8,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = signed(now_ms());
        let ended = state.ended().then_some(now);
        self.update(
            "UPDATE tasks SET state = $2, stage = $3, percent = $4, error = $5, updated_at_ms = $6,
                 ended_at_ms = COALESCE($7, ended_at_ms)
             WHERE id = $1",
            &[
                &id,
                &state.as_str(),
                &stage,
                &i32::from(percent.min(100)),
                &error,
                &now,
                &ended,
            ],
            Entity::Task,
            id,
        )
        .await
    }

    async fn set_task_vm(&self, id: &str, vm_id: &str) -> Result<(), StoreError> {
        self.update(
            "UPDATE tasks SET vm_id = $2 WHERE id = $1",
            &[&id, &vm_id],
            Entity::Task,
            id,
        )
        .await
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        self.query_opt(&sql, &[&id], task_row).await
    }

    async fn tasks(&self, limit: u32) -> Result<Vec<TaskRecord>, StoreError> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks ORDER BY created_at_ms DESC, id DESC LIMIT $1"
        );
        self.query(&sql, &[&i64::from(limit)], task_row).await
    }

    async fn fail_running_tasks(&self, reason: &str) -> Result<usize, StoreError> {
        let now = signed(now_ms());
        let failed = self
            .run(|mut client, _| async move {
                let tx = client.transaction().await.map_err(pg)?;
                tx.execute(
                    "UPDATE task_steps SET ended_at_ms = $2, outcome = 'failed', error = $1
                     WHERE ended_at_ms IS NULL AND task_id IN
                         (SELECT id FROM tasks WHERE state IN ('running', 'rolling_back'))",
                    &[&reason, &now],
                )
                .await
                .map_err(pg)?;
                let failed = tx
                    .execute(
                        "UPDATE tasks SET state = 'failed', error = $1, updated_at_ms = $2,
                             ended_at_ms = $2
                         WHERE state IN ('running', 'rolling_back')",
                        &[&reason, &now],
                    )
                    .await
                    .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
                Ok(failed)
            })
            .await?;
        Ok(usize::try_from(failed).unwrap_or(usize::MAX))
    }

    async fn unfinished_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('running', 'rolling_back')
             ORDER BY created_at_ms, id"
        );
        self.query(&sql, &[], task_row).await
    }

    async fn push_task_undo(&self, task_id: &str, action: &str) -> Result<u32, StoreError> {
        // Undo entries are idempotent: one journaled twice by a retry is undone twice.
        self.append_to_task(
            task_id,
            "INSERT INTO task_undo (task_id, seq, action)
             SELECT $1, COALESCE(MAX(seq), 0) + 1, $2
             FROM task_undo WHERE task_id = $1
             RETURNING seq",
            &[&task_id, &action],
            None,
        )
        .await
    }

    async fn task_undos(&self, task_id: &str) -> Result<Vec<TaskUndo>, StoreError> {
        let sql = format!("SELECT {UNDO_COLUMNS} FROM task_undo WHERE task_id = $1 ORDER BY seq");
        self.query(&sql, &[&task_id], undo_row).await
    }

    async fn mark_task_undone(&self, task_id: &str, seq: u32) -> Result<(), StoreError> {
        self.update(
            "UPDATE task_undo SET done = TRUE WHERE task_id = $1 AND seq = $2",
            &[&task_id, &i64::from(seq)],
            Entity::TaskUndo,
            &format!("{task_id}#{seq}"),
        )
        .await
    }

    async fn start_task_step(
        &self,
        task_id: &str,
        stage: &str,
        percent: u8,
        at_ms: u64,
    ) -> Result<u32, StoreError> {
        self.append_to_task(
            task_id,
            "INSERT INTO task_steps (task_id, step, stage, percent, started_at_ms)
             SELECT $1, COALESCE(MAX(step), 0) + 1, $2, $3, $4
             FROM task_steps WHERE task_id = $1
             RETURNING step",
            &[
                &task_id,
                &stage,
                &i32::from(percent.min(100)),
                &signed(at_ms),
            ],
            Some((
                "SELECT step FROM task_steps
                 WHERE task_id = $1 AND stage = $2 AND started_at_ms = $3",
                &[&task_id, &stage, &signed(at_ms)],
            )),
        )
        .await
    }

    async fn end_task_step(
        &self,
        task_id: &str,
        step: u32,
        outcome: StepOutcome,
        error: Option<&str>,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.update(
            "UPDATE task_steps SET ended_at_ms = $3, outcome = $4, error = $5
             WHERE task_id = $1 AND step = $2",
            &[
                &task_id,
                &i64::from(step),
                &signed(at_ms),
                &outcome.as_str(),
                &error,
            ],
            Entity::TaskStep,
            &format!("{task_id}#{step}"),
        )
        .await
    }

    async fn task_steps(&self, task_id: &str) -> Result<Vec<TaskStep>, StoreError> {
        let sql = format!("SELECT {STEP_COLUMNS} FROM task_steps WHERE task_id = $1 ORDER BY step");
        self.query(&sql, &[&task_id], step_row).await
    }

    async fn upsert_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT INTO hosts ({HOST_COLUMNS}) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET address = excluded.address,
                     state = CASE WHEN hosts.state = 'draining' AND excluded.state = 'up' THEN 'draining' ELSE excluded.state END,
                     facts = excluded.facts,
                     last_heartbeat_ms = excluded.last_heartbeat_ms"
            ),
            &[
                &host.name,
                &host.address,
                &host.state.as_str(),
                &host.facts.to_string(),
                &signed(host.last_heartbeat_ms),
            ],
        )
        .await?;
        Ok(())
    }

    async fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        let sql = format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = $1");
        self.query_opt(&sql, &[&name], host_row).await
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let sql = format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name");
        self.query(&sql, &[], host_row).await
    }

    async fn change_host_state(
        &self,
        name: &str,
        from: HostState,
        to: HostState,
    ) -> Result<bool, StoreError> {
        let changed = self
            .execute(
                "UPDATE hosts SET state = $3 WHERE name = $1 AND state IN ($2, $3)",
                &[&name, &from.as_str(), &to.as_str()],
            )
            .await?;
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
        self.update(
            "UPDATE hosts SET state = CASE WHEN state = 'draining' AND $2::text = 'up' THEN 'draining' ELSE $2::text END,
                 facts = $3, last_heartbeat_ms = $4 WHERE name = $1",
            &[&name, &state.as_str(), &facts.to_string(), &signed(at_ms)],
            Entity::Host,
            name,
        )
        .await
    }

    async fn put_template(&self, t: &TemplateRecord) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT INTO templates ({TEMPLATE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (key) DO UPDATE SET service = excluded.service,
                     host = excluded.host, hash = excluded.hash,
                     size_bytes = excluded.size_bytes, created_at_ms = excluded.created_at_ms,
                     last_used_at_ms = excluded.last_used_at_ms"
            ),
            &[
                &t.key,
                &t.service,
                &t.host,
                &t.hash,
                &signed(t.size_bytes),
                &signed(t.created_at_ms),
                &signed(t.last_used_at_ms),
            ],
        )
        .await?;
        Ok(())
    }

    async fn template(&self, key: &str) -> Result<Option<TemplateRecord>, StoreError> {
        let sql = format!("SELECT {TEMPLATE_COLUMNS} FROM templates WHERE key = $1");
        self.query_opt(&sql, &[&key], template_row).await
    }

    async fn templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        let sql = format!("SELECT {TEMPLATE_COLUMNS} FROM templates ORDER BY key");
        self.query(&sql, &[], template_row).await
    }

    async fn template_used(&self, key: &str, at_ms: u64) -> Result<(), StoreError> {
        self.update(
            "UPDATE templates SET last_used_at_ms = GREATEST(last_used_at_ms, $2) WHERE key = $1",
            &[&key, &signed(at_ms)],
            Entity::Template,
            key,
        )
        .await
    }

    async fn remove_template(&self, key: &str) -> Result<bool, StoreError> {
        let removed = self
            .execute("DELETE FROM templates WHERE key = $1", &[&key])
            .await?;
        Ok(removed == 1)
    }

    async fn insert_import(&self, import: &ImportRecord) -> Result<(), StoreError> {
        let sql = format!("INSERT INTO imports ({IMPORT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)");
        let spec = import.spec.to_string();
        let params: &[&(dyn ToSql + Sync)] = &[
            &import.name,
            &import.owner,
            &import.format,
            &spec,
            &signed(import.disk_bytes),
            &signed(import.created_at_ms),
        ];
        self.insert(&sql, params, Entity::Import, &import.name)
            .await
    }

    async fn import(&self, name: &str) -> Result<Option<ImportRecord>, StoreError> {
        let sql = format!("SELECT {IMPORT_COLUMNS} FROM imports WHERE name = $1");
        self.query_opt(&sql, &[&name], import_row).await
    }

    async fn imports(&self) -> Result<Vec<ImportRecord>, StoreError> {
        let sql = format!("SELECT {IMPORT_COLUMNS} FROM imports ORDER BY name");
        self.query(&sql, &[], import_row).await
    }

    async fn remove_import(&self, name: &str) -> Result<bool, StoreError> {
        let removed = self
            .execute("DELETE FROM imports WHERE name = $1", &[&name])
            .await?;
        Ok(removed == 1)
    }

    async fn put_archive(&self, a: &ArchiveRecord) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT INTO archives ({ARCHIVE_COLUMNS}) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (vm_id) DO UPDATE SET tier = excluded.tier,
                     size_bytes = excluded.size_bytes, host = excluded.host,
                     created_at_ms = excluded.created_at_ms"
            ),
            &[
                &a.vm_id,
                &a.tier,
                &signed(a.size_bytes),
                &a.host,
                &signed(a.created_at_ms),
            ],
        )
        .await?;
        Ok(())
    }

    async fn archive(&self, vm_id: &str) -> Result<Option<ArchiveRecord>, StoreError> {
        let sql = format!("SELECT {ARCHIVE_COLUMNS} FROM archives WHERE vm_id = $1");
        self.query_opt(&sql, &[&vm_id], archive_row).await
    }

    async fn archives(&self) -> Result<Vec<ArchiveRecord>, StoreError> {
        let sql = format!("SELECT {ARCHIVE_COLUMNS} FROM archives ORDER BY vm_id");
        self.query(&sql, &[], archive_row).await
    }

    async fn remove_archive(&self, vm_id: &str) -> Result<bool, StoreError> {
        let removed = self
            .execute("DELETE FROM archives WHERE vm_id = $1", &[&vm_id])
            .await?;
        Ok(removed == 1)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        // INSERT … ON CONFLICT DO UPDATE is atomic under concurrency: a caller that finds
        // the row being inserted or updated by another waits for it, then tests the WHERE
        // against the row as that one left it; a refused update changes no row.
        let changed = self
            .execute(
                "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                     expires_ms = excluded.expires_ms
                 WHERE leases.holder = excluded.holder OR leases.expires_ms <= $4",
                &[&name, &holder, &lease_end(now_ms, ttl_ms), &signed(now_ms)],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let deleted = self
            .execute(
                "DELETE FROM leases WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
            .await?;
        Ok(deleted == 1)
    }

    async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE name = $1");
        self.query_opt(&sql, &[&name], lease_row).await
    }

    async fn quotas(&self) -> Result<Vec<(String, crate::Limits)>, StoreError> {
        self.quotas_now().await
    }

    async fn set_quota(
        &self,
        owner: &str,
        limits: Option<&crate::Limits>,
    ) -> Result<(), StoreError> {
        self.set_quota_now(owner, limits).await
    }

    async fn use_by_owner(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(String, crate::Usage)>, StoreError> {
        self.use_by_owner_now(owner).await
    }

    async fn usage_events(&self, since_ms: u64) -> Result<Vec<crate::UsageEvent>, StoreError> {
        self.usage_events_now(since_ms).await
    }

    async fn insert_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let sql = format!("INSERT INTO users ({USER_COLUMNS}) VALUES ($1, $2, $3)");
        let params: &[&(dyn ToSql + Sync)] =
            &[&user.name, &user.role.as_str(), &signed(user.created_at_ms)];
        self.insert(&sql, params, Entity::User, &user.name).await
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1");
        self.query_opt(&sql, &[&name], user_row).await
    }

    async fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY name");
        self.query(&sql, &[], user_row).await
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let sql =
            format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
        let sql = sql.as_str();
        self.run(|client, attempt| async move {
            let result = client
                .execute(
                    sql,
                    &[
                        &t.id,
                        &t.user,
                        &t.role.as_str(),
                        &t.hash,
                        &signed(t.created_at_ms),
                        &t.expires_at_ms.map(signed),
                        &t.revoked_at_ms.map(signed),
                        &t.last_used_at_ms.map(signed),
                    ],
                )
                .await;
            match result {
                Err(err) if err.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                    Err(StoreError::not_found(Entity::User, &t.user))
                }
                other => inserted(other, attempt, Entity::Token, &t.id),
            }
        })
        .await
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1");
        self.query_opt(&sql, &[&id], token_row).await
    }

    async fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE $1::TEXT IS NULL OR user_name = $1
             ORDER BY created_at_ms, id"
        );
        self.query(&sql, &[&user], token_row).await
    }

    async fn revoke_token(&self, id: &str, at_ms: u64) -> Result<TokenRecord, StoreError> {
        let sql = format!(
            "UPDATE tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1
             RETURNING {TOKEN_COLUMNS}"
        );
        self.query_opt(&sql, &[&id, &signed(at_ms)], token_row)
            .await?
            .ok_or_else(|| StoreError::not_found(Entity::Token, id))
    }

    async fn token_used(&self, id: &str, at_ms: u64) -> Result<(), StoreError> {
        self.update(
            "UPDATE tokens SET last_used_at_ms = GREATEST(COALESCE(last_used_at_ms, 0), $2)
             WHERE id = $1",
            &[&id, &signed(at_ms)],
            Entity::Token,
            id,
        )
        .await
    }

    async fn insert_audit(&self, e: &AuditRecord) -> Result<u64, StoreError> {
        fn seq(row: &Row) -> Result<i64, StoreError> {
            row.try_get(0).map_err(pg)
        }
        let seqs = self
            .query(
                "INSERT INTO audit (at_ms, user_name, method, route, target, status)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
                &[
                    &signed(e.at_ms),
                    &e.user,
                    &e.method,
                    &e.route,
                    &e.target,
                    &i32::from(e.status),
                ],
                seq,
            )
            .await?;
        let seq = seqs.first().copied().unwrap_or_default();
        u64::try_from(seq).map_err(|_| StoreError::corrupt(&seq.to_string()))
    }

    async fn audit(&self, since_ms: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE at_ms >= $1 ORDER BY seq DESC LIMIT $2"
        );
        let mut entries = self
            .query(&sql, &[&signed(since_ms), &i64::from(limit)], audit_row)
            .await?;
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
        // One conditional write decides who holds the key (see `acquire_lease`); a
        // caller that did not take it reads the row as the winner left it.
        let sql = format!(
            "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE user_name = $1 AND key = $2"
        );
        let sql = sql.as_str();
        self.run(|client, attempt| async move {
            let changed = client
                .execute(
                    "INSERT INTO idempotency_keys (user_name, key, fingerprint, created_at_ms)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (user_name, key) DO UPDATE SET
                         fingerprint = excluded.fingerprint,
                         created_at_ms = excluded.created_at_ms
                     WHERE idempotency_keys.status IS NULL
                       AND idempotency_keys.created_at_ms < $5",
                    &[
                        &user,
                        &key,
                        &fingerprint,
                        &signed(now_ms),
                        &signed(stale_before_ms),
                    ],
                )
                .await
                .map_err(pg)?;
            if changed == 1 {
                return Ok(None);
            }
            let held = match client.query_opt(sql, &[&user, &key]).await.map_err(pg)? {
                Some(row) => idempotency_row(&row)?,
                None => return Ok(None),
            };
            // The broken attempt took the key when the row is unanswered and ours to the ms.
            let ours = attempt.after_broken
                && held.answer.is_none()
                && held.fingerprint == fingerprint
                && held.created_at_ms == now_ms;
            Ok((!ours).then_some(held))
        })
        .await
    }

    async fn answer_idempotency_key(
        &self,
        user: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError> {
        self.update(
            "UPDATE idempotency_keys SET status = $3, body = $4 WHERE user_name = $1 AND key = $2",
            &[&user, &key, &i32::from(status), &body],
            Entity::IdempotencyKey,
            key,
        )
        .await
    }

    async fn release_idempotency_key(&self, user: &str, key: &str) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM idempotency_keys WHERE user_name = $1 AND key = $2 AND status IS NULL",
            &[&user, &key],
        )
        .await?;
        Ok(())
    }

    async fn insert_stack(&self, stack: &crate::StackRecord) -> Result<(), StoreError> {
        self.insert_stack_now(stack).await
    }

    async fn stack(&self, name: &str) -> Result<Option<crate::StackRecord>, StoreError> {
        self.stack_now(name).await
    }

    async fn stacks(&self) -> Result<Vec<crate::StackRecord>, StoreError> {
        self.stacks_now().await
    }

    async fn update_stack(&self, stack: &crate::StackRecord) -> Result<(), StoreError> {
        self.update_stack_now(stack).await
    }

    async fn remove_stack(&self, name: &str) -> Result<bool, StoreError> {
        self.remove_stack_now(name).await
    }

    async fn alerts(&self) -> Result<Vec<crate::Alert>, StoreError> {
        self.alerts_now().await
    }

    async fn put_alert(&self, alert: &crate::Alert) -> Result<(), StoreError> {
        self.put_alert_now(alert).await
    }

    async fn remove_alert(&self, key: &str) -> Result<bool, StoreError> {
        self.remove_alert_now(key).await
    }
}
