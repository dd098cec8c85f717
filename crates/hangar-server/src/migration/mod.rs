//! Moving a VM from one farm host to another (seed 003's migration): [`migrate`] is the one
//! entry point. `POST /v1/vms/{id}/migrate` (`hangar migrate VM --to HOST`), host
//! evacuation and rebalancing call it.
//!
//! # Who may migrate
//!
//! Admins only (the route is absent from the role table, which makes it admin-only), and
//! the server itself (evacuation, rebalancing: owner `hangar`). Which host a VM runs on is
//! the operator's business: owners see the host but do not choose it.
//!
//! # What is checked before a task starts (errors answer at once)
//!
//! - the VM exists (not deleted) and is `active`, `sleeping` or `archived` (a pool VM is
//!   not moved: a draining host's pool VMs are made again elsewhere);
//! - it is on a farm host, and the destination is a farm host this server knows (the
//!   server's own host names its image files by path, not by content, so its VMs stay);
//! - the destination is not the VM's host, and placement's rules allow it
//!   ([`hangar_core::placement::check_destination`]): up (not draining, down or lost), room
//!   for the VM's vCPUs and memory beside what its VMs take, no VM of the VM's isolation
//!   group (label constraints a request had are not recorded with the VM: none are
//!   checked);
//! - the VM is not being migrated already (by this server).
//!
//! # The task
//!
//! A `migrate` task owned by `who`, linked to the VM, holding the VM's operation lock from
//! start to end (a wake, sleep, archive or delete of the VM waits for it; a connection to
//! its stable endpoint waits for the wake that follows). It dispatches on the VM's state:
//!
//! - `active`: [`live`], QEMU's live migration between the hosts, the VM's stable
//!   endpoints re-pointed at the switchover;
//! - `sleeping` or `archived`: [`cold`], the snapshot moved by content hash.
//!
//! Stages, percents and cancel are the task's ([`crate::tasks`]): a cancel or a failure
//! undoes the journal, and the VM stays whole on its source host. The store records the
//! move in one conditional write ([`hangar_store::Store::move_vm`]): before it the VM is on
//! the source, after it on the destination; whatever comes after (removing the source's
//! copy) cannot undo it.
//!
//! # Private segments
//!
//! A VM's segment port is its host's (a socket in its VM directory, a port of that host's
//! switch, see `hangar_host::segment`): the destination's copy has its own NIC socket and
//! no port, and segments do not cross hosts (a tunnel between agents' switches is designed
//! in DESIGN.md, not built). A stack's members therefore do not move: [`migrate`] refuses
//! them ([`MigrationError::StackMember`]), so evacuation and rebalancing leave them where
//! they are. The live path already joins a moved member again on its destination
//! (`Manager::rejoin_stack_member`: the same address, MAC and names; its guest kept its
//! settings), for when segments cross hosts; a cold move would need the same after the
//! wake that follows it.

pub mod cold;
pub mod live;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hangar_core::VmState;
use hangar_core::placement::{Exclusion, VmNeeds, check_destination};
use hangar_host::{Host, PeerSource};
use hangar_store::{StoreError, TaskState, VmMove, VmRecord};

use crate::api::error::error_chain;
use crate::manager::Manager;
use crate::scheduler::FarmHost;

/// The task kind of a migration.
pub const TASK_KIND: &str = "migrate";

/// Why a migration was refused before it started.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("no VM {0}")]
    NoVm(String),
    #[error("no farm host {0:?} is known to this server")]
    NoHost(String),
    #[error("VM {id} is already on host {host}")]
    SameHost { id: String, host: String },
    /// The VM's state forbids it; `rule` says which states allow it.
    #[error("VM {id} is {state}; {rule}")]
    WrongState {
        id: String,
        state: VmState,
        rule: &'static str,
    },
    /// The VM runs on the server's own host, whose files peers cannot pull by hash.
    #[error("VM {id} is on the server's own host {host}; only VMs on farm hosts (agents) move")]
    NotOnFarm { id: String, host: String },
    #[error("VM {id} is being migrated already (task {task})")]
    AlreadyMoving { id: String, task: String },
    /// A stack's members share a segment on one host (segments do not cross hosts yet).
    #[error(
        "VM {id} is a member of stack {stack}, whose private segment does not cross hosts; \
         its members stay on their host (`hangar stack down {stack}` and up elsewhere)"
    )]
    StackMember { id: String, stack: String },
    /// Placement's rules refuse the destination.
    #[error("host {host} cannot take VM {id}: {why}")]
    Destination {
        id: String,
        host: String,
        why: Exclusion,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A migration in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moving {
    pub from: String,
    pub to: String,
    pub task: String,
}

/// The migrations this server runs, by VM.
#[derive(Default)]
pub struct MigrationRuntime {
    moving: Mutex<HashMap<String, Moving>>,
}

impl MigrationRuntime {
    /// The migration of VM `id` in flight here, if any.
    pub fn of(&self, id: &str) -> Option<Moving> {
        self.moving.lock().expect("moving lock").get(id).cloned()
    }

    /// Every migration in flight here, by VM.
    pub fn all(&self) -> HashMap<String, Moving> {
        self.moving.lock().expect("moving lock").clone()
    }

    /// Claims VM `id` for a migration; the task of the one in flight otherwise.
    fn claim(&self, id: &str, moving: Moving) -> Result<(), String> {
        let mut all = self.moving.lock().expect("moving lock");
        if let Some(now) = all.get(id) {
            return Err(now.task.clone());
        }
        all.insert(id.to_owned(), moving);
        Ok(())
    }

    fn release(&self, id: &str) {
        self.moving.lock().expect("moving lock").remove(id);
    }
}

/// How a VM moves, by its state when the migration starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveKind {
    /// `active`: live migration.
    Live,
    /// `sleeping` or `archived`: the snapshot moved ([`cold`]).
    Cold,
}

