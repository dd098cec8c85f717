//! `GET|POST /v1/images`, `POST /v1/export` and `GET /v1/templates`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A service and environment whose image to build or export.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageBody {
    pub service: String,
    /// `os=NAME` and the service's settings (an export bakes them in).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `POST /v1/images`: the build started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildView {
    /// The build task (see `/v1/tasks/{id}` for its stage and percent).
    pub task: String,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImagesView {
    pub images: Vec<ImageView>,
    pub layers: Vec<LayerView>,
    /// Every cached layer, each counted once.
    pub total_bytes: u64,
    pub budget_bytes: u64,
}

/// A cached layer with what uses it, for listings and eviction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LayerView {
    pub hash: String,
    /// `os`, `software`, `patch` or `app`.
    pub kind: String,
    pub name: String,
    pub parent: Option<String>,
    pub packages: Vec<String>,
    pub size_bytes: u64,
    pub built_at_ms: u64,
    pub build_ms: u64,
    /// When a VM last started with it.
    pub last_used_ms: Option<u64>,
    /// `service@os` images it is part of.
    pub images: Vec<String>,
    /// VMs that have it as a disk.
    pub users: Vec<String>,
}

/// One service image: the layer chain of a viable service × OS combination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageView {
    pub service: String,
    pub os: String,
    /// `layered` (Debian layers) or `disk` (one busybox disk).
    pub format: String,
    /// Every layer is built.
    pub built: bool,
    /// Layer hashes, bottom (OS) first.
    pub layers: Vec<String>,
    /// Sum of its built layers' sizes (shared layers counted in full).
    pub size_bytes: u64,
    /// VMs running it.
    pub users: Vec<String>,
    pub last_used_ms: Option<u64>,
    /// Kept from eviction and rebuilt when missing: often requested.
    pub promoted: bool,
}

/// One template as `GET /v1/templates` lists it: a VM snapshotted at its ready state,
/// cloned for new VMs of its service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateView {
    pub service: String,
    /// The host that holds it (each farm host holds its own copy, pulled from a peer).
    #[serde(default)]
    pub host: String,
    pub key: String,
    pub dir: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Memory snapshot plus frozen disk layer.
    pub size_bytes: u64,
    /// How long snapshotting took.
    pub took_ms: u64,
    /// RFC 3339.
    pub created_at: String,
    /// Whether new VMs of the service are cloned from it (its key is current).
    pub current: bool,
}
