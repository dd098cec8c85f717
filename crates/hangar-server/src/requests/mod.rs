//! The request path of DESIGN.md, top-down: validate (a configuration through the
//! heuristics engine, [`check`]; a service against the directory); in shared
//! mode an active VM already offering the service, else a sleeping or archived one woken;
//! else the best paused pool VM ([`grants`]); else a new VM made by a creation task
//! ([`create`]) on the host the scheduler chooses, waited for until the request's deadline.
//!
//! - [`check`]: the heuristics engine's verdict with what this server has on hand.
//! - [`grants`]: handing out paused pool VMs (exact, superset, partial).
//! - [`create`]: making one VM on a host, recorded step by step.
//! - [`install`]: applications installed at deploy onto a pre-OS shell (partial +
//!   install), for configurations of several applications.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::matching::{MachineRequest, MemoryRange, OsRequirement};
use hangar_core::{Catalog, Mode, Service, ServiceRequest, VmState};
use hangar_host::RunState;
use hangar_store::VmRecord;
use tokio::sync::OwnedMutexGuard;

use crate::manager::Manager;

/// The owner of VMs requested before users exist.
pub const LOCAL_OWNER: &str = "local";

/// The owner of the VMs hangar makes for itself: warm pool VMs until a request claims one
/// (it is then the requester's), and template VMs. Nobody's quota counts them; usage
/// metering bills their time to this owner.
pub const SYSTEM_OWNER: &str = "hangar";

pub mod check;
pub mod create;
pub mod grants;
pub mod install;

#[cfg(test)]
pub(crate) mod tests;

pub use hangar_api::Served;

/// What a successful request gets.
#[derive(Debug, Clone)]
pub struct Grant {
    pub vm: VmRecord,
    /// The service asked for, or the first app of a configuration (empty for a bare OS).
    pub service: String,
    /// The stable endpoint of the service's first port (empty when it offers none).
    pub endpoint: String,
    /// The VM's own port forward behind `endpoint` (answers only while the VM runs).
    pub direct_endpoint: String,
    pub served: Served,
    pub task: Option<String>,
    /// `<vm>.<domain>` when a DNS domain is configured.
    pub dns_name: Option<String>,
    /// The size the VM was sliced to (`exact_size` on a superset), as (vCPUs, MiB).
    pub sliced_to: Option<(u32, u32)>,
    /// How long each stage of handing it out took (pool grants), in order.
    pub stages: Stages,
    /// Why the VM is on its host, when it was made for this request or handed out of a
    /// pool (not for a VM that already served others).
    pub placement: Option<String>,
    /// The applications installed at deploy onto a pre-OS shell (their layers attached),
    /// in the order they were stacked; empty for every other path.
    pub installed_at_deploy: Vec<String>,
    /// For a configuration request: the heuristics engine's choice and why.
    pub chosen: Option<hangar_api::ChosenView>,
}

pub use hangar_host::Stages;

/// What to make: a service VM (for a request or a pool), or a pre-OS shell.
#[derive(Debug, Clone)]
pub(crate) struct MakeVm {
    pub service: Option<Service>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub mode: Mode,
    pub env: BTreeMap<String, String>,
    /// Made for this pool: paused at ready instead of handed out.
    pub pool: Option<String>,
    /// A ready criterion other than the service's (set at run time for a pool).
    pub ready: Option<hangar_core::ReadySpec>,
    /// Made to become its service's template (snapshotted at ready, then gone).
    pub template: bool,
    /// Placed away from every host holding a VM of this isolation group.
    pub isolation: Option<String>,
    /// Placed only on hosts with these labels.
    pub on: BTreeMap<String, String>,
    /// Who the VM is made for (its owner).
    pub owner: String,
    /// The VM reserved against its owner's quota, released once its row is written.
    pub quota: crate::quotas::Reservation,
    /// What its guest may reach out of it (pool VMs and templates: the default, `none`).
    pub egress: hangar_core::EgressPolicy,
}

impl MakeVm {
    /// What its placement must respect beyond room.
    pub(crate) fn constraints(&self) -> crate::scheduler::Constraints {
        crate::scheduler::Constraints {
            isolation: self.isolation.clone(),
            on: self.on.clone(),
        }
    }
}

pub(crate) type Outcome = Option<Result<VmRecord, String>>;

