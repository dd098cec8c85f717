//! The agent's HTTP API: one route per [`Host`] method under `/agent/v1`, every one but
//! `GET /agent/v1/healthz` behind the farm token.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::wire::{
    AdoptBody, ArchiveBody, BootShellBody, ErrorKind, Health, LeftoversBody, Line, MakeBody,
    PullTemplateBody, TemplatesBody, WireError,
};
use crate::{HandOut, Host, HostError, ProgressFn, VmPlan, WakeFrom};

#[derive(Clone)]
struct AgentState {
    host: Arc<dyn Host>,
    /// SHA-256 of the farm token: compared in constant time with the presented one's.
    token: [u8; 32],
}

/// An error answer: status and [`WireError`] body.
struct Failure(StatusCode, WireError);

impl From<HostError> for Failure {
    fn from(err: HostError) -> Failure {
        let wire = WireError::from(&err);
        let status = match wire.kind {
            ErrorKind::NotRunning => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, wire)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

type Reply<T> = Result<axum::Json<T>, Failure>;

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|err| {
        Failure(
            StatusCode::BAD_REQUEST,
            WireError::new(ErrorKind::BadRequest, format!("request body: {err}")),
        )
    })
}

pub(super) fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Whether two digests are equal, looking at every byte whatever the first difference.
pub(super) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

async fn require_token(State(state): State<AgentState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(token) if same(&digest(token), &state.token) => next.run(request).await,
        _ => Failure(
            StatusCode::UNAUTHORIZED,
            WireError::new(
                ErrorKind::Unauthorized,
                "the agent wants the farm token (Authorization: Bearer TOKEN)",
            ),
        )
        .into_response(),
    }
}

/// The agent API over `host`, answering callers that present `token` as
/// `Authorization: Bearer <token>` (anything else: 401 with an [`ErrorKind::Unauthorized`]
/// body). Routes, all JSON, errors as [`WireError`] (404 for a VM without a process, 400
/// for an unreadable body, 500 otherwise):
///
/// - `GET /agent/v1/healthz` (no token): `{"name": HOST}`
/// - `GET /agent/v1/facts`, `GET /agent/v1/inventory`
/// - `GET /agent/v1/vms/{id}/state`, `GET /agent/v1/vms/{id}/archive` (or `null`)
/// - `POST /agent/v1/vms/{id}/prepare` ([`VmPlan`]) and `POST /agent/v1/vms/{id}/make`
///   ([`MakeBody`]): NDJSON [`Line`]s, progress as the host reports it, then the result
/// - `POST /agent/v1/vms/{id}/hand-out` ([`HandOut`]), `.../boot-shell`
///   ([`BootShellBody`]), `.../sleep`, `.../archive` ([`ArchiveBody`]), `.../wake`
///   ([`WakeFrom`]), `.../adopt` ([`AdoptBody`]), `.../stop`, `.../destroy`
/// - `POST /agent/v1/vms/{id}/segment` ([`crate::SegmentJoin`]): join a private segment;
///   `POST /agent/v1/vms/{id}/segment/leave`
/// - `POST /agent/v1/vms/{id}/forwards/close` ([`super::wire::CloseForwardsBody`]): close
///   host port forwards, answering the new [`crate::LaunchRecord`]
/// - live migration, `/agent/v1/vms/{id}/migrate/...`: `incoming`
///   ([`super::wire::MigrateIncomingBody`]), `start` (a [`crate::IncomingVm`]), `GET status`,
///   `switchover` ([`super::wire::SwitchoverBody`]), `abort`, `finish`
/// - `POST /agent/v1/leftovers/remove` ([`LeftoversBody`])
/// - `POST /agent/v1/templates/applies` and `POST /agent/v1/templates/built` (a
///   [`hangar_core::Service`]), `POST /agent/v1/templates/list` ([`TemplatesBody`]),
///   `POST /agent/v1/templates/{id}/remove`
/// - `POST /agent/v1/templates/bundle` (a [`hangar_core::Service`]): its template as a
///   [`crate::TemplateBundle`] peers can pull, or `null`; `POST /agent/v1/templates/pull`
///   ([`PullTemplateBody`]): install a peer's template
/// - `POST /agent/v1/vms/{id}/bundle`: archived VM `id` as a [`crate::VmBundle`] peers can
///   pull; `POST /agent/v1/vms/pull` ([`crate::VmArrival`]): take in a peer's archived VM
///   (cold migration), answering a [`crate::PulledVm`]
/// - `GET /v1/farm/blobs/{sha256}`: a file of a template bundle held here, for peers
///   (the path a server serves image blobs on, so one client pulls from both; resumable
///   with `Range`; 404 for any hash not in a bundle)
pub fn router(host: Arc<dyn Host>, token: &str) -> Router {
    let state = AgentState {
        host,
        token: digest(token.as_bytes()),
    };
    let vm = |op: &str| format!("/agent/v1/vms/{{id}}/{op}");
    let guarded = Router::new()
        .route("/agent/v1/facts", get(facts))
        .route("/agent/v1/inventory", get(inventory))
        .route(&vm("state"), get(run_state))
        .route(&vm("archive"), get(archive_facts).post(archive))
        .route(&vm("prepare"), post(prepare_vm))
        .route(&vm("make"), post(make_vm))
        .route(&vm("hand-out"), post(hand_out))
        .route(&vm("boot-shell"), post(boot_shell))
        .route(&vm("console"), get(console))
        .route(&vm("sleep"), post(sleep))
        .route(&vm("segment"), post(join_segment))
        .route(&vm("segment/leave"), post(leave_segment))
        .route(&vm("forwards/close"), post(close_forwards))
        .route(&vm("wake"), post(wake))
        .route(&vm("adopt"), post(adopt))
        .route(&vm("stop"), post(stop))
        .route(&vm("destroy"), post(destroy))
        .route(&vm("migrate/incoming"), post(migrate_incoming))
        .route(&vm("migrate/start"), post(migrate_start))
        .route(&vm("migrate/status"), get(migrate_status))
        .route(&vm("migrate/window"), get(migrate_window))
        .route(&vm("migrate/switchover"), post(migrate_switchover))
        .route(&vm("migrate/abort"), post(migrate_abort))
        .route(&vm("migrate/finish"), post(migrate_finish))
        .route("/agent/v1/leftovers/remove", post(remove_leftovers))
        .route("/agent/v1/templates/applies", post(templates_apply))
        .route("/agent/v1/templates/built", post(has_template))
        .route("/agent/v1/templates/list", post(templates))
        .route("/agent/v1/templates/{id}/remove", post(remove_template))
        .route("/agent/v1/templates/bundle", post(template_bundle))
        .route("/agent/v1/templates/pull", post(pull_template))
        .route("/agent/v1/vms/{id}/bundle", post(vm_bundle))
        .route("/agent/v1/vms/pull", post(pull_vm))
        .route("/v1/farm/blobs/{sha256}", get(template_blob))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/agent/v1/healthz", get(healthz))
        .merge(guarded)
        .with_state(state)
}

