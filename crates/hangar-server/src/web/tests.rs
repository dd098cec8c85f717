//! The web console's routes through the whole app on the fake backend: the files and
//! their headers, sessions (cookie, CSRF, revocation, roles).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::api::tests::Answer;
use crate::manager::{Manager, ManagerConfig};
use crate::test_support::{ADMIN_TOKEN, fake_manager, install_token, test_token};
use hangar_core::Role;

/// The app over a fake manager whose store has the admin, `ana` (provisioner, token 1) and
/// `cy` (access, token 3).
pub(crate) fn app() -> (Router, Arc<Manager>) {
    let (manager, _, store) = fake_manager(
        crate::test_support::WEB_AND_NEVER_READY,
        ManagerConfig::default(),
    );
    futures::executor::block_on(async {
        install_token(store.as_ref(), "ana", Role::Provisioner, &test_token(1)).await;
        install_token(store.as_ref(), "cy", Role::Access, &test_token(3)).await;
    });
    (super::app(manager.clone()), manager)
}

/// Sends `method uri` with `headers` and `body` (as JSON when not empty).
pub(crate) async fn call(
    router: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if !body.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

fn header_of<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn assert_security_headers(answer: &Answer) {
    assert_eq!(
        header_of(answer, "content-security-policy"),
        super::CONTENT_SECURITY_POLICY
    );
    assert!(super::CONTENT_SECURITY_POLICY.contains("frame-ancestors 'none'"));
    assert_eq!(header_of(answer, "x-content-type-options"), "nosniff");
    assert_eq!(header_of(answer, "referrer-policy"), "no-referrer");
}

#[tokio::test]
async fn the_page_and_its_files_answer_with_their_type_and_security_headers() {
    let (router, _) = app();
    let page = call(&router, "GET", "/", &[], "").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.content_type(), "text/html; charset=utf-8");
    assert_eq!(header_of(&page, "cache-control"), "no-cache");
    assert_security_headers(&page);
    let etag = header_of(&page, "etag").to_owned();
    assert!(etag.starts_with('"') && etag.len() == 66, "{etag}");

    let again = call(&router, "GET", "/", &[("if-none-match", &etag)], "").await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());

    let file = call(&router, "GET", "/static/index.html", &[], "").await;
    assert_eq!(file.status, StatusCode::OK);
    assert_eq!(file.body, page.body);
    assert_security_headers(&file);

    for missing in [
        "/static/nope.js",
        "/static/../Cargo.toml",
        "/static/a/../../x",
    ] {
        let answer = call(&router, "GET", missing, &[], "").await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{missing}");
        assert_security_headers(&answer);
    }
    // Outside /, /static, /v1 and /healthz: the API's JSON 404.
    let other = call(&router, "GET", "/admin", &[], "").await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(other.json()["error"]["code"], "not_found");

    // The guard stands before the files too: DNS rebinding and other sites are refused.
    let rebound = call(&router, "GET", "/", &[("host", "evil.example")], "").await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN);
    let framed = call(
        &router,
        "GET",
        "/static/index.html",
        &[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
        ],
        "",
    )
    .await;
    assert_eq!(framed.status, StatusCode::FORBIDDEN);
    let same = call(
        &router,
        "GET",
        "/",
        &[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ],
        "",
    )
    .await;
    assert_eq!(same.status, StatusCode::OK);
}

/// A signed-in session: its cookie header (`hangar_session=...`), CSRF and JSON answer.
pub(crate) struct SignedIn {
    pub cookie: String,
    pub csrf: String,
    pub answer: Answer,
}

