//! Applications installed at deploy (seed 003 claim 1): the "partial + install" path.
//!
//! A request for an OS and applications that no paused VM offers is served from a pre-OS
//! shell (QEMU booted to hangar-init, paused, no root yet) instead of a new image built
//! from nothing: the shell is given the OS layer and each application's own layers (the
//! ones the single-application images already built and cached; missing ones are built
//! first, as a stage of the task), stacked under a fresh writable layer, and booted;
//! hangar-init mounts them as one overlay and merges the layers' user databases and dpkg
//! status (see `hangar_host::images::ImageSource::composed_root`). The whole is one task
//! of kind `install` (stages `claim`, `layers`, `attach`, `ready`), waited for until the
//! request's deadline like a creation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::matching::MachineRequest;
use hangar_core::{Service, ServiceRequest, VmState};
use hangar_store::VmRecord;

use crate::api::error::error_chain;
use crate::manager::Manager;
use crate::requests::{Grant, RequestError, Served, Stages};

/// How long an install task's outcome stays in memory for late waiters.
const OUTCOME_KEPT: Duration = Duration::from_secs(60);

impl Manager {
    /// Serves `request` (a configuration of `machine`) with `composed`, the service made
    /// of `parts` (one or several catalog applications on the request's OS), installed at
    /// deploy onto the smallest paused pre-OS shell with enough vCPUs and memory. `None`
    /// when no shell can take it (the caller builds a VM instead). The grant says `match:
    /// partial`, the install task, and the applications installed at deploy. Past
    /// `until` the answer is a 503 naming the task, which goes on; a failure after the
    /// shell is claimed discards it and fails the request (the task records why).
    #[allow(clippy::too_many_arguments)]
    pub async fn grant_with_install(
        self: &Arc<Self>,
        owner: &str,
        machine: &MachineRequest,
        request: &ServiceRequest,
        composed: &Service,
        parts: &[Service],
        until: tokio::time::Instant,
        deadline: Duration,
    ) -> Result<Option<Grant>, RequestError> {
        let started = Instant::now();
        let mut stages = Stages::default();
        let Some(shell) = self.claim_shell(owner, machine, request).await? else {
            return Ok(None);
        };
        let claimed = stages.mark("claim", started);
        if let Some(pool) = &shell.pool {
            self.record_demand(pool);
        }
        self.pools.granted();
        let (task, sender) = self.tasks.begin("install", Some(composed.name.clone())).await?;
        if let Err(err) = self.store.set_task_vm(&task, &shell.id).await {
            tracing::warn!(task = %task, error = %err, "cannot record the install task's vm");
        }
        let manager = self.clone();
        let id = task.clone();
        let (machine, request, composed_for_task, parts_for_task) = (
            machine.clone(),
            request.clone(),
            composed.clone(),
            parts.to_vec(),
        );
        tokio::spawn(async move {
            let result = manager
                .install(
                    &id,
                    &shell,
                    &machine,
                    &request,
                    &composed_for_task,
                    &parts_for_task,
                )
                .await;
            if let Err(reason) = &result {
                let reason = format!("installing onto shell {}: {reason}", shell.id);
                manager.discard(&shell.id, &reason).await;
            }
            manager.tasks.finish(&id, sender, result).await;
            tokio::time::sleep(OUTCOME_KEPT).await;
            manager.tasks.forget(&id);
        });
        let mut outcome = self
            .tasks
            .watch(&task)
            .ok_or(RequestError::TaskLost("install task outcome missing"))?;
        let waited = tokio::time::timeout_at(until, outcome.wait_for(Option::is_some))
            .await
            .map(|r| r.map(|result| result.clone().expect("waited for Some")));
        let outcome = match waited {
            Err(_) => {
                return Err(RequestError::TryAgain {
                    message: format!(
                        "{} is not installed within the request's deadline of {}; it is still being installed (task {task}), try again shortly",
                        composed.name,
                        humantime::format_duration(deadline)
                    ),
                    retry_after_s: 2,
                    task: Some(task),
                });
            }
            Ok(Err(_)) => return Err(RequestError::TaskLost("install task vanished")),
            Ok(Ok(outcome)) => outcome,
        };
        match outcome {
            Ok(vm) => {
                stages.mark("install", claimed);
                tracing::info!(vm = %vm.id, service = %composed.name, us = started.elapsed().as_micros() as u64, "installed at deploy");
                let mut grant = self
                    .grant(vm, Some(composed), Served::Partial, Some(task), None)
                    .await;
                grant.stages = stages;
                grant.installed_at_deploy = parts.iter().map(|p| p.name.clone()).collect();
                Ok(Some(grant))
            }
            Err(message) => Err(RequestError::CreationFailed(message)),
        }
    }

    /// Claims the smallest paused pre-OS shell with at least `machine`'s vCPUs and
    /// memory for `owner`; `None` when there is none (or every one went to others).
    async fn claim_shell(
        &self,
        owner: &str,
        machine: &MachineRequest,
        request: &ServiceRequest,
    ) -> Result<Option<VmRecord>, RequestError> {
        let mut shells: Vec<VmRecord> = self
            .store
            .vms(false)
            .await?
            .into_iter()
            .filter(|vm| {
                vm.state == VmState::Ready
                    && vm.pool.is_some()
                    && vm.os.is_none()
                    && vm.vcpus >= machine.vcpus
                    && vm.memory_mib >= machine.memory_mib.min
            })
            .collect();
        shells.sort_by_key(|vm| (vm.memory_mib, vm.vcpus));
        for shell in shells {
            let vm = match self
                .store
                .claim(
                    &shell.id,
                    request.mode,
                    &self.secrets.seal_env(&request.env),
                )
                .await
            {
                Ok(vm) => vm,
                Err(err) if err.is_transition_conflict() => continue,
                Err(err) => return Err(err.into()),
            };
            if vm.owner == owner {
                return Ok(Some(vm));
            }
            self.store.set_owner(&vm.id, owner).await?;
            return Ok(Some(VmRecord {
                owner: owner.to_owned(),
                ..vm
            }));
        }
        Ok(None)
    }

    /// The install task's body: the parts' missing layers built (stage `layers`), the
    /// composed root attached to the claimed shell and booted to ready (`attach`,
    /// `ready`).
    async fn install(
        &self,
        task: &str,
        shell: &VmRecord,
        machine: &MachineRequest,
        request: &ServiceRequest,
        composed: &Service,
        parts: &[Service],
    ) -> Result<VmRecord, String> {
        let progress = self.tasks.progress(task);
        let os = machine.os.name.as_str();
        if !self.images.is_composed_built(parts, os) {
            progress("layers", 5);
            tracing::info!(task, service = %composed.name, os, "building the applications' missing layers");
            self.images
                .composed_root(composed, parts, os, self.tasks.build_progress(task, 5, 80))
                .await
                .map_err(|err| error_chain(&err))?;
        }
        progress("attach", 80);
        let (vm, _) = self
            .boot_shell(shell, machine, Some(composed), parts, request)
            .await?;
        progress("ready", 99);
        Ok(vm)
    }
}
