//! Applications installed at deploy (seed 003 claim 1): the "partial + install" path.
//!
//! A request for an OS and applications that no paused VM offers is served from a pre-OS
//! shell (QEMU booted to hangar-init, paused, no root yet) instead of a new image built
//! from nothing: the shell is given the OS layer and each application's own layers (the
//! ones the single-application images already built and cached; missing ones are built
//! first, as a stage of the task), stacked under a fresh writable layer, and booted;
//! hangar-init mounts them as one overlay and merges the layers' user databases and dpkg
//! status (see `hangar_host::images::ImageSource::composed_root`). The whole is one task
//! of kind `install` (stages `claim`, `layers`, `attach`, `ready`), waited for until the
//! request's deadline like a creation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::matching::MachineRequest;
use hangar_core::{Service, ServiceRequest, VmState};
use hangar_store::VmRecord;

use crate::api::error::error_chain;
use crate::manager::Manager;
use crate::requests::{Grant, RequestError, Served, Stages};

/// How long an install task's outcome stays in memory for late waiters.
const OUTCOME_KEPT: Duration = Duration::from_secs(60);

/// What to install at deploy, and onto which shell.
#[derive(Debug, Clone, Copy)]
pub struct Install<'a> {
    /// The configuration asked for.
    pub machine: &'a MachineRequest,
    pub request: &'a ServiceRequest,
    /// The service the VM offers: the one application, or the composition of `parts`.
    pub service: &'a Service,
    /// The applications whose layers are attached (one or several).
    pub parts: &'a [Service],
    /// The shell to take first (the heuristics engine's choice), if it is still free.
    pub prefer: Option<&'a str>,
    /// Slice the booted VM down to (vCPUs, MiB) before it is checked ready (exact size on
    /// a larger shell).
    pub slice_to: Option<(u32, u32)>,
}

impl Manager {
    /// Serves a configuration request with `install.service`, its applications
    /// (`install.parts`) installed at deploy onto a paused pre-OS shell with enough vCPUs
    /// and memory (the preferred one if free, else the smallest). `None` when no shell can
    /// take it (the caller builds a VM instead). The grant says `match: partial`, the
    /// install task, and the applications installed at deploy. `None` too when the
    /// applications' cached layers number accounts alike (a uid or gid given to two
    /// users or groups: files are owned by number), so that a VM is built for them. Past
    /// `until` the answer is a 503 naming the task, which goes on; a failure after the shell is claimed
    /// discards it and fails the request (the task records why).
    pub async fn grant_with_install(
        self: &Arc<Self>,
        owner: &str,
        install: Install<'_>,
        until: tokio::time::Instant,
        deadline: Duration,
    ) -> Result<Option<Grant>, RequestError> {
        let Install {
            machine,
            request,
            service: composed,
            parts,
            prefer,
            slice_to,
        } = install;
        let started = Instant::now();
        let mut stages = Stages::default();
        let os = machine.os.name.as_str();
        if parts.len() > 1 && self.images.is_composed_built(parts, os) {
            // Layers built side by side may number accounts alike: then they cannot share
            // a root, and a VM is built for the composition instead.
            let silent: crate::images::ProgressFn = Arc::new(|_: &str, _: u8| {});
            let root = self
                .images
                .composed_root(composed, parts, os, silent)
                .await
                .map_err(|err| RequestError::CreationFailed(error_chain(&err)))?;
            let clashes = self
                .images
                .id_clashes(&root)
                .await
                .map_err(|err| RequestError::CreationFailed(error_chain(&err)))?;
            if !clashes.is_empty() {
                tracing::info!(service = %composed.name, clashes = %clashes.join("; "), "the applications' layers cannot share a root; building instead");
                return Ok(None);
            }
        }
        let Some(shell) = self.claim_shell(owner, machine, request, prefer).await? else {
            return Ok(None);
        };
        let claimed = stages.mark("claim", started);
        if let Some(pool) = &shell.pool {
            self.record_demand(pool);
        }
        self.pools.granted();
        let (task, sender) = self
            .tasks
            .begin_as("install", owner, Some(composed.name.clone()))
            .await?;
        crate::tasks::announce::announce(&task);
        if let Err(err) = self.store.set_task_vm(&task, &shell.id).await {
            tracing::warn!(task = %task, error = %err, "cannot record the install task's vm");
        }
        let manager = self.clone();
        let id = task.clone();
        let (machine, request, composed_for_task, parts_for_task) = (
            machine.clone(),
            request.clone(),
            composed.clone(),
            parts.to_vec(),
        );
        tokio::spawn(async move {
            // Cancellable: a cancel drops the install and discards the shell like a failure.
            let install = manager.install(
                &id,
                &shell,
                &machine,
                &request,
                &composed_for_task,
                &parts_for_task,
                slice_to,
            );
            let result = manager.run_task(&id, install).await;
            if let Err((_, reason)) = &result {
                let reason = format!("installing onto shell {}: {reason}", shell.id);
                manager.discard(&shell.id, &reason).await;
            }
            manager.tasks.finish(&id, sender, result).await;
            tokio::time::sleep(OUTCOME_KEPT).await;
            manager.tasks.forget(&id);
        });
        let mut outcome = self
            .tasks
            .watch(&task)
            .ok_or(RequestError::TaskLost("install task outcome missing"))?;
        let waited = tokio::time::timeout_at(until, outcome.wait_for(Option::is_some))
            .await
            .map(|r| r.map(|result| result.clone().expect("waited for Some")));
        let outcome = match waited {
            Err(_) => {
                return Err(RequestError::TryAgain {
                    message: format!(
                        "{} is not installed within the request's deadline of {}; it is still being installed (task {task}), try again shortly",
                        composed.name,
                        humantime::format_duration(deadline)
                    ),
                    retry_after_s: 2,
                    task: Some(task),
                });
            }
            Ok(Err(_)) => return Err(RequestError::TaskLost("install task vanished")),
            Ok(Ok(outcome)) => outcome,
        };
        match outcome {
            Ok(vm) => {
                stages.mark("install", claimed);
                tracing::info!(vm = %vm.id, service = %composed.name, us = started.elapsed().as_micros() as u64, "installed at deploy");
                let mut grant = self
                    .grant(vm, Some(composed), Served::Partial, Some(task), None)
                    .await;
                grant.stages = stages;
                grant.installed_at_deploy = parts.iter().map(|p| p.name.clone()).collect();
                Ok(Some(grant))
            }
            Err(message) => Err(RequestError::CreationFailed(message)),
        }
    }

