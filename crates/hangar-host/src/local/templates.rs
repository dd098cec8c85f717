//! The local host's templates: directories `<templates dir>/<service>-<key>/` (see
//! [`hangar_vmm::template`]), keyed by everything a template's snapshot depends on (the
//! service's definition, kernel, initramfs, command line, base image, machine size).

use std::path::PathBuf;
use std::sync::Arc;

use hangar_core::Service;
use hangar_vmm::{TemplateInfo, VmSpec};
use sha2::{Digest, Sha256};

use super::LocalHost;
use crate::{HostError, TemplateFacts};

impl LocalHost {
    /// Removes what an interrupted template build left (staging directories).
    pub fn clean_template_debris(&self) {
        let Some(root) = &self.config.templates_dir else {
            return;
        };
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "tmp") {
                tracing::info!(dir = %path.display(), "removing an unfinished template");
                if let Err(err) = hangar_image::hostfs::remove_tree(&path) {
                    tracing::warn!(error = %err, "cannot remove an unfinished template");
                }
            }
        }
    }

    /// The key of `service`'s template for VMs launched as `spec` describes.
    pub(super) fn template_key(service: &Service, spec: &VmSpec) -> String {
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

    pub(super) fn template_dir(&self, service: &Service, spec: &VmSpec) -> Option<PathBuf> {
        self.config.templates_dir.as_ref().map(|dir| {
            dir.join(format!(
                "{}-{}",
                service.name,
                Self::template_key(service, spec)
            ))
        })
    }

    /// The current template for VMs of `service` launched as `spec`, if one is built.
    pub(super) fn find_template(&self, service: &Service, spec: &VmSpec) -> Option<TemplateInfo> {
        hangar_vmm::template::read(&self.template_dir(service, spec)?)
    }

    /// The spec a VM launched as `spec` runs with once cloned from `template`.
    pub(super) fn cloned_spec(spec: &VmSpec, template: &TemplateInfo) -> VmSpec {
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

    /// A spec with what a template's key depends on, for looking one up.
    pub(super) async fn template_probe_spec(&self, service: &Service) -> Result<VmSpec, HostError> {
        let assets = self.images.guest_assets().await.map_err(HostError::Image)?;
        Ok(VmSpec {
            id: String::new(),
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            kernel: assets.vmlinux,
            initramfs: assets.initramfs,
            cmdline: self.config.guest_cmdline.clone(),
            base_image: self
                .images
                .root_image(service, &service.os, Arc::new(|_, _| {}))
                .await
                .map_err(HostError::Image)?
                .base,
            layers: Vec::new(),
            forwards: Vec::new(),
            pre_os: false,
            background: false,
            template: None,
        })
    }

    pub(super) fn template_facts(
        info: &TemplateInfo,
        services: &[Service],
    ) -> Option<TemplateFacts> {
        let id = info.dir.file_name()?.to_string_lossy().into_owned();
        let (service, key) = id.rsplit_once('-')?;
        let current = services
            .iter()
            .find(|s| s.name == service)
            .is_some_and(|s| Self::template_key(s, &info.spec) == key);
        Some(TemplateFacts {
            service: service.to_owned(),
            key: key.to_owned(),
            id: id.clone(),
            location: info.dir.display().to_string(),
            memory_mib: info.spec.memory_mib,
            vcpus: info.spec.vcpus,
            size_bytes: info.size_bytes,
            took_ms: info.took_ms,
            created_unix_ms: info.created_unix_ms,
            current,
        })
    }

    pub(super) fn template_infos(&self) -> Vec<TemplateInfo> {
        let Some(root) = &self.config.templates_dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| hangar_vmm::template::read(&entry.path()))
            .collect()
    }

    /// Ends the making of a template: VM `vm_id`, ready and paused, becomes the template
    /// (its process and directory go, also on error).
    pub(super) async fn finish_template(
        &self,
        vm_id: &str,
        service: &Service,
        spec: &VmSpec,
    ) -> Result<TemplateFacts, HostError> {
        let dir = self
            .template_dir(service, spec)
            .ok_or(HostError::TemplatesOff)?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|source| HostError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let made = self.hv.make_template(vm_id, &dir).await;
        self.drop_agent(vm_id);
        let template = made?;
        tracing::info!(service = %service.name, dir = %dir.display(), size_bytes = template.size_bytes, took_ms = template.took_ms, "template made");
        Self::template_facts(&template, std::slice::from_ref(service))
            .ok_or_else(|| HostError::Guest(format!("template {} has no name", dir.display())))
    }
}
