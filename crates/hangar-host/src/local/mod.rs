//! The machine the server runs on: [`LocalHost`], a [`Host`] over a
//! [`hangar_vmm::Hypervisor`] (QEMU, or the fake backend in tests).
//!
//! It holds the host mechanics: the VMs' control channels (hangar-init agents), guest
//! configuration and identity, ready checks (console logs, `/proc`), host ports, template
//! directories (`<templates dir>/<service>-<key>/`, see [`hangar_vmm::template`]) and the
//! VM directories. A VM's [`LaunchRecord`] is its [`VmSpec`] as JSON.
//!
//! - this module: [`LocalHost`] and its [`Host`] operations;
//! - `guest`: talking to one guest (ports, ready checks, identity, slicing);
//! - `templates`: template keys and directories;
//! - `moves`: archived VMs offered to and taken from peers (cold migration);
//! - `segments`: private segments (joining, leaving, re-binding ports).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_core::Service;
use hangar_vmm::{Agent, Hypervisor, Launched, VmSpec};

mod guest;
mod migrate;
mod moves;
mod segments;
mod templates;

use guest::{Settle, diagnose, settle};

use crate::guest::{guest_config, new_identity};
use crate::images::{ImageSource, ImageSourceError, ProgressFn, RootImage};
use crate::{
    Adopted, ArchiveFacts, ArchiveTier, BootedShell, HandOut, HandedOut, Host, HostError,
    HostFacts, LaunchRecord, MadeVm, PreparedVm, Purpose, RunState, ShellPlan, Stages,
    TemplateFacts, VmPlan, VmRun, WakeFrom, Woken,
};
use crate::{IncomingVm, MigrationProgress};

#[derive(Debug, Clone)]
pub struct LocalHostConfig {
    /// The host's name (`local` in single-node mode).
    pub name: String,
    /// Address the VMs' port forwards listen on.
    pub endpoint_host: IpAddr,
    /// Kernel command line of every guest (see `hangar_image::kernel_cmdline`).
    pub guest_cmdline: String,
    /// Where service templates live; none: VMs are always booted, never cloned.
    pub templates_dir: Option<PathBuf>,
    /// Where the hypervisor keeps VM directories (leftovers are removed from it).
    pub vms_dir: Option<PathBuf>,
    /// Where imported machines' model disks lie (`NAME.qcow2`); none: imported services
    /// cannot be made here.
    pub models_dir: Option<PathBuf>,
}

impl Default for LocalHostConfig {
    fn default() -> Self {
        LocalHostConfig {
            name: "local".into(),
            endpoint_host: IpAddr::from([127, 0, 0, 1]),
            guest_cmdline: hangar_image::kernel_cmdline(None),
            templates_dir: None,
            vms_dir: None,
            models_dir: None,
        }
    }
}

pub struct LocalHost {
    hv: Arc<dyn Hypervisor>,
    images: Arc<dyn ImageSource>,
    config: LocalHostConfig,
    /// Control channels (and processes) of running VMs.
    agents: Mutex<HashMap<String, Launched>>,
    /// Running VMs booted by firmware from an imported disk: no hangar-init answers in
    /// them, so nothing is asked of their agent channel (identity, slicing).
    agentless: Mutex<HashSet<String>>,
    /// The switches of the private segments the VMs here joined.
    segments: crate::segment::Segments,
}

fn record(spec: &VmSpec) -> Result<LaunchRecord, HostError> {
    serde_json::to_value(spec)
        .map(LaunchRecord)
        .map_err(HostError::Record)
}

fn spec_of(launch: &LaunchRecord) -> Result<VmSpec, HostError> {
    serde_json::from_value(launch.0.clone()).map_err(HostError::Record)
}

/// `addr` as an endpoint (`host:port`).
fn endpoint_text(endpoints: &BTreeMap<String, SocketAddr>) -> BTreeMap<String, String> {
    endpoints
        .iter()
        .map(|(name, addr)| (name.clone(), addr.to_string()))
        .collect()
}

