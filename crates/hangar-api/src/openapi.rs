//! The base of the OpenAPI document served at `/v1/openapi.json`: its title, description and
//! every schema of this crate. The server adds one path per route from the route's own
//! `#[utoipa::path]` annotation, so that the document lists exactly what the router serves.

use crate::*;

/// The document without paths; see the module documentation.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "hangar", description = "Virtual machines as services"),
    components(schemas(
        AlertView,
        AlertNotice,
        NoticeAlert,
        ImportView,
        StackView,
        StackMemberView,
        StackAccepted,
        StackSpec,
        MemberSpec,
        StackState,
        AcceptedView,
        SessionBody,
        SessionView,
        VmEvent,
        TaskEvent,
        PoolEvent,
        HostEvent,
        TemplateEvent,
        ArchiveBody,
        MigrateBody,
        ArchiveView,
        AuditView,
        CreatedTokenView,
        TokenBody,
        TokenView,
        UserBody,
        UserView,
        WhoamiView,
        hangar_core::Role,
        AssetsManifest,
        Blob,
        BudgetView,
        BuildView,
        ChosenView,
        hangar_core::heuristics::Verdict,
        hangar_core::heuristics::Problem,
        hangar_core::heuristics::ProblemCode,
        hangar_core::heuristics::Severity,
        hangar_core::heuristics::Candidate,
        hangar_core::heuristics::CandidateKind,
        hangar_core::heuristics::Chosen,
        hangar_core::heuristics::Cost,
        hangar_core::heuristics::TimeClass,
        hangar_core::heuristics::Waste,
        ErrorBody,
        ErrorDetail,
        GrantView,
        Health,
        Heartbeat,
        HeartbeatReply,
        HostFactsView,
        HostRegistration,
        HostView,
        HostStateView,
        EvacuationView,
        EvacuatedVmView,
        HostVmView,
        ImageBody,
        ImageView,
        ImagesView,
        LayerView,
        PlacementBody,
        PlacementView,
        PoliciesView,
        PolicyBody,
        PolicySource,
        PolicyView,
        PoolBoundsBody,
        PoolView,
        PortView,
        RootBody,
        RootManifest,
        Served,
        ServiceView,
        SettingView,
        SliceView,
        TaskStepView,
        TaskView,
        TemplateView,
        VmView,
        EgressView,
        EgressForwardView,
        hangar_core::EgressPolicy,
        hangar_core::Mode,
        hangar_core::Policy,
        hangar_core::ReadyCheck,
        hangar_core::ReadySpec,
        hangar_core::ServiceRequest,
        hangar_core::TierChoice,
        hangar_core::VmState,
    )),
    modifiers(&FarmToken),
    security(("api_token" = []))
)]
pub struct ApiDoc;

/// Declares `api_token`, the bearer token of a user (every route but `/healthz` wants one),
/// `farm_token`, the bearer token farm hosts send, and `metrics_token`, the one a scraper of
/// `/metrics` sends (routes name them in `security`).
struct FarmToken;

impl utoipa::Modify for FarmToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "farm_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}
