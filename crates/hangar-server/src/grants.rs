//! Handing out paused pool VMs: the best match is claimed, then resumed with a fresh
//! identity (exact, superset; sliced on request), or booted from a pre-OS shell with the
//! requested OS image attached (partial).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hangar_core::matching::{MachineRequest, MatchKind, Offer, best_match};
use hangar_core::{Service, ServiceRequest, VmState};
use hangar_store::VmRecord;
use hangar_vmm::{Agent, VmSpec};

use crate::error::{ApiError, error_chain};

use crate::create::{guest_config, new_identity};
use crate::manager::*;

impl Manager {
    /// Hands out the best paused pool VM for `machine`, if any: resumed and re-identified
    /// (exact, superset; sliced with `exact_size`), or a pre-OS shell given its OS image and
    /// booted (partial). A VM that fails on the way is discarded and the next one tried.
    pub(crate) async fn grant_from_pool(
        &self,
        machine: &MachineRequest,
        request: &ServiceRequest,
        service: Option<&Service>,
    ) -> Result<Option<Grant>, ApiError> {
        for _ in 0..8 {
            let mut stages = Stages::default();
            let started = Instant::now();
            // A layered OS (several disks) cannot be attached to a pre-OS shell.
            let layered = self
                .catalog
                .os(&machine.os.name)
                .is_some_and(|os| os.base != hangar_core::catalog::OsBase::Busybox);
            let paused: Vec<VmRecord> = self
                .store
                .vms(false)
                .await?
                .into_iter()
                .filter(|vm| vm.state == VmState::Ready && vm.pool.is_some())
                .filter(|vm| !(layered && vm.os.is_none()))
                .collect();
            let offers: Vec<Offer> = paused
                .iter()
                .map(|vm| Offer {
                    vcpus: vm.vcpus,
                    memory_mib: vm.memory_mib,
                    os: vm.os.clone(),
                    apps: vm.services.iter().cloned().collect(),
                })
                .collect();
            let Some((index, kind)) = best_match(machine, &offers) else {
                return Ok(None);
            };
            let candidate = &paused[index];
            let pool = candidate.pool.clone().unwrap_or_default();
            let claiming = stages.mark("match", started);
            let vm = match self
                .store
                .claim(&candidate.id, request.mode, &request.env)
                .await
            {
                Ok(vm) => vm,
                Err(err) if err.is_transition_conflict() => continue, // another request won it
                Err(err) => return Err(err.into()),
            };
            if service.is_none_or(|service| service.name != pool) {
                // Service requests count for their own pool already.
                self.record_demand(&pool);
            }
            let handing = stages.mark("claim", claiming);
            let handed = match kind {
                MatchKind::Exact | MatchKind::Superset => {
                    self.wake_pooled(&vm, kind, machine, request.exact_size, &mut stages)
                        .await
                }
                MatchKind::Partial => self.boot_shell(&vm, machine, service, request).await,
            };
            self.pools.granted();
            match handed {
                Ok((vm, sliced_to)) => {
                    if kind == MatchKind::Partial {
                        stages.mark("boot", handing);
                    }
                    tracing::info!(vm = %vm.id, pool = %pool, kind = kind.as_str(), us = started.elapsed().as_micros() as u64, "granted from pool");
                    let mut grant = self.grant(vm, service, kind.into(), None, sliced_to);
                    grant.stages = stages;
                    return Ok(Some(grant));
                }
                Err(reason) => {
                    let reason = format!("pool VM {} could not be handed out: {reason}", vm.id);
                    self.discard(&vm.id, &reason).await;
                }
            }
        }
        Ok(None)
    }

    /// Resumes a paused, booted VM and gives it its final identity.
    pub(crate) async fn wake_pooled(
        &self,
        vm: &VmRecord,
        kind: MatchKind,
        machine: &MachineRequest,
        exact_size: bool,
        stages: &mut Stages,
    ) -> Result<(VmRecord, Option<(u32, u32)>), String> {
        let agent = self.agent(&vm.id).ok_or("no agent channel")?;
        let started = Instant::now();
        self.to_foreground(&vm.id).await;
        let resuming = stages.mark("priority", started);
        // Resumed first, then the identity sent: a message written while the VM is paused
        // waits in the socket until QEMU polls its chardev again, which takes longer than
        // the QMP `cont` round trip (measured with `examples/resume_latency.rs` of
        // hangar-vmm).
        self.hv
            .resume(&vm.id)
            .await
            .map_err(|err| error_chain(&err))?;
        let identifying = stages.mark("resume", resuming);
        let reply = agent
            .reidentify(new_identity(&vm.id), Duration::from_secs(10))
            .await
            .map_err(|err| error_chain(&err))?;
        stages.mark("identity", identifying);
        tracing::debug!(
            vm = %vm.id,
            total_us = started.elapsed().as_micros() as u64,
            guest = %reply.stdout,
            "pool vm resumed and re-identified"
        );
        if !reply.ok {
            return Err(format!(
                "re-identification failed: {}",
                reply.error.unwrap_or_default()
            ));
        }
        let mut sliced_to = None;
        if exact_size && kind == MatchKind::Superset {
            let slicing = Instant::now();
            sliced_to = Some(self.slice(vm, machine, &agent).await?);
            stages.mark("slice", slicing);
        }
        let vm = self
            .store
            .vm(&vm.id)
            .await
            .map_err(|err| error_chain(&err))?
            .ok_or("VM vanished")?;
        Ok((vm, sliced_to))
    }

