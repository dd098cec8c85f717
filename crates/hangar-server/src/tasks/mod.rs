//! Tasks: long operations (making a VM, building an image or a template) recorded in the
//! store with their stage and percent, and the outcome the requests waiting on them read.

use crate::store_wait::Wait;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::TaskId;
use hangar_store::{TaskRecord, TaskState, VmRecord, now_ms};
use tokio::sync::{OwnedMutexGuard, watch};

use crate::api::error::ApiError;
use crate::images::ProgressFn;
use crate::manager::Manager;
use crate::requests::MakeVm;

impl Manager {
    /// Records a creation task and starts it; returns its id.
    pub(crate) fn start_create(
        self: &Arc<Self>,
        make: MakeVm,
        guard: Option<OwnedMutexGuard<()>>,
    ) -> Result<String, ApiError> {
        let task_id = TaskId::generate().to_string();
        let now = now_ms();
        self.store
            .insert_task(&TaskRecord {
                id: task_id.clone(),
                kind: if make.template {
                    "build_template"
                } else if make.pool.is_some() {
                    "fill_pool"
                } else {
                    "create_vm"
                }
                .into(),
                service: make
                    .service
                    .as_ref()
                    .map(|s| s.name.clone())
                    .or_else(|| make.pool.clone()),
                vm_id: None,
                state: TaskState::Running,
                stage: "queued".into(),
                percent: 0,
                error: None,
                created_at_ms: now,
                updated_at_ms: now,
            })
            .wait()?;
        let (tx, rx) = watch::channel(None);
        self.outcomes
            .lock()
            .expect("outcomes lock")
            .insert(task_id.clone(), rx);
        let manager = self.clone();
        let id = task_id.clone();
        tokio::spawn(async move {
            let result = manager.create(&id, &make).await;
            let (state, stage, error) = match &result {
                Ok(_) => (TaskState::Succeeded, "done", None),
                Err(message) => (TaskState::Failed, "failed", Some(message.as_str())),
            };
            if let Err(err) = manager
                .store
                .update_task(&id, state, stage, 100, error)
                .await
            {
                tracing::warn!(task = %id, error = %err, "cannot record task outcome");
            }
            tx.send_replace(Some(result));
            drop(guard);
            // Late waiters read the outcome from the store; keep the map small.
            tokio::time::sleep(Duration::from_secs(60)).await;
            manager.outcomes.lock().expect("outcomes lock").remove(&id);
        });
        Ok(task_id)
    }

    /// Waits for a task started by [`Manager::start_create`] to end.
    pub(crate) async fn task_outcome(&self, task: &str) -> Option<Result<VmRecord, String>> {
        let mut outcome = self
            .outcomes
            .lock()
            .expect("outcomes lock")
            .get(task)
            .cloned()?;
        outcome.wait_for(Option::is_some).await.ok()?.clone()
    }

    /// A progress callback for a host operation inside a task: its stages and percents
    /// recorded on the task.
    pub(crate) fn task_progress(&self, task: &str) -> ProgressFn {
        let store = self.store.clone();
        let task = task.to_owned();
        Arc::new(move |stage: &str, percent: u8| {
            if let Err(err) = store
                .update_task(&task, TaskState::Running, stage, percent, None)
                .wait()
            {
                tracing::warn!(task = %task, error = %err, "cannot record task progress");
            }
        })
    }

    /// A progress callback for an image build inside a task: the build's stages, its
    /// percent mapped into `from..to` of the task.
    pub(crate) fn build_progress(&self, task: &str, from: u8, to: u8) -> ProgressFn {
        let progress = self.task_progress(task);
        Arc::new(move |stage: &str, percent: u8| {
            let scaled =
                from as u32 + (to.saturating_sub(from) as u32 * percent.min(100) as u32) / 100;
            progress(&format!("image: {stage}"), scaled as u8);
        })
    }
}
