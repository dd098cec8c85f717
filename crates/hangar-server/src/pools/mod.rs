//! Warm pools: the loop that keeps each pool at its target, and pool status.
//!
//! Planning is pure (`hangar_core::pool`); this module gathers the inputs (catalog pools
//! with run-time bounds, paused VMs in the store, fills in flight, request rates), applies
//! the plan (fill tasks, removal of excess paused VMs), and wakes up whenever a VM leaves a
//! pool or bounds change, or every second otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_core::pool::{PoolCount, PoolSpec, RequestRate, adaptive_target, plan};
use hangar_core::{ReadySpec, VmState};
use hangar_store::now_ms;
use tokio::sync::Notify;

use crate::manager::Manager;
use crate::requests::MakeVm;

/// Expected time to refill a pool with one VM; scales adaptive targets.
const REFILL_ESTIMATE_S: f64 = 4.0;

/// After a grant, fills wait this long: launching QEMU beside a VM just handed out would
/// take CPU from its first requests.
const QUIET_AFTER_GRANT: Duration = Duration::from_millis(200);

/// Longest wait before trying again to fill a pool whose fills fail.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct PoolRuntime {
    rates: Mutex<HashMap<String, RequestRate>>,
    /// Fill tasks running, per pool.
    inflight: Mutex<HashMap<String, u32>>,
    /// Pools whose fills keep failing: consecutive failures, and no new fill before when.
    backoff: Mutex<HashMap<String, (u32, Instant)>>,
    /// When a pool VM was last handed out.
    last_grant: Mutex<Option<Instant>>,
    wake: Notify,
}

impl PoolRuntime {
    /// Asks the pool loop to look again now.
    pub fn refill(&self) {
        self.wake.notify_one();
    }

    /// A pool VM was handed out: refill, once the grant's VM has had a quiet moment.
    pub fn granted(&self) {
        *self.last_grant.lock().expect("last grant lock") = Some(Instant::now());
        self.refill();
    }

    /// How long fills should still wait after the last grant.
    fn quiet_left(&self) -> Duration {
        self.last_grant
            .lock()
            .expect("last grant lock")
            .map_or(Duration::ZERO, |at| {
                QUIET_AFTER_GRANT.saturating_sub(at.elapsed())
            })
    }
}

pub use hangar_api::PoolView;

/// Why a pool cannot be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No pool or service of that name; `alternatives` are the closest names.
    #[error("no pool or service named {name:?}")]
    NotFound {
        name: String,
        alternatives: Vec<String>,
    },
    /// The bounds or the ready criterion asked for are not valid.
    #[error("{0}")]
    Invalid(String),
    /// A pool names a service the catalog does not have.
    #[error("pool {pool} names unknown service {service}")]
    UnknownService { pool: String, service: String },
    /// The pool was changed but is no longer listed.
    #[error("pool {0} vanished")]
    Vanished(String),
    #[error("cannot encode the ready criterion")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

impl Manager {
    /// Catalog pools with run-time bounds applied.
    pub async fn pool_specs(&self) -> Result<Vec<PoolSpec>, PoolError> {
        let bounds = self.store.pool_bounds().await?;
        let mut specs: Vec<PoolSpec> = self.catalog.pools().cloned().collect();
        // Pools made at run time for services the catalog gives none.
        specs.extend(
            bounds
                .keys()
                .filter(|name| !specs.iter().any(|spec| &spec.name == *name))
                .filter_map(|name| self.service_pool(name))
                .collect::<Vec<_>>(),
        );
        for spec in &mut specs {
            if let Some((min, max)) = bounds.get(&spec.name) {
                (spec.min, spec.max) = (*min, *max);
            }
        }
        Ok(specs)
    }

    /// An empty pool of the service `name` (none if there is no such service).
    fn service_pool(&self, name: &str) -> Option<PoolSpec> {
        let service = self.catalog.get(name)?;
        Some(PoolSpec {
            name: service.name.clone(),
            service: Some(service.name.clone()),
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            min: 0,
            max: 0,
        })
    }

