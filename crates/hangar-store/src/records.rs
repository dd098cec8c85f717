//! The records the store keeps. Plain data: no backend types.

use std::collections::BTreeMap;

use hangar_core::{Mode, VmState};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// One row of the state table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    /// Host the VM runs on (`local` in single-node mode).
    pub host: String,
    /// Services the VM offers.
    pub services: Vec<String>,
    /// Environment the VM was made for (shared requests only match equal environments).
    pub env: BTreeMap<String, String>,
    pub mode: Mode,
    /// Who the VM was made for, as the caller that created it said.
    pub owner: String,
    pub state: VmState,
    /// Port name → `HOST:PORT` clients are given: stable while the VM sleeps, is archived
    /// and wakes (hangar's forwarder holds them).
    pub endpoints: BTreeMap<String, String>,
    /// Port name → `HOST:PORT` of the VM's own port forwards behind `endpoints` (equal to
    /// them when no forwarder is used); these answer only while the VM's process runs.
    pub direct_endpoints: BTreeMap<String, String>,
    /// Backend launch spec (opaque to the store), kept so a restarted server can adopt.
    pub spec: serde_json::Value,
    pub pid: Option<u32>,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Last time it was granted, woken, or used through its endpoint.
    pub last_used_at_ms: u64,
    /// When it entered its current state (set by every state change).
    pub state_since_ms: u64,
    /// Launch → ready, when it booted.
    pub boot_ms: Option<u64>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The warm pool holding this VM while it is paused and unclaimed.
    pub pool: Option<String>,
    /// OS name and version; `None` for a hardware shell with no OS attached yet.
    pub os: Option<(String, String)>,
    /// The isolation group it was placed in: no other VM of the group shares its host.
    pub isolation: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Running,
    /// Cancelled or failed, its done steps being undone (see [`TaskUndo`]).
    RollingBack,
    Succeeded,
    Failed,
    /// Stopped on request, its done steps undone.
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::RollingBack => "rolling_back",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Whether the task is over (succeeded, failed or cancelled): nothing of it runs.
    pub fn ended(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }

    pub(crate) fn parse(s: &str) -> Result<TaskState, StoreError> {
        match s {
            "running" => Ok(TaskState::Running),
            "rolling_back" => Ok(TaskState::RollingBack),
            "succeeded" => Ok(TaskState::Succeeded),
            "failed" => Ok(TaskState::Failed),
            "cancelled" => Ok(TaskState::Cancelled),
            other => Err(StoreError::corrupt(other)),
        }
    }
}

/// A long operation (VM creation, ...), with progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    /// What the task does, e.g. `create_vm`.
    pub kind: String,
    /// Who started it: the caller's user name, `hangar` for the server's own work (pool
    /// fills, templates, the lifecycle loop).
    pub owner: String,
    pub service: Option<String>,
    pub vm_id: Option<String>,
    pub state: TaskState,
    /// Current step, e.g. `assets`, `image`, `launch`, `boot`, `ready`.
    pub stage: String,
    pub percent: u8,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// When it ended (set by the update that gives it an ended state).
    pub ended_at_ms: Option<u64>,
}

/// One entry of a task's undo journal: how to undo a step the task did, recorded when the
/// step was done, undone in reverse order when the task is cancelled or fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUndo {
    pub task_id: String,
    /// 1, 2, ... in the order the entries were recorded.
    pub seq: u32,
    /// The undo action and its arguments, as its owner encoded it (JSON in the server).
    pub action: String,
    /// Whether it was undone already.
    pub done: bool,
}

/// How one step of a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Succeeded,
    Failed,
    /// Undone after a later step failed.
    RolledBack,
}

impl StepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Succeeded => "succeeded",
            StepOutcome::Failed => "failed",
            StepOutcome::RolledBack => "rolled_back",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<StepOutcome, StoreError> {
        match s {
            "succeeded" => Ok(StepOutcome::Succeeded),
            "failed" => Ok(StepOutcome::Failed),
            "rolled_back" => Ok(StepOutcome::RolledBack),
            other => Err(StoreError::corrupt(other)),
        }
    }
}

/// One step of a task: when it started and ended and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStep {
    pub task_id: String,
    /// 1, 2, ... in the order the task started its steps.
    pub step: u32,
    pub stage: String,
    /// The task's progress when the step started.
    pub percent: u8,
    pub started_at_ms: u64,
    /// `None` while the step runs.
    pub ended_at_ms: Option<u64>,
    pub outcome: Option<StepOutcome>,
    pub error: Option<String>,
}

