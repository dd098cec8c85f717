//! `POST /v1/placements`: where a VM would go now, and why, without making anything (a
//! dry run of the placement every creation and pool fill makes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What to place: a service of the catalog (its size, and which hosts hold its template),
/// or a bare size. A size given with a service overrides the service's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementBody {
    /// A service from the catalog. Without one, give `vcpus` and `memory_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// vCPUs of the VM [default: the service's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory of the VM [default: the service's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Environment settings, as a request gives them (`os=...`, the service's settings);
    /// checked as a request's are.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Place it as a pool fill (low priority: packs hosts) rather than as a request's VM
    /// (high priority: the least loaded host).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pool: bool,
    /// An isolation group, as a request gives it: only hosts without another VM of the
    /// group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolate: Option<String>,
    /// Label constraints, as a request gives them: only hosts carrying every pair.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub on: BTreeMap<String, String>,
}

/// Where a VM would go now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlacementView {
    /// The host chosen.
    pub host: String,
    /// Why that host: the placement's explanation.
    pub why: String,
    /// The size placed.
    pub vcpus: u32,
    pub memory_mib: u32,
}
