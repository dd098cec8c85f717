//! The service manager: the request path of DESIGN.md (shared VM, else create), VM
//! deletion, and reconciliation of the store with the running QEMU processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_core::matching::{
    MachineRequest, MatchKind, MemoryRange, Offer, OsRequirement, best_match, compare_versions,
};
use hangar_core::{Catalog, Mode, Service, ServiceRequest, TaskId, VmId, VmState};
use hangar_proto::{GuestConfig, Identity, NetworkConfig, RootConfig, ServiceCommand};
use hangar_store::{Store, TaskRecord, TaskState, VmRecord, now_ms};
use hangar_vmm::{Agent, Hypervisor, PortForward, RunState, VmSpec, usernet};
use rand::RngCore;
use tokio::sync::{OwnedMutexGuard, watch};

use crate::error::{ApiError, error_chain};
use crate::images::ImageSource;
use crate::ready;

/// The host name of the embedded local host in single-node mode.
pub const LOCAL_HOST: &str = "local";

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Address the host's port forwards listen on; endpoints are `endpoint_host:port`.
    pub endpoint_host: IpAddr,
    /// How long a request waits for a VM when it names no deadline.
    pub default_deadline: Duration,
    /// Kernel command line of every guest (see `hangar_image::kernel_cmdline`).
    pub guest_cmdline: String,
    /// Most memory all warm pools together may hold (ready and booting VMs), in MiB.
    pub pool_memory_mib: u64,
    /// When set, answers carry a DNS name `<vm>.<domain>`.
    pub dns_domain: Option<String>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            endpoint_host: IpAddr::from([127, 0, 0, 1]),
            default_deadline: Duration::from_secs(120),
            guest_cmdline: hangar_image::kernel_cmdline(None),
            pool_memory_mib: 1024,
            dns_domain: None,
        }
    }
}

/// How a request was served.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// An active VM already offering the service (shared mode).
    Shared,
    /// A paused pool VM of exactly the requested configuration.
    Exact,
    /// A paused pool VM with more than requested (sliced down with `exact_size`).
    Superset,
    /// A pre-OS hardware shell, given the requested OS image and booted.
    Partial,
    /// A new VM, booted for this request.
    Created,
}

impl From<MatchKind> for Served {
    fn from(kind: MatchKind) -> Served {
        match kind {
            MatchKind::Exact => Served::Exact,
            MatchKind::Superset => Served::Superset,
            MatchKind::Partial => Served::Partial,
        }
    }
}

/// What a successful request gets.
#[derive(Debug, Clone)]
pub struct Grant {
    pub vm: VmRecord,
    /// The service asked for, or the first app of a configuration (empty for a bare OS).
    pub service: String,
    /// The endpoint of the service's first port (empty when it offers none).
    pub endpoint: String,
    pub served: Served,
    pub task: Option<String>,
    /// `<vm>.<domain>` when a DNS domain is configured.
    pub dns_name: Option<String>,
    /// The size the VM was sliced to (`exact_size` on a superset), as (vCPUs, MiB).
    pub sliced_to: Option<(u32, u32)>,
}

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
}

type Outcome = Option<Result<VmRecord, String>>;

pub struct Manager {
    pub(crate) store: Arc<Store>,
    pub(crate) hv: Arc<dyn Hypervisor>,
    pub(crate) images: Arc<dyn ImageSource>,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) config: ManagerConfig,
    /// Control channels of running VMs.
    pub(crate) agents: Mutex<HashMap<String, Arc<Agent>>>,
    /// One lifecycle operation (sleep, archive, wake) at a time per VM.
    pub(crate) vm_ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Warm pool bookkeeping: request rates, fills in flight, the refill signal.
    pub(crate) pools: crate::pools::PoolRuntime,
    /// One lock per (service, environment): shared requests that find no VM wait for the
    /// one being made instead of making their own.
    shared_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Outcomes of creation tasks, for the requests waiting on them.
    outcomes: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
}

/// What start-up reconciliation found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub adopted: Vec<String>,
    pub failed: Vec<String>,
    pub stopped_unknown: Vec<String>,
    pub removed_dirs: Vec<String>,
}

