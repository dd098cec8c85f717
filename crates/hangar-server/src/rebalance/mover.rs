//! The server's [`Mover`]: the migration entry point, then the task's end.

use std::sync::Arc;

use hangar_store::TaskState;

use super::Mover;
use crate::api::error::error_chain;
use crate::manager::Manager;

/// Moves a VM with [`crate::migration::migrate`] as the server's own owner (`hangar`) and
/// waits for its `migrate` task to end.
pub struct MigrationMover(pub Arc<Manager>);

#[async_trait::async_trait]
impl Mover for MigrationMover {
    async fn migrate(&self, vm: &str, to: &str) -> Result<(), String> {
        let manager = &self.0;
        let task = crate::migration::migrate(manager, vm, to, crate::tasks::SERVER_OWNER)
            .await
            .map_err(|err| error_chain(&err))?;
        match manager.tasks.outcome(&task).await {
            Some(Ok(_)) => Ok(()),
            Some(Err(err)) => Err(format!("task {task}: {err}")),
            // The outcome is no longer kept: the store has how the task ended.
            None => match manager.store.task(&task).await {
                Ok(Some(record)) if record.state == TaskState::Succeeded => Ok(()),
                Ok(Some(record)) => Err(format!(
                    "task {task} {}: {}",
                    record.state.as_str(),
                    record.error.unwrap_or_default()
                )),
                Ok(None) => Err(format!("task {task} is gone")),
                Err(err) => Err(format!("task {task}: {}", error_chain(&err))),
            },
        }
    }
}
