//! Stacks (issue 18): several services made, slept, archived, woken and deleted as one
//! unit, each member a dedicated VM made through the request path, connected to the stack's
//! private segment. The file, its validation and the address plan are
//! `hangar_core::stack`; this concern applies them:
//!
//! - [`Manager::stack_up`] checks the file, takes a free /24, records the stack
//!   (`creating`) and starts its `stack` task ([`up`]): every member made at once, each
//!   through the request path (so pools and templates serve it), its stable endpoints kept
//!   only for its `public` ports, then joined to the segment without waiting for its peers.
//!   A failure or a cancel deletes every member made and the stack.
//! - [`Manager::stack_down`] deletes every member and the stack.
//! - [`Manager::stack_sleep`], [`Manager::stack_archive`], [`Manager::stack_wake`]: every
//!   member through the lifecycle's own operations; sleep and archive the front first,
//!   wake peers first and the front last. A connection to a sleeping stack's public
//!   endpoint wakes the whole stack ([`Manager::wake_stack_of`], called by the wake path).
//! - The lifecycle loop leaves members alone; the stack sleeps or is archived when its
//!   front (the members with public ports) would be by its service's policy
//!   ([`Manager::stack_lifecycle`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use hangar_api::{StackMemberView, StackView};
use hangar_core::VmState;
use hangar_core::stack::{StackError, StackPlan, StackSpec, StackState};
use hangar_store::{StackRecord, StoreError, now_ms};

use crate::lifecycle::ops::LifecycleError;
use crate::manager::Manager;

pub mod segment;
pub mod up;

#[cfg(test)]
mod tests;

