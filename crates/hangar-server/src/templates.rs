//! Service templates: one VM of the service booted to its ready state, paused and
//! snapshotted; new VMs of the service (cold requests, pool fills) are clones of it,
//! restored instead of booted, then given their own identity.
//!
//! A template is keyed by everything its snapshot depends on: the service's definition,
//! kernel, initramfs, kernel command line, base image and machine size. When any of them
//! changes (a new image, an edited catalog), the key changes, the next VM is booted, and a
//! new template is built beside it; templates of the service with other keys are then
//! removed. Templates live in `<data dir>/templates/<service>-<key>/` (see
//! [`hangar_vmm::template`]); the directory is the only record of them.

use std::path::PathBuf;
use std::sync::Arc;

use hangar_core::{Mode, Service, VmState};
use hangar_vmm::{TemplateInfo, VmSpec};
use sha2::{Digest, Sha256};

use crate::error::error_chain;
use crate::manager::*;

pub use hangar_api::TemplateView;

impl Manager {
    fn templates_dir(&self) -> Option<&PathBuf> {
        self.config.templates_dir.as_ref()
    }

    /// The key of `service`'s template for VMs launched as `spec` describes.
    fn template_key(service: &Service, spec: &VmSpec) -> String {
        let inputs = serde_json::json!({
            "service": service,
            "kernel": spec.kernel,
            "initramfs": spec.initramfs,
            "cmdline": spec.cmdline,
            "base_image": spec.base_image,
            "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus,
        });
        let digest = Sha256::digest(inputs.to_string().as_bytes());
        hex::encode(&digest[..8])
    }

    fn template_dir(&self, service: &Service, spec: &VmSpec) -> Option<PathBuf> {
        self.templates_dir().map(|dir| {
            dir.join(format!(
                "{}-{}",
                service.name,
                Self::template_key(service, spec)
            ))
        })
    }

    /// The current template for VMs of `service` launched as `spec`, if one is built.
    pub(crate) fn find_template(&self, service: &Service, spec: &VmSpec) -> Option<TemplateInfo> {
        hangar_vmm::template::read(&self.template_dir(service, spec)?)
    }

    /// Whether `vm` was cloned from a template (its disk is layered over a template's).
    pub(crate) fn is_clone(&self, vm: &hangar_store::VmRecord) -> bool {
        vm.spec["template"].is_string()
    }

    /// The spec a VM launched as `spec` runs with once cloned from `template`.
    pub(crate) fn cloned_spec(spec: &VmSpec, template: &TemplateInfo) -> VmSpec {
        VmSpec {
            kernel: template.spec.kernel.clone(),
            initramfs: template.spec.initramfs.clone(),
            cmdline: template.spec.cmdline.clone(),
            base_image: template.disk.clone(),
            pre_os: false,
            template: Some(template.dir.clone()),
            ..spec.clone()
        }
    }

    /// Where the template of a VM being made with [`MakeVm::template`] goes.
    pub(crate) fn new_template_dir(
        &self,
        service: &Service,
        spec: &VmSpec,
    ) -> Result<PathBuf, String> {
        self.template_dir(service, spec)
            .ok_or_else(|| "templates are off (--no-templates)".to_owned())
    }

    /// Starts building `service`'s template in the background unless templates are off,
    /// it exists, or one is being built. Requests with settings (`env`) never use one.
    pub(crate) async fn ensure_template(self: &Arc<Self>, service: &Service) {
        // Layered roots (Debian services) are booted: their templates are not built yet.
        if self.templates_dir().is_none() || !self.images.chain(service, &service.os).is_empty() {
            return;
        }
        let Ok(spec) = self.template_probe_spec(service).await else {
            return;
        };
        if self.find_template(service, &spec).is_some() {
            return;
        }
        if !self
            .templates_building
            .lock()
            .expect("templates lock")
            .insert(service.name.clone())
        {
            return;
        }
        let make = MakeVm {
            service: Some(service.clone()),
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            mode: Mode::Dedicated,
            env: Default::default(),
            pool: None,
            ready: None,
            template: true,
        };
        let manager = self.clone();
        let name = service.name.clone();
        tokio::spawn(async move {
            let outcome = match manager.start_create(make, None) {
                Ok(task) => manager.task_outcome(&task).await,
                Err(err) => Some(Err(err.to_string())),
            };
            match outcome {
                Some(Ok(_)) => tracing::info!(service = %name, "template ready"),
                Some(Err(err)) => {
                    tracing::warn!(service = %name, error = %err, "template build failed")
                }
                None => {}
            }
            manager
                .templates_building
                .lock()
                .expect("templates lock")
                .remove(&name);
        });
    }

