//! Agents registering and reporting, fencing, and the hosts as `GET /v1/hosts` lists them.
//!
//! **Fencing.** Every registration and heartbeat carries the VMs the agent runs. A VM the
//! control plane does not hold live on that host (unknown, deleted, failed, lost, or placed
//! elsewhere) is in the reply's `destroy` list, and the agent destroys it. A host that comes
//! back after being declared lost therefore ends every VM that was replaced meanwhile, so
//! no service runs twice by accident; its lost records are then deleted. The server never
//! deletes anything on a host it cannot reach: it waits for the host to come back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hangar_api::{
    Heartbeat, HeartbeatReply, HostFactsView, HostRegistration, HostView, HostVmView,
};
use hangar_core::VmState;
use hangar_store::{HostRecord, HostState, VmRecord, now_ms};

use crate::api::error::error_chain;
use crate::farm::{HostInfo, valid_host_name};
use crate::manager::{LOCAL_HOST, Manager};
use crate::tasks::Undo;

/// Why a registration or heartbeat was refused.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error("{0}")]
    Invalid(String),
    /// Another agent that still sends heartbeats holds the name.
    #[error("host name {0:?} is taken by another agent that is up")]
    NameTaken(String),
    /// The server does not know the host (or knows another incarnation): register again.
    #[error("host {0:?} is not registered (or registered again since); register")]
    NotRegistered(String),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

impl Manager {
    /// An agent says it is there: the host is recorded `up` with what it reported. When
    /// it was known before under another agent process (the agent started again), its
    /// VMs are reconciled in the background (adopted, or failed when gone).
    pub async fn register_host(
        self: &Arc<Self>,
        registration: HostRegistration,
    ) -> Result<HeartbeatReply, FarmError> {
        let name = registration.name.clone();
        if !valid_host_name(&name) || name == LOCAL_HOST {
            return Err(FarmError::Invalid(format!(
                "host name {name:?}: use 1 to 63 letters, digits, '-', '_' or '.', and not {LOCAL_HOST:?}"
            )));
        }
        if hangar_api::Client::new(&registration.address).is_err() {
            return Err(FarmError::Invalid(format!(
                "agent address {:?} is not http://HOST:PORT",
                registration.address
            )));
        }
        let now = now_ms();
        let known = self.store.host(&name).await?;
        let mut restarted = false;
        if let Some(known) = &known {
            let info: HostInfo = serde_json::from_value(known.facts.clone()).unwrap_or_default();
            let fresh = now.saturating_sub(known.last_heartbeat_ms)
                < millis(self.config.host_loss.down_after);
            if known.address != registration.address
                && fresh
                && matches!(known.state, HostState::Up | HostState::Draining)
                && info.incarnation != registration.incarnation
            {
                return Err(FarmError::NameTaken(name));
            }
            restarted = info.incarnation != registration.incarnation;
        }
        let state = match known.as_ref().map(|known| known.state) {
            Some(HostState::Draining) => HostState::Draining,
            _ => HostState::Up,
        };
        let info = HostInfo {
            incarnation: registration.incarnation,
            labels: registration.labels,
            cost: registration.cost,
            priority: registration.priority,
            facts: registration.facts,
            vms: registration.vms,
        };
        self.store
            .upsert_host(&HostRecord {
                name: name.clone(),
                address: registration.address.clone(),
                state,
                facts: serde_json::to_value(&info).unwrap_or_default(),
                last_heartbeat_ms: now,
            })
            .await?;
        self.refresh_farm().await;
        tracing::info!(host = %name, address = %registration.address, restarted, was = ?known.as_ref().map(|k| k.state), "farm host registered");
        let destroy = self.fence(&name, &info.vms).await?;
        if restarted && let Some(host) = self.scheduler.host(&name) {
            let manager = self.clone();
            tokio::spawn(async move {
                match manager.reconcile_host(host).await {
                    Ok(report) => tracing::info!(
                        host = %name,
                        adopted = report.adopted.len(),
                        failed = report.failed.len(),
                        stopped_unknown = report.stopped_unknown.len(),
                        "reconciled a farm host that started again"
                    ),
                    Err(err) => {
                        tracing::warn!(host = %name, error = %error_chain(&err), "cannot reconcile farm host")
                    }
                }
            });
        }
        Ok(self.reply(state, destroy))
    }

