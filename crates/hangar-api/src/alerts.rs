//! `GET /v1/alerts`, and what the webhook sink POSTs (the shape of Alertmanager's webhook,
//! so receivers written for it read hangar's notices).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One alert (see `hangar_core::alerts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertView {
    /// Unique: its rule and subject (`host_down/host1`).
    pub key: String,
    /// Its rule: `host_down`, `pool_empty`, `host_disk`, `host_memory`, `pool_memory`,
    /// `vm_crashing`, `migration_failed`.
    pub rule: String,
    /// As webhooks name it (`HostDown`).
    pub name: String,
    /// `pending` (true, not yet for its rule's `for`), `firing` or `resolved`.
    pub state: String,
    /// What it is about (`host`, `pool`, `service`, `task`, ...).
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    /// RFC 3339: when its condition was first seen true.
    pub active_since: String,
    /// RFC 3339: when it fired.
    pub firing_since: Option<String>,
    /// RFC 3339: when it resolved.
    pub resolved_at: Option<String>,
}

/// The query string of `GET /v1/alerts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertQuery {
    /// Pending and resolved alerts too (default: firing ones only).
    #[serde(default)]
    pub all: bool,
}

/// What the webhook sink POSTs for each transition (Alertmanager's webhook payload,
/// version 4, with one alert).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertNotice {
    /// `"4"`.
    pub version: String,
    /// The alert's key.
    pub group_key: String,
    /// `firing` or `resolved`.
    pub status: String,
    /// `hangar`.
    pub receiver: String,
    pub group_labels: BTreeMap<String, String>,
    pub common_labels: BTreeMap<String, String>,
    pub common_annotations: BTreeMap<String, String>,
    /// The server that sent it.
    #[serde(rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<NoticeAlert>,
}

/// One alert in an [`AlertNotice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NoticeAlert {
    /// `firing` or `resolved`.
    pub status: String,
    /// `alertname` (`HostDown`), `rule`, and what it is about.
    pub labels: BTreeMap<String, String>,
    /// `summary`.
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339: when it fired.
    pub starts_at: String,
    /// RFC 3339: when it resolved; `0001-01-01T00:00:00Z` while firing.
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    /// The alert's key.
    pub fingerprint: String,
}
