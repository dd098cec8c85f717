//! Every error answer in the one JSON shape, [`ErrorBody`], also those the handlers never
//! see: axum's own answers for a wrong method (405), a body over the limit (413), a query
//! string or path parameter that does not parse (400), and any other extractor rejection.

use axum::body::{Body, to_bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use hangar_api::{ErrorBody, ErrorDetail};

/// How much of a non-JSON error body is kept as the message.
const MESSAGE_LIMIT: usize = 64 * 1024;

/// Middleware: passes success answers and JSON error answers on as they are; replaces the
/// body of any other error answer with an [`ErrorBody`] (same status and headers), its
/// message taken from the original text.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match to_bytes(body, MESSAGE_LIMIT).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    // axum adds `Allow` to a 405 after this layer ran; the message points to it.
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            "method not allowed on this path; the Allow header and /v1/openapi.json list its methods"
                .to_owned()
        }
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
        _ => text,
    };
    let body = ErrorBody {
        error: ErrorDetail {
            code: code(status).into(),
            message,
            alternatives: Vec::new(),
            task: None,
            retry_after_s: None,
            problems: Vec::new(),
        },
    };
    let bytes = serde_json::to_vec(&body).expect("an error body serializes");
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, bytes.len().into());
    Response::from_parts(parts, Body::from(bytes))
}

/// The [`ErrorDetail::code`] of an error status that axum answered.
fn code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        status if status.is_server_error() => "internal",
        _ => "bad_request",
    }
}