/// Why a request is not granted.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request is malformed, or lacks a setting its service needs.
    #[error("{0}")]
    Invalid(String),
    /// The heuristics engine found hard problems in a configuration (422): every one,
    /// each with a suggestion.
    #[error("this configuration cannot be served: {}", .0.summary())]
    Unservable(Box<hangar_core::heuristics::Verdict>),
    /// No service or application of that name; `alternatives` are the closest names.
    #[error("{message}")]
    NotFound {
        message: String,
        alternatives: Vec<String>,
    },
    /// The directory rules the request out for good; `alternatives` are viable neighbours.
    #[error("{message}")]
    Never {
        message: String,
        alternatives: Vec<String>,
    },
    /// The service needs a setting the request lacks.
    #[error(transparent)]
    Settings(#[from] hangar_host::guest::GuestConfigError),
    /// Not granted before the deadline; the VM is still being made (by `task`, if known).
    #[error("{message}")]
    TryAgain {
        message: String,
        retry_after_s: u64,
        task: Option<String>,
    },
    /// The creation task ended without a VM.
    #[error("{0}")]
    CreationFailed(String),
    /// No host can take the VM now (room, isolation group, labels, hosts down).
    #[error("{0}")]
    NoHost(String),
    /// The VM would take its owner past their quota (429).
    #[error(transparent)]
    Quota(#[from] hangar_core::quota::QuotaExceeded),
    /// The VM asked for is larger than any host: it can never run (422).
    #[error(transparent)]
    TooLarge(#[from] crate::scheduler::capacity::TooLarge),
    /// The creation task's outcome could not be followed.
    #[error("{0}")]
    TaskLost(&'static str),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

impl Manager {
    /// The request path: validate; then a shared VM if one runs (shared mode), else the best
    /// paused pool VM, else a new VM.
    pub async fn request(self: &Arc<Self>, request: ServiceRequest) -> Result<Grant, RequestError> {
        self.request_as(LOCAL_OWNER, request).await
    }

    /// [`Manager::request`] for `owner`: a VM made or handed out for the request is theirs
    /// and counts against their quota (checked before it is claimed or made; 429 when it
    /// would pass a limit). A shared VM that already runs is granted without a check.
    pub async fn request_as(
        self: &Arc<Self>,
        owner: &str,
        request: ServiceRequest,
    ) -> Result<Grant, RequestError> {
        let started = std::time::Instant::now();
        let result = self.serve_request(owner, request).await;
        crate::metrics::request_ended(
            result.as_ref().ok().map(|grant| grant.served),
            started.elapsed(),
        );
        result
    }

    /// [`Manager::request_as`], unmeasured.
    async fn serve_request(
        self: &Arc<Self>,
        owner: &str,
        request: ServiceRequest,
    ) -> Result<Grant, RequestError> {
        // A configuration goes through the heuristics engine first: every problem with a
        // suggestion (422), before anything is claimed, reserved or started.
        let verdict = match &request.config {
            Some(config) if request.service.is_none() => {
                let ask = hangar_core::heuristics::Ask {
                    machine: config.clone(),
                    settings: request.env.clone(),
                    exact_size: request.exact_size,
                };
                let pool = self.pool_supply(&request.egress).await?;
                let verdict = self.verdict(&ask, pool).await?;
                if !verdict.ok {
                    return Err(RequestError::Unservable(Box::new(verdict)));
                }
                Some(verdict)
            }
            _ => None,
        };
        request
            .validate()
            .map_err(|err| RequestError::Invalid(err.to_string()))?;
        let deadline = request
            .deadline_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.default_deadline);
        let until = tokio::time::Instant::now() + deadline;
        if let (Some(config), Some(verdict)) = (request.config.clone(), verdict) {
            return self
                .request_config(owner, request, config, verdict, until, deadline)
                .await;
        }
        let service = self.viable_service(&request)?;
        self.check_vm_size(service.vcpus, service.memory_mib)
            .await?;
        self.record_demand(&service.name);
        self.record_service_demand(&service.name);
        let os = request.env.get("os").cloned().unwrap_or(service.os.clone());
        self.record_image_demand(&service.name, &os);

        // A request with placement constraints gets a VM of its own, placed for it: neither
        // a shared VM nor a pool VM was placed with its constraints.
        let constrained = request.isolate.is_some() || !request.on.is_empty();
        let mut request = request;
        if constrained {
            request.mode = Mode::Dedicated;
        }
        let guard = match request.mode {
            Mode::Dedicated => None,
            Mode::Shared => {
                let lock = self.shared_lock(&service.name, &request.env);
                let guard = tokio::time::timeout_at(until, lock.lock_owned())
                    .await
                    .map_err(|_| RequestError::TryAgain {
                        message: format!(
                            "a VM offering {} is being made; try again shortly",
                            service.name
                        ),
                        retry_after_s: 2,
                        task: None,
                    })?;
                if let Some(vm) = self
                    .pick_shared(&service.name, &request.env, &request.egress)
                    .await?
                {
                    return Ok(self
                        .grant(vm, Some(&service), Served::Shared, None, None)
                        .await);
                }
                if let Some(vm) = self
                    .wake_shared(&service.name, &request.env, &request.egress)
                    .await
                {
                    return Ok(self
                        .grant(vm, Some(&service), Served::Woken, None, None)
                        .await);
                }
                Some(guard)
            }
        };

        // From here on the request gets a VM of its own: it counts against its owner's
        // quota, reserved now, until its row is in the store.
        let quota = self
            .reserve_quota_for_request(owner, service.vcpus, service.memory_mib)
            .await?;
        // Pool VMs run the default OS with default settings: a request naming another OS
        // or its own settings gets a VM of its own.
        let from_pool = !constrained
            && os == service.os
            && !service
                .settings
                .keys()
                .any(|key| request.env.contains_key(key));
        let machine = service_machine(&service, &self.catalog);
        if from_pool
            && let Some(grant) = self
                .grant_from_pool(
                    owner,
                    &machine,
                    &request,
                    Some(&service),
                    grants::Picker::Best,
                )
                .await?
        {
            return Ok(grant);
        }
        if request.env.is_empty() {
            // Later requests clone the service's template instead of booting.
            self.ensure_template(&service).await;
        }
        let make = MakeVm {
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            service: Some(service.clone()),
            mode: request.mode,
            env: request.env.clone(),
            pool: None,
            ready: None,
            template: false,
            isolation: request.isolate.clone(),
            on: request.on.clone(),
            owner: owner.to_owned(),
            quota,
            egress: request.egress.clone(),
        };
        self.create_and_wait(make, guard, until, deadline, &service.name)
            .await
    }

    /// A configuration request the engine found sound (`verdict`): the paused pool VM it
    /// chooses (exact, superset, partial; sliced to the exact size when asked), else a new
    /// VM of exactly that configuration. The grant says which and why.
    async fn request_config(
        self: &Arc<Self>,
        owner: &str,
        request: ServiceRequest,
        config: MachineRequest,
        verdict: hangar_core::heuristics::Verdict,
        until: tokio::time::Instant,
        deadline: Duration,
    ) -> Result<Grant, RequestError> {
        use hangar_core::heuristics::CandidateKind;
        // The engine checked the OS, the apps, their settings and the size.
        let os_name = config.os.name.clone();
        let ask = hangar_core::heuristics::Ask {
            machine: config.clone(),
            settings: request.env.clone(),
            exact_size: request.exact_size,
        };
        // Several applications are one composed service: the union of theirs, clashes
        // (a guest port, a file, a setting) refused.
        let mut parts = Vec::with_capacity(config.apps.len());
        for app in &config.apps {
            parts.push(
                self.catalog.get(app).cloned().ok_or_else(|| {
                    RequestError::Invalid(format!("no application named {app:?}"))
                })?,
            );
        }
        let service = if parts.len() <= 1 {
            parts.first().cloned()
        } else {
            let several: Vec<&Service> = parts.iter().collect();
            Some(
                hangar_core::compose::compose_services(
                    self.catalog.components(),
                    &several,
                    &os_name,
                )
                .map_err(|err| RequestError::Never {
                    message: format!("these applications cannot run on one VM: {err}"),
                    alternatives: config
                        .apps
                        .iter()
                        .map(|app| format!("--os {os_name} --app {app}"))
                        .collect(),
                })?,
            )
        };
        if let Some(service) = &service {
            hangar_host::guest::settings(service, &request.env)?;
        }
        // A new VM gets the least memory of the range that its OS and apps run in.
        let memory_mib = verdict
            .candidates
            .iter()
            .find(|c| c.kind == CandidateKind::Build)
            .map_or(config.memory_mib.min, |c| c.memory_mib);
        let mut request = request;
        request.mode = Mode::Dedicated;
        let constrained = request.isolate.is_some() || !request.on.is_empty();
        let quota = self
            .reserve_quota_for_request(owner, config.vcpus, memory_mib)
            .await?;
        let pooled = verdict.chosen.as_ref().is_some_and(|chosen| {
            matches!(
                chosen.kind,
                CandidateKind::Exact | CandidateKind::Superset | CandidateKind::Partial
            )
        });
        if !constrained
            && pooled
            && let Some(grant) = self
                .grant_from_pool(
                    owner,
                    &config,
                    &request,
                    service.as_ref(),
                    grants::Picker::Engine(&ask),
                )
                .await?
        {
            return Ok(grant);
        }
        // Partial + install: the applications' layers attached to a pre-OS shell at
        // deploy (a VM is built below when no shell can be had after all).
        if !constrained
            && let Some(chosen) = verdict
                .chosen
                .as_ref()
                .filter(|chosen| chosen.kind == CandidateKind::PartialInstall)
            && let Some(service) = &service
            && let Some(mut grant) = self
                .grant_with_install(
                    owner,
                    install::Install {
                        machine: &config,
                        request: &request,
                        service,
                        parts: &parts,
                        prefer: Some(&chosen.source),
                        slice_to: verdict
                            .candidates
                            .iter()
                            .find(|c| c.kind == chosen.kind && c.source == chosen.source)
                            .and_then(|c| c.slice_to),
                    },
                    until,
                    deadline,
                )
                .await?
        {
            grant.chosen = Some(hangar_api::ChosenView {
                kind: chosen.kind,
                source: chosen.source.clone(),
                reason: chosen.reason.clone(),
            });
            return Ok(grant);
        }
        // A new VM: the engine's build candidate (asked again when the pool was chosen but
        // none could be handed out).
        let chosen = match verdict.chosen {
            Some(chosen) if chosen.kind == CandidateKind::Build && !constrained => chosen,
            _ => {
                let again = self.verdict(&ask, Vec::new()).await?;
                match again.chosen {
                    Some(chosen) => hangar_core::heuristics::Chosen {
                        reason: if constrained {
                            format!("{} (placement constraints: a VM of its own)", chosen.reason)
                        } else {
                            format!("{} (no pool VM could be handed out)", chosen.reason)
                        },
                        ..chosen
                    },
                    None => return Err(RequestError::Unservable(Box::new(again))),
                }
            }
        };
        if chosen.kind != CandidateKind::Build {
            // Install at deploy is another path's; until it is here, nothing else remains.
            return Err(RequestError::Never {
                message: format!(
                    "the chosen {} candidate cannot be delivered by this server",
                    chosen.kind.as_str()
                ),
                alternatives: Vec::new(),
            });
        }
        let name = service
            .as_ref()
            .map_or_else(|| os_name.clone(), |s| s.name.clone());
        let make = MakeVm {
            service,
            vcpus: config.vcpus,
            memory_mib,
            mode: Mode::Dedicated,
            env: request.env.clone(),
            pool: None,
            ready: None,
            template: false,
            isolation: request.isolate.clone(),
            on: request.on.clone(),
            owner: owner.to_owned(),
            quota,
            egress: request.egress.clone(),
        };
        let mut grant = self
            .create_and_wait(make, None, until, deadline, &name)
            .await?;
        grant.chosen = Some(hangar_api::ChosenView {
            kind: chosen.kind,
            source: chosen.source,
            reason: chosen.reason,
        });
        Ok(grant)
    }

    /// Starts a creation task and waits for it until the request's deadline.
    async fn create_and_wait(
        self: &Arc<Self>,
        make: MakeVm,
        guard: Option<OwnedMutexGuard<()>>,
        until: tokio::time::Instant,
        deadline: Duration,
        name: &str,
    ) -> Result<Grant, RequestError> {
        let service = make.service.clone();
        if make.isolation.is_some() || !make.on.is_empty() {
            // Say at once when no host can take it, rather than from a failed task (a
            // dry run: the VM is counted on its host when the task places it).
            let plan = create::plan_for(&make, "placement-check");
            match self.choose_host(&plan, &make.constraints()).await {
                Ok(_) => {}
                Err(crate::scheduler::PlacementError::NoHost(no_host)) => {
                    return Err(RequestError::NoHost(no_host.to_string()));
                }
                Err(other) => {
                    return Err(RequestError::CreationFailed(
                        crate::api::error::error_chain(&other),
                    ));
                }
            }
        }
        let task = self.start_create(make, guard).await?;
        let mut outcome = self
            .tasks
            .watch(&task)
            .ok_or_else(|| RequestError::TaskLost("task outcome missing"))?;
        let waited = tokio::time::timeout_at(until, outcome.wait_for(Option::is_some)).await;
        let waited = waited.map(|r| r.map(|result| result.clone().expect("waited for Some")));
        match waited {
            Err(_) => Err(RequestError::TryAgain {
                message: format!(
                    "the VM for {name} is not ready within the request's deadline of {}; it is still being made (task {task}), try again shortly",
                    humantime::format_duration(deadline)
                ),
                retry_after_s: 2,
                task: Some(task),
            }),
            Ok(Err(_)) => Err(RequestError::TaskLost("creation task vanished")),
            Ok(Ok(outcome)) => match outcome {
                Ok(vm) => {
                    let served = if self.is_clone(&vm) {
                        Served::Cloned
                    } else {
                        Served::Created
                    };
                    Ok(self
                        .grant(vm, service.as_ref(), served, Some(task), None)
                        .await)
                }
                Err(message) => Err(RequestError::CreationFailed(message)),
            },
        }
    }

    /// [`Manager::reserve_quota`] for the request path's error.
    async fn reserve_quota_for_request(
        &self,
        owner: &str,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<crate::quotas::Reservation, RequestError> {
        use crate::quotas::QuotaError;
        match self.reserve_quota(owner, vcpus, memory_mib).await {
            Ok(reservation) => Ok(reservation),
            Err(QuotaError::Exceeded(exceeded)) => Err(RequestError::Quota(exceeded)),
            Err(QuotaError::Store(err)) => Err(RequestError::Store(err)),
            Err(QuotaError::Invalid(message)) => Err(RequestError::Invalid(message)),
        }
    }

    /// The service the request names, if the combination (service × environment) is in
    /// the directory: else 404 (no such service) or 422 "never", with the closest viable
    /// alternatives. A setting the service needs and the request lacks is a 400.
    pub(crate) fn viable_service(&self, request: &ServiceRequest) -> Result<Service, RequestError> {
        let service = self.directory_lookup(request)?;
        hangar_host::guest::settings(&service, &request.env)?;
        Ok(service)
    }

    /// The service the request names, if the combination is in the directory (settings
    /// aside: an image does not depend on them).
    pub(crate) fn directory_lookup(
        &self,
        request: &ServiceRequest,
    ) -> Result<Service, RequestError> {
        let name = request.service.as_deref().unwrap_or_default();
        let Some(service) = self.catalog.get(name) else {
            return Err(RequestError::NotFound {
                message: format!("no service named {name:?}"),
                alternatives: hangar_core::suggest::closest(name, self.catalog.names(), 3),
            });
        };
        let os = request.env.get("os").unwrap_or(&service.os);
        let service = match self.catalog.viable(name, os) {
            Ok(service) => service,
            Err(hangar_core::catalog::Never::NoService) => unreachable!("looked up above"),
            Err(hangar_core::catalog::Never::Combination { reason }) => {
                return Err(RequestError::Never {
                    message: format!(
                        "{name} on os={os} can never be offered: {reason} (offered on: {})",
                        service
                            .environments
                            .iter()
                            .map(|env| format!("os={env}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    alternatives: self.catalog.alternatives(name, Some(os), 4),
                });
            }
        };
        Ok(service.clone())
    }

    fn shared_lock(
        &self,
        service: &str,
        env: &BTreeMap<String, String>,
    ) -> Arc<tokio::sync::Mutex<()>> {
        let key = format!(
            "{service}\0{}",
            serde_json::to_string(env).unwrap_or_default()
        );
        self.shared_locks
            .lock()
            .expect("shared locks lock")
            .entry(key)
            .or_default()
            .clone()
    }

    /// The least recently used active shared VM offering `service` whose process runs.
    async fn pick_shared(
        &self,
        service: &str,
        env: &BTreeMap<String, String>,
        egress: &hangar_core::EgressPolicy,
    ) -> Result<Option<VmRecord>, RequestError> {
        // The store keeps secret settings sealed, deterministically: compare sealed.
        let env = &self.secrets.seal_env(env);
        let mut candidates = self.store.shared_candidates(service, env).await?;
        candidates.retain(|vm| check::runs_with(vm, egress));
        candidates.sort_by_key(|vm| vm.last_used_at_ms);
        for vm in candidates {
            match self.host_of(&vm).run_state(&vm.id).await {
                Ok(RunState::Running) => return Ok(Some(vm)),
                Ok(RunState::Gone) => self.mark_crashed(&vm.id).await,
                Ok(RunState::Paused) | Err(_) => {}
            }
        }
        Ok(None)
    }

    /// Wakes the most recently used sleeping or archived shared VM offering `service` with
    /// exactly this environment, if there is one and it wakes.
    async fn wake_shared(
        &self,
        service: &str,
        env: &BTreeMap<String, String>,
        egress: &hangar_core::EgressPolicy,
    ) -> Option<VmRecord> {
        let env = &self.secrets.seal_env(env);
        let mut dormant: Vec<VmRecord> = self
            .store
            .vms(false)
            .await
            .ok()?
            .into_iter()
            .filter(|vm| {
                matches!(vm.state, VmState::Sleeping | VmState::Archived)
                    && vm.mode == Mode::Shared
                    && vm.services.iter().any(|s| s == service)
                    && vm.env == *env
                    && check::runs_with(vm, egress)
            })
            .collect();
        dormant.sort_by_key(|vm| std::cmp::Reverse(vm.last_used_at_ms));
        for vm in dormant {
            match self.wake(&vm.id).await {
                Ok(vm) => return Some(vm),
                Err(err) => {
                    tracing::warn!(vm = %vm.id, error = %err, "cannot wake a shared vm; trying others");
                }
            }
        }
        None
    }

    /// The answer to a request; the VM counts as used now.
    pub(crate) async fn grant(
        &self,
        mut vm: VmRecord,
        service: Option<&Service>,
        served: Served,
        task: Option<String>,
        sliced_to: Option<(u32, u32)>,
    ) -> Grant {
        let now = hangar_store::now_ms();
        match self.store.set_last_used(&vm.id, now).await {
            Ok(()) => vm.last_used_at_ms = vm.last_used_at_ms.max(now),
            Err(err) => tracing::warn!(vm = %vm.id, error = %err, "cannot record last use"),
        }
        self.grant_view(vm, service, served, task, sliced_to)
    }

    /// The [`Grant`] of `vm` as it is, for a VM whose last use the store already
    /// recorded (a pool VM's claim marks it used): [`Manager::grant`] without its write.
    pub(crate) fn grant_view(
        &self,
        vm: VmRecord,
        service: Option<&Service>,
        served: Served,
        task: Option<String>,
        sliced_to: Option<(u32, u32)>,
    ) -> Grant {
        let first_port = service.and_then(|service| service.ports.first());
        let endpoint = first_port
            .and_then(|port| vm.endpoints.get(&port.name))
            .cloned()
            .unwrap_or_default();
        let direct_endpoint = first_port
            .and_then(|port| vm.direct_endpoints.get(&port.name))
            .cloned()
            .unwrap_or_default();
        let dns_name = self
            .config
            .dns_domain
            .as_ref()
            .map(|domain| format!("{}.{domain}", vm.id));
        let placement = match served {
            Served::Shared | Served::Woken => None,
            _ => self.farm.placement(&vm.id),
        };
        Grant {
            placement,
            service: service.map(|s| s.name.clone()).unwrap_or_default(),
            vm,
            endpoint,
            direct_endpoint,
            served,
            task,
            dns_name,
            sliced_to,
            stages: Stages::default(),
            installed_at_deploy: Vec::new(),
            chosen: None,
        }
    }
}

/// The exact machine a service needs, as a configuration request.
pub(crate) fn service_machine(service: &Service, catalog: &Catalog) -> MachineRequest {
    MachineRequest {
        vcpus: service.vcpus,
        memory_mib: MemoryRange {
            min: service.memory_mib,
            max: service.memory_mib,
        },
        os: OsRequirement {
            name: service.os.clone(),
            min_version: catalog.os(&service.os).map(|os| os.version.clone()),
        },
        apps: [service.name.clone()].into(),
        disk_mib: None,
    }
}
