//! What `GET /metrics` reads at scrape time: the store's truth (VMs by host and state,
//! pools, hosts as their heartbeats left them, archives, unfinished tasks), rendered per
//! scrape into a recorder of its own ([`hangar_host::metrics::render_snapshot`]) and put
//! after what the process recorded.

use std::collections::BTreeMap;

use hangar_api::HostView;
use hangar_core::VmState;
use hangar_store::{ArchiveRecord, TaskRecord};
use metrics::{Unit, describe_gauge, gauge};

use crate::manager::Manager;
use crate::pools::PoolView;

const MIB: f64 = 1_048_576.0;

/// What one scrape read.
struct Snapshot {
    hosts: Vec<HostView>,
    pools: Vec<PoolView>,
    archives: Vec<ArchiveRecord>,
    unfinished: Vec<TaskRecord>,
    leading: bool,
}

/// Why a scrape could not read what it shows.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error(transparent)]
    Hosts(#[from] crate::farm::FarmError),
    #[error(transparent)]
    Pools(#[from] crate::pools::PoolError),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

impl Manager {
    /// The page `GET /metrics` answers: what this process recorded, then what the store
    /// and the hosts say now. Fails when the store cannot be read (a scrape then fails,
    /// rather than showing a partial farm).
    pub async fn render_metrics(&self) -> Result<String, ScrapeError> {
        let snapshot = Snapshot {
            hosts: self.host_views().await?,
            pools: self.pool_views().await?,
            archives: self.store.archives().await?,
            unfinished: self.store.unfinished_tasks().await?,
            leading: self.farm.leading(),
        };
        let mut page = hangar_host::metrics::render_recorded();
        page.push_str(&hangar_host::metrics::render_snapshot(|| record(&snapshot)));
        Ok(page)
    }
}

fn record(snapshot: &Snapshot) {
    describe();
    for host in &snapshot.hosts {
        record_host(host);
    }
    for pool in &snapshot.pools {
        let service = pool.service.clone().unwrap_or_default();
        let labels = [("pool", pool.name.clone()), ("service", service)];
        gauge!("hangar_pool_ready", &labels).set(f64::from(pool.ready));
        gauge!("hangar_pool_booting", &labels).set(f64::from(pool.booting));
        gauge!("hangar_pool_target", &labels).set(f64::from(pool.target));
    }
    let mut archives: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    for archive in &snapshot.archives {
        let entry = archives
            .entry((archive.host.as_str(), archive.tier.as_str()))
            .or_default();
        entry.0 += 1;
        entry.1 += archive.size_bytes;
    }
    for ((host, tier), (count, bytes)) in archives {
        let labels = [("host", host.to_owned()), ("tier", tier.to_owned())];
        gauge!("hangar_archives", &labels).set(count as f64);
        gauge!("hangar_archive_bytes", &labels).set(bytes as f64);
    }
    let mut unfinished: BTreeMap<&str, u64> = BTreeMap::new();
    for task in &snapshot.unfinished {
        *unfinished.entry(task.kind.as_str()).or_default() += 1;
    }
    for (kind, count) in unfinished {
        gauge!("hangar_tasks_unfinished", "kind" => kind.to_owned()).set(count as f64);
    }
    gauge!("hangar_server_leading").set(if snapshot.leading { 1.0 } else { 0.0 });
}

/// One host as the server sees it: its state, its VMs by state (every state, 0 included,
/// so a state emptied reads 0 rather than vanishing), and what its last heartbeat said.
fn record_host(host: &HostView) {
    let name = host.name.clone();
    for state in VmState::ALL {
        if state == VmState::Deleted {
            continue;
        }
        let count = host.vms.get(state.as_str()).copied().unwrap_or(0);
        gauge!("hangar_vms", "host" => name.clone(), "state" => state.as_str())
            .set(f64::from(count));
    }
    let labels = [("host", name.clone())];
    gauge!("hangar_host_up", &labels).set(if host.state == "up" { 1.0 } else { 0.0 });
    gauge!("hangar_host_state", "host" => name.clone(), "state" => host.state.clone()).set(1.0);
    gauge!("hangar_host_heartbeat_age_seconds", &labels).set(host.heartbeat_age_s);
    gauge!("hangar_host_load1", &labels).set(host.facts.load);
    gauge!("hangar_host_vcpus", &labels).set(f64::from(host.vcpus));
    gauge!("hangar_host_vcpus_used", &labels).set(f64::from(host.vcpus_used));
    gauge!("hangar_host_memory_bytes", &labels).set(host.memory_mib as f64 * MIB);
    gauge!("hangar_host_memory_free_bytes", &labels).set(host.facts.free_memory_mib as f64 * MIB);
    gauge!("hangar_host_memory_used_bytes", &labels).set(host.memory_used_mib as f64 * MIB);
    gauge!("hangar_host_disk_free_bytes", &labels).set(host.facts.free_disk_mib as f64 * MIB);
}

/// Help texts of the scrape-time gauges.
fn describe() {
    describe_gauge!("hangar_vms", "VMs not deleted, by host and state");
    describe_gauge!(
        "hangar_pool_ready",
        "Paused VMs ready to hand out, by warm pool"
    );
    describe_gauge!(
        "hangar_pool_booting",
        "VMs being filled into each warm pool"
    );
    describe_gauge!(
        "hangar_pool_target",
        "What each warm pool aims to hold now (between its min and max, from the request rate)"
    );
    describe_gauge!("hangar_host_up", "1 when the host is up, else 0");
    describe_gauge!(
        "hangar_host_state",
        "1, labelled with the host's state (up, draining, down, lost)"
    );
    describe_gauge!(
        "hangar_host_heartbeat_age_seconds",
        Unit::Seconds,
        "Time since the host's last heartbeat"
    );
    describe_gauge!(
        "hangar_host_load1",
        "The host's one-minute load average, as last reported"
    );
    describe_gauge!("hangar_host_vcpus", "CPUs of the host");
    describe_gauge!(
        "hangar_host_vcpus_used",
        "vCPUs of the VMs placed on the host"
    );
    describe_gauge!(
        "hangar_host_memory_bytes",
        Unit::Bytes,
        "Memory of the host"
    );
    describe_gauge!(
        "hangar_host_memory_free_bytes",
        Unit::Bytes,
        "Memory available on the host, as last reported"
    );
    describe_gauge!(
        "hangar_host_memory_used_bytes",
        Unit::Bytes,
        "Memory of the VMs placed on the host"
    );
    describe_gauge!(
        "hangar_host_disk_free_bytes",
        Unit::Bytes,
        "Free disk under the host's data directory, as last reported"
    );
    describe_gauge!("hangar_archives", "Archived VM snapshots, by host and tier");
    describe_gauge!(
        "hangar_archive_bytes",
        Unit::Bytes,
        "Bytes the archived VM snapshots take, by host and tier"
    );
    describe_gauge!(
        "hangar_tasks_unfinished",
        "Tasks running or rolling back, by kind (every replica's)"
    );
    describe_gauge!(
        "hangar_server_leading",
        "1 when this server leads (runs the control loops), else 0"
    );
}