fn parse_endpoints(endpoints: &BTreeMap<String, String>) -> BTreeMap<String, SocketAddr> {
    endpoints
        .iter()
        .filter_map(|(name, addr)| Some((name.clone(), addr.parse().ok()?)))
        .collect()
}

/// A progress callback for an image build inside an operation: the build's stages, its
/// percent mapped into `from..to`.
fn scaled(progress: &ProgressFn, from: u8, to: u8) -> ProgressFn {
    let progress = progress.clone();
    Arc::new(move |stage: &str, percent: u8| {
        let scaled = from as u32 + (to.saturating_sub(from) as u32 * percent.min(100) as u32) / 100;
        progress(&format!("image: {stage}"), scaled as u8);
    })
}

impl LocalHost {
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        images: Arc<dyn ImageSource>,
        config: LocalHostConfig,
    ) -> LocalHost {
        LocalHost {
            hv,
            images,
            config,
            agents: Mutex::default(),
            agentless: Mutex::default(),
            segments: Default::default(),
        }
    }

    /// Notes whether VM `id` (as launched from `spec`) has no guest agent.
    fn note_agentless(&self, id: &str, spec: &VmSpec) {
        let mut agentless = self.agentless.lock().expect("agentless lock");
        if spec.firmware {
            agentless.insert(id.to_owned());
        } else {
            agentless.remove(id);
        }
    }

    fn is_agentless(&self, id: &str) -> bool {
        self.agentless.lock().expect("agentless lock").contains(id)
    }

    /// The model disk of imported machine `name`.
    fn model_disk(&self, name: &str) -> Result<PathBuf, HostError> {
        let path = self
            .config
            .models_dir
            .as_ref()
            .map(|dir| dir.join(format!("{name}.qcow2")))
            .filter(|path| path.is_file())
            .ok_or_else(|| HostError::Image(ImageSourceError::NoModel(name.to_string())))?;
        Ok(path)
    }

    fn agent(&self, id: &str) -> Result<Arc<Agent>, HostError> {
        self.agents
            .lock()
            .expect("agents lock")
            .get(id)
            .map(|launched| launched.agent.clone())
            .ok_or(HostError::NoAgent)
    }

    /// The host process of a running VM, when the backend has processes.
    fn pid(&self, id: &str) -> Option<u32> {
        self.agents
            .lock()
            .expect("agents lock")
            .get(id)
            .and_then(|launched| launched.pid)
    }

    fn keep_agent(&self, id: &str, launched: Launched) {
        self.agents
            .lock()
            .expect("agents lock")
            .insert(id.to_owned(), launched);
    }

    fn drop_agent(&self, id: &str) {
        self.agents.lock().expect("agents lock").remove(id);
    }
}

#[async_trait::async_trait]
impl Host for LocalHost {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn facts(&self) -> Result<HostFacts, HostError> {
        let (memory_mib, free_memory_mib) = crate::facts::memory_mib();
        let disk_path = self
            .config
            .vms_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        Ok(HostFacts {
            name: self.config.name.clone(),
            hypervisor: self.hv.kind().to_owned(),
            vcpus: crate::facts::vcpus(),
            memory_mib,
            free_memory_mib,
            free_disk_mib: crate::facts::free_disk_mib(
                disk_path
                    .ancestors()
                    .find(|dir| dir.exists())
                    .unwrap_or(std::path::Path::new("/")),
            ),
            load: crate::facts::load(),
            templates: self
                .template_infos()
                .iter()
                .filter_map(|info| Some(info.dir.file_name()?.to_string_lossy().into_owned()))
                .collect(),
            blobs: self.images.held_blobs(),
            images: self.images.held_roots(),
        })
    }

    async fn inventory(&self) -> Result<Vec<VmRun>, HostError> {
        let mut vms = Vec::new();
        for id in self.hv.running().await? {
            let state = self.hv.run_state(&id).await?;
            vms.push(VmRun { id, state });
        }
        Ok(vms)
    }

    async fn run_state(&self, id: &str) -> Result<RunState, HostError> {
        Ok(self.hv.run_state(id).await?)
    }

