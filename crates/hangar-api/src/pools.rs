//! `GET /v1/pools` and `PUT /v1/pools/{name}`.

use hangar_core::ReadySpec;
use serde::{Deserialize, Serialize};

/// One pool as `GET /v1/pools` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolView {
    pub name: String,
    /// The service its VMs offer; none for pre-OS hardware shells.
    pub service: Option<String>,
    pub vcpus: u32,
    /// Memory of each VM.
    pub vm_memory_mib: u32,
    pub min: u32,
    pub max: u32,
    /// What the pool aims to hold now (between min and max, from the request rate).
    pub target: u32,
    /// Paused VMs ready to hand out.
    pub ready: u32,
    /// VMs being booted for the pool.
    pub booting: u32,
    /// Memory held by the pool's ready and booting VMs.
    pub memory_mib: u64,
    /// Requests per minute served or wanted from this pool (EWMA).
    pub rate_per_min: f64,
    /// The ready criterion set at run time for this pool's fills, if any (else the
    /// service's from the catalog).
    #[schema(value_type = Option<Object>)]
    pub ready_criterion: Option<ReadySpec>,
}

/// Changes to a pool; fields left out stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolBoundsBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// Raised to `min` when needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// The ready criterion the pool's VMs must meet before they are paused (same form as a
    /// service's `ready` in the catalog); `null` goes back to the service's.
    #[serde(
        default,
        deserialize_with = "crate::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<Object>)]
    pub ready: Option<Option<ReadySpec>>,
}
