//! The agent API driven through [`RemoteHost`], over a [`LocalHost`] on the fake backend.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use hangar_api::{HeartbeatReply, HostRegistration};
use hangar_core::{Catalog, Service};
use hangar_vmm::fake::FakeBackend;

use super::wire::{ErrorKind, WireError};
use crate::images::NoImages;
use crate::{
    ArchiveTier, HandOut, Host, HostError, LocalHost, LocalHostConfig, ProgressFn, Purpose,
    RemoteHost, RunState, Stages, VmPlan, WakeFrom,
};

const TOKEN: &str = "farm-secret";

pub(super) const WEB: &str = r#"
[service.web]
os = "busybox"
[[service.web.port]]
name = "http"
guest = 80
[[service.web.process]]
name = "httpd"
argv = ["httpd"]
[service.web.ready]
checks = [{ tcp = { port = "http" } }, { http = { port = "http", body_contains = "fake" } }]
"#;

pub(super) fn web() -> Service {
    Catalog::from_toml(WEB)
        .expect("catalog")
        .services()
        .find(|service| service.name == "web")
        .expect("web")
        .clone()
}

/// An agent serving a fake-backend host on 127.0.0.1, in a runtime of its own so that
/// stopping it closes every connection, as the end of an agent process does.
struct TestAgent {
    url: String,
    backend: FakeBackend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _templates: tempfile::TempDir,
}

impl TestAgent {
    /// Ends the agent: its listener and connections close.
    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_agent() -> TestAgent {
    let backend = FakeBackend::new();
    let templates = tempfile::tempdir().expect("tempdir");
    let host = LocalHost::new(
        Arc::new(backend.clone()),
        Arc::new(NoImages),
        LocalHostConfig {
            name: "h1".into(),
            templates_dir: Some(templates.path().to_owned()),
            ..LocalHostConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound, url) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            bound.send(format!("http://{addr}")).expect("send url");
            let app = super::router(Arc::new(host), TOKEN);
            tokio::select! {
                served = axum::serve(listener, app) => served.expect("serve"),
                _ = stopped => {}
            }
        });
        // The runtime ends here, and with it every connection it served.
    });
    TestAgent {
        url: url.recv().expect("agent url"),
        backend,
        stop: Some(stop),
        thread: Some(thread),
        _templates: templates,
    }
}

/// A VM of `web` at the service's size (the size its template is keyed by).
pub(super) fn plan(id: &str, purpose: Purpose) -> VmPlan {
    let service = web();
    VmPlan {
        id: id.into(),
        os: Some("busybox".into()),
        vcpus: service.vcpus,
        memory_mib: service.memory_mib,
        service: Some(service),
        env: BTreeMap::new(),
        hostname: id.into(),
        purpose,
        ready: None,
        egress: Default::default(),
    }
}

/// What a progress callback was told: (stage, percent).
type Seen = Arc<Mutex<Vec<(String, u8)>>>;

/// A progress callback and what it was told.
fn recorder() -> (ProgressFn, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let progress: ProgressFn = Arc::new(move |stage: &str, percent: u8| {
        sink.lock().unwrap().push((stage.to_owned(), percent));
    });
    (progress, seen)
}

fn names(stages: &Stages) -> Vec<&'static str> {
    stages.0.iter().map(|(name, _)| *name).collect()
}

