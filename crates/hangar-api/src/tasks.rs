//! `GET /v1/tasks` and `GET /v1/tasks/{id}`.

use serde::{Deserialize, Serialize};

/// A long operation and its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    pub id: String,
    pub kind: String,
    pub service: Option<String>,
    pub vm: Option<String>,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    pub stage: String,
    pub percent: u8,
    pub error: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}
