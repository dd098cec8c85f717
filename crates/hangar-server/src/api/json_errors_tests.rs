//! Every error answer is the one JSON [`ErrorBody`], including those axum makes before a
//! handler runs.

use axum::Router;
use axum::http::{StatusCode, header};
use hangar_api::ErrorBody;

use super::tests::{Answer, send};
use crate::manager::ManagerConfig;
use crate::test_support::fake_manager;

const CATALOG: &str = crate::test_support::WEB;

fn api() -> Router {
    let (manager, _, _) = fake_manager(CATALOG, ManagerConfig::default());
    super::router(manager)
}

/// Asserts `answer` is `status` with a JSON [`ErrorBody`] of `code`; returns the body.
fn error_body(answer: &Answer, status: StatusCode, code: &str) -> ErrorBody {
    assert_eq!(
        answer.status,
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.content_type(), "application/json");
    let body: ErrorBody = serde_json::from_slice(&answer.body).unwrap_or_else(|err| {
        panic!(
            "not an error body ({err}): {}",
            String::from_utf8_lossy(&answer.body)
        )
    });
    assert_eq!(body.error.code, code, "{}", body.error.message);
    assert!(!body.error.message.is_empty());
    body
}

#[tokio::test]
async fn an_unknown_path_answers_404_json() {
    let answer = send(&api(), "GET", "/v1/nope", None, "").await;
    let body = error_body(&answer, StatusCode::NOT_FOUND, "not_found");
    assert!(body.error.message.contains("/v1/openapi.json"));
}

#[tokio::test]
async fn a_wrong_method_answers_405_json_and_keeps_allow() {
    let answer = send(&api(), "DELETE", "/v1/services", None, "").await;
    let body = error_body(
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let allow = answer.headers[header::ALLOW].to_str().unwrap();
    assert!(allow.contains("GET"), "{allow}");
    assert!(
        body.error.message.contains("Allow"),
        "{}",
        body.error.message
    );
}

#[tokio::test]
async fn a_body_over_the_limit_answers_413_json() {
    let big = format!(
        r#"{{"service":"web","env":{{"x":"{}"}}}}"#,
        "a".repeat(3 << 20)
    );
    let answer = send(&api(), "POST", "/v1/requests", None, big).await;
    error_body(&answer, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
}

#[tokio::test]
async fn a_bad_query_string_or_path_parameter_answers_400_json() {
    let api = api();
    let answer = send(&api, "GET", "/v1/vms?all=maybe", None, "").await;
    let body = error_body(&answer, StatusCode::BAD_REQUEST, "bad_request");
    assert!(
        body.error.message.contains("query"),
        "{}",
        body.error.message
    );
    // A path parameter that is not UTF-8 once decoded.
    let answer = send(&api, "GET", "/v1/vms/%FF%FE", None, "").await;
    error_body(&answer, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn malformed_or_misshapen_json_bodies_answer_400_json() {
    let api = api();
    for (uri, body) in [
        ("/v1/requests", "{not json"),
        ("/v1/requests", "[1, 2]"),
        ("/v1/requests", r#"{"service": 7}"#),
        ("/v1/requests", r#"{"service": "web", "colour": "blue"}"#),
        ("/v1/images", ""),
    ] {
        let answer = send(&api, "POST", uri, None, body).await;
        let error = error_body(&answer, StatusCode::BAD_REQUEST, "bad_request");
        assert!(
            error.error.message.starts_with("invalid request body"),
            "{body}: {}",
            error.error.message
        );
    }
    // A body of another declared type is refused before it is read (a browser sends
    // text/plain across sites without asking first).
    let answer = send(
        &api,
        "POST",
        "/v1/requests",
        Some("text/plain"),
        r#"{"service": "web"}"#,
    )
    .await;
    error_body(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
}

/// Routes that take axum's `Json` extractor get its rejections (415 wrong content type, 400
/// malformed, 422 misshapen) as JSON too: the layer covers any route, not only today's.
#[tokio::test]
async fn extractor_rejections_of_any_route_answer_json() {
    #[derive(serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        n: u32,
    }
    let router = Router::new()
        .route(
            "/json",
            axum::routing::post(|_: axum::Json<Body>| async { "ok" }),
        )
        .layer(axum::middleware::from_fn(super::json_errors::json_errors));
    let answer = send(&router, "POST", "/json", Some("text/plain"), "{}").await;
    error_body(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let answer = send(&router, "POST", "/json", None, "{").await;
    error_body(&answer, StatusCode::BAD_REQUEST, "bad_request");
    let answer = send(&router, "POST", "/json", None, r#"{"n": "x"}"#).await;
    error_body(&answer, StatusCode::UNPROCESSABLE_ENTITY, "bad_request");
    let answer = send(&router, "POST", "/json", None, r#"{"n": 1}"#).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(&answer.body[..], b"ok", "success answers pass untouched");
}