impl MoveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Live => "live",
            MoveKind::Cold => "cold",
        }
    }
}

/// Starts migrating VM `vm_id` to farm host `to_host` for `who` (an admin, or the server's
/// own owner `hangar`); returns the `migrate` task's id. The checks of the module's
/// documentation run first and refuse with a [`MigrationError`]; the task then runs in the
/// background (`GET /v1/tasks/{id}`, cancellable) and its outcome is the VM as recorded
/// on its new host.
pub async fn migrate(
    manager: &Arc<Manager>,
    vm_id: &str,
    to_host: &str,
    who: &str,
) -> Result<String, MigrationError> {
    let (vm, kind, dest) = check(manager, vm_id, to_host).await?;
    let (task, sender) = manager
        .tasks
        .begin_as(TASK_KIND, who, vm.services.first().cloned())
        .await?;
    if let Err(err) = manager.store.set_task_vm(&task, &vm.id).await {
        tracing::warn!(task = %task, error = %err, "cannot link task to vm");
    }
    let moving = Moving {
        from: vm.host.clone(),
        to: dest.record.name.clone(),
        task: task.clone(),
    };
    if let Err(running) = manager.migrations.claim(&vm.id, moving) {
        let err = MigrationError::AlreadyMoving {
            id: vm.id.clone(),
            task: running,
        };
        manager
            .tasks
            .finish(&task, sender, Err((TaskState::Failed, err.to_string())))
            .await;
        manager.tasks.forget(&task);
        return Err(err);
    }
    tracing::info!(vm = %vm.id, from = %vm.host, to = %dest.record.name, kind = kind.as_str(), task = %task, by = who, "migration started");
    let manager = manager.clone();
    let id = task.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let lock = manager.vm_op_lock(&vm.id);
        let guard = lock.lock().await;
        let ctx = Move {
            manager: &manager,
            task: &id,
            vm_id: &vm.id,
            kind,
            to: &dest,
        };
        let result = manager.run_task(&id, ctx.run()).await;
        // A cancel that raced the store's write: the store says where the VM is.
        let result = match result {
            Err(stopped) => match manager.store.vm(&vm.id).await {
                Ok(Some(now)) if now.host == dest.record.name => Ok(now),
                _ => Err(stopped),
            },
            ok => ok,
        };
        if let Ok(moved) = &result {
            ctx.clean_source(&vm.host).await;
            tracing::info!(vm = %moved.id, from = %vm.host, to = %moved.host, took_ms = started.elapsed().as_millis() as u64, "migration done");
        }
        drop(guard);
        manager.migrations.release(&vm.id);
        metrics::counter!(
            crate::metrics::MIGRATIONS_TOTAL,
            "kind" => kind.as_str(),
            "outcome" => match &result {
                Ok(_) => "succeeded",
                Err((TaskState::Cancelled, _)) => "cancelled",
                Err(_) => "failed",
            },
        )
        .increment(1);
        manager.tasks.finish(&id, sender, result).await;
        tokio::time::sleep(crate::tasks::OUTCOME_KEPT).await;
        manager.tasks.forget(&id);
    });
    Ok(task)
}

