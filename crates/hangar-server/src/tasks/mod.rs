//! Tasks: long operations (making a VM, filling a pool, building an image or a template,
//! archiving, waking, exporting, importing) recorded in the store with their owner, steps
//! (stage, percent, start, end, outcome), outcome and error, cancellable, and undone when
//! cancelled or failed.
//!
//! [`Tasks`] keeps the records, the outcomes, and per running task its cancellation token
//! and open step. `Manager::start_create` runs a creation as a task.
//!
//! # How a long operation runs as a task
//!
//! 1. [`Tasks::begin_as`] (or [`Tasks::begin`] for the server's own work, owner `hangar`)
//!    records it `running` and returns its id.
//! 2. Before each step, [`Tasks::step`] ends the step before (succeeded) and starts the
//!    next, with its stage and the task's percent (`HANGAR_TEST_PAUSE_AT_STEP=<stage>`,
//!    for tests only, holds the task at that step until it is cancelled).
//! 3. *Before* a step changes anything, the task records how to undo it with
//!    [`Tasks::record_undo`] (an [`undo::Undo`]: destroy a VM on a host, close its
//!    endpoints, retire its row, remove a path). Recording first means a server killed in
//!    the middle of the step still undoes it at start-up. Every undo is idempotent: it
//!    does nothing where there is nothing left.
//! 4. The operation's future runs under `Manager::run_task`, which races it with the
//!    task's cancellation token ([`Tasks::cancellation`]; a long step may also watch the
//!    token itself, e.g. to kill a process group): on a cancel the future is dropped at its
//!    next await, on a cancel or a failure the task goes `rolling_back`, its journal is
//!    undone newest first, each entry marked as it is done, and the task ends `cancelled`
//!    or `failed`. Then end it with [`Tasks::end`] or [`Tasks::finish`].
//!    An image build (`build_image`, `hangar build`) runs this way too: the task's token
//!    sets the build's `hangar_image::Cancel`, which kills the build's tools (debootstrap,
//!    apt-get, mksquashfs: their whole process group), undoes its mounts and removes its
//!    temporary directory; the task ends `cancelled` once the build has stopped, and every
//!    request that joined the shared build sees it end with "cancelled".
//! 5. At start-up, `Manager::resume_tasks` finds the tasks a stopped server left: one
//!    whose work is complete (its VM ready) ends `succeeded`, any other is undone from its
//!    journal and ends `failed` (`cancelled` if it was being cancelled).

pub mod announce;
pub mod undo;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::TaskId;
use hangar_store::{StepOutcome, Store, StoreError, TaskRecord, TaskState, VmRecord, now_ms};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use undo::{Stopped, Undo};

use crate::images::ProgressFn;
use crate::manager::Manager;
use crate::requests::{MakeVm, Outcome};

/// How long a finished task's outcome stays for waiters in memory; later ones read the
/// store.
pub(crate) const OUTCOME_KEPT: Duration = Duration::from_secs(60);

/// The owner of the tasks the server starts on its own (pool fills, templates, the
/// lifecycle loop).
pub const SERVER_OWNER: &str = "hangar";

/// The environment variable that holds a task at a step (its stage) until the task is
/// cancelled. For tests only: it lets a test cancel or kill the server at a known step.
pub const PAUSE_AT_STEP_ENV: &str = "HANGAR_TEST_PAUSE_AT_STEP";

/// The tasks of this server: their records in the store and the outcomes of those that
/// run or ended lately.
pub struct Tasks {
    store: Arc<dyn Store>,
    outcomes: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
    /// Per running task, the queue of its record's writer (see [`Tasks::progress`]).
    writers: Mutex<HashMap<String, mpsc::UnboundedSender<Write>>>,
    /// Per task running in this process: its cancellation and open step.
    live: Mutex<HashMap<String, Live>>,
    /// The stage [`PAUSE_AT_STEP_ENV`] names, read once.
    pause_at: Option<String>,
}

/// What this process holds of a running task.
struct Live {
    /// What the task does (its metrics label when it ends).
    kind: String,
    token: CancellationToken,
    /// The step started last and not ended.
    step: Option<u32>,
    /// Whether it runs under `Manager::run_task`, which acts on a cancel.
    cancellable: bool,
}

