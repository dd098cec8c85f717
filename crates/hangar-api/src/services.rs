//! `GET /healthz` and `GET /v1/services`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /healthz`: the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// `leader` when this server runs the control plane's loops (a single server always
    /// does), `standby` when another replica sharing its store does.
    #[serde(default)]
    pub role: String,
}

/// A named port a service offers in its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortView {
    pub name: String,
    pub guest: u16,
}

/// A per-request setting of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SettingView {
    pub description: String,
    /// `(secret)` in place of a secret's default.
    pub default: Option<String>,
    pub required: bool,
    pub secret: bool,
    /// What a value may look like: `text` (no control characters), `word`, `int` or
    /// `size`; a request outside it is refused with 400.
    #[serde(default = "text_format")]
    pub format: String,
}

fn text_format() -> String {
    "text".into()
}

/// One service of the catalog, as `GET /v1/services` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub description: String,
    /// The OS a request without `os` gets.
    pub os: String,
    /// The directory: every environment the service can be offered in (`os=NAME`).
    pub environments: Vec<String>,
    /// What it is made of, dependencies first (`kind:name`).
    pub components: Vec<String>,
    /// Per-request settings (`--env KEY=VALUE`).
    pub settings: BTreeMap<String, SettingView>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub ports: Vec<PortView>,
    /// Ready criterion: every check must pass.
    #[schema(value_type = Object)]
    pub ready: serde_json::Value,
}
