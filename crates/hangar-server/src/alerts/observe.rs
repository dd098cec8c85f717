//! What the alert rules look at, turned into [`Observation`]s: one function per source
//! (host records, pools, VM failures, tasks), each pure over what was read, and
//! [`Manager::observe_alerts`] that reads them.

use std::collections::BTreeMap;

use hangar_api::PoolView;
use hangar_core::VmState;
use hangar_core::alerts::{AlertConfig, AlertKind, Observation};
use hangar_core::usage::UsageEvent;
use hangar_store::{HostRecord, HostState, TaskRecord, TaskState};

use crate::api::error::error_chain;
use crate::farm::HostInfo;
use crate::manager::Manager;

/// The task kind of a migration, as the migration concern names its tasks.
pub const MIGRATE_TASK: &str = crate::migration::TASK_KIND;

/// How many of the newest tasks are looked at for failed migrations.
const TASKS_LOOKED_AT: u32 = 500;

/// A host's memory and disk, as its facts report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub memory_mib: u64,
    pub free_memory_mib: u64,
    pub free_disk_mib: u64,
}

fn observation(
    kind: AlertKind,
    subject: &str,
    labels: &[(&str, &str)],
    summary: String,
) -> Observation {
    Observation {
        key: kind.key(subject),
        kind,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        summary,
    }
}

/// `host_down` for farm hosts `down` or `lost`; `host_memory` and `host_disk` for hosts
/// up or draining whose facts cross the thresholds. `local` is the server's own host's
/// room (its record carries no facts).
pub fn host_observations(
    config: &AlertConfig,
    hosts: &[HostRecord],
    local: Option<(&str, Room)>,
    now_ms: u64,
) -> Vec<Observation> {
    let mut seen = Vec::new();
    let down = config.rule(AlertKind::HostDown);
    let mut rooms: Vec<(&str, Room)> = local.into_iter().collect();
    for host in hosts {
        match host.state {
            HostState::Down | HostState::Lost if !host.address.is_empty() && down.enabled => {
                let state = host.state.as_str();
                let silent_s = now_ms.saturating_sub(host.last_heartbeat_ms) / 1000;
                seen.push(observation(
                    AlertKind::HostDown,
                    &host.name,
                    &[("host", &host.name), ("state", state)],
                    format!(
                        "host {} is {state}: no heartbeat for {silent_s}s",
                        host.name
                    ),
                ));
            }
            HostState::Up | HostState::Draining => {
                if let Ok(info) = serde_json::from_value::<HostInfo>(host.facts.clone()) {
                    rooms.push((
                        &host.name,
                        Room {
                            memory_mib: info.facts.memory_mib,
                            free_memory_mib: info.facts.free_memory_mib,
                            free_disk_mib: info.facts.free_disk_mib,
                        },
                    ));
                }
            }
            _ => {}
        }
    }
    let memory = config.rule(AlertKind::HostMemory);
    let disk = config.rule(AlertKind::HostDisk);
    for (name, room) in rooms {
        if let (true, Some(above), true) =
            (memory.enabled, memory.above_percent, room.memory_mib > 0)
        {
            let used = room.memory_mib.saturating_sub(room.free_memory_mib);
            let percent = used as f64 * 100.0 / room.memory_mib as f64;
            if percent >= above {
                seen.push(observation(
                    AlertKind::HostMemory,
                    name,
                    &[("host", name)],
                    format!(
                        "host {name} uses {percent:.0}% of its memory ({used} of {} MiB; threshold {above}%)",
                        room.memory_mib
                    ),
                ));
            }
        }
        if let (true, Some(below)) = (disk.enabled, disk.free_below_mib)
            && room.free_disk_mib < below
        {
            seen.push(observation(
                AlertKind::HostDisk,
                name,
                &[("host", name)],
                format!(
                    "host {name} has {} MiB of disk free (threshold {below} MiB)",
                    room.free_disk_mib
                ),
            ));
        }
    }
    seen
}

/// `pool_empty` for pools with no ready VM while requests ask for them (a request rate
/// above zero); `pool_memory` when the pools hold at least the threshold's share of the
/// server's pool memory budget.
pub fn pool_observations(
    config: &AlertConfig,
    pools: &[PoolView],
    budget_mib: u64,
) -> Vec<Observation> {
    let mut seen = Vec::new();
    if config.rule(AlertKind::PoolEmpty).enabled {
        for pool in pools
            .iter()
            .filter(|p| p.ready == 0 && p.max > 0 && p.rate_per_min > 0.0)
        {
            let service = pool.service.as_deref().unwrap_or("(shell)");
            seen.push(observation(
                AlertKind::PoolEmpty,
                &pool.name,
                &[("pool", &pool.name), ("service", service)],
                format!(
                    "pool {} has no ready VM while requests ask for it ({:.1}/min; {} booting)",
                    pool.name, pool.rate_per_min, pool.booting
                ),
            ));
        }
    }
    let memory = config.rule(AlertKind::PoolMemory);
    if let (true, Some(above), true) = (memory.enabled, memory.above_percent, budget_mib > 0) {
        let held: u64 = pools.iter().map(|p| p.memory_mib).sum();
        let percent = held as f64 * 100.0 / budget_mib as f64;
        if percent >= above {
            seen.push(observation(
                AlertKind::PoolMemory,
                "server",
                &[],
                format!(
                    "warm pools hold {percent:.0}% of their memory budget ({held} of {budget_mib} MiB; threshold {above}%)"
                ),
            ));
        }
    }
    seen
}