    /// Slices a superset VM down to the requested size: the balloon takes the memory above
    /// the request's maximum, and vCPUs beyond the request go offline in the guest.
    pub(crate) async fn slice(
        &self,
        vm: &VmRecord,
        machine: &MachineRequest,
        agent: &Agent,
    ) -> Result<(u32, u32), String> {
        let memory = vm.memory_mib.min(machine.memory_mib.max);
        if memory < vm.memory_mib {
            self.hv
                .set_memory(&vm.id, memory)
                .await
                .map_err(|err| error_chain(&err))?;
        }
        if machine.vcpus < vm.vcpus {
            let script = format!(
                "for c in $(seq {} {}); do echo 0 > /sys/devices/system/cpu/cpu$c/online; done",
                machine.vcpus,
                vm.vcpus - 1
            );
            let reply = agent
                .exec(
                    vec!["sh".into(), "-c".into(), script],
                    Duration::from_secs(10),
                )
                .await
                .map_err(|err| error_chain(&err))?;
            if !reply.ok {
                return Err(format!(
                    "taking vCPUs offline failed: {}",
                    reply.stderr.trim()
                ));
            }
        }
        Ok((machine.vcpus.min(vm.vcpus), memory))
    }

    /// Gives a pre-OS shell its OS image, port forwards and identity, and boots it.
    pub(crate) async fn boot_shell(
        &self,
        vm: &VmRecord,
        machine: &MachineRequest,
        service: Option<&Service>,
        request: &ServiceRequest,
    ) -> Result<(VmRecord, Option<(u32, u32)>), String> {
        let image = match service {
            Some(service) => {
                let root = self
                    .images
                    .root_image(
                        service,
                        &machine.os.name,
                        std::sync::Arc::new(|_: &str, _: u8| {}),
                    )
                    .await?;
                if !root.layers.is_empty() {
                    return Err(format!(
                        "{} on {} is a layered image; a pre-OS shell takes one disk",
                        service.name, machine.os.name
                    ));
                }
                root.base
            }
            None => self.images.os_image(&machine.os.name).await?,
        }
        .ok_or("no image to attach")?;
        let mut spec: VmSpec =
            serde_json::from_value(vm.spec.clone()).map_err(|err| err.to_string())?;
        self.hv
            .attach_root(&vm.id, &image)
            .await
            .map_err(|err| error_chain(&err))?;
        let (forwards, endpoints) = match service {
            Some(service) => self
                .allocate_ports(service)
                .map_err(|err| format!("allocating host ports: {err}"))?,
            None => (Vec::new(), BTreeMap::new()),
        };
        let stable = self.open_endpoints(&vm.id, &endpoints).await?;
        self.hv
            .add_forwards(&vm.id, &forwards)
            .await
            .map_err(|err| error_chain(&err))?;
        spec.base_image = Some(image);
        spec.forwards.extend(forwards);
        let spec_json = serde_json::to_value(&spec).map_err(|err| err.to_string())?;
        let os = (
            machine.os.name.clone(),
            self.catalog
                .os(&machine.os.name)
                .map(|os| os.version.clone())
                .unwrap_or_default(),
        );
        let services: Vec<String> = service.map(|s| vec![s.name.clone()]).unwrap_or_default();
        let text = |map: &BTreeMap<String, std::net::SocketAddr>| {
            map.iter()
                .map(|(name, addr)| (name.clone(), addr.to_string()))
                .collect()
        };
        self.store
            .set_offer(&vm.id, &services, &os, &text(&stable), &text(&endpoints))
            .await
            .map_err(|err| error_chain(&err))?;
        self.store
            .set_launch(&vm.id, vm.pid, &spec_json)
            .await
            .map_err(|err| error_chain(&err))?;

        let agent = self.agent(&vm.id).ok_or("no agent channel")?;
        self.to_foreground(&vm.id).await;
        self.hv
            .resume(&vm.id)
            .await
            .map_err(|err| error_chain(&err))?;
        let config = guest_config(&vm.id, &vm.id, service, &request.env, 0)?;
        let timeout = service.map_or(Duration::from_secs(60), |s| s.ready.timeout);
        agent
            .configure(config, timeout)
            .await
            .map_err(|err| self.diagnose(&vm.id, &agent, &error_chain(&err)))?;
        if let Some(service) = service {
            self.wait_ready(&vm.id, vm.pid, service, &service.ready, &endpoints, &agent)
                .await?;
        }
        let vm = self
            .store
            .vm(&vm.id)
            .await
            .map_err(|err| error_chain(&err))?
            .ok_or("VM vanished")?;
        Ok((vm, None))
    }

    /// A pool VM being handed out runs at normal CPU priority again (best effort).
    async fn to_foreground(&self, id: &str) {
        if let Err(err) = self.hv.set_foreground(id).await {
            tracing::debug!(vm = %id, error = %error_chain(&err), "cannot raise vm priority");
        }
    }
}
