//! Column lists and row decoders for the SQLite tables. A decoder fails with the
//! database's error when a column cannot be read, and with a [`StoreError`] when a value
//! read cannot be decoded.

use hangar_core::Mode;
use rusqlite::Row;

use crate::{
    ArchiveRecord, HostRecord, HostState, ImportRecord, LeaseRecord, StepOutcome, StoreError,
    TaskRecord, TaskState, TaskStep, TemplateRecord, VmRecord,
};

pub(crate) const VM_COLUMNS: &str = "id, host, services, env, mode, owner, state, endpoints, \
     spec, pid, error, created_at_ms, updated_at_ms, last_used_at_ms, boot_ms, memory_mib, \
     vcpus, pool, os_name, os_version, state_since_ms, direct_endpoints, isolation";

pub(crate) const TASK_COLUMNS: &str =
    "id, kind, service, vm_id, state, stage, percent, error, created_at_ms, updated_at_ms";

pub(crate) const STEP_COLUMNS: &str =
    "task_id, step, stage, percent, started_at_ms, ended_at_ms, outcome, error";

pub(crate) const HOST_COLUMNS: &str = "name, address, state, facts, last_heartbeat_ms";

pub(crate) const TEMPLATE_COLUMNS: &str =
    "key, service, host, hash, size_bytes, created_at_ms, last_used_at_ms";

pub(crate) const ARCHIVE_COLUMNS: &str = "vm_id, tier, size_bytes, host, created_at_ms";

pub(crate) const LEASE_COLUMNS: &str = "name, holder, expires_ms";

type Decoded<T> = rusqlite::Result<Result<T, StoreError>>;

pub(crate) fn vm_row(row: &Row<'_>) -> Decoded<VmRecord> {
    let mode: String = row.get(4)?;
    let state: String = row.get(6)?;
    let services: String = row.get(2)?;
    let env: String = row.get(3)?;
    let endpoints: String = row.get(7)?;
    let spec: String = row.get(8)?;
    let direct: String = row.get(21)?;
    let os_name: Option<String> = row.get(18)?;
    let os_version: Option<String> = row.get(19)?;
    let base = VmRecord {
        id: row.get(0)?,
        host: row.get(1)?,
        services: Vec::new(),
        env: Default::default(),
        mode: Mode::Shared,
        owner: row.get(5)?,
        state: hangar_core::VmState::Deleted,
        endpoints: Default::default(),
        direct_endpoints: Default::default(),
        spec: serde_json::Value::Null,
        pid: row.get(9)?,
        error: row.get(10)?,
        created_at_ms: row.get(11)?,
        updated_at_ms: row.get(12)?,
        last_used_at_ms: row.get(13)?,
        boot_ms: row.get(14)?,
        memory_mib: row.get(15)?,
        vcpus: row.get(16)?,
        pool: row.get(17)?,
        os: os_name.zip(os_version),
        state_since_ms: row.get(20)?,
        isolation: row.get(22)?,
    };
    Ok((|| {
        Ok(VmRecord {
            mode: parse_mode(&mode)?,
            state: state.parse().map_err(|_| StoreError::corrupt(&state))?,
            services: serde_json::from_str(&services)?,
            env: serde_json::from_str(&env)?,
            endpoints: serde_json::from_str(&endpoints)?,
            direct_endpoints: serde_json::from_str(&direct)?,
            spec: serde_json::from_str(&spec)?,
            ..base
        })
    })())
}

pub(crate) fn parse_mode(mode: &str) -> Result<Mode, StoreError> {
    match mode {
        "shared" => Ok(Mode::Shared),
        "dedicated" => Ok(Mode::Dedicated),
        other => Err(StoreError::corrupt(other)),
    }
}

pub(crate) fn task_row(row: &Row<'_>) -> Decoded<TaskRecord> {
    let state: String = row.get(4)?;
    let record = TaskRecord {
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
    };
    Ok(TaskState::parse(&state).map(|state| TaskRecord { state, ..record }))
}

pub(crate) fn step_row(row: &Row<'_>) -> Decoded<TaskStep> {
    let outcome: Option<String> = row.get(6)?;
    let step = TaskStep {
        task_id: row.get(0)?,
        step: row.get(1)?,
        stage: row.get(2)?,
        percent: row.get(3)?,
        started_at_ms: row.get(4)?,
        ended_at_ms: row.get(5)?,
        outcome: None,
        error: row.get(7)?,
    };
    Ok(outcome
        .map(|o| StepOutcome::parse(&o))
        .transpose()
        .map(|outcome| TaskStep { outcome, ..step }))
}

