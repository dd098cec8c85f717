//! Service templates: one VM of the service booted to its ready state, paused and
//! snapshotted; new VMs of the service (cold requests, pool fills) are clones of it,
//! restored instead of booted, then given their own identity.
//!
//! A template is keyed by everything its snapshot depends on: the service's definition,
//! kernel, initramfs, kernel command line, base image and machine size. When any of them
//! changes (a new image, an edited catalog), the key changes, the next VM is booted, and a
//! new template is built beside it; templates of the service with other keys are then
//! removed once no VM is a clone of them. The host keeps templates
//! ([`hangar_host::Host::templates`]); this module decides when one is built and removed.

use std::sync::Arc;

use hangar_core::{Mode, Service, VmState};
use hangar_host::{LaunchRecord, TemplateFacts};

use crate::api::error::error_chain;
use crate::manager::*;
use crate::requests::*;

pub use hangar_api::TemplateView;

impl Manager {
    /// Whether `vm` was cloned from a template (its disk is layered over a template's).
    pub(crate) fn is_clone(&self, vm: &hangar_store::VmRecord) -> bool {
        self.default_host()
            .template_of(&LaunchRecord(vm.spec.clone()))
            .is_some()
    }

    /// Starts building `service`'s template in the background unless templates do not
    /// apply to it, it exists, or one is being built. Requests with settings (`env`) never
    /// use one.
    pub(crate) async fn ensure_template(self: &Arc<Self>, service: &Service) {
        if !self.default_host().templates_apply(service).await {
            return;
        }
        if !matches!(self.default_host().has_template(service).await, Ok(false)) {
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
            isolation: None,
            on: Default::default(),
            owner: crate::requests::SYSTEM_OWNER.to_owned(),
        };
        let manager = self.clone();
        let name = service.name.clone();
        tokio::spawn(async move {
            let outcome = match manager.start_create(make, None).await {
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

    /// Ends the making of a template: VM `vm_id` became `template` on its host; its record
    /// is marked deleted (its process and directory are gone), and the service's templates
    /// with other keys that no VM is a clone of are removed.
    pub(crate) async fn finish_template(
        &self,
        vm_id: &str,
        template: &TemplateFacts,
    ) -> Result<hangar_store::VmRecord, String> {
        let vm = self
            .store
            .transition(vm_id, VmState::Deleted, None)
            .await
            .map_err(|err| error_chain(&err))?;
        // Outdated templates go once no VM needs them: clones' disks are layers over the
        // template's, and their delta archives refer to its snapshot.
        let in_use: std::collections::HashSet<String> = self
            .store
            .vms(false)
            .await
            .map_err(|err| error_chain(&err))?
            .iter()
            .filter_map(|vm| {
                self.default_host()
                    .template_of(&LaunchRecord(vm.spec.clone()))
            })
            .collect();
        let held = self.default_host().templates(&[]).await.unwrap_or_default();
        for old in held {
            if old.service == template.service
                && old.id != template.id
                && !in_use.contains(&old.id)
                && let Err(err) = self.default_host().remove_template(&old.id).await
            {
                tracing::warn!(template = %old.id, error = %error_chain(&err), "cannot remove an outdated template");
            }
        }
        Ok(vm)
    }

    /// Every template the host holds.
    pub async fn templates(&self) -> Vec<TemplateView> {
        let services: Vec<Service> = self
            .catalog
            .names()
            .filter_map(|name| self.catalog.get(name).cloned())
            .collect();
        let held = match self.default_host().templates(&services).await {
            Ok(held) => held,
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "cannot list templates");
                Vec::new()
            }
        };
        held.into_iter()
            .map(|template| TemplateView {
                service: template.service,
                key: template.key,
                dir: template.location,
                memory_mib: template.memory_mib,
                vcpus: template.vcpus,
                size_bytes: template.size_bytes,
                took_ms: template.took_ms,
                created_at: humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_millis(template.created_unix_ms),
                )
                .to_string(),
                current: template.current,
            })
            .collect()
    }
}