    async fn prepare_vm(
        &self,
        plan: &VmPlan,
        progress: ProgressFn,
    ) -> Result<PreparedVm, HostError> {
        progress("image", 2);
        let assets = self.images.guest_assets().await.map_err(HostError::Image)?;
        let root = match (&plan.service, &plan.os) {
            (Some(service), _) if service.imported => RootImage {
                base: Some(self.model_disk(&service.name)?),
                ..RootImage::default()
            },
            (Some(service), Some(os)) => {
                if !self.images.is_built(service, os) {
                    tracing::info!(service = %service.name, os = %os, vm = %plan.id, "building the service's image");
                }
                self.images
                    .root_image(service, os, scaled(&progress, 2, 19))
                    .await
                    .map_err(HostError::Image)?
            }
            _ => RootImage::default(),
        };
        self.images.touch(&root.layer_hashes);
        let (forwards, endpoints) = match &plan.service {
            Some(service) => self.allocate_ports(service)?,
            None => (Vec::new(), BTreeMap::new()),
        };
        let spec = VmSpec {
            id: plan.id.clone(),
            vcpus: plan.vcpus,
            memory_mib: plan.memory_mib,
            ram_tail_kib: self.hv.ram_tail_kib(),
            egress: plan.egress.clone(),
            kernel: assets.vmlinux.clone(),
            initramfs: assets.initramfs.clone(),
            cmdline: self.config.guest_cmdline.clone(),
            base_image: root.base.clone(),
            layers: root.layers.clone(),
            forwards,
            pre_os: plan.service.is_none(),
            // A shell can be given a layered root (an OS and applications) at deploy.
            layer_slots: if plan.service.is_none() {
                hangar_vmm::SHELL_LAYER_SLOTS
            } else {
                root.layers.len()
            },
            background: plan.purpose != Purpose::Request,
            template: None,
            firmware: plan.service.as_ref().is_some_and(|s| s.imported),
            // Every VM of hangar's own kernel can join a private segment.
            segment_nic: !plan.service.as_ref().is_some_and(|s| s.imported),
            // A template's VM keeps its RAM in a file its clones will map.
            memory: if plan.purpose == Purpose::Template
                && !plan.service.as_ref().is_some_and(|s| s.imported)
            {
                hangar_vmm::MemoryBacking::TemplateSource
            } else {
                hangar_vmm::MemoryBacking::Anonymous
            },
        };
        Ok(PreparedVm {
            direct_endpoints: endpoint_text(&endpoints),
            launch: record(&spec)?,
        })
    }