/// Why a task was not cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no task {0}")]
    NotFound(String),
    #[error("task {id} is {owner}'s: only its owner or an admin may cancel it")]
    NotOwner { id: String, owner: String },
    #[error("task {id} already ended ({state})")]
    Ended { id: String, state: &'static str },
    #[error("task {id} is {state} and no longer cancellable")]
    RollingBack { id: String, state: &'static str },
    #[error(
        "task {0} cannot be cancelled: it is not a cancellable task of this server (imports, \
         archives and wakes are not cancellable; another server's task ends \
         when that server starts again)"
    )]
    NotHere(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One write to a task's record, in the order it was asked for.
enum Write {
    Progress(String, u8),
    /// The task goes `rolling_back` with `why` as its error; answered on `done`.
    Mark {
        why: String,
        done: oneshot::Sender<()>,
    },
    /// The task's end; the writer records it, answers on `done` and stops, so no progress
    /// queued before it lands after it.
    End {
        state: TaskState,
        stage: &'static str,
        error: Option<String>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// Writes task `task`'s record from `writes`, one at a time, until its end.
async fn write_task(
    store: Arc<dyn Store>,
    task: String,
    mut writes: mpsc::UnboundedReceiver<Write>,
) {
    // Set once the task undoes its steps: later progress keeps that state.
    let mut rolling_back: Option<String> = None;
    while let Some(write) = writes.recv().await {
        match write {
            Write::Progress(stage, percent) => {
                let (state, error) = match &rolling_back {
                    Some(why) => (TaskState::RollingBack, Some(why.as_str())),
                    None => (TaskState::Running, None),
                };
                if let Err(err) = store
                    .update_task(&task, state, &stage, percent, error)
                    .await
                {
                    tracing::warn!(task = %task, error = %err, "cannot record task progress");
                }
            }
            Write::Mark { why, done } => {
                if let Err(err) = store
                    .update_task(
                        &task,
                        TaskState::RollingBack,
                        "rolling back",
                        100,
                        Some(&why),
                    )
                    .await
                {
                    tracing::warn!(task = %task, error = %err, "cannot record rollback");
                }
                rolling_back = Some(why);
                let _ = done.send(());
            }
            Write::End {
                state,
                stage,
                error,
                done,
            } => {
                let result = store
                    .update_task(&task, state, stage, 100, error.as_deref())
                    .await;
                let _ = done.send(result);
                return;
            }
        }
    }
}

/// Where a running task publishes its outcome (see [`Tasks::finish`]).
pub struct OutcomeSender(watch::Sender<Outcome>);

impl Tasks {
    pub fn new(store: Arc<dyn Store>) -> Tasks {
        Tasks {
            store,
            outcomes: Mutex::default(),
            writers: Mutex::default(),
            live: Mutex::default(),
            pause_at: std::env::var(PAUSE_AT_STEP_ENV)
                .ok()
                .filter(|stage| !stage.is_empty()),
        }
    }

    /// Records a new running task of `kind` (for `service`) that the server runs on its
    /// own (owner [`SERVER_OWNER`]); returns its id and where its outcome goes.
    pub async fn begin(
        &self,
        kind: &str,
        service: Option<String>,
    ) -> Result<(String, OutcomeSender), StoreError> {
        self.begin_as(kind, SERVER_OWNER, service).await
    }

    /// Records a new running task of `kind` (for `service`) started by user `owner`;
    /// returns its id and where its outcome goes. The task is cancellable from now until
    /// it ends ([`Tasks::cancellation`]).
    pub async fn begin_as(
        &self,
        kind: &str,
        owner: &str,
        service: Option<String>,
    ) -> Result<(String, OutcomeSender), StoreError> {
        let id = TaskId::generate().to_string();
        let sender = self.begin_with_id(&id, kind, owner, service).await?;
        Ok((id, sender))
    }

    /// [`Tasks::begin_as`] for an id the caller generated ([`TaskId::generate`]) and
    /// handed out before the record exists (a build that concurrent requests join).
    pub async fn begin_with_id(
        &self,
        id: &str,
        kind: &str,
        owner: &str,
        service: Option<String>,
    ) -> Result<OutcomeSender, StoreError> {
        let id = id.to_owned();
        let now = now_ms();
        self.store
            .insert_task(&TaskRecord {
                id: id.clone(),
                kind: kind.into(),
                owner: owner.into(),
                service,
                vm_id: None,
                state: TaskState::Running,
                stage: "queued".into(),
                percent: 0,
                error: None,
                created_at_ms: now,
                updated_at_ms: now,
                ended_at_ms: None,
            })
            .await?;
        self.live.lock().expect("live lock").insert(
            id.clone(),
            Live {
                kind: kind.to_owned(),
                token: CancellationToken::new(),
                step: None,
                cancellable: false,
            },
        );
        let (tx, rx) = watch::channel(None);
        self.outcomes.lock().expect("outcomes lock").insert(id, rx);
        Ok(OutcomeSender(tx))
    }

    /// Records how task `id` ended and tells its waiters: succeeded with the VM, or
    /// `failed`/`cancelled` (as [`Stopped::state`] says) with the message.
    pub async fn finish(
        &self,
        id: &str,
        sender: OutcomeSender,
        result: Result<VmRecord, (TaskState, String)>,
    ) {
        let (state, error) = match &result {
            Ok(_) => (TaskState::Succeeded, None),
            Err((state, message)) => (*state, Some(message.as_str())),
        };
        if let Err(err) = self.end(id, state, ended_stage(state), error).await {
            tracing::warn!(task = %id, error = %err, "cannot record task outcome");
        }
        sender
            .0
            .send_replace(Some(result.map_err(|(_, message)| message)));
    }

    /// Marks task `id` as acting on a cancel (from now on [`Tasks::cancel`] accepts it).
    pub(crate) fn mark_cancellable(&self, id: &str) {
        if let Some(live) = self.live.lock().expect("live lock").get_mut(id) {
            live.cancellable = true;
        }
    }

    /// Task `id`'s cancellation: cancelled when someone cancels the task. A task this
    /// process does not run gets a token never cancelled.
    pub fn cancellation(&self, id: &str) -> CancellationToken {
        self.live
            .lock()
            .expect("live lock")
            .get(id)
            .map(|live| live.token.clone())
            .unwrap_or_default()
    }

    /// Ends task `id`'s open step (succeeded) and starts the next, `stage` at `percent`;
    /// the task's record shows the stage. With [`PAUSE_AT_STEP_ENV`] naming `stage`, waits
    /// until the task is cancelled (tests only). Store errors are logged: a step's record
    /// never stops the work.
    pub async fn step(&self, id: &str, stage: &str, percent: u8) {
        let open = self
            .live
            .lock()
            .expect("live lock")
            .get_mut(id)
            .and_then(|live| live.step.take());
        let now = now_ms();
        if let Some(step) = open
            && let Err(err) = self
                .store
                .end_task_step(id, step, StepOutcome::Succeeded, None, now)
                .await
        {
            tracing::warn!(task = %id, error = %err, "cannot end task step");
        }
        match self.store.start_task_step(id, stage, percent, now).await {
            Ok(step) => {
                if let Some(live) = self.live.lock().expect("live lock").get_mut(id) {
                    live.step = Some(step);
                }
            }
            Err(err) => tracing::warn!(task = %id, error = %err, "cannot start task step"),
        }
        (self.progress(id))(stage, percent);
        if self.pause_at.as_deref() == Some(stage) {
            tracing::warn!(task = %id, stage, "{PAUSE_AT_STEP_ENV}: task held until cancelled");
            self.cancellation(id).cancelled().await;
        }
    }

    /// Records in task `id`'s journal how to undo the step about to run (before it runs:
    /// see the module's documentation).
    pub async fn record_undo(&self, id: &str, undo: &Undo) -> Result<u32, StoreError> {
        self.store.push_task_undo(id, &undo.encode()).await
    }

    /// Cancels task `id` for `user` (`admin`: any task): its work is interrupted, undone,
    /// and the task ends `cancelled`; returns the record as it was asked. Refused for an
    /// unknown task, someone else's, one ended or already rolling back, and one another
    /// server runs.
    pub async fn cancel(
        &self,
        id: &str,
        user: &str,
        admin: bool,
    ) -> Result<TaskRecord, CancelError> {
        let task = self
            .store
            .task(id)
            .await?
            .ok_or_else(|| CancelError::NotFound(id.to_owned()))?;
        if !admin && task.owner != user {
            return Err(CancelError::NotOwner {
                id: id.to_owned(),
                owner: task.owner,
            });
        }
        if task.state.ended() {
            return Err(CancelError::Ended {
                id: id.to_owned(),
                state: task.state.as_str(),
            });
        }
        if task.state == TaskState::RollingBack {
            return Err(CancelError::RollingBack {
                id: id.to_owned(),
                state: task.state.as_str(),
            });
        }
        let token = self
            .live
            .lock()
            .expect("live lock")
            .get(id)
            .filter(|live| live.cancellable)
            .map(|live| live.token.clone())
            .ok_or_else(|| CancelError::NotHere(id.to_owned()))?;
        tracing::info!(task = %id, by = user, "task cancelled");
        token.cancel();
        Ok(task)
    }

    /// Marks task `id` as undoing its steps (`why` is kept as its error meanwhile).
    pub(crate) async fn rolling_back(&self, id: &str, why: &str) {
        let writer = self.writers.lock().expect("writers lock").get(id).cloned();
        match writer {
            Some(writer) => {
                // Through the writer, after the progress queued before.
                let (done, written) = oneshot::channel();
                let _ = writer.send(Write::Mark {
                    why: why.to_owned(),
                    done,
                });
                let _ = written.await;
            }
            None => {
                if let Err(err) = self
                    .store
                    .update_task(id, TaskState::RollingBack, "rolling back", 100, Some(why))
                    .await
                {
                    tracing::warn!(task = %id, error = %err, "cannot record rollback");
                }
            }
        }
    }

    /// Drops task `id`'s outcome from memory.
    pub fn forget(&self, id: &str) {
        self.outcomes.lock().expect("outcomes lock").remove(id);
    }

    /// The outcome of task `id` as it comes, while it is kept in memory.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<Outcome>> {
        self.outcomes
            .lock()
            .expect("outcomes lock")
            .get(id)
            .cloned()
    }

    /// Waits for task `id` to end; `None` when its outcome is no longer kept.
    pub async fn outcome(&self, id: &str) -> Option<Result<VmRecord, String>> {
        let mut outcome = self.watch(id)?;
        outcome.wait_for(Option::is_some).await.ok()?.clone()
    }

    /// Records how task `id` ended (`percent` 100), after every progress update asked for
    /// before it; progress asked for later is not recorded.
    pub async fn end(
        &self,
        id: &str,
        state: TaskState,
        stage: &'static str,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let live = self.live.lock().expect("live lock").remove(id);
        if let Some(live) = &live {
            crate::metrics::task_ended(&live.kind, state);
        }
        let open = live.and_then(|live| live.step);
        if let Some(step) = open {
            let outcome = match state {
                TaskState::Succeeded => StepOutcome::Succeeded,
                _ => StepOutcome::Failed,
            };
            if let Err(err) = self
                .store
                .end_task_step(id, step, outcome, error, now_ms())
                .await
            {
                tracing::warn!(task = %id, error = %err, "cannot end task step");
            }
        }
        let writer = self.writers.lock().expect("writers lock").remove(id);
        if let Some(writer) = writer {
            let (done, ended) = oneshot::channel();
            let end = Write::End {
                state,
                stage,
                error: error.map(str::to_owned),
                done,
            };
            if writer.send(end).is_ok()
                && let Ok(result) = ended.await
            {
                return result;
            }
        }
        self.store.update_task(id, state, stage, 100, error).await
    }

    /// A progress callback for an operation inside task `id`: its stages and percents
    /// recorded on the task, in order, by the task's writer (the callback never waits on
    /// the store). The task must be ended with [`Tasks::end`] (or [`Tasks::finish`]).
    pub fn progress(&self, id: &str) -> ProgressFn {
        let writer = self
            .writers
            .lock()
            .expect("writers lock")
            .entry(id.to_owned())
            .or_insert_with(|| {
                let (writer, writes) = mpsc::unbounded_channel();
                tokio::spawn(write_task(self.store.clone(), id.to_owned(), writes));
                writer
            })
            .clone();
        Arc::new(move |stage: &str, percent: u8| {
            let _ = writer.send(Write::Progress(stage.to_owned(), percent));
        })
    }

    /// A progress callback for an image build inside task `id`: the build's stages, its
    /// percent mapped into `from..to` of the task.
    pub fn build_progress(&self, id: &str, from: u8, to: u8) -> ProgressFn {
        let progress = self.progress(id);
        Arc::new(move |stage: &str, percent: u8| {
            let scaled =
                from as u32 + (to.saturating_sub(from) as u32 * percent.min(100) as u32) / 100;
            progress(&format!("image: {stage}"), scaled as u8);
        })
    }
}

/// The stage an ended task shows.
fn ended_stage(state: TaskState) -> &'static str {
    match state {
        TaskState::Succeeded => "done",
        TaskState::Cancelled => "cancelled",
        _ => "failed",
    }
}

impl Manager {
    /// Records a creation task and starts it; returns its id. `guard` is held until the
    /// VM is made (shared requests wait on it instead of making their own).
    pub(crate) async fn start_create(
        self: &Arc<Self>,
        make: MakeVm,
        guard: Option<OwnedMutexGuard<()>>,
    ) -> Result<String, StoreError> {
        let kind = if make.template {
            "build_template"
        } else if make.pool.is_some() {
            "fill_pool"
        } else {
            "create_vm"
        };
        let service = make
            .service
            .as_ref()
            .map(|s| s.name.clone())
            .or_else(|| make.pool.clone());
        // A request's VM is its caller's; pool fills and templates are the server's.
        let owner = if kind == "create_vm" {
            make.owner.as_str()
        } else {
            SERVER_OWNER
        };
        let (task_id, sender) = self.tasks.begin_as(kind, owner, service).await?;
        if kind == "create_vm" {
            announce::announce(&task_id);
        }
        let manager = self.clone();
        let id = task_id.clone();
        tokio::spawn(async move {
            let result = manager.run_task(&id, manager.create(&id, &make)).await;
            manager.tasks.finish(&id, sender, result).await;
            drop(guard);
            tokio::time::sleep(OUTCOME_KEPT).await;
            manager.tasks.forget(&id);
        });
        Ok(task_id)
    }

    /// Runs `work` as task `id` (see the module's documentation): raced with the task's
    /// cancellation, its journal undone when it is cancelled or fails. The error is the
    /// state the task ends in (`cancelled` or `failed`) and why.
    pub(crate) async fn run_task<T>(
        &self,
        id: &str,
        work: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, (TaskState, String)> {
        self.tasks.mark_cancellable(id);
        let token = self.tasks.cancellation(id);
        let stopped = tokio::select! {
            biased;
            () = token.cancelled() => Stopped::Cancelled,
            result = work => match result {
                Ok(done) => return Ok(done),
                Err(reason) => Stopped::Failed(reason),
            },
        };
        Err(self.stop_task(id, &stopped).await)
    }

    /// Undoes task `id` for `stopped` (it goes `rolling_back` meanwhile); returns the state
    /// it ends in and its error (with what could not be undone, if anything).
    pub(crate) async fn stop_task(&self, id: &str, stopped: &Stopped) -> (TaskState, String) {
        let started = std::time::Instant::now();
        self.tasks.rolling_back(id, &stopped.message()).await;
        let mut message = stopped.message();
        if let Err(err) = self.roll_back(id, stopped).await {
            message = format!("{message}; {err}");
        }
        tracing::info!(task = %id, state = stopped.state().as_str(), rollback_ms = started.elapsed().as_millis() as u64, "task stopped and undone");
        (stopped.state(), message)
    }

    /// Records `op`, an operation on VM `vm` that is not cancellable (an archive, a wake), as
    /// a task of `kind` owned by the VM's owner: running while it runs, then ended with
    /// its outcome. A store error on the record is logged; the operation runs regardless.
    pub(crate) async fn recorded<T, E: std::error::Error>(
        &self,
        kind: &str,
        vm: &VmRecord,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let service = vm.services.first().cloned();
        self.recorded_as(kind, &vm.owner, service, Some(&vm.id), op)
            .await
    }

    /// Records `op`, an operation that is not cancellable (an export, or one on VM `vm`),
    /// as a task of `kind` owned by `owner` (for `service`): running while it runs, then
    /// ended with its outcome and error chain. A store error on the record is logged; the
    /// operation runs regardless.
    pub(crate) async fn recorded_as<T, E: std::error::Error>(
        &self,
        kind: &str,
        owner: &str,
        service: Option<String>,
        vm: Option<&str>,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let task = match self.tasks.begin_as(kind, owner, service).await {
            Ok((task, _)) => {
                if let Some(vm) = vm
                    && let Err(err) = self.store.set_task_vm(&task, vm).await
                {
                    tracing::warn!(task = %task, error = %err, "cannot link task to vm");
                }
                Some(task)
            }
            Err(err) => {
                tracing::warn!(kind, error = %err, "cannot record task");
                None
            }
        };
        let result = op.await;
        if let Some(task) = task {
            let (state, error) = match &result {
                Ok(_) => (TaskState::Succeeded, None),
                Err(err) => (TaskState::Failed, Some(crate::api::error::error_chain(err))),
            };
            if let Err(err) = self
                .tasks
                .end(&task, state, ended_stage(state), error.as_deref())
                .await
            {
                tracing::warn!(task = %task, error = %err, "cannot record task outcome");
            }
            self.tasks.forget(&task);
        }
        result
    }

    /// Waits for a task started by [`Manager::start_create`] to end.
    pub(crate) async fn task_outcome(&self, task: &str) -> Option<Result<VmRecord, String>> {
        self.tasks.outcome(task).await
    }
}

#[cfg(test)]
mod tests;