async fn healthz(State(state): State<AgentState>) -> axum::Json<Health> {
    axum::Json(Health {
        name: state.host.name().to_owned(),
    })
}

async fn facts(State(state): State<AgentState>) -> Reply<crate::HostFacts> {
    Ok(axum::Json(state.host.facts().await?))
}

async fn inventory(State(state): State<AgentState>) -> Reply<Vec<crate::VmRun>> {
    Ok(axum::Json(state.host.inventory().await?))
}

async fn run_state(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Reply<crate::RunState> {
    Ok(axum::Json(state.host.run_state(&id).await?))
}

/// Runs `op` in its own task (a caller that goes away does not cut an operation short)
/// and streams its progress and result as NDJSON [`Line`]s.
fn streamed<T, F, Fut>(op: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(ProgressFn) -> Fut,
    Fut: Future<Output = Result<T, HostError>> + Send + 'static,
{
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, Infallible>>();
    let progress_tx = tx.clone();
    let progress: ProgressFn = Arc::new(move |stage: &str, percent: u8| {
        // A caller gone away stops reading; the operation goes on.
        let _ = progress_tx.unbounded_send(Ok(line(&Line::<()>::Progress {
            stage: stage.to_owned(),
            percent,
        })));
    });
    let operation = op(progress);
    tokio::spawn(async move {
        let end = match operation.await {
            Ok(value) => line(&Line::Ok(value)),
            Err(err) => line(&Line::<()>::Err(WireError::from(&err))),
        };
        let _ = tx.unbounded_send(Ok(end));
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(rx),
    )
        .into_response()
}

fn line<T: Serialize>(line: &Line<T>) -> Bytes {
    let mut text = serde_json::to_vec(line).unwrap_or_else(|err| {
        serde_json::to_vec(&Line::<()>::Err(WireError::new(
            ErrorKind::Other,
            format!("encoding the reply: {err}"),
        )))
        .unwrap_or_default()
    });
    text.push(b'\n');
    Bytes::from(text)
}

/// A VM id in the path must be the one in the plan.
fn same_vm(path: &str, plan: &VmPlan) -> Result<(), Failure> {
    if path == plan.id {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::BAD_REQUEST,
            WireError::new(
                ErrorKind::BadRequest,
                format!("the path names VM {path}, the plan {}", plan.id),
            ),
        ))
    }
}

async fn prepare_vm(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let plan: VmPlan = parse(&body)?;
    same_vm(&id, &plan)?;
    Ok(streamed(move |progress| async move {
        state.host.prepare_vm(&plan, progress).await
    }))
}

async fn make_vm(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let MakeBody { plan, prepared } = parse(&body)?;
    same_vm(&id, &plan)?;
    Ok(streamed(move |progress| async move {
        state.host.make_vm(&plan, &prepared, progress).await
    }))
}

async fn hand_out(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<crate::HandedOut> {
    let how: HandOut = parse(&body)?;
    Ok(axum::Json(state.host.hand_out(&id, &how).await?))
}

async fn boot_shell(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<crate::BootedShell> {
    let BootShellBody { launch, plan } = parse(&body)?;
    Ok(axum::Json(
        state.host.boot_shell(&id, &launch, &plan).await?,
    ))
}

async fn join_segment(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<()> {
    let join: crate::SegmentJoin = parse(&body)?;
    Ok(axum::Json(state.host.join_segment(&id, &join).await?))
}

async fn close_forwards(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<crate::LaunchRecord> {
    let super::wire::CloseForwardsBody {
        launch,
        guest_ports,
    } = parse(&body)?;
    Ok(axum::Json(
        state
            .host
            .close_forwards(&id, &launch, &guest_ports)
            .await?,
    ))
}

async fn leave_segment(State(state): State<AgentState>, Path(id): Path<String>) -> Reply<()> {
    Ok(axum::Json(state.host.leave_segment(&id).await?))
}

async fn sleep(State(state): State<AgentState>, Path(id): Path<String>) -> Reply<()> {
    Ok(axum::Json(state.host.sleep(&id).await?))
}

async fn archive(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<crate::ArchiveFacts> {
    let ArchiveBody { tier } = parse(&body)?;
    Ok(axum::Json(state.host.archive(&id, tier).await?))
}

/// `?from=&max=` of the console route.
#[derive(serde::Deserialize)]
struct ConsoleQuery {
    from: Option<u64>,
    max: Option<u32>,
}

/// [`Host::console`]: the bytes as the body, where they start and the console's size in
/// the [`super::wire::CONSOLE_OFFSET`] and [`super::wire::CONSOLE_SIZE`] headers.
async fn console(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<ConsoleQuery>,
) -> Result<Response, Failure> {
    let max = query
        .max
        .unwrap_or(super::wire::CONSOLE_MAX)
        .min(super::wire::CONSOLE_MAX);
    let chunk = state.host.console(&id, query.from, max).await?;
    Ok((
        [
            (super::wire::CONSOLE_OFFSET, chunk.offset.to_string()),
            (super::wire::CONSOLE_SIZE, chunk.size.to_string()),
            (
                header::CONTENT_TYPE.as_str(),
                "application/octet-stream".to_owned(),
            ),
        ],
        chunk.data,
    )
        .into_response())
}

async fn archive_facts(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Reply<Option<crate::ArchiveFacts>> {
    Ok(axum::Json(state.host.archive_facts(&id).await?))
}

async fn wake(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<crate::Woken> {
    let from: WakeFrom = parse(&body)?;
    Ok(axum::Json(state.host.wake(&id, &from).await?))
}

async fn adopt(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<Option<crate::Adopted>> {
    let AdoptBody { launch, running } = parse(&body)?;
    Ok(axum::Json(state.host.adopt(&id, &launch, running).await?))
}

async fn migrate_incoming(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<crate::IncomingVm> {
    let super::wire::MigrateIncomingBody { prepared, source } = parse(&body)?;
    Ok(axum::Json(
        state.host.migrate_incoming(&id, &prepared, &source).await?,
    ))
}

async fn migrate_start(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<()> {
    let to: crate::IncomingVm = parse(&body)?;
    Ok(axum::Json(state.host.migrate_start(&id, &to).await?))
}

async fn migrate_status(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Reply<crate::MigrationProgress> {
    Ok(axum::Json(state.host.migrate_status(&id).await?))
}

async fn migrate_window(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Reply<super::wire::MigrationWindow> {
    let next = state.host.migrate_window(&id).await?;
    Ok(axum::Json(super::wire::MigrationWindow {
        next_us: next.map(|d| d.as_micros() as u64),
    }))
}

async fn migrate_switchover(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply<crate::MigrationProgress> {
    let super::wire::SwitchoverBody { downtime_ms } = parse(&body)?;
    Ok(axum::Json(
        state.host.migrate_switchover(&id, downtime_ms).await?,
    ))
}

async fn migrate_abort(State(state): State<AgentState>, Path(id): Path<String>) -> Reply<()> {
    Ok(axum::Json(state.host.migrate_abort(&id).await?))
}

async fn migrate_finish(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Reply<crate::Adopted> {
    Ok(axum::Json(state.host.migrate_finish(&id).await?))
}

async fn stop(State(state): State<AgentState>, Path(id): Path<String>) -> Reply<()> {
    Ok(axum::Json(state.host.stop(&id).await?))
}

async fn destroy(State(state): State<AgentState>, Path(id): Path<String>) -> Reply<()> {
    Ok(axum::Json(state.host.destroy(&id).await?))
}

async fn remove_leftovers(State(state): State<AgentState>, body: Bytes) -> Reply<Vec<String>> {
    let LeftoversBody { keep } = parse(&body)?;
    Ok(axum::Json(state.host.remove_leftovers(&keep).await?))
}

async fn templates_apply(State(state): State<AgentState>, body: Bytes) -> Reply<bool> {
    let service: hangar_core::Service = parse(&body)?;
    Ok(axum::Json(state.host.templates_apply(&service).await))
}

async fn has_template(State(state): State<AgentState>, body: Bytes) -> Reply<bool> {
    let service: hangar_core::Service = parse(&body)?;
    Ok(axum::Json(state.host.has_template(&service).await?))
}

async fn templates(
    State(state): State<AgentState>,
    body: Bytes,
) -> Reply<Vec<crate::TemplateFacts>> {
    let TemplatesBody { services } = parse(&body)?;
    Ok(axum::Json(state.host.templates(&services).await?))
}

async fn remove_template(State(state): State<AgentState>, Path(id): Path<String>) -> Reply<()> {
    Ok(axum::Json(state.host.remove_template(&id).await?))
}

async fn template_bundle(
    State(state): State<AgentState>,
    body: Bytes,
) -> Reply<Option<crate::TemplateBundle>> {
    let service: hangar_core::Service = parse(&body)?;
    Ok(axum::Json(state.host.template_bundle(&service).await?))
}

async fn pull_template(
    State(state): State<AgentState>,
    body: Bytes,
) -> Reply<crate::TemplateFacts> {
    let PullTemplateBody {
        service,
        bundle,
        from,
    } = parse(&body)?;
    Ok(axum::Json(
        state.host.pull_template(&service, &bundle, &from).await?,
    ))
}

async fn vm_bundle(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Reply<crate::VmBundle> {
    Ok(axum::Json(state.host.vm_bundle(&id).await?))
}

async fn pull_vm(State(state): State<AgentState>, body: Bytes) -> Reply<crate::PulledVm> {
    let arrival: crate::VmArrival = parse(&body)?;
    Ok(axum::Json(state.host.pull_vm(&arrival).await?))
}

/// A template file by hash, for a peer pulling the template (see [`router`]).
async fn template_blob(
    State(state): State<AgentState>,
    Path(sha256): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, Failure> {
    let not_found = || {
        Failure(
            StatusCode::NOT_FOUND,
            WireError::new(
                ErrorKind::Other,
                format!("no template file {sha256} is offered here"),
            ),
        )
    };
    if !hangar_api::Blob::is_hash(&sha256) {
        return Err(not_found());
    }
    // Looked up again once when the file went away between the lookup and the open (a
    // moved VM being removed while another bundle offers the same bytes).
    let mut opened = Err(String::new());
    for _ in 0..2 {
        let Some(path) = state.host.template_blob(&sha256).await else {
            tracing::warn!(sha256, "a peer asked for a file this host does not offer");
            return Err(not_found());
        };
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                opened = Ok((path, file));
                break;
            }
            Err(err) => opened = Err(format!("{}: {err}", path.display())),
        }
    }
    let (path, file) = opened.map_err(|why| {
        tracing::warn!(sha256, error = %why, "a file offered to peers cannot be opened");
        Failure(
            StatusCode::NOT_FOUND,
            WireError::new(
                ErrorKind::Other,
                format!("the file offered as {sha256} cannot be opened: {why}"),
            ),
        )
    })?;
    let size = file
        .metadata()
        .await
        .map_err(|err| {
            Failure::from(HostError::Io {
                path: path.display().to_string(),
                source: err,
            })
        })?
        .len();
    super::files::send_file(file, size, &headers)
        .await
        .map_err(|err| {
            let status = match err {
                super::files::SendError::PastEnd(_) => StatusCode::RANGE_NOT_SATISFIABLE,
                super::files::SendError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Failure(status, WireError::new(ErrorKind::Other, err.to_string()))
        })
}
