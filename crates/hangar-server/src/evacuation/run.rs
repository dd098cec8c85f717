//! The `evacuate` task: drain, then every VM moved (see the module above).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use hangar_api::{EvacuatedVmView, EvacuationView};
use hangar_core::VmState;
use hangar_core::evacuation::Destinations;
use hangar_core::placement::{HostFacts, VmNeeds};
use hangar_store::{TaskState, VmRecord};
use tokio::task::JoinSet;

use super::{EvacuationError, TASK_KIND};
use crate::api::error::error_chain;
use crate::manager::Manager;
use crate::rebalance::Mover;

/// Moves an evacuation runs at once.
pub const MOVES_AT_ONCE: usize = 2;

/// Starts evacuating farm host `host` for `who` (an admin): drains it (refused as
/// [`Manager::drain_host`] refuses), records an `evacuate` task and runs it in the
/// background with `mover`; returns the task's id. Refused while the host is being
/// evacuated already.
pub async fn evacuate(
    manager: &Arc<Manager>,
    host: &str,
    who: &str,
    mover: Arc<dyn Mover>,
) -> Result<String, EvacuationError> {
    if let Some(task) = manager.evacuations.running(host) {
        return Err(EvacuationError::Evacuating {
            host: host.to_owned(),
            task,
        });
    }
    let drained = manager.drain_host(host).await?;
    let (task, _outcome) = manager.tasks.begin_as(TASK_KIND, who, None).await?;
    let report = EvacuationView {
        host: host.to_owned(),
        task: task.clone(),
        state: TaskState::Running.as_str().to_owned(),
        pool_vms_removed: drained.pool_vms_removed,
        moved: 0,
        failed: 0,
        elapsed_ms: 0,
        vms: Vec::new(),
    };
    let report = match manager.evacuations.start(report) {
        Ok(report) => report,
        Err(running) => {
            let err = EvacuationError::Evacuating {
                host: host.to_owned(),
                task: running,
            };
            let _ = manager
                .tasks
                .end(&task, TaskState::Failed, "failed", Some(&err.to_string()))
                .await;
            manager.tasks.forget(&task);
            return Err(err);
        }
    };
    manager.tasks.mark_cancellable(&task);
    tracing::info!(host, task = %task, by = who, "evacuation started");
    let run = Evacuation {
        manager: manager.clone(),
        task: task.clone(),
        host: host.to_owned(),
        report,
        started: Instant::now(),
    };
    tokio::spawn(async move {
        run.run(mover).await;
        run.manager.tasks.forget(&run.task);
    });
    Ok(task)
}

/// One evacuation as its task runs it.
struct Evacuation {
    manager: Arc<Manager>,
    task: String,
    host: String,
    /// What `GET /v1/hosts/{name}/evacuation` answers, updated as VMs move.
    report: Arc<Mutex<EvacuationView>>,
    started: Instant,
}

/// A VM of the evacuation: its index in the report, and what placement needs of it.
struct Evacuee {
    at: usize,
    id: String,
    needs: VmNeeds,
}

impl Evacuation {
    async fn run(&self, mover: Arc<dyn Mover>) {
        let (state, error) = match self.evacuees().await {
            Ok((evacuees, destinations)) => self.move_all(evacuees, destinations, mover).await,
            Err(err) => (TaskState::Failed, Some(err)),
        };
        // Pool VMs that became ready on the host while it was being emptied.
        self.manager.retire_pool_vms_on(&self.host).await;
        let (moved, failed) = {
            let mut report = self.report.lock().expect("evacuation lock");
            report.state = state.as_str().to_owned();
            report.elapsed_ms = self.elapsed_ms();
            (report.moved, report.failed)
        };
        tracing::info!(host = %self.host, task = %self.task, state = state.as_str(), moved, failed, took_ms = self.elapsed_ms(), "evacuation ended");
        let stage = match state {
            TaskState::Succeeded => "done",
            TaskState::Cancelled => "cancelled",
            _ => "failed",
        };
        if let Err(err) = self
            .manager
            .tasks
            .end(&self.task, state, stage, error.as_deref())
            .await
        {
            tracing::warn!(task = %self.task, error = %error_chain(&err), "cannot record the evacuation's end");
        }
    }

    /// The host's active, sleeping and archived VMs (listed in the report, `pending`), and
    /// the other hosts as placement counts them now.
    async fn evacuees(&self) -> Result<(Vec<Evacuee>, Destinations), String> {
        self.manager.tasks.step(&self.task, "listing vms", 0).await;
        let vms: Vec<VmRecord> = self
            .manager
            .store
            .vms_on_host(&self.host)
            .await
            .map_err(|err| error_chain(&err))?
            .into_iter()
            .filter(|vm| {
                vm.host == self.host
                    && matches!(
                        vm.state,
                        VmState::Active | VmState::Sleeping | VmState::Archived
                    )
            })
            .collect();
        let used = self
            .manager
            .scheduler
            .host_use(self.manager.store.as_ref())
            .await
            .map_err(|err| error_chain(&err))?;
        let hosts: Vec<HostFacts> = self
            .manager
            .scheduler
            .farm_hosts()
            .iter()
            .map(|farm_host| {
                let mut facts = farm_host.placement_facts();
                if let Some(use_there) = used.iter().find(|u| u.host == facts.name) {
                    facts.used_vcpus = u32::try_from(use_there.vcpus).unwrap_or(u32::MAX);
                    facts.used_memory_mib = use_there.memory_mib;
                    facts.groups.extend(use_there.groups.iter().cloned());
                }
                facts
            })
            .collect();
        let mut report = self.report.lock().expect("evacuation lock");
        let evacuees = vms
            .iter()
            .enumerate()
            .map(|(at, vm)| {
                report.vms.push(EvacuatedVmView {
                    vm: vm.id.clone(),
                    state: vm.state.to_string(),
                    from: self.host.clone(),
                    to: None,
                    outcome: "pending".into(),
                    error: None,
                    took_ms: None,
                });
                Evacuee {
                    at,
                    id: vm.id.clone(),
                    needs: VmNeeds {
                        isolation: vm.isolation.clone(),
                        ..VmNeeds::new(vm.vcpus, u64::from(vm.memory_mib))
                    },
                }
            })
            .collect();
        Ok((evacuees, Destinations::new(hosts, &self.host)))
    }