    async fn make_vm(
        &self,
        plan: &VmPlan,
        prepared: &PreparedVm,
        progress: ProgressFn,
    ) -> Result<MadeVm, HostError> {
        let vm_id = plan.id.as_str();
        let spec = spec_of(&prepared.launch)?;
        let endpoints = parse_endpoints(&prepared.direct_endpoints);
        // A clone of the service's template when there is one: restored at its ready
        // state instead of booted. Requests with settings (env) are configured at boot.
        let template = plan
            .service
            .as_ref()
            .filter(|_| plan.env.is_empty() && plan.purpose != Purpose::Template && !spec.firmware)
            .and_then(|service| self.find_template(service, &spec));
        let (launched, spec) = match &template {
            Some(template) => {
                progress("clone", 20);
                let cloned = hangar_vmm::template::clone_spec(&spec, template);
                (self.hv.clone_template(&cloned, template).await?, cloned)
            }
            None => {
                progress("launch", 20);
                (self.hv.launch(&spec).await?, spec)
            }
        };
        self.keep_agent(vm_id, launched.clone());
        self.note_agentless(vm_id, &spec);

        if let Some(service) = &plan.service {
            let agent = launched.agent;
            if service.imported {
                // Booted by its own bootloader: nothing to configure, no agent to ask.
                // Its identity is what staging left (an empty machine-id, a placeholder
                // hostname), made fresh by its own first boot.
                if plan.purpose == Purpose::Template {
                    return Err(HostError::Guest(format!(
                        "{} is an imported machine: it has no template",
                        service.name
                    )));
                }
                progress("boot", 40);
            } else if template.is_some() {
                // The clone resumes where its template paused, at ready, with the
                // template's identity: it gets its own before anything else.
                progress("identity", 50);
                self.hv.resume(vm_id).await?;
                let reply = agent
                    .reidentify(new_identity(&plan.hostname), service.ready.timeout)
                    .await
                    .map_err(|err| HostError::Guest(diagnose(vm_id, &agent, &error_chain(&err))))?;
                if !reply.ok {
                    return Err(HostError::Guest(format!(
                        "re-identification failed: {}",
                        reply.error.unwrap_or_default()
                    )));
                }
            } else {
                progress("boot", 40);
                let config = guest_config(
                    vm_id,
                    &plan.hostname,
                    Some(service),
                    &plan.env,
                    spec.layers.len(),
                )?;
                agent
                    .configure(config, service.ready.timeout)
                    .await
                    .map_err(|err| HostError::Guest(diagnose(vm_id, &agent, &error_chain(&err))))?;
            }

            // Checked on clones too: it proves the clone healthy, and under emulation it
            // warms the guest's code paths before the VM is handed out.
            progress("ready", 70);
            let ready = plan.ready.as_ref().unwrap_or(&service.ready);
            self.wait_ready(vm_id, launched.pid, service, ready, &endpoints, &agent)
                .await?;
            guest::name_egress_targets(&agent, &spec.egress)
                .await
                .map_err(|err| HostError::Guest(format!("{vm_id}: {err}")))?;
            if plan.purpose == Purpose::Template {
                if let Some(pid) = launched.pid {
                    settle(vm_id, pid, &Settle::BOOTED).await;
                }
                self.hv.pause(vm_id).await?;
                progress("snapshot", 90);
                let template = self.finish_template(vm_id, service, &spec).await?;
                return Ok(MadeVm {
                    launch: record(&spec)?,
                    process: None,
                    cloned: false,
                    template: Some(template),
                });
            }
        }
        if plan.purpose == Purpose::Pool && !spec.pre_os {
            if let Some(pid) = launched.pid {
                let how = match template {
                    Some(_) => &Settle::CLONED,
                    None => &Settle::BOOTED,
                };
                settle(vm_id, pid, how).await;
            }
            self.hv.pause(vm_id).await?;
        }
        Ok(MadeVm {
            launch: record(&spec)?,
            process: launched.pid,
            cloned: template.is_some(),
            template: None,
        })
    }

    async fn hand_out(&self, id: &str, how: &HandOut) -> Result<HandedOut, HostError> {
        let mut stages = Stages::default();
        let agent = self.agent(id)?;
        let started = Instant::now();
        self.to_foreground(id).await;
        let resuming = stages.mark("priority", started);
        // Resumed first, then the identity sent: a message written while the VM is paused
        // waits in the socket until QEMU polls its chardev again, which takes longer than
        // the QMP `cont` round trip (measured with `examples/resume_latency.rs` of
        // hangar-vmm).
        self.hv.resume(id).await?;
        let identifying = stages.mark("resume", resuming);
        if self.is_agentless(id) {
            // An imported machine: no agent to give it an identity or slice it.
            return Ok(HandedOut {
                stages,
                sliced_to: None,
            });
        }
        self.reidentify(id, &agent, id, Duration::from_secs(10))
            .await?;
        stages.mark("identity", identifying);
        tracing::debug!(vm = %id, total_us = started.elapsed().as_micros() as u64, "pool vm resumed and re-identified");
        let mut sliced_to = None;
        if let Some(to) = how.slice_to {
            let slicing = Instant::now();
            sliced_to = Some(self.slice(id, &agent, how.size, to).await?);
            stages.mark("slice", slicing);
        }
        Ok(HandedOut { stages, sliced_to })
    }

