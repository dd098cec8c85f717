//! `POST /v1/requests`: the answer to a service request.

use std::collections::BTreeMap;

use hangar_core::matching::MatchKind;
use hangar_core::{Mode, VmState};
use serde::{Deserialize, Serialize};

/// How a request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// An active VM already offering the service (shared mode).
    Shared,
    /// A paused pool VM of exactly the requested configuration.
    Exact,
    /// A paused pool VM with more than requested (sliced down with `exact_size`).
    Superset,
    /// A pre-OS hardware shell, given the requested OS image and booted.
    Partial,
    /// A new VM, booted for this request.
    Created,
    /// A new VM, cloned for this request from its service's template (restored at the
    /// ready state instead of booted).
    Cloned,
    /// A sleeping or archived VM already offering the service (shared mode), woken.
    Woken,
}

impl From<MatchKind> for Served {
    fn from(kind: MatchKind) -> Served {
        match kind {
            MatchKind::Exact => Served::Exact,
            MatchKind::Superset => Served::Superset,
            MatchKind::Partial => Served::Partial,
        }
    }
}

/// The answer to a request: where the VM answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GrantView {
    pub vm: String,
    pub service: String,
    /// `HOST:PORT` of the service's first port: stable while the VM sleeps, is archived
    /// and wakes; a connection to a VM that does not run wakes it.
    pub endpoint: String,
    /// Port name → stable `HOST:PORT`.
    pub endpoints: BTreeMap<String, String>,
    /// The VM's own port forward behind `endpoint`, answering only while the VM runs (for
    /// measurement and debugging).
    pub direct_endpoint: String,
    /// Port name → direct `HOST:PORT`.
    pub direct_endpoints: BTreeMap<String, String>,
    /// `<vm>.<domain>`, when the server has a DNS domain.
    pub dns_name: Option<String>,
    pub state: VmState,
    pub host: String,
    pub mode: Mode,
    /// How the request was served: `shared`, `exact`, `superset`, `partial` or `created`.
    #[serde(rename = "match")]
    pub served: Served,
    /// An existing active VM answered (shared mode).
    pub reused: bool,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The size a superset VM was sliced to (`exact_size`).
    pub sliced_to: Option<SliceView>,
    /// The creation task, when a VM was made.
    pub task: Option<String>,
    /// Launch → ready of the VM.
    pub boot_ms: Option<u64>,
    /// Why `host` was chosen, in one line (e.g. `least loaded among 3 eligible hosts (load
    /// 12%, cost 1); holds the template; 1 ruled out: b (no room: 256 MiB free)`), when a
    /// VM was placed for this request; `None` when an existing VM answered.
    #[serde(default)]
    pub placement: Option<String>,
    /// The applications installed at deploy (seed 003 claim 1): given to a pre-OS shell
    /// as their read-only layers over the OS layer when it was handed out (`match:
    /// partial`), instead of a new image built for them. Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installed_at_deploy: Vec<String>,
    /// For a configuration request: which kind of candidate served it and why, in one
    /// line (the heuristics engine's choice; see `POST /v1/requests/check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<ChosenView>,
    /// What the VM's guest may reach out of it (for `allow`: where it reaches each target).
    #[serde(default)]
    pub egress: crate::vms::EgressView,
}

/// The candidate a configuration request was served by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChosenView {
    pub kind: hangar_core::heuristics::CandidateKind,
    /// What it was: a pool VM's id, `template SERVICE`, `image SERVICE`, ...
    pub source: String,
    pub reason: String,
}

/// A VM's size after slicing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SliceView {
    pub vcpus: u32,
    pub memory_mib: u32,
}