    /// Moves `evacuees`, [`MOVES_AT_ONCE`] at a time, each to the host `destinations`
    /// chooses when its move starts; returns how the task ends.
    async fn move_all(
        &self,
        evacuees: Vec<Evacuee>,
        mut destinations: Destinations,
        mover: Arc<dyn Mover>,
    ) -> (TaskState, Option<String>) {
        let total = evacuees.len();
        let token = self.manager.tasks.cancellation(&self.task);
        let mut waiting = evacuees.into_iter();
        let mut moving = JoinSet::new();
        let mut handled = 0usize;
        let mut cancelled = false;
        loop {
            while !cancelled && moving.len() < MOVES_AT_ONCE {
                let Some(vm) = waiting.next() else { break };
                let to = match destinations.choose(&vm.needs) {
                    Ok(chosen) => chosen.host,
                    Err(none) => {
                        handled += 1;
                        self.ended(vm.at, None, Err(none.to_string()), None);
                        continue;
                    }
                };
                self.manager
                    .tasks
                    .step(
                        &self.task,
                        &format!("moving {} to {to}", vm.id),
                        percent(handled, total),
                    )
                    .await;
                self.set(vm.at, |entry| {
                    entry.to = Some(to.clone());
                    entry.outcome = "moving".into();
                });
                let mover = mover.clone();
                moving.spawn(async move {
                    let started = Instant::now();
                    let result = mover.migrate(&vm.id, &to).await;
                    (vm, to, result, started.elapsed())
                });
            }
            if moving.is_empty() {
                break;
            }
            tokio::select! {
                () = token.cancelled(), if !cancelled => {
                    cancelled = true;
                    tracing::info!(task = %self.task, host = %self.host, "evacuation cancelled: no new moves; waiting for those under way");
                }
                joined = moving.join_next() => {
                    let Some(joined) = joined else { continue };
                    handled += 1;
                    match joined {
                        Ok((vm, to, result, took)) => {
                            if result.is_err() {
                                destinations.release(&to, &vm.needs);
                            }
                            let took = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                            self.ended(vm.at, Some(to), result, Some(took));
                        }
                        Err(err) => tracing::warn!(task = %self.task, error = %err, "an evacuation move panicked"),
                    }
                    self.manager
                        .tasks
                        .step(&self.task, "moving", percent(handled, total))
                        .await;
                }
            }
        }
        for vm in waiting {
            self.set(vm.at, |entry| {
                entry.outcome = "skipped".into();
                entry.error = Some("the evacuation was cancelled first".into());
            });
        }
        let report = self.report.lock().expect("evacuation lock");
        let not_moved: Vec<String> = report
            .vms
            .iter()
            .filter(|vm| vm.outcome == "failed")
            .map(|vm| format!("{} ({})", vm.vm, vm.error.as_deref().unwrap_or("no reason")))
            .collect();
        let failures = (!not_moved.is_empty()).then(|| {
            format!(
                "{} of {} VMs not moved, they stay on {} (draining): {}",
                not_moved.len(),
                report.vms.len(),
                self.host,
                not_moved.join("; ")
            )
        });
        if cancelled {
            let why = match failures {
                Some(failures) => format!("cancelled; {failures}"),
                None => "cancelled".to_owned(),
            };
            return (TaskState::Cancelled, Some(why));
        }
        match failures {
            Some(failures) => (TaskState::Failed, Some(failures)),
            None => (TaskState::Succeeded, None),
        }
    }

    /// Records how VM `at`'s move ended.
    fn ended(
        &self,
        at: usize,
        to: Option<String>,
        result: Result<(), String>,
        took_ms: Option<u64>,
    ) {
        let mut report = self.report.lock().expect("evacuation lock");
        match &result {
            Ok(()) => report.moved += 1,
            Err(_) => report.failed += 1,
        }
        report.elapsed_ms = self.elapsed_ms();
        let entry = &mut report.vms[at];
        entry.to = to;
        entry.took_ms = took_ms;
        match result {
            Ok(()) => {
                entry.outcome = "moved".into();
                tracing::info!(vm = %entry.vm, from = %entry.from, to = ?entry.to, took_ms, "evacuation: vm moved");
            }
            Err(err) => {
                tracing::warn!(vm = %entry.vm, from = %entry.from, to = ?entry.to, error = %err, "evacuation: vm not moved");
                entry.outcome = "failed".into();
                entry.error = Some(err);
            }
        }
    }

    fn set(&self, at: usize, change: impl FnOnce(&mut EvacuatedVmView)) {
        let mut report = self.report.lock().expect("evacuation lock");
        report.elapsed_ms = self.elapsed_ms();
        change(&mut report.vms[at]);
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// `handled` of `total` in percent (100 for none).
fn percent(handled: usize, total: usize) -> u8 {
    if total == 0 {
        return 100;
    }
    u8::try_from(handled * 100 / total).unwrap_or(100)
}