#[tokio::test]
async fn a_vm_lives_its_whole_life_through_the_agent() {
    let agent = start_agent();
    let remote = RemoteHost::new("h1", &agent.url, TOKEN).unwrap();
    let host: &dyn Host = &remote;

    let facts = host.facts().await.unwrap();
    assert_eq!(facts.name, "h1");
    assert_eq!(facts.hypervisor, "fake");

    // Prepared and made, progress reported as the agent goes.
    let request = plan("vm-1", Purpose::Request);
    let (progress, seen) = recorder();
    let prepared = host.prepare_vm(&request, progress.clone()).await.unwrap();
    assert!(prepared.direct_endpoints.contains_key("http"));
    let made = host.make_vm(&request, &prepared, progress).await.unwrap();
    assert!(!made.cloned);
    let stages: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(stages, ["image", "launch", "boot", "ready"], "{stages:?}");
    assert_eq!(agent.backend.launches(), 1);

    let inventory = host.inventory().await.unwrap();
    assert_eq!(inventory.len(), 1);
    assert_eq!(inventory[0].id, "vm-1");
    assert_eq!(inventory[0].state, RunState::Running);

    // Asleep and awake.
    host.sleep("vm-1").await.unwrap();
    assert_eq!(host.run_state("vm-1").await.unwrap(), RunState::Paused);
    let woken = host.wake("vm-1", &WakeFrom::Sleeping).await.unwrap();
    assert_eq!(names(&woken.stages), ["resume", "identity"]);
    assert_eq!(host.run_state("vm-1").await.unwrap(), RunState::Running);

    // Archived, then restored from the archive with its ready criterion checked.
    assert_eq!(host.archive_facts("vm-1").await.unwrap(), None);
    let archived = host.archive("vm-1", ArchiveTier::Zstd).await.unwrap();
    assert_eq!(archived.memory_mib, request.memory_mib);
    assert_eq!(
        host.archive_facts("vm-1").await.unwrap(),
        Some(archived),
        "the archive as archive() reported it"
    );
    assert_eq!(host.run_state("vm-1").await.unwrap(), RunState::Gone);
    let woken = host
        .wake(
            "vm-1",
            &WakeFrom::Archived {
                launch: made.launch.clone(),
                services: vec![web()],
                direct_endpoints: prepared.direct_endpoints.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&woken.stages), ["restore", "identity", "ready"]);
    assert!(
        woken
            .stages
            .0
            .iter()
            .all(|(_, took)| *took < Duration::from_secs(60))
    );
    assert_eq!(host.run_state("vm-1").await.unwrap(), RunState::Running);
    assert_eq!(host.archive_facts("vm-1").await.unwrap(), None);

    // A pool VM: made paused, handed out.
    let pool = plan("vm-2", Purpose::Pool);
    let (progress, _) = recorder();
    let prepared_pool = host.prepare_vm(&pool, progress.clone()).await.unwrap();
    let made_pool = host.make_vm(&pool, &prepared_pool, progress).await.unwrap();
    assert_eq!(host.run_state("vm-2").await.unwrap(), RunState::Paused);
    let handed = host
        .hand_out(
            "vm-2",
            &HandOut {
                slice_to: None,
                size: (pool.vcpus, pool.memory_mib),
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&handed.stages), ["priority", "resume", "identity"]);
    assert_eq!(host.run_state("vm-2").await.unwrap(), RunState::Running);

    // Stopped and adopted again from its launch record.
    host.stop("vm-2").await.unwrap();
    assert!(
        host.adopt("vm-2", &made_pool.launch, true)
            .await
            .unwrap()
            .is_none(),
        "no process to adopt after stop"
    );

    // Destroyed: gone, idempotently; a VM without a process stays "not running".
    host.destroy("vm-1").await.unwrap();
    host.destroy("vm-1").await.unwrap();
    host.destroy("vm-2").await.unwrap();
    assert!(host.inventory().await.unwrap().is_empty());
    match host.sleep("vm-1").await {
        Err(HostError::Vmm(hangar_vmm::VmmError::NotRunning(id))) => assert_eq!(id, "vm-1"),
        other => panic!("want NotRunning, got {other:?}"),
    }
}

#[tokio::test]
async fn a_private_port_is_closed_through_the_agent_and_stays_closed_after_a_restore() {
    let agent = start_agent();
    let remote = RemoteHost::new("h1", &agent.url, TOKEN).unwrap();
    let host: &dyn Host = &remote;
    let request = plan("vm-1", Purpose::Request);
    let (progress, _) = recorder();
    let prepared = host.prepare_vm(&request, progress.clone()).await.unwrap();
    let made = host.make_vm(&request, &prepared, progress).await.unwrap();
    let http: std::net::SocketAddr = prepared.direct_endpoints["http"].parse().unwrap();
    assert!(tokio::net::TcpStream::connect(http).await.is_ok());

    let launch = host
        .close_forwards("vm-1", &made.launch, &[80])
        .await
        .unwrap();
    assert_eq!(launch.0["forwards"], serde_json::json!([]), "{}", launch.0);
    assert_ne!(launch, made.launch);
    wait_until_refused(http).await;
    // A port it forwards nothing to is no error; the record is unchanged.
    let again = host
        .close_forwards("vm-1", &launch, &[80, 443])
        .await
        .unwrap();
    assert_eq!(again, launch);

    // Restored from the new record: the port stays closed, and its ready criterion is
    // checked inside the guest (there is no endpoint to probe).
    host.archive("vm-1", ArchiveTier::Zstd).await.unwrap();
    let woken = host
        .wake(
            "vm-1",
            &WakeFrom::Archived {
                launch,
                services: vec![web()],
                direct_endpoints: BTreeMap::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&woken.stages), ["restore", "identity", "ready"]);
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
    host.destroy("vm-1").await.unwrap();
}

