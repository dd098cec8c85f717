//! Sleep, archive and wake (seed 000's lifecycle): an active VM sleeps (paused in memory),
//! is archived (memory snapshot on disk, no process), and wakes on request with a fresh
//! identity (and, restored from an archive, its ready criterion checked). One operation at
//! a time per VM.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use hangar_core::VmState;
use hangar_host::{ArchiveFacts, ArchiveTier, HostError, LaunchRecord, WakeFrom};
use hangar_store::VmRecord;

use crate::api::error::error_chain;
use crate::manager::{Manager, ReconcileReport};
use crate::requests::Stages;

/// Why an operation on one VM failed. The API maps it to a status in one place
/// (`crate::api::error`).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("no VM {0}")]
    NoVm(String),
    /// The VM's state forbids the operation; `rule` says which states allow it.
    #[error("VM {id} is {state}; {rule}")]
    WrongState {
        id: String,
        state: VmState,
        rule: &'static str,
    },
    #[error("VM {0} is still being created; delete it once its task ends")]
    StillCreating(String),
    #[error("cannot pause VM {id}")]
    Pause {
        id: String,
        #[source]
        source: HostError,
    },
    #[error("cannot resume VM {id}")]
    Resume {
        id: String,
        #[source]
        source: HostError,
    },
    #[error("cannot destroy VM {id}")]
    Destroy {
        id: String,
        #[source]
        source: HostError,
    },
    /// Archiving or restoring failed on the host (the VM is left as it was).
    #[error(transparent)]
    Host(HostError),
    /// The VM woke but does not serve; it runs, marked failed.
    #[error("VM {id} woke but is not ready: {reason}")]
    NotReady { id: String, reason: String },
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

impl Manager {
    async fn vm_or_404(&self, id: &str) -> Result<VmRecord, LifecycleError> {
        self.store
            .vm(id)
            .await?
            .filter(|vm| vm.state != VmState::Deleted)
            .ok_or_else(|| LifecycleError::NoVm(id.to_owned()))
    }

    pub(crate) fn vm_op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.vm_ops
            .lock()
            .expect("vm ops lock")
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// Pauses an active VM in memory.
    pub async fn sleep(&self, id: &str) -> Result<VmRecord, LifecycleError> {
        let lock = self.vm_op_lock(id);
        let _guard = lock.lock().await;
        self.sleep_locked(id).await
    }

    /// [`Manager::sleep`], for a caller holding the VM's operation lock.
    pub(crate) async fn sleep_locked(&self, id: &str) -> Result<VmRecord, LifecycleError> {
        let vm = self.vm_or_404(id).await?;
        match vm.state {
            VmState::Sleeping => return Ok(vm),
            VmState::Active => {}
            other => {
                return Err(LifecycleError::WrongState {
                    id: id.to_owned(),
                    state: other,
                    rule: "only an active VM can sleep",
                });
            }
        }
        // From here a connection to its endpoint wakes it (once this sleep is done).
        self.set_endpoints_active(id, false).await;
        if let Err(err) = self.host_of(&vm).sleep(id).await {
            self.set_endpoints_active(id, true).await;
            return Err(LifecycleError::Pause {
                id: id.to_owned(),
                source: err,
            });
        }
        let vm = self.store.transition(id, VmState::Sleeping, None).await?;
        tracing::info!(vm = %id, "vm sleeping");
        Ok(vm)
    }

    /// Writes an active or sleeping VM's memory to disk and ends its process. When that
    /// fails the VM keeps running (or sleeping) as it was.
    pub async fn archive(
        &self,
        id: &str,
        tier: ArchiveTier,
    ) -> Result<(VmRecord, ArchiveFacts), LifecycleError> {
        let lock = self.vm_op_lock(id);
        let _guard = lock.lock().await;
        self.archive_locked(id, tier).await
    }

    /// [`Manager::archive`], for a caller holding the VM's operation lock.
    pub(crate) async fn archive_locked(
        &self,
        id: &str,
        tier: ArchiveTier,
    ) -> Result<(VmRecord, ArchiveFacts), LifecycleError> {
        let vm = self.vm_or_404(id).await?;
        match vm.state {
            VmState::Active | VmState::Sleeping => {}
            other => {
                return Err(LifecycleError::WrongState {
                    id: id.to_owned(),
                    state: other,
                    rule: "only an active or sleeping VM can be archived",
                });
            }
        }
        let was_active = vm.state == VmState::Active;
        if was_active {
            self.set_endpoints_active(id, false).await;
        }
        let host = self.host_of(&vm);
        let archived = self.recorded("archive", &vm, host.archive(id, tier)).await;
        let info = match archived {
            Ok(info) => info,
            Err(err) => {
                if was_active {
                    self.set_endpoints_active(id, true).await;
                }
                return Err(LifecycleError::Host(err));
            }
        };
        // Recorded before the VM is marked archived, so that the usage record of that
        // change carries the archive's size (archive GB-hours) and the owner's quota
        // counts it.
        if let Err(err) = self
            .store
            .put_archive(&hangar_store::ArchiveRecord {
                vm_id: id.to_owned(),
                tier: info.tier.to_string(),
                size_bytes: info.size_bytes,
                host: vm.host.clone(),
                created_at_ms: hangar_store::now_ms(),
            })
            .await
        {
            tracing::warn!(vm = %id, error = %err, "cannot record the vm's archive");
        }
        let vm = self.store.transition(id, VmState::Archived, None).await?;
        tracing::info!(vm = %id, tier = %tier, size = info.size_bytes, took_ms = info.took_ms, "vm archived");
        Ok((vm, info))
    }

