//! Draining, resuming and evacuating a farm host (issue 17, seed 003's migration):
//! `hangar host drain|resume|evacuate HOST`, admins only.
//!
//! - **Drain** ([`Manager::drain_host`]): the host's record goes `up` → `draining` in one
//!   conditional store write ([`hangar_store::Store::change_host_state`]); heartbeats and
//!   registrations of its agent keep it draining (the store keeps `draining` when they write
//!   `up`). Placement never picks a draining host, so nothing new is made there. Its paused
//!   pool VMs (`ready`, unclaimed) are retired and destroyed at once, and by the pool loop
//!   on every round while it drains (a pool VM still booting when the drain began is
//!   removed once it is ready); the pools refill on other hosts. The VMs in use stay.
//!   A host that is down or lost is refused (it is not taking VMs anyway, and the loss loop
//!   owns its state); draining again answers the same.
//! - **Resume** ([`Manager::resume_host`]): `draining` → `up`, refused while the host is
//!   being evacuated (cancel the task first) and for a host down or lost (it comes back up
//!   by itself when its agent answers). A draining host that stops answering becomes
//!   `down`, then `lost`, like any other, and comes back `up`: drain it again.
//! - **Evacuate** ([`evacuate`], [`run`]): an `evacuate` task that drains the host, then
//!   moves each active, sleeping and archived VM to the best other host
//!   ([`hangar_core::evacuation::Destinations`]: placement's rules, counting the VMs
//!   already sent) through [`crate::migration::migrate`], waiting for each
//!   ([`crate::rebalance::MigrationMover`]), [`MOVES_AT_ONCE`] at a time. Progress:
//!   percent = VMs handled / VMs listed, the stage names the VM being moved. A VM that
//!   cannot move is reported and the others go on; the task then fails naming them, and
//!   the host stays draining. A cancel starts no new move (moves under way end; the rest
//!   are `skipped`). What the evacuation did, VM by VM (from, to, outcome, error, time) is
//!   kept by the server that ran it, in memory, for `GET /v1/hosts/{name}/evacuation`
//!   (the last one per host); the task record in the store outlives it.

pub mod run;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hangar_api::{EvacuationView, HostStateView};
use hangar_core::VmState;
use hangar_store::{HostState, StoreError};

use crate::api::error::error_chain;
use crate::manager::Manager;

pub use run::{MOVES_AT_ONCE, evacuate};

/// The task kind of an evacuation.
pub const TASK_KIND: &str = "evacuate";