    /// A heartbeat: the host's facts and VMs now. A host that was `down` or `lost` is `up`
    /// again; VMs it no longer runs that should run are judged crashed; lost VMs it no
    /// longer runs are deleted (fenced).
    pub async fn host_heartbeat(
        self: &Arc<Self>,
        name: &str,
        heartbeat: Heartbeat,
    ) -> Result<HeartbeatReply, FarmError> {
        let now = now_ms();
        let Some(known) = self.store.host(name).await? else {
            return Err(FarmError::NotRegistered(name.to_owned()));
        };
        let mut info: HostInfo = serde_json::from_value(known.facts.clone()).unwrap_or_default();
        if info.incarnation != heartbeat.incarnation {
            return Err(FarmError::NotRegistered(name.to_owned()));
        }
        let state = match known.state {
            HostState::Draining => HostState::Draining,
            HostState::Up => HostState::Up,
            back => {
                tracing::info!(host = %name, was = ?back, "farm host answers again");
                HostState::Up
            }
        };
        info.facts = heartbeat.facts;
        info.vms = heartbeat.vms;
        self.store
            .heartbeat(
                name,
                state,
                &serde_json::to_value(&info).unwrap_or_default(),
                now,
            )
            .await?;
        // One read of this host's VMs serves both checks: a heartbeat costs the same
        // however many hosts and VMs the farm has.
        let on_host = self.store.vms_on_host(name).await?;
        let destroy = self
            .not_arriving(name, fenced(name, &info.vms, &on_host))
            .await;
        self.judge_missing(name, &info.vms, on_host).await?;
        Ok(self.reply(state, destroy))
    }

    /// The VMs among `reported` that must not run on `host`: not live there in the store.
    async fn fence(&self, host: &str, reported: &[HostVmView]) -> Result<Vec<String>, FarmError> {
        if reported.is_empty() {
            return Ok(Vec::new());
        }
        let on_host = self.store.vms_on_host(host).await?;
        Ok(self
            .not_arriving(host, fenced(host, reported, &on_host))
            .await)
    }

    /// `destroy` less the VMs being live-migrated to `host`: they run there before the
    /// store places them there ([`crate::migration::live`]). This server's own migrations
    /// are known in memory; another replica's by the store: an unfinished `migrate` task of
    /// the VM whose journal holds an [`Undo::AbortLiveMigration`] to `host` not yet undone
    /// (recorded before the destination's QEMU starts). The store is read only when there
    /// is something to spare from destruction.
    async fn not_arriving(&self, host: &str, mut destroy: Vec<String>) -> Vec<String> {
        if destroy.is_empty() {
            return destroy;
        }
        let moving = self.migrations.all();
        destroy.retain(|id| moving.get(id).is_none_or(|m| m.to != host));
        if !destroy.is_empty() {
            match self.arriving_by_store(host, &destroy).await {
                Ok(arriving) => destroy.retain(|id| !arriving.contains(id)),
                // Nothing is destroyed on a guess: the next heartbeat asks again.
                Err(err) => {
                    tracing::warn!(host, error = %err, "fencing: cannot read the migrations under way; nothing fenced this time");
                    return Vec::new();
                }
            }
        }
        for id in &destroy {
            tracing::warn!(vm = %id, host, "fencing: the host runs a VM it must not; it destroys it");
        }
        destroy
    }

    /// Which of `vms` some server is live-migrating to `host`, by the store's unfinished
    /// `migrate` tasks and their journals.
    async fn arriving_by_store(
        &self,
        host: &str,
        vms: &[String],
    ) -> Result<std::collections::HashSet<String>, hangar_store::StoreError> {
        let mut arriving = std::collections::HashSet::new();
        for task in self.store.unfinished_tasks().await? {
            let Some(vm) = task.vm_id.as_ref().filter(|vm| vms.contains(vm)) else {
                continue;
            };
            if task.kind != crate::migration::TASK_KIND {
                continue;
            }
            let to_host = self
                .store
                .task_undos(&task.id)
                .await?
                .iter()
                .filter(|entry| !entry.done)
                .filter_map(|entry| Undo::decode(&entry.action).ok())
                .any(|undo| {
                    matches!(undo, Undo::AbortLiveMigration { vm: moving, destination, .. }
                        if moving == *vm && destination == host)
                });
            if to_host {
                arriving.insert(vm.clone());
            }
        }
        Ok(arriving)
    }