/// Signs in with `token`; panics unless it works.
pub(crate) async fn sign_in(router: &Router, token: &str) -> SignedIn {
    let answer = call(
        router,
        "POST",
        "/v1/session",
        &[],
        &format!(r#"{{"token":"{token}"}}"#),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let set = header_of(&answer, "set-cookie");
    let cookie = set.split(';').next().unwrap().to_owned();
    let csrf = answer.json()["csrf"].as_str().unwrap().to_owned();
    SignedIn {
        cookie,
        csrf,
        answer,
    }
}

#[tokio::test]
async fn signing_in_sets_a_strict_http_only_cookie_that_authenticates_reads() {
    let (router, manager) = app();
    let bad = call(
        &router,
        "POST",
        "/v1/session",
        &[],
        &format!(r#"{{"token":"{}"}}"#, test_token(9)),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad.json()["error"]["code"], "unauthorized");
    assert!(!bad.headers.contains_key(header::SET_COOKIE));

    let session = sign_in(&router, &test_token(1)).await;
    let set = header_of(&session.answer, "set-cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(flag), "{set} lacks {flag}");
    }
    assert!(!set.contains("Secure"), "plain http: {set}");
    let body = session.answer.json();
    assert_eq!(body["user"], "ana");
    assert_eq!(body["role"], "provisioner");
    assert_eq!(session.csrf.len(), 64);
    // The session is a token of its own, expiring in 12 hours, listed with ana's.
    let secret = session.cookie.strip_prefix("hangar_session=").unwrap();
    assert_ne!(secret, test_token(1));
    let id = crate::api::auth::tokens::token_id(secret).unwrap();
    let record = manager.store().token(id).await.unwrap().unwrap();
    assert_eq!(
        (record.user.as_str(), record.role),
        ("ana", Role::Provisioner)
    );
    let ttl = record.expires_at_ms.unwrap() - record.created_at_ms;
    assert_eq!(ttl, 12 * 3600 * 1000);
    // Signing in is audited with who signed in.
    let audit = manager.store().audit(0, 100).await.unwrap();
    let entry = audit
        .iter()
        .find(|entry| entry.route == "/v1/session" && entry.status == 200)
        .expect("audited");
    assert_eq!((entry.user.as_str(), entry.status), ("ana", 200));

    let cookie = [("cookie", session.cookie.as_str())];
    let current = call(&router, "GET", "/v1/session", &cookie, "").await;
    assert_eq!(current.status, StatusCode::OK);
    assert_eq!(current.json()["csrf"], session.csrf.as_str());
    assert_eq!(current.json()["expires_at"], body["expires_at"]);
    let whoami = call(&router, "GET", "/v1/whoami", &cookie, "").await;
    assert_eq!(whoami.json()["user"], "ana");
    assert_eq!(whoami.json()["token"], id);

    // Without a cookie, or with a bearer token instead: not signed in.
    let nobody = call(&router, "GET", "/v1/session", &[], "").await;
    assert_eq!(nobody.status, StatusCode::UNAUTHORIZED);
    let bearer = format!("Bearer {}", test_token(1));
    let by_bearer = call(
        &router,
        "GET",
        "/v1/session",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(by_bearer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_cookie_request_that_changes_something_needs_the_csrf_header() {
    let (router, _) = app();
    let session = sign_in(&router, &test_token(1)).await;
    let request = r#"{"service":"web"}"#;
    let cookie = ("cookie", session.cookie.as_str());
    let without = call(&router, "POST", "/v1/requests", &[cookie], request).await;
    assert_eq!(without.status, StatusCode::FORBIDDEN);
    assert_eq!(without.json()["error"]["code"], "csrf");
    let wrong_csrf = "0".repeat(64);
    let wrong = call(
        &router,
        "POST",
        "/v1/requests",
        &[cookie, ("x-hangar-csrf", &wrong_csrf)],
        request,
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(wrong.json()["error"]["code"], "csrf");
    let right = call(
        &router,
        "POST",
        "/v1/requests",
        &[cookie, ("x-hangar-csrf", &session.csrf)],
        request,
    )
    .await;
    assert_eq!(right.status, StatusCode::OK, "{:?}", right.json());
    assert!(right.json()["vm"].as_str().is_some());
    // A bearer request needs no CSRF header (a page cannot send one across sites).
    let bearer = format!("Bearer {}", test_token(1));
    let by_bearer = call(
        &router,
        "POST",
        "/v1/requests/check",
        &[("authorization", &bearer)],
        request,
    )
    .await;
    assert_eq!(by_bearer.status, StatusCode::OK);
    // Another session's CSRF value does not pass.
    let other = sign_in(&router, &test_token(1)).await;
    let crossed = call(
        &router,
        "POST",
        "/v1/requests/check",
        &[cookie, ("x-hangar-csrf", &other.csrf)],
        request,
    )
    .await;
    assert_eq!(crossed.json()["error"]["code"], "csrf");
}

#[tokio::test]
async fn an_access_session_stays_access_and_a_revoked_or_ended_session_is_refused() {
    let (router, _) = app();
    let session = sign_in(&router, &test_token(3)).await;
    assert_eq!(session.answer.json()["role"], "access");
    let cookie = ("cookie", session.cookie.as_str());
    let refused = call(
        &router,
        "POST",
        "/v1/requests",
        &[cookie, ("x-hangar-csrf", &session.csrf)],
        r#"{"service":"web"}"#,
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["error"]["code"], "forbidden");
    let vms = call(&router, "GET", "/v1/vms", &[cookie], "").await;
    assert_eq!(vms.status, StatusCode::OK);

    // An admin revokes the session like any token: refused at once.
    let id = session.answer.json();
    let token_id = call(&router, "GET", "/v1/whoami", &[cookie], "")
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(id["user"], "cy");
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let revoked = call(
        &router,
        "DELETE",
        &format!("/v1/tokens/{token_id}"),
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK);
    let after = call(&router, "GET", "/v1/vms", &[cookie], "").await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);

    // Signing out revokes the session and clears the cookie; it needs the CSRF header.
    let ana = sign_in(&router, &test_token(1)).await;
    let cookie = ("cookie", ana.cookie.as_str());
    let no_csrf = call(&router, "DELETE", "/v1/session", &[cookie], "").await;
    assert_eq!(no_csrf.json()["error"]["code"], "csrf");
    let out = call(
        &router,
        "DELETE",
        "/v1/session",
        &[cookie, ("x-hangar-csrf", &ana.csrf)],
        "",
    )
    .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    let cleared = header_of(&out, "set-cookie");
    assert!(
        cleared.starts_with("hangar_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    let gone = call(&router, "GET", "/v1/session", &[cookie], "").await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
}

/// Polls task `id` as `bearer` until it ends; its JSON.
pub(crate) async fn task_end(router: &Router, bearer: &str, id: &str) -> serde_json::Value {
    for _ in 0..200 {
        let task = call(
            router,
            "GET",
            &format!("/v1/tasks/{id}"),
            &[("authorization", bearer)],
            "",
        )
        .await
        .json();
        if task["state"] != "running" && task["state"] != "rolling_back" {
            return task;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("task {id} did not end");
}

#[tokio::test]
async fn a_request_that_prefers_async_answers_with_its_task_before_the_vm_is_ready() {
    let (router, _) = app();
    let bearer = format!("Bearer {}", test_token(1));
    let asking = [
        ("authorization", bearer.as_str()),
        ("prefer", "wait=5, respond-async"),
    ];
    // never-ready's check gives up after 600 ms: the answer comes long before.
    let started = std::time::Instant::now();
    let accepted = call(
        &router,
        "POST",
        "/v1/requests",
        &asking,
        r#"{"service":"never-ready"}"#,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        accepted.status,
        StatusCode::ACCEPTED,
        "{:?}",
        accepted.json()
    );
    assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    let task = accepted.json()["task"].as_str().unwrap().to_owned();
    assert!(task.starts_with("task-"), "{task}");
    let ended = task_end(&router, &bearer, &task).await;
    assert_eq!(ended["state"], "failed", "{ended}");
    assert_eq!(ended["owner"], "ana");

    // A VM made for it: the task ends with the VM.
    let accepted = call(
        &router,
        "POST",
        "/v1/requests",
        &asking,
        r#"{"service":"web","mode":"shared"}"#,
    )
    .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED);
    let task = accepted.json()["task"].as_str().unwrap().to_owned();
    let ended = task_end(&router, &bearer, &task).await;
    assert_eq!(ended["state"], "succeeded", "{ended}");
    let vm = ended["vm"].as_str().unwrap().to_owned();
    // One already running serves a shared request at once: the grant, as without it.
    let granted = call(
        &router,
        "POST",
        "/v1/requests",
        &asking,
        r#"{"service":"web","mode":"shared"}"#,
    )
    .await;
    assert_eq!(granted.status, StatusCode::OK);
    assert_eq!(granted.json()["vm"], vm.as_str());
    // Errors answer as without it.
    let unknown = call(
        &router,
        "POST",
        "/v1/requests",
        &asking,
        r#"{"service":"nope"}"#,
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

/// An open event stream and what it has said so far.
pub(crate) struct Events {
    stream: axum::body::BodyDataStream,
    pub text: String,
}

impl Events {
    /// Subscribes to `/v1/events` with `headers`; panics unless it answers a stream.
    pub(crate) async fn open(router: &Router, headers: &[(&str, &str)]) -> Events {
        let mut request = Request::builder().uri("/v1/events");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        Events {
            stream: response.into_body().into_data_stream(),
            text: String::new(),
        }
    }

    /// Reads until `text` holds `wanted`, for at most `within`; whether it did.
    pub(crate) async fn until(&mut self, wanted: &str, within: std::time::Duration) -> bool {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        while !self.text.contains(wanted) {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(bytes))) => self.text.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return false,
            }
        }
        true
    }
}

/// The `data:` of the first `event: NAME` whose data contains `needle`.
fn event_data(text: &str, name: &str, needle: &str) -> Option<serde_json::Value> {
    text.split("\n\n").find_map(|frame| {
        let mut lines = frame.lines();
        let named = lines.clone().any(|line| line == format!("event: {name}"));
        let data = lines.find_map(|line| line.strip_prefix("data: "))?;
        (named && data.contains(needle)).then(|| serde_json::from_str(data).unwrap())
    })
}

#[tokio::test]
async fn subscribers_see_vm_and_task_changes_they_may_see_within_a_second() {
    let (router, manager) = app();
    install_token(manager.store(), "bo", Role::Provisioner, &test_token(2)).await;
    assert!(!manager.events.polling());
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let mut everything = Events::open(&router, &[("authorization", &admin)]).await;
    let bo_bearer = format!("Bearer {}", test_token(2));
    let mut bo = Events::open(&router, &[("authorization", &bo_bearer)]).await;
    // ana listens through her session cookie.
    let ana_session = sign_in(&router, &test_token(1)).await;
    let mut ana = Events::open(&router, &[("cookie", &ana_session.cookie)]).await;
    assert!(manager.events.polling());

    let ana_bearer = format!("Bearer {}", test_token(1));
    let granted = call(
        &router,
        "POST",
        "/v1/requests",
        &[("authorization", &ana_bearer)],
        r#"{"service":"web","mode":"dedicated"}"#,
    )
    .await;
    assert_eq!(granted.status, StatusCode::OK);
    let vm = granted.json()["vm"].as_str().unwrap().to_owned();
    let task = granted.json()["task"].as_str().unwrap().to_owned();
    let second = std::time::Duration::from_secs(1);
    let active = format!(r#""id":"{vm}","state":"active""#);
    assert!(
        everything.until(&active, second).await,
        "{}",
        everything.text
    );
    assert!(ana.until(&active, second).await, "{}", ana.text);
    let event = event_data(&ana.text, "vm", &active).unwrap();
    assert_eq!(event["owner"], "ana");
    let done = format!(r#""id":"{task}","state":"succeeded""#);
    assert!(ana.until(&done, second).await, "{}", ana.text);
    let event = event_data(&ana.text, "task", &done).unwrap();
    assert_eq!(event["vm"], vm.as_str());
    assert_eq!(event["percent"], 100);

    // A state change made by a call: sleeping.
    let slept = call(
        &router,
        "POST",
        &format!("/v1/vms/{vm}/sleep"),
        &[("authorization", &ana_bearer)],
        "",
    )
    .await;
    assert_eq!(slept.status, StatusCode::OK, "{:?}", slept.json());
    let sleeping = format!(r#""id":"{vm}","state":"sleeping""#);
    let started = std::time::Instant::now();
    assert!(ana.until(&sleeping, second).await, "{}", ana.text);
    eprintln!("sleep seen by a subscriber after {:?}", started.elapsed());

    // bo's own VM reaches bo; ana's dedicated VM and task never did.
    let theirs = call(
        &router,
        "POST",
        "/v1/requests",
        &[("authorization", &bo_bearer)],
        r#"{"service":"web","mode":"dedicated"}"#,
    )
    .await;
    let bo_vm = theirs.json()["vm"].as_str().unwrap().to_owned();
    assert!(
        bo.until(&format!(r#""id":"{bo_vm}","state":"active""#), second)
            .await,
        "{}",
        bo.text
    );
    assert!(!bo.text.contains(&vm), "{}", bo.text);
    assert!(!bo.text.contains(&task), "{}", bo.text);
    assert!(!bo.text.contains("event: pool"), "{}", bo.text);
    assert!(everything.until(&bo_vm, second).await);

    // The last subscriber gone, the poller stops.
    drop((everything, bo, ana));
    for _ in 0..40 {
        if !manager.events.polling() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(!manager.events.polling());
}

#[tokio::test]
async fn keepalives_come_as_comments_and_a_revoked_session_ends_its_stream() {
    use axum::response::IntoResponse;
    use futures::StreamExt;
    let (router, manager) = app();
    let session = sign_in(&router, &test_token(1)).await;
    let whoami = call(
        &router,
        "GET",
        "/v1/whoami",
        &[("cookie", &session.cookie)],
        "",
    )
    .await;
    let caller = crate::api::auth::Caller {
        user: "ana".into(),
        role: Role::Provisioner,
        token_id: whoami.json()["token"].as_str().unwrap().to_owned(),
    };
    let every = std::time::Duration::from_millis(50);
    let sse = super::events::events_every(manager.clone(), caller.clone(), every);
    let mut stream = sse.into_response().into_body().into_data_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&first), ": keepalive\n\n");
    manager
        .store()
        .revoke_token(&caller.token_id, hangar_store::now_ms())
        .await
        .unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while stream.next().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream goes on after its session was revoked"
    );
}

#[tokio::test]
async fn a_vms_console_is_read_as_text_and_followed_over_a_websocket_until_it_goes() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    let (manager, backend, store) = fake_manager(
        crate::test_support::WEB_AND_NEVER_READY,
        ManagerConfig::default(),
    );
    install_token(store.as_ref(), "ana", Role::Provisioner, &test_token(1)).await;
    install_token(store.as_ref(), "bo", Role::Provisioner, &test_token(2)).await;
    let consoles = tempfile::tempdir().unwrap();
    backend.keep_consoles_in(consoles.path());
    let router = super::app(manager.clone());
    let ana = format!("Bearer {}", test_token(1));
    let granted = call(
        &router,
        "POST",
        "/v1/requests",
        &[("authorization", &ana)],
        r#"{"service":"web","mode":"dedicated"}"#,
    )
    .await;
    let vm = granted.json()["vm"].as_str().unwrap().to_owned();
    let log = consoles.path().join(format!("{vm}.log"));
    std::fs::write(&log, "hello from the guest\n").unwrap();

    let text = call(
        &router,
        "GET",
        &format!("/v1/vms/{vm}/console"),
        &[("authorization", &ana)],
        "",
    )
    .await;
    assert_eq!(text.status, StatusCode::OK);
    assert_eq!(text.content_type(), "text/plain; charset=utf-8");
    assert_eq!(&text.body[..], b"hello from the guest\n");
    let bo = format!("Bearer {}", test_token(2));
    let hidden = call(
        &router,
        "GET",
        &format!("/v1/vms/{vm}/console"),
        &[("authorization", &bo)],
        "",
    )
    .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = tokio::spawn(async move { axum::serve(listener, router).await });
    let router = super::app(manager.clone());
    let session = sign_in(&router, &test_token(1)).await;
    let connect = |origin: String| {
        let mut request = format!("ws://{address}/v1/vms/{vm}/console/ws")
            .into_client_request()
            .unwrap();
        let headers = request.headers_mut();
        headers.insert("cookie", session.cookie.parse().unwrap());
        headers.insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    // Another site's page cannot open it (the guard's Origin check).
    assert!(connect("http://evil.example".into()).await.is_err());

    let (mut socket, _) = connect(format!("http://{address}")).await.unwrap();
    let second = std::time::Duration::from_secs(1);
    let first = tokio::time::timeout(second, socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        Message::Binary(b"hello from the guest\n".to_vec().into())
    );
    // Input is ignored; new output arrives within a poll or two.
    socket.send(Message::Text("ls\n".into())).await.unwrap();
    let started = std::time::Instant::now();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut file| std::io::Write::write_all(&mut file, b"more\n"))
        .unwrap();
    let more = tokio::time::timeout(second, socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(more, Message::Binary(b"more\n".to_vec().into()));
    eprintln!(
        "new console output reached the websocket after {:?}",
        started.elapsed()
    );

    // The VM deleted: the socket closes.
    let deleted = call(
        &router,
        "DELETE",
        &format!("/v1/vms/{vm}"),
        &[("authorization", &ana)],
        "",
    )
    .await;
    assert_eq!(deleted.status, StatusCode::OK);
    let closed = tokio::time::timeout(second, async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the console's socket stays open after its VM was deleted"
    );
    served.abort();
}

#[tokio::test]
async fn everyone_reads_usage_and_non_admins_only_their_own() {
    let (router, _) = app();
    let (ana, admin) = (
        format!("Bearer {}", test_token(1)),
        format!("Bearer {ADMIN_TOKEN}"),
    );
    let mut vms = Vec::new();
    for bearer in [&ana, &admin] {
        let granted = call(
            &router,
            "POST",
            "/v1/requests",
            &[("authorization", bearer)],
            r#"{"service":"web","mode":"dedicated"}"#,
        )
        .await;
        vms.push(granted.json()["vm"].as_str().unwrap().to_owned());
    }
    let keys = |answer: &Answer| {
        answer.json()["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["key"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let everyone = call(
        &router,
        "GET",
        "/v1/usage",
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(keys(&everyone), ["admin", "ana"]);
    let hers = call(&router, "GET", "/v1/usage", &[("authorization", &ana)], "").await;
    assert_eq!(hers.status, StatusCode::OK);
    assert_eq!(keys(&hers), ["ana"]);
    let by_vm = call(
        &router,
        "GET",
        "/v1/usage?by=vm",
        &[("authorization", &ana)],
        "",
    )
    .await;
    assert_eq!(keys(&by_vm), [vms[0].clone()]);
    let cy = format!("Bearer {}", test_token(3));
    let nothing = call(&router, "GET", "/v1/usage", &[("authorization", &cy)], "").await;
    assert_eq!(nothing.status, StatusCode::OK);
    assert!(keys(&nothing).is_empty());
}
