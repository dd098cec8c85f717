//! Handing out paused pool VMs: the best match is claimed, then resumed with a fresh
//! identity (exact, superset; sliced on request), or booted from a pre-OS shell with the
//! requested OS image attached (partial; sliced on request too). A configuration request
//! takes the pool VM the heuristics engine chooses ([`Picker::Engine`]); a service request
//! the best match ([`best_match`]).

use std::collections::BTreeMap;
use std::time::Instant;

use hangar_core::heuristics::{Ask, CandidateKind};
use hangar_core::matching::{MachineRequest, MatchKind, Offer, best_match};
use hangar_core::{Service, ServiceRequest};
use hangar_host::{HandOut, LaunchRecord, ShellPlan};
use hangar_store::VmRecord;

use crate::api::error::error_chain;

use crate::manager::*;
use crate::requests::*;

/// How [`Manager::grant_from_pool`] picks the pool VM.
pub(crate) enum Picker<'a> {
    /// The best match ([`best_match`]): exact, then the smallest superset, then the
    /// smallest shell; with `exact_size` a larger one is sliced to the request.
    Best,
    /// The heuristics engine's choice for a configuration request, when it is a pool VM.
    Engine(&'a Ask),
}

/// The pool VM picked: which, how it matches, what it is sliced to, and why.
struct Pick {
    vm: VmRecord,
    kind: MatchKind,
    slice_to: Option<(u32, u32)>,
    chosen: Option<hangar_api::ChosenView>,
}