    /// VMs the store has live on `host` (`on_host`: its VMs in the store) that it did not
    /// report: lost ones are deleted (their host destroyed them); running ones are judged
    /// crashed.
    async fn judge_missing(
        self: &Arc<Self>,
        host: &str,
        reported: &[HostVmView],
        on_host: Vec<VmRecord>,
    ) -> Result<(), FarmError> {
        let reported: std::collections::HashSet<&str> =
            reported.iter().map(|run| run.id.as_str()).collect();
        for vm in on_host {
            if vm.host != host || reported.contains(vm.id.as_str()) {
                continue;
            }
            match vm.state {
                VmState::Lost => {
                    if let Err(err) = self
                        .store
                        .transition(
                            &vm.id,
                            VmState::Deleted,
                            Some("replaced while its host was lost"),
                        )
                        .await
                    {
                        tracing::warn!(vm = %vm.id, error = %err, "cannot delete a fenced vm");
                    } else {
                        tracing::info!(vm = %vm.id, host, "lost vm gone from its host; deleted");
                    }
                }
                VmState::Ready | VmState::Active | VmState::Sleeping => {
                    let manager = self.clone();
                    tokio::spawn(async move { manager.mark_crashed(&vm.id).await });
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn reply(&self, state: HostState, destroy: Vec<String>) -> HeartbeatReply {
        HeartbeatReply {
            state: state.as_str().to_owned(),
            destroy,
            servers: self.config.server_urls.clone(),
        }
    }

    /// Reads the farm's host records into the scheduler.
    pub async fn refresh_farm(&self) {
        match self.store.hosts().await {
            Ok(records) => self.scheduler.update_farm(records),
            Err(err) => tracing::warn!(error = %error_chain(&err), "cannot read farm hosts"),
        }
    }

    /// Every host: the server's own (if it runs VMs) and the farm's, with the VMs placed on
    /// each.
    pub async fn host_views(&self) -> Result<Vec<HostView>, FarmError> {
        let now = now_ms();
        let vms = self.store.vms(false).await?;
        let mut views = Vec::new();
        if let Some(local) = self.scheduler.local() {
            let facts = local.facts().await.ok();
            let record = self.store.host(local.name()).await?;
            views.push(host_view(
                local.name(),
                "",
                HostState::Up,
                now,
                record.map_or(now, |r| r.last_heartbeat_ms.max(now)),
                &HostInfo {
                    cost: 1,
                    facts: facts
                        .map(|f| HostFactsView {
                            hypervisor: f.hypervisor,
                            vcpus: f.vcpus,
                            memory_mib: f.memory_mib,
                            free_memory_mib: f.free_memory_mib,
                            free_disk_mib: f.free_disk_mib,
                            load: f.load,
                            templates: f.templates,
                            blobs: f.blobs,
                            images: f.images,
                        })
                        .unwrap_or_default(),
                    ..HostInfo::default()
                },
                &vms,
            ));
        }
        let own = self.scheduler.local().map(|local| local.name().to_owned());
        for record in self.store.hosts().await? {
            if record.address.is_empty() || Some(&record.name) == own.as_ref() {
                continue;
            }
            let info: HostInfo = serde_json::from_value(record.facts.clone()).unwrap_or_default();
            views.push(host_view(
                &record.name,
                &record.address,
                record.state,
                now,
                record.last_heartbeat_ms,
                &info,
                &vms,
            ));
        }
        Ok(views)
    }
}

/// The VMs among `reported` that must not run on `host`, given `on_host`, the VMs the
/// store records on it: those not live there.
fn fenced(host: &str, reported: &[HostVmView], on_host: &[VmRecord]) -> Vec<String> {
    if reported.is_empty() {
        return Vec::new();
    }
    let vms: HashMap<&str, &VmRecord> = on_host.iter().map(|vm| (vm.id.as_str(), vm)).collect();
    let destroy: Vec<String> = reported
        .iter()
        .filter(|run| {
            !vms.get(run.id.as_str()).is_some_and(|vm| {
                vm.host == host
                    && !matches!(vm.state, VmState::Deleted | VmState::Failed | VmState::Lost)
            })
        })
        .map(|run| run.id.clone())
        .collect();
    destroy
}

fn host_view(
    name: &str,
    address: &str,
    state: HostState,
    now: u64,
    last_heartbeat_ms: u64,
    info: &HostInfo,
    vms: &[VmRecord],
) -> HostView {
    let mut by_state: BTreeMap<String, u32> = BTreeMap::new();
    let (mut vcpus_used, mut memory_used_mib) = (0u32, 0u64);
    for vm in vms.iter().filter(|vm| vm.host == name) {
        *by_state.entry(vm.state.to_string()).or_default() += 1;
        if !matches!(
            vm.state,
            VmState::Archived | VmState::Failed | VmState::Lost | VmState::Deleted
        ) {
            vcpus_used = vcpus_used.saturating_add(vm.vcpus);
            memory_used_mib = memory_used_mib.saturating_add(u64::from(vm.memory_mib));
        }
    }
    HostView {
        name: name.to_owned(),
        address: address.to_owned(),
        state: state.as_str().to_owned(),
        labels: info.labels.clone(),
        cost: info.cost,
        priority: info.priority,
        vcpus: info.facts.vcpus,
        vcpus_used,
        memory_mib: info.facts.memory_mib,
        memory_used_mib,
        vms: by_state,
        load: info.facts.load,
        last_heartbeat_ms,
        heartbeat_age_s: now.saturating_sub(last_heartbeat_ms) as f64 / 1000.0,
        facts: info.facts.clone(),
    }
}

/// A duration in whole milliseconds.
pub(crate) fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
