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
use hangar_host::{Host, HostError, LaunchRecord, PeerSource, Purpose, TemplateFacts, VmPlan};
use hangar_store::HostState;

use crate::api::error::error_chain;
use crate::manager::*;
use crate::requests::*;
use crate::scheduler::{FarmHost, holds_service_template};

/// How long a creation waits for its host to pull its service's template from a peer
/// before it boots the VM instead.
const PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a farm host's facts can lag what it did: a heartbeat (1 s) and the farm loop's
/// refresh of the scheduler's view (1 s), with room to spare.
const FACTS_LAG: std::time::Duration = std::time::Duration::from_secs(3);

pub use hangar_api::TemplateView;

impl Manager {
    /// Whether `vm` was cloned from a template (its disk is layered over a template's).
    pub(crate) fn is_clone(&self, vm: &hangar_store::VmRecord) -> bool {
        hangar_host::template_of_record(&LaunchRecord(vm.spec.clone())).is_some()
    }

    /// Starts building `service`'s template in the background unless templates do not
    /// apply to it, one exists on any host, or one is being built. Requests with settings
    /// (`env`) never use one. In a farm a template is built once, on the host placement
    /// packs it on; other hosts pull it from there when a VM of the service is placed on
    /// them ([`Manager::bring_template`]).
    pub(crate) async fn ensure_template(self: &Arc<Self>, service: &Service) {
        let up: Vec<FarmHost> = self
            .scheduler
            .farm_hosts()
            .into_iter()
            .filter(|host| host.record.state == HostState::Up)
            .collect();
        if up
            .iter()
            .any(|host| holds_service_template(&host.info.facts.templates, &service.name))
        {
            return;
        }
        match self.scheduler.local() {
            Some(local) => {
                if !local.templates_apply(service).await
                    || !matches!(local.has_template(service).await, Ok(false))
                {
                    return;
                }
            }
            None => match up.first() {
                Some(host) if host.host.templates_apply(service).await => {}
                _ => return,
            },
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
            owner: crate::requests::SYSTEM_OWNER.into(),
            quota: crate::quotas::Reservation::none(),
            egress: hangar_core::EgressPolicy::default(),
        };
        let manager = self.clone();
        let name = service.name.clone();
        tokio::spawn(async move {
            let outcome = match manager.start_create(make, None).await {
                Ok(task) => manager.task_outcome(&task).await,
                Err(err) => Some(Err(err.to_string())),
            };
            match outcome {
                Some(Ok(_)) => {
                    tracing::info!(service = %name, "template ready");
                    // A farm host reports the new template with its next heartbeat: until
                    // the control plane has seen it, the build still counts as going on,
                    // so that no second one starts.
                    tokio::time::sleep(FACTS_LAG).await;
                }
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

    /// The lock that makes pulls of `service`'s template to farm host `host` one at a time,
    /// for creations ([`Manager::bring_template`]) and migrations alike: whoever waited
    /// finds the template there and pulls nothing (two pulls of one template into one
    /// directory would replace it under the first).
    pub(crate) fn template_pull_lock(
        &self,
        service: &str,
        host: &str,
    ) -> Arc<tokio::sync::Mutex<()>> {
        self.template_pulls
            .lock()
            .expect("template pulls lock")
            .entry(format!("{service}@{host}"))
            .or_default()
            .clone()
    }

    /// Before a VM of `plan`'s service is made on the farm host `host`: when that host lacks
    /// the service's template and another up host holds one, `host` pulls it from that peer
    /// (by content hash, verified, resumable; see [`hangar_host::Host::pull_template`]), so
    /// the VM is cloned rather than booted and no template is built twice in a farm. One
    /// pull per service and host at a time; creations placed there meanwhile wait for it.
    /// A pull that fails or takes longer than [`PULL_TIMEOUT`] is logged and the VM boots.
    pub(crate) async fn bring_template(&self, plan: &VmPlan, host: &Arc<dyn Host>) {
        let Some(service) = plan
            .service
            .as_ref()
            .filter(|_| plan.env.is_empty() && plan.purpose != Purpose::Template)
        else {
            return;
        };
        let Some(target) = self.scheduler.farm_host(host.name()) else {
            return;
        };
        if holds_service_template(&target.info.facts.templates, &service.name) {
            return;
        }
        let sources: Vec<FarmHost> = self
            .scheduler
            .farm_hosts()
            .into_iter()
            .filter(|peer| {
                peer.record.name != target.record.name
                    && peer.record.state == HostState::Up
                    && holds_service_template(&peer.info.facts.templates, &service.name)
            })
            .collect();
        if sources.is_empty() {
            return;
        }
        let lock = self.template_pull_lock(&service.name, &target.record.name);
        let _one_at_a_time = lock.lock().await;
        // A creation that waited here finds the template pulled (facts lag a heartbeat).
        if matches!(host.has_template(service).await, Ok(true)) {
            return;
        }
        for source in sources {
            let from = PeerSource {
                host: source.record.name.clone(),
                url: source.record.address.clone(),
                token: self.config.farm_token.clone(),
            };
            let started = std::time::Instant::now();
            let pulled = tokio::time::timeout(PULL_TIMEOUT, async {
                let bundle = source.host.template_bundle(service).await?.ok_or_else(|| {
                    HostError::Template(format!(
                        "host {} offers no template of {}",
                        source.record.name, service.name
                    ))
                })?;
                host.pull_template(service, &bundle, &from).await
            })
            .await;
            match pulled {
                Ok(Ok(template)) => {
                    tracing::info!(service = %service.name, host = %target.record.name, from = %source.record.name, template = %template.id, took_ms = started.elapsed().as_millis() as u64, "template pulled from a peer");
                    return;
                }
                Ok(Err(err)) => {
                    tracing::warn!(service = %service.name, host = %target.record.name, from = %source.record.name, error = %error_chain(&err), "cannot pull the template from a peer");
                }
                Err(_) => {
                    tracing::warn!(service = %service.name, host = %target.record.name, from = %source.record.name, "pulling the template from a peer took too long; booting instead");
                }
            }
        }
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
            // Clones on every host count: a template's id is unique per host only, and
            // keeping one more outdated template is cheaper than breaking a clone.
            .filter_map(|vm| hangar_host::template_of_record(&LaunchRecord(vm.spec.clone())))
            .collect();
        let host = self.host_of(&vm);
        let held = host.templates(&[]).await.unwrap_or_default();
        for old in held {
            if old.service == template.service
                && old.id != template.id
                && !in_use.contains(&old.id)
                && let Err(err) = host.remove_template(&old.id).await
            {
                tracing::warn!(template = %old.id, error = %error_chain(&err), "cannot remove an outdated template");
            }
        }
        Ok(vm)
    }

    /// Every template each host holds (the server's own, then the farm's up hosts).
    pub async fn templates(&self) -> Vec<TemplateView> {
        let services: Vec<Service> = self
            .catalog
            .names()
            .filter_map(|name| self.catalog.get(name).cloned())
            .collect();
        let mut hosts: Vec<Arc<dyn Host>> = self.scheduler.local().cloned().into_iter().collect();
        hosts.extend(
            self.scheduler
                .farm_hosts()
                .into_iter()
                .filter(|host| host.record.state == HostState::Up)
                .map(|host| host.host),
        );
        let mut views = Vec::new();
        for host in hosts {
            let held = match host.templates(&services).await {
                Ok(held) => held,
                Err(err) => {
                    tracing::warn!(host = %host.name(), error = %error_chain(&err), "cannot list templates");
                    continue;
                }
            };
            views.extend(held.into_iter().map(|template| {
                TemplateView {
                    service: template.service,
                    host: host.name().to_owned(),
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
                }
            }));
        }
        views
    }
}
