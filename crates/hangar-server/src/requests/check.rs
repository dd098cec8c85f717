//! The validation step of the request path: the heuristics engine
//! ([`hangar_core::heuristics`]) fed with what this server has on hand. `POST
//! /v1/requests/check` answers its verdict without provisioning; the request path refuses
//! a configuration with a hard problem (422, every problem with a suggestion) before
//! anything is claimed, reserved or started.

use hangar_core::heuristics::{self, Ask, HostLimit, PoolVm, Supply, Verdict};
use hangar_core::matching::MachineRequest;
use hangar_core::{ServiceRequest, VmState};
use hangar_host::LaunchRecord;
use hangar_store::VmRecord;

use crate::manager::Manager;
use crate::requests::{RequestError, service_machine};

impl Manager {
    /// The engine's verdict on `request`: a configuration as asked, or a service request
    /// as the configuration its service needs. Reads the store, the image cache and the
    /// local host's templates; changes nothing. Errors: a request naming neither a service
    /// nor a configuration, an unknown service (404), or the store failing.
    pub async fn check_request(&self, request: &ServiceRequest) -> Result<Verdict, RequestError> {
        let ask = match (&request.service, &request.config) {
            (None, Some(config)) => Ask {
                machine: config.clone(),
                settings: request.env.clone(),
                exact_size: request.exact_size,
            },
            (Some(_), None) => {
                let service = self.directory_lookup(request)?;
                let mut machine = service_machine(&service, &self.catalog);
                if let Some(os) = request.env.get("os")
                    && *os != service.os
                {
                    machine.os.name = os.clone();
                    machine.os.min_version = None;
                }
                Ask {
                    machine,
                    settings: request.env.clone(),
                    exact_size: request.exact_size,
                }
            }
            _ => {
                return Err(RequestError::Invalid(
                    hangar_core::request::RequestError::ServiceOrConfig.to_string(),
                ));
            }
        };
        let pool = self.pool_supply(&request.egress).await?;
        self.verdict(&ask, pool).await
    }

    /// The engine's verdict on `ask` with `pool` as the paused VMs on hand.
    pub(crate) async fn verdict(
        &self,
        ask: &Ask,
        pool: Vec<(VmRecord, PoolVm)>,
    ) -> Result<Verdict, RequestError> {
        let supply = self.supply(&ask.machine, pool).await;
        let hosts: Vec<HostLimit> = self
            .host_sizes()
            .await
            .into_iter()
            .map(|host| HostLimit {
                name: host.name,
                vcpus: host.cpus,
                memory_mib: host.memory_mib,
            })
            .collect();
        Ok(heuristics::check(&heuristics::Input {
            ask,
            catalog: &self.catalog,
            hosts: &hosts,
            supply: &supply,
        }))
    }

    /// The paused pool VMs (booted and pre-OS shells) as the engine sees them, with their
    /// records. A VM cloned from a template cannot be sliced (ballooning it would write
    /// the template's memory file).
    /// Only those running with `egress`: a pool VM is handed out only to a request of its
    /// own policy (slirp's configuration cannot change under a running VM).
    pub(crate) async fn pool_supply(
        &self,
        egress: &hangar_core::EgressPolicy,
    ) -> Result<Vec<(VmRecord, PoolVm)>, RequestError> {
        Ok(self
            .store
            .vms(false)
            .await?
            .into_iter()
            .filter(|vm| vm.state == VmState::Ready && vm.pool.is_some() && runs_with(vm, egress))
            .map(|vm| {
                let seen = PoolVm {
                    id: vm.id.clone(),
                    vcpus: vm.vcpus,
                    memory_mib: vm.memory_mib,
                    os: vm.os.clone(),
                    apps: vm.services.iter().cloned().collect(),
                    sliceable: hangar_host::template_of_record(&LaunchRecord(vm.spec.clone()))
                        .is_none(),
                };
                (vm, seen)
            })
            .collect())
    }

    /// What is on hand for `machine`: the pool, the templates on the server's own host and
    /// the images built for its OS.
    async fn supply(&self, machine: &MachineRequest, pool: Vec<(VmRecord, PoolVm)>) -> Supply {
        // This server installs applications at deploy onto pre-OS shells
        // (`Manager::grant_with_install`, which `request_config` dispatches
        // `PartialInstall` to) and composes several applications into one VM's service
        // (`hangar_core::compose`).
        let mut supply = Supply {
            pool: pool.into_iter().map(|(_, vm)| vm).collect(),
            install_at_deploy: true,
            compose: true,
            ..Supply::default()
        };
        let os = &machine.os.name;
        let Some(os_entry) = self.catalog.os(os) else {
            return supply;
        };
        for app in &machine.apps {
            let Some(service) = self.catalog.get(app) else {
                continue;
            };
            if !service.environments.contains(os) {
                continue;
            }
            if self.images.is_built(service, os) {
                supply.images.insert(app.clone());
            }
            if let Some(local) = self.scheduler.local()
                && local.has_template(service).await.unwrap_or(false)
            {
                supply.templates.insert(app.clone());
            }
        }
        // A bare OS: a single-disk OS is made in a moment; a layered one is built when
        // every service on it is (its OS layer is then cached).
        let bare_built = match os_entry.base {
            hangar_core::catalog::OsBase::Busybox => true,
            hangar_core::catalog::OsBase::Debootstrap => self
                .catalog
                .services()
                .any(|s| s.environments.contains(os) && self.images.is_built(s, os)),
        };
        if bare_built {
            supply.images.insert(os.clone());
        }
        supply
    }
}

/// Whether `vm` was started with the egress policy `egress` (pool and shared VMs are handed
/// out only to requests with their own policy).
pub(crate) fn runs_with(vm: &VmRecord, egress: &hangar_core::EgressPolicy) -> bool {
    LaunchRecord(vm.spec.clone()).egress() == *egress
}
