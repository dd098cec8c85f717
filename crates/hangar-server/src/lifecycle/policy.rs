//! Lifecycle policies at run time, last use, and the lifecycle loop.
//!
//! Deciding is pure (`hangar_core::lifecycle::decide`); this module gathers its inputs
//! (VMs from the store, effective policies: run-time ones over the catalog's, request rates
//! per service, archive sizes, the budgets) and applies the actions: idle active VMs sleep,
//! sleeping ones are archived, archived ones are deleted with their archive; over the memory
//! budget the least recently used are archived, over the disk budget archives (and unused
//! images) are deleted. Each action is applied under the VM's operation lock and only if the
//! VM is still as the decision saw it (same state, not used since) and no connection to it
//! is open through its stable endpoint (`crate::endpoints`: the VM is in use).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_core::lifecycle::{Action, Budgets, Inputs, PerMinute, VmFacts, decide, kept_active};
use hangar_core::pool::RequestRate;
use hangar_core::{Policy, TierChoice, VmState};
use hangar_host::ArchiveTier;
use hangar_store::now_ms;
use tokio::sync::Notify;

use crate::api::error::error_chain;
use crate::endpoints::EndpointUse;
use crate::lifecycle::ops::LifecycleError;
use crate::manager::Manager;

/// Why a policy cannot be read or changed, or a lifecycle action failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("no VM {0}")]
    NoVm(String),
    /// No service of that name; `alternatives` are the closest names.
    #[error("no service named {name:?}")]
    NoService {
        name: String,
        alternatives: Vec<String>,
    },
    /// The policy asked for is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A timer the change sets is shorter than the server's floor for it (422); the
    /// message names the floor.
    #[error("{0}")]
    BelowFloor(String),
    #[error("cannot encode the policy")]
    Encode(#[source] serde_json::Error),
    /// The policy was changed but is no longer listed.
    #[error("policy of {0} vanished")]
    Vanished(String),
    /// An unused image could not be removed.
    #[error("cannot remove image {key}")]
    RemoveImage {
        key: String,
        #[source]
        source: hangar_host::images::ImageSourceError,
    },
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

/// How long a VM whose lifecycle action failed is left alone before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct LifecycleRuntime {
    /// Requests (and endpoint connections) per service.
    rates: Mutex<HashMap<String, RequestRate>>,
    /// VMs whose last action failed: not tried again before then.
    backoff: Mutex<HashMap<String, Instant>>,
    /// Said once per server that the delta tier falls back to zstd.
    delta_noted: AtomicBool,
    wake: Notify,
}

impl LifecycleRuntime {
    /// Asks the lifecycle loop to look again now.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }
}

/// The archive format a policy's tier is written in on this host, and why it differs when
/// it does.
pub fn archive_tier(choice: TierChoice) -> (ArchiveTier, Option<&'static str>) {
    match choice {
        TierChoice::Raw => (ArchiveTier::Raw, None),
        TierChoice::Zstd => (ArchiveTier::Zstd, None),
        TierChoice::Delta => (
            ArchiveTier::Delta,
            Some("VMs not cloned from a template are archived with zstd"),
        ),
    }
}

pub use hangar_api::{BudgetView, PoliciesView, PolicySource, PolicyView};

/// Changes to a policy; `None` leaves a field as it is, `Some(None)` unsets it (never).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyChange {
    pub sleep_after: Option<Option<Duration>>,
    pub archive_after: Option<Option<Duration>>,
    pub delete_after: Option<Option<Duration>>,
    /// Requests per minute.
    pub keep_active_above: Option<Option<f64>>,
    pub archive_tier: Option<TierChoice>,
}

impl PolicyChange {
    /// The idle timers the change sets to a value, by field name.
    pub fn timers_set(&self) -> Vec<(&'static str, Duration)> {
        [
            ("sleep_after", self.sleep_after),
            ("archive_after", self.archive_after),
            ("delete_after", self.delete_after),
        ]
        .into_iter()
        .filter_map(|(field, value)| Some((field, value.flatten()?)))
        .collect()
    }

