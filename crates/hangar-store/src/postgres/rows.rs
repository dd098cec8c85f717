//! Column lists, row decoders and integer conversions for the PostgreSQL tables (which
//! keep unsigned numbers in signed columns).

use tokio_postgres::Row;

use super::pg;
use crate::sqlite::rows::parse_mode;
use crate::{
    ArchiveRecord, HostRecord, HostState, ImportRecord, LeaseRecord, StepOutcome, StoreError,
    TaskRecord, TaskState, TaskStep, TemplateRecord, VmRecord,
};

pub(crate) use crate::sqlite::rows::{
    ARCHIVE_COLUMNS, HOST_COLUMNS, LEASE_COLUMNS, STEP_COLUMNS, TASK_COLUMNS, TEMPLATE_COLUMNS,
    VM_COLUMNS,
};

/// An unsigned value for a signed column (values past `i64::MAX` are clamped: times in
/// milliseconds and sizes in bytes never get there).
pub(crate) fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsigned<T: TryFrom<i64>>(value: i64) -> Result<T, StoreError> {
    T::try_from(value).map_err(|_| StoreError::corrupt(&value.to_string()))
}

fn get_u<T: TryFrom<i64>>(row: &Row, idx: usize) -> Result<T, StoreError> {
    unsigned(row.try_get::<_, i64>(idx).map_err(pg)?)
}

fn get_opt_u<T: TryFrom<i64>>(row: &Row, idx: usize) -> Result<Option<T>, StoreError> {
    row.try_get::<_, Option<i64>>(idx)
        .map_err(pg)?
        .map(unsigned)
        .transpose()
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
) -> Result<T, StoreError> {
    row.try_get(idx).map_err(pg)
}

fn percent(row: &Row, idx: usize) -> Result<u8, StoreError> {
    let value: i32 = get(row, idx)?;
    u8::try_from(value).map_err(|_| StoreError::corrupt(&value.to_string()))
}

pub(crate) fn vm_row(row: &Row) -> Result<VmRecord, StoreError> {
    let state: String = get(row, 6)?;
    let os_name: Option<String> = get(row, 18)?;
    let os_version: Option<String> = get(row, 19)?;
    Ok(VmRecord {
        id: get(row, 0)?,
        host: get(row, 1)?,
        services: serde_json::from_str(get(row, 2)?)?,
        env: serde_json::from_str(get(row, 3)?)?,
        mode: parse_mode(get(row, 4)?)?,
        owner: get(row, 5)?,
        state: state.parse().map_err(|_| StoreError::corrupt(&state))?,
        endpoints: serde_json::from_str(get(row, 7)?)?,
        spec: serde_json::from_str(get(row, 8)?)?,
        pid: get_opt_u(row, 9)?,
        error: get(row, 10)?,
        created_at_ms: get_u(row, 11)?,
        updated_at_ms: get_u(row, 12)?,
        last_used_at_ms: get_u(row, 13)?,
        boot_ms: get_opt_u(row, 14)?,
        memory_mib: get_u(row, 15)?,
        vcpus: get_u(row, 16)?,
        pool: get(row, 17)?,
        os: os_name.zip(os_version),
        state_since_ms: get_u(row, 20)?,
        direct_endpoints: serde_json::from_str(get(row, 21)?)?,
        isolation: get(row, 22)?,
    })
}

pub(crate) fn task_row(row: &Row) -> Result<TaskRecord, StoreError> {
    Ok(TaskRecord {
        id: get(row, 0)?,
        kind: get(row, 1)?,
        service: get(row, 2)?,
        vm_id: get(row, 3)?,
        state: TaskState::parse(get(row, 4)?)?,
        stage: get(row, 5)?,
        percent: percent(row, 6)?,
        error: get(row, 7)?,
        created_at_ms: get_u(row, 8)?,
        updated_at_ms: get_u(row, 9)?,
    })
}

pub(crate) fn step_row(row: &Row) -> Result<TaskStep, StoreError> {
    let outcome: Option<&str> = get(row, 6)?;
    Ok(TaskStep {
        task_id: get(row, 0)?,
        step: get_u(row, 1)?,
        stage: get(row, 2)?,
        percent: percent(row, 3)?,
        started_at_ms: get_u(row, 4)?,
        ended_at_ms: get_opt_u(row, 5)?,
        outcome: outcome.map(StepOutcome::parse).transpose()?,
        error: get(row, 7)?,
    })
}