    /// A spec with what a template's key depends on, for looking one up.
    async fn template_probe_spec(&self, service: &Service) -> Result<VmSpec, String> {
        let assets = self.images.guest_assets().await?;
        Ok(VmSpec {
            id: String::new(),
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            kernel: assets.vmlinux,
            initramfs: assets.initramfs,
            cmdline: self.config.guest_cmdline.clone(),
            base_image: self
                .images
                .root_image(service, &service.os, std::sync::Arc::new(|_, _| {}))
                .await?
                .base,
            layers: Vec::new(),
            forwards: Vec::new(),
            pre_os: false,
            background: false,
            template: None,
        })
    }

    /// Ends the making of a template: VM `vm_id`, ready and paused, becomes the template;
    /// its record is marked deleted (its process and directory are gone), and the
    /// service's templates with other keys are removed.
    pub(crate) async fn finish_template(
        &self,
        vm_id: &str,
        service: &Service,
        spec: &VmSpec,
    ) -> Result<hangar_store::VmRecord, String> {
        let dir = self.new_template_dir(service, spec)?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|err| format!("{}: {err}", parent.display()))?;
        }
        let made = self.hv.make_template(vm_id, &dir).await;
        self.agents.lock().expect("agents lock").remove(vm_id);
        let vm = self
            .store
            .transition(vm_id, VmState::Deleted, None)
            .await
            .map_err(|err| error_chain(&err))?;
        let template = made.map_err(|err| error_chain(&err))?;
        tracing::info!(service = %service.name, dir = %dir.display(), size_bytes = template.size_bytes, took_ms = template.took_ms, "template made");
        // Outdated templates go once no VM needs them: clones' disks are layers over the
        // template's, and their delta archives refer to its snapshot.
        let in_use: std::collections::HashSet<String> = self
            .store
            .vms(false)
            .await
            .map_err(|err| error_chain(&err))?
            .iter()
            .filter_map(|vm| vm.spec["template"].as_str().map(str::to_owned))
            .collect();
        for view in self.templates() {
            if view.service == service.name
                && view.dir != dir.display().to_string()
                && !in_use.contains(&view.dir)
                && let Err(err) = hangar_vmm::template::remove(std::path::Path::new(&view.dir))
            {
                tracing::warn!(dir = %view.dir, error = %err, "cannot remove an outdated template");
            }
        }
        Ok(vm)
    }

    /// Removes what an interrupted template build left (staging directories).
    pub fn clean_template_debris(&self) {
        let Some(root) = self.templates_dir() else {
            return;
        };
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "tmp") {
                tracing::info!(dir = %path.display(), "removing an unfinished template");
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }

    /// Every template on disk.
    pub fn templates(&self) -> Vec<TemplateView> {
        let Some(root) = self.templates_dir() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let mut views: Vec<TemplateView> = entries
            .flatten()
            .filter_map(|entry| hangar_vmm::template::read(&entry.path()))
            .filter_map(|info| {
                let name = info.dir.file_name()?.to_string_lossy().into_owned();
                let (service, key) = name.rsplit_once('-')?;
                let current = self
                    .catalog
                    .get(service)
                    .is_some_and(|service| Self::template_key(service, &info.spec) == key);
                Some(TemplateView {
                    service: service.to_owned(),
                    key: key.to_owned(),
                    dir: info.dir.display().to_string(),
                    memory_mib: info.spec.memory_mib,
                    vcpus: info.spec.vcpus,
                    size_bytes: info.size_bytes,
                    took_ms: info.took_ms,
                    created_at: humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(info.created_unix_ms),
                    )
                    .to_string(),
                    current,
                })
            })
            .collect();
        views.sort_by(|a, b| a.service.cmp(&b.service).then(a.key.cmp(&b.key)));
        views
    }
}