pub(crate) fn host_row(row: &Row<'_>) -> Decoded<HostRecord> {
    let state: String = row.get(2)?;
    let facts: String = row.get(3)?;
    let name: String = row.get(0)?;
    let address: String = row.get(1)?;
    let last_heartbeat_ms: u64 = row.get(4)?;
    Ok((|| {
        Ok(HostRecord {
            name,
            address,
            state: HostState::parse(&state)?,
            facts: serde_json::from_str(&facts)?,
            last_heartbeat_ms,
        })
    })())
}

pub(crate) fn template_row(row: &Row<'_>) -> Decoded<TemplateRecord> {
    Ok(Ok(TemplateRecord {
        key: row.get(0)?,
        service: row.get(1)?,
        host: row.get(2)?,
        hash: row.get(3)?,
        size_bytes: row.get(4)?,
        created_at_ms: row.get(5)?,
        last_used_at_ms: row.get(6)?,
    }))
}

pub(crate) fn archive_row(row: &Row<'_>) -> Decoded<ArchiveRecord> {
    Ok(Ok(ArchiveRecord {
        vm_id: row.get(0)?,
        tier: row.get(1)?,
        size_bytes: row.get(2)?,
        host: row.get(3)?,
        created_at_ms: row.get(4)?,
    }))
}

pub(crate) fn lease_row(row: &Row<'_>) -> Decoded<LeaseRecord> {
    Ok(Ok(LeaseRecord {
        name: row.get(0)?,
        holder: row.get(1)?,
        expires_ms: row.get(2)?,
    }))
}

pub(crate) const USER_COLUMNS: &str = "name, role, created_at_ms";

pub(crate) const TOKEN_COLUMNS: &str = "id, user_name, role, hash, created_at_ms, expires_at_ms, \
     revoked_at_ms, last_used_at_ms";

pub(crate) const AUDIT_COLUMNS: &str = "seq, at_ms, user_name, method, route, target, status";

pub(crate) const IDEMPOTENCY_COLUMNS: &str =
    "user_name, key, fingerprint, created_at_ms, status, body";

pub(crate) fn user_row(row: &Row<'_>) -> Decoded<crate::UserRecord> {
    let role: String = row.get(1)?;
    let name: String = row.get(0)?;
    let created_at_ms: u64 = row.get(2)?;
    Ok(
        crate::access::parse_role(&role).map(|role| crate::UserRecord {
            name,
            role,
            created_at_ms,
        }),
    )
}

pub(crate) fn token_row(row: &Row<'_>) -> Decoded<crate::TokenRecord> {
    let role: String = row.get(2)?;
    let id: String = row.get(0)?;
    let user: String = row.get(1)?;
    let hash: String = row.get(3)?;
    let created_at_ms: u64 = row.get(4)?;
    let expires_at_ms: Option<u64> = row.get(5)?;
    let revoked_at_ms: Option<u64> = row.get(6)?;
    let last_used_at_ms: Option<u64> = row.get(7)?;
    Ok(
        crate::access::parse_role(&role).map(|role| crate::TokenRecord {
            id,
            user,
            role,
            hash,
            created_at_ms,
            expires_at_ms,
            revoked_at_ms,
            last_used_at_ms,
        }),
    )
}

pub(crate) fn audit_row(row: &Row<'_>) -> Decoded<crate::AuditRecord> {
    Ok(Ok(crate::AuditRecord {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        user: row.get(2)?,
        method: row.get(3)?,
        route: row.get(4)?,
        target: row.get(5)?,
        status: row.get(6)?,
    }))
}

pub(crate) fn idempotency_row(row: &Row<'_>) -> Decoded<crate::IdempotencyRecord> {
    let status: Option<u16> = row.get(4)?;
    let body: Option<String> = row.get(5)?;
    Ok(Ok(crate::IdempotencyRecord {
        user: row.get(0)?,
        key: row.get(1)?,
        fingerprint: row.get(2)?,
        created_at_ms: row.get(3)?,
        answer: status.zip(body),
    }))
}

pub(crate) const IMPORT_COLUMNS: &str = "name, owner, format, spec, disk_bytes, created_at_ms";

pub(crate) fn import_row(row: &Row<'_>) -> Decoded<ImportRecord> {
    let spec: String = row.get(3)?;
    let name: String = row.get(0)?;
    let owner: String = row.get(1)?;
    let format: String = row.get(2)?;
    let disk_bytes: u64 = row.get(4)?;
    let created_at_ms: u64 = row.get(5)?;
    Ok(serde_json::from_str(&spec)
        .map_err(StoreError::from)
        .map(|spec| ImportRecord {
            name,
            owner,
            format,
            spec,
            disk_bytes,
            created_at_ms,
        }))
}
