//! Authentication, roles and ownership through the router, on the fake backend; and the
//! Host, Origin and content-type checks (finding 1 of issue 13).

use std::collections::BTreeSet;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::api::tests::{Answer, send_as};
use crate::manager::ManagerConfig;
use crate::test_support::{ADMIN_TOKEN, fake_manager, install_token, test_token};
use hangar_core::Role;

const FARM_TOKEN: &str = "farm-token-for-the-auth-tests";

/// A router over a fake manager whose store has an admin (`ADMIN_TOKEN`), two provisioners
/// (`ana`: token 1, `bo`: token 2) and an access user (`cy`: token 3).
fn api() -> (Router, std::sync::Arc<crate::manager::Manager>) {
    let (manager, _, store) = fake_manager(
        crate::test_support::WEB_AND_NEVER_READY,
        ManagerConfig {
            farm_token: FARM_TOKEN.into(),
            ..ManagerConfig::default()
        },
    );
    futures::executor::block_on(async {
        install_token(store.as_ref(), "ana", Role::Provisioner, &test_token(1)).await;
        install_token(store.as_ref(), "bo", Role::Provisioner, &test_token(2)).await;
        install_token(store.as_ref(), "cy", Role::Access, &test_token(3)).await;
    });
    (crate::api::router(manager.clone()), manager)
}

async fn call(router: &Router, token: Option<&str>, method: &str, uri: &str, body: &str) -> Answer {
    send_as(router, token, method, uri, None, body.to_owned()).await
}

/// `template` with made-up ids for its parameters.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment {
            "{sha256}" => "a".repeat(64),
            s if s.starts_with('{') => "made-up".to_owned(),
            s => s.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A body each route accepts as well-formed (so that an allowed call gets past parsing).
fn body_for(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("POST", "/v1/requests") | ("POST", "/v1/requests/check") => r#"{"service":"nope"}"#,
        ("PUT", "/v1/pools/{name}") => r#"{"min":0}"#,
        ("PUT", "/v1/policies/{service}") => r#"{"sleep_after":"1h"}"#,
        ("POST", "/v1/images") | ("POST", "/v1/export") => r#"{"service":"nope"}"#,
        ("POST", "/v1/placements") => r#"{"service":"nope"}"#,
        ("POST", "/v1/users") => r#"{"name":"walker","role":"access"}"#,
        ("POST", "/v1/tokens") => "{}",
        ("POST", "/v1/session") => {
            r#"{"token":"hgr_00000000000000ad_00000000000000000000000000000000000000000000000000000000000000ad"}"#
        }
        ("PUT", "/v1/quotas/{user}") => r#"{"vms":5}"#,
        ("POST", "/v1/farm/roots") => r#"{"service":"nope","os":"busybox"}"#,
        ("POST", "/v1/hosts") => "{}",
        ("POST", "/v1/hosts/{name}/heartbeat") => "{}",
        _ => "",
    }
}

/// The least role a route lets through, per the table; `None` for farm routes and `/healthz`.
fn least_role(method: &str, path: &str) -> Option<Role> {
    match super::roles::need(method, path) {
        super::roles::Need::Role(role) => Some(role),
        super::roles::Need::Farm | super::roles::Need::Metrics => Some(Role::Admin),
        super::roles::Need::Open => None,
    }
}

