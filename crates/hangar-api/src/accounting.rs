//! Quotas per user and usage metering: `GET /v1/quotas`, `PUT /v1/quotas/{user}`,
//! `GET /v1/usage`.

use serde::{Deserialize, Serialize};

pub use hangar_core::quota::{Limits, Usage};
pub use hangar_core::usage::{Prices, UsageBy, UsageRow};

/// `PUT /v1/quotas/{user}`: the user's limits; a limit left out or `null` is no limit.
pub type QuotaBody = Limits;

/// Where a user's limits come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuotaSource {
    /// Set for this user (`PUT /v1/quotas/{user}`).
    User,
    /// The server's default quota (`--default-quota`).
    Default,
}

/// One user's quota and what their VMs take now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaView {
    pub user: String,
    pub limits: Limits,
    pub source: QuotaSource,
    /// What the user's VMs take (those being made included).
    pub used: Usage,
}

/// `GET /v1/quotas`: the default quota, and every user with a quota or with VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotasView {
    /// Applies to every user without a quota of their own.
    pub default: Limits,
    pub users: Vec<QuotaView>,
}

/// `GET /v1/usage` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// The window's start: a duration before now (`1h`, `7d`) or milliseconds since the
    /// Unix epoch. Default: everything recorded.
    pub since: Option<String>,
    /// `user` (the default), `service`, `host` or `vm`.
    pub by: Option<UsageBy>,
}

/// `GET /v1/usage`: what was used in the window, summed by user, service, host or VM,
/// with its cost at the server's prices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageView {
    pub since_ms: u64,
    pub until_ms: u64,
    pub by: UsageBy,
    pub prices: Prices,
    pub rows: Vec<UsageRow>,
    pub total: UsageRow,
}
