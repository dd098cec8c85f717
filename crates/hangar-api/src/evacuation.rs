//! Draining, resuming and evacuating a farm host (admins only):
//! `POST /v1/hosts/{name}/drain`, `POST /v1/hosts/{name}/resume`,
//! `POST /v1/hosts/{name}/evacuate` (an `evacuate` task) and
//! `GET /v1/hosts/{name}/evacuation` (what the last evacuation of the host did, VM by VM).

use serde::{Deserialize, Serialize};

/// A host's state after a drain or a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostStateView {
    pub name: String,
    /// `draining` or `up`.
    pub state: String,
    /// Paused pool VMs of the host removed by this call (their pools refill on other
    /// hosts); always 0 for a resume.
    pub pool_vms_removed: u32,
}

/// An evacuation of a host: every VM it moved or tried to move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvacuationView {
    /// The host being emptied.
    pub host: String,
    /// The `evacuate` task (`GET /v1/tasks/{id}` for its state and progress).
    pub task: String,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// Paused pool VMs removed from the host (their pools refill elsewhere).
    pub pool_vms_removed: u32,
    /// VMs moved to another host.
    pub moved: u32,
    /// VMs that could not be moved (they stay on the host, which stays draining).
    pub failed: u32,
    /// Milliseconds from the task's start to its end (or to now while it runs).
    pub elapsed_ms: u64,
    /// Each active, sleeping and archived VM the host held when the evacuation started.
    pub vms: Vec<EvacuatedVmView>,
}

/// One VM of an evacuation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvacuatedVmView {
    pub vm: String,
    /// The VM's state when the evacuation listed it (`active`, `sleeping`, `archived`).
    pub state: String,
    pub from: String,
    /// The host chosen for it (none while it waits, or when no host could take it).
    pub to: Option<String>,
    /// `pending`, `moving`, `moved`, `failed`, or `skipped` (the evacuation was cancelled
    /// before it started).
    pub outcome: String,
    /// Why it did not move.
    pub error: Option<String>,
    /// How long its move took.
    pub took_ms: Option<u64>,
}