    fn apply(&self, mut policy: Policy) -> Policy {
        if let Some(value) = self.sleep_after {
            policy.sleep_after = value;
        }
        if let Some(value) = self.archive_after {
            policy.archive_after = value;
        }
        if let Some(value) = self.delete_after {
            policy.delete_after = value;
        }
        if let Some(value) = self.keep_active_above {
            policy.keep_active_above = value.map(PerMinute);
        }
        if let Some(value) = self.archive_tier {
            policy.archive_tier = value;
        }
        policy
    }
}

impl Manager {
    /// Marks a VM as used now: its idle timers start again and its services count one
    /// more use towards `keep_active_above`. Called when a VM is granted or woken, and by
    /// endpoints on each connection. Cheap (one indexed update). Errors: `NotFound` for an
    /// unknown VM.
    pub async fn note_use(&self, vm_id: &str) -> Result<(), PolicyError> {
        self.store
            .set_last_used(vm_id, now_ms())
            .await
            .map_err(|err| match err {
                hangar_store::StoreError::NotFound { .. } => PolicyError::NoVm(vm_id.to_owned()),
                other => other.into(),
            })?;
        if let Some(vm) = self.store.vm(vm_id).await? {
            for service in &vm.services {
                self.record_service_demand(service);
            }
        }
        Ok(())
    }

    /// Notes one request for a service (its rate feeds `keep_active_above`).
    pub(crate) fn record_service_demand(&self, service: &str) {
        let now = now_ms();
        self.lifecycle
            .rates
            .lock()
            .expect("rates lock")
            .entry(service.to_owned())
            .or_insert_with(|| RequestRate::new(now))
            .record(now);
    }

    fn rates_per_min(&self) -> BTreeMap<String, f64> {
        let now = now_ms();
        self.lifecycle
            .rates
            .lock()
            .expect("rates lock")
            .iter()
            .map(|(service, rate)| (service.clone(), rate.per_s(now) * 60.0))
            .collect()
    }

    /// Every service's effective policy: set at run time, else the catalog's.
    pub async fn policies(&self) -> Result<BTreeMap<String, (Policy, PolicySource)>, PolicyError> {
        let stored = self.store.policies().await?;
        Ok(self
            .catalog
            .services()
            .map(|service| {
                let run_time = stored
                    .get(&service.name)
                    .and_then(|json| serde_json::from_str::<Policy>(json).ok());
                let effective = match run_time {
                    Some(policy) => (policy, PolicySource::RunTime),
                    None => (service.policy, PolicySource::Catalog),
                };
                (service.name.clone(), effective)
            })
            .collect())
    }

    fn known_service(&self, service: &str) -> Result<(), PolicyError> {
        match self.catalog.get(service) {
            Some(_) => Ok(()),
            None => Err(PolicyError::NoService {
                name: service.to_owned(),
                alternatives: hangar_core::suggest::closest(service, self.catalog.names(), 3),
            }),
        }
    }

    /// Changes a service's policy at run time (kept across restarts); fields left out stay
    /// as they are.
    pub async fn set_policy(
        &self,
        service: &str,
        change: &PolicyChange,
    ) -> Result<PolicyView, PolicyError> {
        self.known_service(service)?;
        let current = self
            .policies()
            .await?
            .remove(service)
            .map(|(policy, _)| policy)
            .unwrap_or_default();
        let policy = change.apply(current);
        policy.check().map_err(PolicyError::Invalid)?;
        self.config
            .policy_floors
            .check(change.timers_set())
            .map_err(|below| PolicyError::BelowFloor(below.to_string()))?;
        let json = serde_json::to_string(&policy).map_err(PolicyError::Encode)?;
        self.store.set_policy(service, Some(&json)).await?;
        tracing::info!(service, policy = %json, "policy set");
        self.lifecycle.nudge();
        self.policy_view(service).await
    }

