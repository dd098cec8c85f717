//! Making VMs: creation tasks, launch, configuration through hangar-init, the ready
//! criterion, and discarding VMs that fail on the way.

use crate::store_wait::Wait;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::{Service, TaskId, VmId, VmState};
use hangar_proto::{GuestConfig, Identity, NetworkConfig, RootConfig, ServiceCommand};
use hangar_store::{TaskRecord, TaskState, VmRecord, now_ms};
use hangar_vmm::{Agent, PortForward, VmSpec, usernet};
use rand::RngCore;
use tokio::sync::{OwnedMutexGuard, watch};

use crate::error::{ApiError, error_chain};
use crate::images::ProgressFn;
use crate::ready;

use crate::manager::*;

impl Manager {
    /// Records a creation task and starts it; returns its id.
    pub(crate) fn start_create(
        self: &Arc<Self>,
        make: MakeVm,
        guard: Option<OwnedMutexGuard<()>>,
    ) -> Result<String, ApiError> {
        let task_id = TaskId::generate().to_string();
        let now = now_ms();
        self.store
            .insert_task(&TaskRecord {
                id: task_id.clone(),
                kind: if make.template {
                    "build_template"
                } else if make.pool.is_some() {
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
            })
            .wait()?;
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
            if let Err(err) = manager
                .store
                .update_task(&id, state, stage, 100, error)
                .await
            {
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

    /// A progress callback for an image build inside a task: the build's stages, its
    /// percent mapped into `from..to` of the task.
    pub(crate) fn build_progress(&self, task: &str, from: u8, to: u8) -> ProgressFn {
        let store = self.store.clone();
        let task = task.to_owned();
        Arc::new(move |stage: &str, percent: u8| {
            let scaled =
                from as u32 + (to.saturating_sub(from) as u32 * percent.min(100) as u32) / 100;
            if let Err(err) = store
                .update_task(
                    &task,
                    TaskState::Running,
                    &format!("image: {stage}"),
                    scaled as u8,
                    None,
                )
                .wait()
            {
                tracing::warn!(task = %task, error = %err, "cannot record build progress");
            }
        })
    }

    pub(crate) fn progress(&self, task: &str, stage: &str, percent: u8) {
        if let Err(err) = self
            .store
            .update_task(task, TaskState::Running, stage, percent, None)
            .wait()
        {
            tracing::warn!(task, error = %err, "cannot record task progress");
        }
    }

    /// Makes one VM and waits until it is ready: active for a request, paused in its pool
    /// for a pool fill. On failure nothing of the VM is left but its `failed` record.
    pub(crate) async fn create(&self, task: &str, make: &MakeVm) -> Result<VmRecord, String> {
        let started = Instant::now();
        self.progress(task, "image", 2);
        let assets = self.images.guest_assets().await?;
        let os_name = make
            .service
            .as_ref()
            .map(|service| make.env.get("os").cloned().unwrap_or(service.os.clone()));
        let root = match (&make.service, &os_name) {
            (Some(service), Some(os)) => {
                if !self.images.is_built(service, os) {
                    tracing::info!(service = %service.name, os = %os, task, "building the service's image");
                }
                self.images
                    .root_image(service, os, self.build_progress(task, 2, 19))
                    .await?
            }
            _ => crate::images::RootImage::default(),
        };
        self.images.touch(&root.layer_hashes);
        let pre_os = make.service.is_none();

        let vm_id = VmId::generate().to_string();
        let (forwards, endpoints) = match &make.service {
            Some(service) => self
                .allocate_ports(service)
                .map_err(|err| format!("allocating host ports: {err}"))?,
            None => (Vec::new(), BTreeMap::new()),
        };
        // Clients get stable endpoints in front of the VM's own (direct) port forwards.
        let stable = self.open_endpoints(&vm_id, &endpoints).await?;
        let now = now_ms();
        let spec = VmSpec {
            id: vm_id.clone(),
            vcpus: make.vcpus,
            memory_mib: make.memory_mib,
            kernel: assets.vmlinux.clone(),
            initramfs: assets.initramfs.clone(),
            cmdline: self.config.guest_cmdline.clone(),
            base_image: root.base.clone(),
            layers: root.layers.clone(),
            forwards,
            pre_os,
            background: make.pool.is_some() || make.template,
            template: None,
        };
        let os = os_name.as_ref().map(|os| {
            let version = self
                .catalog
                .os(os)
                .map(|os| os.version.clone())
                .unwrap_or_default();
            (os.clone(), version)
        });
        let spec_json = serde_json::to_value(&spec).map_err(|err| err.to_string())?;
        let inserted = self
            .store
            .insert_vm(&VmRecord {
                id: vm_id.clone(),
                host: LOCAL_HOST.into(),
                services: make.service.iter().map(|s| s.name.clone()).collect(),
                env: make.env.clone(),
                mode: make.mode,
                owner: "local".into(),
                state: VmState::Creating,
                endpoints: stable
                    .iter()
                    .map(|(name, addr)| (name.clone(), addr.to_string()))
                    .collect(),
                direct_endpoints: endpoints
                    .iter()
                    .map(|(name, addr)| (name.clone(), addr.to_string()))
                    .collect(),
                spec: spec_json.clone(),
                pid: None,
                error: None,
                created_at_ms: now,
                updated_at_ms: now,
                last_used_at_ms: now,
                state_since_ms: now,
                boot_ms: None,
                memory_mib: make.memory_mib,
                vcpus: make.vcpus,
                pool: make.pool.clone(),
                os,
            })
            .await
            .map_err(|err| error_chain(&err));
        if let Err(err) = inserted {
            self.close_endpoints(&vm_id).await;
            return Err(err);
        }
        if let Err(err) = self.store.set_task_vm(task, &vm_id).await {
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
    pub(crate) async fn boot(
        &self,
        task: &str,
        vm_id: &str,
        spec: &VmSpec,
        spec_json: &serde_json::Value,
        make: &MakeVm,
        endpoints: &BTreeMap<String, SocketAddr>,
        started: Instant,
    ) -> Result<VmRecord, String> {
        self.store
            .transition(vm_id, VmState::Booting, None)
            .await
            .map_err(|err| error_chain(&err))?;
        // A clone of the service's template when there is one: restored at its ready
        // state instead of booted. Requests with settings (env) are configured at boot.
        let template = make
            .service
            .as_ref()
            .filter(|_| make.env.is_empty() && !make.template && spec.layers.is_empty())
            .and_then(|service| self.find_template(service, spec));
        let launched = match &template {
            Some(template) => {
                self.progress(task, "clone", 20);
                let cloned = Self::cloned_spec(spec, template);
                let launched = self
                    .hv
                    .clone_template(&cloned, template)
                    .await
                    .map_err(|err| error_chain(&err))?;
                let json = serde_json::to_value(&cloned).map_err(|err| err.to_string())?;
                self.store
                    .set_launch(vm_id, launched.pid, &json)
                    .await
                    .map_err(|err| error_chain(&err))?;
                launched
            }
            None => {
                self.progress(task, "launch", 20);
                let launched = self
                    .hv
                    .launch(spec)
                    .await
                    .map_err(|err| error_chain(&err))?;
                self.store
                    .set_launch(vm_id, launched.pid, spec_json)
                    .await
                    .map_err(|err| error_chain(&err))?;
                launched
            }
        };
        self.agents
            .lock()
            .expect("agents lock")
            .insert(vm_id.to_owned(), launched.agent.clone());

        if let Some(service) = &make.service {
            // Pool VMs carry a staging hostname; each gets its own identity when handed out.
            let hostname = match (&make.pool, make.template) {
                (Some(pool), _) => format!("pool-{pool}"),
                (None, true) => format!("template-{}", service.name),
                (None, false) => vm_id.to_owned(),
            };
            let agent = launched.agent;
            if template.is_some() {
                // The clone resumes where its template paused, at ready, with the
                // template's identity: it gets its own before anything else.
                self.progress(task, "identity", 50);
                self.hv
                    .resume(vm_id)
                    .await
                    .map_err(|err| error_chain(&err))?;
                let reply = agent
                    .reidentify(new_identity(&hostname), service.ready.timeout)
                    .await
                    .map_err(|err| self.diagnose(vm_id, &agent, &error_chain(&err)))?;
                if !reply.ok {
                    return Err(format!(
                        "re-identification failed: {}",
                        reply.error.unwrap_or_default()
                    ));
                }
            } else {
                self.progress(task, "boot", 40);
                let config = guest_config(
                    vm_id,
                    &hostname,
                    Some(service),
                    &make.env,
                    spec.layers.len(),
                )?;
                agent
                    .configure(config, service.ready.timeout)
                    .await
                    .map_err(|err| self.diagnose(vm_id, &agent, &error_chain(&err)))?;
            }

            // Checked on clones too: it proves the clone healthy, and under emulation it
            // warms the guest's code paths before the VM is handed out.
            self.progress(task, "ready", 70);
            let ready = make.ready.as_ref().unwrap_or(&service.ready);
            self.wait_ready(vm_id, launched.pid, service, ready, endpoints, &agent)
                .await?;
            if make.template {
                if let Some(pid) = launched.pid {
                    settle(vm_id, pid).await;
                }
                self.hv
                    .pause(vm_id)
                    .await
                    .map_err(|err| error_chain(&err))?;
                self.progress(task, "snapshot", 90);
                return self.finish_template(vm_id, service, spec).await;
            }
        }

        let boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.store
            .set_boot_ms(vm_id, boot_ms)
            .await
            .map_err(|err| error_chain(&err))?;
        let vm = if make.pool.is_some() {
            if !spec.pre_os {
                if let Some(pid) = launched.pid {
                    settle(vm_id, pid).await;
                }
                self.hv
                    .pause(vm_id)
                    .await
                    .map_err(|err| error_chain(&err))?;
            }
            self.store
                .transition(vm_id, VmState::Ready, None)
                .await
                .map_err(|err| error_chain(&err))?
        } else {
            self.store
                .transition(vm_id, VmState::Active, None)
                .await
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
    pub(crate) fn diagnose(&self, vm_id: &str, agent: &Agent, reason: &str) -> String {
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
        self.close_endpoints(vm_id).await;
        if let Ok(Some(_)) = self.store.vm(vm_id).await
            && let Err(err) = self
                .store
                .transition(vm_id, VmState::Failed, Some(reason))
                .await
        {
            tracing::warn!(vm = %vm_id, error = %err, "cannot mark vm failed");
        }
    }

    /// One free host port per service port, on the endpoint address: the VM's own port
    /// forwards (its direct endpoints).
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

/// What hangar-init needs to become this VM: its identity (hostname, machine-id, clock,
/// entropy), network, root (with `layers` read-only layers under a writable one), the
/// service's templates rendered with the request's settings, and its processes.
pub fn guest_config(
    vm_id: &str,
    hostname: &str,
    service: Option<&Service>,
    env: &BTreeMap<String, String>,
    layers: usize,
) -> Result<GuestConfig, String> {
    let settings = match service {
        Some(service) => settings(service, env)?,
        None => BTreeMap::new(),
    };
    let mut process_env = hangar_core::request::process_env(env);
    process_env.extend(settings.iter().map(|(key, value)| {
        (
            format!("HANGAR_{}", key.to_ascii_uppercase()),
            value.clone(),
        )
    }));
    let mut files = identity_files(vm_id, hostname);
    if let Some(service) = service {
        let mut values = settings.clone();
        values.insert("hostname".into(), hostname.to_owned());
        values.insert("vm".into(), vm_id.to_owned());
        for (path, template) in &service.templates {
            files.push(hangar_proto::FileWrite {
                path: path.clone(),
                contents: hangar_core::components::render_template(&template.content, &values)
                    .map_err(|err| format!("template {path}: {err}"))?,
                mode: template.mode,
            });
        }
    }
    let root = if layers == 0 {
        RootConfig {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            layers: Vec::new(),
        }
    } else {
        RootConfig {
            device: format!("serial:{}", hangar_vmm::ROOT_SERIAL),
            fstype: "ext4".into(),
            layers: (0..layers)
                .map(|i| hangar_proto::LayerMount {
                    device: format!("serial:{}", hangar_vmm::layer_serial(i)),
                    fstype: "squashfs".into(),
                })
                .collect(),
        }
    };
    Ok(GuestConfig {
        identity: new_identity(hostname),
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: usernet::GUEST_ADDRESS.into(),
            gateway: Some(usernet::GATEWAY.into()),
            dns: vec![usernet::DNS.into()],
        }),
        root: Some(root),
        files,
        services: service
            .map(|service| {
                service
                    .processes
                    .iter()
                    .map(|process| {
                        let mut env = process.env.clone();
                        env.extend(process_env.clone());
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
    })
}

/// The service's settings for this request: the request's values, else the defaults.
/// A setting without a default that the request does not give is an error.
pub(crate) fn settings(
    service: &Service,
    env: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut values = BTreeMap::new();
    for (key, setting) in &service.settings {
        match env.get(key).or(setting.default.as_ref()) {
            Some(value) => {
                values.insert(key.clone(), value.clone());
            }
            None => {
                return Err(format!(
                    "{} needs the setting {key} (--env {key}=VALUE){}",
                    service.name,
                    if setting.description.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", setting.description)
                    }
                ));
            }
        }
    }
    Ok(values)
}

/// Files that make a VM itself (seed 003's staging: the shared layers carry none of them).
fn identity_files(vm_id: &str, hostname: &str) -> Vec<hangar_proto::FileWrite> {
    let mut machine_id = [0u8; 16];
    rand::rng().fill_bytes(&mut machine_id);
    let file = |path: &str, contents: String| hangar_proto::FileWrite {
        path: path.into(),
        contents,
        mode: 0o644,
    };
    vec![
        file("/etc/hangar-vm-id", format!("{vm_id}\n")),
        file("/etc/hostname", format!("{hostname}\n")),
        file("/etc/machine-id", format!("{}\n", hex::encode(machine_id))),
        file(
            "/etc/hosts",
            format!("127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost\n"),
        ),
    ]
}

/// Before a pool VM is paused, lets the guest finish the work its boot left behind
/// (deferred kernel work, journal commits, service start-up tails): otherwise that work runs
/// right after the resume that hands it out, in the grant's critical path. Waits until the
/// VM's process uses under [`SETTLED_PERCENT`] of a host CPU over a short window, for at
/// most [`SETTLE_AT_MOST`]; a guest that never settles is paused anyway.
async fn settle(vm_id: &str, pid: u32) {
    let started = std::time::Instant::now();
    while started.elapsed() < SETTLE_AT_MOST {
        match ready::cpu_percent(pid, Duration::from_millis(250)).await {
            Ok(used) if used < SETTLED_PERCENT => {
                tracing::debug!(vm = %vm_id, ms = started.elapsed().as_millis() as u64, used, "pool vm settled");
                return;
            }
            Ok(_) => {}
            Err(_) => return, // the process is gone; the pause reports it
        }
    }
    tracing::debug!(vm = %vm_id, "pool vm did not settle; pausing it anyway");
}

const SETTLED_PERCENT: f64 = 10.0;
const SETTLE_AT_MOST: Duration = Duration::from_secs(3);