    /// Brings a sleeping or archived VM back: resumed (or restored into a new process) and
    /// given a fresh identity (clock, entropy). A restored VM also passes its ready criterion
    /// again before it counts as active; a sleeping one resumes exactly as it was paused,
    /// serving. Waking an active VM does nothing.
    pub async fn wake(&self, id: &str) -> Result<VmRecord, LifecycleError> {
        self.wake_timed(id).await.map(|(vm, _)| vm)
    }

    /// [`Manager::wake`], with where its time went (`resume` or `restore`, `identity`,
    /// `ready`).
    /// A member of a sleeping or archived stack wakes its stack: its peers first
    /// ([`Manager::wake_stack_of`]).
    pub async fn wake_timed(&self, id: &str) -> Result<(VmRecord, Stages), LifecycleError> {
        self.wake_stack_of(id).await;
        self.wake_vm_timed(id).await
    }

    /// [`Manager::wake_timed`] of this VM alone (its stack's other members as they are).
    pub(crate) async fn wake_vm_timed(
        &self,
        id: &str,
    ) -> Result<(VmRecord, Stages), LifecycleError> {
        let lock = self.vm_op_lock(id);
        let _guard = lock.lock().await;
        let vm = self.vm_or_404(id).await?;
        let started = Instant::now();
        let from = match vm.state {
            VmState::Active => return Ok((vm, Stages::default())),
            VmState::Sleeping => WakeFrom::Sleeping,
            VmState::Archived => WakeFrom::Archived {
                launch: LaunchRecord(vm.spec.clone()),
                services: vm
                    .services
                    .iter()
                    .filter_map(|name| self.catalog.get(name).cloned())
                    .collect(),
                direct_endpoints: vm.direct_endpoints.clone(),
            },
            other => {
                return Err(LifecycleError::WrongState {
                    id: id.to_owned(),
                    state: other,
                    rule: "only a sleeping or archived VM wakes",
                });
            }
        };
        let from_label = match from {
            WakeFrom::Sleeping => "sleeping",
            WakeFrom::Archived { .. } => "archived",
        };
        let host = self.host_of(&vm);
        let woken = match self.recorded("wake", &vm, host.wake(id, &from)).await {
            Ok(woken) => woken,
            Err(HostError::NotReady(reason)) => {
                // The VM runs but does not serve: leave it running for inspection, marked
                // failed.
                let err = LifecycleError::NotReady {
                    id: id.to_owned(),
                    reason,
                };
                let _ = self
                    .store
                    .transition(id, VmState::Failed, Some(&err.to_string()))
                    .await;
                return Err(err);
            }
            Err(err) if vm.state == VmState::Sleeping => {
                return Err(LifecycleError::Resume {
                    id: id.to_owned(),
                    source: err,
                });
            }
            Err(err) => return Err(LifecycleError::Host(err)),
        };
        if vm.state == VmState::Archived {
            self.store.set_launch(id, woken.process, &vm.spec).await?;
        }
        let vm = self.store.transition(id, VmState::Active, None).await?;
        self.store.touch(id).await?;
        self.set_endpoints_active(id, true).await;
        crate::metrics::woke(from_label, started.elapsed());
        tracing::info!(vm = %id, timing = %woken.stages.header(started.elapsed()), "vm woke");
        Ok((vm, woken.stages))
    }

    /// The archive of an archived VM; none when it has none or its host cannot tell
    /// (logged).
    pub async fn archive_info(&self, id: &str) -> Option<ArchiveFacts> {
        match self.host_of_id(id).await.archive_facts(id).await {
            Ok(archive) => archive,
            Err(err) => {
                tracing::warn!(vm = %id, error = %error_chain(&err), "cannot read the VM's archive");
                None
            }
        }
    }

