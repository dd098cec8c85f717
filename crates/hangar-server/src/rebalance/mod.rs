//! The rebalancing loop (`hangar server --rebalance`, off by default): every interval, the
//! leader asks [`hangar_core::rebalance::decide`] which VMs to move between the farm's
//! hosts and makes those moves through the migration entry point, one after another,
//! waiting for each to end, before it decides again.
//!
//! - **Input.** Hosts from the scheduler's cache of farm hosts (state, size with the vCPU
//!   overcommit, labels, priority); VMs from the store. `active` and `sleeping` VMs on farm
//!   hosts are movable; VMs being made and paused pool VMs (`creating`, `booting`,
//!   `ready`) take room but stay. Archived VMs take no room and stay. The server's own host
//!   is not a farm host and takes no part.
//! - **Cooldown.** A VM this loop moved, or tried to move and failed, stays where it is for
//!   the cooldown (kept in memory: a new leader starts without it, and the decision's own
//!   rule already keeps moved VMs where they are while the farm does not change).
//! - **Effect.** Behind [`Mover`], so that the loop is tested with a fake; in the server,
//!   the mover starts `crate::migration::migrate` as the server's own owner (`hangar`) and
//!   waits for the task.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use hangar_core::VmState;
use hangar_core::placement::{HostFacts, VmNeeds};
use hangar_core::rebalance::{self, MovableVm, Params};
use hangar_store::{VmRecord, now_ms};

use crate::api::error::error_chain;
use crate::manager::Manager;

pub use hangar_core::rebalance::{DEFAULT_MARGIN_PERMILLE, DEFAULT_MAX_MOVES};

mod mover;
#[cfg(test)]
mod tests;

pub use mover::MigrationMover;

/// `hangar server --rebalance`'s settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceConfig {
    /// How long between two rounds (a round's moves end before the wait starts).
    pub interval: Duration,
    /// At most this many moves per round.
    pub max_moves: usize,
    /// A move must lower the spread of the hosts' loads by more than this, in thousandths.
    pub margin_permille: u32,
    /// A VM that moved, or failed to, stays this long.
    pub cooldown: Duration,
}

impl Default for RebalanceConfig {
    fn default() -> RebalanceConfig {
        RebalanceConfig {
            interval: Duration::from_secs(60),
            max_moves: DEFAULT_MAX_MOVES,
            margin_permille: DEFAULT_MARGIN_PERMILLE,
            cooldown: Duration::from_millis(rebalance::DEFAULT_COOLDOWN_MS),
        }
    }
}

/// How the loop moves a VM: starts its migration to host `to` and waits for it to end.
/// `Err` says why it did not move (refused, or the task failed or was cancelled).
#[async_trait::async_trait]
pub trait Mover: Send + Sync {
    async fn migrate(&self, vm: &str, to: &str) -> Result<(), String>;
}

/// One move the loop made or tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveOutcome {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// Why the decision chose it ([`rebalance::Move`]'s `Display`).
    pub reason: String,
    pub result: Result<(), String>,
}

/// The loop's memory between rounds: its settings, and when each VM last moved or failed
/// to (milliseconds since the epoch).
pub struct Rebalancer {
    pub config: RebalanceConfig,
    last_moved: HashMap<String, u64>,
}

impl Rebalancer {
    pub fn new(config: RebalanceConfig) -> Rebalancer {
        Rebalancer {
            config,
            last_moved: HashMap::new(),
        }
    }

