//! The API as a contract, on the fake backend: every route the router serves is in
//! `/v1/openapi.json`, and every answer, errors included, matches its schema there.

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::manager::ManagerConfig;
use crate::test_support::fake_manager;

const CATALOG: &str = crate::test_support::WEB_AND_NEVER_READY;

/// The API's router over a fake manager.
/// The farm token of [`api`]'s server.
const FARM_TOKEN: &str = "farm-token-for-the-api-tests";

fn api() -> Router {
    let (manager, backend, _) = fake_manager(
        CATALOG,
        ManagerConfig {
            farm_token: FARM_TOKEN.into(),
            ..ManagerConfig::default()
        },
    );
    // Stacks join their members to a segment: the fake VMs' segment sockets live here.
    static SEGMENTS: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let segments = SEGMENTS.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("seg")
            .tempdir_in("/tmp")
            .expect("segment dir")
    });
    backend.keep_segment_sockets_in(segments.path());
    crate::api::router(manager)
}

/// One answer of the router.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON; panics (with the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "HTTP {} answered a body that is not JSON ({err}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Sends `method uri` with `body` (as JSON when `content_type` is `None`) as the admin of
/// the fake manager's store.
pub(crate) async fn send(
    router: &Router,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> Answer {
    send_as(
        router,
        Some(crate::test_support::ADMIN_TOKEN),
        method,
        uri,
        content_type,
        body,
    )
    .await
}

/// [`send`], with `token` as the bearer token when given.
pub(crate) async fn send_as(
    router: &Router,
    token: Option<&str>,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> Answer {
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri)
        .header(
            header::CONTENT_TYPE,
            content_type.unwrap_or("application/json"),
        );
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = router
        .clone()
        .oneshot(request.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    // An event stream never ends: its head is the answer.
    let streaming = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let body = if streaming {
        Bytes::new()
    } else {
        response.into_body().collect().await.unwrap().to_bytes()
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// The path templates the router matches, read from its `Debug` form (axum lists its
/// routes' paths there; it offers no other way to enumerate them).
fn served_paths(router: &Router) -> BTreeSet<String> {
    let debug = format!("{router:?}");
    let start = debug
        .find("paths: {")
        .expect("axum's Router debug output lists `paths: {...}`");
    // `RouteId(1): "/healthz", RouteId(2): "/v1/vms/{id}", ...}`
    let mut rest = &debug[start + "paths: {".len()..];
    let mut paths = BTreeSet::new();
    while let Some(entry) = rest
        .trim_start_matches([',', ' ', '\n'])
        .strip_prefix("RouteId(")
    {
        let (_, quoted) = entry.split_once(": \"").expect("RouteId(N): \"PATH\"");
        let (path, after) = quoted.split_once('"').expect("closing quote");
        paths.insert(path.to_owned());
        rest = after;
    }
    assert!(
        paths.contains("/healthz") && paths.len() > 10,
        "the router's paths could not be read from its debug output: {paths:?}"
    );
    paths
}

/// `template` with each `{param}` filled in.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "x"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The methods the router serves at `template`, from the `Allow` header of its 405 answer to
/// a method no route uses (HEAD left out: axum answers it wherever GET is served).
async fn served_methods(router: &Router, template: &str) -> BTreeSet<String> {
    let answer = send(router, "PROBE", &concrete(template), None, "").await;
    assert_eq!(
        answer.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "{template} answered an unknown method with something else than 405"
    );
    let allow = answer
        .headers
        .get(header::ALLOW)
        .unwrap_or_else(|| panic!("{template}: 405 without Allow"))
        .to_str()
        .unwrap();
    allow
        .split(',')
        .map(|m| m.trim().to_ascii_uppercase())
        .filter(|m| !m.is_empty() && m != "HEAD")
        .collect()
}

/// Path template → methods, as the document lists them.
fn documented(document: &Value) -> BTreeMap<String, BTreeSet<String>> {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|key| {
                    [
                        "get", "put", "post", "delete", "patch", "options", "head", "trace",
                    ]
                    .contains(&key.as_str())
                })
                .map(|m| m.to_ascii_uppercase())
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

#[tokio::test]
async fn every_route_the_router_serves_is_in_the_openapi_document() {
    let router = api();
    let answer = send(&router, "GET", "/v1/openapi.json", None, "").await;
    assert_eq!(answer.status, StatusCode::OK);
    let documented = documented(&answer.json());

    let mut served = BTreeMap::new();
    for path in served_paths(&router) {
        let methods = served_methods(&router, &path).await;
        served.insert(path, methods);
    }
    assert_eq!(
        served, documented,
        "the routes the router serves (left) and those /v1/openapi.json lists (right) differ"
    );
}

/// Checks `answer` to `method template` against the document: its status is documented
/// for the operation, and a JSON answer matches the schema given for that status.
fn check_answer(document: &Value, method: &str, template: &str, answer: &Answer) {
    let operation = &document["paths"][template][method.to_ascii_lowercase()];
    assert!(
        operation.is_object(),
        "{method} {template} is not in the document"
    );
    let documented = &operation["responses"][answer.status.as_str()];
    assert!(
        documented.is_object(),
        "{method} {template} answered {} which the document does not list: {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    let content = documented["content"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if !answer.content_type().starts_with("application/json") {
        assert!(
            content.contains_key(answer.content_type()),
            "{method} {template} answered {} as {:?}; the document says {:?}",
            answer.status,
            answer.content_type(),
            content.keys().collect::<Vec<_>>()
        );
        return;
    }
    let schema = &content
        .get("application/json")
        .unwrap_or_else(|| panic!("{method} {template} {}: no JSON schema", answer.status))["schema"];
    // The schema's `#/components/schemas/...` references resolve against this root.
    let mut root = schema.clone();
    root["components"] = document["components"].clone();
    let validator = jsonschema::draft202012::new(&root)
        .unwrap_or_else(|err| panic!("{method} {template}: the document's schema: {err}"));
    let instance = answer.json();
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|err| format!("{} at {}", err, err.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {template} answered {} not matching its schema: {errors:#?}\n{instance:#}",
        answer.status
    );
}

#[tokio::test]
async fn the_schema_check_refuses_an_answer_that_does_not_match() {
    let router = api();
    let document = send(&router, "GET", "/v1/openapi.json", None, "")
        .await
        .json();
    let answer = |status: StatusCode, body: &str| Answer {
        status,
        headers: HeaderMap::from_iter([(
            header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        )]),
        body: Bytes::from(body.to_owned()),
    };
    let refused = |status, body: &'static str| {
        let document = document.clone();
        std::panic::catch_unwind(move || {
            check_answer(&document, "GET", "/v1/tasks/{id}", &answer(status, body))
        })
        .is_err()
    };
    // A task without most of its fields, an error body of the wrong shape, an undocumented
    // status: each is refused; a well-formed error body passes.
    assert!(refused(StatusCode::OK, r#"{"id": "task-1"}"#));
    assert!(refused(StatusCode::NOT_FOUND, r#"{"error": "no task"}"#));
    assert!(refused(
        StatusCode::CONFLICT,
        r#"{"error": {"code": "conflict", "message": "x"}}"#
    ));
    assert!(!refused(
        StatusCode::NOT_FOUND,
        r#"{"error": {"code": "not_found", "message": "x"}}"#
    ));
}

/// Sends requests to every operation of the document, checks each answer with
/// [`check_answer`], and remembers which operations were exercised.
struct Exerciser {
    router: Router,
    document: Value,
    exercised: BTreeSet<(String, String)>,
}

impl Exerciser {
    async fn call(&mut self, method: &str, template: &str, uri: &str, body: &str) -> Answer {
        self.call_as(
            Some(crate::test_support::ADMIN_TOKEN),
            method,
            template,
            uri,
            body,
        )
        .await
    }

    async fn call_as(
        &mut self,
        token: Option<&str>,
        method: &str,
        template: &str,
        uri: &str,
        body: &str,
    ) -> Answer {
        let answer = send_as(&self.router, token, method, uri, None, body.to_owned()).await;
        check_answer(&self.document, method, template, &answer);
        self.exercised
            .insert((template.to_owned(), method.to_ascii_uppercase()));
        answer
    }
}

#[tokio::test]
async fn every_answer_matches_its_schema_in_the_openapi_document() {
    let router = api();
    let document = send(&router, "GET", "/v1/openapi.json", None, "")
        .await
        .json();
    let mut api = Exerciser {
        router,
        document,
        exercised: BTreeSet::new(),
    };

    api.call("GET", "/healthz", "/healthz", "").await;
    api.call("GET", "/v1/openapi.json", "/v1/openapi.json", "")
        .await;
    api.call("GET", "/v1/services", "/v1/services", "").await;

    // Requests: granted, malformed, unknown, never possible, not ready in time.
    let grant = api
        .call(
            "POST",
            "/v1/requests",
            "/v1/requests",
            r#"{"service":"web"}"#,
        )
        .await
        .json();
    let id = grant["vm"].as_str().unwrap().to_owned();
    let task = grant["task"].as_str().unwrap().to_owned();
    for (body, status) in [
        ("{not json", StatusCode::BAD_REQUEST),
        (r#"{"service":"wbe"}"#, StatusCode::NOT_FOUND),
        (
            r#"{"service":"web","env":{"os":"debian-12"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"service":"never-ready","deadline_ms":50}"#,
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            r#"{"config":{"vcpus":1000000000,"memory_mib":{"min":128,"max":128},"os":{"name":"busybox"}}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"config":{"vcpus":1,"memory_mib":{"min":262144,"max":262144},"os":{"name":"busybox"}}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let answer = api.call("POST", "/v1/requests", "/v1/requests", body).await;
        assert_eq!(answer.status, status, "{body}");
    }

    // The heuristics engine's verdict: 200 whether the request is valid or not.
    let check = "/v1/requests/check";
    let sound = api
        .call(
            "POST",
            check,
            check,
            r#"{"config":{"vcpus":1,"memory_mib":{"min":128,"max":128},"os":{"name":"busybox"}}}"#,
        )
        .await;
    assert_eq!(sound.status, StatusCode::OK);
    assert_eq!(sound.json()["ok"], true, "{}", sound.json());
    let unsound = api
        .call(
            "POST",
            check,
            check,
            r#"{"config":{"vcpus":0,"memory_mib":{"min":128,"max":128},"os":{"name":"plan9"}}}"#,
        )
        .await;
    assert_eq!(unsound.status, StatusCode::OK);
    let verdict = unsound.json();
    assert_eq!(verdict["ok"], false);
    let codes: Vec<&str> = verdict["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["vcpus_zero", "unknown_os"], "{verdict}");
    let service = api.call("POST", check, check, r#"{"service":"web"}"#).await;
    assert_eq!(service.status, StatusCode::OK);
    for (body, status) in [
        ("{not json", StatusCode::BAD_REQUEST),
        ("{}", StatusCode::BAD_REQUEST),
        (r#"{"service":"wbe"}"#, StatusCode::NOT_FOUND),
        (
            r#"{"service":"web","env":{"os":"debian-12"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let answer = api.call("POST", check, check, body).await;
        assert_eq!(answer.status, status, "{body}");
    }

    // VMs and their lifecycle, with the conflicts of the state machine.
    let vm = "/v1/vms/{id}";
    api.call("GET", "/v1/vms", "/v1/vms", "").await;
    api.call("GET", "/v1/vms", "/v1/vms?all=true", "").await;
    let bad_query = api.call("GET", "/v1/vms", "/v1/vms?all=maybe", "").await;
    assert_eq!(bad_query.status, StatusCode::BAD_REQUEST);
    api.call("GET", vm, &format!("/v1/vms/{id}"), "").await;
    let missing = api.call("GET", vm, "/v1/vms/vm-unknown", "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let sleep = "/v1/vms/{id}/sleep";
    let wake = "/v1/vms/{id}/wake";
    let archive = "/v1/vms/{id}/archive";
    let asleep = api
        .call("POST", sleep, &format!("/v1/vms/{id}/sleep"), "")
        .await;
    assert_eq!(asleep.status, StatusCode::OK);
    api.call("POST", wake, &format!("/v1/vms/{id}/wake"), "")
        .await;
    let archived = api
        .call(
            "POST",
            archive,
            &format!("/v1/vms/{id}/archive"),
            r#"{"tier":"raw"}"#,
        )
        .await;
    assert_eq!(archived.status, StatusCode::OK);
    assert_eq!(archived.json()["archive"]["tier"], "raw");
    let conflict = api
        .call("POST", sleep, &format!("/v1/vms/{id}/sleep"), "")
        .await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    let awake = api
        .call("POST", wake, &format!("/v1/vms/{id}/wake"), "")
        .await;
    assert_eq!(awake.status, StatusCode::OK);
    let bad_tier = api
        .call(
            "POST",
            archive,
            &format!("/v1/vms/{id}/archive"),
            r#"{"tier":"gzip"}"#,
        )
        .await;
    assert_eq!(bad_tier.status, StatusCode::BAD_REQUEST);
    api.call("POST", wake, "/v1/vms/vm-unknown/wake", "").await;
    // Migration: the server's own host's VMs stay (409), unknown VM (404), bad body (400).
    let migrate = "/v1/vms/{id}/migrate";
    for (uri, body, status) in [
        (
            format!("/v1/vms/{id}/migrate"),
            r#"{"to":"b"}"#,
            StatusCode::CONFLICT,
        ),
        (
            "/v1/vms/vm-unknown/migrate".into(),
            r#"{"to":"b"}"#,
            StatusCode::NOT_FOUND,
        ),
        (
            format!("/v1/vms/{id}/migrate"),
            r#"{"host":"b"}"#,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let answer = api.call("POST", migrate, &uri, body).await;
        assert_eq!(answer.status, status, "{uri} {body}");
    }

    // Pools, templates, policies.
    api.call("GET", "/v1/pools", "/v1/pools", "").await;
    let pool = "/v1/pools/{name}";
    let set = api
        .call("PUT", pool, "/v1/pools/web", r#"{"min":0,"max":2}"#)
        .await;
    assert_eq!(set.status, StatusCode::OK);
    let bad = api
        .call("PUT", pool, "/v1/pools/web", r#"{"minimum":1}"#)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    api.call("PUT", pool, "/v1/pools/nope", r#"{"min":1}"#)
        .await;
    api.call("GET", "/v1/templates", "/v1/templates", "").await;
    api.call("GET", "/v1/policies", "/v1/policies", "").await;
    let policy = "/v1/policies/{service}";
    let set = api
        .call(
            "PUT",
            policy,
            "/v1/policies/web",
            r#"{"sleep_after":"10m"}"#,
        )
        .await;
    assert_eq!(set.status, StatusCode::OK);
    let bad = api
        .call(
            "PUT",
            policy,
            "/v1/policies/web",
            r#"{"sleep_after":"soon"}"#,
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    api.call("PUT", policy, "/v1/policies/nope", "{}").await;
    api.call("DELETE", policy, "/v1/policies/web", "").await;
    api.call("DELETE", policy, "/v1/policies/nope", "").await;

    // Tasks and images.
    api.call("GET", "/v1/tasks", "/v1/tasks", "").await;
    let found = api
        .call("GET", "/v1/tasks/{id}", &format!("/v1/tasks/{task}"), "")
        .await;
    assert_eq!(found.status, StatusCode::OK);
    api.call("GET", "/v1/tasks/{id}", "/v1/tasks/task-unknown", "")
        .await;
    // The task ended: a cancel is a conflict; an unknown one is not found.
    let ended = api
        .call(
            "POST",
            "/v1/tasks/{id}/cancel",
            &format!("/v1/tasks/{task}/cancel"),
            "",
        )
        .await;
    assert_eq!(ended.status, StatusCode::CONFLICT);
    api.call("DELETE", "/v1/tasks/{id}", &format!("/v1/tasks/{task}"), "")
        .await;
    let unknown = api
        .call("DELETE", "/v1/tasks/{id}", "/v1/tasks/task-unknown", "")
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    api.call("GET", "/v1/images", "/v1/images", "").await;
    api.call("POST", "/v1/images", "/v1/images", r#"{"service":"web"}"#)
        .await;
    api.call("POST", "/v1/images", "/v1/images", r#"{"service":"nope"}"#)
        .await;
    api.call("POST", "/v1/export", "/v1/export", r#"{"service":"nope"}"#)
        .await;

    // The farm: agents register and report with the farm token; anyone may list hosts.
    let registration = r#"{"name":"h1","address":"http://10.0.0.2:7800","incarnation":"i1",
        "facts":{"hypervisor":"fake","vcpus":2,"memory_mib":1024,"free_memory_mib":900,
        "free_disk_mib":100,"load":0.5}}"#;
    let heartbeat = r#"{"incarnation":"i1","facts":{"hypervisor":"fake","vcpus":2,
        "memory_mib":1024,"free_memory_mib":900,"free_disk_mib":100,"load":0.5},"vms":[]}"#;
    let beat = "/v1/hosts/{name}/heartbeat";
    let refused = api
        .call_as(None, "POST", "/v1/hosts", "/v1/hosts", registration)
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.headers.contains_key(header::WWW_AUTHENTICATE));
    let wrong = api
        .call_as(
            Some("guess"),
            "POST",
            "/v1/hosts",
            "/v1/hosts",
            registration,
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let token = Some(FARM_TOKEN);
    let unknown = api
        .call_as(token, "POST", beat, "/v1/hosts/h1/heartbeat", heartbeat)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "register first");
    let registered = api
        .call_as(token, "POST", "/v1/hosts", "/v1/hosts", registration)
        .await;
    assert_eq!(registered.status, StatusCode::OK);
    assert_eq!(registered.json()["state"], "up");
    let bad = api
        .call_as(token, "POST", "/v1/hosts", "/v1/hosts", r#"{"name":"h2"}"#)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let reported = api
        .call_as(token, "POST", beat, "/v1/hosts/h1/heartbeat", heartbeat)
        .await;
    assert_eq!(reported.status, StatusCode::OK);
    let hosts = api.call("GET", "/v1/hosts", "/v1/hosts", "").await.json();
    let names: Vec<&str> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["local", "h1"]);

    // The metrics page (as the admin), in Prometheus's text format, with both hosts.
    let metrics = api.call("GET", "/metrics", "/metrics", "").await;
    let page = String::from_utf8_lossy(&metrics.body);
    assert!(page.contains("hangar_host_up{host=\"h1\"} 1"), "{page}");

    // Drain, evacuate (h1 holds no VM: done at once) and resume a farm host.
    let (drain, resume) = ("/v1/hosts/{name}/drain", "/v1/hosts/{name}/resume");
    let (evacuate, evacuation) = ("/v1/hosts/{name}/evacuate", "/v1/hosts/{name}/evacuation");
    let none = api
        .call("GET", evacuation, "/v1/hosts/h1/evacuation", "")
        .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    let unknown = api.call("POST", drain, "/v1/hosts/nope/drain", "").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let drained = api.call("POST", drain, "/v1/hosts/h1/drain", "").await;
    assert_eq!(drained.status, StatusCode::OK);
    assert_eq!(drained.json()["state"], "draining");
    let started = api
        .call("POST", evacuate, "/v1/hosts/h1/evacuate", "")
        .await;
    assert_eq!(started.status, StatusCode::ACCEPTED);
    let mut report = Value::Null;
    for _ in 0..200 {
        report = api
            .call("GET", evacuation, "/v1/hosts/h1/evacuation", "")
            .await
            .json();
        if report["state"] != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(report["state"], "succeeded", "{report}");
    let nowhere = api
        .call("POST", evacuate, "/v1/hosts/nope/evacuate", "")
        .await;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    let resumed = api.call("POST", resume, "/v1/hosts/h1/resume", "").await;
    assert_eq!(resumed.json()["state"], "up");
    let own = api.call("POST", resume, "/v1/hosts/local/resume", "").await;
    assert!(own.status.is_client_error(), "{}", own.status);

    // Placement as a dry run: where a VM would go now, and why; nothing is made.
    let ids = |vms: Value| -> Vec<String> {
        vms.as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let vms_before = ids(api
        .call("GET", "/v1/vms", "/v1/vms?all=true", "")
        .await
        .json());
    let placed = api
        .call(
            "POST",
            "/v1/placements",
            "/v1/placements",
            r#"{"service":"web"}"#,
        )
        .await;
    assert_eq!(placed.status, StatusCode::OK);
    let placed = placed.json();
    assert_eq!(placed["host"], "local", "{placed}");
    assert!(!placed["why"].as_str().unwrap().is_empty(), "{placed}");
    let sized = api
        .call(
            "POST",
            "/v1/placements",
            "/v1/placements",
            r#"{"vcpus":2,"memory_mib":512,"pool":true}"#,
        )
        .await
        .json();
    assert_eq!(
        (sized["vcpus"].as_u64(), sized["memory_mib"].as_u64()),
        (Some(2), Some(512))
    );
    for (body, status) in [
        ("{}", StatusCode::BAD_REQUEST),
        (r#"{"vcpus":0,"memory_mib":512}"#, StatusCode::BAD_REQUEST),
        (
            r#"{"env":{"os":"busybox"},"vcpus":1,"memory_mib":64}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"service":"web","colour":"red"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (r#"{"service":"wbe"}"#, StatusCode::NOT_FOUND),
        (
            r#"{"service":"web","env":{"os":"debian-12"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let answer = api
            .call("POST", "/v1/placements", "/v1/placements", body)
            .await;
        assert_eq!(answer.status, status, "{body}");
    }
    let vms_after = ids(api
        .call("GET", "/v1/vms", "/v1/vms?all=true", "")
        .await
        .json());
    assert_eq!(vms_before, vms_after, "a dry run makes nothing");

    // Images for farm hosts: only with the farm token (401 without it).
    let blob = format!("/v1/farm/blobs/{}", "a".repeat(64));
    for (method, template, uri, body) in [
        ("GET", "/v1/farm/assets", "/v1/farm/assets", ""),
        (
            "POST",
            "/v1/farm/roots",
            "/v1/farm/roots",
            r#"{"service":"web","os":"busybox"}"#,
        ),
        ("GET", "/v1/farm/os/{os}", "/v1/farm/os/busybox", ""),
        ("GET", "/v1/farm/blobs/{sha256}", blob.as_str(), ""),
    ] {
        let answer = api.call_as(None, method, template, uri, body).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{uri}");
    }
    let unknown = api
        .call_as(token, "GET", "/v1/farm/blobs/{sha256}", &blob, "")
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "never listed");

    // Quotas and usage: set, listed, malformed; 429 over a quota.
    let quota = "/v1/quotas/{user}";
    let set = api
        .call("PUT", quota, "/v1/quotas/admin", r#"{"vms":1}"#)
        .await;
    assert_eq!(set.status, StatusCode::OK);
    let bad = api
        .call("PUT", quota, "/v1/quotas/admin", r#"{"vms":"many"}"#)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let over = api
        .call(
            "POST",
            "/v1/requests",
            "/v1/requests",
            r#"{"service":"web","mode":"dedicated"}"#,
        )
        .await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    api.call("PUT", quota, "/v1/quotas/admin", "{}").await;
    api.call("GET", "/v1/quotas", "/v1/quotas", "").await;
    for uri in ["/v1/alerts", "/v1/alerts?all=true"] {
        let alerts = api.call("GET", "/v1/alerts", uri, "").await;
        assert_eq!(alerts.status, StatusCode::OK);
        assert!(alerts.json().is_array());
    }
    let bad = api
        .call("GET", "/v1/alerts", "/v1/alerts?all=maybe", "")
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    for (uri, status) in [
        ("/v1/usage", StatusCode::OK),
        ("/v1/usage?since=1h&by=service", StatusCode::OK),
        ("/v1/usage?by=colour", StatusCode::BAD_REQUEST),
        ("/v1/usage?since=yesterday", StatusCode::BAD_REQUEST),
    ] {
        let answer = api.call("GET", "/v1/usage", uri, "").await;
        assert_eq!(answer.status, status, "{uri}");
    }
    // Users, tokens, who am I, and the audit log.
    let whoami = api.call("GET", "/v1/whoami", "/v1/whoami", "").await.json();
    assert_eq!(
        (&whoami["user"], &whoami["role"]),
        (&"admin".into(), &"admin".into())
    );
    let added = api
        .call(
            "POST",
            "/v1/users",
            "/v1/users",
            r#"{"name":"ana","role":"provisioner"}"#,
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED);
    let taken = api
        .call(
            "POST",
            "/v1/users",
            "/v1/users",
            r#"{"name":"ana","role":"access"}"#,
        )
        .await;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    api.call(
        "POST",
        "/v1/users",
        "/v1/users",
        r#"{"name":"a b","role":"access"}"#,
    )
    .await;
    api.call("GET", "/v1/users", "/v1/users", "").await;
    // Imports: a malformed name (400), a format never read (422), the list, no such one.
    let import = "/v1/imports";
    api.call(
        "POST",
        import,
        "/v1/imports?name=Bad%20Name&format=qcow2",
        "{}",
    )
    .await;
    api.call("POST", import, "/v1/imports?name=disk&format=iso", "{}")
        .await;
    api.call("GET", import, "/v1/imports", "").await;
    api.call("DELETE", "/v1/imports/{name}", "/v1/imports/nope", "")
        .await;
    let made = api
        .call(
            "POST",
            "/v1/tokens",
            "/v1/tokens",
            r#"{"user":"ana","expires_in":"30d"}"#,
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED);
    let made = made.json();
    assert_eq!(made["info"]["role"], "provisioner");
    api.call("POST", "/v1/tokens", "/v1/tokens", r#"{"user":"nobody"}"#)
        .await;
    api.call("GET", "/v1/tokens", "/v1/tokens", "").await;
    let body = format!(r#"{{"token":"{}"}}"#, crate::test_support::ADMIN_TOKEN);
    let session = api.call("POST", "/v1/session", "/v1/session", &body).await;
    assert_eq!(session.status, StatusCode::OK);
    api.call("POST", "/v1/session", "/v1/session", r#"{"token":"x"}"#)
        .await;
    // With a bearer token instead of the cookie: not signed in (web::tests has the rest).
    let not_signed_in = api.call("GET", "/v1/session", "/v1/session", "").await;
    assert_eq!(not_signed_in.status, StatusCode::UNAUTHORIZED);
    api.call("DELETE", "/v1/session", "/v1/session", "").await;
    let events = api.call("GET", "/v1/events", "/v1/events", "").await;
    assert_eq!(events.content_type(), "text/event-stream");
    let token_id = made["info"]["id"].as_str().unwrap().to_owned();
    let revoked = api
        .call(
            "DELETE",
            "/v1/tokens/{id}",
            &format!("/v1/tokens/{token_id}"),
            "",
        )
        .await;
    assert!(revoked.json()["revoked_at"].is_string());
    api.call("DELETE", "/v1/tokens/{id}", "/v1/tokens/0000", "")
        .await;
    let audit = api
        .call("GET", "/v1/audit", "/v1/audit?since=1h", "")
        .await
        .json();
    assert!(!audit.as_array().unwrap().is_empty());
    api.call("GET", "/v1/audit", "/v1/audit?since=yesterday", "")
        .await;

    let console = api
        .call(
            "GET",
            "/v1/vms/{id}/console",
            &format!("/v1/vms/{id}/console"),
            "",
        )
        .await;
    assert_eq!(console.status, StatusCode::OK);
    let not_upgraded = api
        .call(
            "GET",
            "/v1/vms/{id}/console/ws",
            &format!("/v1/vms/{id}/console/ws"),
            "",
        )
        .await;
    assert_eq!(not_upgraded.status, StatusCode::BAD_REQUEST);
    api.call(
        "GET",
        "/v1/vms/{id}/console",
        "/v1/vms/vm-unknown/console",
        "",
    )
    .await;

    // Stacks: made (202), refused (400, 404, 409), listed, shown, slept, archived, woken,
    // deleted.
    let shop = r#"{"name":"shop","member":{"front":{"service":"web","public":["http"]},"back":{"service":"web"}}}"#;
    let accepted = api.call("POST", "/v1/stacks", "/v1/stacks", shop).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED);
    assert!(accepted.json()["task"].is_string());
    for (body, status) in [
        (shop, StatusCode::CONFLICT),
        (
            r#"{"name":"Bad Name","member":{"a":{"service":"web"}}}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"name":"s","member":{"a":{"service":"wbe"}}}"#,
            StatusCode::NOT_FOUND,
        ),
    ] {
        let answer = api.call("POST", "/v1/stacks", "/v1/stacks", body).await;
        assert_eq!(answer.status, status, "{body}");
    }
    let stack = "/v1/stacks/{name}";
    api.call("GET", stack, "/v1/stacks/nope", "").await;
    for _ in 0..250 {
        let shown = api.call("GET", stack, "/v1/stacks/shop", "").await.json();
        if shown["state"] == "up" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let listed = api.call("GET", "/v1/stacks", "/v1/stacks", "").await.json();
    assert_eq!(listed[0]["state"], "up");
    for (template, uri) in [
        ("/v1/stacks/{name}/sleep", "/v1/stacks/shop/sleep"),
        ("/v1/stacks/{name}/archive", "/v1/stacks/shop/archive"),
        ("/v1/stacks/{name}/wake", "/v1/stacks/shop/wake"),
    ] {
        let answer = api.call("POST", template, uri, "").await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
    }
    api.call("POST", "/v1/stacks/{name}/wake", "/v1/stacks/nope/wake", "")
        .await;
    let down = api.call("DELETE", stack, "/v1/stacks/shop", "").await;
    assert_eq!(down.json()["members"].as_array().unwrap().len(), 2);
    api.call("DELETE", stack, "/v1/stacks/shop", "").await;

    // Deletion, then the conflict of deleting again.
    let deleted = api.call("DELETE", vm, &format!("/v1/vms/{id}"), "").await;
    assert_eq!(deleted.json()["state"], "deleted");
    api.call("DELETE", vm, "/v1/vms/vm-unknown", "").await;

    let operations: BTreeSet<(String, String)> = documented(&api.document)
        .into_iter()
        .flat_map(|(path, methods)| methods.into_iter().map(move |m| (path.clone(), m)))
        .collect();
    let missed: Vec<_> = operations.difference(&api.exercised).collect();
    assert!(missed.is_empty(), "operations not exercised: {missed:?}");
}
