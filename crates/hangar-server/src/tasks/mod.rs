//! Tasks: long operations (making a VM, building an image or a template) recorded in the
//! store with their stage and percent, and the outcome the requests waiting on them read.
//!
//! [`Tasks`] keeps the records and the outcomes; `Manager::start_create` runs a creation
//! as a task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::TaskId;
use hangar_store::{Store, StoreError, TaskRecord, TaskState, VmRecord, now_ms};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot, watch};

use crate::images::ProgressFn;
use crate::manager::Manager;
use crate::requests::{MakeVm, Outcome};

/// How long a finished task's outcome stays for waiters in memory; later ones read the
/// store.
const OUTCOME_KEPT: Duration = Duration::from_secs(60);

/// The tasks of this server: their records in the store and the outcomes of those that
/// run or ended lately.
pub struct Tasks {
    store: Arc<dyn Store>,
    outcomes: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
    /// Per running task, the queue of its record's writer (see [`Tasks::progress`]).
    writers: Mutex<HashMap<String, mpsc::UnboundedSender<Write>>>,
}

/// One write to a task's record, in the order it was asked for.
enum Write {
    Progress(String, u8),
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
    while let Some(write) = writes.recv().await {
        match write {
            Write::Progress(stage, percent) => {
                if let Err(err) = store
                    .update_task(&task, TaskState::Running, &stage, percent, None)
                    .await
                {
                    tracing::warn!(task = %task, error = %err, "cannot record task progress");
                }
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
        }
    }

    /// Records a new running task of `kind` (for `service`); returns its id and where its
    /// outcome goes.
    pub async fn begin(
        &self,
        kind: &str,
        service: Option<String>,
    ) -> Result<(String, OutcomeSender), StoreError> {
        let id = TaskId::generate().to_string();
        let now = now_ms();
        self.store
            .insert_task(&TaskRecord {
                id: id.clone(),
                kind: kind.into(),
                service,
                vm_id: None,
                state: TaskState::Running,
                stage: "queued".into(),
                percent: 0,
                error: None,
                created_at_ms: now,
                updated_at_ms: now,
            })
            .await?;
        let (tx, rx) = watch::channel(None);
        self.outcomes
            .lock()
            .expect("outcomes lock")
            .insert(id.clone(), rx);
        Ok((id, OutcomeSender(tx)))
    }

    /// Records how task `id` ended and tells its waiters.
    pub async fn finish(&self, id: &str, sender: OutcomeSender, result: Result<VmRecord, String>) {
        let (state, stage, error) = match &result {
            Ok(_) => (TaskState::Succeeded, "done", None),
            Err(message) => (TaskState::Failed, "failed", Some(message.as_str())),
        };
        if let Err(err) = self.end(id, state, stage, error).await {
            tracing::warn!(task = %id, error = %err, "cannot record task outcome");
        }
        sender.0.send_replace(Some(result));
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
        let (task_id, sender) = self.tasks.begin(kind, service).await?;
        let manager = self.clone();
        let id = task_id.clone();
        tokio::spawn(async move {
            let result = manager.create(&id, &make).await;
            manager.tasks.finish(&id, sender, result).await;
            drop(guard);
            tokio::time::sleep(OUTCOME_KEPT).await;
            manager.tasks.forget(&id);
        });
        Ok(task_id)
    }

    /// Waits for a task started by [`Manager::start_create`] to end.
    pub(crate) async fn task_outcome(&self, task: &str) -> Option<Result<VmRecord, String>> {
        self.tasks.outcome(task).await
    }
}
