//! A VM's serial console in the browser: `GET /v1/vms/{id}/console` (the last
//! [`TAIL_BYTES`] as text) and `GET /v1/vms/{id}/console/ws` (a websocket of its output:
//! first that tail, then new bytes as they appear, read through [`hangar_host::Host::console`]
//! every [`POLL_EVERY`], so VMs on farm hosts work too). Both see what `GET /v1/vms/{id}`
//! sees. The websocket is read-only: frames from the browser are ignored (a guest has no
//! login on its serial line). It closes when the VM is deleted or fails, or the caller's
//! token stops working.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hangar_core::VmState;
use hangar_store::now_ms;

use crate::api::auth::Caller;
use crate::api::error::{ApiError, ErrorBody};
use crate::manager::Manager;

/// How much of the console the first answer holds.
pub const TAIL_BYTES: u32 = 64 * 1024;

/// How often the websocket looks for new output.
pub const POLL_EVERY: Duration = Duration::from_millis(200);

/// The VM, 404 when it does not exist or the caller may not see it.
async fn visible_vm(manager: &Manager, caller: &Caller, id: &str) -> Result<(), ApiError> {
    manager.check_vm_access(caller, id, false).await?;
    match manager.store().vm(id).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::NotFound {
            message: format!("no VM {id}"),
            alternatives: Vec::new(),
        }),
    }
}

/// The last 64 KiB of a VM's serial console.
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/console",
    params(("id" = String, Path, description = "the VM")),
    responses(
        (status = 200, content_type = "text/plain; charset=utf-8", description = "the console's last 64 KiB (empty when it printed nothing)"),
        (status = 404, body = ErrorBody, description = "no such VM (or someone else's dedicated one)"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn console_text(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible_vm(&manager, &caller, &id).await?;
    let host = manager.host_of_id(&id).await;
    let chunk = host
        .console(&id, None, TAIL_BYTES)
        .await
        .map_err(|err| ApiError::Internal(crate::api::error::error_chain(&err)))?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        chunk.data,
    )
        .into_response())
}

/// The VM's console output as binary websocket frames (see the module documentation).
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/console/ws",
    params(("id" = String, Path, description = "the VM")),
    responses(
        (status = 101, description = "a websocket: binary frames of console output"),
        (status = 400, body = ErrorBody, description = "not a websocket upgrade"),
        (status = 404, body = ErrorBody, description = "no such VM (or someone else's dedicated one)"),
    )
)]
pub(crate) async fn console_ws(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    visible_vm(&manager, &caller, &id).await?;
    let upgrade = upgrade
        .map_err(|err| ApiError::BadRequest(format!("a websocket upgrade is expected: {err}")))?;
    Ok(upgrade
        .on_upgrade(move |socket| follow(manager, caller, id, socket))
        .into_response())
}

/// Whether VM `id` is still there to follow, and `caller`'s token still works.
async fn still_following(manager: &Manager, caller: &Caller, id: &str) -> bool {
    let vm_there = matches!(
        manager.store().vm(id).await,
        Ok(Some(vm)) if !matches!(vm.state, VmState::Deleted | VmState::Failed)
    );
    let token_works = matches!(
        manager.store().token(&caller.token_id).await,
        Ok(Some(token)) if token.usable_at(now_ms())
    );
    vm_there && token_works
}

/// Sends VM `id`'s console output on `socket` until the VM goes or the socket closes.
async fn follow(manager: Arc<Manager>, caller: Caller, id: String, mut socket: WebSocket) {
    let host = manager.host_of_id(&id).await;
    let mut next: Option<u64> = None;
    loop {
        let going_on = still_following(&manager, &caller, &id).await;
        let mut behind = false;
        match host.console(&id, next, TAIL_BYTES).await {
            Ok(chunk) => {
                let end = chunk.offset + chunk.data.len() as u64;
                behind = end < chunk.size;
                if !chunk.data.is_empty()
                    && socket
                        .send(Message::Binary(chunk.data.into()))
                        .await
                        .is_err()
                {
                    return;
                }
                next = Some(end);
            }
            Err(err) => {
                tracing::debug!(vm = %id, error = %crate::api::error::error_chain(&err), "cannot read the console");
            }
        }
        if !going_on {
            break;
        }
        if behind {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            message = socket.recv() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                // Input is ignored: the console is read-only.
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
