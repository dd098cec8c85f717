//! The REST API under `/v1`. Handlers parse and validate, build one [`commands::Command`],
//! have it executed ([`commands::RequestHandler`]) and shape the reply; they hold no
//! business logic. Every error answer is JSON (see [`error`], the one mapping
//! from errors to HTTP statuses).

use std::sync::{Arc, LazyLock};

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::{Extension, Json, Router};
use hangar_api::{
    ArchiveBody, ArchiveView, BuildView, GrantView, Health, ImageBody, MigrateBody, PolicyBody,
    PoolBoundsBody, PortView, ServiceView, SettingView, SliceView, TaskView, VmQuery, VmView,
};
use hangar_core::{ServiceRequest, VmState};
use hangar_host::LaunchRecord;
use hangar_store::{TaskRecord, TaskStep, VmRecord};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod accounting;
pub mod alerts;
pub mod auth;
pub mod commands;
pub mod error;
pub mod farm;
pub mod farm_auth;
pub mod farm_images;
pub mod hosts;
pub mod imports;
pub mod json_errors;
pub mod metrics;
pub mod placements;
pub mod stacks;

use commands::{Command, Reply, RequestHandler};

use crate::api::auth::{AuditTarget, Caller};
use crate::api::error::{ApiError, ErrorBody};
use crate::lifecycle::policy::{PoliciesView, PolicyChange, PolicyView};
use crate::manager::Manager;
use crate::pools::PoolView;
use crate::requests::{Grant, Served};
use crate::templates::TemplateView;

/// Every route of the API, each from its handler's `#[utoipa::path]` annotation: the router
/// and `/v1/openapi.json` are both made from this one list, so no route exists undocumented.
/// Add routes only with `.routes(routes!(...))`.
fn routes() -> OpenApiRouter<Arc<Manager>> {
    OpenApiRouter::with_openapi(hangar_api::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(openapi))
        .routes(routes!(list_services))
        .routes(routes!(create_request))
        .routes(routes!(check_request))
        .routes(routes!(list_vms))
        .routes(routes!(get_vm, delete_vm))
        .routes(routes!(sleep_vm))
        .routes(routes!(archive_vm))
        .routes(routes!(wake_vm))
        .routes(routes!(migrate_vm))
        .routes(routes!(list_pools))
        .routes(routes!(set_pool))
        .routes(routes!(list_templates))
        .routes(routes!(list_policies))
        .routes(routes!(set_policy, reset_policy))
        .routes(routes!(list_tasks))
        .routes(routes!(get_task, cancel_task_by_delete))
        .routes(routes!(cancel_task))
        .routes(routes!(list_images, build_image))
        .routes(routes!(export_image))
        .routes(routes!(imports::import_machine, imports::list_imports))
        .routes(routes!(imports::delete_import))
        .routes(routes!(farm::list_hosts, farm::register_host))
        .routes(routes!(farm::host_heartbeat))
        .routes(routes!(hosts::drain_host))
        .routes(routes!(hosts::resume_host))
        .routes(routes!(hosts::evacuate_host))
        .routes(routes!(hosts::get_evacuation))
        .routes(routes!(placements::preview_placement))
        .routes(routes!(metrics::metrics))
        .routes(routes!(accounting::list_quotas))
        .routes(routes!(accounting::set_quota))
        .routes(routes!(accounting::get_usage))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(stacks::create_stack, stacks::list_stacks))
        .routes(routes!(stacks::get_stack, stacks::delete_stack))
        .routes(routes!(stacks::sleep_stack))
        .routes(routes!(stacks::archive_stack))
        .routes(routes!(stacks::wake_stack))
        .routes(routes!(farm_images::farm_assets))
        .routes(routes!(farm_images::farm_root))
        .routes(routes!(farm_images::farm_os))
        .routes(routes!(farm_images::farm_blob))
        .routes(routes!(auth::routes::whoami))
        .routes(routes!(
            crate::web::session::sign_in,
            crate::web::session::current,
            crate::web::session::sign_out
        ))
        .routes(routes!(crate::web::events::events))
        .routes(routes!(crate::web::console::console_text))
        .routes(routes!(crate::web::console::console_ws))
        .routes(routes!(auth::routes::list_users, auth::routes::add_user))
        .routes(routes!(
            auth::routes::list_tokens,
            auth::routes::create_token
        ))
        .routes(routes!(auth::routes::revoke_token))
        .routes(routes!(auth::routes::audit))
}