/// Why a drain, resume or evacuation was refused.
#[derive(Debug, thiserror::Error)]
pub enum EvacuationError {
    #[error("no farm host {0:?} is known to this server")]
    NoHost(String),
    /// The server's own host: its VMs cannot move (its files are not offered by hash).
    #[error("host {0} is the server's own; only farm hosts (agents) are drained or evacuated")]
    NotOnFarm(String),
    /// Down or lost: not answering.
    #[error(
        "host {host} is {state}: only a host that answers is drained or resumed (it is up \
         again, by itself, once its agent answers)"
    )]
    NotAnswering { host: String, state: &'static str },
    #[error("host {host} is being evacuated (task {task}); cancel the task first")]
    Evacuating { host: String, task: String },
    #[error("this server has no evacuation of host {0} on record")]
    NoEvacuation(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The evacuations this server ran, by host: the one under way or the last.
#[derive(Default)]
pub struct EvacuationRuntime {
    by_host: Mutex<HashMap<String, Arc<Mutex<EvacuationView>>>>,
}

impl EvacuationRuntime {
    /// The evacuation of `host` running here, if any: its task.
    fn running(&self, host: &str) -> Option<String> {
        let all = self.by_host.lock().expect("evacuations lock");
        let report = all.get(host)?.lock().expect("evacuation lock");
        (report.state == "running").then(|| report.task.clone())
    }

    /// Records `report` as `host`'s evacuation, unless one runs (its task then).
    fn start(&self, report: EvacuationView) -> Result<Arc<Mutex<EvacuationView>>, String> {
        let mut all = self.by_host.lock().expect("evacuations lock");
        if let Some(now) = all.get(&report.host) {
            let now = now.lock().expect("evacuation lock");
            if now.state == "running" {
                return Err(now.task.clone());
            }
        }
        let shared = Arc::new(Mutex::new(report));
        let host = shared.lock().expect("evacuation lock").host.clone();
        all.insert(host, shared.clone());
        Ok(shared)
    }

    /// `host`'s last evacuation here, as it stands.
    pub fn report(&self, host: &str) -> Option<EvacuationView> {
        let all = self.by_host.lock().expect("evacuations lock");
        let report = all.get(host)?.lock().expect("evacuation lock").clone();
        Some(report)
    }
}

impl Manager {
    /// Drains farm host `name` (see the module): `draining` from now on, its paused pool
    /// VMs removed. Draining a draining host answers the same.
    pub async fn drain_host(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<HostStateView, EvacuationError> {
        self.change_farm_host(name, HostState::Up, HostState::Draining)
            .await?;
        tracing::info!(host = name, "farm host draining: nothing new goes there");
        let removed = self.retire_pool_vms_on(name).await;
        self.pools.refill();
        Ok(HostStateView {
            name: name.to_owned(),
            state: HostState::Draining.as_str().to_owned(),
            pool_vms_removed: removed,
        })
    }

    /// Resumes draining farm host `name` (see the module): `up`, placement uses it again.
    /// Resuming a host that is up answers the same.
    pub async fn resume_host(&self, name: &str) -> Result<HostStateView, EvacuationError> {
        self.farm_record(name).await?;
        if let Some(task) = self.evacuations.running(name) {
            return Err(EvacuationError::Evacuating {
                host: name.to_owned(),
                task,
            });
        }
        self.change_farm_host(name, HostState::Draining, HostState::Up)
            .await?;
        tracing::info!(host = name, "farm host resumed: it takes VMs again");
        self.pools.refill();
        Ok(HostStateView {
            name: name.to_owned(),
            state: HostState::Up.as_str().to_owned(),
            pool_vms_removed: 0,
        })
    }

    /// Farm host `name` goes from `from` to `to` (or is there already), and the scheduler's
    /// cache sees it at once; refused for a host in another state (down or lost).
    async fn change_farm_host(
        &self,
        name: &str,
        from: HostState,
        to: HostState,
    ) -> Result<(), EvacuationError> {
        self.farm_record(name).await?;
        if !self.store.change_host_state(name, from, to).await? {
            let state = self.farm_record(name).await?.state;
            return Err(EvacuationError::NotAnswering {
                host: name.to_owned(),
                state: state.as_str(),
            });
        }
        self.refresh_farm().await;
        Ok(())
    }

    /// `name`'s last evacuation run by this server.
    pub fn evacuation_report(&self, name: &str) -> Result<EvacuationView, EvacuationError> {
        self.evacuations
            .report(name)
            .ok_or_else(|| EvacuationError::NoEvacuation(name.to_owned()))
    }

    /// Removes the paused pool VMs of every draining farm host (the pool loop's first step
    /// each round); their pools refill elsewhere.
    pub(crate) async fn retire_pool_vms_of_draining_hosts(&self) {
        let draining: Vec<String> = self
            .scheduler
            .farm_hosts()
            .into_iter()
            .filter(|host| host.record.state == HostState::Draining)
            .map(|host| host.record.name)
            .collect();
        for host in draining {
            self.retire_pool_vms_on(&host).await;
        }
    }

    /// Retires and destroys the paused (`ready`, unclaimed) pool VMs on `host`; returns how
    /// many. A VM a request claimed meanwhile is left to it.
    async fn retire_pool_vms_on(&self, host: &str) -> u32 {
        let vms = match self.store.vms_on_host(host).await {
            Ok(vms) => vms,
            Err(err) => {
                tracing::warn!(host, error = %error_chain(&err), "cannot list a draining host's vms");
                return 0;
            }
        };
        let mut removed = 0;
        for vm in vms
            .iter()
            .filter(|vm| vm.host == host && vm.state == VmState::Ready && vm.pool.is_some())
        {
            match self.store.retire_ready(&vm.id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => {
                    tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot retire a draining host's pool vm");
                    continue;
                }
            }
            removed += 1;
            tracing::info!(vm = %vm.id, host, pool = ?vm.pool, "pool vm removed from a draining host");
            if let Err(err) = self.tear_down(&vm.id).await {
                tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot destroy a draining host's pool vm");
            }
        }
        removed
    }

    /// Farm host `name`'s record: not found for an unknown host, refused for the server's
    /// own.
    async fn farm_record(&self, name: &str) -> Result<hangar_store::HostRecord, EvacuationError> {
        let record = self
            .store
            .host(name)
            .await?
            .ok_or_else(|| EvacuationError::NoHost(name.to_owned()))?;
        let own = self
            .scheduler
            .local()
            .is_some_and(|local| local.name() == name);
        if record.address.is_empty() || own {
            return Err(EvacuationError::NotOnFarm(name.to_owned()));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests;
