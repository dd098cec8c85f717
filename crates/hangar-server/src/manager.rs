//! The service manager: the request path of DESIGN.md (shared VM, else create), VM
//! deletion, and reconciliation of the store with the running QEMU processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            endpoint_host: IpAddr::from([127, 0, 0, 1]),
            default_deadline: Duration::from_secs(120),
            guest_cmdline: hangar_image::kernel_cmdline(None),
        }
    }
}

/// What a successful request gets.
#[derive(Debug, Clone)]
pub struct Grant {
    pub vm: VmRecord,
    pub service: String,
    /// The endpoint of the service's first port.
    pub endpoint: String,
    /// Whether an existing VM answered (shared mode) rather than a new one.
    pub reused: bool,
    pub task: Option<String>,
}

type Outcome = Option<Result<VmRecord, String>>;

pub struct Manager {
    store: Arc<Store>,
    hv: Arc<dyn Hypervisor>,
    images: Arc<dyn ImageSource>,
    catalog: Arc<Catalog>,
    config: ManagerConfig,
    /// Control channels of running VMs.
    agents: Mutex<HashMap<String, Arc<Agent>>>,
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

    /// The request path: validate, then a shared VM if one runs, else a new VM.
    pub async fn request(self: &Arc<Self>, request: ServiceRequest) -> Result<Grant, ApiError> {
        request
            .validate()
            .map_err(|err| ApiError::BadRequest(err.to_string()))?;
        let service = self.viable_service(&request)?;
        let deadline = request
            .deadline_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.default_deadline);
        let until = tokio::time::Instant::now() + deadline;

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
                    return Ok(self.grant(vm, &service, true, None));
                }
                Some(guard)
            }
        };

        let task = self.start_create(service.clone(), request, guard)?;
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
                    "the VM for {} is not ready within the request's deadline of {}; it is still being made (task {task}), try again shortly",
                    service.name,
                    humantime::format_duration(deadline)
                ),
                retry_after_s: 2,
                task: Some(task),
            }),
            Ok(Err(_)) => Err(ApiError::Internal("creation task vanished".into())),
            Ok(Ok(result)) => match result.clone().expect("waited for Some") {
                Ok(vm) => Ok(self.grant(vm, &service, false, Some(task))),
                Err(message) => Err(ApiError::Internal(message)),
            },
        }
    }

    /// The service the request names, if the combination can ever be offered.
    fn viable_service(&self, request: &ServiceRequest) -> Result<Service, ApiError> {
        let Some(service) = self.catalog.get(&request.service) else {
            return Err(ApiError::NotFound {
                message: format!("no service named {:?}", request.service),
                alternatives: hangar_core::suggest::closest(
                    &request.service,
                    self.catalog.names(),
                    3,
                ),
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

    fn grant(&self, vm: VmRecord, service: &Service, reused: bool, task: Option<String>) -> Grant {
        let endpoint = service
            .ports
            .first()
            .and_then(|port| vm.endpoints.get(&port.name))
            .cloned()
            .unwrap_or_default();
        Grant {
            vm,
            service: service.name.clone(),
            endpoint,
            reused,
            task,
        }
    }

    /// Records a creation task and starts it; returns its id.
    fn start_create(
        self: &Arc<Self>,
        service: Service,
        request: ServiceRequest,
        guard: Option<OwnedMutexGuard<()>>,
    ) -> Result<String, ApiError> {
        let task_id = TaskId::generate().to_string();
        let now = now_ms();
        self.store.insert_task(&TaskRecord {
            id: task_id.clone(),
            kind: "create_vm".into(),
            service: Some(service.name.clone()),
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
            let result = manager.create(&id, &service, &request).await;
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

    fn progress(&self, task: &str, stage: &str, percent: u8) {
        if let Err(err) = self
            .store
            .update_task(task, TaskState::Running, stage, percent, None)
        {
            tracing::warn!(task, error = %err, "cannot record task progress");
        }
    }

    /// Makes one VM for `service` and waits until it is ready. On failure nothing of the VM
    /// is left but its `failed` record, which says why.
    async fn create(
        &self,
        task: &str,
        service: &Service,
        request: &ServiceRequest,
    ) -> Result<VmRecord, String> {
        let started = Instant::now();
        self.progress(task, "image", 5);
        let assets = self.images.guest_assets().await?;
        let base_image = self.images.base_image(service).await?;

        let vm_id = VmId::generate().to_string();
        let (forwards, endpoints) = self
            .allocate_ports(service)
            .map_err(|err| format!("allocating host ports: {err}"))?;
        let now = now_ms();
        let spec = VmSpec {
            id: vm_id.clone(),
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            kernel: assets.vmlinux.clone(),
            initramfs: assets.initramfs.clone(),
            cmdline: self.config.guest_cmdline.clone(),
            base_image,
            forwards,
        };
        let spec_json = serde_json::to_value(&spec).map_err(|err| err.to_string())?;
        self.store
            .insert_vm(&VmRecord {
                id: vm_id.clone(),
                host: LOCAL_HOST.into(),
                services: vec![service.name.clone()],
                env: request.env.clone(),
                mode: request.mode,
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
                memory_mib: service.memory_mib,
                vcpus: service.vcpus,
            })
            .map_err(|err| error_chain(&err))?;
        if let Err(err) = self.store.set_task_vm(task, &vm_id) {
            tracing::warn!(task, error = %err, "cannot link task to vm");
        }
        tracing::info!(vm = %vm_id, service = %service.name, task, "creating vm");

        match self
            .boot(
                task, &vm_id, &spec, &spec_json, service, request, &endpoints, started,
            )
            .await
        {
            Ok(vm) => Ok(vm),
            Err(reason) => {
                let reason = format!("{} VM {vm_id}: {reason}", service.name);
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
        service: &Service,
        request: &ServiceRequest,
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

        self.progress(task, "boot", 40);
        let config = guest_config(vm_id, service, request);
        let agent = launched.agent;
        agent
            .configure(config, service.ready.timeout)
            .await
            .map_err(|err| self.diagnose(vm_id, &agent, &error_chain(&err)))?;

        self.progress(task, "ready", 70);
        ready::wait_ready(service, &service.ready, endpoints, &agent)
            .await
            .map_err(|not_ready| self.diagnose(vm_id, &agent, &not_ready.0))?;

        let boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.store
            .set_boot_ms(vm_id, boot_ms)
            .map_err(|err| error_chain(&err))?;
        let vm = self
            .store
            .transition(vm_id, VmState::Active, None)
            .map_err(|err| error_chain(&err))?;
        tracing::info!(vm = %vm_id, service = %service.name, boot_ms, "vm ready");
        Ok(vm)
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

    /// Frees everything of a VM that failed to come up and records why.
    async fn discard(&self, vm_id: &str, reason: &str) {
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
    fn allocate_ports(
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
                VmState::Archived | VmState::Failed => {
                    // No process belongs to these; a leftover one is stopped below.
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

/// What hangar-init needs to become this VM.
fn guest_config(vm_id: &str, service: &Service, request: &ServiceRequest) -> GuestConfig {
    let mut entropy = [0u8; 32];
    rand::rng().fill_bytes(&mut entropy);
    let settings = request.process_env();
    GuestConfig {
        identity: Identity {
            hostname: vm_id.to_owned(),
            unix_time_ms: now_ms(),
            entropy_hex: hex::encode(entropy),
        },
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
            path: "/etc/hostname".into(),
            contents: format!("{vm_id}\n"),
            mode: 0o644,
        }],
        services: service
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
            .collect(),
    }
}