/// The checks of the module's documentation: the VM, how it moves, and its destination.
async fn check(
    manager: &Manager,
    vm_id: &str,
    to_host: &str,
) -> Result<(VmRecord, MoveKind, FarmHost), MigrationError> {
    let vm = manager
        .store
        .vm(vm_id)
        .await?
        .filter(|vm| vm.state != VmState::Deleted)
        .ok_or_else(|| MigrationError::NoVm(vm_id.to_owned()))?;
    if let Some((stack, _)) = manager.stack_members().await?.remove(&vm.id) {
        return Err(MigrationError::StackMember { id: vm.id, stack });
    }
    let kind = kind_of(&vm)?;
    if vm.host == to_host {
        return Err(MigrationError::SameHost {
            id: vm.id.clone(),
            host: vm.host.clone(),
        });
    }
    if manager.scheduler.farm_host(&vm.host).is_none() {
        return Err(MigrationError::NotOnFarm {
            id: vm.id.clone(),
            host: vm.host.clone(),
        });
    }
    let dest = manager
        .scheduler
        .farm_host(to_host)
        .ok_or_else(|| MigrationError::NoHost(to_host.to_owned()))?;
    let mut facts = dest.placement_facts();
    let used = manager.scheduler.host_use(manager.store.as_ref()).await?;
    if let Some(use_there) = used.iter().find(|u| u.host == to_host) {
        facts.used_vcpus = u32::try_from(use_there.vcpus).unwrap_or(u32::MAX);
        facts.used_memory_mib = use_there.memory_mib;
        facts.groups.extend(use_there.groups.iter().cloned());
    }
    let needs = VmNeeds {
        isolation: vm.isolation.clone(),
        ..VmNeeds::new(vm.vcpus, u64::from(vm.memory_mib))
    };
    check_destination(&facts, &needs).map_err(|why| MigrationError::Destination {
        id: vm.id.clone(),
        host: to_host.to_owned(),
        why,
    })?;
    if let Some(moving) = manager.migrations.of(&vm.id) {
        return Err(MigrationError::AlreadyMoving {
            id: vm.id.clone(),
            task: moving.task,
        });
    }
    Ok((vm, kind, dest))
}

/// How `vm` moves in its state now.
fn kind_of(vm: &VmRecord) -> Result<MoveKind, MigrationError> {
    match vm.state {
        VmState::Active => Ok(MoveKind::Live),
        VmState::Sleeping | VmState::Archived => Ok(MoveKind::Cold),
        state => Err(MigrationError::WrongState {
            id: vm.id.clone(),
            state,
            rule: "only an active, sleeping or archived VM moves (a pool VM is made again \
                   elsewhere instead)",
        }),
    }
}

/// One migration as its task runs it: what the `cold` and `live` concerns are given.
pub struct Move<'a> {
    pub manager: &'a Arc<Manager>,
    /// The `migrate` task (steps, undo journal).
    pub task: &'a str,
    pub vm_id: &'a str,
    pub kind: MoveKind,
    /// The destination as the scheduler knew it when the migration was checked.
    pub to: &'a FarmHost,
}

