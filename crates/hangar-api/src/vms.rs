//! `GET /v1/vms`, `GET|DELETE /v1/vms/{id}` and
//! `POST /v1/vms/{id}/{sleep,archive,wake,migrate}`.

use std::collections::BTreeMap;

use hangar_core::{Mode, TierChoice, VmState};
use serde::{Deserialize, Serialize};

/// One row of the state table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmView {
    pub id: String,
    pub host: String,
    pub services: Vec<String>,
    /// Port name → stable `HOST:PORT` (wakes the VM on connection).
    pub endpoints: BTreeMap<String, String>,
    /// Port name → the VM's own port forward (answers only while it runs).
    pub direct_endpoints: BTreeMap<String, String>,
    pub state: VmState,
    pub mode: Mode,
    pub owner: String,
    pub env: BTreeMap<String, String>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The warm pool holding it, while it is paused there.
    pub pool: Option<String>,
    /// `NAME VERSION`; none for a hardware shell with no OS yet.
    pub os: Option<String>,
    pub pid: Option<u32>,
    pub error: Option<String>,
    /// The memory archive of an archived VM.
    pub archive: Option<ArchiveView>,
    /// RFC 3339.
    pub created_at: String,
    /// Last time it was granted, woken, or used through its endpoint (RFC 3339).
    pub last_used_at: String,
    /// Milliseconds since then.
    pub idle_ms: u64,
    /// When it entered its current state (RFC 3339).
    pub state_since: String,
    pub boot_ms: Option<u64>,
    /// The host it is being migrated to, while a migration runs (`host` is where it is
    /// until the migration ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
    /// What its guest may reach out of it.
    #[serde(default)]
    pub egress: EgressView,
}

/// A VM's egress policy as shown: its name and, for `allow`, where its guest reaches each
/// allowed target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressView {
    /// `none` (no connection out), `allow`, `segment` (a stack member: `none` on its
    /// user-mode NIC) or `open` (anywhere the host reaches).
    pub policy: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressForwardView>,
}

/// One allowed egress target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressForwardView {
    /// `HOST:PORT` as allowed: where the host connects on the guest's behalf.
    pub target: String,
    /// `ADDRESS:PORT` the guest connects to.
    pub guest: String,
    /// The name the guest's `/etc/hosts` gives `guest`'s address, when the target has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl From<&hangar_core::EgressPolicy> for EgressView {
    fn from(policy: &hangar_core::EgressPolicy) -> EgressView {
        EgressView {
            policy: policy.kind().to_owned(),
            allow: policy
                .forwards()
                .into_iter()
                .map(|forward| EgressForwardView {
                    target: forward.target.to_string(),
                    guest: format!("{}:{}", forward.guest, forward.port),
                    name: forward.target.name().map(str::to_owned),
                })
                .collect(),
        }
    }
}

/// A VM's memory archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArchiveView {
    /// `raw`, `zstd` or `delta`.
    pub tier: String,
    pub size_bytes: u64,
    /// Guest memory it holds.
    pub memory_mib: u32,
    /// How long writing it took.
    pub took_ms: u64,
}

/// The query string of `GET /v1/vms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmQuery {
    /// Include deleted VMs.
    #[serde(default)]
    pub all: bool,
}

/// How to archive (`POST /v1/vms/{id}/archive`; an empty body means the default tier).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveBody {
    /// `raw`, `zstd` (default), or `delta` (only what differs from the template the VM was
    /// cloned from; a VM not cloned from one is archived with `zstd`).
    #[serde(default)]
    pub tier: TierChoice,
}

/// Where to move a VM (`POST /v1/vms/{id}/migrate`, admins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The farm host to move it to.
    pub to: String,
}
