//! Sleep, archive and wake (seed 000's lifecycle): an active VM sleeps (paused in memory),
//! is archived (memory snapshot on disk, no process), and wakes on request with a fresh
//! identity (and, restored from an archive, its ready criterion checked). One operation at
//! a time per VM.

use crate::store_wait::Wait;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::VmState;
use hangar_store::VmRecord;
use hangar_vmm::{ArchiveInfo, ArchiveTier, RunState, VmSpec};

use crate::create::new_identity;
use crate::error::{ApiError, error_chain};
use crate::manager::{Manager, ReconcileReport, Stages};

impl Manager {
    fn vm_or_404(&self, id: &str) -> Result<VmRecord, ApiError> {
        self.store
            .vm(id)
            .wait()?
            .filter(|vm| vm.state != VmState::Deleted)
            .ok_or_else(|| ApiError::NotFound {
                message: format!("no VM {id}"),
                alternatives: Vec::new(),
            })
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
    pub async fn sleep(&self, id: &str) -> Result<VmRecord, ApiError> {
        let lock = self.vm_op_lock(id);
        let _guard = lock.lock().await;
        self.sleep_locked(id).await
    }

    /// [`Manager::sleep`], for a caller holding the VM's operation lock.
    pub(crate) async fn sleep_locked(&self, id: &str) -> Result<VmRecord, ApiError> {
        let vm = self.vm_or_404(id)?;
        match vm.state {
            VmState::Sleeping => return Ok(vm),
            VmState::Active => {}
            other => {
                return Err(ApiError::Conflict(format!(
                    "VM {id} is {other}; only an active VM can sleep"
                )));
            }
        }
        // From here a connection to its endpoint wakes it (once this sleep is done).
        self.set_endpoints_active(id, false).await;
        if let Err(err) = self.hv.pause(id).await {
            self.set_endpoints_active(id, true).await;
            return Err(ApiError::Internal(format!(
                "cannot pause VM {id}: {}",
                error_chain(&err)
            )));
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
    ) -> Result<(VmRecord, ArchiveInfo), ApiError> {
        let lock = self.vm_op_lock(id);
        let _guard = lock.lock().await;
        self.archive_locked(id, tier).await
    }

    /// [`Manager::archive`], for a caller holding the VM's operation lock.
    pub(crate) async fn archive_locked(
        &self,
        id: &str,
        tier: ArchiveTier,
    ) -> Result<(VmRecord, ArchiveInfo), ApiError> {
        let vm = self.vm_or_404(id)?;
        match vm.state {
            VmState::Active | VmState::Sleeping => {}
            other => {
                return Err(ApiError::Conflict(format!(
                    "VM {id} is {other}; only an active or sleeping VM can be archived"
                )));
            }
        }
        let was_active = vm.state == VmState::Active;
        if was_active {
            self.set_endpoints_active(id, false).await;
        }
        let info = match self.hv.archive(id, tier).await {
            Ok(info) => info,
            Err(err) => {
                if was_active {
                    self.set_endpoints_active(id, true).await;
                }
                return Err(ApiError::Internal(error_chain(&err)));
            }
        };
        self.agents.lock().expect("agents lock").remove(id);
        let vm = self.store.transition(id, VmState::Archived, None).await?;
        tracing::info!(vm = %id, tier = %tier, size = info.size_bytes, took_ms = info.took_ms, "vm archived");
        Ok((vm, info))
    }

    /// Brings a sleeping or archived VM back: resumed (or restored into a new process) and
    /// given a fresh identity (clock, entropy). A restored VM also passes its ready criterion
    /// again before it counts as active; a sleeping one resumes exactly as it was paused,
    /// serving. Waking an active VM does nothing.
    pub async fn wake(&self, id: &str) -> Result<VmRecord, ApiError> {
        self.wake_timed(id).await.map(|(vm, _)| vm)
    }

    /// [`Manager::wake`], with where its time went (`resume` or `restore`, `identity`,
    /// `ready`).
    pub async fn wake_timed(&self, id: &str) -> Result<(VmRecord, Stages), ApiError> {
        let lock = self.vm_op_lock(id);
        let _guard = lock.lock().await;
        let vm = self.vm_or_404(id)?;
        let started = Instant::now();
        let mut stages = Stages::default();
        match vm.state {
            VmState::Active => return Ok((vm, stages)),
            VmState::Sleeping => {
                self.hv.resume(id).await.map_err(|err| {
                    ApiError::Internal(format!("cannot resume VM {id}: {}", error_chain(&err)))
                })?;
                stages.mark("resume", started);
            }
            VmState::Archived => {
                let spec: VmSpec =
                    serde_json::from_value(vm.spec.clone()).map_err(ApiError::internal)?;
                let launched = self
                    .hv
                    .restore(&spec)
                    .await
                    .map_err(|err| ApiError::Internal(error_chain(&err)))?;
                self.agents
                    .lock()
                    .expect("agents lock")
                    .insert(id.to_owned(), launched.agent);
                self.store.set_launch(id, launched.pid, &vm.spec).await?;
                stages.mark("restore", started);
            }
            other => {
                return Err(ApiError::Conflict(format!(
                    "VM {id} is {other}; only a sleeping or archived VM wakes"
                )));
            }
        }
        if let Err(reason) = self.finish_wake(&vm, &mut stages).await {
            // The VM runs but does not serve: leave it running for inspection, marked failed.
            let reason = format!("VM {id} woke but is not ready: {reason}");
            let _ = self
                .store
                .transition(id, VmState::Failed, Some(&reason))
                .await;
            return Err(ApiError::Internal(reason));
        }
        let vm = self.store.transition(id, VmState::Active, None).await?;
        self.store.touch(id).await?;
        self.set_endpoints_active(id, true).await;
        tracing::info!(vm = %id, timing = %stages.header(started.elapsed()), "vm woke");
        Ok((vm, stages))
    }

    /// Fresh identity; then, for a VM restored from an archive, the service's ready
    /// criterion.
    async fn finish_wake(&self, vm: &VmRecord, stages: &mut Stages) -> Result<(), String> {
        let started = Instant::now();
        let agent = self.agent(&vm.id).ok_or("no agent channel")?;
        let reply = agent
            .reidentify(new_identity(&vm.id), Duration::from_secs(10))
            .await
            .map_err(|err| error_chain(&err))?;
        if !reply.ok {
            return Err(format!(
                "re-identification failed: {}",
                reply.error.unwrap_or_default()
            ));
        }
        tracing::debug!(vm = %vm.id, guest = %reply.stdout, "identity applied");
        let started = stages.mark("identity", started);
        if vm.state == VmState::Sleeping {
            return Ok(());
        }
        // Checked through the VM's own port forwards: the stable endpoints would wait for
        // this very wake.
        let endpoints: BTreeMap<String, SocketAddr> = vm
            .direct_endpoints
            .iter()
            .filter_map(|(name, addr)| Some((name.clone(), addr.parse().ok()?)))
            .collect();
        for name in &vm.services {
            if let Some(service) = self.catalog.get(name) {
                let pid = self
                    .store
                    .vm(&vm.id)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| v.pid);
                self.wait_ready(&vm.id, pid, service, &service.ready, &endpoints, &agent)
                    .await?;
            }
        }
        stages.mark("ready", started);
        Ok(())
    }

    /// The archive of an archived VM.
    pub fn archive_info(&self, id: &str) -> Option<ArchiveInfo> {
        self.hv.archive_info(id)
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
        let running = running_at_start.contains(&vm.id);
        let archive = self.hv.archive_info(&vm.id);
        match (running, archive) {
            (true, Some(_)) => {
                tracing::info!(vm = %vm.id, "stopping a restore cut short; the archive is kept");
                if let Err(err) = self.hv.stop(&vm.id).await {
                    tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot stop qemu");
                }
                live.insert(vm.id.clone());
            }
            (true, None) => {
                let spec: Option<VmSpec> = serde_json::from_value(vm.spec.clone()).ok();
                let adopted = match &spec {
                    Some(spec) => self.hv.adopt(spec).await.ok().flatten(),
                    None => None,
                };
                match adopted {
                    Some(launched) => {
                        self.agents
                            .lock()
                            .expect("agents lock")
                            .insert(vm.id.clone(), launched.agent);
                        if matches!(self.hv.run_state(&vm.id).await, Ok(RunState::Paused)) {
                            let _ = self.hv.resume(&vm.id).await;
                        }
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
}
