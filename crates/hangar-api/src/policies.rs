//! `GET /v1/policies` and `PUT|DELETE /v1/policies/{service}`.

use hangar_core::{Policy, TierChoice};
use serde::{Deserialize, Serialize};

/// Where a service's policy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    Catalog,
    /// Set with `hangar policy set` (kept across restarts).
    RunTime,
}

/// One service's policy as `GET /v1/policies` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyView {
    pub service: String,
    pub policy: Policy,
    pub source: PolicySource,
    /// Requests per minute for the service (EWMA, 30 s half-life), compared with
    /// `keep_active_above`.
    pub rate_per_min: f64,
    /// Whether the rate keeps the service's active VMs active now.
    pub kept_active: bool,
    /// The tier archives are written in (differs from the policy's when this host lacks it).
    pub archive_tier_used: String,
    pub note: Option<String>,
}

/// A budget and what is held against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BudgetView {
    /// None: unlimited.
    pub budget_mib: Option<u64>,
    pub used_mib: f64,
}

/// `GET /v1/policies`: every service's policy and the budgets they are held to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoliciesView {
    pub services: Vec<PolicyView>,
    /// Guest memory of active and sleeping VMs (`--memory-budget`).
    pub memory: BudgetView,
    /// Archives and evictable images (`--disk-budget`).
    pub disk: BudgetView,
}

/// Changes to a service's lifecycle policy. Fields left out stay as they are; `null` unsets
/// a timer (never) or `keep_active_above`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// Idle time of an active VM before it sleeps, e.g. `"3s"`, `"10m"`.
    #[serde(
        default,
        deserialize_with = "crate::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub sleep_after: Option<Option<String>>,
    /// Time asleep before it is archived (without `sleep_after`: idle time before an active
    /// VM is archived).
    #[serde(
        default,
        deserialize_with = "crate::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub archive_after: Option<Option<String>>,
    /// Time archived before it is deleted.
    #[serde(
        default,
        deserialize_with = "crate::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub delete_after: Option<Option<String>>,
    /// Requests per minute above which active VMs stay active even when idle.
    #[serde(
        default,
        deserialize_with = "crate::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<f64>)]
    pub keep_active_above: Option<Option<f64>>,
    /// `raw`, `zstd` or `delta`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_tier: Option<TierChoice>,
}
