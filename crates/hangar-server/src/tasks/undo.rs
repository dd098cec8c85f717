//! The undo journal of a task: what each step records before it runs ([`Undo`]), the
//! rollback that undoes the journal newest first ([`Manager::roll_back`]), and the
//! start-up pass that finishes the tasks a stopped server left ([`Manager::resume_tasks`]).

use hangar_core::VmState;
use hangar_store::{StepOutcome, StoreError, TaskRecord, TaskState, now_ms};
use serde::{Deserialize, Serialize};

use crate::api::error::error_chain;
use crate::manager::Manager;

/// How to undo one step of a task. Each is idempotent: undone twice, or where the step
/// never got to change anything, it does nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "undo", rename_all = "snake_case")]
pub enum Undo {
    /// Stop VM `vm`'s QEMU process on host `host` and remove everything it has there (its
    /// directory: disks, sockets, pid file, logs).
    DestroyVm { vm: String, host: String },
    /// Close the stable endpoints (the forwarded ports) opened for VM `vm`.
    CloseEndpoints { vm: String },
    /// Retire VM `vm`'s row: `deleted` when the task was cancelled, `failed` with the
    /// reason when it failed. A VM already failed or deleted is left as it is.
    RetireVm { vm: String },
    /// Remove the file or directory `path` on the server's machine.
    RemovePath { path: String },
    /// A migration's copy of VM `vm` on host `host`: removed there unless the store
    /// records the VM on `host` (the move was recorded: the copy is the VM).
    AbandonMove { vm: String, host: String },
    /// End live migration of VM `vm` from `source` to `destination` with one VM left: if
    /// the store places it on `destination` (the switchover was recorded), the source's
    /// copy is destroyed; otherwise the source's migration is cancelled (the VM resumed if
    /// it was paused for the switchover), its stable endpoints released, and everything on
    /// the destination destroyed.
    AbortLiveMigration {
        vm: String,
        source: String,
        destination: String,
    },
    /// Remove stack `stack`: every member recorded deleted, then its row (a member whose
    /// request finishes later finds the stack gone and deletes its own VM).
    RemoveStack { stack: String },
}

impl Undo {
    /// The journal's text for this entry (JSON).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("an undo entry always encodes")
    }

    /// An entry from the journal's text.
    pub fn decode(text: &str) -> Result<Undo, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// Why a task stops before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Someone cancelled it.
    Cancelled,
    /// A step failed, for this reason (its error chain).
    Failed(String),
    /// The server stopped while it ran (found at start-up).
    Interrupted { was_cancelled: bool },
}

impl Stopped {
    /// The state the task ends in.
    pub fn state(&self) -> TaskState {
        match self {
            Stopped::Cancelled
            | Stopped::Interrupted {
                was_cancelled: true,
            } => TaskState::Cancelled,
            Stopped::Failed(_) | Stopped::Interrupted { .. } => TaskState::Failed,
        }
    }

    /// The task's error.
    pub fn message(&self) -> String {
        match self {
            Stopped::Cancelled => CANCELLED.to_owned(),
            Stopped::Failed(reason) => reason.clone(),
            Stopped::Interrupted {
                was_cancelled: true,
            } => format!("{CANCELLED} (the undo finished after a server restart)"),
            Stopped::Interrupted { .. } => INTERRUPTED.to_owned(),
        }
    }
}

/// The error of a cancelled task (and its start, which says a rollback was for a cancel).
const CANCELLED: &str = "cancelled";
/// The error of a task its server's stop interrupted.
const INTERRUPTED: &str = "the server stopped before the task finished";

/// Entries of a journal that could not be undone.
#[derive(Debug, thiserror::Error)]
#[error("not undone: {}", .0.join("; "))]
pub struct RollbackError(pub Vec<String>);

impl From<StoreError> for RollbackError {
    fn from(err: StoreError) -> RollbackError {
        RollbackError(vec![format!("the journal: {err}")])
    }
}