    /// Claims a paused pre-OS shell with at least `machine`'s vCPUs and memory for
    /// `owner`, `prefer` first, then the smallest; `None` when there is none (or every one went to others).
    async fn claim_shell(
        &self,
        owner: &str,
        machine: &MachineRequest,
        request: &ServiceRequest,
        prefer: Option<&str>,
    ) -> Result<Option<VmRecord>, RequestError> {
        let mut shells: Vec<VmRecord> = self
            .store
            .vms(false)
            .await?
            .into_iter()
            .filter(|vm| {
                vm.state == VmState::Ready
                    && vm.pool.is_some()
                    && vm.os.is_none()
                    && vm.vcpus >= machine.vcpus
                    && vm.memory_mib >= machine.memory_mib.min
                    && super::check::runs_with(vm, &request.egress)
            })
            .collect();
        shells.sort_by_key(|vm| (Some(vm.id.as_str()) != prefer, vm.memory_mib, vm.vcpus));
        for shell in shells {
            let vm = match self
                .store
                .claim(
                    &shell.id,
                    request.mode,
                    &self.secrets.seal_env(&request.env),
                )
                .await
            {
                Ok(vm) => vm,
                Err(err) if err.is_transition_conflict() => continue,
                Err(err) => return Err(err.into()),
            };
            if vm.owner == owner {
                return Ok(Some(vm));
            }
            self.store.set_owner(&vm.id, owner).await?;
            return Ok(Some(VmRecord {
                owner: owner.to_owned(),
                ..vm
            }));
        }
        Ok(None)
    }