/// Why a stack operation failed; mapped to a status in `crate::api::error`.
#[derive(Debug, thiserror::Error)]
pub enum StacksError {
    /// The stack file is not valid (400; 404 for an unknown service).
    #[error(transparent)]
    Invalid(#[from] StackError),
    #[error("no stack {0}")]
    NotFound(String),
    #[error("stack {0} exists already")]
    NameTaken(String),
    #[error("no private segment is free (at most 256 stacks)")]
    NoSegment,
    /// The stack's state forbids the operation.
    #[error("stack {name} is {state}; {rule}")]
    WrongState {
        name: String,
        state: &'static str,
        rule: &'static str,
    },
    /// A member's lifecycle operation failed (the others were still tried).
    #[error("member {member} (VM {vm})")]
    Member {
        member: String,
        vm: String,
        #[source]
        source: Box<LifecycleError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The concern's run-time state.
#[derive(Default)]
pub struct StacksRuntime {
    /// The `stack` task making each stack, while it runs (and after, for `show`).
    tasks: Mutex<HashMap<String, String>>,
    /// One lock per stack: a member recorded by `up` and the stack taken down never
    /// interleave.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl StacksRuntime {
    fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("stack locks")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn task(&self, name: &str) -> Option<String> {
        self.tasks.lock().expect("stack tasks").get(name).cloned()
    }
}

/// The stack's file as recorded.
fn spec_of(record: &StackRecord) -> Result<StackSpec, StoreError> {
    Ok(serde_json::from_value(record.spec.clone())?)
}

impl Manager {
    /// The recorded stack's plan (its file checked again against the catalog).
    pub(crate) fn plan_of(&self, record: &StackRecord) -> Result<StackPlan, StacksError> {
        let index = hangar_core::stack::segment_index(&record.segment).ok_or_else(|| {
            StoreError::Backend {
                what: "stack segment is not valid",
                source: record.segment.clone().into(),
            }
        })?;
        Ok(spec_of(record)?.plan(&self.catalog, index)?)
    }

    /// Stack `name` if `caller` may see it (its owner, or an admin); else not found.
    pub(crate) async fn stack_record(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
    ) -> Result<StackRecord, StacksError> {
        self.store
            .stack(name)
            .await?
            .filter(|record| visible(record, caller))
            .ok_or_else(|| StacksError::NotFound(name.to_owned()))
    }

    /// The stacks `caller` may see (every stack for `None` or an admin), by name.
    pub async fn stacks(
        &self,
        caller: Option<(&str, hangar_core::Role)>,
    ) -> Result<Vec<StackView>, StacksError> {
        let mut views = Vec::new();
        for record in self.store.stacks().await? {
            if visible(&record, caller) {
                views.push(self.stack_view(&record).await?);
            }
        }
        Ok(views)
    }

    /// Stack `name` as `caller` may see it.
    pub async fn stack(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
    ) -> Result<StackView, StacksError> {
        let record = self.stack_record(name, caller).await?;
        self.stack_view(&record).await
    }

    /// What `GET /v1/stacks/{name}` shows of `record`.
    pub(crate) async fn stack_view(&self, record: &StackRecord) -> Result<StackView, StacksError> {
        let plan = self.plan_of(record)?;
        let mut members = Vec::with_capacity(plan.members.len());
        for name in plan.wake_order() {
            let member = plan.member(&name).expect("wake order lists members");
            let vm = match record.members.get(&name) {
                Some(id) => self.store.vm(id).await?,
                None => None,
            };
            members.push(StackMemberView {
                name: member.name.clone(),
                service: member.service.clone(),
                vm: vm.as_ref().map(|vm| vm.id.clone()),
                state: vm.as_ref().map(|vm| vm.state.as_str().to_owned()),
                address: member.address.clone(),
                mac: member.mac.clone(),
                egress: (&member.egress).into(),
                endpoints: vm.map(|vm| vm.endpoints).unwrap_or_default(),
                peers: member.peers.iter().cloned().collect(),
            });
        }
        Ok(StackView {
            name: record.name.clone(),
            owner: record.owner.clone(),
            state: record.state,
            segment: record.segment.clone(),
            members,
            task: self.stacks_runtime.task(&record.name),
            created_at: crate::api::rfc3339(record.created_at_ms),
            updated_at: crate::api::rfc3339(record.updated_at_ms),
        })
    }

    /// Writes `record` with `state`, now.
    async fn set_stack_state(
        &self,
        record: &mut StackRecord,
        state: StackState,
    ) -> Result<(), StoreError> {
        record.state = state;
        record.updated_at_ms = now_ms();
        self.store.update_stack(record).await
    }

    /// Deletes every member of stack `name` and the stack (`DELETE /v1/stacks/{name}`).
    /// A stack being made is refused (409): cancel its task, which undoes it. Answers the
    /// stack as it was.
    pub async fn stack_down(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
    ) -> Result<StackView, StacksError> {
        let record = self.stack_record(name, caller).await?;
        if record.state == StackState::Creating {
            return Err(StacksError::WrongState {
                name: name.to_owned(),
                state: record.state.as_str(),
                rule: "cancel its task to undo it",
            });
        }
        let view = self.stack_view(&record).await?;
        self.remove_stack(name).await?;
        Ok(view)
    }

    /// Marks stack `name` deleting, deletes every member recorded (the segment goes with
    /// its last member), then the stack. Idempotent; also the undo of `up`.
    pub(crate) async fn remove_stack(&self, name: &str) -> Result<(), StacksError> {
        let lock = self.stacks_runtime.lock(name);
        let members = {
            let _guard = lock.lock().await;
            let Some(mut record) = self.store.stack(name).await? else {
                return Ok(());
            };
            self.set_stack_state(&mut record, StackState::Deleting)
                .await?;
            record.members
        };
        let mut failed = None;
        for (member, vm) in members {
            if let Err(err) = self.delete_member(&vm).await {
                tracing::warn!(stack = name, member, vm, error = %crate::api::error::error_chain(&err), "cannot delete stack member");
                failed.get_or_insert(StacksError::Member {
                    member,
                    vm,
                    source: Box::new(err),
                });
            }
        }
        if let Some(err) = failed {
            return Err(err);
        }
        self.store.remove_stack(name).await?;
        self.stacks_runtime
            .tasks
            .lock()
            .expect("stack tasks")
            .remove(name);
        tracing::info!(stack = name, "stack removed");
        Ok(())
    }

    /// Deletes a member's VM (gone already: nothing to do).
    async fn delete_member(&self, vm: &str) -> Result<(), LifecycleError> {
        match self.delete(vm).await {
            Ok(_) | Err(LifecycleError::NoVm(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Stack `name` as `caller` may see it, when it is neither being made nor deleted
    /// (up, sleeping or archived); else [`StacksError::WrongState`] with `rule`.
    async fn settled_stack(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
        rule: &'static str,
    ) -> Result<StackRecord, StacksError> {
        let record = self.stack_record(name, caller).await?;
        match record.state {
            StackState::Up | StackState::Sleeping | StackState::Archived => Ok(record),
            StackState::Creating | StackState::Deleting => Err(StacksError::WrongState {
                name: name.to_owned(),
                state: record.state.as_str(),
                rule,
            }),
        }
    }

    /// Puts every member of stack `name` to sleep, the front first (`POST
    /// /v1/stacks/{name}/sleep`). Members asleep already are left so.
    pub async fn stack_sleep(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
    ) -> Result<StackView, StacksError> {
        self.stack_down_to(name, caller, StackState::Sleeping).await
    }

    /// Archives every member of stack `name`, the front first.
    pub async fn stack_archive(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
    ) -> Result<StackView, StacksError> {
        self.stack_down_to(name, caller, StackState::Archived).await
    }

    async fn stack_down_to(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
        to: StackState,
    ) -> Result<StackView, StacksError> {
        let mut record = self
            .settled_stack(
                name,
                caller,
                "only a stack that is up sleeps or is archived",
            )
            .await?;
        let plan = self.plan_of(&record)?;
        for member in plan.wake_order().iter().rev() {
            let Some(vm) = record.members.get(member) else {
                continue;
            };
            let current = self.store.vm(vm).await?.map(|vm| vm.state);
            let result = match (to, current) {
                (StackState::Sleeping, Some(VmState::Active)) => self.sleep(vm).await.map(drop),
                (StackState::Archived, Some(VmState::Active | VmState::Sleeping)) => {
                    let tier = self.stack_archive_tier(&plan, member);
                    self.archive(vm, tier).await.map(drop)
                }
                _ => Ok(()),
            };
            result.map_err(|source| StacksError::Member {
                member: member.clone(),
                vm: vm.clone(),
                source: Box::new(source),
            })?;
        }
        if record.state != to
            && !(to == StackState::Sleeping && record.state == StackState::Archived)
        {
            self.set_stack_state(&mut record, to).await?;
        }
        tracing::info!(stack = name, state = to.as_str(), "stack down to");
        self.stack_view(&record).await
    }

    /// The archive tier a member's service's policy names.
    fn stack_archive_tier(&self, plan: &StackPlan, member: &str) -> hangar_host::ArchiveTier {
        let choice = plan
            .member(member)
            .and_then(|m| self.catalog.get(&m.service))
            .map(|service| service.policy.archive_tier)
            .unwrap_or_default();
        crate::lifecycle::policy::archive_tier(choice).0
    }

    /// Wakes every member of stack `name`, peers before the members that refer to them,
    /// the front last (`POST /v1/stacks/{name}/wake`).
    pub async fn stack_wake(
        &self,
        name: &str,
        caller: Option<(&str, hangar_core::Role)>,
    ) -> Result<StackView, StacksError> {
        self.settled_stack(
            name,
            caller,
            "only a stack that is up, sleeping or archived wakes",
        )
        .await?;
        self.wake_stack(name, None).await?;
        let record = self.stack_record(name, caller).await?;
        self.stack_view(&record).await
    }

    /// Under the stack's lock (a second wake waits for the first, then finds it up): wakes
    /// the members of stack `name` in wake order, except `but` (its caller wakes it), then
    /// marks the stack up. Members are woken alone ([`Manager::wake_vm_timed`]), never
    /// through this hook again.
    async fn wake_stack(&self, name: &str, but: Option<&str>) -> Result<(), StacksError> {
        let lock = self.stacks_runtime.lock(name);
        let _guard = lock.lock().await;
        let Some(mut record) = self.store.stack(name).await? else {
            return Err(StacksError::NotFound(name.to_owned()));
        };
        if matches!(record.state, StackState::Creating | StackState::Deleting) {
            return Ok(());
        }
        let plan = self.plan_of(&record)?;
        for member in plan.wake_order() {
            let Some(vm) = record.members.get(&member) else {
                continue;
            };
            if Some(vm.as_str()) == but {
                continue;
            }
            let state = self.store.vm(vm).await?.map(|vm| vm.state);
            if matches!(state, Some(VmState::Sleeping | VmState::Archived)) {
                self.wake_vm_timed(vm)
                    .await
                    .map_err(|source| StacksError::Member {
                        member: member.clone(),
                        vm: vm.clone(),
                        source: Box::new(source),
                    })?;
            }
        }
        if record.state != StackState::Up {
            self.set_stack_state(&mut record, StackState::Up).await?;
        }
        tracing::info!(stack = name, "stack woken");
        Ok(())
    }

    /// The wake path's hook: when VM `vm` is a member of a sleeping or archived stack,
    /// wakes the stack's other members first (peers before those referring to them) and
    /// marks the stack up, so that a connection to the front's stable endpoint finds its
    /// peers awake. Failures are logged; the VM's own wake goes on.
    pub(crate) async fn wake_stack_of(&self, vm: &str) {
        let stacks = match self.store.stacks().await {
            Ok(stacks) => stacks,
            Err(err) => {
                tracing::warn!(vm, error = %err, "cannot read stacks for a wake");
                return;
            }
        };
        let Some(record) = stacks.into_iter().find(|s| {
            matches!(s.state, StackState::Sleeping | StackState::Archived)
                && s.members.values().any(|id| id == vm)
        }) else {
            return;
        };
        tracing::info!(stack = %record.name, vm, "waking the stack of a woken member");
        if let Err(err) = self.wake_stack(&record.name, Some(vm)).await {
            tracing::warn!(stack = %record.name, error = %crate::api::error::error_chain(&err), "cannot wake stack members");
        }
    }

    /// The lifecycle loop's `action` on the front of stack `name`, applied to the whole
    /// stack: a sleep sleeps it, an archive archives it (a delete is left to `down`).
    /// Skipped while a connection to the front is open (its idle timers start again).
    /// Returns whether the stack changed.
    pub(crate) async fn stack_idle(
        &self,
        name: &str,
        action: &hangar_core::lifecycle::Action,
    ) -> bool {
        use hangar_core::lifecycle::Action;
        let to = match action {
            Action::Sleep { .. } => StackState::Sleeping,
            Action::Archive { .. } => StackState::Archived,
            _ => return false,
        };
        let Some(front) = action.vm() else {
            return false;
        };
        if let crate::endpoints::EndpointUse::Busy { open } = self.quiesce_endpoints(front).await {
            let _ = self.store.set_last_used(front, now_ms()).await;
            tracing::info!(stack = name, open, "lifecycle: stack front in use");
            return false;
        }
        match self.stack_down_to(name, None, to).await {
            Ok(_) => {
                tracing::info!(stack = name, state = to.as_str(), reason = %action.reason(), "lifecycle: stack idle");
                true
            }
            Err(err) => {
                tracing::warn!(stack = name, error = %crate::api::error::error_chain(&err), "lifecycle: stack action failed");
                false
            }
        }
    }

    /// A member that live migration moved to another host: joined to its segment there
    /// (the destination's copy has its own NIC socket and no port on that host's switch).
    /// Its guest kept its settings in its memory; the join binds its port and tells it the
    /// same address, MAC and names (no files, no restart). Logged, never fatal: the VM
    /// runs either way.
    pub(crate) async fn rejoin_stack_member(&self, vm: &hangar_store::VmRecord) {
        let stacks = match self.store.stacks().await {
            Ok(stacks) => stacks,
            Err(err) => {
                tracing::warn!(vm = %vm.id, error = %err, "cannot read stacks to rejoin a moved member");
                return;
            }
        };
        let Some((record, member)) = stacks.into_iter().find_map(|record| {
            let member = record
                .members
                .iter()
                .find(|(_, id)| **id == vm.id)
                .map(|(member, _)| member.clone())?;
            Some((record, member))
        }) else {
            return;
        };
        let joined = async {
            let plan = self.plan_of(&record).map_err(|err| err.to_string())?;
            let planned = plan.member(&member).ok_or("not in the stack's plan")?;
            let service = self
                .catalog
                .get(&planned.service)
                .ok_or("its service is gone")?;
            let join = segment::member_join(&plan, planned, service, &vm.id, true)
                .map_err(|err| crate::api::error::error_chain(&err))?;
            segment::join(self.host_of(vm).as_ref(), &vm.id, &join)
                .await
                .map_err(|err| crate::api::error::error_chain(&err))
        };
        match joined.await {
            Ok(()) => {
                tracing::info!(stack = %record.name, member, vm = %vm.id, host = %vm.host, "moved member joined its segment again")
            }
            Err(err) => {
                tracing::warn!(stack = %record.name, member, vm = %vm.id, error = %err, "cannot join a moved member to its segment")
            }
        }
    }

    /// The VMs that are members of a stack, and which of them are fronts (have public
    /// ports): the lifecycle loop acts on a stack as one.
    pub(crate) async fn stack_members(
        &self,
    ) -> Result<BTreeMap<String, (String, bool)>, StoreError> {
        let mut members = BTreeMap::new();
        for record in self.store.stacks().await? {
            let spec = spec_of(&record)?;
            for (member, vm) in &record.members {
                let front = spec
                    .members
                    .get(member)
                    .is_some_and(|m| !m.public.is_empty());
                members.insert(vm.clone(), (record.name.clone(), front));
            }
        }
        Ok(members)
    }
}

/// Whether `caller` may see `record`: its owner and admins (everyone for `None`).
fn visible(record: &StackRecord, caller: Option<(&str, hangar_core::Role)>) -> bool {
    match caller {
        None => true,
        Some((user, role)) => role == hangar_core::Role::Admin || record.owner == user,
    }
}