/// `vm_crashing` for each service whose VMs failed at least the rule's `failures` times
/// within its window (VMs of no service count by VM).
pub fn crash_observations(
    config: &AlertConfig,
    events: &[UsageEvent],
    now_ms: u64,
) -> Vec<Observation> {
    let rule = config.rule(AlertKind::VmCrashing);
    let (true, Some(failures), Some(window)) = (rule.enabled, rule.failures, rule.window) else {
        return Vec::new();
    };
    let since = now_ms.saturating_sub(crate::farm::agents::millis(window));
    let mut by_service: BTreeMap<&str, u32> = BTreeMap::new();
    for event in events
        .iter()
        .filter(|e| e.state == VmState::Failed && e.at_ms >= since)
    {
        let subject = if event.services.is_empty() {
            event.vm_id.as_str()
        } else {
            event.services.as_str()
        };
        *by_service.entry(subject).or_default() += 1;
    }
    by_service
        .into_iter()
        .filter(|(_, n)| *n >= failures)
        .map(|(service, n)| {
            observation(
                AlertKind::VmCrashing,
                service,
                &[("service", service)],
                format!(
                    "VMs of {service} failed {n} times in the last {}",
                    humantime::format_duration(window)
                ),
            )
        })
        .collect()
}

/// `migration_failed` for each migration task that failed within the rule's window.
pub fn migration_observations(
    config: &AlertConfig,
    tasks: &[TaskRecord],
    now_ms: u64,
) -> Vec<Observation> {
    let rule = config.rule(AlertKind::MigrationFailed);
    let (true, Some(window)) = (rule.enabled, rule.window) else {
        return Vec::new();
    };
    let since = now_ms.saturating_sub(crate::farm::agents::millis(window));
    tasks
        .iter()
        .filter(|t| {
            t.kind == MIGRATE_TASK
                && t.state == TaskState::Failed
                && t.ended_at_ms.unwrap_or(t.updated_at_ms) >= since
        })
        .map(|task| {
            let vm = task.vm_id.as_deref().unwrap_or("-");
            observation(
                AlertKind::MigrationFailed,
                &task.id,
                &[("task", &task.id), ("vm", vm)],
                format!(
                    "migration of VM {vm} failed (task {}): {}",
                    task.id,
                    task.error.as_deref().unwrap_or("no reason recorded")
                ),
            )
        })
        .collect()
}

impl Manager {
    /// One look at what the enabled rules watch; `None` (logged) when a source cannot be
    /// read, so that an unreadable store resolves nothing.
    pub async fn observe_alerts(&self, now_ms: u64) -> Option<Vec<Observation>> {
        let config = &self.config.alerts;
        let on = |kind| config.rule(kind).enabled;
        let unreadable = |what: &str, err: &dyn std::error::Error| {
            tracing::warn!(error = %error_chain(err), "alerts: cannot read {what}; this look is skipped");
            None
        };
        let mut seen = Vec::new();
        if on(AlertKind::HostDown) || on(AlertKind::HostMemory) || on(AlertKind::HostDisk) {
            let mut local = None;
            if let Some(host) = self.scheduler.local()
                && let Ok(facts) = host.facts().await
            {
                let room = Room {
                    memory_mib: facts.memory_mib,
                    free_memory_mib: facts.free_memory_mib,
                    free_disk_mib: facts.free_disk_mib,
                };
                local = Some((host.name().to_owned(), room));
            }
            let local = local.as_ref().map(|(name, room)| (name.as_str(), *room));
            match self.store.hosts().await {
                Ok(hosts) => seen.extend(host_observations(config, &hosts, local, now_ms)),
                Err(err) => return unreadable("hosts", &err),
            }
        }
        if on(AlertKind::PoolEmpty) || on(AlertKind::PoolMemory) {
            match self.pool_views().await {
                Ok(pools) => seen.extend(pool_observations(
                    config,
                    &pools,
                    self.config.pool_memory_mib,
                )),
                Err(err) => return unreadable("pools", &err),
            }
        }
        let crashes = config.rule(AlertKind::VmCrashing);
        if let (true, Some(window)) = (crashes.enabled, crashes.window) {
            let since = now_ms.saturating_sub(crate::farm::agents::millis(window));
            match self.store.usage_events(since).await {
                Ok(events) => seen.extend(crash_observations(config, &events, now_ms)),
                Err(err) => return unreadable("VM failures", &err),
            }
        }
        if on(AlertKind::MigrationFailed) {
            match self.store.tasks(TASKS_LOOKED_AT).await {
                Ok(tasks) => seen.extend(migration_observations(config, &tasks, now_ms)),
                Err(err) => return unreadable("tasks", &err),
            }
        }
        Some(seen)
    }
}