    /// The install task's body: the parts' missing layers built (stage `layers`), the
    /// composed root attached to the claimed shell and booted (sliced to `slice_to`) to
    /// ready (`attach`, `ready`).
    #[allow(clippy::too_many_arguments)]
    async fn install(
        &self,
        task: &str,
        shell: &VmRecord,
        machine: &MachineRequest,
        request: &ServiceRequest,
        composed: &Service,
        parts: &[Service],
        slice_to: Option<(u32, u32)>,
    ) -> Result<VmRecord, String> {
        let progress = self.tasks.progress(task);
        let os = machine.os.name.as_str();
        if !self.images.is_composed_built(parts, os) {
            progress("layers", 5);
            tracing::info!(task, service = %composed.name, os, "building the applications' missing layers");
            let root = self
                .images
                .composed_root(composed, parts, os, self.tasks.build_progress(task, 5, 80))
                .await
                .map_err(|err| error_chain(&err))?;
            let clashes = self
                .images
                .id_clashes(&root)
                .await
                .map_err(|err| error_chain(&err))?;
            if !clashes.is_empty() {
                return Err(format!(
                    "the applications' layers number accounts alike and cannot share a root ({}); ask again to have a VM built for them",
                    clashes.join("; ")
                ));
            }
        }
        progress("attach", 80);
        let (vm, _) = self
            .boot_shell(shell, machine, Some(composed), parts, request, slice_to)
            .await?;
        progress("ready", 99);
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use hangar_core::ServiceRequest;
    use hangar_core::matching::{MachineRequest, MemoryRange, OsRequirement};
    use hangar_store::TaskState;

    use crate::manager::ManagerConfig;
    use crate::requests::{RequestError, Served};
    use crate::test_support::fake_manager;

    const CATALOG: &str = r#"
[service.web]
os = "busybox"
memory_mib = 128
[[service.web.port]]
name = "http"
guest = 80
[[service.web.process]]
name = "httpd"
argv = ["httpd"]
[service.web.settings.greeting]
default = "Hello"
[service.web.templates."/www/hello.txt"]
content = "{{greeting}}"
[service.web.ready]
checks = [{ http = { port = "http" } }]

[service.db]
os = "busybox"
memory_mib = 192
[[service.db.port]]
name = "sql"
guest = 5432
[[service.db.process]]
name = "db"
argv = ["db"]
[service.db.ready]
checks = [{ tcp = { port = "sql" } }]

[service.other-web]
os = "busybox"
[[service.other-web.port]]
name = "www"
guest = 80
[[service.other-web.process]]
name = "other"
argv = ["other"]
[service.other-web.ready]
checks = [{ tcp = { port = "www" } }]

[pool.shell]
vcpus = 1
memory_mib = 256
max = 1
"#;

    fn config(apps: &[&str], env: &[(&str, &str)]) -> ServiceRequest {
        ServiceRequest {
            config: Some(MachineRequest {
                vcpus: 1,
                memory_mib: MemoryRange { min: 128, max: 256 },
                os: OsRequirement {
                    name: "busybox".into(),
                    min_version: None,
                },
                apps: apps.iter().map(|a| a.to_string()).collect::<BTreeSet<_>>(),
                disk_mib: None,
            }),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ServiceRequest::default()
        }
    }

    async fn fill_shell(manager: &std::sync::Arc<crate::manager::Manager>) {
        manager.set_pool_bounds("shell", 1, Some(1)).await.unwrap();
        for _ in 0..200 {
            manager.reconcile_pools().await.unwrap();
            let views = manager.pool_views().await.unwrap();
            if views.iter().all(|p| p.booting == 0 && p.ready >= p.target) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the shell pool did not fill");
    }

    #[tokio::test]
    async fn several_apps_are_installed_onto_a_shell_at_deploy() {
        let (manager, backend, store) = fake_manager(CATALOG, ManagerConfig::default());
        fill_shell(&manager).await;
        let shell = store
            .vms(false)
            .await
            .unwrap()
            .into_iter()
            .find(|vm| vm.pool.as_deref() == Some("shell"))
            .expect("a shell");

        let grant = manager
            .request(config(&["web", "db"], &[("greeting", "Bonjour")]))
            .await
            .unwrap();
        assert_eq!(grant.served, Served::Partial);
        assert_eq!(grant.vm.id, shell.id);
        assert_eq!(grant.service, "db+web");
        assert_eq!(grant.installed_at_deploy, ["db", "web"]);
        assert_eq!(grant.vm.services, ["db", "web"]);
        // One endpoint per port of every application.
        let ports: Vec<&str> = grant.vm.endpoints.keys().map(String::as_str).collect();
        assert_eq!(ports, ["http", "sql"]);
        // The OS layer, then each application's own layers, the last on top.
        let layers: Vec<String> = backend
            .layers(&grant.vm.id)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            layers,
            [
                "/nonexistent/web.sqfs",
                "/nonexistent/db.sqfs",
                "/nonexistent/busybox.sqfs"
            ]
        );
        // The request's settings are the VM's.
        assert!(grant.vm.env.contains_key("greeting"), "{:?}", grant.vm.env);
        // The install is a task of its own, done.
        let task = store
            .task(grant.task.as_deref().expect("an install task"))
            .await
            .unwrap()
            .expect("task record");
        assert_eq!(task.kind, "install");
        assert_eq!(task.state, TaskState::Succeeded);
        assert_eq!(task.vm_id.as_deref(), Some(shell.id.as_str()));
    }

    #[tokio::test]
    async fn without_a_shell_several_apps_get_a_vm_built_for_them() {
        let (manager, _backend, _store) = fake_manager(CATALOG, ManagerConfig::default());
        let grant = manager.request(config(&["web", "db"], &[])).await.unwrap();
        assert_eq!(grant.served, Served::Created);
        assert!(grant.installed_at_deploy.is_empty());
        assert_eq!(grant.vm.services, ["db+web"]);
        let ports: Vec<&str> = grant.vm.endpoints.keys().map(String::as_str).collect();
        assert_eq!(ports, ["http", "sql"]);
    }

    /// The fake backend's images, whose layers number accounts alike.
    struct ClashingImages;

    #[async_trait::async_trait]
    impl crate::images::ImageSource for ClashingImages {
        async fn guest_assets(
            &self,
        ) -> Result<hangar_image::GuestAssets, crate::images::ImageSourceError> {
            crate::images::NoImages.guest_assets().await
        }

        async fn root_image(
            &self,
            service: &hangar_core::Service,
            os: &str,
            progress: crate::images::ProgressFn,
        ) -> Result<crate::images::RootImage, crate::images::ImageSourceError> {
            crate::images::NoImages
                .root_image(service, os, progress)
                .await
        }

        async fn os_image(
            &self,
            os: &str,
        ) -> Result<Option<std::path::PathBuf>, crate::images::ImageSourceError> {
            crate::images::NoImages.os_image(os).await
        }

        async fn composed_root(
            &self,
            composed: &hangar_core::Service,
            parts: &[hangar_core::Service],
            os: &str,
            progress: crate::images::ProgressFn,
        ) -> Result<crate::images::RootImage, crate::images::ImageSourceError> {
            crate::images::NoImages
                .composed_root(composed, parts, os, progress)
                .await
        }

        async fn id_clashes(
            &self,
            _root: &crate::images::RootImage,
        ) -> Result<Vec<String>, crate::images::ImageSourceError> {
            Ok(vec![
                "uid 100 is user a in layer x and user b in layer y".into(),
            ])
        }
    }

    #[tokio::test]
    async fn apps_whose_layers_number_accounts_alike_get_a_vm_built_instead() {
        let store: std::sync::Arc<dyn hangar_store::Store> = std::sync::Arc::new(
            hangar_store::SqliteStore::open_in_memory().expect("in-memory store"),
        );
        let backend = hangar_vmm::fake::FakeBackend::new();
        let manager = crate::test_support::manager_with_images(
            store.clone(),
            backend.clone(),
            std::sync::Arc::new(ClashingImages),
            CATALOG,
            ManagerConfig::default(),
            hangar_host::LocalHostConfig::default(),
        );
        fill_shell(&manager).await;
        let grant = manager.request(config(&["web", "db"], &[])).await.unwrap();
        assert_eq!(grant.served, Served::Created);
        assert!(grant.installed_at_deploy.is_empty());
        // The shell is still there for others.
        assert!(
            store
                .vms(false)
                .await
                .unwrap()
                .iter()
                .any(|vm| vm.pool.as_deref() == Some("shell") && vm.os.is_none())
        );
    }

    #[tokio::test]
    async fn clashing_apps_are_refused_before_anything_starts() {
        let (manager, backend, _store) = fake_manager(CATALOG, ManagerConfig::default());
        fill_shell(&manager).await;
        let launches = backend.launches();
        let err = manager
            .request(config(&["web", "other-web"], &[]))
            .await
            .expect_err("both listen on guest port 80");
        // Found by the heuristics engine, in front of the request path: a 422 whose
        // problem names both sides and suggests separate VMs.
        match &err {
            RequestError::Unservable(verdict) => {
                let clash = verdict
                    .errors()
                    .find(|p| p.code == hangar_core::heuristics::ProblemCode::Clash)
                    .expect("a clash");
                assert!(clash.message.contains("guest port 80"), "{}", clash.message);
                assert!(clash.suggestion.starts_with("request them on separate VMs"));
            }
            other => panic!("expected unservable, got {other:?}"),
        }
        assert_eq!(backend.launches(), launches, "nothing started");
    }
}