    /// Sets a pool's bounds at run time (kept across restarts). Bounds left out stay as
    /// they are (max is raised to min when needed). `ready`: `Some(Some(spec))` sets the
    /// criterion its fills must meet, `Some(None)` goes back to the service's. A service
    /// the catalog gives no pool gets one, named after it.
    pub async fn set_pool(
        &self,
        name: &str,
        min: Option<u32>,
        max: Option<u32>,
        ready: Option<Option<ReadySpec>>,
    ) -> Result<PoolView, PoolError> {
        let spec = self
            .pool_specs()
            .await?
            .into_iter()
            .find(|spec| spec.name == name)
            .or_else(|| self.service_pool(name))
            .ok_or_else(|| PoolError::NotFound {
                name: name.to_owned(),
                alternatives: hangar_core::suggest::closest(
                    name,
                    self.catalog
                        .pools()
                        .map(|p| p.name.as_str())
                        .chain(self.catalog.services().map(|s| s.name.as_str())),
                    3,
                ),
            })?;
        let min = min.unwrap_or(spec.min);
        let max = max.unwrap_or(spec.max.max(min));
        if min > max {
            return Err(PoolError::Invalid(format!(
                "min {min} is larger than max {max}"
            )));
        }
        if max > 64 {
            return Err(PoolError::Invalid(format!("max {max} is larger than 64")));
        }
        match ready {
            None => self.store.set_pool_bounds(name, min, max).await?,
            Some(ready) => {
                let json = match &ready {
                    Some(ready) => {
                        let service = spec
                            .service
                            .as_ref()
                            .and_then(|s| self.catalog.get(s))
                            .ok_or_else(|| {
                                PoolError::Invalid(format!(
                                    "pool {name} holds pre-OS shells, which have no ready criterion"
                                ))
                            })?;
                        service
                            .check_ready(ready)
                            .map_err(|err| PoolError::Invalid(format!("ready: {err}")))?;
                        Some(serde_json::to_string(ready).map_err(PoolError::Encode)?)
                    }
                    None => None,
                };
                self.store
                    .set_pool_ready(name, min, max, json.as_deref())
                    .await?;
            }
        }
        self.pools.refill();
        self.pool_views()
            .await?
            .into_iter()
            .find(|view| view.name == name)
            .ok_or_else(|| PoolError::Vanished(name.to_owned()))
    }

    /// Sets a pool's bounds at run time (kept across restarts).
    pub async fn set_pool_bounds(
        &self,
        name: &str,
        min: u32,
        max: Option<u32>,
    ) -> Result<PoolView, PoolError> {
        self.set_pool(name, Some(min), max, None).await
    }

    /// The ready criterion set at run time for a pool, if any.
    pub(crate) async fn pool_ready(&self, name: &str) -> Option<ReadySpec> {
        self.pool_readies().await.remove(name)
    }