#[tokio::test]
async fn every_route_of_the_document_wants_a_token_and_a_role_that_may() {
    let (router, _) = api();
    let document = call(&router, Some(ADMIN_TOKEN), "GET", "/v1/openapi.json", "")
        .await
        .json();
    let tokens = [
        (Role::Access, test_token(3)),
        (Role::Provisioner, test_token(1)),
        (Role::Admin, ADMIN_TOKEN.to_owned()),
    ];
    let mut walked = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let method = method.to_ascii_uppercase();
            if !["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&method.as_str()) {
                continue;
            }
            assert!(
                super::roles::RULES
                    .iter()
                    .any(|(m, p, _)| *m == method && p == path),
                "{method} {path} is not in the role table (api/auth/roles.rs)"
            );
            let uri = concrete(path);
            let body = body_for(&method, path);
            let Some(least) = least_role(&method, path) else {
                let open = call(&router, None, &method, &uri, body).await;
                assert!(open.status.is_success(), "{method} {path}: {}", open.status);
                continue;
            };
            let none = call(&router, None, &method, &uri, body).await;
            assert_eq!(
                none.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} without a token"
            );
            assert!(
                none.headers.contains_key(header::WWW_AUTHENTICATE),
                "{method} {path}"
            );
            let bad = call(&router, Some(&test_token(9)), &method, &uri, body).await;
            assert_eq!(
                bad.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with an unknown token"
            );
            for (role, token) in &tokens {
                let answer = call(&router, Some(token), &method, &uri, body).await;
                if path == "/v1/session" && answer.status == StatusCode::UNAUTHORIZED {
                    // Reading or ending a session wants its cookie, not a bearer token
                    // (web::tests): the message says so.
                    assert!(
                        answer.json()["error"]["message"]
                            .as_str()
                            .unwrap()
                            .contains("not signed in")
                    );
                } else if *role >= least {
                    // Past the checks: a success or the route's own answer to a made-up id
                    // (the fake manager has no guest assets: farm asset routes answer 500).
                    assert!(
                        ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&answer.status),
                        "{method} {path} as {role}: {} {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    );
                } else {
                    assert_eq!(
                        answer.status,
                        StatusCode::FORBIDDEN,
                        "{method} {path} as {role}"
                    );
                    assert_eq!(answer.json()["error"]["code"], "forbidden");
                }
            }
            walked.insert(format!("{method} {path}"));
        }
    }
    assert!(walked.len() >= 30, "{walked:?}");
}

#[tokio::test]
async fn the_farm_token_opens_farm_routes_only() {
    let (router, _) = api();
    let hosts = call(&router, Some(FARM_TOKEN), "GET", "/v1/hosts", "").await;
    assert_eq!(hosts.status, StatusCode::OK);
    let vms = call(&router, Some(FARM_TOKEN), "GET", "/v1/vms", "").await;
    assert_eq!(vms.status, StatusCode::UNAUTHORIZED);
}

