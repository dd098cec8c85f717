//! The farm: agents registering and reporting to the control plane (`POST /v1/hosts`,
//! `POST /v1/hosts/{name}/heartbeat`), and the hosts as operators see them
//! (`GET /v1/hosts`).
//!
//! Agents authenticate with the farm token (`Authorization: Bearer <token>`); the server
//! authenticates to agents with the same token.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a host has now, as its agent measures it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostFactsView {
    /// `qemu` or `fake`.
    pub hypervisor: String,
    /// Logical CPUs of the machine.
    pub vcpus: u32,
    pub memory_mib: u64,
    pub free_memory_mib: u64,
    pub free_disk_mib: u64,
    /// One-minute load average.
    pub load: f64,
    /// Templates held, by id (`<service>-<key>`).
    #[serde(default)]
    pub templates: Vec<String>,
    /// Image layers and guest assets held, by content hash (sha256).
    #[serde(default)]
    pub blobs: Vec<String>,
    /// Service roots held whole, as `service@os`: placement prefers these hosts.
    #[serde(default)]
    pub images: Vec<String>,
}

/// One VM with a process (or an archive) on a host, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostVmView {
    pub id: String,
    /// `running`, `paused` or `stopped`.
    pub state: String,
}

/// `POST /v1/hosts`: an agent says it is there (at start, and again whenever the server
/// does not know it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostRegistration {
    /// Unique in the farm; letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The agent's API, `http://ADDR:PORT`, as the control plane reaches it.
    pub address: String,
    /// Changes every time the agent process starts (the server tells restarts apart).
    pub incarnation: String,
    /// Labels placement constraints match (`--on k=v`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Relative cost of a VM-hour here (lower is cheaper).
    #[serde(default = "default_cost")]
    pub cost: u32,
    /// Operator preference: higher is filled first.
    #[serde(default)]
    pub priority: i32,
    pub facts: HostFactsView,
    /// The VMs the agent finds on its host.
    #[serde(default)]
    pub vms: Vec<HostVmView>,
}

fn default_cost() -> u32 {
    1
}

/// `POST /v1/hosts/{name}/heartbeat`, every second or two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The incarnation the agent registered with.
    pub incarnation: String,
    pub facts: HostFactsView,
    pub vms: Vec<HostVmView>,
}

/// The server's answer to a registration or heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatReply {
    /// The host's state as the control plane sees it.
    pub state: String,
    /// VMs on this host that the control plane replaced while it could not reach the
    /// host (fenced): the agent destroys them now.
    pub destroy: Vec<String>,
    /// The control plane's API addresses, leader first; agents fall back to the others.
    pub servers: Vec<String>,
}

/// One host as `GET /v1/hosts` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostView {
    pub name: String,
    /// The agent's API address (empty for the server's own host).
    pub address: String,
    /// `up`, `draining`, `down` or `lost`.
    pub state: String,
    pub labels: BTreeMap<String, String>,
    pub cost: u32,
    pub priority: i32,
    pub vcpus: u32,
    /// vCPUs of the VMs placed here.
    pub vcpus_used: u32,
    pub memory_mib: u64,
    /// Memory of the VMs placed here.
    pub memory_used_mib: u64,
    /// VMs placed here and not deleted, by state.
    pub vms: BTreeMap<String, u32>,
    pub load: f64,
    /// Milliseconds since the Unix epoch of the last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Seconds since the last heartbeat, when the server answered.
    pub heartbeat_age_s: f64,
    pub facts: HostFactsView,
}