impl Manager {
    /// Hands out the paused pool VM `picker` picks for `machine`, if any: resumed and
    /// re-identified (exact, superset), or a pre-OS shell given its OS image and booted
    /// (partial); sliced down to the request with `exact_size` when larger. A VM that
    /// fails on the way is discarded and the next one tried.
    pub(crate) async fn grant_from_pool(
        &self,
        owner: &str,
        machine: &MachineRequest,
        request: &ServiceRequest,
        service: Option<&Service>,
        picker: Picker<'_>,
    ) -> Result<Option<Grant>, RequestError> {
        for _ in 0..8 {
            let mut stages = Stages::default();
            let started = Instant::now();
            let picked = match picker {
                Picker::Best => self.best_pool_vm(machine, request).await?,
                Picker::Engine(ask) => self.engine_pool_vm(ask, &request.egress).await?,
            };
            let Some(Pick {
                vm: candidate,
                kind,
                slice_to,
                chosen,
            }) = picked
            else {
                return Ok(None);
            };
            let candidate = &candidate;
            let pool = candidate.pool.clone().unwrap_or_default();
            let claiming = stages.mark("match", started);
            let vm = match self
                .store
                .claim(
                    &candidate.id,
                    request.mode,
                    &self.secrets.seal_env(&request.env),
                )
                .await
            {
                Ok(vm) => vm,
                Err(err) if err.is_transition_conflict() => continue, // another request won it
                Err(err) => return Err(err.into()),
            };
            // The claimed VM is the requester's (and counts against their quota).
            let vm = if vm.owner == owner {
                vm
            } else {
                self.store.set_owner(&vm.id, owner).await?;
                VmRecord {
                    owner: owner.to_owned(),
                    ..vm
                }
            };
            if service.is_none_or(|service| service.name != pool) {
                // Service requests count for their own pool already.
                self.record_demand(&pool);
            }
            let handing = stages.mark("claim", claiming);
            let handed = match kind {
                MatchKind::Exact | MatchKind::Superset => {
                    self.wake_pooled(&vm, slice_to, &mut stages).await
                }
                MatchKind::Partial => {
                    self.boot_shell(&vm, machine, service, &[], request, slice_to)
                        .await
                }
            };
            self.pools.granted();
            match handed {
                Ok((vm, sliced_to)) => {
                    if kind == MatchKind::Partial {
                        stages.mark("boot", handing);
                    }
                    tracing::info!(vm = %vm.id, pool = %pool, kind = kind.as_str(), us = started.elapsed().as_micros() as u64, "granted from pool");
                    let mut grant = if kind == MatchKind::Partial {
                        // Booted since its claim: used as of now.
                        self.grant(vm, service, kind.into(), None, sliced_to).await
                    } else {
                        // The claim marked the VM used: no second write before the answer.
                        self.grant_view(vm, service, kind.into(), None, sliced_to)
                    };
                    grant.stages = stages;
                    grant.chosen = chosen;
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

    /// The best match among the paused pool VMs, sliced to the request with
    /// `exact_size` when larger (a VM cloned from a template is never sliced: it is passed
    /// over when exact size is asked).
    async fn best_pool_vm(
        &self,
        machine: &MachineRequest,
        request: &ServiceRequest,
    ) -> Result<Option<Pick>, RequestError> {
        let exact_size = request.exact_size;
        // Only a one-disk busybox OS is attached to a pre-OS shell here: a layered OS goes
        // through the install path, and an OS the catalog does not declare (an imported
        // machine, booted by its own firmware on another machine type) never fits one.
        let layered = !self
            .catalog
            .os(&machine.os.name)
            .is_some_and(|os| os.base == hangar_core::catalog::OsBase::Busybox);
        let want = (machine.vcpus, machine.memory_mib.max);
        let paused: Vec<VmRecord> = self
            .pool_supply(&request.egress)
            .await?
            .into_iter()
            .filter(|(vm, _)| !(layered && vm.os.is_none()))
            .filter(|(vm, seen)| {
                let larger = vm.vcpus > want.0 || vm.memory_mib > want.1;
                !(exact_size && larger && !seen.sliceable)
            })
            .map(|(vm, _)| vm)
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
        let vm = paused[index].clone();
        let larger = vm.vcpus > want.0 || vm.memory_mib > want.1;
        Ok(Some(Pick {
            slice_to: (exact_size && larger).then_some(want),
            vm,
            kind,
            chosen: None,
        }))
    }

    /// The engine's choice for `ask`, when it is a paused pool VM (exact, superset or
    /// partial); `None` when it chooses anything else (or the request has a hard problem:
    /// checked before, so only when the pool changed meanwhile).
    async fn engine_pool_vm(
        &self,
        ask: &Ask,
        egress: &hangar_core::EgressPolicy,
    ) -> Result<Option<Pick>, RequestError> {
        let pool = self.pool_supply(egress).await?;
        let records: BTreeMap<String, VmRecord> = pool
            .iter()
            .map(|(vm, _)| (vm.id.clone(), vm.clone()))
            .collect();
        let verdict = self.verdict(ask, pool).await?;
        let (Some(candidate), Some(chosen)) = (verdict.chosen_candidate(), &verdict.chosen) else {
            return Ok(None);
        };
        let kind = match candidate.kind {
            CandidateKind::Exact => MatchKind::Exact,
            CandidateKind::Superset => MatchKind::Superset,
            CandidateKind::Partial => MatchKind::Partial,
            CandidateKind::PartialInstall | CandidateKind::Build => return Ok(None),
        };
        let Some(vm) = records.get(&candidate.source).cloned() else {
            return Ok(None);
        };
        Ok(Some(Pick {
            vm,
            kind,
            slice_to: candidate.slice_to,
            chosen: Some(hangar_api::ChosenView {
                kind: chosen.kind,
                source: chosen.source.clone(),
                reason: chosen.reason.clone(),
            }),
        }))
    }

    /// Resumes a paused, booted VM and gives it its final identity (sliced to `slice_to`).
    /// Returns `vm` as it was claimed: handing out changes nothing the store records, so
    /// the store is not read again on the grant's way out.
    pub(crate) async fn wake_pooled(
        &self,
        vm: &VmRecord,
        slice_to: Option<(u32, u32)>,
        stages: &mut Stages,
    ) -> Result<(VmRecord, Option<(u32, u32)>), String> {
        let how = HandOut {
            slice_to,
            size: (vm.vcpus, vm.memory_mib),
        };
        let handed = self
            .host_of(vm)
            .hand_out(&vm.id, &how)
            .await
            .map_err(|err| error_chain(&err))?;
        stages.0.extend(handed.stages.0);
        Ok((vm.clone(), handed.sliced_to))
    }

    /// Gives a pre-OS shell its OS image (with `service`'s layers, or those of `parts`
    /// when `service` is composed of them), port forwards and identity, and boots it
    /// (sliced to `slice_to` once its guest runs).
    pub(crate) async fn boot_shell(
        &self,
        vm: &VmRecord,
        machine: &MachineRequest,
        service: Option<&Service>,
        parts: &[Service],
        request: &ServiceRequest,
        slice_to: Option<(u32, u32)>,
    ) -> Result<(VmRecord, Option<(u32, u32)>), String> {
        let plan = ShellPlan {
            service: service.cloned(),
            os: machine.os.name.clone(),
            env: request.env.clone(),
            parts: parts.to_vec(),
            slice_to,
        };
        let booted = self
            .host_of(vm)
            .boot_shell(&vm.id, &LaunchRecord(vm.spec.clone()), &plan)
            .await
            .map_err(|err| error_chain(&err))?;
        let endpoints: BTreeMap<String, std::net::SocketAddr> = booted
            .direct_endpoints
            .iter()
            .filter_map(|(name, addr)| Some((name.clone(), addr.parse().ok()?)))
            .collect();
        let stable = self
            .open_endpoints(&vm.id, service, &endpoints)
            .await
            .map_err(|err| error_chain(&err))?;
        let os = (
            machine.os.name.clone(),
            self.catalog
                .os(&machine.os.name)
                .map(|os| os.version.clone())
                .unwrap_or_default(),
        );
        // A composed VM offers each of its applications.
        let services: Vec<String> = if parts.is_empty() {
            service.map(|s| vec![s.name.clone()]).unwrap_or_default()
        } else {
            parts.iter().map(|s| s.name.clone()).collect()
        };
        let stable: BTreeMap<String, String> = stable
            .iter()
            .map(|(name, addr)| (name.clone(), addr.to_string()))
            .collect();
        self.store
            .set_offer(&vm.id, &services, &os, &stable, &booted.direct_endpoints)
            .await
            .map_err(|err| error_chain(&err))?;
        self.store
            .set_launch(&vm.id, vm.pid, &booted.launch.0)
            .await
            .map_err(|err| error_chain(&err))?;
        let vm = self
            .store
            .vm(&vm.id)
            .await
            .map_err(|err| error_chain(&err))?
            .ok_or("VM vanished")?;
        Ok((vm, booted.sliced_to))
    }
}
