//! hangar's REST API under `/v1` as a contract shared by the server, the CLI, the forwarder
//! and the tests: every request body, answer, list item, query string and the JSON error body.
//!
//! The server serializes these types and [`Client`], the typed async client, deserializes
//! them, so both sides agree on the JSON by construction. Every type derives `utoipa::ToSchema` (or `IntoParams`) so the
//! OpenAPI document served at `/v1/openapi.json` is generated from the same definitions.

pub mod accounting;
pub mod alerts;
pub mod client;
pub mod error;
pub mod evacuation;
pub mod farm;
pub mod farm_images;
pub mod images;
pub mod imports;
pub mod openapi;
pub mod placements;
pub mod policies;
pub mod pools;
pub mod requests;
pub mod services;
pub mod stacks;
pub mod tasks;
pub mod users;
pub mod vms;
pub mod web;

pub use accounting::{
    Limits, Prices, QuotaBody, QuotaSource, QuotaView, QuotasView, Usage, UsageBy, UsageQuery,
    UsageRow, UsageView,
};
pub use alerts::{AlertNotice, AlertQuery, AlertView, NoticeAlert};
pub use client::{BadUrl, BlobDownload, Client, ClientError, Download, Timed};
pub use error::{ErrorBody, ErrorDetail};
pub use evacuation::{EvacuatedVmView, EvacuationView, HostStateView};
pub use farm::{Heartbeat, HeartbeatReply, HostFactsView, HostRegistration, HostView, HostVmView};
pub use farm_images::{AssetsManifest, Blob, RootBody, RootManifest};
pub use hangar_core::heuristics;
pub use hangar_core::{Role, ServiceRequest};
pub use images::{BuildView, ImageBody, ImageView, ImagesView, LayerView, TemplateView};
pub use imports::{ImportQuery, ImportView};
pub use openapi::ApiDoc;
pub use placements::{PlacementBody, PlacementView};
pub use policies::{BudgetView, PoliciesView, PolicyBody, PolicySource, PolicyView};
pub use pools::{PoolBoundsBody, PoolView};
pub use requests::{ChosenView, GrantView, Served, SliceView};
pub use services::{Health, PortView, ServiceView, SettingView};
pub use stacks::{MemberSpec, StackAccepted, StackMemberView, StackSpec, StackState, StackView};
pub use tasks::{TaskStepView, TaskView};
pub use users::{
    AuditQuery, AuditView, CreatedTokenView, TokenBody, TokenView, UserBody, UserView, WhoamiView,
};
pub use vms::{
    ArchiveBody, ArchiveView, EgressForwardView, EgressView, MigrateBody, VmQuery, VmView,
};
pub use web::{
    AcceptedView, HostEvent, PoolEvent, SessionBody, SessionView, TaskEvent, TemplateEvent, VmEvent,
};

/// Tells a field given as `null` (`Some(None)`) from one left out (`None`).
///
/// Use with `#[serde(default, deserialize_with = "crate::present")]`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    serde::Deserialize::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_field_given_as_null_is_told_from_one_left_out() {
        let body: PolicyBody =
            serde_json::from_value(json!({"sleep_after": null, "archive_after": "5m"})).unwrap();
        assert_eq!(body.sleep_after, Some(None));
        assert_eq!(body.archive_after, Some(Some("5m".into())));
        assert_eq!(body.delete_after, None);
        // And back: left out stays left out, null stays null.
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"sleep_after": null, "archive_after": "5m"})
        );
        let pool: PoolBoundsBody = serde_json::from_value(json!({"ready": null})).unwrap();
        assert_eq!(pool.ready, Some(None));
        assert_eq!(serde_json::to_value(&pool).unwrap(), json!({"ready": null}));
    }

    #[test]
    fn unknown_fields_in_request_bodies_are_refused() {
        assert!(serde_json::from_value::<PolicyBody>(json!({"sleep": "1s"})).is_err());
        assert!(serde_json::from_value::<PoolBoundsBody>(json!({"minimum": 1})).is_err());
        assert!(serde_json::from_value::<ArchiveBody>(json!({"tier": "gzip"})).is_err());
        assert!(serde_json::from_value::<ImageBody>(json!({"service": "x", "os": "y"})).is_err());
    }

    #[test]
    fn an_error_body_leaves_out_what_it_lacks_and_reads_back() {
        let body = ErrorBody {
            error: ErrorDetail {
                code: "not_found".into(),
                message: "no VM x".into(),
                alternatives: Vec::new(),
                task: None,
                retry_after_s: None,
                problems: Vec::new(),
            },
        };
        let value = serde_json::to_value(&body).unwrap();
        assert_eq!(
            value,
            json!({"error": {"code": "not_found", "message": "no VM x"}})
        );
        assert_eq!(serde_json::from_value::<ErrorBody>(value).unwrap(), body);
    }

    #[test]
    fn an_archive_body_defaults_to_zstd() {
        let body: ArchiveBody = serde_json::from_value(json!({})).unwrap();
        assert_eq!(body.tier, hangar_core::TierChoice::Zstd);
        assert_eq!(ArchiveBody::default(), body);
    }
}