/// The OpenAPI document of every route the router serves.
pub fn openapi_document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| routes().into_openapi());
    &DOCUMENT
}

/// The API's router: the routes of [`routes`], each behind [`auth::authenticate`] (tokens,
/// roles, audit log), every request behind [`auth::guard`] (Host, Origin, JSON bodies), a
/// JSON 404 for any other path, and every other error answer made JSON by [`json_errors`].
pub fn router(manager: Arc<Manager>) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .route_layer(axum::middleware::from_fn_with_state(
            manager.clone(),
            auth::authenticate,
        ))
        .fallback(|| async {
            ApiError::NotFound {
                message: "no such API path; see /v1/openapi.json".into(),
                alternatives: Vec::new(),
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            manager.clone(),
            auth::guard,
        ))
        .layer(axum::middleware::from_fn(json_errors::json_errors))
        .with_state(manager)
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    responses((status = 200, body = Object, description = "the OpenAPI 3.1 document of every route"))
)]
async fn openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz(State(manager): State<Arc<Manager>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        role: if manager.farm.leading() {
            "leader"
        } else {
            "standby"
        }
        .into(),
    })
}

#[utoipa::path(get, path = "/v1/services", responses((status = 200, body = [ServiceView])))]
async fn list_services(State(manager): State<Arc<Manager>>) -> Json<Vec<ServiceView>> {
    Json(
        manager
            .catalog()
            .services()
            .chain(manager.catalog().imported_services())
            .map(|service| ServiceView {
                name: service.name.clone(),
                description: service.description.clone(),
                os: service.os.clone(),
                environments: service
                    .environments
                    .iter()
                    .map(|os| format!("os={os}"))
                    .collect(),
                components: service
                    .components
                    .iter()
                    .map(|name| match manager.catalog().components().get(name) {
                        Some(c) => format!("{}:{name}", c.kind.as_str()),
                        None => name.clone(),
                    })
                    .collect(),
                settings: service
                    .settings
                    .iter()
                    .map(|(key, setting)| {
                        (
                            key.clone(),
                            SettingView {
                                description: setting.description.clone(),
                                default: if setting.secret {
                                    setting.default.as_ref().map(|_| "(secret)".into())
                                } else {
                                    setting.default.clone()
                                },
                                required: setting.default.is_none(),
                                secret: setting.secret,
                                format: setting.format.as_str().into(),
                            },
                        )
                    })
                    .collect(),
                vcpus: service.vcpus,
                memory_mib: service.memory_mib,
                ports: service
                    .ports
                    .iter()
                    .map(|port| PortView {
                        name: port.name.clone(),
                        guest: port.guest,
                    })
                    .collect(),
                ready: serde_json::to_value(&service.ready).unwrap_or_default(),
            })
            .collect(),
    )
}

impl From<Grant> for GrantView {
    fn from(grant: Grant) -> GrantView {
        GrantView {
            vm: grant.vm.id,
            service: grant.service,
            endpoint: grant.endpoint,
            endpoints: grant.vm.endpoints,
            direct_endpoint: grant.direct_endpoint,
            direct_endpoints: grant.vm.direct_endpoints,
            dns_name: grant.dns_name,
            state: grant.vm.state,
            host: grant.vm.host,
            mode: grant.vm.mode,
            served: grant.served,
            reused: grant.served == Served::Shared,
            vcpus: grant.vm.vcpus,
            memory_mib: grant.vm.memory_mib,
            sliced_to: grant
                .sliced_to
                .map(|(vcpus, memory_mib)| SliceView { vcpus, memory_mib }),
            task: grant.task,
            boot_ms: grant.vm.boot_ms,
            placement: grant.placement,
            installed_at_deploy: grant.installed_at_deploy,
            chosen: grant.chosen,
            egress: (&LaunchRecord(grant.vm.spec).egress()).into(),
        }
    }
}