    async fn boot_shell(
        &self,
        id: &str,
        launch: &LaunchRecord,
        plan: &ShellPlan,
    ) -> Result<BootedShell, HostError> {
        let silent: ProgressFn = Arc::new(|_: &str, _: u8| {});
        let root = match &plan.service {
            Some(service) if !plan.parts.is_empty() => self
                .images
                .composed_root(service, &plan.parts, &plan.os, silent)
                .await
                .map_err(HostError::Image)?,
            Some(service) => self
                .images
                .root_image(service, &plan.os, silent)
                .await
                .map_err(HostError::Image)?,
            None => RootImage {
                base: self
                    .images
                    .os_image(&plan.os)
                    .await
                    .map_err(HostError::Image)?,
                ..RootImage::default()
            },
        };
        let image = root
            .base
            .clone()
            .ok_or(HostError::Image(ImageSourceError::NothingToAttach))?;
        let mut spec = spec_of(launch)?;
        self.hv.attach_root(id, &image, &root.layers).await?;
        self.images.touch(&root.layer_hashes);
        let (forwards, endpoints) = match &plan.service {
            Some(service) => self.allocate_ports(service)?,
            None => (Vec::new(), BTreeMap::new()),
        };
        self.hv.add_forwards(id, &forwards).await?;
        spec.base_image = Some(image);
        spec.layers = root.layers.clone();
        spec.pre_os = false;
        spec.forwards.extend(forwards);

        let agent = self.agent(id)?;
        self.to_foreground(id).await;
        self.hv.resume(id).await?;
        let config = guest_config(id, id, plan.service.as_ref(), &plan.env, root.layers.len())?;
        let timeout = plan
            .service
            .as_ref()
            .map_or(Duration::from_secs(60), |s| s.ready.timeout);
        agent
            .configure(config, timeout)
            .await
            .map_err(|err| HostError::Guest(diagnose(id, &agent, &error_chain(&err))))?;
        // Sliced once the guest runs its agent (the balloon driver is loaded by then),
        // before the service is checked: it is checked at the size it is handed out at.
        let sliced_to = match plan.slice_to {
            Some(to) => Some(
                self.slice(id, &agent, (spec.vcpus, spec.memory_mib), to)
                    .await?,
            ),
            None => None,
        };
        if let Some(service) = &plan.service {
            let pid = self.pid(id);
            self.wait_ready(id, pid, service, &service.ready, &endpoints, &agent)
                .await?;
        }
        Ok(BootedShell {
            launch: record(&spec)?,
            direct_endpoints: endpoint_text(&endpoints),
            sliced_to,
        })
    }

    async fn sleep(&self, id: &str) -> Result<(), HostError> {
        Ok(self.hv.pause(id).await?)
    }

    async fn archive(&self, id: &str, tier: ArchiveTier) -> Result<ArchiveFacts, HostError> {
        let info = self.hv.archive(id, tier).await?;
        self.drop_agent(id);
        Ok(archive_facts(&info))
    }

    async fn console(
        &self,
        id: &str,
        from: Option<u64>,
        max: u32,
    ) -> Result<crate::ConsoleChunk, HostError> {
        match self.hv.console_log(id) {
            Some(path) => read_console(&path, from, max)
                .await
                .map_err(|source| HostError::Io {
                    path: path.display().to_string(),
                    source,
                }),
            None => Ok(crate::ConsoleChunk::default()),
        }
    }

    async fn archive_facts(&self, id: &str) -> Result<Option<ArchiveFacts>, HostError> {
        Ok(self.hv.archive_info(id).as_ref().map(archive_facts))
    }