/// Waits (at most 2 s) until nothing accepts connections at `addr`.
async fn wait_until_refused(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn templates_are_made_listed_cloned_and_removed_through_the_agent() {
    let agent = start_agent();
    let remote = RemoteHost::new("h1", &agent.url, TOKEN).unwrap();
    let host: &dyn Host = &remote;
    let service = web();

    assert!(host.templates_apply(&service).await);
    assert!(!host.has_template(&service).await.unwrap());

    let template_plan = plan("tpl-1", Purpose::Template);
    let (progress, seen) = recorder();
    let prepared = host
        .prepare_vm(&template_plan, progress.clone())
        .await
        .unwrap();
    let made = host
        .make_vm(&template_plan, &prepared, progress)
        .await
        .unwrap();
    let template = made.template.expect("a template");
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|(stage, _)| stage == "snapshot")
    );
    assert!(host.has_template(&service).await.unwrap());
    let held = host
        .templates(std::slice::from_ref(&service))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].id, template.id);
    assert!(held[0].current);
    assert_eq!(
        host.facts().await.unwrap().templates,
        [template.id.as_str()]
    );

    // A new VM is cloned from it, and says so in its launch record.
    let request = plan("vm-3", Purpose::Request);
    let (progress, _) = recorder();
    let prepared = host.prepare_vm(&request, progress.clone()).await.unwrap();
    let made = host.make_vm(&request, &prepared, progress).await.unwrap();
    assert!(made.cloned);
    assert_eq!(agent.backend.clones(), 1);
    assert_eq!(host.template_of(&made.launch), Some(template.id.clone()));
    host.destroy("vm-3").await.unwrap();

    host.remove_template(&template.id).await.unwrap();
    assert!(host.templates(&[]).await.unwrap().is_empty());

    let removed = host.remove_leftovers(&HashSet::new()).await.unwrap();
    assert!(removed.is_empty(), "no vms_dir configured: {removed:?}");
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() {
    let agent = start_agent();
    let wrong = RemoteHost::new("h1", &agent.url, "not-the-token").unwrap();
    match wrong.facts().await {
        Err(HostError::Remote { kind, host, .. }) => {
            assert_eq!(kind, ErrorKind::Unauthorized);
            assert_eq!(host, "h1");
        }
        other => panic!("want an unauthorized error, got {other:?}"),
    }
    let http = reqwest::Client::new();
    let bare = http
        .get(format!("{}/agent/v1/inventory", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);
    let body: WireError = bare.json().await.unwrap();
    assert_eq!(body.kind, ErrorKind::Unauthorized);
    // Only the health check answers without it.
    let health = http
        .get(format!("{}/agent/v1/healthz", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    // A body that is not what the route reads is a bad request, not a crash.
    let bad = http
        .post(format!("{}/agent/v1/vms/x/archive", agent.url))
        .bearer_auth(TOKEN)
        .body("{\"tier\": 7}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_host_whose_agent_is_gone_is_unreachable_quickly() {
    let mut agent = start_agent();
    let remote = RemoteHost::new("h1", &agent.url, TOKEN).unwrap();
    remote.facts().await.unwrap();
    agent.kill();
    // The port is closed now, the pooled connection too: connections are refused.
    let started = Instant::now();
    for result in [
        remote.facts().await.map(|_| ()),
        remote.sleep("vm-1").await,
        remote.inventory().await.map(|_| ()),
    ] {
        match result {
            Err(HostError::Unreachable { host, .. }) => assert_eq!(host, "h1"),
            other => panic!("want Unreachable, got {other:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_host_that_does_not_answer_times_out_as_unreachable() {
    // Accepts connections (the backlog) and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let remote = RemoteHost::new("h2", &url, TOKEN).unwrap();
    let started = Instant::now();
    match remote.facts().await {
        Err(HostError::Unreachable { host, .. }) => assert_eq!(host, "h2"),
        other => panic!("want Unreachable, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= crate::remote::FAST_TIMEOUT / 2 && took < Duration::from_secs(5),
        "{took:?}"
    );
    drop(listener);
}

#[test]
fn errors_a_caller_acts_on_survive_the_wire() {
    let across = |err: HostError| -> HostError {
        let text = serde_json::to_string(&WireError::from(&err)).unwrap();
        serde_json::from_str::<WireError>(&text)
            .unwrap()
            .into_host_error("h1")
    };
    match across(HostError::NotReady("port http: connection refused".into())) {
        HostError::NotReady(message) => assert_eq!(message, "port http: connection refused"),
        other => panic!("want NotReady, got {other:?}"),
    }
    assert!(matches!(
        across(HostError::TemplatesOff),
        HostError::TemplatesOff
    ));
    assert!(matches!(across(HostError::NoAgent), HostError::NoAgent));
    match across(HostError::Vmm(hangar_vmm::VmmError::NotRunning(
        "vm-9".into(),
    ))) {
        HostError::Vmm(hangar_vmm::VmmError::NotRunning(id)) => assert_eq!(id, "vm-9"),
        other => panic!("want NotRunning, got {other:?}"),
    }
    // Others keep their message chain.
    let io = HostError::Io {
        path: "/data/vms/vm-1".into(),
        source: std::io::Error::other("disk full"),
    };
    match across(io) {
        HostError::Remote {
            kind,
            message,
            host,
        } => {
            assert_eq!(kind, ErrorKind::Other);
            assert_eq!(message, "/data/vms/vm-1: disk full");
            assert_eq!(host, "h1");
        }
        other => panic!("want Remote, got {other:?}"),
    }
    // A kind this side does not know reads as Other.
    let newer: WireError =
        serde_json::from_str(r#"{"kind": "quota_exceeded", "message": "m"}"#).unwrap();
    assert_eq!(newer.kind, ErrorKind::Other);
}

#[test]
fn stages_and_services_cross_the_wire() {
    let stages = Stages(vec![
        ("resume", Duration::from_micros(1500)),
        ("identity", Duration::from_millis(20)),
    ]);
    let text = serde_json::to_string(&stages).unwrap();
    assert_eq!(
        text,
        r#"[{"stage":"resume","ms":1.5},{"stage":"identity","ms":20.0}]"#
    );
    assert_eq!(serde_json::from_str::<Stages>(&text).unwrap(), stages);
    let odd: Stages = serde_json::from_str(r#"[{"stage":"warp","ms":-3}]"#).unwrap();
    assert_eq!(odd.0, [("other", Duration::ZERO)]);

    let service = web();
    let text = serde_json::to_string(&service).unwrap();
    assert_eq!(serde_json::from_str::<Service>(&text).unwrap(), service);
}

/// A control plane that records registrations and heartbeats, answers the first heartbeat
/// with 404 (forgotten host) and asks for `fenced` to be destroyed.
#[derive(Clone, Default)]
struct MockPlane {
    registrations: Arc<Mutex<Vec<HostRegistration>>>,
    heartbeats: Arc<Mutex<usize>>,
    fenced: Arc<Mutex<Vec<String>>>,
}

async fn register(
    State(plane): State<MockPlane>,
    Json(registration): Json<HostRegistration>,
) -> Json<HeartbeatReply> {
    plane.registrations.lock().unwrap().push(registration);
    Json(HeartbeatReply {
        state: "up".into(),
        ..HeartbeatReply::default()
    })
}

async fn heartbeat(
    State(plane): State<MockPlane>,
    Path(_name): Path<String>,
) -> Result<Json<HeartbeatReply>, (StatusCode, Json<serde_json::Value>)> {
    let count = {
        let mut count = plane.heartbeats.lock().unwrap();
        *count += 1;
        *count
    };
    if count == 1 {
        return Err((
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": {"code": "not_found", "message": "no host h1"}})),
        ));
    }
    Ok(Json(HeartbeatReply {
        state: "up".into(),
        destroy: plane.fenced.lock().unwrap().clone(),
        servers: Vec::new(),
    }))
}

#[tokio::test]
async fn the_agent_registers_heartbeats_reregisters_and_fences() {
    let plane = MockPlane::default();
    let plane_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plane_url = format!("http://{}", plane_listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/v1/hosts", post(register))
        .route("/v1/hosts/{name}/heartbeat", post(heartbeat))
        .with_state(plane.clone());
    let plane_server = tokio::spawn(async move {
        axum::serve(plane_listener, app).await.expect("serve");
    });
    // A first server address that is down: the agent passes to the next.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);

    let backend = FakeBackend::new();
    let local = LocalHost::new(
        Arc::new(backend.clone()),
        Arc::new(NoImages),
        LocalHostConfig {
            name: "h1".into(),
            ..LocalHostConfig::default()
        },
    );
    let request = plan("vm-fenced", Purpose::Request);
    let (progress, _) = recorder();
    let prepared = local.prepare_vm(&request, progress.clone()).await.unwrap();
    local.make_vm(&request, &prepared, progress).await.unwrap();
    plane.fenced.lock().unwrap().push("vm-fenced".into());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let membership = super::Membership {
        name: "h1".into(),
        address: address.clone(),
        servers: vec![dead_url, plane_url],
        token: TOKEN.into(),
        metrics_token: None,
        labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        cost: 3,
        priority: 5,
        heartbeat_every: Duration::from_millis(50),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(super::run::serve(
        Arc::new(local),
        listener,
        membership,
        async move {
            let _ = stopped.await;
        },
    ));

    let deadline = Instant::now() + Duration::from_secs(10);
    while local_vm_runs(&backend).await {
        assert!(Instant::now() < deadline, "the fenced VM was not destroyed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registrations = plane.registrations.lock().unwrap().clone();
    assert_eq!(
        registrations.len(),
        2,
        "registered, then again after the 404"
    );
    let first = &registrations[0];
    assert_eq!(first.name, "h1");
    assert_eq!(first.address, address);
    assert_eq!(first.cost, 3);
    assert_eq!(first.priority, 5);
    assert_eq!(first.labels["zone"], "a");
    assert_eq!(first.facts.hypervisor, "fake");
    assert_eq!(first.vms.len(), 1);
    assert_eq!(first.vms[0].id, "vm-fenced");
    assert_eq!(first.vms[0].state, "running");
    assert_eq!(
        registrations[0].incarnation, registrations[1].incarnation,
        "one process, one incarnation"
    );

    // The agent's API serves while it reports.
    let remote = RemoteHost::new("h1", &address, TOKEN).unwrap();
    assert!(remote.inventory().await.unwrap().is_empty());

    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    plane_server.abort();
}

async fn local_vm_runs(backend: &FakeBackend) -> bool {
    use hangar_vmm::Hypervisor;
    backend.run_state("vm-fenced").await.ok() != Some(RunState::Gone)
}

#[tokio::test]
async fn a_vms_console_is_read_through_the_agent_from_an_offset_or_its_end() {
    let agent = start_agent();
    let dir = tempfile::tempdir().expect("tempdir");
    agent.backend.keep_consoles_in(dir.path());
    let remote = RemoteHost::new("far", &agent.url, TOKEN).expect("client");
    let empty = remote.console("vm-c", None, 10).await.expect("console");
    assert_eq!(empty, crate::ConsoleChunk::default());

    std::fs::write(dir.path().join("vm-c.log"), b"booting\nready\n").expect("write");
    let tail = remote.console("vm-c", None, 6).await.expect("console");
    assert_eq!(
        (tail.offset, tail.data.as_slice(), tail.size),
        (8, &b"ready\n"[..], 14)
    );
    let all = remote
        .console("vm-c", Some(0), 1 << 16)
        .await
        .expect("console");
    assert_eq!((all.offset, all.data.len(), all.size), (0, 14, 14));
    let some = remote.console("vm-c", Some(3), 4).await.expect("console");
    assert_eq!((some.offset, some.data.as_slice()), (3, &b"ting"[..]));
    let nothing_new = remote
        .console("vm-c", Some(14), 100)
        .await
        .expect("console");
    assert!(nothing_new.data.is_empty());
    // Past the end: the output began again, so from its start.
    let again = remote.console("vm-c", Some(99), 7).await.expect("console");
    assert_eq!((again.offset, again.data.as_slice()), (0, &b"booting"[..]));
}