impl Manager {
    /// Undoes task `id`'s journal, newest entry first, marking each undone as it goes (a
    /// rollback cut short by a stop goes on from there at start-up); its steps that had
    /// succeeded are marked rolled back. Every entry is tried; the error lists those that
    /// failed (they stay in the journal, not done).
    pub(crate) async fn roll_back(&self, id: &str, stopped: &Stopped) -> Result<(), RollbackError> {
        let journal = self.store.task_undos(id).await?;
        let mut failed = Vec::new();
        for entry in journal.iter().rev().filter(|entry| !entry.done) {
            let undone = match Undo::decode(&entry.action) {
                Ok(undo) => self.undo(&undo, stopped).await,
                Err(err) => Err(format!("entry {} unreadable: {err}", entry.seq)),
            };
            match undone {
                Ok(()) => {
                    if let Err(err) = self.store.mark_task_undone(id, entry.seq).await {
                        failed.push(format!("entry {}: {err}", entry.seq));
                    }
                }
                Err(err) => {
                    tracing::warn!(task = %id, entry = %entry.action, error = %err, "cannot undo");
                    failed.push(err);
                }
            }
        }
        for step in self.store.task_steps(id).await? {
            if step.outcome == Some(StepOutcome::Succeeded) {
                let _ = self
                    .store
                    .end_task_step(
                        id,
                        step.step,
                        StepOutcome::RolledBack,
                        None,
                        step.ended_at_ms.unwrap_or_else(now_ms),
                    )
                    .await;
            }
        }
        match failed.is_empty() {
            true => Ok(()),
            false => Err(RollbackError(failed)),
        }
    }

    /// Does one undo; the error says what is left.
    async fn undo(&self, undo: &Undo, stopped: &Stopped) -> Result<(), String> {
        match undo {
            Undo::DestroyVm { vm, host } => {
                let Some(on) = self.scheduler.host(host) else {
                    return Err(format!("VM {vm}: host {host} is not known"));
                };
                on.destroy(vm)
                    .await
                    .map_err(|err| format!("VM {vm} on {host}: {}", error_chain(&err)))
            }
            Undo::CloseEndpoints { vm } => {
                self.close_endpoints(vm).await;
                Ok(())
            }
            Undo::RetireVm { vm } => {
                let record = self
                    .store
                    .vm(vm)
                    .await
                    .map_err(|err| format!("VM {vm}: {err}"))?;
                let Some(record) = record else {
                    return Ok(());
                };
                if matches!(record.state, VmState::Failed | VmState::Deleted) {
                    return Ok(());
                }
                let (state, reason) = match stopped.state() {
                    TaskState::Cancelled => (VmState::Deleted, None),
                    _ => (VmState::Failed, Some(stopped.message())),
                };
                self.store
                    .transition(vm, state, reason.as_deref())
                    .await
                    .map(drop)
                    .map_err(|err| format!("VM {vm}: {err}"))
            }
            Undo::AbandonMove { vm, host } => {
                let record = self
                    .store
                    .vm(vm)
                    .await
                    .map_err(|err| format!("VM {vm}: {err}"))?;
                if record.is_some_and(|record| &record.host == host) {
                    return Ok(());
                }
                let Some(on) = self.scheduler.host(host) else {
                    return Err(format!("VM {vm}'s copy: host {host} is not known"));
                };
                on.destroy(vm)
                    .await
                    .map_err(|err| format!("VM {vm}'s copy on {host}: {}", error_chain(&err)))
            }
            Undo::AbortLiveMigration {
                vm,
                source,
                destination,
            } => self.abort_live_migration(vm, source, destination).await,
            Undo::RemoveStack { stack } => self
                .remove_stack(stack)
                .await
                .map_err(|err| format!("stack {stack}: {}", error_chain(&err))),
            Undo::RemovePath { path } => {
                match hangar_image::hostfs::remove_tree(std::path::Path::new(path)) {
                    Ok(()) => Ok(()),
                    Err(err) if !std::path::Path::new(path).exists() => {
                        tracing::debug!(path, error = %err, "nothing to remove");
                        Ok(())
                    }
                    Err(err) => Err(format!("{path}: {err}")),
                }
            }
        }
    }