    async fn wake(&self, id: &str, from: &WakeFrom) -> Result<Woken, HostError> {
        let started = Instant::now();
        let mut woken = Woken::default();
        match from {
            WakeFrom::Sleeping => {
                self.hv.resume(id).await?;
                woken.stages.mark("resume", started);
            }
            WakeFrom::Archived { launch, .. } => {
                let spec = spec_of(launch)?;
                let launched = self.hv.restore(&spec).await?;
                self.keep_agent(id, launched.clone());
                self.note_agentless(id, &spec);
                self.rejoin(id).await;
                woken.process = launched.pid;
                woken.stages.mark("restore", started);
            }
        }
        // Fresh identity; then, for a VM restored from an archive, its services' ready
        // criteria. Failures here leave the VM running: the caller decides.
        let checking = Instant::now();
        let agent = self
            .agent(id)
            .map_err(|err| HostError::NotReady(err.to_string()))?;
        let checking = if self.is_agentless(id) {
            checking
        } else {
            self.reidentify(id, &agent, id, Duration::from_secs(10))
                .await
                .map_err(|err| HostError::NotReady(error_chain(&err)))?;
            woken.stages.mark("identity", checking)
        };
        if let WakeFrom::Archived {
            services,
            direct_endpoints,
            ..
        } = from
        {
            // Checked through the VM's own port forwards: stable endpoints would wait for
            // this very wake.
            let endpoints = parse_endpoints(direct_endpoints);
            for service in services {
                self.wait_ready(
                    id,
                    woken.process,
                    service,
                    &service.ready,
                    &endpoints,
                    &agent,
                )
                .await?;
            }
            woken.stages.mark("ready", checking);
        }
        Ok(woken)
    }

    async fn adopt(
        &self,
        id: &str,
        launch: &LaunchRecord,
        running: bool,
    ) -> Result<Option<Adopted>, HostError> {
        let spec = spec_of(launch)?;
        let Some(launched) = self.hv.adopt(&spec).await? else {
            return Ok(None);
        };
        self.keep_agent(id, launched.clone());
        self.note_agentless(id, &spec);
        self.rejoin(id).await;
        if running && matches!(self.hv.run_state(id).await, Ok(RunState::Paused)) {
            tracing::info!(vm = %id, "resuming a running VM found paused");
            if let Err(err) = self.hv.resume(id).await {
                tracing::warn!(vm = %id, error = %error_chain(&err), "cannot resume");
            }
        }
        Ok(Some(Adopted {
            process: launched.pid,
        }))
    }

    async fn stop(&self, id: &str) -> Result<(), HostError> {
        self.drop_agent(id);
        self.agentless.lock().expect("agentless lock").remove(id);
        Ok(self.hv.stop(id).await?)
    }

    async fn join_segment(&self, id: &str, join: &crate::SegmentJoin) -> Result<(), HostError> {
        self.join(id, join).await
    }

    async fn leave_segment(&self, id: &str) -> Result<(), HostError> {
        self.leave(id);
        Ok(())
    }

    async fn close_forwards(
        &self,
        id: &str,
        launch: &LaunchRecord,
        guest_ports: &[u16],
    ) -> Result<LaunchRecord, HostError> {
        let mut spec = spec_of(launch)?;
        let (closing, kept): (Vec<_>, Vec<_>) = spec
            .forwards
            .into_iter()
            .partition(|f| guest_ports.contains(&f.guest_port));
        self.hv.remove_forwards(id, &closing).await?;
        spec.forwards = kept;
        Ok(LaunchRecord(
            serde_json::to_value(&spec).map_err(HostError::Record)?,
        ))
    }

    async fn destroy(&self, id: &str) -> Result<(), HostError> {
        self.leave(id);
        self.drop_agent(id);
        self.agentless.lock().expect("agentless lock").remove(id);
        self.drop_incoming(id);
        Ok(self.hv.destroy(id).await?)
    }

