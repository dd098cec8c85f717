//! PostgreSQL schema migrations, recorded in `schema_migrations` (one row per version
//! applied). All of them run in one transaction under an advisory lock, so servers
//! starting at once against one database migrate it once, in order.

use deadpool_postgres::Object;

use super::pg;
use crate::{StoreError, now_ms};

/// Key of the advisory lock held while migrating (any constant unique to hangar).
const MIGRATION_LOCK: i64 = 0x6861_6e67_6172_0001;

/// Each entry moves the schema from version `i` to `i + 1`. Version 1 is the SQLite
/// schema at its version 6; version `v` after it is SQLite's version `v + 5`.
pub(crate) const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE vms (
        id               TEXT PRIMARY KEY,
        host             TEXT NOT NULL,
        services         TEXT NOT NULL,
        env              TEXT NOT NULL,
        mode             TEXT NOT NULL,
        owner            TEXT NOT NULL,
        state            TEXT NOT NULL,
        endpoints        TEXT NOT NULL,
        spec             TEXT NOT NULL,
        pid              BIGINT,
        error            TEXT,
        created_at_ms    BIGINT NOT NULL,
        updated_at_ms    BIGINT NOT NULL,
        last_used_at_ms  BIGINT NOT NULL,
        boot_ms          BIGINT,
        memory_mib       BIGINT NOT NULL,
        vcpus            BIGINT NOT NULL,
        pool             TEXT,
        os_name          TEXT,
        os_version       TEXT,
        state_since_ms   BIGINT NOT NULL,
        direct_endpoints TEXT NOT NULL
    );
    CREATE INDEX vms_state ON vms (state);
    CREATE INDEX vms_owner ON vms (owner);
    CREATE TABLE tasks (
        id            TEXT PRIMARY KEY,
        kind          TEXT NOT NULL,
        service       TEXT,
        vm_id         TEXT,
        state         TEXT NOT NULL,
        stage         TEXT NOT NULL,
        percent       INTEGER NOT NULL,
        error         TEXT,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE INDEX tasks_created ON tasks (created_at_ms);
    CREATE TABLE task_steps (
        task_id       TEXT NOT NULL,
        step          BIGINT NOT NULL,
        stage         TEXT NOT NULL,
        percent       INTEGER NOT NULL,
        started_at_ms BIGINT NOT NULL,
        ended_at_ms   BIGINT,
        outcome       TEXT,
        error         TEXT,
        PRIMARY KEY (task_id, step)
    );
    CREATE TABLE pool_bounds (
        name  TEXT PRIMARY KEY,
        min   BIGINT NOT NULL,
        max   BIGINT NOT NULL,
        ready TEXT
    );
    CREATE TABLE policies (
        service TEXT PRIMARY KEY,
        policy  TEXT NOT NULL
    );
    CREATE TABLE hosts (
        name              TEXT PRIMARY KEY,
        address           TEXT NOT NULL,
        state             TEXT NOT NULL,
        facts             TEXT NOT NULL,
        last_heartbeat_ms BIGINT NOT NULL
    );
    CREATE TABLE templates (
        key             TEXT PRIMARY KEY,
        service         TEXT NOT NULL,
        host            TEXT NOT NULL,
        hash            TEXT NOT NULL,
        size_bytes      BIGINT NOT NULL,
        created_at_ms   BIGINT NOT NULL,
        last_used_at_ms BIGINT NOT NULL
    );
    CREATE TABLE archives (
        vm_id         TEXT PRIMARY KEY,
        tier          TEXT NOT NULL,
        size_bytes    BIGINT NOT NULL,
        host          TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );",
    // Leases (the leader of several control-plane replicas sharing a store).
    "
    CREATE TABLE leases (
        name       TEXT PRIMARY KEY,
        holder     TEXT NOT NULL,
        expires_ms BIGINT NOT NULL
    );",
    // A VM's isolation group (placement: no two VMs of a group on one host).
    "ALTER TABLE vms ADD COLUMN isolation TEXT;",
    // A host's VMs by host (each heartbeat reads its host's), not by a scan of them all.
    "CREATE INDEX vms_host ON vms (host);",
    // Quotas per user (the VMs' owner); a NULL limit is no limit.
    "CREATE TABLE quotas (
        owner         TEXT PRIMARY KEY,
        vms           BIGINT,
        vcpus         BIGINT,
        memory_mib    BIGINT,
        archive_bytes BIGINT
    );",
    // Usage metering (as SQLite's): every change of a VM's state, owner, host, services or
    // size is recorded by a trigger in the statement that makes it.
    "CREATE TABLE vm_usage_events (
        seq           BIGSERIAL PRIMARY KEY,
        vm_id         TEXT NOT NULL,
        state         TEXT NOT NULL,
        at_ms         BIGINT NOT NULL,
        owner         TEXT NOT NULL,
        services      TEXT NOT NULL,
        host          TEXT NOT NULL,
        vcpus         BIGINT NOT NULL,
        memory_mib    BIGINT NOT NULL,
        archive_bytes BIGINT NOT NULL
    );
    CREATE INDEX vm_usage_events_vm ON vm_usage_events (vm_id, seq);
    INSERT INTO vm_usage_events
        (vm_id, state, at_ms, owner, services, host, vcpus, memory_mib, archive_bytes)
        SELECT id, state, state_since_ms, owner, services, host, vcpus, memory_mib, 0 FROM vms;
    CREATE FUNCTION hangar_vm_usage_event() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        at BIGINT := NEW.state_since_ms;
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            IF NEW.state IS NOT DISTINCT FROM OLD.state
               AND NEW.owner IS NOT DISTINCT FROM OLD.owner
               AND NEW.host IS NOT DISTINCT FROM OLD.host
               AND NEW.services IS NOT DISTINCT FROM OLD.services
               AND NEW.vcpus IS NOT DISTINCT FROM OLD.vcpus
               AND NEW.memory_mib IS NOT DISTINCT FROM OLD.memory_mib THEN
                RETURN NULL;
            END IF;
            IF NEW.state IS NOT DISTINCT FROM OLD.state THEN
                at := (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT;
            END IF;
        END IF;
        INSERT INTO vm_usage_events
            (vm_id, state, at_ms, owner, services, host, vcpus, memory_mib, archive_bytes)
        VALUES (NEW.id, NEW.state, at, NEW.owner, NEW.services, NEW.host, NEW.vcpus,
                NEW.memory_mib,
                CASE WHEN NEW.state = 'archived'
                     THEN COALESCE((SELECT size_bytes FROM archives WHERE vm_id = NEW.id), 0)
                     ELSE 0 END);
        RETURN NULL;
    END $$;
    CREATE TRIGGER vms_usage AFTER INSERT OR UPDATE ON vms
        FOR EACH ROW EXECUTE FUNCTION hangar_vm_usage_event();",
    // Users, their API tokens (hashes only), the audit log of mutating calls, and the
    // answers kept for idempotency keys.
    "CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        role          TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );
    CREATE TABLE tokens (
        id              TEXT PRIMARY KEY,
        user_name       TEXT NOT NULL REFERENCES users (name),
        role            TEXT NOT NULL,
        hash            TEXT NOT NULL,
        created_at_ms   BIGINT NOT NULL,
        expires_at_ms   BIGINT,
        revoked_at_ms   BIGINT,
        last_used_at_ms BIGINT
    );
    CREATE INDEX tokens_user ON tokens (user_name);
    CREATE TABLE audit (
        seq       BIGSERIAL PRIMARY KEY,
        at_ms     BIGINT NOT NULL,
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
        created_at_ms BIGINT NOT NULL,
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
        disk_bytes    BIGINT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );",
    // Tasks: who started them, when they ended, and the undo journal of their steps.
    "ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT 'hangar';
    ALTER TABLE tasks ADD COLUMN ended_at_ms BIGINT;
    CREATE INDEX tasks_state ON tasks (state);
    CREATE TABLE task_undo (
        task_id       TEXT NOT NULL,
        seq           BIGINT NOT NULL,
        action        TEXT NOT NULL,
        done          BOOLEAN NOT NULL DEFAULT FALSE,
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
        active_since_ms BIGINT NOT NULL,
        firing_since_ms BIGINT,
        clear_since_ms  BIGINT,
        resolved_at_ms  BIGINT
    );",
    // Stacks (issue 18): several VMs as one unit, each stack on its own private /24.
    "CREATE TABLE stacks (
        name          TEXT PRIMARY KEY,
        owner         TEXT NOT NULL,
        spec          TEXT NOT NULL,
        segment       TEXT NOT NULL UNIQUE,
        state         TEXT NOT NULL,
        members       TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );",
];

/// Brings the schema up to the newest version. [`StoreError::SchemaTooNew`] when a newer
/// hangar migrated it further.
pub(crate) async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).expect("few migrations");
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version       BIGINT PRIMARY KEY,
            applied_at_ms BIGINT NOT NULL
        )",
    )
    .await
    .map_err(pg)?;
    let found: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
    for (version, sql) in (1_i64..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
            &[&version, &now],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}
