//! `up`: a stack made as one task (kind `stack`). Its journal's first entry removes the
//! stack (every member recorded, then the row), so a failure, a cancel or a server stopped
//! mid-way leaves nothing. Every member is made at once (none waits for another: what a
//! member's settings name of its peers is fixed by the plan), each one:
//!
//! 1. requested through the request path as a dedicated VM of its service, with the
//!    service's default settings (so a warm pool VM or a template clone serves it; a
//!    service with a required setting, or settings that only reach its processes' environment,
//!    gets a VM made with them);
//! 2. recorded in the stack's row, unless the stack is being removed meanwhile (then the
//!    VM is deleted: a cancel never leaves a member behind, even one whose request was in
//!    flight);
//! 3. left with stable endpoints only for its `public` ports.
//!
//! 4. joined to the stack's segment as soon as it is made, without waiting for its peers:
//!    private address, MAC, the members' names, its templates rendered with its own
//!    (peer-resolved) settings and its processes restarted, waited for until they serve
//!    again.
//!
//! On a farm (more than one host) the first member is made (and joined) first, anywhere,
//! and the others on its host (`on = {hangar.host = …}`): a segment does not cross hosts.
//!
//! The task ends when every member has joined. A member that names peers may start before
//! they are on the segment (their addresses come from the plan, not from them): a proxy
//! in front reaches its upstreams once they join, which is before `up` answers. Joining
//! level by level (peers first) cost a whole join per level (about 1 s from templates).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use hangar_api::StackView;
use hangar_core::placement::HOST_LABEL;
use hangar_core::stack::{MemberPlan, StackPlan, StackSpec, StackState};
use hangar_core::{EgressPolicy, Mode, Service, ServiceRequest};
use hangar_host::LaunchRecord;
use hangar_store::{StackRecord, StoreError, TaskState, VmRecord, now_ms};

use super::StacksError;
use super::segment;
use crate::api::error::error_chain;
use crate::manager::Manager;
use crate::tasks::undo::Undo;

/// How long a member's request waits for its VM.
const MEMBER_DEADLINE_MS: u64 = 10 * 60 * 1000;

/// How many times `up` looks for a free segment when another stack takes the one it chose.
const SEGMENT_TRIES: usize = 8;

impl Manager {
    /// Checks `spec`, records the stack (`creating`) on a free /24 and starts its `stack`
    /// task; answers the task's id and the stack as recorded. The stack is `owner`'s, and
    /// so are its members. [`StacksError::Invalid`] for a file that is not valid,
    /// [`StacksError::NameTaken`] when a stack of its name exists.
    pub async fn stack_up(
        self: &Arc<Self>,
        owner: &str,
        spec: StackSpec,
    ) -> Result<(String, StackView), StacksError> {
        // Every error of the file before anything is taken (the segment changes nothing
        // but addresses).
        spec.plan(&self.catalog, 0)?;
        let spec_json = serde_json::to_value(&spec).map_err(StoreError::from)?;
        let mut record = None;
        for _ in 0..SEGMENT_TRIES {
            if self.store.stack(&spec.name).await?.is_some() {
                return Err(StacksError::NameTaken(spec.name.clone()));
            }
            let taken: BTreeSet<u8> = self
                .store
                .stacks()
                .await?
                .iter()
                .filter_map(|s| hangar_core::stack::segment_index(&s.segment))
                .collect();
            let index = hangar_core::stack::free_segment(&taken).ok_or(StacksError::NoSegment)?;
            let now = now_ms();
            let candidate = StackRecord {
                name: spec.name.clone(),
                owner: owner.to_owned(),
                spec: spec_json.clone(),
                segment: hangar_core::stack::segment_cidr(index),
                state: StackState::Creating,
                members: BTreeMap::new(),
                created_at_ms: now,
                updated_at_ms: now,
            };
            match self.store.insert_stack(&candidate).await {
                Ok(()) => {
                    record = Some((candidate, index));
                    break;
                }
                // The name or the segment was taken meanwhile: look again.
                Err(StoreError::Conflict(_)) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        let Some((record, index)) = record else {
            return Err(StacksError::NoSegment);
        };
        let plan = spec.plan(&self.catalog, index)?;
        let task = match self.begin_stack_task(owner, &plan).await {
            Ok(task) => task,
            Err(err) => {
                let _ = self.store.remove_stack(&plan.name).await;
                return Err(err.into());
            }
        };
        let view = self.stack_view(&record).await?;
        let manager = self.clone();
        let id = task.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = manager.run_task(&id, manager.make_stack(&id, &plan)).await;
            let (state, stage, error) = match result {
                Ok(()) => (TaskState::Succeeded, "done", None),
                Err((state, message)) => (
                    state,
                    if state == TaskState::Cancelled {
                        "cancelled"
                    } else {
                        "failed"
                    },
                    Some(message),
                ),
            };
            tracing::info!(stack = %plan.name, task = %id, state = state.as_str(), up_ms = started.elapsed().as_millis() as u64, "stack up ended");
            if let Err(err) = manager.tasks.end(&id, state, stage, error.as_deref()).await {
                tracing::warn!(task = %id, error = %err, "cannot record stack task outcome");
            }
            manager.tasks.forget(&id);
        });
        Ok((task, view))
    }