    async fn remove_leftovers(&self, keep: &HashSet<String>) -> Result<Vec<String>, HostError> {
        let mut removed = Vec::new();
        let Some(vms_dir) = &self.config.vms_dir else {
            return Ok(removed);
        };
        if let Ok(entries) = std::fs::read_dir(vms_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    tracing::info!(dir = %entry.path().display(), "removing leftover vm directory");
                    if hangar_image::hostfs::remove_tree(&entry.path()).is_ok() {
                        removed.push(name);
                    }
                }
            }
        }
        Ok(removed)
    }

    async fn templates_apply(&self, service: &Service) -> bool {
        // Imported machines have no agent to re-identify a clone: they are booted.
        !service.imported && self.config.templates_dir.is_some()
    }

    async fn has_template(&self, service: &Service) -> Result<bool, HostError> {
        let spec = self.template_probe_spec(service).await?;
        Ok(self.find_template(service, &spec).is_some())
    }

    async fn templates(&self, services: &[Service]) -> Result<Vec<TemplateFacts>, HostError> {
        let mut templates: Vec<TemplateFacts> = self
            .template_infos()
            .iter()
            .filter_map(|info| Self::template_facts(info, services))
            .collect();
        templates.sort_by(|a, b| a.service.cmp(&b.service).then(a.key.cmp(&b.key)));
        Ok(templates)
    }

    async fn template_bundle(
        &self,
        service: &Service,
    ) -> Result<Option<crate::TemplateBundle>, HostError> {
        self.bundle_of(service).await
    }

    async fn pull_template(
        &self,
        service: &Service,
        bundle: &crate::TemplateBundle,
        from: &crate::PeerSource,
    ) -> Result<TemplateFacts, HostError> {
        self.install_bundle(service, bundle, from).await
    }

    async fn template_blob(&self, sha256: &str) -> Option<PathBuf> {
        self.bundle_file(sha256)
            .or_else(|| self.offered_vm_file(sha256))
    }

    async fn vm_bundle(&self, id: &str) -> Result<crate::VmBundle, HostError> {
        self.offer_vm(id).await
    }

    async fn pull_vm(&self, arrival: &crate::VmArrival) -> Result<crate::PulledVm, HostError> {
        self.take_vm(arrival).await
    }

    async fn migrate_incoming(
        &self,
        id: &str,
        prepared: &PreparedVm,
        source: &LaunchRecord,
    ) -> Result<IncomingVm, HostError> {
        self.incoming(id, prepared, source).await
    }

    async fn migrate_start(&self, id: &str, to: &IncomingVm) -> Result<(), HostError> {
        self.start_outgoing(id, to).await
    }

    async fn migrate_status(&self, id: &str) -> Result<MigrationProgress, HostError> {
        self.outgoing_status(id).await
    }

    async fn migrate_window(&self, id: &str) -> Result<Option<Duration>, HostError> {
        Ok(self.hv.migration_window(id).await?)
    }

    async fn migrate_switchover(
        &self,
        id: &str,
        downtime_ms: u64,
    ) -> Result<MigrationProgress, HostError> {
        self.switchover(id, downtime_ms).await
    }

    async fn migrate_abort(&self, id: &str) -> Result<(), HostError> {
        self.abort_outgoing(id).await
    }

    async fn migrate_finish(&self, id: &str) -> Result<Adopted, HostError> {
        self.finish_incoming(id).await
    }

    async fn remove_template(&self, id: &str) -> Result<(), HostError> {
        let Some(root) = &self.config.templates_dir else {
            return Ok(());
        };
        let dir = root.join(id);
        hangar_vmm::template::remove(&dir).map_err(|source| HostError::Io {
            path: dir.display().to_string(),
            source,
        })
    }
}

fn archive_facts(info: &hangar_vmm::ArchiveInfo) -> ArchiveFacts {
    ArchiveFacts {
        tier: info.tier,
        size_bytes: info.size_bytes,
        memory_mib: info.memory_mib,
        took_ms: info.took_ms,
    }
}

/// `err` with its sources, `: `-separated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let more = err.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = err.source();
    }
    text
}

/// [`Host::console`] of the console file `path`: a missing file is an empty console.
pub(crate) async fn read_console(
    path: &std::path::Path,
    from: Option<u64>,
    max: u32,
) -> std::io::Result<crate::ConsoleChunk> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(crate::ConsoleChunk::default());
        }
        Err(err) => return Err(err),
    };
    let size = file.metadata().await?.len();
    let offset = match from {
        None => size.saturating_sub(u64::from(max)),
        Some(from) if from > size => 0,
        Some(from) => from,
    };
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut data = Vec::new();
    file.take(u64::from(max).min(size - offset))
        .read_to_end(&mut data)
        .await?;
    Ok(crate::ConsoleChunk { offset, data, size })
}