impl Manager {
    pub fn new(
        store: Arc<Store>,
        hv: Arc<dyn Hypervisor>,
        images: Arc<dyn ImageSource>,
        catalog: Arc<Catalog>,
        config: ManagerConfig,
    ) -> Arc<Manager> {
        Arc::new(Manager {
            store,
            hv,
            images,
            catalog,
            config,
            agents: Mutex::default(),
            vm_ops: Mutex::default(),
            pools: crate::pools::PoolRuntime::default(),
            shared_locks: Mutex::default(),
            outcomes: Mutex::default(),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The request path: validate; then a shared VM if one runs (shared mode), else the best
    /// paused pool VM, else a new VM.
    pub async fn request(self: &Arc<Self>, request: ServiceRequest) -> Result<Grant, ApiError> {
        request
            .validate()
            .map_err(|err| ApiError::BadRequest(err.to_string()))?;
        let deadline = request
            .deadline_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.default_deadline);
        let until = tokio::time::Instant::now() + deadline;
        if let Some(config) = request.config.clone() {
            return self.request_config(request, config, until, deadline).await;
        }
        let service = self.viable_service(&request)?;
        self.record_demand(&service.name);

        let guard = match request.mode {
            Mode::Dedicated => None,
            Mode::Shared => {
                let lock = self.shared_lock(&service.name, &request.env);
                let guard = tokio::time::timeout_at(until, lock.lock_owned())
                    .await
                    .map_err(|_| ApiError::TryAgain {
                        message: format!(
                            "a VM offering {} is being made; try again shortly",
                            service.name
                        ),
                        retry_after_s: 2,
                        task: None,
                    })?;
                if let Some(vm) = self.pick_shared(&service.name, &request.env).await? {
                    self.store.touch(&vm.id)?;
                    return Ok(self.grant(vm, Some(&service), Served::Shared, None, None));
                }
                Some(guard)
            }
        };

        let machine = service_machine(&service, &self.catalog);
        if let Some(grant) = self
            .grant_from_pool(&machine, &request, Some(&service))
            .await?
        {
            return Ok(grant);
        }
        let make = MakeVm {
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            service: Some(service.clone()),
            mode: request.mode,
            env: request.env.clone(),
            pool: None,
            ready: None,
        };
        self.create_and_wait(make, guard, until, deadline, &service.name)
            .await
    }

    /// A configuration request: the best paused VM, else a new VM of that configuration.
    async fn request_config(
        self: &Arc<Self>,
        request: ServiceRequest,
        config: MachineRequest,
        until: tokio::time::Instant,
        deadline: Duration,
    ) -> Result<Grant, ApiError> {
        let Some(os) = self.catalog.os(&config.os.name) else {
            return Err(ApiError::Never {
                message: format!("no os named {:?}", config.os.name),
                alternatives: self
                    .catalog
                    .operating_systems()
                    .map(|os| format!("os {}", os.name))
                    .collect(),
            });
        };
        if let Some(min) = &config.os.min_version
            && compare_versions(&os.version, min) == Some(std::cmp::Ordering::Less)
        {
            return Err(ApiError::Never {
                message: format!(
                    "os {} is at version {}, never {min} or newer",
                    os.name, os.version
                ),
                alternatives: vec![format!("os {} version {}", os.name, os.version)],
            });
        }
        let service = match config.apps.len() {
            0 => None,
            1 => {
                let app = config.apps.first().expect("one app");
                let service = self.catalog.get(app).ok_or_else(|| ApiError::NotFound {
                    message: format!("no application named {app:?}"),
                    alternatives: hangar_core::suggest::closest(app, self.catalog.names(), 3),
                })?;
                if service.os != os.name {
                    return Err(ApiError::Never {
                        message: format!("{app} runs on os {}, never on {}", service.os, os.name),
                        alternatives: vec![format!("os {}", service.os)],
                    });
                }
                if config.vcpus.max(service.vcpus) > config.vcpus
                    || service.memory_mib > config.memory_mib.max
                {
                    return Err(ApiError::Never {
                        message: format!(
                            "{app} needs {} vCPUs and {} MiB, more than the configuration allows",
                            service.vcpus, service.memory_mib
                        ),
                        alternatives: Vec::new(),
                    });
                }
                Some(service.clone())
            }
            _ => {
                return Err(ApiError::Never {
                    message:
                        "no image offers several applications together yet; request them one by one"
                            .into(),
                    alternatives: config.apps.iter().cloned().collect(),
                });
            }
        };
        let mut request = request;
        request.mode = Mode::Dedicated;
        if let Some(grant) = self
            .grant_from_pool(&config, &request, service.as_ref())
            .await?
        {
            return Ok(grant);
        }
        let name = service
            .as_ref()
            .map_or_else(|| os.name.clone(), |s| s.name.clone());
        let make = MakeVm {
            service,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib.min,
            mode: Mode::Dedicated,
            env: request.env.clone(),
            pool: None,
            ready: None,
        };
        self.create_and_wait(make, None, until, deadline, &name)
            .await
    }

    /// Starts a creation task and waits for it until the request's deadline.
    async fn create_and_wait(
        self: &Arc<Self>,
        make: MakeVm,
        guard: Option<OwnedMutexGuard<()>>,
        until: tokio::time::Instant,
        deadline: Duration,
        name: &str,
    ) -> Result<Grant, ApiError> {
        let service = make.service.clone();
        let task = self.start_create(make, guard)?;
        let mut outcome = self
            .outcomes
            .lock()
            .expect("outcomes lock")
            .get(&task)
            .cloned()
            .ok_or_else(|| ApiError::Internal("task outcome missing".into()))?;
        let waited = tokio::time::timeout_at(until, outcome.wait_for(Option::is_some)).await;
        match waited {
            Err(_) => Err(ApiError::TryAgain {
                message: format!(
                    "the VM for {name} is not ready within the request's deadline of {}; it is still being made (task {task}), try again shortly",
                    humantime::format_duration(deadline)
                ),
                retry_after_s: 2,
                task: Some(task),
            }),
            Ok(Err(_)) => Err(ApiError::Internal("creation task vanished".into())),
            Ok(Ok(result)) => match result.clone().expect("waited for Some") {
                Ok(vm) => Ok(self.grant(vm, service.as_ref(), Served::Created, Some(task), None)),
                Err(message) => Err(ApiError::Internal(message)),
            },
        }
    }

    /// Hands out the best paused pool VM for `machine`, if any: resumed and re-identified
    /// (exact, superset; sliced with `exact_size`), or a pre-OS shell given its OS image and
    /// booted (partial). A VM that fails on the way is discarded and the next one tried.
    async fn grant_from_pool(
        &self,
        machine: &MachineRequest,
        request: &ServiceRequest,
        service: Option<&Service>,
    ) -> Result<Option<Grant>, ApiError> {
        for _ in 0..8 {
            let paused: Vec<VmRecord> = self
                .store
                .vms(false)?
                .into_iter()
                .filter(|vm| vm.state == VmState::Ready && vm.pool.is_some())
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
            let vm = match self.store.claim(&candidate.id, request.mode, &request.env) {
                Ok(vm) => vm,
                Err(hangar_store::StoreError::Transition(_)) => continue, // another request won it
                Err(err) => return Err(err.into()),
            };
            if service.is_none_or(|service| service.name != pool) {
                // Service requests count for their own pool already.
                self.record_demand(&pool);
            }
            self.pools.refill();
            let started = Instant::now();
            let handed = match kind {
                MatchKind::Exact | MatchKind::Superset => {
                    self.wake_pooled(&vm, kind, machine, request.exact_size)
                        .await
                }
                MatchKind::Partial => self.boot_shell(&vm, machine, service, request).await,
            };
            match handed {
                Ok((vm, sliced_to)) => {
                    tracing::info!(vm = %vm.id, pool = %pool, kind = kind.as_str(), us = started.elapsed().as_micros() as u64, "granted from pool");
                    return Ok(Some(self.grant(vm, service, kind.into(), None, sliced_to)));
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
    async fn wake_pooled(
        &self,
        vm: &VmRecord,
        kind: MatchKind,
        machine: &MachineRequest,
        exact_size: bool,
    ) -> Result<(VmRecord, Option<(u32, u32)>), String> {
        let agent = self.agent(&vm.id).ok_or("no agent channel")?;
        let started = Instant::now();
        if let Err(err) = self.hv.set_foreground(&vm.id).await {
            tracing::debug!(vm = %vm.id, error = %error_chain(&err), "cannot raise vm priority");
        }
        // The identity message is written first and waits in QEMU while the guest is
        // paused; resuming then delivers it at once instead of on QEMU's next poll.
        let identity = agent.reidentify(new_identity(&vm.id), Duration::from_secs(10));
        let resume = async {
            tokio::task::yield_now().await;
            let result = self.hv.resume(&vm.id).await;
            (result, started.elapsed())
        };
        let (reply, (resumed, resume_took)) = tokio::join!(identity, resume);
        resumed.map_err(|err| error_chain(&err))?;
        let reply = reply.map_err(|err| error_chain(&err))?;
        tracing::debug!(
            vm = %vm.id,
            resume_us = resume_took.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
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
            sliced_to = Some(self.slice(vm, machine, &agent).await?);
        }
        let vm = self
            .store
            .vm(&vm.id)
            .map_err(|err| error_chain(&err))?
            .ok_or("VM vanished")?;
        Ok((vm, sliced_to))
    }

    /// Slices a superset VM down to the requested size: the balloon takes the memory above
    /// the request's maximum, and vCPUs beyond the request go offline in the guest.
    async fn slice(
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
    async fn boot_shell(
        &self,
        vm: &VmRecord,
        machine: &MachineRequest,
        service: Option<&Service>,
        request: &ServiceRequest,
    ) -> Result<(VmRecord, Option<(u32, u32)>), String> {
        let image = match service {
            Some(service) => self.images.base_image(service).await?,
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
        let endpoint_text = endpoints
            .iter()
            .map(|(name, addr)| (name.clone(), addr.to_string()))
            .collect();
        self.store
            .set_offer(&vm.id, &services, &os, &endpoint_text)
            .map_err(|err| error_chain(&err))?;
        self.store
            .set_launch(&vm.id, vm.pid, &spec_json)
            .map_err(|err| error_chain(&err))?;

        let agent = self.agent(&vm.id).ok_or("no agent channel")?;
        if let Err(err) = self.hv.set_foreground(&vm.id).await {
            tracing::debug!(vm = %vm.id, error = %error_chain(&err), "cannot raise vm priority");
        }
        self.hv
            .resume(&vm.id)
            .await
            .map_err(|err| error_chain(&err))?;
        let config = guest_config(&vm.id, &vm.id, service, &request.env);
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
            .map_err(|err| error_chain(&err))?
            .ok_or("VM vanished")?;
        Ok((vm, None))
    }

    /// The service the request names, if the combination can ever be offered.
    fn viable_service(&self, request: &ServiceRequest) -> Result<Service, ApiError> {
        let name = request.service.as_deref().unwrap_or_default();
        let Some(service) = self.catalog.get(name) else {
            return Err(ApiError::NotFound {
                message: format!("no service named {name:?}"),
                alternatives: hangar_core::suggest::closest(name, self.catalog.names(), 3),
            });
        };
        if let Some(os) = request.env.get("os")
            && *os != service.os
        {
            return Err(ApiError::Never {
                message: format!(
                    "{} is offered on os={} only, never on os={os}",
                    service.name, service.os
                ),
                alternatives: vec![format!("{} --env os={}", service.name, service.os)],
            });
        }
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
    ) -> Result<Option<VmRecord>, ApiError> {
        let mut candidates = self.store.shared_candidates(service, env)?;
        candidates.sort_by_key(|vm| vm.last_used_at_ms);
        for vm in candidates {
            match self.hv.run_state(&vm.id).await {
                Ok(RunState::Running) => return Ok(Some(vm)),
                Ok(RunState::Gone) => self.mark_crashed(&vm.id).await,
                Ok(RunState::Paused) | Err(_) => {}
            }
        }
        Ok(None)
    }

    fn grant(
        &self,
        vm: VmRecord,
        service: Option<&Service>,
        served: Served,
        task: Option<String>,
        sliced_to: Option<(u32, u32)>,
    ) -> Grant {
        let endpoint = service
            .and_then(|service| service.ports.first())
            .and_then(|port| vm.endpoints.get(&port.name))
            .cloned()
            .unwrap_or_default();
        let dns_name = self
            .config
            .dns_domain
            .as_ref()
            .map(|domain| format!("{}.{domain}", vm.id));
        Grant {
            service: service.map(|s| s.name.clone()).unwrap_or_default(),
            vm,
            endpoint,
            served,
            task,
            dns_name,
            sliced_to,
        }
    }

    /// Records a creation task and starts it; returns its id.
    pub(crate) fn start_create(
        self: &Arc<Self>,
        make: MakeVm,
        guard: Option<OwnedMutexGuard<()>>,
    ) -> Result<String, ApiError> {
        let task_id = TaskId::generate().to_string();
        let now = now_ms();
        self.store.insert_task(&TaskRecord {
            id: task_id.clone(),
            kind: if make.pool.is_some() {
                "fill_pool"
            } else {
                "create_vm"
            }
            .into(),
            service: make
                .service
                .as_ref()
                .map(|s| s.name.clone())
                .or_else(|| make.pool.clone()),
            vm_id: None,
            state: TaskState::Running,
            stage: "queued".into(),
            percent: 0,
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
        })?;
        let (tx, rx) = watch::channel(None);
        self.outcomes
            .lock()
            .expect("outcomes lock")
            .insert(task_id.clone(), rx);
        let manager = self.clone();
        let id = task_id.clone();
        tokio::spawn(async move {
            let result = manager.create(&id, &make).await;
            let (state, stage, error) = match &result {
                Ok(_) => (TaskState::Succeeded, "done", None),
                Err(message) => (TaskState::Failed, "failed", Some(message.as_str())),
            };
            if let Err(err) = manager.store.update_task(&id, state, stage, 100, error) {
                tracing::warn!(task = %id, error = %err, "cannot record task outcome");
            }
            tx.send_replace(Some(result));
            drop(guard);
            // Late waiters read the outcome from the store; keep the map small.
            tokio::time::sleep(Duration::from_secs(60)).await;
            manager.outcomes.lock().expect("outcomes lock").remove(&id);
        });
        Ok(task_id)
    }

    /// Waits for a task started by [`Manager::start_create`] to end.
    pub(crate) async fn task_outcome(&self, task: &str) -> Option<Result<VmRecord, String>> {
        let mut outcome = self
            .outcomes
            .lock()
            .expect("outcomes lock")
            .get(task)
            .cloned()?;
        outcome.wait_for(Option::is_some).await.ok()?.clone()
    }

    fn progress(&self, task: &str, stage: &str, percent: u8) {
        if let Err(err) = self
            .store
            .update_task(task, TaskState::Running, stage, percent, None)
        {
            tracing::warn!(task, error = %err, "cannot record task progress");
        }
    }

    /// Makes one VM and waits until it is ready: active for a request, paused in its pool
    /// for a pool fill. On failure nothing of the VM is left but its `failed` record.
    async fn create(&self, task: &str, make: &MakeVm) -> Result<VmRecord, String> {
        let started = Instant::now();
        self.progress(task, "image", 5);
        let assets = self.images.guest_assets().await?;
        let base_image = match &make.service {
            Some(service) => self.images.base_image(service).await?,
            None => None,
        };
        let pre_os = make.service.is_none();

        let vm_id = VmId::generate().to_string();
        let (forwards, endpoints) = match &make.service {
            Some(service) => self
                .allocate_ports(service)
                .map_err(|err| format!("allocating host ports: {err}"))?,
            None => (Vec::new(), BTreeMap::new()),
        };
        let now = now_ms();
        let spec = VmSpec {
            id: vm_id.clone(),
            vcpus: make.vcpus,
            memory_mib: make.memory_mib,
            kernel: assets.vmlinux.clone(),
            initramfs: assets.initramfs.clone(),
            cmdline: self.config.guest_cmdline.clone(),
            base_image,
            forwards,
            pre_os,
            background: make.pool.is_some(),
        };
        let os = make.service.as_ref().map(|service| {
            let version = self
                .catalog
                .os(&service.os)
                .map(|os| os.version.clone())
                .unwrap_or_default();
            (service.os.clone(), version)
        });
        let spec_json = serde_json::to_value(&spec).map_err(|err| err.to_string())?;
        self.store
            .insert_vm(&VmRecord {
                id: vm_id.clone(),
                host: LOCAL_HOST.into(),
                services: make.service.iter().map(|s| s.name.clone()).collect(),
                env: make.env.clone(),
                mode: make.mode,
                owner: "local".into(),
                state: VmState::Creating,
                endpoints: endpoints
                    .iter()
                    .map(|(name, addr)| (name.clone(), addr.to_string()))
                    .collect(),
                spec: spec_json.clone(),
                pid: None,
                error: None,
                created_at_ms: now,
                updated_at_ms: now,
                last_used_at_ms: now,
                boot_ms: None,
                memory_mib: make.memory_mib,
                vcpus: make.vcpus,
                pool: make.pool.clone(),
                os,
            })
            .map_err(|err| error_chain(&err))?;
        if let Err(err) = self.store.set_task_vm(task, &vm_id) {
            tracing::warn!(task, error = %err, "cannot link task to vm");
        }
        tracing::info!(vm = %vm_id, service = ?make.service.as_ref().map(|s| &s.name), pool = ?make.pool, task, "creating vm");

        match self
            .boot(task, &vm_id, &spec, &spec_json, make, &endpoints, started)
            .await
        {
            Ok(vm) => Ok(vm),
            Err(reason) => {
                let what = make.service.as_ref().map_or("shell", |s| s.name.as_str());
                let reason = format!("{what} VM {vm_id}: {reason}");
                self.discard(&vm_id, &reason).await;
                Err(reason)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn boot(
        &self,
        task: &str,
        vm_id: &str,
        spec: &VmSpec,
        spec_json: &serde_json::Value,
        make: &MakeVm,
        endpoints: &BTreeMap<String, SocketAddr>,
        started: Instant,
    ) -> Result<VmRecord, String> {
        self.progress(task, "launch", 20);
        self.store
            .transition(vm_id, VmState::Booting, None)
            .map_err(|err| error_chain(&err))?;
        let launched = self
            .hv
            .launch(spec)
            .await
            .map_err(|err| error_chain(&err))?;
        self.agents
            .lock()
            .expect("agents lock")
            .insert(vm_id.to_owned(), launched.agent.clone());
        self.store
            .set_launch(vm_id, launched.pid, spec_json)
            .map_err(|err| error_chain(&err))?;

        if let Some(service) = &make.service {
            self.progress(task, "boot", 40);
            // Pool VMs carry a staging hostname; each gets its own identity when handed out.
            let hostname = match &make.pool {
                Some(pool) => format!("pool-{pool}"),
                None => vm_id.to_owned(),
            };
            let config = guest_config(vm_id, &hostname, Some(service), &make.env);
            let agent = launched.agent;
            agent
                .configure(config, service.ready.timeout)
                .await
                .map_err(|err| self.diagnose(vm_id, &agent, &error_chain(&err)))?;

            self.progress(task, "ready", 70);
            let ready = make.ready.as_ref().unwrap_or(&service.ready);
            self.wait_ready(vm_id, launched.pid, service, ready, endpoints, &agent)
                .await?;
        }

        let boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.store
            .set_boot_ms(vm_id, boot_ms)
            .map_err(|err| error_chain(&err))?;
        let vm = if make.pool.is_some() {
            if !spec.pre_os {
                self.hv
                    .pause(vm_id)
                    .await
                    .map_err(|err| error_chain(&err))?;
            }
            self.store
                .transition(vm_id, VmState::Ready, None)
                .map_err(|err| error_chain(&err))?
        } else {
            self.store
                .transition(vm_id, VmState::Active, None)
                .map_err(|err| error_chain(&err))?
        };
        tracing::info!(vm = %vm_id, state = %vm.state, boot_ms, "vm ready");
        Ok(vm)
    }

    /// Waits for the service's ready criterion on this VM; the error explains what failed.
    pub(crate) async fn wait_ready(
        &self,
        vm_id: &str,
        pid: Option<u32>,
        service: &Service,
        ready: &hangar_core::ReadySpec,
        endpoints: &BTreeMap<String, SocketAddr>,
        agent: &Agent,
    ) -> Result<(), String> {
        let console_log = self.hv.console_log(vm_id);
        let target = ready::ProbeTarget {
            endpoints,
            agent,
            console_log: console_log.as_deref(),
            qemu_pid: pid,
        };
        ready::wait_ready(service, ready, &target)
            .await
            .map(drop)
            .map_err(|not_ready| self.diagnose(vm_id, agent, &not_ready.0))
    }

    /// `reason`, with what the guest reported that explains it (service exits, failures).
    fn diagnose(&self, vm_id: &str, agent: &Agent, reason: &str) -> String {
        let mut text = reason.to_owned();
        for event in agent.recent_events() {
            match event {
                hangar_proto::GuestMessage::ServiceExited { name, code, signal } => {
                    text.push_str(&format!(
                        "; service process {name} exited ({})",
                        match (code, signal) {
                            (Some(code), _) => format!("code {code}"),
                            (_, Some(signal)) => format!("signal {signal}"),
                            _ => "unknown status".into(),
                        }
                    ));
                }
                hangar_proto::GuestMessage::Failed { stage, error } => {
                    text.push_str(&format!("; guest failed at {stage}: {error}"));
                }
                _ => {}
            }
        }
        tracing::debug!(vm = %vm_id, reason = %text, "vm not ready");
        text
    }

    /// Frees everything of a VM that failed (or is not wanted) and records why.
    pub(crate) async fn discard(&self, vm_id: &str, reason: &str) {
        tracing::warn!(vm = %vm_id, reason, "vm creation failed");
        self.agents.lock().expect("agents lock").remove(vm_id);
        if let Err(err) = self.hv.destroy(vm_id).await {
            tracing::warn!(vm = %vm_id, error = %error_chain(&err), "cannot destroy failed vm");
        }
        if let Ok(Some(_)) = self.store.vm(vm_id)
            && let Err(err) = self.store.transition(vm_id, VmState::Failed, Some(reason))
        {
            tracing::warn!(vm = %vm_id, error = %err, "cannot mark vm failed");
        }
    }

    /// One free host port per service port, on the endpoint address.
    pub(crate) fn allocate_ports(
        &self,
        service: &Service,
    ) -> std::io::Result<(Vec<PortForward>, BTreeMap<String, SocketAddr>)> {
        // Hold every probe listener until all are chosen, so no port is picked twice.
        let listeners = service
            .ports
            .iter()
            .map(|_| std::net::TcpListener::bind((self.config.endpoint_host, 0)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut forwards = Vec::new();
        let mut endpoints = BTreeMap::new();
        for (port, listener) in service.ports.iter().zip(&listeners) {
            let addr = listener.local_addr()?;
            forwards.push(PortForward {
                host: addr.ip(),
                host_port: addr.port(),
                guest_port: port.guest,
            });
            endpoints.insert(port.name.clone(), addr);
        }
        Ok((forwards, endpoints))
    }

    /// Deletes a VM: its process and files, then its state. Idempotent for deleted VMs.
    pub async fn delete(&self, id: &str) -> Result<VmRecord, ApiError> {
        let vm = self.store.vm(id)?.ok_or_else(|| ApiError::NotFound {
            message: format!("no VM {id}"),
            alternatives: Vec::new(),
        })?;
        match vm.state {
            VmState::Deleted => return Ok(vm),
            VmState::Creating | VmState::Booting => {
                return Err(ApiError::Conflict(format!(
                    "VM {id} is still being created; delete it once its task ends"
                )));
            }
            VmState::Ready
            | VmState::Active
            | VmState::Sleeping
            | VmState::Archived
            | VmState::Failed => {}
        }
        self.agents.lock().expect("agents lock").remove(id);
        self.hv.destroy(id).await.map_err(|err| {
            ApiError::Internal(format!("cannot destroy VM {id}: {}", error_chain(&err)))
        })?;
        let vm = self.store.transition(id, VmState::Deleted, None)?;
        tracing::info!(vm = %id, "vm deleted");
        Ok(vm)
    }

    /// A VM whose process vanished: free its files, record the failure.
    async fn mark_crashed(&self, id: &str) {
        self.discard(id, "the VM's QEMU process exited unexpectedly")
            .await;
    }

    /// Compares the store with the processes that run and mends the difference:
    /// VMs whose QEMU still runs are adopted; VMs whose process is gone are marked failed;
    /// VMs caught half-made are removed and marked failed; QEMU processes and VM
    /// directories the store does not know are stopped and removed. Idempotent.
    pub async fn reconcile(
        &self,
        vms_dir: Option<&std::path::Path>,
    ) -> Result<ReconcileReport, ApiError> {
        let mut report = ReconcileReport::default();
        let interrupted = self
            .store
            .fail_running_tasks("the server stopped before the task finished")?;
        if interrupted > 0 {
            tracing::info!(tasks = interrupted, "marked interrupted tasks failed");
        }
        let mut live = HashSet::new();
        for vm in self.store.vms(false)? {
            match vm.state {
                VmState::Creating | VmState::Booting => {
                    self.discard(&vm.id, "the server stopped while the VM was being created")
                        .await;
                    report.failed.push(vm.id);
                }
                VmState::Ready | VmState::Active | VmState::Sleeping => {
                    let spec: VmSpec =
                        serde_json::from_value(vm.spec.clone()).map_err(ApiError::internal)?;
                    match self.hv.adopt(&spec).await {
                        Ok(Some(launched)) => {
                            self.agents
                                .lock()
                                .expect("agents lock")
                                .insert(vm.id.clone(), launched.agent);
                            // An archive cut short leaves an active VM paused: resume it.
                            if vm.state == VmState::Active
                                && matches!(self.hv.run_state(&vm.id).await, Ok(RunState::Paused))
                            {
                                tracing::info!(vm = %vm.id, "resuming an active VM found paused");
                                if let Err(err) = self.hv.resume(&vm.id).await {
                                    tracing::warn!(vm = %vm.id, error = %error_chain(&err), "cannot resume");
                                }
                            }
                            live.insert(vm.id.clone());
                            report.adopted.push(vm.id);
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
                    self.reconcile_archived(&vm, &mut live, &mut report).await;
                }
                VmState::Failed => {
                    // No process belongs to a failed VM; a leftover one is stopped below.
                }
                VmState::Deleted => {}
            }
        }
        for id in self.hv.running().await.map_err(ApiError::internal)? {
            if !live.contains(&id) {
                tracing::warn!(vm = %id, "stopping a QEMU process the store does not know");
                if let Err(err) = self.hv.destroy(&id).await {
                    tracing::warn!(vm = %id, error = %error_chain(&err), "cannot stop unknown qemu");
                }
                report.stopped_unknown.push(id);
            }
        }
        if let Some(vms_dir) = vms_dir {
            let keep: HashSet<String> = self
                .store
                .vms(false)?
                .into_iter()
                .filter(|vm| vm.state != VmState::Failed)
                .map(|vm| vm.id)
                .collect();
            if let Ok(entries) = std::fs::read_dir(vms_dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !keep.contains(&name) {
                        tracing::info!(dir = %entry.path().display(), "removing leftover vm directory");
                        if std::fs::remove_dir_all(entry.path()).is_ok() {
                            report.removed_dirs.push(name);
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// One round of health monitoring: VMs whose process died are marked failed.
    pub async fn monitor_once(&self) {
        let Ok(vms) = self.store.vms(false) else {
            return;
        };
        for vm in vms {
            if matches!(
                vm.state,
                VmState::Ready | VmState::Active | VmState::Sleeping
            ) && matches!(self.hv.run_state(&vm.id).await, Ok(RunState::Gone))
            {
                // The state may have moved on while we looked (a delete in flight).
                if let Ok(Some(now)) = self.store.vm(&vm.id)
                    && now.state == vm.state
                {
                    self.mark_crashed(&vm.id).await;
                }
            }
        }
    }

    /// The control channel of a running VM.
    pub fn agent(&self, id: &str) -> Option<Arc<Agent>> {
        self.agents.lock().expect("agents lock").get(id).cloned()
    }
}

/// A fresh identity: hostname, the current time, and new entropy.
pub(crate) fn new_identity(hostname: &str) -> Identity {
    let mut entropy = [0u8; 32];
    rand::rng().fill_bytes(&mut entropy);
    Identity {
        hostname: hostname.to_owned(),
        unix_time_ms: now_ms(),
        entropy_hex: hex::encode(entropy),
    }
}

/// The exact machine a service needs, as a configuration request.
fn service_machine(service: &Service, catalog: &Catalog) -> MachineRequest {
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
    }
}

/// What hangar-init needs to become this VM.
fn guest_config(
    vm_id: &str,
    hostname: &str,
    service: Option<&Service>,
    env: &BTreeMap<String, String>,
) -> GuestConfig {
    let settings = hangar_core::request::process_env(env);
    GuestConfig {
        identity: new_identity(hostname),
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: usernet::GUEST_ADDRESS.into(),
            gateway: Some(usernet::GATEWAY.into()),
            dns: vec![usernet::DNS.into()],
        }),
        root: Some(RootConfig {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
        }),
        files: vec![hangar_proto::FileWrite {
            path: "/etc/hangar-vm-id".into(),
            contents: format!("{vm_id}\n"),
            mode: 0o644,
        }],
        services: service
            .map(|service| {
                service
                    .processes
                    .iter()
                    .map(|process| {
                        let mut env = process.env.clone();
                        env.extend(settings.clone());
                        ServiceCommand {
                            name: process.name.clone(),
                            argv: process.argv.clone(),
                            env,
                            workdir: process.workdir.clone(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