    /// Goes back to the catalog's policy for a service.
    pub async fn reset_policy(&self, service: &str) -> Result<PolicyView, PolicyError> {
        self.known_service(service)?;
        self.store.set_policy(service, None).await?;
        self.lifecycle.nudge();
        self.policy_view(service).await
    }

    async fn policy_view(&self, service: &str) -> Result<PolicyView, PolicyError> {
        self.policy_views()
            .await?
            .services
            .into_iter()
            .find(|view| view.service == service)
            .ok_or_else(|| PolicyError::Vanished(service.to_owned()))
    }

    /// Every service's policy, and the budgets with what they hold now.
    pub async fn policy_views(&self) -> Result<PoliciesView, PolicyError> {
        let policies = self.policies().await?;
        let rates = self.rates_per_min();
        let bare: BTreeMap<String, Policy> = policies
            .iter()
            .map(|(name, (policy, _))| (name.clone(), *policy))
            .collect();
        let services = policies
            .into_iter()
            .map(|(service, (policy, source))| {
                let (used, note) = archive_tier(policy.archive_tier);
                PolicyView {
                    rate_per_min: rates.get(&service).copied().unwrap_or(0.0),
                    kept_active: kept_active(std::slice::from_ref(&service), &bare, &rates),
                    service,
                    policy,
                    source,
                    archive_tier_used: used.to_string(),
                    note: note.map(str::to_owned),
                }
            })
            .collect();
        let inputs = self.lifecycle_inputs().await?;
        let memory_mib: u64 = inputs
            .vms
            .iter()
            .filter(|vm| matches!(vm.state, VmState::Active | VmState::Sleeping))
            .map(|vm| u64::from(vm.memory_mib))
            .sum();
        let disk_bytes: u64 = inputs
            .vms
            .iter()
            .filter_map(|vm| vm.archive_bytes)
            .chain(inputs.images.iter().map(|image| image.bytes))
            .sum();
        Ok(PoliciesView {
            services,
            memory: BudgetView {
                budget_mib: self.config.memory_budget_mib,
                used_mib: memory_mib as f64,
            },
            disk: BudgetView {
                budget_mib: self.config.disk_budget_mib,
                used_mib: disk_bytes as f64 / f64::from(1u32 << 20),
            },
        })
    }

    async fn lifecycle_inputs(&self) -> Result<Inputs, PolicyError> {
        let mut vms = Vec::new();
        for vm in self.store.vms(false).await? {
            let archive = match vm.state {
                VmState::Archived => self.host_of(&vm).archive_facts(&vm.id).await,
                _ => Ok(None),
            };
            let archive_bytes = match archive {
                Ok(archive) => archive.map(|info| info.size_bytes),
                Err(err) => {
                    tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot read the VM's archive");
                    None
                }
            };
            vms.push(VmFacts {
                archive_bytes,
                id: vm.id,
                services: vm.services,
                state: vm.state,
                last_used_ms: vm.last_used_at_ms,
                state_since_ms: vm.state_since_ms,
                memory_mib: vm.memory_mib,
            });
        }
        Ok(Inputs {
            now_ms: now_ms(),
            vms,
            policies: self
                .policies()
                .await?
                .into_iter()
                .map(|(name, (policy, _))| (name, policy))
                .collect(),
            rates_per_min: self.rates_per_min(),
            budgets: Budgets {
                memory_mib: self.config.memory_budget_mib,
                disk_bytes: self.config.disk_budget_mib.map(|mib| mib << 20),
            },
            images: self.images.disk_images(),
        })
    }

