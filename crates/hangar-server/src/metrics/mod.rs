//! The server's metrics, served at `GET /metrics` in Prometheus's text format (who may
//! read it: the metrics token or an admin, see [`crate::api::auth::roles`]).
//!
//! Two kinds, one page:
//!
//! - **Recorded where the event happens**, with the `metrics` facade into the process's
//!   recorder ([`hangar_host::metrics::install`], called by [`crate::run`]): counters and
//!   histograms of what this process did. Every name is described in [`describe`], so it
//!   is listed (help text, histograms with zero counts) from the first scrape.
//! - **Read at scrape time** from the store and the hosts ([`scrape`]): VMs by state and
//!   host, pools, hosts, archives, unfinished tasks. Gauges whose truth is in the store are
//!   computed from it on every scrape, so they cannot drift and a series that no longer
//!   exists (a host removed) disappears.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `hangar_grants_total` | counter | `served` | requests granted, by how (`shared`, `exact`, `superset`, `partial`, `created`, `cloned`, `woken`) |
//! | `hangar_request_duration_seconds` | histogram | `served` (`error` when refused or failed) | `POST /v1/requests` from validation to the grant |
//! | `hangar_wake_duration_seconds` | histogram | `from` (`sleeping`, `archived`) | a VM's wake until it is active again |
//! | `hangar_tasks_total` | counter | `kind`, `outcome` | tasks this process ran that ended |
//! | `hangar_migrations_total` | counter | `kind` (`live`, `cold`), `outcome` | migrations that ended (recorded by the migration code) |
//! | `hangar_migration_downtime_seconds` | histogram | | how long a live-migrated VM did not run (recorded by the migration code) |
//! | `hangar_vms` | gauge | `host`, `state` | VMs not deleted (every state listed per host, 0 included) |
//! | `hangar_pool_ready`, `hangar_pool_booting`, `hangar_pool_target` | gauge | `pool`, `service` | warm pools: paused VMs ready, VMs being filled, what the pool aims at now |
//! | `hangar_host_up` | gauge | `host` | 1 when the host is `up` |
//! | `hangar_host_state` | gauge | `host`, `state` | 1, labelled with the host's state (`up`, `draining`, `down`, `lost`) |
//! | `hangar_host_heartbeat_age_seconds` | gauge | `host` | since the host's last heartbeat |
//! | `hangar_host_load1` | gauge | `host` | its one-minute load average, as last reported |
//! | `hangar_host_vcpus`, `hangar_host_vcpus_used` | gauge | `host` | its CPUs; vCPUs of the VMs placed there |
//! | `hangar_host_memory_bytes`, `hangar_host_memory_free_bytes`, `hangar_host_memory_used_bytes` | gauge | `host` | its memory; available as reported; taken by VMs placed there |
//! | `hangar_host_disk_free_bytes` | gauge | `host` | free disk under its data dir, as reported |
//! | `hangar_archives`, `hangar_archive_bytes` | gauge | `host`, `tier` | archived VMs' snapshots: how many, how big |
//! | `hangar_tasks_unfinished` | gauge | `kind` | tasks running or rolling back (all replicas) |
//! | `hangar_server_leading` | gauge | | 1 when this replica runs the control loops |

use std::time::Duration;

pub mod scrape;
#[cfg(test)]
mod tests;

/// Requests granted, by how they were served.
pub const GRANTS_TOTAL: &str = "hangar_grants_total";
/// `POST /v1/requests` from validation to the grant (or the error).
pub const REQUEST_DURATION_SECONDS: &str = "hangar_request_duration_seconds";
/// A wake, from the host's call until the VM is active.
pub const WAKE_DURATION_SECONDS: &str = "hangar_wake_duration_seconds";
/// Tasks of this process that ended, by kind and outcome.
pub const TASKS_TOTAL: &str = "hangar_tasks_total";
/// A migration ended: `kind` (`live`, `cold`) and `outcome` (`succeeded`, `failed`,
/// `cancelled`).
pub const MIGRATIONS_TOTAL: &str = "hangar_migrations_total";
/// How long a live-migrated VM did not run (source paused → destination running).
pub const MIGRATION_DOWNTIME_SECONDS: &str = "hangar_migration_downtime_seconds";
/// Live migrations started again because QEMU paused the guest on its own while a
/// client's request was in flight.
pub const MIGRATION_RESTARTS_TOTAL: &str = "hangar_migration_restarts_total";

/// Describes every metric this process records and registers the histograms, so they are
/// listed from the first scrape. Called by [`crate::run`] after installing the recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram, histogram};
    describe_counter!(
        GRANTS_TOTAL,
        "Requests granted, by how they were served (shared, exact, superset, partial, created, cloned, woken)"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Service requests from validation to the grant, by how they were served (error: refused or failed)"
    );
    describe_histogram!(
        WAKE_DURATION_SECONDS,
        Unit::Seconds,
        "Wakes of sleeping or archived VMs until they are active again"
    );
    describe_counter!(
        TASKS_TOTAL,
        "Tasks this server ran that ended, by kind and outcome (succeeded, failed, cancelled)"
    );
    describe_counter!(
        MIGRATIONS_TOTAL,
        "Migrations of VMs between hosts that ended, by kind (live, cold) and outcome"
    );
    describe_counter!(
        MIGRATION_RESTARTS_TOTAL,
        "Live migrations started again because QEMU paused the guest on its own while a client's request was in flight"
    );
    describe_histogram!(
        MIGRATION_DOWNTIME_SECONDS,
        Unit::Seconds,
        "How long a live-migrated VM did not run: from the source's pause to the destination running"
    );
    // Registered, so that each histogram is listed before its first event.
    let _ = histogram!(MIGRATION_DOWNTIME_SECONDS);
    for from in ["sleeping", "archived"] {
        let _ = histogram!(WAKE_DURATION_SECONDS, "from" => from);
    }
}

/// Records a request's end: granted (`served`, its duration) or not (`None`).
pub fn request_ended(served: Option<hangar_api::Served>, took: Duration) {
    let label = match served {
        Some(served) => served_label(served),
        None => "error",
    };
    if served.is_some() {
        metrics::counter!(GRANTS_TOTAL, "served" => label).increment(1);
    }
    metrics::histogram!(REQUEST_DURATION_SECONDS, "served" => label).record(took.as_secs_f64());
}

/// Records a VM woken from `from` (`sleeping` or `archived`) in `took`.
pub fn woke(from: &'static str, took: Duration) {
    metrics::histogram!(WAKE_DURATION_SECONDS, "from" => from).record(took.as_secs_f64());
}

/// Records a task of `kind` that ended as `outcome`.
pub fn task_ended(kind: &str, outcome: hangar_store::TaskState) {
    metrics::counter!(TASKS_TOTAL, "kind" => kind.to_owned(), "outcome" => outcome.as_str())
        .increment(1);
}

/// `served` as the API writes it.
fn served_label(served: hangar_api::Served) -> &'static str {
    use hangar_api::Served;
    match served {
        Served::Shared => "shared",
        Served::Exact => "exact",
        Served::Superset => "superset",
        Served::Partial => "partial",
        Served::Created => "created",
        Served::Cloned => "cloned",
        Served::Woken => "woken",
    }
}