/// Service templates on disk: VMs snapshotted at their ready state, cloned for new VMs.
#[utoipa::path(get, path = "/v1/templates", responses((status = 200, body = [TemplateView])))]
async fn list_templates(
    State(manager): State<Arc<Manager>>,
) -> Result<Json<Vec<TemplateView>>, ApiError> {
    match manager.handle(Command::ListTemplates).await? {
        Reply::Templates(templates) => Ok(Json(templates)),
        other => Err(other.unexpected()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/pools",
    responses((status = 200, body = [PoolView]), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn list_pools(State(manager): State<Arc<Manager>>) -> Result<Json<Vec<PoolView>>, ApiError> {
    match manager.handle(Command::ListPools).await? {
        Reply::Pools(pools) => Ok(Json(pools)),
        other => Err(other.unexpected()),
    }
}

#[utoipa::path(
    put,
    path = "/v1/pools/{name}",
    request_body = PoolBoundsBody,
    params(("name" = String, Path, description = "the pool (a service's name for a pool made at run time)")),
    responses(
        (status = 200, body = PoolView),
        (status = 400, body = ErrorBody, description = "malformed body"),
        (status = 404, body = ErrorBody, description = "no such pool or service"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn set_pool(
    State(manager): State<Arc<Manager>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<PoolView>, ApiError> {
    let body: PoolBoundsBody = json_body(&body)?;
    let command = Command::SetPool {
        name,
        min: body.min,
        max: body.max,
        ready: body.ready,
    };
    match manager.handle(command).await? {
        Reply::Pool(pool) => Ok(Json(pool)),
        other => Err(other.unexpected()),
    }
}

/// Request a service: answers once a VM offering it is ready. With an `Idempotency-Key`
/// header, a retry under the same key by the same user answers the first call's grant
/// (the same VM) instead of making another (see [`auth::idempotency`]). With
/// `Prefer: respond-async`, answers 202 with the creation task as soon as it exists (the
/// request goes on; the task's `vm` is set when it succeeds), or as without the header
/// when the request ends first (a shared or pool VM is granted at once).
#[utoipa::path(
    post,
    path = "/v1/requests",
    request_body = ServiceRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1-255 visible ASCII characters: retries under it get the first answer"),
        ("Prefer" = Option<String>, Header, description = "`respond-async`: answer 202 with the task once the VM is being made"),
    ),
    responses(
        (status = 200, body = GrantView, description = "a VM offering the service answers at the endpoint"),
        (status = 202, body = hangar_api::AcceptedView, description = "`Prefer: respond-async`: the VM is being made by this task"),
        (status = 400, body = ErrorBody, description = "malformed request"),
        (status = 404, body = ErrorBody, description = "no such service; alternatives given"),
        (status = 422, body = ErrorBody, description = "this combination will never be available, the VM is larger than every host (the limit named), or the idempotency key was used with another request"),
        (status = 429, body = ErrorBody, description = "the VM would take its owner past their quota (the limit named)"),
        (status = 503, body = ErrorBody, description = "not ready within the deadline; try again shortly (Retry-After)"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn create_request(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, ApiError> {
    let request: ServiceRequest = json_body(&body)?;
    let key = auth::idempotency::key_of(&headers)?;
    let work = async move {
        match key {
            Some(key) => {
                auth::idempotency::answer_once(&manager, &caller.user, &key, &body, || {
                    grant_request(&manager, request, &caller.user)
                })
                .await
            }
            None => grant_request(&manager, request, &caller.user).await,
        }
    };
    if !prefers_async(&headers) {
        return work.await;
    }
    let (announced, work) = crate::tasks::announce::with_announcement(work);
    // The request goes on when this answer leaves early (or the caller goes away).
    let mut running = tokio::spawn(work);
    tokio::select! {
        biased;
        Ok(task) = announced => Ok((
            axum::http::StatusCode::ACCEPTED,
            Extension(AuditTarget(task.clone())),
            Json(hangar_api::AcceptedView { task }),
        )
            .into_response()),
        ended = &mut running => ended.map_err(ApiError::internal)?,
    }
}

/// Whether a request's `Prefer` header asks for `respond-async` (RFC 7240).
fn prefers_async(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|preference| {
            preference
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("respond-async")
        })
}

/// The heuristics engine's verdict on a request, without provisioning anything: every
/// problem with its field and a suggestion, the candidates (exact, superset, partial,
/// partial + install, build) ranked by cost to deliver and waste, and the one a request
/// would get now and why. 200 whether the request is valid or not (`ok`).
#[utoipa::path(
    post,
    path = "/v1/requests/check",
    request_body = ServiceRequest,
    responses(
        (status = 200, body = hangar_core::heuristics::Verdict, description = "the verdict, valid or not"),
        (status = 400, body = ErrorBody, description = "malformed body, or neither a service nor a configuration"),
        (status = 404, body = ErrorBody, description = "no such service; alternatives given"),
        (status = 422, body = ErrorBody, description = "the service never runs on the OS asked"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn check_request(
    State(manager): State<Arc<Manager>>,
    body: axum::body::Bytes,
) -> Result<Json<hangar_core::heuristics::Verdict>, ApiError> {
    let request: ServiceRequest = json_body(&body)?;
    match manager.handle(Command::Check(request)).await? {
        Reply::Verdict(verdict) => Ok(Json(*verdict)),
        other => Err(other.unexpected()),
    }
}

/// The request path for `owner`, answered as JSON with its `Server-Timing`.
async fn grant_request(
    manager: &Arc<Manager>,
    request: ServiceRequest,
    owner: &str,
) -> Result<axum::response::Response, ApiError> {
    let started = std::time::Instant::now();
    let command = Command::Request {
        request,
        owner: owner.to_owned(),
    };
    let grant = match manager.handle(command).await? {
        Reply::Grant(grant) => *grant,
        other => return Err(other.unexpected()),
    };
    let timing = grant.stages.header(started.elapsed());
    let target = AuditTarget(grant.vm.id.clone());
    Ok((
        [("server-timing", timing)],
        Extension(target),
        Json(GrantView::from(grant)),
    )
        .into_response())
}

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// `vm` as the API shows it (without its archive; see [`view`]).
fn vm_view(vm: VmRecord) -> VmView {
    let egress = (&LaunchRecord(vm.spec.clone()).egress()).into();
    VmView {
        id: vm.id,
        host: vm.host,
        services: vm.services,
        endpoints: vm.endpoints,
        direct_endpoints: vm.direct_endpoints,
        state: vm.state,
        mode: vm.mode,
        owner: vm.owner,
        // Secret settings are sealed in the store and never shown.
        env: crate::secrets::shown(vm.env),
        memory_mib: vm.memory_mib,
        vcpus: vm.vcpus,
        pool: vm.pool,
        os: vm.os.map(|(name, version)| format!("{name} {version}")),
        pid: vm.pid.filter(|_| vm.state.has_process()),
        error: vm.error,
        archive: None,
        created_at: rfc3339(vm.created_at_ms),
        last_used_at: rfc3339(vm.last_used_at_ms),
        idle_ms: hangar_store::now_ms().saturating_sub(vm.last_used_at_ms),
        state_since: rfc3339(vm.state_since_ms),
        boot_ms: vm.boot_ms,
        moving_to: None,
        egress,
    }
}

/// A VM as listed, with its archive when it has one.
async fn view(manager: &Manager, vm: VmRecord) -> VmView {
    let archive = if vm.state == VmState::Archived {
        manager.archive_info(&vm.id).await
    } else {
        None
    };
    let archive = archive.map(|info| ArchiveView {
        tier: info.tier.to_string(),
        size_bytes: info.size_bytes,
        memory_mib: info.memory_mib,
        took_ms: info.took_ms,
    });
    let moving_to = manager.migrations.of(&vm.id).map(|moving| moving.to);
    VmView {
        archive,
        moving_to,
        ..vm_view(vm)
    }
}

#[utoipa::path(
    get,
    path = "/v1/vms",
    params(VmQuery),
    responses(
        (status = 200, body = [VmView]),
        (status = 400, body = ErrorBody, description = "malformed query string"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn list_vms(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<VmQuery>,
) -> Result<Json<Vec<VmView>>, ApiError> {
    match manager.handle(Command::ListVms { all: query.all }).await? {
        Reply::Vms(vms) => {
            let mut views = Vec::with_capacity(vms.len());
            for vm in vms {
                if !auth::roles::visible(&caller.user, caller.role, &vm) {
                    continue;
                }
                views.push(view(&manager, vm).await);
            }
            Ok(Json(views))
        }
        other => Err(other.unexpected()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/vms/{id}",
    params(("id" = String, Path, description = "the VM")),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn get_vm(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    manager.check_vm_access(&caller, &id, false).await?;
    match manager.handle(Command::GetVm(id)).await? {
        Reply::Vm(vm) => Ok(Json(view(&manager, vm).await)),
        other => Err(other.unexpected()),
    }
}

/// Delete a VM: its process, disk layer, sockets and logs.
#[utoipa::path(
    delete,
    path = "/v1/vms/{id}",
    params(("id" = String, Path, description = "the VM")),
    responses(
        (status = 200, body = VmView, description = "the VM as deleted"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "an operation on the VM is under way"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn delete_vm(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    manager.check_vm_access(&caller, &id, true).await?;
    match manager.handle(Command::DeleteVm(id)).await? {
        Reply::Vm(vm) => Ok(Json(vm_view(vm))),
        other => Err(other.unexpected()),
    }
}

/// Pause an active VM in memory.
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/sleep",
    params(("id" = String, Path, description = "the VM")),
    responses(
        (status = 200, body = VmView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not in a state that allows it"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn sleep_vm(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    manager.check_vm_access(&caller, &id, true).await?;
    match manager.handle(Command::SleepVm(id)).await? {
        Reply::Vm(vm) => Ok(Json(view(&manager, vm).await)),
        other => Err(other.unexpected()),
    }
}

/// Write an active or sleeping VM's memory to disk and end its process.
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/archive",
    request_body(content = Option<ArchiveBody>, description = "optional: an empty body archives with zstd"),
    params(("id" = String, Path, description = "the VM")),
    responses(
        (status = 200, body = VmView),
        (status = 400, body = ErrorBody, description = "malformed body"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not in a state that allows it"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn archive_vm(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<VmView>, ApiError> {
    manager.check_vm_access(&caller, &id, true).await?;
    let body: ArchiveBody = if body.is_empty() {
        ArchiveBody::default()
    } else {
        json_body(&body)?
    };
    let tier = crate::lifecycle::policy::archive_tier(body.tier).0;
    match manager.handle(Command::ArchiveVm { id, tier }).await? {
        Reply::Vm(vm) => Ok(Json(view(&manager, vm).await)),
        other => Err(other.unexpected()),
    }
}

/// Bring a sleeping or archived VM back.
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/wake",
    params(("id" = String, Path, description = "the VM")),
    responses(
        (status = 200, body = VmView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not in a state that allows it"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn wake_vm(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    manager.check_vm_access(&caller, &id, true).await?;
    let started = std::time::Instant::now();
    let (vm, stages) = match manager.handle(Command::WakeVm(id)).await? {
        Reply::Woken(vm, stages) => (vm, stages),
        other => return Err(other.unexpected()),
    };
    let timing = stages.header(started.elapsed());
    Ok(([("server-timing", timing)], Json(view(&manager, vm).await)))
}

/// Move a VM to another farm host (admins only): a sleeping or archived VM by its snapshot
/// (content-addressed, verified), an active one live. Answers 202 with the `migrate` task
/// once the checks pass (`GET /v1/tasks/{id}` for its progress; cancelling it leaves the VM
/// whole where it was); the task's outcome is the VM on its new host.
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/migrate",
    request_body = MigrateBody,
    params(("id" = String, Path, description = "the VM")),
    responses(
        (status = 202, body = hangar_api::AcceptedView, description = "the VM is being moved by this task"),
        (status = 400, body = ErrorBody, description = "malformed body"),
        (status = 404, body = ErrorBody, description = "no such VM or farm host"),
        (status = 409, body = ErrorBody, description = "the VM cannot move there now: its state, the host's (draining, down), room, its isolation group, a migration under way, or live migration unavailable"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn migrate_vm(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, ApiError> {
    let body: MigrateBody = json_body(&body)?;
    let task = crate::migration::migrate(&manager, &id, &body.to, &caller.user).await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Extension(AuditTarget(id)),
        Json(hangar_api::AcceptedView { task }),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/policies",
    responses((status = 200, body = PoliciesView), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn list_policies(
    State(manager): State<Arc<Manager>>,
) -> Result<Json<PoliciesView>, ApiError> {
    match manager.handle(Command::ListPolicies).await? {
        Reply::Policies(policies) => Ok(Json(policies)),
        other => Err(other.unexpected()),
    }
}

fn duration_field(
    name: &str,
    value: Option<Option<String>>,
) -> Result<Option<Option<std::time::Duration>>, ApiError> {
    value
        .map(|value| {
            value
                .map(|text| {
                    humantime::parse_duration(&text).map_err(|err| {
                        ApiError::BadRequest(format!("{name}: {text:?} is not a duration: {err}"))
                    })
                })
                .transpose()
        })
        .transpose()
}

/// Set a service's lifecycle policy at run time (kept across restarts).
#[utoipa::path(
    put,
    path = "/v1/policies/{service}",
    request_body = PolicyBody,
    params(("service" = String, Path, description = "the service")),
    responses(
        (status = 200, body = PolicyView),
        (status = 400, body = ErrorBody, description = "malformed body or duration"),
        (status = 404, body = ErrorBody, description = "no such service"),
        (status = 422, body = ErrorBody, description = "a timer shorter than the server's floor for it (named)"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn set_policy(
    State(manager): State<Arc<Manager>>,
    Path(service): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<PolicyView>, ApiError> {
    let body: PolicyBody = json_body(&body)?;
    let change = PolicyChange {
        sleep_after: duration_field("sleep_after", body.sleep_after)?,
        archive_after: duration_field("archive_after", body.archive_after)?,
        delete_after: duration_field("delete_after", body.delete_after)?,
        keep_active_above: body.keep_active_above,
        archive_tier: body.archive_tier,
    };
    match manager
        .handle(Command::SetPolicy { service, change })
        .await?
    {
        Reply::Policy(policy) => Ok(Json(policy)),
        other => Err(other.unexpected()),
    }
}

/// Go back to the catalog's policy for a service.
#[utoipa::path(
    delete,
    path = "/v1/policies/{service}",
    params(("service" = String, Path, description = "the service")),
    responses(
        (status = 200, body = PolicyView),
        (status = 404, body = ErrorBody, description = "no such service"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn reset_policy(
    State(manager): State<Arc<Manager>>,
    Path(service): Path<String>,
) -> Result<Json<PolicyView>, ApiError> {
    match manager.handle(Command::ResetPolicy(service)).await? {
        Reply::Policy(policy) => Ok(Json(policy)),
        other => Err(other.unexpected()),
    }
}

/// `task` as the API shows it, with `steps`.
fn task_view(task: TaskRecord, steps: Vec<TaskStep>) -> TaskView {
    TaskView {
        id: task.id,
        kind: task.kind,
        owner: task.owner,
        service: task.service,
        vm: task.vm_id,
        state: task.state.as_str().into(),
        stage: task.stage,
        percent: task.percent,
        error: task.error,
        created_at: rfc3339(task.created_at_ms),
        updated_at: rfc3339(task.updated_at_ms),
        ended_at: task.ended_at_ms.map(rfc3339),
        steps: steps
            .into_iter()
            .map(|step| hangar_api::TaskStepView {
                step: step.step,
                stage: step.stage,
                percent: step.percent,
                started_at: rfc3339(step.started_at_ms),
                ended_at: step.ended_at_ms.map(rfc3339),
                outcome: step.outcome.map(|outcome| outcome.as_str().into()),
                error: step.error,
            })
            .collect(),
    }
}

/// Whose tasks `caller` sees: everyone's for an admin, their own otherwise.
fn task_owner_filter(caller: &Caller) -> Option<String> {
    (caller.role != hangar_core::Role::Admin).then(|| caller.user.clone())
}

/// The latest tasks: an admin sees everyone's, anyone else their own.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    responses((status = 200, body = [TaskView], description = "the latest 100 tasks the caller may see (an admin: all; others: their own), without steps"), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn list_tasks(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TaskView>>, ApiError> {
    let command = Command::ListTasks {
        limit: 100,
        owner: task_owner_filter(&caller),
    };
    match manager.handle(command).await? {
        Reply::Tasks(tasks) => Ok(Json(
            tasks
                .into_iter()
                .map(|task| task_view(task, Vec::new()))
                .collect(),
        )),
        other => Err(other.unexpected()),
    }
}

/// One task with its steps (an admin: any; others: their own).
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    params(("id" = String, Path, description = "the task")),
    responses((status = 200, body = TaskView, description = "the task and its steps"), (status = 404, body = ErrorBody, description = "no such task (or someone else's)"), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn get_task(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let command = Command::GetTask {
        id,
        owner: task_owner_filter(&caller),
    };
    match manager.handle(command).await? {
        Reply::Task(task, steps) => Ok(Json(task_view(task, steps))),
        other => Err(other.unexpected()),
    }
}

/// Cancels a running task: its work is interrupted, the steps it did are undone in
/// reverse, and it ends `cancelled`. Answers at once with the task as it was asked; wait
/// for its end with `GET /v1/tasks/{id}`.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/cancel",
    params(("id" = String, Path, description = "the task")),
    responses((status = 202, body = TaskView, description = "cancelled: its steps are being undone"), (status = 403, body = ErrorBody, description = "someone else's task (only its owner or an admin cancels it)"), (status = 404, body = ErrorBody, description = "no such task"), (status = 409, body = ErrorBody, description = "the task already ended, is already rolling back, or cannot be cancelled"), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn cancel_task(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<(axum::http::StatusCode, Json<TaskView>), ApiError> {
    let command = Command::CancelTask {
        id,
        user: caller.user.clone(),
        admin: caller.role == hangar_core::Role::Admin,
    };
    match manager.handle(command).await? {
        Reply::Task(task, steps) => Ok((
            axum::http::StatusCode::ACCEPTED,
            Json(task_view(task, steps)),
        )),
        other => Err(other.unexpected()),
    }
}

/// Cancels a running task, as `POST /v1/tasks/{id}/cancel`.
#[utoipa::path(
    delete,
    path = "/v1/tasks/{id}",
    params(("id" = String, Path, description = "the task")),
    responses((status = 202, body = TaskView, description = "cancelled: its steps are being undone"), (status = 403, body = ErrorBody, description = "someone else's task (only its owner or an admin cancels it)"), (status = 404, body = ErrorBody, description = "no such task"), (status = 409, body = ErrorBody, description = "the task already ended, is already rolling back, or cannot be cancelled"), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn cancel_task_by_delete(
    state: State<Arc<Manager>>,
    caller: Extension<Caller>,
    id: Path<String>,
) -> Result<(axum::http::StatusCode, Json<TaskView>), ApiError> {
    cancel_task(state, caller, id).await
}

/// The request an image body stands for, validated.
fn image_request(body: ImageBody) -> Result<ServiceRequest, ApiError> {
    let request = ServiceRequest {
        service: Some(body.service),
        env: body.env,
        ..ServiceRequest::default()
    };
    request
        .validate()
        .map_err(|err| ApiError::BadRequest(err.to_string()))?;
    Ok(request)
}

/// Images of every viable service × environment, and the cached layers they share.
#[utoipa::path(
    get,
    path = "/v1/images",
    responses((status = 200, body = crate::images::policy::ImagesView), (status = 500, body = ErrorBody, description = "something broke on the server's side"))
)]
async fn list_images(
    State(manager): State<Arc<Manager>>,
) -> Result<Json<crate::images::policy::ImagesView>, ApiError> {
    match manager.handle(Command::ListImages).await? {
        Reply::Images(images) => Ok(Json(images)),
        other => Err(other.unexpected()),
    }
}

/// Builds the image of a service in an environment, as a task.
#[utoipa::path(
    post,
    path = "/v1/images",
    request_body = ImageBody,
    responses(
        (status = 202, body = BuildView, description = "the build runs as this task"),
        (status = 400, body = ErrorBody, description = "malformed body"),
        (status = 404, body = ErrorBody, description = "no such service"),
        (status = 422, body = ErrorBody, description = "this combination will never be available"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn build_image(
    State(manager): State<Arc<Manager>>,
    body: axum::body::Bytes,
) -> Result<(axum::http::StatusCode, Json<BuildView>), ApiError> {
    let body: ImageBody = json_body(&body)?;
    let task = match manager
        .handle(Command::BuildImage(image_request(body)?))
        .await?
    {
        Reply::Building(task) => task,
        other => return Err(other.unexpected()),
    };
    Ok((axum::http::StatusCode::ACCEPTED, Json(BuildView { task })))
}

/// A self-contained export of a service's image (tar: kernel, initramfs, flattened disk,
/// `hangar-export.json`, `run.sh`) that boots with plain QEMU.
#[utoipa::path(
    post,
    path = "/v1/export",
    request_body = ImageBody,
    responses(
        (status = 200, content_type = "application/x-tar", description = "the export"),
        (status = 400, body = ErrorBody, description = "malformed body"),
        (status = 404, body = ErrorBody, description = "no such service"),
        (status = 422, body = ErrorBody, description = "this combination will never be available"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
async fn export_image(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, ApiError> {
    let body: ImageBody = json_body(&body)?;
    let request = image_request(body)?;
    let command = Command::ExportImage {
        request,
        owner: caller.user,
    };
    let export = match manager.handle(command).await? {
        Reply::Export(export) => export,
        other => return Err(other.unexpected()),
    };
    let file = tokio::fs::File::open(&export.path)
        .await
        .map_err(ApiError::internal)?;
    let size = export.size_bytes;
    // The export's directory lives until the last chunk is sent.
    let stream = futures::stream::unfold((file, Some(export)), |(mut file, export)| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => {
                drop(export);
                None
            }
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes_of(buf)), (file, export)))
            }
            Err(err) => Some((Err(err), (file, None))),
        }
    });
    let mut response = axum::response::Response::new(axum::body::Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-tar"),
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&size.to_string()) {
        headers.insert(axum::http::header::CONTENT_LENGTH, value);
    }
    Ok(response)
}

/// A request body read as JSON whatever its content type; a body that is not `T` is a 400.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::BadRequest(format!("invalid request body: {err}")))
}

fn bytes_of(buf: Vec<u8>) -> axum::body::Bytes {
    axum::body::Bytes::from(buf)
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod client_tests;

#[cfg(test)]
mod json_errors_tests;
