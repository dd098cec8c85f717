//! `GET /v1/tasks`, `GET /v1/tasks/{id}`, `POST /v1/tasks/{id}/cancel` and
//! `DELETE /v1/tasks/{id}`.

use serde::{Deserialize, Serialize};

/// A long operation and its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    pub id: String,
    /// `create_vm`, `fill_pool`, `build_template`, `build_image`, `import`, ...
    pub kind: String,
    /// Who started it: a user, or `hangar` for the server's own work.
    #[serde(default)]
    pub owner: String,
    pub service: Option<String>,
    pub vm: Option<String>,
    /// `running`, `rolling_back` (cancelled or failed, its steps being undone),
    /// `succeeded`, `failed` or `cancelled`.
    pub state: String,
    pub stage: String,
    pub percent: u8,
    /// Why it failed (the error and its causes), or that it was cancelled.
    pub error: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// RFC 3339; none while it runs.
    #[serde(default)]
    pub ended_at: Option<String>,
    /// Its steps in order (only in `GET /v1/tasks/{id}`; empty in lists).
    #[serde(default)]
    pub steps: Vec<TaskStepView>,
}

impl TaskView {
    /// Whether the task is over: nothing of it runs any more.
    pub fn ended(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// One step of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskStepView {
    /// 1, 2, ... in order.
    pub step: u32,
    pub stage: String,
    /// The task's percent when the step started.
    pub percent: u8,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339; none while it runs.
    pub ended_at: Option<String>,
    /// `succeeded`, `failed`, or `rolled_back` (undone after a cancel or a later failure).
    pub outcome: Option<String>,
    pub error: Option<String>,
}