    /// One round: decide from the current state and apply. Returns the actions applied.
    pub async fn reconcile_lifecycle(&self) -> Result<Vec<Action>, PolicyError> {
        let inputs = self.lifecycle_inputs().await?;
        let actions = decide(&inputs);
        // Stack members never sleep, are archived or deleted alone: the front's timers are
        // the stack's (`crate::stacks`).
        let members = self.stack_members().await?;
        let mut applied = Vec::new();
        for action in actions {
            if let Some((stack, front)) = action.vm().and_then(|id| members.get(id)) {
                if *front && self.stack_idle(stack, &action).await {
                    applied.push(action);
                }
                continue;
            }
            let seen = action
                .vm()
                .and_then(|id| inputs.vms.iter().find(|vm| vm.id == id));
            if let Some(vm) = seen {
                let backing_off = self
                    .lifecycle
                    .backoff
                    .lock()
                    .expect("backoff lock")
                    .get(&vm.id)
                    .is_some_and(|until| Instant::now() < *until);
                if backing_off {
                    continue;
                }
            }
            match self.apply(&action, seen).await {
                Ok(true) => applied.push(action),
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(?action, error = %err, retry_in_s = RETRY_AFTER.as_secs(), "lifecycle action failed");
                    if let Some(vm) = seen {
                        self.lifecycle
                            .backoff
                            .lock()
                            .expect("backoff lock")
                            .insert(vm.id.clone(), Instant::now() + RETRY_AFTER);
                    }
                }
            }
        }
        Ok(applied)
    }

    /// Applies one action if its VM is still as `seen` (same state, not used since).
    /// `Ok(false)`: skipped, the next round decides again.
    async fn apply(&self, action: &Action, seen: Option<&VmFacts>) -> Result<bool, PolicyError> {
        let reason = action.reason();
        if let Action::RemoveImage { key, .. } = action {
            self.images
                .remove_image(key)
                .await
                .map_err(|source| PolicyError::RemoveImage {
                    key: key.clone(),
                    source,
                })?;
            tracing::info!(image = %key, %reason, "image removed");
            return Ok(true);
        }
        let Some(seen) = seen else { return Ok(false) };
        let lock = self.vm_op_lock(&seen.id);
        let _guard = lock.lock().await;
        let Some(vm) = self.store.vm(&seen.id).await? else {
            return Ok(false);
        };
        if vm.state != seen.state || vm.last_used_at_ms != seen.last_used_ms {
            return Ok(false);
        }
        // A VM with a connection open through its endpoint is in use: left as it is, its
        // idle timers started again. When none is open, its endpoints now wait for a wake.
        if let EndpointUse::Busy { open } = self.quiesce_endpoints(&vm.id).await {
            self.store.set_last_used(&vm.id, now_ms()).await?;
            tracing::info!(vm = %vm.id, open, ?action, "lifecycle: connections open; vm in use");
            return Ok(false);
        }
        let idle_s = now_ms().saturating_sub(vm.last_used_at_ms.max(vm.state_since_ms)) / 1000;
        match action {
            Action::Sleep { .. } => {
                self.sleep_locked(&vm.id).await?;
                tracing::info!(vm = %vm.id, %reason, idle_s, "lifecycle: sleeping");
            }
            Action::Archive { tier, .. } => {
                let (used, note) = archive_tier(*tier);
                if let Some(note) = note
                    && !self.lifecycle.delta_noted.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(vm = %vm.id, "{note}");
                }
                self.archive_locked(&vm.id, used).await?;
                tracing::info!(vm = %vm.id, %reason, tier = %used, idle_s, "lifecycle: archived");
            }
            Action::Delete { .. } => {
                self.delete_locked(&vm.id).await?;
                tracing::info!(vm = %vm.id, %reason, idle_s, "lifecycle: deleted");
            }
            Action::RemoveImage { .. } => unreachable!("handled above"),
        }
        Ok(true)
    }

    /// Runs the lifecycle loop until the process ends: a round every
    /// `lifecycle_interval`, and at once when a policy changes.
    pub fn spawn_lifecycle_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            loop {
                if manager.farm.leading()
                    && let Err(err) = manager.reconcile_lifecycle().await
                {
                    tracing::warn!(error = %err, "lifecycle round failed");
                }
                tokio::select! {
                    _ = manager.lifecycle.wake.notified() => {}
                    _ = tokio::time::sleep(manager.config.lifecycle_interval) => {}
                }
            }
        })
    }
}
