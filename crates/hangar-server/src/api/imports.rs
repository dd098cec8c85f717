//! `POST /v1/imports`, `GET /v1/imports`, `DELETE /v1/imports/{name}`: machines imported
//! from disk images (see [`crate::imports`]).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hangar_api::{ImportQuery, ImportView};

use crate::api::auth::Caller;
use crate::api::error::{ApiError, ErrorBody};
use crate::manager::Manager;

/// Import a machine: the body is its disk image (`application/octet-stream`, streamed to
/// a private file; at most the server's upload limit), read only as the `format` named.
/// Answered once the image is checked (no backing file, external data file, foreign
/// extent or encryption; sizes within the limits), staged (its identity stripped) and
/// stored; the import is a task of kind `import`.
#[utoipa::path(
    post,
    path = "/v1/imports",
    params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the disk image"),
    responses(
        (status = 201, body = ImportView),
        (status = 400, body = ErrorBody, description = "malformed name, format, ports or size"),
        (status = 409, body = ErrorBody, description = "the name is taken"),
        (status = 422, body = ErrorBody, description = "the image is refused: a backing or data file, a foreign extent, encryption, sizes over the limits, no OS found"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn import_machine(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<ImportQuery>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<ImportView>), ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    match manager
        .import_machine(&caller.user, &query, &mut stream)
        .await
    {
        Ok(view) => Ok((StatusCode::CREATED, Json(view))),
        Err(err) => {
            // Refused before the upload was read (a name taken, a malformed query): the
            // rest is read and dropped, up to the limit, so the client, still sending,
            // gets the answer rather than a broken connection.
            let mut left = manager.config.import_limits.max_upload_bytes;
            while left > 0 {
                match stream.next().await {
                    Some(Ok(chunk)) => left = left.saturating_sub(chunk.len() as u64),
                    _ => break,
                }
            }
            Err(err.into())
        }
    }
}

/// The imported machines.
#[utoipa::path(
    get,
    path = "/v1/imports",
    responses(
        (status = 200, body = [ImportView]),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn list_imports(
    State(manager): State<Arc<Manager>>,
) -> Result<Json<Vec<ImportView>>, ApiError> {
    Ok(Json(manager.imports().await?))
}

/// Remove an imported machine: its record and its model disk. 409 while VMs of it live.
#[utoipa::path(
    delete,
    path = "/v1/imports/{name}",
    params(("name" = String, Path, description = "the imported machine")),
    responses(
        (status = 200, body = ImportView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "VMs of it still live"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn delete_import(
    State(manager): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<ImportView>, ApiError> {
    Ok(Json(manager.delete_import(&name).await?))
}