    /// Every ready criterion set at run time, by pool.
    async fn pool_readies(&self) -> HashMap<String, ReadySpec> {
        self.store
            .pool_ready()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, json)| Some((name, serde_json::from_str(&json).ok()?)))
            .collect()
    }

    /// Notes one request that a pool serves (or would have). Every service's rate is kept
    /// (one entry per catalog service or pool at most): a pool made at run time starts
    /// with what its service was asked for.
    pub(crate) fn record_demand(&self, pool: &str) {
        self.pools
            .rates
            .lock()
            .expect("rates lock")
            .entry(pool.to_owned())
            .or_insert_with(|| RequestRate::new(now_ms()))
            .record(now_ms());
    }

    async fn counts(&self) -> Result<HashMap<String, PoolCount>, PoolError> {
        let inflight = self.pools.inflight.lock().expect("inflight lock").clone();
        let mut counts: HashMap<String, PoolCount> = HashMap::new();
        for vm in self.store.vms(false).await? {
            if let (Some(pool), VmState::Ready) = (&vm.pool, vm.state) {
                counts.entry(pool.clone()).or_default().ready += 1;
            }
        }
        for (pool, n) in inflight {
            counts.entry(pool).or_default().booting = n;
        }
        Ok(counts)
    }

    fn target(&self, spec: &PoolSpec) -> (u32, f64) {
        let rate = self
            .pools
            .rates
            .lock()
            .expect("rates lock")
            .get(&spec.name)
            .map_or(0.0, |rate| rate.per_s(now_ms()));
        (
            adaptive_target(spec.min, spec.max, rate, REFILL_ESTIMATE_S),
            rate,
        )
    }

    pub async fn pool_views(&self) -> Result<Vec<PoolView>, PoolError> {
        let counts = self.counts().await?;
        let readies = self.pool_readies().await;
        Ok(self
            .pool_specs()
            .await?
            .into_iter()
            .map(|spec| {
                let count = counts.get(&spec.name).copied().unwrap_or_default();
                let (target, rate) = self.target(&spec);
                let spec_name = spec.name.clone();
                PoolView {
                    memory_mib: u64::from(spec.memory_mib) * u64::from(count.total()),
                    name: spec.name,
                    service: spec.service,
                    vcpus: spec.vcpus,
                    vm_memory_mib: spec.memory_mib,
                    min: spec.min,
                    max: spec.max,
                    target,
                    ready: count.ready,
                    booting: count.booting,
                    rate_per_min: rate * 60.0,
                    ready_criterion: readies.get(&spec_name).cloned(),
                }
            })
            .collect())
    }

    /// One round: plan against targets and the memory budget, start fills, remove excess.
    pub async fn reconcile_pools(self: &Arc<Self>) -> Result<(), PoolError> {
        // Paused VMs on draining hosts leave first; their pools count without them.
        self.retire_pool_vms_of_draining_hosts().await;
        let specs = self.pool_specs().await?;
        let counts = self.counts().await?;
        let inputs: Vec<(PoolSpec, PoolCount, u32)> = specs
            .into_iter()
            .map(|spec| {
                let count = counts.get(&spec.name).copied().unwrap_or_default();
                let (target, _) = self.target(&spec);
                (spec, count, target)
            })
            .collect();
        let held: u64 = inputs
            .iter()
            .map(|(spec, count, _)| u64::from(spec.memory_mib) * u64::from(count.total()))
            .sum();
        let planned = plan(&inputs, held, self.config.pool_memory_mib);

        for (index, n) in planned.remove {
            let pool = &inputs[index].0.name;
            let mut paused: Vec<_> = self
                .store
                .vms(false)
                .await?
                .into_iter()
                .filter(|vm| vm.state == VmState::Ready && vm.pool.as_ref() == Some(pool))
                .collect();
            paused.sort_by_key(|vm| vm.created_at_ms);
            for vm in paused.into_iter().take(n as usize) {
                // A request may have claimed it since the listing: only a VM still paused
                // in its pool is taken out, in one step, and then torn down.
                match self.store.retire_ready(&vm.id).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(err) => {
                        tracing::warn!(vm = %vm.id, error = %err, "cannot retire pool vm");
                        continue;
                    }
                }
                tracing::info!(vm = %vm.id, pool = %pool, "removing a paused VM above the pool's target");
                if let Err(err) = self.tear_down(&vm.id).await {
                    tracing::warn!(vm = %vm.id, error = %err, "cannot remove pool vm");
                }
            }
        }
        for (index, n) in planned.create {
            let spec = &inputs[index].0;
            let backing_off = self
                .pools
                .backoff
                .lock()
                .expect("backoff lock")
                .get(&spec.name)
                .is_some_and(|(_, until)| Instant::now() < *until);
            if backing_off {
                continue;
            }
            // Later fills clone the service's template instead of booting.
            if let Some(service) = spec.service.as_deref().and_then(|s| self.catalog.get(s)) {
                self.ensure_template(service).await;
            }
            for _ in 0..n {
                self.start_fill(spec.clone()).await?;
            }
        }
        Ok(())
    }

    async fn start_fill(self: &Arc<Self>, spec: PoolSpec) -> Result<(), PoolError> {
        let service =
            match &spec.service {
                Some(name) => Some(self.catalog.get(name).cloned().ok_or_else(|| {
                    PoolError::UnknownService {
                        pool: spec.name.clone(),
                        service: name.clone(),
                    }
                })?),
                None => None,
            };
        let make = MakeVm {
            service,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            mode: hangar_core::Mode::Dedicated,
            env: Default::default(),
            pool: Some(spec.name.clone()),
            ready: self.pool_ready(&spec.name).await,
            template: false,
            isolation: None,
            on: Default::default(),
            owner: crate::requests::SYSTEM_OWNER.into(),
            quota: crate::quotas::Reservation::none(),
            egress: hangar_core::EgressPolicy::default(),
        };
        *self
            .pools
            .inflight
            .lock()
            .expect("inflight lock")
            .entry(spec.name.clone())
            .or_default() += 1;
        let task = match self.start_create(make, None).await {
            Ok(task) => task,
            Err(err) => {
                self.fill_done(&spec.name);
                return Err(err.into());
            }
        };
        let manager = self.clone();
        tokio::spawn(async move {
            let outcome = manager.task_outcome(&task).await;
            manager.fill_done(&spec.name);
            let mut backoff = manager.pools.backoff.lock().expect("backoff lock");
            match outcome {
                Some(Ok(_)) => {
                    backoff.remove(&spec.name);
                }
                Some(Err(err)) => {
                    // Failing fills are retried after 2 s, 4 s, ... up to a minute.
                    let failures = backoff.get(&spec.name).map_or(0, |(n, _)| *n) + 1;
                    let wait = Duration::from_secs(1 << failures.min(6)).min(MAX_BACKOFF);
                    tracing::warn!(pool = %spec.name, error = %err, failures, retry_in_s = wait.as_secs(), "pool fill failed");
                    backoff.insert(spec.name.clone(), (failures, Instant::now() + wait));
                }
                None => {}
            }
            drop(backoff);
            manager.pools.refill();
        });
        Ok(())
    }

    fn fill_done(&self, pool: &str) {
        let mut inflight = self.pools.inflight.lock().expect("inflight lock");
        if let Some(n) = inflight.get_mut(pool) {
            *n = n.saturating_sub(1);
        }
    }

    /// Runs the pool loop until the process ends.
    pub fn spawn_pool_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            loop {
                let quiet = manager.pools.quiet_left();
                if !quiet.is_zero() {
                    tokio::time::sleep(quiet).await;
                }
                if manager.farm.leading()
                    && let Err(err) = manager.reconcile_pools().await
                {
                    tracing::warn!(error = %err, "pool reconciliation failed");
                }
                tokio::select! {
                    _ = manager.pools.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