/// Whether a host takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Up,
    /// Keeps what runs there, takes nothing new.
    Draining,
    /// Not answering.
    Down,
    /// Missed heartbeats long enough that its VMs were declared lost.
    Lost,
}

impl HostState {
    /// Its text: `up`, `draining`, `down`, `lost`.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Draining => "draining",
            HostState::Down => "down",
            HostState::Lost => "lost",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<HostState, StoreError> {
        match s {
            "up" => Ok(HostState::Up),
            "draining" => Ok(HostState::Draining),
            "down" => Ok(HostState::Down),
            "lost" => Ok(HostState::Lost),
            other => Err(StoreError::corrupt(other)),
        }
    }
}

/// A VM moved to another host ([`crate::Store::move_vm`]): where it runs from now on and
/// what that host made of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMove {
    pub id: String,
    /// The host it is recorded on now; the move is refused if it is on another.
    pub from: String,
    /// The state it must be in now (and stays in); the move is refused otherwise.
    pub state: VmState,
    pub to: String,
    /// Its process on `to`, if it has one there.
    pub pid: Option<u32>,
    /// Its launch record on `to`.
    pub spec: serde_json::Value,
    /// Its own port forwards on `to` (its stable endpoints do not change).
    pub direct_endpoints: BTreeMap<String, String>,
}

/// What the VMs recorded on one host take of it, summed ([`crate::Store::vm_use_by_host`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUse {
    pub host: String,
    pub vms: u32,
    pub vcpus: u64,
    pub memory_mib: u64,
    /// The isolation groups of those VMs, each once, in order.
    pub groups: Vec<String>,
}

impl HostUse {
    /// From the store's sums (count, vCPUs, memory), which are never negative, and the
    /// distinct isolation groups joined by commas (group names hold none), if any.
    pub(crate) fn from_sums(
        host: String,
        [vms, vcpus, memory_mib]: [i64; 3],
        groups: Option<String>,
    ) -> Result<HostUse, crate::StoreError> {
        let number = |value: i64| {
            u64::try_from(value).map_err(|_| crate::StoreError::corrupt(&value.to_string()))
        };
        Ok(HostUse {
            host,
            vms: u32::try_from(number(vms)?).unwrap_or(u32::MAX),
            vcpus: number(vcpus)?,
            memory_mib: number(memory_mib)?,
            groups: {
                let mut groups: Vec<String> = groups
                    .iter()
                    .flat_map(|joined| joined.split(','))
                    .filter(|group| !group.is_empty())
                    .map(str::to_owned)
                    .collect();
                groups.sort();
                groups.dedup();
                groups
            },
        })
    }
}

/// A machine VMs run on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Unique name (`local` in single-node mode).
    pub name: String,
    /// Where the control plane reaches it (empty for the in-process local host).
    pub address: String,
    pub state: HostState,
    /// Capacity and facts as the host last reported them (opaque to the store).
    pub facts: serde_json::Value,
    pub last_heartbeat_ms: u64,
}

/// A template (a booted, paused VM image clones are made from) held on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Unique key (identifies the service and the inputs it was made from).
    pub key: String,
    pub service: String,
    pub host: String,
    /// Digest of what the template was made from.
    pub hash: String,
    pub size_bytes: u64,
    pub created_at_ms: u64,
    pub last_used_at_ms: u64,
}

/// An archived VM's saved state: where it lies and how big it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    pub vm_id: String,
    /// Storage tier, e.g. `local-disk`.
    pub tier: String,
    pub size_bytes: u64,
    pub host: String,
    pub created_at_ms: u64,
}

/// A machine imported from a disk image: its model disk in the server's model store and
/// how it boots and what it serves (the server's own JSON, read back as it wrote it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportRecord {
    /// The model's (and its service's) name; unique.
    pub name: String,
    /// The user who imported it.
    pub owner: String,
    /// The format it was uploaded in (`qcow2`, `raw`, `vmdk`).
    pub format: String,
    /// Layout, ports, size and the rest of what the server needs to boot it.
    pub spec: serde_json::Value,
    /// Bytes the stored model disk takes.
    pub disk_bytes: u64,
    pub created_at_ms: u64,
}
