//! Reconciliation: the store against the VMs that run on the host (its inventory), at
//! start-up (adopt, fail, stop strangers, remove leftovers) and every few seconds (crashed
//! VMs).

use std::collections::HashSet;

use hangar_core::VmState;
use hangar_host::{LaunchRecord, RunState};

use crate::api::error::error_chain;

use crate::manager::*;

/// Why a reconciliation round stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot list the VMs that run on the host")]
    Inventory(#[source] hangar_host::HostError),
    #[error("cannot remove leftover VM directories")]
    Leftovers(#[source] hangar_host::HostError),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

impl Manager {
    /// A VM whose process vanished: free its files, record the failure. Not while an
    /// operation on the VM is in flight: an archive ends its process and a wake starts a
    /// new one on purpose (the store says active until the archive is complete), so the VM
    /// is judged again, under its operation lock, once nothing is in flight.
    pub(crate) async fn mark_crashed(&self, id: &str) {
        let lock = self.vm_op_lock(id);
        let Ok(_guard) = lock.try_lock() else {
            tracing::debug!(vm = %id, "process gone during an operation; judged later");
            return;
        };
        let still_live = self.store.vm(id).await.ok().flatten().is_some_and(|vm| {
            matches!(
                vm.state,
                VmState::Ready | VmState::Active | VmState::Sleeping
            )
        });
        if still_live
            && matches!(
                self.host_of_id(id).await.run_state(id).await,
                Ok(RunState::Gone)
            )
        {
            self.discard(id, "the VM's QEMU process exited unexpectedly")
                .await;
        }
    }

    /// Ends the tasks a stopped server left (`Manager::resume_tasks`: finished, or undone
    /// from their journal), then compares the store with the processes that run and
    /// mends the difference:
    /// VMs whose QEMU still runs are adopted; VMs whose process is gone are marked failed;
    /// VMs caught half-made are removed and marked failed; QEMU processes and VM
    /// directories the store does not know are stopped and removed. Idempotent.
    pub async fn reconcile(&self) -> Result<ReconcileReport, ReconcileError> {
        // Tasks first: their undo destroys the VMs they were making, which the pass over
        // the host then finds gone.
        let interrupted = self.resume_tasks().await?;
        if interrupted > 0 {
            tracing::info!(tasks = interrupted, "finished or undid interrupted tasks");
        }
        match self.scheduler.local() {
            Some(local) => self.reconcile_host(local.clone()).await,
            None => Ok(ReconcileReport::default()),
        }
    }

    /// [`Manager::reconcile`] for the VMs placed on one host (the server's own at start-up,
    /// a farm host when its agent starts again).
    pub async fn reconcile_host(
        &self,
        host: std::sync::Arc<dyn hangar_host::Host>,
    ) -> Result<ReconcileReport, ReconcileError> {
        let mut report = ReconcileReport::default();
        let mut live = HashSet::new();
        // Processes found at the start, for VMs the store says have none (archived).
        let running_at_start: HashSet<String> = host
            .inventory()
            .await
            .map_err(ReconcileError::Inventory)?
            .into_iter()
            .map(|vm| vm.id)
            .collect();
        let placed_here = |vm: &hangar_store::VmRecord| vm.host == host.name();
        for vm in self.store.vms(false).await?.into_iter().filter(placed_here) {
            match vm.state {
                VmState::Creating | VmState::Booting => {
                    self.discard(&vm.id, "the server stopped while the VM was being created")
                        .await;
                    report.failed.push(vm.id);
                }
                VmState::Ready | VmState::Active | VmState::Sleeping => {
                    // An archive cut short leaves an active VM paused: it is resumed.
                    let adopted = host
                        .adopt(
                            &vm.id,
                            &LaunchRecord(vm.spec.clone()),
                            vm.state == VmState::Active,
                        )
                        .await;
                    let archived = matches!(adopted, Ok(None))
                        && vm.state != VmState::Ready
                        && matches!(host.archive_facts(&vm.id).await, Ok(Some(_)));
                    match adopted {
                        Ok(Some(_)) => {
                            live.insert(vm.id.clone());
                            report.adopted.push(vm.id);
                        }
                        Ok(None) if archived => {
                            // The server stopped after the archive was complete and QEMU had
                            // quit, before it could record it: the VM is archived.
                            tracing::info!(vm = %vm.id, "recording an archive completed before the server stopped");
                            if self
                                .store
                                .transition(&vm.id, VmState::Archived, None)
                                .await
                                .is_ok()
                            {
                                live.insert(vm.id.clone());
                            }
                        }
                        Ok(None) => {
                            self.discard(
                                &vm.id,
                                "the VM's QEMU process was gone when the server started",
                            )
                            .await;
                            report.failed.push(vm.id);
                        }
                        Err(err) => {
                            let reason = format!(
                                "cannot re-attach to the VM's QEMU process: {}",
                                error_chain(&err)
                            );
                            self.discard(&vm.id, &reason).await;
                            report.failed.push(vm.id);
                        }
                    }
                }
                VmState::Archived => {
                    self.reconcile_archived(&vm, &running_at_start, &mut live, &mut report)
                        .await;
                }
                VmState::Failed | VmState::Lost => {
                    // No process belongs to a failed VM; a leftover one is stopped below.
                    // A lost VM's host was out of reach (a farm host); fenced by its agent.
                }
                VmState::Deleted => {}
            }
        }
        for run in host.inventory().await.map_err(ReconcileError::Inventory)? {
            let id = run.id;
            if !live.contains(&id) {
                tracing::warn!(vm = %id, "stopping a QEMU process the store does not know");
                if let Err(err) = host.destroy(&id).await {
                    tracing::warn!(vm = %id, error = %error_chain(&err), "cannot stop unknown qemu");
                }
                report.stopped_unknown.push(id);
            }
        }
        let keep: HashSet<String> = self
            .store
            .vms(false)
            .await?
            .into_iter()
            .filter(|vm| vm.state != VmState::Failed)
            .map(|vm| vm.id)
            .collect();
        report.removed_dirs = host
            .remove_leftovers(&keep)
            .await
            .map_err(ReconcileError::Leftovers)?;
        Ok(report)
    }

    /// One round of health monitoring of the server's own host: VMs whose process died are
    /// marked failed. (Farm hosts report their VMs in heartbeats; see [`crate::farm`].)
    pub async fn monitor_once(&self) {
        let Some(local) = self.scheduler.local().cloned() else {
            return;
        };
        let Ok(vms) = self.store.vms(false).await else {
            return;
        };
        for vm in vms.into_iter().filter(|vm| vm.host == local.name()) {
            if matches!(
                vm.state,
                VmState::Ready | VmState::Active | VmState::Sleeping
            ) && matches!(local.run_state(&vm.id).await, Ok(RunState::Gone))
            {
                // Judged again under the VM's lock: the state may have moved on meanwhile.
                self.mark_crashed(&vm.id).await;
            }
        }
    }
}
