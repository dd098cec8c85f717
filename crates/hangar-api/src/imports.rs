//! `POST /v1/imports`, `GET /v1/imports`, `DELETE /v1/imports/{name}`: machines imported
//! from disk images (seed 003, claim 8).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What an import is, in the query string of `POST /v1/imports` (the body is the disk
/// image itself, `application/octet-stream`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// The model's name, which becomes its service's: lowercase letters, digits and `-`.
    pub name: String,
    /// The image's format, never probed: `qcow2`, `raw` or `vmdk`.
    pub format: String,
    /// The guest ports it serves, `NAME=PORT` separated by commas (`http=80,ssh=22`).
    #[serde(default)]
    pub ports: Option<String>,
    /// vCPUs of its VMs (default 1).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// MiB of memory of its VMs (default 512).
    #[serde(default)]
    pub memory_mib: Option<u32>,
}

/// An imported machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportView {
    pub name: String,
    pub owner: String,
    /// The format it was uploaded in.
    pub format: String,
    /// `full-disk` (booted with its own bootloader) or `filesystem` (a bare root
    /// filesystem).
    pub layout: String,
    /// For a full disk: the partition holding its root filesystem (1-based).
    pub root_partition: Option<u32>,
    /// Guest ports by name.
    pub ports: BTreeMap<String, u16>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The disk's virtual size.
    pub virtual_bytes: u64,
    /// What the stored model disk takes.
    pub disk_bytes: u64,
    /// What staging removed or rewrote, as paths in the guest.
    pub stripped: Vec<String>,
    /// The import's task.
    pub task: Option<String>,
    /// Milliseconds per step of the import (`upload`, `check`, `convert`, `stage`,
    /// `store`), when this server made it.
    pub timings_ms: BTreeMap<String, u64>,
    /// RFC 3339.
    pub created_at: String,
}