impl Move<'_> {
    /// The work of the task: the VM read again under its lock (it may have changed while
    /// the lock was awaited), then moved as its kind says. The outcome is the VM as
    /// recorded on the destination.
    async fn run(&self) -> Result<VmRecord, String> {
        let vm = self
            .manager
            .store
            .vm(self.vm_id)
            .await
            .map_err(|err| error_chain(&err))?
            .ok_or_else(|| format!("VM {} is gone", self.vm_id))?;
        match kind_of(&vm).map_err(|err| err.to_string())? {
            kind if kind != self.kind => Err(format!(
                "VM {} became {} while the migration waited for it",
                vm.id, vm.state
            )),
            MoveKind::Cold => cold::move_cold(self, vm).await,
            MoveKind::Live => live::migrate_active(self, vm).await,
        }
    }

    /// For a template clone (its memory and disk map its template's files): makes sure
    /// the destination `dest` holds the same template, pulling it from `source` by content
    /// hash (verified) when it does not, as step `template` at `percent`. One pull per
    /// template and host, also when moves of its clones run side by side. Nothing for
    /// other VMs.
    pub async fn bring_template(
        &self,
        vm: &VmRecord,
        source: &dyn Host,
        dest: &dyn Host,
        percent: u8,
    ) -> Result<(), String> {
        if source
            .template_of(&hangar_host::LaunchRecord(vm.spec.clone()))
            .is_none()
        {
            return Ok(());
        }
        self.step("template", percent).await;
        let service = vm
            .services
            .iter()
            .find_map(|name| self.manager.catalog.get(name))
            .ok_or_else(|| format!("VM {} offers no service of the catalog", vm.id))?;
        // The source's bundle of the template is what the VM's copy names it by.
        let bundle = source
            .template_bundle(service)
            .await
            .map_err(|err| host_error(&vm.host, &err))?
            .ok_or_else(|| {
                format!(
                    "host {} offers no template of {} to its peers",
                    vm.host, service.name
                )
            })?;
        let lock = self.manager.template_pull_lock(&service.name, dest.name());
        let _one_at_a_time = lock.lock().await;
        let held = dest
            .has_template(service)
            .await
            .map_err(|err| host_error(dest.name(), &err))?;
        if !held {
            dest.pull_template(service, &bundle, &self.peer(&vm.host)?)
                .await
                .map_err(|err| host_error(dest.name(), &err))?;
            return Ok(());
        }
        // A template the destination built itself has the same inputs but not the same
        // frozen disk: the clone's disk layer would sit on other bytes. A pulled copy has
        // the source's memory files byte for byte (its disk differs only in the backing
        // path its rebase wrote), a build of its own has other ones.
        let theirs = dest
            .template_bundle(service)
            .await
            .map_err(|err| host_error(dest.name(), &err))?;
        let memory = |bundle: &hangar_host::TemplateBundle| {
            (
                bundle.memory.sha256.clone(),
                bundle.ram.as_ref().map(|ram| ram.sha256.clone()),
            )
        };
        match theirs {
            Some(theirs) if memory(&theirs) == memory(&bundle) => Ok(()),
            _ => Err(format!(
                "host {} holds its own build of {}'s template (another frozen disk than {}'s): \
                 VM {}, a clone of {}'s, cannot run over it",
                dest.name(),
                service.name,
                vm.host,
                vm.id,
                vm.host
            )),
        }
    }

    /// Starts the task's next step (stage, percent).
    pub async fn step(&self, stage: &str, percent: u8) {
        self.manager.tasks.step(self.task, stage, percent).await;
    }

    /// The host VM `vm` is on now.
    pub fn source(&self, vm: &VmRecord) -> Result<Arc<dyn Host>, String> {
        self.manager
            .scheduler
            .host(&vm.host)
            .ok_or_else(|| format!("host {} is not known to this server", vm.host))
    }

    /// Where peers pull a farm host's files from: its agent and the farm token.
    pub fn peer(&self, host: &str) -> Result<PeerSource, String> {
        let farm_host = self
            .manager
            .scheduler
            .farm_host(host)
            .ok_or_else(|| format!("host {host} is not a farm host this server knows"))?;
        Ok(PeerSource {
            host: host.to_owned(),
            url: farm_host.record.address.clone(),
            token: self.manager.config.farm_token.clone(),
        })
    }

    /// Records the move: the VM, in `state` on its source host, is on the destination from
    /// now on with this process, launch record and direct endpoints (one conditional
    /// write; refused when the VM changed meanwhile). Its archive record follows it and its
    /// stable endpoints forward to the new direct endpoints (`active` says whether
    /// connections go straight through). Returns the VM as recorded now.
    pub async fn commit(
        &self,
        vm: &VmRecord,
        pid: Option<u32>,
        spec: serde_json::Value,
        direct_endpoints: std::collections::BTreeMap<String, String>,
        active: bool,
    ) -> Result<VmRecord, String> {
        let to = self.to.record.name.clone();
        let moved = self
            .manager
            .store
            .move_vm(&VmMove {
                id: vm.id.clone(),
                from: vm.host.clone(),
                state: vm.state,
                to: to.clone(),
                pid,
                spec,
                direct_endpoints,
            })
            .await
            .map_err(|err| error_chain(&err))?;
        if !moved {
            return Err(format!(
                "VM {} changed while it was being moved; it stays on {}",
                vm.id, vm.host
            ));
        }
        if let Ok(Some(mut archive)) = self.manager.store.archive(&vm.id).await {
            archive.host = to.clone();
            if let Err(err) = self.manager.store.put_archive(&archive).await {
                tracing::warn!(vm = %vm.id, error = %err, "cannot record where the archive is");
            }
        }
        let now = self
            .manager
            .store
            .vm(&vm.id)
            .await
            .map_err(|err| error_chain(&err))?
            .ok_or_else(|| format!("VM {} is gone", vm.id))?;
        self.manager.repoint_endpoints(&now, active).await;
        Ok(now)
    }

    /// After the move is recorded: removes what the VM left on `source` (logged when it
    /// cannot; the host's leftovers are removed when it starts again).
    async fn clean_source(&self, source: &str) {
        self.step("clean", 95).await;
        let Some(host) = self.manager.scheduler.host(source) else {
            return;
        };
        if let Err(err) = host.destroy(self.vm_id).await {
            tracing::warn!(vm = %self.vm_id, host = source, error = %error_chain(&err), "cannot remove a moved VM's files from its old host");
        }
    }
}

/// A host's error for a task's message, naming the host.
fn host_error(host: &str, err: &hangar_host::HostError) -> String {
    format!("host {host}: {}", error_chain(err))
}

#[cfg(test)]
mod tests;