    /// Records the `stack` task and the first entry of its journal (remove the stack).
    async fn begin_stack_task(&self, owner: &str, plan: &StackPlan) -> Result<String, StoreError> {
        let (task, _outcome) = self
            .tasks
            .begin_as("stack", owner, Some(plan.name.clone()))
            .await?;
        self.tasks
            .record_undo(
                &task,
                &Undo::RemoveStack {
                    stack: plan.name.clone(),
                },
            )
            .await?;
        self.stacks_runtime
            .tasks
            .lock()
            .expect("stack tasks")
            .insert(plan.name.clone(), task.clone());
        Ok(task)
    }

    /// The task's work: every member made and joined at once (each joins as soon as it is
    /// made), then the stack marked up.
    async fn make_stack(self: &Arc<Self>, task: &str, plan: &StackPlan) -> Result<(), String> {
        let owner = self
            .store
            .stack(&plan.name)
            .await
            .map_err(|err| err.to_string())?
            .ok_or_else(|| format!("stack {} was removed", plan.name))?
            .owner;
        self.tasks.step(task, "members: made and joined", 0).await;
        // Spawned: a member whose request is in flight when the task is cancelled still
        // finds out that the stack is going and deletes its VM.
        let spawn = |name: &str, host: Option<String>| {
            let manager = self.clone();
            let plan = plan.clone();
            let name = name.to_owned();
            let owner = owner.clone();
            tokio::spawn(async move {
                let made = manager.make_member(&plan, &name, &owner, host).await?;
                manager.join_member(&plan, &made).await?;
                Ok(made)
            })
        };
        let mut names: Vec<&str> = plan.members.iter().map(|m| m.name.as_str()).collect();
        // A segment is one host's: with several hosts, the first member goes where
        // placement puts it (a pool VM or a template clone wherever there is one) and the
        // others to its host.
        let mut host = None;
        if self.scheduler.farm_hosts().len() + usize::from(self.scheduler.local().is_some()) > 1
            && !names.is_empty()
        {
            let first = names.remove(0);
            let member = all_of(vec![spawn(first, None)]).await?.remove(0);
            host = Some(member.vm.host.clone());
        }
        let handles: Vec<_> = names.iter().map(|name| spawn(name, host.clone())).collect();
        all_of(handles).await?;
        self.tasks.step(task, "up", 100).await;
        let mut record = self
            .store
            .stack(&plan.name)
            .await
            .map_err(|err| err.to_string())?
            .ok_or_else(|| format!("stack {} was removed", plan.name))?;
        self.set_stack_state(&mut record, StackState::Up)
            .await
            .map_err(|err| err.to_string())
    }

