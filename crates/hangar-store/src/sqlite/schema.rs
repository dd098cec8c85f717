//! SQLite schema migrations, numbered by SQLite's `user_version`.

use rusqlite::Connection;

use super::db;
use crate::StoreError;

/// Each entry moves the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    "CREATE TABLE vms (
        id              TEXT PRIMARY KEY,
        host            TEXT NOT NULL,
        services        TEXT NOT NULL,
        env             TEXT NOT NULL,
        mode            TEXT NOT NULL,
        owner           TEXT NOT NULL,
        state           TEXT NOT NULL,
        endpoints       TEXT NOT NULL,
        spec            TEXT NOT NULL,
        pid             INTEGER,
        error           TEXT,
        created_at_ms   INTEGER NOT NULL,
        updated_at_ms   INTEGER NOT NULL,
        last_used_at_ms INTEGER NOT NULL,
        boot_ms         INTEGER,
        memory_mib      INTEGER NOT NULL,
        vcpus           INTEGER NOT NULL
    );
    CREATE INDEX vms_state ON vms (state);
    CREATE TABLE tasks (
        id            TEXT PRIMARY KEY,
        kind          TEXT NOT NULL,
        service       TEXT,
        vm_id         TEXT,
        state         TEXT NOT NULL,
        stage         TEXT NOT NULL,
        percent       INTEGER NOT NULL,
        error         TEXT,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    CREATE INDEX tasks_created ON tasks (created_at_ms);",
    // Warm pools: which pool a paused VM belongs to, what OS it runs (none for a pre-OS
    // shell), and run-time pool bounds that override the catalog's.
    "ALTER TABLE vms ADD COLUMN pool TEXT;
    ALTER TABLE vms ADD COLUMN os_name TEXT;
    ALTER TABLE vms ADD COLUMN os_version TEXT;
    CREATE TABLE pool_bounds (
        name TEXT PRIMARY KEY,
        min  INTEGER NOT NULL,
        max  INTEGER NOT NULL
    );",
    // A ready criterion set at run time for a pool's fills (JSON), overriding the catalog's.
    "ALTER TABLE pool_bounds ADD COLUMN ready TEXT;",
    // Lifecycle: when a VM entered its state (idle timers count from it), and lifecycle
    // policies set at run time (JSON), overriding the catalog's.
    "ALTER TABLE vms ADD COLUMN state_since_ms INTEGER NOT NULL DEFAULT 0;
    UPDATE vms SET state_since_ms = updated_at_ms;
    CREATE TABLE policies (
        service TEXT PRIMARY KEY,
        policy  TEXT NOT NULL
    );",
    // Stable endpoints: `endpoints` are the addresses clients are given (held by hangar's
    // forwarder); `direct_endpoints` the VM's own port forwards behind them. VMs made
    // before keep their direct endpoints as their endpoints.
    "ALTER TABLE vms ADD COLUMN direct_endpoints TEXT NOT NULL DEFAULT '{}';
    UPDATE vms SET direct_endpoints = endpoints;",
    // Facts that lived outside the store: hosts, templates, archives, task steps; VMs
    // listed by owner.
    "CREATE INDEX vms_owner ON vms (owner);
    CREATE TABLE hosts (
        name              TEXT PRIMARY KEY,
        address           TEXT NOT NULL,
        state             TEXT NOT NULL,
        facts             TEXT NOT NULL,
        last_heartbeat_ms INTEGER NOT NULL
    );
    CREATE TABLE templates (
        key             TEXT PRIMARY KEY,
        service         TEXT NOT NULL,
        host            TEXT NOT NULL,
        hash            TEXT NOT NULL,
        size_bytes      INTEGER NOT NULL,
        created_at_ms   INTEGER NOT NULL,
        last_used_at_ms INTEGER NOT NULL
    );
    CREATE TABLE archives (
        vm_id         TEXT PRIMARY KEY,
        tier          TEXT NOT NULL,
        size_bytes    INTEGER NOT NULL,
        host          TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE task_steps (
        task_id       TEXT NOT NULL,
        step          INTEGER NOT NULL,
        stage         TEXT NOT NULL,
        percent       INTEGER NOT NULL,
        started_at_ms INTEGER NOT NULL,
        ended_at_ms   INTEGER,
        outcome       TEXT,
        error         TEXT,
        PRIMARY KEY (task_id, step)
    );",
    // Leases (the leader of several control-plane replicas sharing a store).
    "CREATE TABLE leases (
        name       TEXT PRIMARY KEY,
        holder     TEXT NOT NULL,
        expires_ms INTEGER NOT NULL
    );",
    // A VM's isolation group (placement: no two VMs of a group on one host).
    "ALTER TABLE vms ADD COLUMN isolation TEXT;",
    // A host's VMs by host (each heartbeat reads its host's), not by a scan of them all.
    "CREATE INDEX vms_host ON vms (host);",
    // Quotas per user (the VMs' owner); a NULL limit is no limit.
    "CREATE TABLE quotas (
        owner         TEXT PRIMARY KEY,
        vms           INTEGER,
        vcpus         INTEGER,
        memory_mib    INTEGER,
        archive_bytes INTEGER
    );",
    // Usage metering: every change of a VM's state (or of its owner, host, services or
    // size) is recorded by a trigger in the statement that makes it, with what the VM was
    // then; each record starts an interval that lasts until the VM's next one. VMs that
    // exist already start with their present state.
    "CREATE TABLE vm_usage_events (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id         TEXT NOT NULL,
        state         TEXT NOT NULL,
        at_ms         INTEGER NOT NULL,
        owner         TEXT NOT NULL,
        services      TEXT NOT NULL,
        host          TEXT NOT NULL,
        vcpus         INTEGER NOT NULL,
        memory_mib    INTEGER NOT NULL,
        archive_bytes INTEGER NOT NULL
    );
    CREATE INDEX vm_usage_events_vm ON vm_usage_events (vm_id, seq);
    INSERT INTO vm_usage_events
        (vm_id, state, at_ms, owner, services, host, vcpus, memory_mib, archive_bytes)
        SELECT id, state, state_since_ms, owner, services, host, vcpus, memory_mib, 0 FROM vms;
    CREATE TRIGGER vms_usage_insert AFTER INSERT ON vms BEGIN
        INSERT INTO vm_usage_events
            (vm_id, state, at_ms, owner, services, host, vcpus, memory_mib, archive_bytes)
        VALUES (NEW.id, NEW.state, NEW.state_since_ms, NEW.owner, NEW.services, NEW.host,
                NEW.vcpus, NEW.memory_mib, 0);
    END;
    CREATE TRIGGER vms_usage_update
        AFTER UPDATE OF state, owner, host, services, vcpus, memory_mib ON vms
        WHEN NEW.state IS NOT OLD.state OR NEW.owner IS NOT OLD.owner
          OR NEW.host IS NOT OLD.host OR NEW.services IS NOT OLD.services
          OR NEW.vcpus IS NOT OLD.vcpus OR NEW.memory_mib IS NOT OLD.memory_mib
    BEGIN
        INSERT INTO vm_usage_events
            (vm_id, state, at_ms, owner, services, host, vcpus, memory_mib, archive_bytes)
        VALUES (NEW.id, NEW.state,
                CASE WHEN NEW.state IS NOT OLD.state THEN NEW.state_since_ms
                     ELSE CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) END,
                NEW.owner, NEW.services, NEW.host, NEW.vcpus, NEW.memory_mib,
                CASE WHEN NEW.state = 'archived'
                     THEN COALESCE((SELECT size_bytes FROM archives WHERE vm_id = NEW.id), 0)
                     ELSE 0 END);
    END;",
    // Users, their API tokens (hashes only), the audit log of mutating calls, and the
    // answers kept for idempotency keys.
    "CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        role          TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        id              TEXT PRIMARY KEY,
        user_name       TEXT NOT NULL REFERENCES users (name),
        role            TEXT NOT NULL,
        hash            TEXT NOT NULL,
        created_at_ms   INTEGER NOT NULL,
        expires_at_ms   INTEGER,
        revoked_at_ms   INTEGER,
        last_used_at_ms INTEGER
    );
    CREATE INDEX tokens_user ON tokens (user_name);
    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms     INTEGER NOT NULL,
        user_name TEXT NOT NULL,
        method    TEXT NOT NULL,
        route     TEXT NOT NULL,
        target    TEXT,
        status    INTEGER NOT NULL
    );
    CREATE INDEX audit_at ON audit (at_ms);
    CREATE TABLE idempotency_keys (
        user_name     TEXT NOT NULL,
        key           TEXT NOT NULL,
        fingerprint   TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        status        INTEGER,
        body          TEXT,
        PRIMARY KEY (user_name, key)
    );",
    // Machines imported from disk images (seed 003, claim 8).
    "CREATE TABLE imports (
        name          TEXT PRIMARY KEY,
        owner         TEXT NOT NULL,
        format        TEXT NOT NULL,
        spec          TEXT NOT NULL,
        disk_bytes    INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL
    );",
    // Tasks: who started them, when they ended, and the undo journal of their steps.
    "ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT 'hangar';
    ALTER TABLE tasks ADD COLUMN ended_at_ms INTEGER;
    CREATE INDEX tasks_state ON tasks (state);
    CREATE TABLE task_undo (
        task_id       TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        action        TEXT NOT NULL,
        done          INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, seq)
    );",
    // Alerts: each one's phase and times, so every replica answers the same and a new
    // leader does not announce again what fired before it led.
    "CREATE TABLE alerts (
        key             TEXT PRIMARY KEY,
        kind            TEXT NOT NULL,
        labels          TEXT NOT NULL,
        summary         TEXT NOT NULL,
        phase           TEXT NOT NULL,
        active_since_ms INTEGER NOT NULL,
        firing_since_ms INTEGER,
        clear_since_ms  INTEGER,
        resolved_at_ms  INTEGER
    );",
    // Stacks (issue 18): several VMs as one unit, each stack on its own private /24.
    "CREATE TABLE stacks (
        name          TEXT PRIMARY KEY,
        owner         TEXT NOT NULL,
        spec          TEXT NOT NULL,
        segment       TEXT NOT NULL UNIQUE,
        state         TEXT NOT NULL,
        members       TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );",
];

/// Brings the schema up to the newest version, one transaction per migration.
/// [`StoreError::SchemaTooNew`] when a newer hangar migrated it further.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).expect("few migrations");
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(db)?;
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    for (version, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction().map_err(db)?;
        tx.execute_batch(sql).map_err(db)?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}