    /// Start-up rule for an archived VM. A QEMU process found for it is a restore cut short
    /// by the server's end: when the archive is still there the process is stopped (the
    /// archive is kept, the VM stays archived); when the restore had completed (the archive
    /// is gone) the VM is adopted as active. An archived VM with neither is failed.
    pub(crate) async fn reconcile_archived(
        &self,
        vm: &VmRecord,
        running_at_start: &HashSet<String>,
        live: &mut HashSet<String>,
        report: &mut ReconcileReport,
    ) {
        let host = self.host_of(vm);
        let running = running_at_start.contains(&vm.id);
        let archive = match host.archive_facts(&vm.id).await {
            Ok(archive) => archive,
            Err(err) => {
                // Decided at the next start, when the host answers.
                tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot read the VM's archive");
                live.insert(vm.id.clone());
                return;
            }
        };
        match (running, archive) {
            (true, Some(_)) => {
                tracing::info!(vm = %vm.id, "stopping a restore cut short; the archive is kept");
                if let Err(err) = host.stop(&vm.id).await {
                    tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot stop qemu");
                }
                live.insert(vm.id.clone());
            }
            (true, None) => {
                let adopted = host
                    .adopt(&vm.id, &LaunchRecord(vm.spec.clone()), true)
                    .await
                    .ok()
                    .flatten();
                match adopted {
                    Some(_) => {
                        if self
                            .store
                            .transition(&vm.id, VmState::Active, None)
                            .await
                            .is_ok()
                        {
                            live.insert(vm.id.clone());
                            report.adopted.push(vm.id.clone());
                        }
                    }
                    None => {
                        self.discard(
                            &vm.id,
                            "the VM's restore was cut short and its archive is gone",
                        )
                        .await;
                        report.failed.push(vm.id.clone());
                    }
                }
            }
            (false, Some(_)) => {}
            (false, None) => {
                self.discard(&vm.id, "the VM's archive is missing").await;
                report.failed.push(vm.id.clone());
            }
        }
    }

    /// Deletes a VM: its process and files, then its state. Idempotent: deleting a deleted
    /// VM answers its record, and concurrent deletes of one VM all answer the deleted record
    /// (they take the VM's operation lock in turn; a delete that loses a race with another
    /// replica's sees the VM deleted and answers that). [`LifecycleError::NoVm`] for an
    /// unknown id; [`LifecycleError::StillCreating`] while it is being made.
    pub async fn delete(&self, id: &str) -> Result<VmRecord, LifecycleError> {
        let lock = self.vm_op_lock(id);
        let _guard = lock.lock().await;
        self.delete_locked(id).await
    }

    /// [`Manager::delete`], for a caller holding the VM's operation lock.
    pub(crate) async fn delete_locked(&self, id: &str) -> Result<VmRecord, LifecycleError> {
        let vm = self
            .store
            .vm(id)
            .await?
            .ok_or_else(|| LifecycleError::NoVm(id.to_owned()))?;
        match vm.state {
            VmState::Deleted => return Ok(vm),
            VmState::Creating | VmState::Booting => {
                return Err(LifecycleError::StillCreating(id.to_owned()));
            }
            // Its host is out of reach: nothing is deleted there now; when the host returns
            // it is told to destroy the VM (it is no longer live in the store).
            VmState::Lost => {
                self.close_endpoints(id).await;
                let vm = self.store.transition(id, VmState::Deleted, None).await?;
                tracing::info!(vm = %id, host = %vm.host, "lost vm given up");
                return Ok(vm);
            }
            VmState::Ready
            | VmState::Active
            | VmState::Sleeping
            | VmState::Archived
            | VmState::Failed => {}
        }
        self.tear_down(id).await?;
        let vm = match self.store.transition(id, VmState::Deleted, None).await {
            Ok(vm) => vm,
            // Deleted meanwhile by another replica (whose lock is not this one's): the
            // outcome the caller asked for.
            Err(err) if err.is_transition_conflict() => match self.store.vm(id).await? {
                Some(vm) if vm.state == VmState::Deleted => return Ok(vm),
                _ => {
                    return Err(LifecycleError::WrongState {
                        id: id.to_owned(),
                        state: vm.state,
                        rule: "the VM changed state while it was being deleted",
                    });
                }
            },
            Err(err) => return Err(err.into()),
        };
        tracing::info!(vm = %id, "vm deleted");
        Ok(vm)
    }

    /// Ends a VM's process and frees its files and endpoints (its record is the caller's).
    pub(crate) async fn tear_down(&self, id: &str) -> Result<(), LifecycleError> {
        self.host_of_id(id)
            .await
            .destroy(id)
            .await
            .map_err(|source| LifecycleError::Destroy {
                id: id.to_owned(),
                source,
            })?;
        self.close_endpoints(id).await;
        Ok(())
    }
}
