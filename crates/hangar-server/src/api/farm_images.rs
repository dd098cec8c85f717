//! Images for farm hosts (`/v1/farm/...`, farm token only): manifests of what the server's
//! image source built, as blobs, and the blobs' bytes by sha256 (resumable with `Range`).
//! Hosts never build images: they pull these (see `hangar_host::images::pulled`).

use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hangar_api::{AssetsManifest, Blob, RootBody, RootManifest};
use hangar_core::catalog::Never;
use hangar_host::agent::files::{PastEnd, SendError};

use crate::api::error::{ApiError, ErrorBody, error_chain};
use crate::api::farm_auth::FarmCaller;
use crate::images::ImageSourceError;
use crate::images::blobs::BlobError;
use crate::manager::Manager;

impl From<BlobError> for ApiError {
    fn from(err: BlobError) -> ApiError {
        ApiError::Internal(error_chain(&err))
    }
}

fn image_error(err: ImageSourceError) -> ApiError {
    match err {
        ImageSourceError::NoOs(os) => ApiError::NotFound {
            message: format!("no os {os:?}"),
            alternatives: Vec::new(),
        },
        err => ApiError::Internal(error_chain(&err)),
    }
}

async fn list(manager: &Manager, path: &Path) -> Result<Blob, ApiError> {
    Ok(manager.image_runtime.blobs.list(path).await?)
}

/// The kernel and initramfs every guest boots, as blobs.
#[utoipa::path(
    get,
    path = "/v1/farm/assets",
    responses(
        (status = 200, body = AssetsManifest),
        (status = 401, body = ErrorBody, description = "no or a wrong farm token"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(super) async fn farm_assets(
    _caller: FarmCaller,
    State(manager): State<Arc<Manager>>,
) -> Result<Json<AssetsManifest>, ApiError> {
    let assets = manager.images.guest_assets().await.map_err(image_error)?;
    Ok(Json(AssetsManifest {
        vmlinux: list(&manager, &assets.vmlinux).await?,
        initramfs: list(&manager, &assets.initramfs).await?,
        kernel_release: assets.kernel_release,
        hash: assets.hash,
    }))
}

/// The root of a service on an OS, as blobs: built here first when it is not cached (this
/// can take minutes for layered roots; the answer waits).
#[utoipa::path(
    post,
    path = "/v1/farm/roots",
    request_body = RootBody,
    responses(
        (status = 200, body = RootManifest),
        (status = 400, body = ErrorBody, description = "malformed body"),
        (status = 401, body = ErrorBody, description = "no or a wrong farm token"),
        (status = 404, body = ErrorBody, description = "no such service or OS"),
        (status = 422, body = ErrorBody, description = "the service is not offered on this OS"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(super) async fn farm_root(
    _caller: FarmCaller,
    State(manager): State<Arc<Manager>>,
    body: axum::body::Bytes,
) -> Result<Json<RootManifest>, ApiError> {
    let body: RootBody = super::json_body(&body)?;
    let service = match manager.catalog().viable(&body.service, &body.os) {
        Ok(service) => service.clone(),
        Err(Never::NoService) => {
            return Err(ApiError::NotFound {
                message: format!("no service {:?}", body.service),
                alternatives: manager.catalog().alternatives(&body.service, None, 3),
            });
        }
        Err(Never::Combination { reason }) => {
            return Err(ApiError::Never {
                message: reason,
                alternatives: manager
                    .catalog()
                    .alternatives(&body.service, Some(&body.os), 3),
            });
        }
    };
    let progress: crate::images::ProgressFn = Arc::new(|_: &str, _: u8| {});
    let root = manager
        .images
        .root_image(&service, &body.os, progress)
        .await
        .map_err(image_error)?;
    let base = match &root.base {
        Some(path) => Some(list(&manager, path).await?),
        None => None,
    };
    let mut layers = Vec::with_capacity(root.layers.len());
    for path in &root.layers {
        layers.push(list(&manager, path).await?);
    }
    Ok(Json(RootManifest {
        base,
        layers,
        layer_hashes: root.layer_hashes,
    }))
}

/// The bare root disk of an OS as a blob (for pre-OS shells); `null` for a layered OS.
#[utoipa::path(
    get,
    path = "/v1/farm/os/{os}",
    params(("os" = String, Path, description = "an operating system of the catalog")),
    responses(
        (status = 200, body = Option<Blob>),
        (status = 401, body = ErrorBody, description = "no or a wrong farm token"),
        (status = 404, body = ErrorBody, description = "no such OS"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(super) async fn farm_os(
    _caller: FarmCaller,
    State(manager): State<Arc<Manager>>,
    UrlPath(os): UrlPath<String>,
) -> Result<Json<Option<Blob>>, ApiError> {
    match manager.images.os_image(&os).await.map_err(image_error)? {
        Some(path) => Ok(Json(Some(list(&manager, &path).await?))),
        None => Ok(Json(None)),
    }
}

/// The bytes of a blob listed in a manifest. `Range: bytes=N-` (or `bytes=N-M`) sends
/// the rest from byte N (206 with `Content-Range`), to resume a cut download; other
/// ranges are ignored (200, the whole file).
#[utoipa::path(
    get,
    path = "/v1/farm/blobs/{sha256}",
    params(("sha256" = String, Path, description = "the blob's sha256, as a manifest gave it")),
    responses(
        (status = 200, content_type = "application/octet-stream", description = "the whole file"),
        (status = 206, content_type = "application/octet-stream", description = "the range asked for"),
        (status = 401, body = ErrorBody, description = "no or a wrong farm token"),
        (status = 404, body = ErrorBody, description = "no blob listed under this hash (ask for the manifest again)"),
        (status = 416, body = ErrorBody, description = "the range starts past the end"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(super) async fn farm_blob(
    _caller: FarmCaller,
    State(manager): State<Arc<Manager>>,
    UrlPath(sha256): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound {
        message: format!("no blob {sha256} was listed; ask for the manifest again"),
        alternatives: Vec::new(),
    };
    if !Blob::is_hash(&sha256) {
        return Err(not_found());
    }
    let Some(blob) = manager.image_runtime.blobs.open(&sha256).await? else {
        return Err(not_found());
    };
    let size = blob.size;
    match hangar_host::agent::files::send_file(blob.file, size, &headers).await {
        Ok(response) => Ok(response),
        Err(SendError::PastEnd(PastEnd { size, first })) => {
            let body = ErrorBody {
                error: hangar_api::ErrorDetail {
                    code: "range_not_satisfiable".into(),
                    message: format!("the blob has {size} bytes; the range starts at {first}"),
                    alternatives: Vec::new(),
                    task: None,
                    retry_after_s: None,
                    problems: Vec::new(),
                },
            };
            let content_range = format!("bytes */{size}");
            Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, content_range)],
                Json(body),
            )
                .into_response())
        }
        Err(SendError::Io(err)) => Err(ApiError::internal(err)),
    }
}