    /// The decision's input: `hosts` (farm hosts without their VMs' use) with what the
    /// VMs that stay take and hold added, and the movable VMs among `vms` (see the
    /// module), each with when this loop last moved it.
    pub fn input(&self, hosts: &[HostFacts], vms: &[VmRecord]) -> (Vec<HostFacts>, Vec<MovableVm>) {
        let mut hosts = hosts.to_vec();
        let index: BTreeMap<String, usize> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| (host.name.clone(), i))
            .collect();
        let mut movable = Vec::new();
        for vm in vms {
            let Some(&at) = index.get(&vm.host) else {
                continue;
            };
            let needs = VmNeeds {
                isolation: vm.isolation.clone(),
                ..VmNeeds::new(vm.vcpus, u64::from(vm.memory_mib))
            };
            match vm.state {
                VmState::Active | VmState::Sleeping => movable.push(MovableVm {
                    id: vm.id.clone(),
                    host: vm.host.clone(),
                    needs,
                    service: vm.services.first().cloned(),
                    last_moved_ms: self.last_moved.get(&vm.id).copied(),
                }),
                VmState::Creating | VmState::Booting | VmState::Ready => hosts[at].place(&needs),
                _ => {}
            }
        }
        (hosts, movable)
    }

    /// One round at `now_ms`: decides on `hosts` and `vms` (see [`Rebalancer::input`]),
    /// then makes the moves through `mover` one after another, logging each with its
    /// reason; every VM tried enters its cooldown, moved or not.
    pub async fn round(
        &mut self,
        hosts: &[HostFacts],
        vms: &[VmRecord],
        mover: &dyn Mover,
        now_ms: u64,
    ) -> Vec<MoveOutcome> {
        let (hosts, movable) = self.input(hosts, vms);
        let params = Params {
            max_moves: self.config.max_moves,
            margin_permille: self.config.margin_permille,
            cooldown_ms: u64::try_from(self.config.cooldown.as_millis()).unwrap_or(u64::MAX),
            now_ms,
        };
        let decision = rebalance::decide(&hosts, &movable, &params);
        let cooldown = params.cooldown_ms;
        self.last_moved
            .retain(|_, at| now_ms.saturating_sub(*at) < cooldown);
        if decision.moves.is_empty() {
            tracing::debug!(
                spread_permille = decision.spread_permille,
                target_permille = decision.target_permille,
                "rebalance: nothing to move"
            );
            return Vec::new();
        }
        tracing::info!(
            moves = decision.moves.len(),
            spread_permille = decision.spread_permille,
            spread_after_permille = decision.spread_after_permille,
            target_permille = decision.target_permille,
            "rebalance: moving vms"
        );
        let mut outcomes = Vec::with_capacity(decision.moves.len());
        for m in &decision.moves {
            let vm = movable[m.vm].id.clone();
            let (from, to) = (hosts[m.from].name.clone(), hosts[m.to].name.clone());
            let reason = m.to_string();
            tracing::info!(%vm, %from, %to, %reason, "rebalance: moving vm");
            let result = mover.migrate(&vm, &to).await;
            match &result {
                Ok(()) => tracing::info!(%vm, %from, %to, "rebalance: vm moved"),
                Err(err) => {
                    tracing::warn!(%vm, %from, %to, error = %err, cooldown_s = self.config.cooldown.as_secs(), "rebalance: vm not moved; it stays for the cooldown")
                }
            }
            self.last_moved.insert(vm.clone(), now_ms);
            outcomes.push(MoveOutcome {
                vm,
                from,
                to,
                reason,
                result,
            });
        }
        outcomes
    }
}

impl Manager {
    /// Runs a rebalancing round every `config.interval` while this replica leads, for the
    /// life of the process.
    pub fn spawn_rebalance_loop(
        self: &Arc<Self>,
        config: RebalanceConfig,
        mover: Arc<dyn Mover>,
    ) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            tracing::info!(
                interval_s = config.interval.as_secs_f64(),
                max_moves = config.max_moves,
                margin_permille = config.margin_permille,
                cooldown_s = config.cooldown.as_secs(),
                "rebalancing is on"
            );
            let mut rebalancer = Rebalancer::new(config);
            loop {
                tokio::time::sleep(config.interval).await;
                if manager.farm.leading() {
                    manager
                        .rebalance_once(&mut rebalancer, mover.as_ref())
                        .await;
                }
            }
        })
    }

    /// One round on the farm as the scheduler's cache and the store have it now.
    pub async fn rebalance_once(
        &self,
        rebalancer: &mut Rebalancer,
        mover: &dyn Mover,
    ) -> Vec<MoveOutcome> {
        let hosts: Vec<HostFacts> = self
            .scheduler
            .farm_hosts()
            .iter()
            .map(|host| host.placement_facts())
            .collect();
        let vms = match self.store.vms(false).await {
            Ok(vms) => vms,
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "rebalance: cannot read the vms");
                return Vec::new();
            }
        };
        rebalancer.round(&hosts, &vms, mover, now_ms()).await
    }
}