    /// At start-up: ends every task a stopped server left running or rolling back. One
    /// whose work is complete (a creation whose VM is ready) ends `succeeded`; any other is
    /// undone from its journal and ends `failed`, or `cancelled` when it was being
    /// cancelled. Returns how many tasks it ended.
    pub(crate) async fn resume_tasks(&self) -> Result<usize, StoreError> {
        let unfinished = self.store.unfinished_tasks().await?;
        for task in &unfinished {
            if self.task_complete(task).await {
                tracing::info!(task = %task.id, "interrupted task had finished its work");
                self.tasks
                    .end(&task.id, TaskState::Succeeded, "done", None)
                    .await?;
                continue;
            }
            let stopped = Stopped::Interrupted {
                was_cancelled: task.state == TaskState::RollingBack
                    && task
                        .error
                        .as_deref()
                        .is_some_and(|e| e.starts_with(CANCELLED)),
            };
            let (state, message) = self.stop_task(&task.id, &stopped).await;
            tracing::info!(task = %task.id, state = state.as_str(), "interrupted task undone");
            let stage = match state {
                TaskState::Cancelled => "cancelled",
                _ => "failed",
            };
            self.tasks
                .end(&task.id, state, stage, Some(&message))
                .await?;
        }
        Ok(unfinished.len())
    }

    /// [`Undo::AbortLiveMigration`].
    pub(crate) async fn abort_live_migration(
        &self,
        vm: &str,
        source: &str,
        destination: &str,
    ) -> Result<(), String> {
        let host = |name: &str| {
            self.scheduler
                .host(name)
                .ok_or_else(|| format!("VM {vm}: host {name} is not known"))
        };
        let record = self
            .store
            .vm(vm)
            .await
            .map_err(|err| format!("VM {vm}: {err}"))?;
        if record.as_ref().is_some_and(|r| r.host == destination) {
            tracing::info!(
                vm,
                source,
                destination,
                "live migration had switched over; removing the source's copy"
            );
            return host(source)?
                .destroy(vm)
                .await
                .map_err(|err| format!("VM {vm} on {source}: {}", error_chain(&err)));
        }
        let mut problems = Vec::new();
        match host(source) {
            Ok(on) => {
                if let Err(err) = on.migrate_abort(vm).await {
                    // A source that restarted or never began the migration has nothing to
                    // cancel; one that cannot be reached is judged by its heartbeats.
                    tracing::warn!(vm, source, error = %error_chain(&err), "cannot cancel the source's migration");
                }
            }
            Err(err) => problems.push(err),
        }
        self.set_endpoints_active(vm, true).await;
        match host(destination) {
            Ok(on) => {
                if let Err(err) = on.destroy(vm).await {
                    problems.push(format!("VM {vm} on {destination}: {}", error_chain(&err)));
                }
            }
            Err(err) => problems.push(err),
        }
        tracing::info!(
            vm,
            source,
            destination,
            "live migration undone; the vm stays on its source"
        );
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }

    /// Whether `task`'s work was complete when its server stopped: a creation whose VM is
    /// ready (or active, or already past that). A migration is never taken as complete:
    /// its undo looks at where the store places the VM and leaves one copy of it.
    async fn task_complete(&self, task: &TaskRecord) -> bool {
        if task.state != TaskState::Running || task.kind == crate::migration::TASK_KIND {
            return false;
        }
        let Some(vm) = &task.vm_id else {
            return false;
        };
        matches!(
            self.store.vm(vm).await,
            Ok(Some(record)) if matches!(record.state, VmState::Ready | VmState::Active | VmState::Sleeping)
        )
    }
}