    /// One member made: requested (on host `host` only, when given), recorded, its
    /// endpoints narrowed.
    async fn make_member(
        self: &Arc<Self>,
        plan: &StackPlan,
        name: &str,
        owner: &str,
        host: Option<String>,
    ) -> Result<Made, String> {
        let member = plan.member(name).expect("plans list members");
        let service = self
            .catalog
            .get(&member.service)
            .cloned()
            .ok_or_else(|| format!("member {name}: no service {}", member.service))?;
        let with_settings = segment::needs_settings_at_creation(&service, member);
        let request = ServiceRequest {
            service: Some(service.name.clone()),
            mode: Mode::Dedicated,
            env: if with_settings {
                member.settings.clone()
            } else {
                BTreeMap::new()
            },
            egress: request_egress(&member.egress),
            on: host
                .map(|host| BTreeMap::from([(HOST_LABEL.to_owned(), host)]))
                .unwrap_or_default(),
            deadline_ms: Some(MEMBER_DEADLINE_MS),
            ..ServiceRequest::default()
        };
        let started = std::time::Instant::now();
        let grant = self
            .request_as(owner, request)
            .await
            .map_err(|err| format!("member {name}: {}", error_chain(&err)))?;
        let request_ms = started.elapsed().as_millis() as u64;
        let vm = grant.vm;
        self.record_member(plan, name, &vm.id).await?;
        self.keep_public_endpoints(&vm, &service, &member.public)
            .await
            .map_err(|err| format!("member {name}: stable endpoints: {err}"))?;
        tracing::info!(stack = %plan.name, member = name, vm = %vm.id, served = ?grant.served, request_ms, made_ms = started.elapsed().as_millis() as u64, "stack member made");
        Ok(Made {
            name: name.to_owned(),
            vm,
            service,
            with_settings,
        })
    }

    /// One member joined to the segment; when its processes restarted with its settings,
    /// once it serves again.
    async fn join_member(&self, plan: &StackPlan, made: &Made) -> Result<(), String> {
        let name = &made.name;
        let member = plan.member(name).expect("plans list members");
        let join =
            segment::member_join(plan, member, &made.service, &made.vm.id, made.with_settings)
                .map_err(|err| format!("member {name}: {}", error_chain(&err)))?;
        let started = std::time::Instant::now();
        segment::join(self.host_of(&made.vm).as_ref(), &made.vm.id, &join)
            .await
            .map_err(|err| format!("member {name}: {}", error_chain(&err)))?;
        let join_ms = started.elapsed().as_millis() as u64;
        if !join.restart.is_empty() || !join.reload.is_empty() {
            segment::serving_again(&made.service, &made.vm.direct_endpoints)
                .await
                .map_err(|err| format!("member {name}: {}", error_chain(&err)))?;
        }
        self.close_private_ports(member, made)
            .await
            .map_err(|err| format!("member {name}: closing its private ports: {err}"))?;
        tracing::info!(stack = %plan.name, member = %name, vm = %made.vm.id, address = %member.address, join_ms, joined_ms = started.elapsed().as_millis() as u64, "stack member joined");
        Ok(())
    }

    /// Records VM `vm` as member `name` of the stack being made; when the stack is being
    /// removed (or gone), deletes the VM instead and answers why.
    async fn record_member(&self, plan: &StackPlan, name: &str, vm: &str) -> Result<(), String> {
        let lock = self.stacks_runtime.lock(&plan.name);
        let guard = lock.lock().await;
        let record = self
            .store
            .stack(&plan.name)
            .await
            .map_err(|err| err.to_string())?;
        match record {
            Some(mut record) if record.state == StackState::Creating => {
                record.members.insert(name.to_owned(), vm.to_owned());
                record.updated_at_ms = now_ms();
                self.store
                    .update_stack(&record)
                    .await
                    .map_err(|err| err.to_string())
            }
            _ => {
                drop(guard);
                if let Err(err) = self.delete(vm).await {
                    tracing::warn!(stack = %plan.name, vm, error = %error_chain(&err), "cannot delete the member of a stack being removed");
                }
                Err(format!("stack {} is being removed", plan.name))
            }
        }
    }

