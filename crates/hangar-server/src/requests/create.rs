//! Making one VM: placement, the host's prepare and make (launch or clone, configuration,
//! the ready criterion), the records on the way, and discarding VMs that fail. Runs inside
//! a creation task (`crate::tasks`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hangar_core::{VmId, VmState};
use hangar_host::{Host, PreparedVm, Purpose, VmPlan};
use hangar_store::{VmRecord, now_ms};

use crate::api::error::error_chain;
use crate::tasks::Undo;

use crate::manager::*;
use crate::requests::*;

impl Manager {
    /// Makes one VM and waits until it is ready: active for a request, paused in its pool
    /// for a pool fill. Runs as task `task` (under `Manager::run_task`): each step records
    /// its undo in the task's journal before it changes anything, so a cancel or a failure
    /// at any step leaves nothing of the VM but its `deleted` or `failed` record. Steps:
    /// `place`, `prepare`, `endpoints`, `record`, `boot`.
    pub(crate) async fn create(&self, task: &str, make: &MakeVm) -> Result<VmRecord, String> {
        let started = Instant::now();
        let vm_id = VmId::generate().to_string();
        let plan = plan_for(make, &vm_id);
        let os_name = plan.os.clone();
        self.tasks.step(task, "place", 0).await;
        let (host, why) = self
            .place(&plan, &make.constraints())
            .await
            .map_err(|err| error_chain(&err))?;
        self.farm.placed(&vm_id, &why);
        self.tasks.step(task, "prepare", 5).await;
        self.journal(
            task,
            Undo::DestroyVm {
                vm: vm_id.clone(),
                host: host.name().to_owned(),
            },
        )
        .await?;
        self.bring_template(&plan, &host).await;
        let prepared = host
            .prepare_vm(&plan, self.tasks.progress(task))
            .await
            .map_err(|err| error_chain(&err))?;
        self.tasks.step(task, "endpoints", 40).await;
        let endpoints: BTreeMap<String, SocketAddr> = prepared
            .direct_endpoints
            .iter()
            .filter_map(|(name, addr)| Some((name.clone(), addr.parse().ok()?)))
            .collect();
        // Clients get stable endpoints in front of the VM's own (direct) port forwards.
        self.journal(task, Undo::CloseEndpoints { vm: vm_id.clone() })
            .await?;
        let stable = self
            .open_endpoints(&vm_id, make.service.as_ref(), &endpoints)
            .await
            .map_err(|err| error_chain(&err))?;
        self.tasks.step(task, "record", 45).await;
        let now = now_ms();
        let os = os_name.as_ref().map(|os| {
            let version = self
                .catalog
                .os(os)
                .map(|os| os.version.clone())
                .unwrap_or_default();
            (os.clone(), version)
        });
        // Recorded under the owner's quota lock, which ends the quota reservation: the
        // VM counts in the store from now on.
        let record = VmRecord {
            id: vm_id.clone(),
            host: host.name().to_owned(),
            services: make.service.iter().map(|s| s.name.clone()).collect(),
            // Secret settings only sealed: the plan (to the host) has them in plaintext.
            env: self.secrets.seal_env(&make.env),
            mode: make.mode,
            owner: make.owner.clone(),
            state: VmState::Creating,
            endpoints: stable
                .iter()
                .map(|(name, addr)| (name.clone(), addr.to_string()))
                .collect(),
            direct_endpoints: prepared.direct_endpoints.clone(),
            spec: prepared.launch.0.clone(),
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
            isolation: make.isolation.clone(),
        };
        self.journal(task, Undo::RetireVm { vm: vm_id.clone() })
            .await?;
        make.quota
            .settle(self.store.insert_vm(&record))
            .await
            .map_err(|err| error_chain(&err))?;
        if let Err(err) = self.store.set_task_vm(task, &vm_id).await {
            tracing::warn!(task, error = %err, "cannot link task to vm");
        }
        tracing::info!(vm = %vm_id, host = %host.name(), service = ?make.service.as_ref().map(|s| &s.name), pool = ?make.pool, task, "creating vm");
        self.tasks.step(task, "boot", 50).await;
        self.boot(task, &host, &plan, &prepared, started)
            .await
            .map_err(|reason| {
                let what = make.service.as_ref().map_or("shell", |s| s.name.as_str());
                tracing::warn!(vm = %vm_id, reason, "vm creation failed");
                format!("{what} VM {vm_id}: {reason}")
            })
    }

    /// Records `undo` in task `task`'s journal; a creation does not go on without it.
    async fn journal(&self, task: &str, undo: Undo) -> Result<(), String> {
        self.tasks
            .record_undo(task, &undo)
            .await
            .map(drop)
            .map_err(|err| format!("cannot record the task's undo journal: {err}"))
    }

    /// Has the host make a prepared VM and records how it went.
    async fn boot(
        &self,
        task: &str,
        host: &Arc<dyn Host>,
        plan: &VmPlan,
        prepared: &PreparedVm,
        started: Instant,
    ) -> Result<VmRecord, String> {
        let vm_id = plan.id.as_str();
        self.store
            .transition(vm_id, VmState::Booting, None)
            .await
            .map_err(|err| error_chain(&err))?;
        let made = host
            .make_vm(plan, prepared, self.tasks.progress(task))
            .await
            .map_err(|err| error_chain(&err))?;
        if let Some(template) = &made.template {
            return self.finish_template(vm_id, template).await;
        }
        self.store
            .set_launch(vm_id, made.process, &made.launch.0)
            .await
            .map_err(|err| error_chain(&err))?;
        let boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.store
            .set_boot_ms(vm_id, boot_ms)
            .await
            .map_err(|err| error_chain(&err))?;
        let state = if plan.purpose == Purpose::Pool {
            VmState::Ready
        } else {
            VmState::Active
        };
        let vm = self
            .store
            .transition(vm_id, state, None)
            .await
            .map_err(|err| error_chain(&err))?;
        tracing::info!(vm = %vm_id, state = %vm.state, boot_ms, cloned = made.cloned, "vm ready");
        Ok(vm)
    }

    /// Frees everything of a VM that failed (or is not wanted) and records why.
    pub(crate) async fn discard(&self, vm_id: &str, reason: &str) {
        tracing::warn!(vm = %vm_id, reason, "vm creation failed");
        if let Err(err) = self.host_of_id(vm_id).await.destroy(vm_id).await {
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
}

/// What the host is asked to make for `make`, as VM `vm_id`.
pub(crate) fn plan_for(make: &MakeVm, vm_id: &str) -> VmPlan {
    let os_name = make
        .service
        .as_ref()
        .map(|service| make.env.get("os").cloned().unwrap_or(service.os.clone()));
    VmPlan {
        id: vm_id.to_owned(),
        service: make.service.clone(),
        os: os_name,
        vcpus: make.vcpus,
        memory_mib: make.memory_mib,
        env: make.env.clone(),
        // Pool VMs carry a staging hostname; each gets its own identity when handed out.
        hostname: match (&make.service, &make.pool, make.template) {
            (_, Some(pool), _) => format!("pool-{pool}"),
            (Some(service), None, true) => format!("template-{}", service.name),
            _ => vm_id.to_owned(),
        },
        purpose: if make.template {
            Purpose::Template
        } else if make.pool.is_some() {
            Purpose::Pool
        } else {
            Purpose::Request
        },
        ready: make.ready.clone(),
        egress: make.egress.clone(),
    }
}
