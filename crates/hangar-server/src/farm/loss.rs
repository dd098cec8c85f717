//! Hosts that stop answering. Run by the leading replica every second:
//!
//! 1. No heartbeat for [`LossTimes::down_after`](crate::farm::LossTimes): the host is
//!    `down`. Nothing new is placed there; its VMs are left as they are (it may be a blip).
//! 2. No heartbeat for [`LossTimes::lost_after`](crate::farm::LossTimes): the host is
//!    `lost`. Its VMs are marked `lost` (kept, not deleted: the host may still run them),
//!    their stable endpoints closed, shared services that were in use are requested again
//!    (placed on another host), and warm pools refill elsewhere (lost VMs no longer count).
//! 3. When the host sends a heartbeat again it is `up`, and fencing ([`crate::farm::agents`])
//!    has it destroy the VMs that were replaced.

use std::sync::Arc;

use hangar_core::{Mode, ServiceRequest, VmState};
use hangar_store::{HostRecord, HostState, now_ms};

use crate::api::error::error_chain;
use crate::farm::agents::millis;
use crate::manager::Manager;

impl Manager {
    /// One round: hosts without heartbeats become `down`, then `lost`; the scheduler's
    /// cache of the farm is updated from the same read. Returns the hosts declared lost in
    /// this round.
    pub async fn watch_hosts_once(self: &Arc<Self>) -> Vec<String> {
        let now = now_ms();
        let records = match self.store.hosts().await {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "cannot read farm hosts");
                return Vec::new();
            }
        };
        let down_after = millis(self.config.host_loss.down_after);
        let lost_after = millis(self.config.host_loss.lost_after);
        let mut lost = Vec::new();
        let mut changed = false;
        let own = self.scheduler.local().map(|local| local.name().to_owned());
        for record in records
            .iter()
            .filter(|r| !r.address.is_empty() && Some(&r.name) != own.as_ref())
        {
            let silent = now.saturating_sub(record.last_heartbeat_ms);
            let next = match record.state {
                HostState::Up | HostState::Draining if silent >= lost_after => HostState::Lost,
                HostState::Up | HostState::Draining if silent >= down_after => HostState::Down,
                HostState::Down if silent >= lost_after => HostState::Lost,
                _ => continue,
            };
            if let Err(err) = self.set_host_state(record, next).await {
                tracing::warn!(host = %record.name, error = %error_chain(&err), "cannot record host state");
                continue;
            }
            changed = true;
            tracing::warn!(host = %record.name, silent_ms = silent, state = ?next, "farm host not answering");
            if next == HostState::Lost {
                self.declare_lost(&record.name).await;
                lost.push(record.name.clone());
            }
        }
        if changed && let Ok(after) = self.store.hosts().await {
            self.scheduler.update_farm(after);
        } else {
            self.scheduler.update_farm(records);
        }
        lost
    }

    /// Records a host's new state, unless a heartbeat arrived since `record` was read.
    async fn set_host_state(
        &self,
        record: &HostRecord,
        state: HostState,
    ) -> Result<(), hangar_store::StoreError> {
        match self.store.host(&record.name).await? {
            Some(now) if now.last_heartbeat_ms == record.last_heartbeat_ms => {
                self.store.upsert_host(&HostRecord { state, ..now }).await
            }
            _ => Ok(()),
        }
    }

    /// A host is lost: its VMs are marked lost; the shared services among them that were
    /// in use are requested again (a new VM elsewhere); pools refill.
    async fn declare_lost(self: &Arc<Self>, host: &str) {
        let vms = match self.store.vms(false).await {
            Ok(vms) => vms,
            Err(err) => {
                tracing::warn!(host, error = %error_chain(&err), "cannot list the VMs of a lost host");
                return;
            }
        };
        let reason = format!("its host {host} stopped answering");
        let mut again = Vec::new();
        for vm in vms.into_iter().filter(|vm| vm.host == host) {
            if matches!(vm.state, VmState::Deleted | VmState::Failed | VmState::Lost) {
                continue;
            }
            if let Err(err) = self
                .store
                .transition(&vm.id, VmState::Lost, Some(&reason))
                .await
            {
                tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot mark vm lost");
                continue;
            }
            self.close_endpoints(&vm.id).await;
            tracing::warn!(vm = %vm.id, host, state = %vm.state, "vm lost with its host");
            if vm.mode == Mode::Shared
                && matches!(vm.state, VmState::Active | VmState::Sleeping)
                && let Some(service) = vm.services.first()
            {
                match self.secrets.open_env(&vm.env) {
                    Ok(env) => again.push((service.clone(), env)),
                    Err(err) => {
                        tracing::warn!(vm = %vm.id, error = %err, "cannot provision a lost shared service again")
                    }
                }
            }
        }
        again.sort();
        again.dedup();
        for (service, env) in again {
            let manager = self.clone();
            let host = host.to_owned();
            tokio::spawn(async move {
                let request = ServiceRequest {
                    service: Some(service.clone()),
                    env,
                    mode: Mode::Shared,
                    ..ServiceRequest::default()
                };
                match manager.request(request).await {
                    Ok(_) => {
                        tracing::info!(service = %service, lost_host = %host, "shared service provisioned again")
                    }
                    Err(err) => {
                        tracing::warn!(service = %service, lost_host = %host, error = %err, "cannot provision a lost shared service again")
                    }
                }
            });
        }
        self.pools.refill();
    }
}

/// How often hosts' heartbeats are looked at.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Manager {
    /// Every second: the farm's host records are read into the scheduler (every replica),
    /// and (the leading replica, from the same read) hosts without heartbeats are declared
    /// down, then lost.
    pub fn spawn_farm_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if manager.farm.leading() {
                    manager.watch_hosts_once().await;
                } else {
                    manager.refresh_farm().await;
                }
            }
        })
    }
}