pub(crate) fn host_row(row: &Row) -> Result<HostRecord, StoreError> {
    Ok(HostRecord {
        name: get(row, 0)?,
        address: get(row, 1)?,
        state: HostState::parse(get(row, 2)?)?,
        facts: serde_json::from_str(get(row, 3)?)?,
        last_heartbeat_ms: get_u(row, 4)?,
    })
}

pub(crate) fn template_row(row: &Row) -> Result<TemplateRecord, StoreError> {
    Ok(TemplateRecord {
        key: get(row, 0)?,
        service: get(row, 1)?,
        host: get(row, 2)?,
        hash: get(row, 3)?,
        size_bytes: get_u(row, 4)?,
        created_at_ms: get_u(row, 5)?,
        last_used_at_ms: get_u(row, 6)?,
    })
}

pub(crate) fn archive_row(row: &Row) -> Result<ArchiveRecord, StoreError> {
    Ok(ArchiveRecord {
        vm_id: get(row, 0)?,
        tier: get(row, 1)?,
        size_bytes: get_u(row, 2)?,
        host: get(row, 3)?,
        created_at_ms: get_u(row, 4)?,
    })
}

pub(crate) fn lease_row(row: &Row) -> Result<LeaseRecord, StoreError> {
    Ok(LeaseRecord {
        name: get(row, 0)?,
        holder: get(row, 1)?,
        expires_ms: get_u(row, 2)?,
    })
}

pub(crate) use crate::sqlite::rows::{
    AUDIT_COLUMNS, IDEMPOTENCY_COLUMNS, TOKEN_COLUMNS, USER_COLUMNS,
};

pub(crate) fn user_row(row: &Row) -> Result<crate::UserRecord, StoreError> {
    Ok(crate::UserRecord {
        name: get(row, 0)?,
        role: crate::access::parse_role(get(row, 1)?)?,
        created_at_ms: get_u(row, 2)?,
    })
}

pub(crate) fn token_row(row: &Row) -> Result<crate::TokenRecord, StoreError> {
    Ok(crate::TokenRecord {
        id: get(row, 0)?,
        user: get(row, 1)?,
        role: crate::access::parse_role(get(row, 2)?)?,
        hash: get(row, 3)?,
        created_at_ms: get_u(row, 4)?,
        expires_at_ms: get_opt_u(row, 5)?,
        revoked_at_ms: get_opt_u(row, 6)?,
        last_used_at_ms: get_opt_u(row, 7)?,
    })
}

fn status(value: i32) -> Result<u16, StoreError> {
    u16::try_from(value).map_err(|_| StoreError::corrupt(&value.to_string()))
}

pub(crate) fn audit_row(row: &Row) -> Result<crate::AuditRecord, StoreError> {
    Ok(crate::AuditRecord {
        seq: get_u(row, 0)?,
        at_ms: get_u(row, 1)?,
        user: get(row, 2)?,
        method: get(row, 3)?,
        route: get(row, 4)?,
        target: get(row, 5)?,
        status: status(get(row, 6)?)?,
    })
}

pub(crate) fn idempotency_row(row: &Row) -> Result<crate::IdempotencyRecord, StoreError> {
    let code: Option<i32> = get(row, 4)?;
    let body: Option<String> = get(row, 5)?;
    Ok(crate::IdempotencyRecord {
        user: get(row, 0)?,
        key: get(row, 1)?,
        fingerprint: get(row, 2)?,
        created_at_ms: get_u(row, 3)?,
        answer: code.map(status).transpose()?.zip(body),
    })
}

pub(crate) const IMPORT_COLUMNS: &str = "name, owner, format, spec, disk_bytes, created_at_ms";

pub(crate) fn import_row(row: &Row) -> Result<ImportRecord, StoreError> {
    Ok(ImportRecord {
        name: get(row, 0)?,
        owner: get(row, 1)?,
        format: get(row, 2)?,
        spec: serde_json::from_str(get(row, 3)?)?,
        disk_bytes: get_u(row, 4)?,
        created_at_ms: get_u(row, 5)?,
    })
}