    /// Leaves VM `vm` with stable endpoints only for `public` ports: the others' are closed
    /// and no longer recorded (the request path opened one per port).
    async fn keep_public_endpoints(
        &self,
        vm: &VmRecord,
        service: &Service,
        public: &[String],
    ) -> Result<(), String> {
        if vm.endpoints.keys().all(|port| public.contains(port)) {
            return Ok(());
        }
        self.close_endpoints(&vm.id).await;
        let mut direct = BTreeMap::new();
        for port in public {
            if let Some(addr) = vm.direct_endpoints.get(port) {
                let addr: SocketAddr = addr
                    .parse()
                    .map_err(|_| format!("direct endpoint {addr:?} of port {port}"))?;
                direct.insert(port.clone(), addr);
            }
        }
        let stable = self
            .open_endpoints(&vm.id, Some(service), &direct)
            .await
            .map_err(|err| error_chain(&err))?;
        let endpoints: BTreeMap<String, String> = stable
            .into_iter()
            .map(|(port, addr)| (port, addr.to_string()))
            .collect();
        self.store
            .set_offer(
                &vm.id,
                &vm.services,
                &offered_os(vm, service),
                &endpoints,
                &vm.direct_endpoints,
            )
            .await
            .map_err(|err| err.to_string())
    }

    /// Closes the host port forwards of member `member`'s ports that are not public, so
    /// that they are reachable from the stack's segment only, and records the VM without
    /// them (its launch record, so a wake does not open them again, and its direct
    /// endpoints). Done after the join: until then a restarted member's ready checks go
    /// through those forwards.
    async fn close_private_ports(&self, member: &MemberPlan, made: &Made) -> Result<(), String> {
        let private: Vec<&hangar_core::catalog::Port> = made
            .service
            .ports
            .iter()
            .filter(|port| !member.public.contains(&port.name))
            .collect();
        if private.is_empty() {
            return Ok(());
        }
        let guest_ports: Vec<u16> = private.iter().map(|port| port.guest).collect();
        let lock = self.vm_op_lock(&made.vm.id);
        let _guard = lock.lock().await;
        let vm = self
            .store
            .vm(&made.vm.id)
            .await
            .map_err(|err| err.to_string())?
            .ok_or_else(|| format!("VM {} is gone", made.vm.id))?;
        let launch = self
            .host_of(&vm)
            .close_forwards(&vm.id, &LaunchRecord(vm.spec.clone()), &guest_ports)
            .await
            .map_err(|err| error_chain(&err))?;
        self.store
            .set_launch(&vm.id, vm.pid, &launch.0)
            .await
            .map_err(|err| err.to_string())?;
        let mut direct = vm.direct_endpoints.clone();
        for port in &private {
            direct.remove(&port.name);
        }
        self.store
            .set_offer(
                &vm.id,
                &vm.services,
                &offered_os(&vm, &made.service),
                &vm.endpoints,
                &direct,
            )
            .await
            .map_err(|err| err.to_string())
    }
}

/// The OS VM `vm` of `service` is recorded as offering.
fn offered_os(vm: &VmRecord, service: &Service) -> (String, String) {
    vm.os
        .clone()
        .unwrap_or_else(|| (service.os.clone(), String::new()))
}

/// The egress a member's VM is requested with: what it reaches besides its peers. A
/// member that reaches nothing else asks for `none` on its user-mode NIC (what pool VMs
/// and template clones have, so they can serve it); its segment is its second NIC.
fn request_egress(member: &EgressPolicy) -> EgressPolicy {
    match member {
        EgressPolicy::Segment => EgressPolicy::None,
        other => other.clone(),
    }
}

/// A member made, not yet joined.
#[derive(Clone)]
struct Made {
    name: String,
    vm: VmRecord,
    service: Service,
    /// Made with its settings (they are not written again at join).
    with_settings: bool,
}

/// Waits for every spawned piece of work; their errors joined, or every result.
async fn all_of<T>(
    handles: Vec<tokio::task::JoinHandle<Result<T, String>>>,
) -> Result<Vec<T>, String> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(Ok(value)) => done.push(value),
            Ok(Err(err)) => failed.push(err),
            Err(err) => failed.push(format!("a member's work stopped: {err}")),
        }
    }
    if failed.is_empty() {
        Ok(done)
    } else {
        Err(failed.join("; "))
    }
}