fn ids(answer: &Answer) -> Vec<String> {
    answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn vms_belong_to_their_requester_and_shared_ones_are_seen_by_all() {
    let (router, _) = api();
    let (ana, bo, cy) = (test_token(1), test_token(2), test_token(3));
    let dedicated = call(
        &router,
        Some(&ana),
        "POST",
        "/v1/requests",
        r#"{"service":"web","mode":"dedicated"}"#,
    )
    .await;
    assert_eq!(dedicated.status, StatusCode::OK, "{:?}", dedicated.json());
    let mine = dedicated.json()["vm"].as_str().unwrap().to_owned();
    let shared = call(
        &router,
        Some(&bo),
        "POST",
        "/v1/requests",
        r#"{"service":"web","mode":"shared"}"#,
    )
    .await;
    assert_eq!(shared.status, StatusCode::OK);
    let theirs = shared.json()["vm"].as_str().unwrap().to_owned();

    let vm = call(
        &router,
        Some(ADMIN_TOKEN),
        "GET",
        &format!("/v1/vms/{mine}"),
        "",
    )
    .await;
    assert_eq!(vm.json()["owner"], "ana");
    let listed = |token: String| {
        let router = router.clone();
        async move { ids(&call(&router, Some(&token), "GET", "/v1/vms", "").await) }
    };
    assert_eq!(listed(ana.clone()).await, [mine.clone(), theirs.clone()]);
    assert_eq!(
        listed(bo.clone()).await,
        std::slice::from_ref(&theirs),
        "another's dedicated VM is not listed"
    );
    assert_eq!(listed(cy.clone()).await, std::slice::from_ref(&theirs));
    assert_eq!(
        listed(ADMIN_TOKEN.to_owned()).await,
        [mine.clone(), theirs.clone()]
    );

    // Another's dedicated VM does not exist for them; a shared one is seen, not acted on.
    let hidden = call(&router, Some(&bo), "GET", &format!("/v1/vms/{mine}"), "").await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    let hidden = call(
        &router,
        Some(&bo),
        "POST",
        &format!("/v1/vms/{mine}/sleep"),
        "",
    )
    .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    let seen = call(&router, Some(&ana), "GET", &format!("/v1/vms/{theirs}"), "").await;
    assert_eq!(seen.status, StatusCode::OK);
    let refused = call(
        &router,
        Some(&ana),
        "DELETE",
        &format!("/v1/vms/{theirs}"),
        "",
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let refused = call(
        &router,
        Some(&cy),
        "POST",
        &format!("/v1/vms/{theirs}/sleep"),
        "",
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::FORBIDDEN,
        "access users act on nothing"
    );
    // Owners and admins act.
    let slept = call(
        &router,
        Some(&ana),
        "POST",
        &format!("/v1/vms/{mine}/sleep"),
        "",
    )
    .await;
    assert_eq!(slept.status, StatusCode::OK);
    let deleted = call(
        &router,
        Some(ADMIN_TOKEN),
        "DELETE",
        &format!("/v1/vms/{theirs}"),
        "",
    )
    .await;
    assert_eq!(deleted.status, StatusCode::OK);
}

#[tokio::test]
async fn tokens_are_made_for_oneself_scoped_revoked_and_shown_once() {
    let (router, manager) = api();
    let ana = test_token(1);
    // A provisioner makes an access token for itself, not an admin one, nor one for others.
    let made = call(
        &router,
        Some(&ana),
        "POST",
        "/v1/tokens",
        r#"{"role":"access"}"#,
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED);
    let made = made.json();
    let text = made["token"].as_str().unwrap().to_owned();
    let id = made["info"]["id"].as_str().unwrap().to_owned();
    assert!(text.starts_with("hgr_") && text.contains(&id));
    let above = call(
        &router,
        Some(&ana),
        "POST",
        "/v1/tokens",
        r#"{"role":"admin"}"#,
    )
    .await;
    assert_eq!(above.status, StatusCode::FORBIDDEN);
    let others = call(
        &router,
        Some(&ana),
        "POST",
        "/v1/tokens",
        r#"{"user":"bo"}"#,
    )
    .await;
    assert_eq!(others.status, StatusCode::FORBIDDEN);
    // The new token speaks for ana as access; listings never show a secret.
    let who = call(&router, Some(&text), "GET", "/v1/whoami", "")
        .await
        .json();
    assert_eq!(
        (&who["user"], &who["role"]),
        (&Value::from("ana"), &Value::from("access"))
    );
    let listed = call(&router, Some(&ana), "GET", "/v1/tokens", "").await;
    assert!(!String::from_utf8_lossy(&listed.body).contains(&text[21..]));
    assert_eq!(listed.json().as_array().unwrap().len(), 2, "ana's own two");
    let stored = manager.store().token(&id).await.unwrap().unwrap();
    assert_ne!(stored.hash, text, "the store keeps a hash");
    // Revoked: refused at once (the cache forgets it).
    let revoked = call(
        &router,
        Some(&ana),
        "DELETE",
        &format!("/v1/tokens/{id}"),
        "",
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK);
    let refused = call(&router, Some(&text), "GET", "/v1/whoami", "").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // Another's token is not there for bo.
    let bo = test_token(2);
    let ana_id = super::tokens::token_id(&ana).unwrap();
    let hidden = call(
        &router,
        Some(&bo),
        "DELETE",
        &format!("/v1/tokens/{ana_id}"),
        "",
    )
    .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    // Expired: refused.
    let short = call(
        &router,
        Some(ADMIN_TOKEN),
        "POST",
        "/v1/tokens",
        r#"{"user":"bo","expires_in":"1ms"}"#,
    )
    .await
    .json();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let expired = call(
        &router,
        Some(short["token"].as_str().unwrap()),
        "GET",
        "/v1/whoami",
        "",
    )
    .await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn mutating_calls_are_audited_with_who_what_and_outcome() {
    let (router, _) = api();
    let ana = test_token(1);
    call(&router, Some(&ana), "PUT", "/v1/pools/web", r#"{"min":1}"#).await;
    call(&router, None, "DELETE", "/v1/vms/vm-x", "").await;
    call(&router, Some(&ana), "GET", "/v1/vms", "").await;
    let granted = call(
        &router,
        Some(&ana),
        "POST",
        "/v1/requests",
        r#"{"service":"web"}"#,
    )
    .await
    .json();
    let audit = call(&router, Some(ADMIN_TOKEN), "GET", "/v1/audit", "")
        .await
        .json();
    let entries: Vec<(String, String, String, Value, u64)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_owned(),
                e["method"].as_str().unwrap().to_owned(),
                e["route"].as_str().unwrap().to_owned(),
                e["target"].clone(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (
                "ana".into(),
                "PUT".into(),
                "/v1/pools/{name}".into(),
                "web".into(),
                403
            ),
            (
                "-".into(),
                "DELETE".into(),
                "/v1/vms/{id}".into(),
                "vm-x".into(),
                401
            ),
            (
                "ana".into(),
                "POST".into(),
                "/v1/requests".into(),
                granted["vm"].clone(),
                200
            ),
        ],
        "reads are not audited"
    );
}

/// Sends a request with the given headers (as the admin).
async fn raw(
    router: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> StatusCode {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let _ = response.into_body().collect().await;
    status
}

#[tokio::test]
async fn a_host_header_naming_another_site_is_refused() {
    let (router, _) = api();
    for host in ["127.0.0.1:7700", "localhost:7700", "[::1]:7700", "10.1.2.3"] {
        let status = raw(&router, "GET", "/v1/services", &[("host", host)], "").await;
        assert_eq!(status, StatusCode::OK, "{host}");
    }
    // DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1.
    for host in [
        "attacker.example:7700",
        "attacker.example",
        "localhost.attacker.example",
    ] {
        let status = raw(&router, "GET", "/v1/services", &[("host", host)], "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host}");
    }
}

#[tokio::test]
async fn a_request_from_a_page_of_another_origin_is_refused() {
    let (router, _) = api();
    let body = r#"{"service":"web"}"#;
    let json = ("content-type", "application/json");
    let host = ("host", "127.0.0.1:7700");
    let status = raw(
        &router,
        "POST",
        "/v1/requests",
        &[host, json, ("origin", "http://evil.example")],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let status = raw(
        &router,
        "POST",
        "/v1/requests",
        &[host, json, ("origin", "null")],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let status = raw(
        &router,
        "POST",
        "/v1/requests",
        &[host, json, ("origin", "http://127.0.0.1:7700")],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "same origin");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_with_415() {
    let (router, manager) = api();
    let body = r#"{"service":"web"}"#;
    let len = body.len().to_string();
    for media in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let status = raw(
            &router,
            "POST",
            "/v1/requests",
            &[("content-type", media), ("content-length", &len)],
            body,
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{media}");
    }
    let status = raw(
        &router,
        "POST",
        "/v1/requests",
        &[("content-length", &len)],
        body,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "no content type"
    );
    assert!(
        manager.store().vms(true).await.unwrap().is_empty(),
        "nothing was made"
    );
    let status = raw(
        &router,
        "POST",
        "/v1/requests",
        &[
            ("content-type", "application/json; charset=utf-8"),
            ("content-length", &len),
        ],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// What the checks cost a shared-mode request (the benchmark's shared-requests row, in
/// process): the same request through the router with and without `guard` and
/// `authenticate` (token from the cache, role table, audit write), p50 of each, alternated
/// so that drift falls on both. Run with
/// `cargo test --release -p hangar-server --lib auth_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints its figures"]
async fn auth_cost_per_shared_request() {
    use std::time::Instant;

    let (with_auth, manager) = api();
    let caller = super::Caller {
        user: "admin".into(),
        role: Role::Admin,
        token_id: "00000000000000ad".into(),
    };
    let (bare, _) = crate::api::routes().split_for_parts();
    let bare: Router = bare
        .layer(axum::Extension(caller))
        .with_state(manager.clone());
    let body = r#"{"service":"web","mode":"shared"}"#;
    let first = call(&with_auth, Some(ADMIN_TOKEN), "POST", "/v1/requests", body).await;
    assert_eq!(first.status, StatusCode::OK);
    let once = |router: Router, token: Option<&'static str>| async move {
        let started = Instant::now();
        let answer = call(&router, token, "POST", "/v1/requests", body).await;
        assert_eq!(answer.status, StatusCode::OK);
        started.elapsed()
    };
    let (mut plain, mut checked) = (Vec::new(), Vec::new());
    for _ in 0..3000 {
        plain.push(once(bare.clone(), None).await);
        checked.push(once(with_auth.clone(), Some(ADMIN_TOKEN)).await);
    }
    let p50 = |mut v: Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    let (plain, checked) = (p50(plain), p50(checked));
    eprintln!(
        "shared request p50: {plain:.3} ms without the checks, {checked:.3} ms with them: +{:.3} ms",
        checked - plain
    );
}
