//! The request path, deletion and reconciliation on the fake backend (logic only; the
//! real-QEMU tests are in `crates/hangar-cli/tests`).

use std::sync::Arc;
use std::time::Duration;

use hangar_core::{Mode, VmState};
use hangar_store::{Store, TaskState};
use hangar_vmm::Hypervisor;
use hangar_vmm::fake::FakeBackend;

use crate::manager::{Manager, ManagerConfig};
use crate::requests::Served;
use crate::requests::{Grant, RequestError};
use crate::test_support::*;

const CATALOG: &str = crate::test_support::WEB_AND_NEVER_READY;

fn manager_with(store: Arc<dyn Store>, backend: FakeBackend) -> Arc<Manager> {
    manager_on(store, backend, CATALOG, ManagerConfig::default())
}

fn setup() -> (Arc<Manager>, FakeBackend, Arc<dyn Store>) {
    fake_manager(CATALOG, ManagerConfig::default())
}

#[tokio::test]
async fn shared_requests_reuse_the_active_vm_and_dedicated_ones_do_not() {
    let (manager, backend, store) = setup();
    let first = manager.request(request("web", Mode::Shared)).await.unwrap();
    assert_eq!(first.served, Served::Created);
    assert_eq!(first.vm.state, VmState::Active);
    assert!(
        first.endpoint.starts_with("127.0.0.1:"),
        "{}",
        first.endpoint
    );
    let task = store
        .task(first.task.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (task.state, task.percent, task.vm_id.as_deref()),
        (TaskState::Succeeded, 100, Some(&*first.vm.id))
    );

    let second = manager.request(request("web", Mode::Shared)).await.unwrap();
    assert_eq!(second.served, Served::Shared);
    assert_eq!(second.vm.id, first.vm.id);

    let dedicated = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    assert_ne!(dedicated.vm.id, first.vm.id);
    assert_eq!(dedicated.vm.mode, Mode::Dedicated);
    // A dedicated VM is never handed to a shared request.
    let third = manager.request(request("web", Mode::Shared)).await.unwrap();
    assert_eq!(third.vm.id, first.vm.id);
    assert_eq!(backend.launches(), 2);

    let mut other_env = request("web", Mode::Shared);
    other_env.env.insert("greeting".into(), "hi".into());
    let other = manager.request(other_env).await.unwrap();
    assert_ne!(
        other.vm.id, first.vm.id,
        "different environments do not share a VM"
    );
}

#[tokio::test]
async fn concurrent_shared_requests_make_one_vm() {
    let (manager, backend, _) = setup();
    let requests = (0..5).map(|_| {
        let manager = manager.clone();
        tokio::spawn(async move { manager.request(request("web", Mode::Shared)).await.unwrap() })
    });
    let grants = futures_join(requests).await;
    assert_eq!(backend.launches(), 1);
    assert!(grants.iter().all(|grant| grant.vm.id == grants[0].vm.id));
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn unknown_and_impossible_requests_are_refused_with_alternatives() {
    let (manager, backend, _) = setup();
    match manager.request(request("wbe", Mode::Shared)).await {
        Err(RequestError::NotFound {
            message,
            alternatives,
        }) => {
            assert_eq!(message, r#"no service named "wbe""#);
            assert_eq!(alternatives, ["web"]);
        }
        other => panic!("expected not found, got {:?}", other.map(|g| g.vm.id)),
    }
    let mut on_debian = request("web", Mode::Shared);
    on_debian.env.insert("os".into(), "debian-12".into());
    match manager.request(on_debian).await {
        Err(RequestError::Never {
            message,
            alternatives,
        }) => {
            assert!(
                message.contains("web on os=debian-12 can never be offered"),
                "{message}"
            );
            assert_eq!(alternatives[0], "web --env os=busybox");
        }
        other => panic!("expected never, got {:?}", other.map(|g| g.vm.id)),
    }
    let mut bad_env = request("web", Mode::Shared);
    bad_env.env.insert("not valid".into(), "x".into());
    assert!(matches!(
        manager.request(bad_env).await,
        Err(RequestError::Invalid(_))
    ));
    assert_eq!(backend.launches(), 0);
}

/// `kv`: a busybox service with a size setting, as redis's `maxmemory` is.
const KV: &str = r#"
[service.kv]
os = "busybox"
[[service.kv.port]]
name = "kv"
guest = 6379
[[service.kv.process]]
name = "kv"
argv = ["kv"]
[service.kv.settings.maxmemory]
default = "64mb"
format = "size"
[service.kv.settings.secret]
default = "x"
secret = true
format = "word"
[service.kv.ready]
checks = [{ tcp = { port = "kv" } }]
"#;

#[tokio::test]
async fn a_setting_value_outside_its_format_is_refused_before_anything_starts() {
    let (manager, backend, store) = fake_manager(KV, ManagerConfig::default());
    let mut bad = request("kv", Mode::Dedicated);
    bad.env
        .insert("maxmemory".into(), "64mb requirepass".into());
    let started = std::time::Instant::now();
    let err = manager.request(bad).await.expect_err("refused");
    assert!(matches!(err, RequestError::Settings(_)), "{err}");
    assert_eq!(
        err.to_string(),
        r#"kv: setting maxmemory="64mb requirepass" must be a size: digits and an optional unit (k, kb, m, mb, g, gb, t, tb), such as 64mb"#
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let mut secret = request("kv", Mode::Dedicated);
    secret.env.insert("secret".into(), "pass word".into());
    let err = manager.request(secret).await.expect_err("refused");
    assert!(
        !err.to_string().contains("pass word"),
        "a secret value is never repeated: {err}"
    );
    let mut newline = request("kv", Mode::Dedicated);
    newline.env.insert("maxmemory".into(), "64mb\nsave".into());
    assert!(matches!(
        manager.request(newline).await,
        Err(RequestError::Invalid(_))
    ));
    assert_eq!(backend.launches(), 0);
    assert!(store.vms(true).await.unwrap().is_empty(), "no VM row");

    let mut good = request("kv", Mode::Dedicated);
    good.env.insert("maxmemory".into(), "128MB".into());
    assert!(manager.request(good).await.is_ok());
}

fn config_request(vcpus: u32, memory_mib: u32) -> hangar_core::ServiceRequest {
    hangar_core::ServiceRequest {
        config: Some(hangar_core::matching::MachineRequest {
            vcpus,
            memory_mib: hangar_core::matching::MemoryRange {
                min: memory_mib,
                max: memory_mib,
            },
            os: hangar_core::matching::OsRequirement {
                name: "busybox".into(),
                min_version: None,
            },
            apps: Default::default(),
            disk_mib: None,
        }),
        ..hangar_core::ServiceRequest::default()
    }
}

#[tokio::test]
async fn sizes_beyond_every_host_or_absurd_are_refused_and_leave_no_vm() {
    use hangar_core::heuristics::ProblemCode;
    let (manager, backend, store) = setup();
    let refused = |result: Result<Grant, RequestError>| match result {
        Err(RequestError::Unservable(verdict)) => verdict,
        other => panic!("expected unservable, got {:?}", other.map(|g| g.vm.id)),
    };
    for (vcpus, memory, code) in [
        (1_000_000_000, 128, ProblemCode::VcpusOverMax),
        (1, 4_000_000_000, ProblemCode::MemoryOverMax),
        (0, 128, ProblemCode::VcpusZero),
    ] {
        let verdict = refused(manager.request(config_request(vcpus, memory)).await);
        assert_eq!(verdict.errors().map(|p| p.code).collect::<Vec<_>>(), [code]);
    }
    let cpus = hangar_host::facts::vcpus();
    if cpus < hangar_core::matching::MAX_VCPUS {
        let verdict = refused(manager.request(config_request(cpus + 1, 128)).await);
        let problem = verdict.errors().next().unwrap();
        assert_eq!(problem.code, ProblemCode::VcpusOverHost);
        assert_eq!(
            problem.message,
            format!("{} vCPUs asked; the largest host has {cpus}", cpus + 1)
        );
        assert_eq!(
            problem.suggestion,
            format!("ask for --vcpus {cpus} or fewer")
        );
    }
    let memory = hangar_host::facts::memory_mib().0;
    if memory < u64::from(hangar_core::matching::MAX_MEMORY_MIB) {
        let asked = u32::try_from(memory + 1).unwrap();
        let verdict = refused(manager.request(config_request(1, asked)).await);
        let problem = verdict.errors().next().unwrap();
        assert_eq!(problem.code, ProblemCode::MemoryOverHost);
        assert_eq!(
            problem.message,
            format!("{asked} MiB of memory asked; the largest host has {memory} MiB")
        );
    }
    assert_eq!(backend.launches(), 0);
    assert!(store.vms(true).await.unwrap().is_empty(), "no VM row");
    assert!(manager.request(config_request(1, 128)).await.is_ok());
}

#[tokio::test]
async fn a_failed_launch_leaves_a_failed_record_and_nothing_running() {
    let (manager, backend, store) = setup();
    backend.fail_next_launch();
    let err = manager
        .request(request("web", Mode::Shared))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("simulated launch failure"),
        "{err}"
    );
    let vms = store.vms(false).await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state, VmState::Failed);
    assert!(
        vms[0]
            .error
            .as_deref()
            .unwrap()
            .contains("simulated launch failure")
    );
    assert!(backend.running().await.unwrap().is_empty());
    // The next request works.
    assert!(manager.request(request("web", Mode::Shared)).await.is_ok());
}

#[tokio::test]
async fn past_the_deadline_the_answer_is_try_again_and_the_task_goes_on() {
    let (manager, backend, store) = setup();
    let mut hurried = request("never-ready", Mode::Dedicated);
    hurried.deadline_ms = Some(100);
    let task = match manager.request(hurried).await {
        Err(RequestError::TryAgain {
            retry_after_s,
            task: Some(task),
            ..
        }) => {
            assert!(retry_after_s >= 1);
            task
        }
        other => panic!("expected try again, got {:?}", other.map(|g| g.vm.id)),
    };
    assert_eq!(
        store.task(&task).await.unwrap().unwrap().state,
        TaskState::Running
    );
    // The VM never meets its criterion: the task fails and cleans up after itself.
    for _ in 0..100 {
        if store.task(&task).await.unwrap().unwrap().state != TaskState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let task = store.task(&task).await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Failed);
    assert!(
        task.error
            .as_deref()
            .unwrap()
            .contains("not ready after 600ms"),
        "{:?}",
        task.error
    );
    assert!(backend.running().await.unwrap().is_empty());
}

#[tokio::test]
async fn delete_frees_the_vm_and_is_idempotent() {
    let (manager, backend, _) = setup();
    let grant = manager.request(request("web", Mode::Shared)).await.unwrap();
    let deleted = manager.delete(&grant.vm.id).await.unwrap();
    assert_eq!(deleted.state, VmState::Deleted);
    assert!(backend.running().await.unwrap().is_empty());
    assert_eq!(
        manager.delete(&grant.vm.id).await.unwrap().state,
        VmState::Deleted
    );
    assert!(matches!(
        manager.delete("vm-nope").await,
        Err(crate::lifecycle::ops::LifecycleError::NoVm(_))
    ));
    // A new shared request makes a new VM.
    assert_ne!(
        manager
            .request(request("web", Mode::Shared))
            .await
            .unwrap()
            .vm
            .id,
        grant.vm.id
    );
}

#[tokio::test]
async fn restart_adopts_running_vms_fails_vanished_ones_and_stops_strangers() {
    let (manager, backend, store) = setup();
    let kept = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    let crashed = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    drop(manager);

    // While the server is down: one VM dies, and a stranger appears.
    backend.crash(&crashed.vm.id);
    let stranger = hangar_vmm::VmSpec {
        id: "vm-stranger".into(),
        vcpus: 1,
        memory_mib: 64,
        ram_tail_kib: 0,
        segment_nic: false,
        egress: hangar_core::EgressPolicy::Open,
        kernel: "k".into(),
        initramfs: "i".into(),
        cmdline: String::new(),
        base_image: None,
        layers: Vec::new(),
        forwards: vec![],
        pre_os: false,
        layer_slots: 0,
        background: false,
        template: None,
        firmware: false,
        memory: Default::default(),
    };
    backend.launch(&stranger).await.unwrap();

    let restarted = manager_with(store.clone(), backend.clone());
    let report = restarted.reconcile().await.unwrap();
    assert_eq!(report.adopted, [kept.vm.id.as_str()]);
    assert_eq!(report.failed, [crashed.vm.id.as_str()]);
    assert_eq!(report.stopped_unknown, ["vm-stranger"]);
    assert_eq!(backend.running().await.unwrap(), [kept.vm.id.as_str()]);
    assert_eq!(
        store.vm(&crashed.vm.id).await.unwrap().unwrap().state,
        VmState::Failed
    );
    // The adopted VM's control channel works: waking re-identifies it through the agent.
    restarted.sleep(&kept.vm.id).await.unwrap();
    restarted.wake(&kept.vm.id).await.unwrap();
    // Reconciling again changes nothing.
    let again = restarted.reconcile().await.unwrap();
    assert_eq!(
        (
            again.adopted.len(),
            again.failed.len(),
            again.stopped_unknown.len()
        ),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn monitor_marks_crashed_vms_failed() {
    let (manager, backend, store) = setup();
    let grant = manager.request(request("web", Mode::Shared)).await.unwrap();
    backend.crash(&grant.vm.id);
    manager.monitor_once().await;
    let vm = store.vm(&grant.vm.id).await.unwrap().unwrap();
    assert_eq!(vm.state, VmState::Failed);
    assert!(vm.error.unwrap().contains("exited unexpectedly"));
}

/// An archive ends the VM's process before the store says archived: the monitor must not
/// take that for a crash (it once did, and destroyed the VM under the archive).
#[tokio::test]
async fn monitor_leaves_a_vm_alone_while_an_operation_holds_it() {
    let (manager, backend, store) = setup();
    let grant = manager.request(request("web", Mode::Shared)).await.unwrap();
    let id = grant.vm.id.as_str();
    let lock = manager.vm_op_lock(id);
    let in_flight = lock.lock().await;
    backend.crash(id);
    manager.monitor_once().await;
    assert_eq!(store.vm(id).await.unwrap().unwrap().state, VmState::Active);
    // A shared request looking for a running VM does not judge it either.
    let other = manager.request(request("web", Mode::Shared)).await.unwrap();
    assert_ne!(other.vm.id, id);
    assert_eq!(store.vm(id).await.unwrap().unwrap().state, VmState::Active);
    drop(in_flight);
    manager.monitor_once().await;
    assert_eq!(store.vm(id).await.unwrap().unwrap().state, VmState::Failed);
}

pub(crate) mod http {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    pub(crate) async fn call(
        manager: Arc<Manager>,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value, Option<String>) {
        ensure_admin(&manager).await;
        let response = crate::api::router(manager)
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                    .body(Body::from(body.to_owned()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            retry_after,
        )
    }

    #[tokio::test]
    async fn errors_are_json_with_fitting_statuses() {
        let (manager, _, _) = setup();
        let (status, body, _) = call(manager.clone(), "POST", "/v1/requests", "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "bad_request");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid request body")
        );

        let (status, body, _) = call(
            manager.clone(),
            "POST",
            "/v1/requests",
            r#"{"service":"wbe"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["alternatives"][0], "web");

        let (status, body, retry) = call(
            manager.clone(),
            "POST",
            "/v1/requests",
            r#"{"service":"never-ready","deadline_ms":50}"#,
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "try_again");
        assert!(body["error"]["task"].as_str().unwrap().starts_with("task-"));
        assert_eq!(retry.as_deref(), Some("2"));

        let (status, _, _) = call(manager.clone(), "GET", "/v1/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = call(manager, "GET", "/v1/vms/vm-unknown", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn request_then_list_then_delete() {
        let (manager, _, _) = setup();
        let (status, grant, _) = call(
            manager.clone(),
            "POST",
            "/v1/requests",
            r#"{"service":"web"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{grant}");
        assert_eq!(grant["state"], "active");
        let id = grant["vm"].as_str().unwrap().to_owned();
        let (_, vms, _) = call(manager.clone(), "GET", "/v1/vms", "").await;
        assert_eq!(vms[0]["id"], id.as_str());
        assert_eq!(vms[0]["services"][0], "web");
        assert_eq!(vms[0]["endpoints"]["http"], grant["endpoint"]);
        let (status, deleted, _) =
            call(manager.clone(), "DELETE", &format!("/v1/vms/{id}"), "").await;
        assert_eq!(
            (status, deleted["state"].as_str()),
            (StatusCode::OK, Some("deleted"))
        );
        let (_, vms, _) = call(manager.clone(), "GET", "/v1/vms", "").await;
        assert_eq!(vms.as_array().unwrap().len(), 0);
        let (_, task, _) = call(
            manager.clone(),
            "GET",
            &format!("/v1/tasks/{}", grant["task"].as_str().unwrap()),
            "",
        )
        .await;
        assert_eq!(task["state"], "succeeded");
        let (status, spec, _) = call(manager, "GET", "/v1/openapi.json", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(spec["paths"]["/v1/requests"]["post"].is_object());
    }
}

mod lifecycle {
    use hangar_vmm::ArchiveTier;

    use super::*;

    #[tokio::test]
    async fn sleep_archive_wake_follow_the_state_machine() {
        let (manager, backend, store) = setup();
        let grant = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap();
        let id = grant.vm.id.as_str();
        assert_eq!(manager.sleep(id).await.unwrap().state, VmState::Sleeping);
        assert_eq!(
            backend.run_state(id).await.unwrap(),
            hangar_vmm::RunState::Paused
        );
        // A sleeping VM resumes as it was paused, serving: no ready check.
        let (vm, stages) = manager.wake_timed(id).await.unwrap();
        assert_eq!(vm.state, VmState::Active);
        let names = |stages: &crate::requests::Stages| -> Vec<&str> {
            stages.0.iter().map(|(name, _)| *name).collect()
        };
        assert_eq!(names(&stages), ["resume", "identity"]);
        let (vm, info) = manager.archive(id, ArchiveTier::Zstd).await.unwrap();
        assert_eq!(
            (vm.state, info.tier),
            (VmState::Archived, ArchiveTier::Zstd)
        );
        assert_eq!(
            backend.run_state(id).await.unwrap(),
            hangar_vmm::RunState::Gone
        );
        let err = manager.sleep(id).await.unwrap_err();
        assert!(
            err.to_string().contains("only an active VM can sleep"),
            "{err}"
        );
        // A restored one passes its ready criterion again.
        let (vm, stages) = manager.wake_timed(id).await.unwrap();
        assert_eq!(vm.state, VmState::Active);
        assert_eq!(names(&stages), ["restore", "identity", "ready"]);
        assert!(
            manager.archive_info(id).await.is_none(),
            "the archive is used up by the restore"
        );
        assert_eq!(
            backend.run_state(id).await.unwrap(),
            hangar_vmm::RunState::Running
        );
        assert_eq!(store.vm(id).await.unwrap().unwrap().state, VmState::Active);
    }

    #[tokio::test]
    async fn an_archive_finished_but_unrecorded_is_found_at_restart() {
        let (manager, backend, store) = setup();
        let vm = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap()
            .vm;
        // The backend finished the archive (QEMU gone) but the server died before recording it.
        backend.archive(&vm.id, ArchiveTier::Zstd).await.unwrap();
        assert_eq!(
            store.vm(&vm.id).await.unwrap().unwrap().state,
            VmState::Active
        );
        drop(manager);
        let restarted = manager_with(store.clone(), backend.clone());
        let report = restarted.reconcile().await.unwrap();
        assert!(report.failed.is_empty(), "{report:?}");
        assert_eq!(
            store.vm(&vm.id).await.unwrap().unwrap().state,
            VmState::Archived
        );
        assert!(
            restarted.archive_info(&vm.id).await.is_some(),
            "nothing lost"
        );
        assert_eq!(restarted.wake(&vm.id).await.unwrap().state, VmState::Active);
    }

    #[tokio::test]
    async fn restart_keeps_archives_and_stops_restores_cut_short() {
        let (manager, backend, store) = setup();
        let kept = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap()
            .vm;
        let cut = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap()
            .vm;
        manager.archive(&kept.id, ArchiveTier::Raw).await.unwrap();
        manager.archive(&cut.id, ArchiveTier::Raw).await.unwrap();
        drop(manager);
        // A restore of `cut` was under way when the server died: a process, and the archive.
        let spec: hangar_vmm::VmSpec = serde_json::from_value(cut.spec.clone()).unwrap();
        backend.launch(&spec).await.unwrap();

        let restarted = manager_with(store.clone(), backend.clone());
        let report = restarted.reconcile().await.unwrap();
        assert!(report.stopped_unknown.is_empty(), "{report:?}");
        for id in [&kept.id, &cut.id] {
            assert_eq!(
                store.vm(id).await.unwrap().unwrap().state,
                VmState::Archived
            );
            assert!(
                restarted.archive_info(id).await.is_some(),
                "archive kept for {id}"
            );
        }
        assert!(
            backend.running().await.unwrap().is_empty(),
            "the half-restored process was stopped"
        );
        assert_eq!(
            restarted.wake(&cut.id).await.unwrap().state,
            VmState::Active
        );
    }
}

#[tokio::test]
async fn later_vms_are_cloned_from_the_template_the_first_request_started() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(hangar_store::SqliteStore::open_in_memory().unwrap());
    let backend = FakeBackend::new();
    let manager = crate::test_support::manager_on_host(
        store.clone(),
        backend.clone(),
        CATALOG,
        ManagerConfig::default(),
        hangar_host::LocalHostConfig {
            templates_dir: Some(dir.path().join("templates")),
            ..hangar_host::LocalHostConfig::default()
        },
    );
    let first = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    assert_eq!(first.served, Served::Created);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while manager.templates().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no template built");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let templates = manager.templates().await;
    assert_eq!(templates.len(), 1);
    assert!(templates[0].current);
    assert_eq!(templates[0].service, "web");
    // The template's VM is gone; its record says so.
    let tasks = store.tasks(100).await.unwrap();
    let build = tasks.iter().find(|t| t.kind == "build_template").unwrap();
    assert_eq!(build.state, TaskState::Succeeded);
    let source = store
        .vm(build.vm_id.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(source.state, VmState::Deleted);

    let second = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    assert_eq!(second.served, Served::Cloned);
    assert_eq!(second.vm.state, VmState::Active);
    assert_eq!(backend.clones(), 1);
    assert_ne!(second.endpoint, first.endpoint);
    // Requests with settings are configured at boot, never cloned.
    let mut with_env = request("web", Mode::Dedicated);
    with_env.env.insert("greeting".into(), "hi".into());
    let third = manager.request(with_env).await.unwrap();
    assert_eq!(third.served, Served::Created);
    assert_eq!(backend.clones(), 1);
}

/// Stable endpoints with an in-process forwarder and the API served on loopback, so that
/// the forwarder's wake requests reach the manager as they would in `hangar server`.
mod stable_endpoints {
    use std::collections::BTreeMap;

    use hangar_forward::Forwarder;
    use hangar_store::VmRecord;
    use hangar_vmm::ArchiveTier;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::endpoints::{ForwarderKind, StableEndpoints, desired_endpoints};

    /// Serves the API on loopback with an in-process forwarder; returns both, to stop them.
    async fn serve_with_endpoints(
        manager: &Arc<Manager>,
    ) -> (Forwarder, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let forwarder = Forwarder::new(&url);
        ensure_admin(manager).await;
        forwarder.set_token(ADMIN_TOKEN);
        manager.use_stable_endpoints(StableEndpoints::new(
            ForwarderKind::InProcess(forwarder.clone()),
            &url,
        ));
        let api = axum::serve(listener, crate::api::router(manager.clone())).into_future();
        (forwarder, tokio::spawn(api))
    }

    async fn get(endpoint: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(endpoint).await?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn endpoints_stay_put_and_a_connection_wakes_a_sleeping_or_archived_vm() {
        let (manager, backend, store) = setup();
        serve_with_endpoints(&manager).await;
        let grant = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap();
        let id = grant.vm.id.clone();
        assert_ne!(grant.endpoint, grant.direct_endpoint);
        assert!(get(&grant.endpoint).await.unwrap().contains("fake"));

        for archived in [false, true] {
            if archived {
                manager.archive(&id, ArchiveTier::Zstd).await.unwrap();
            } else {
                manager.sleep(&id).await.unwrap();
            }
            // The client's request is written at once; it is answered once the VM woke.
            let answer = tokio::time::timeout(Duration::from_secs(10), get(&grant.endpoint))
                .await
                .expect("answered within 10 s")
                .unwrap();
            assert!(answer.contains(&format!("fake {id}")), "{answer}");
            assert_eq!(store.vm(&id).await.unwrap().unwrap().state, VmState::Active);
            assert_eq!(
                backend.run_state(&id).await.unwrap(),
                hangar_vmm::RunState::Running
            );
        }
        let vm = store.vm(&id).await.unwrap().unwrap();
        assert_eq!(
            vm.endpoints["http"], grant.endpoint,
            "the same endpoint throughout"
        );

        // Activity reaches the VM's last use.
        // (Last use never moves back: `before` is the wake's; the connection comes later.)
        let before = store.vm(&id).await.unwrap().unwrap().last_used_at_ms;
        tokio::time::sleep(Duration::from_millis(20)).await;
        get(&grant.endpoint).await.unwrap();
        manager.poll_endpoint_activity().await;
        assert!(store.vm(&id).await.unwrap().unwrap().last_used_at_ms > before);

        manager.delete(&id).await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(&grant.endpoint)
                .await
                .is_err(),
            "no listener after delete"
        );
    }

    #[tokio::test]
    async fn restart_gives_the_forwarder_every_endpoint_and_closes_the_rest() {
        let (manager, backend, store) = setup();
        let (forwarder, api) = serve_with_endpoints(&manager).await;
        let kept = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap();
        let archived = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap();
        manager
            .archive(&archived.vm.id, ArchiveTier::Raw)
            .await
            .unwrap();
        // Server and forwarder stop (as after a crash of both).
        forwarder.handle(hangar_forward::Request::Shutdown).await;
        api.abort();
        let _ = api.await;
        drop(manager);
        assert!(get(&kept.endpoint).await.is_err());

        // A new server, with a new, empty forwarder, gives it every endpoint from the store.
        let restarted = manager_with(store.clone(), backend.clone());
        serve_with_endpoints(&restarted).await;
        restarted.reconcile().await.unwrap();
        restarted.sync_endpoints().await.unwrap();
        assert!(get(&kept.endpoint).await.unwrap().contains("fake"));
        let answer = get(&archived.endpoint).await.unwrap();
        assert!(answer.contains(&archived.vm.id), "{answer}");
        assert_eq!(
            store.vm(&archived.vm.id).await.unwrap().unwrap().state,
            VmState::Active
        );
    }

    /// Issue 13, finding 6: a connection open through the endpoint keeps its VM in use:
    /// the lifecycle loop does not put it to sleep (or archive it) under the client, which
    /// gets its whole answer; once the connection closes the VM idles down as before.
    #[tokio::test]
    async fn an_open_connection_keeps_its_vm_awake_through_the_lifecycle_loop() {
        let (manager, _backend, store) = fake_manager(
            CATALOG,
            ManagerConfig {
                policy_floors: hangar_core::lifecycle::PolicyFloors::NONE,
                ..ManagerConfig::default()
            },
        );
        serve_with_endpoints(&manager).await;
        manager
            .set_policy(
                "web",
                &crate::lifecycle::policy::PolicyChange {
                    sleep_after: Some(Some(Duration::from_millis(100))),
                    archive_after: Some(Some(Duration::from_millis(100))),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let grant = manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap();
        let id = grant.vm.id.clone();

        // A slow client: connected and forwarded, its request not yet sent.
        let mut slow = tokio::net::TcpStream::connect(&grant.endpoint)
            .await
            .unwrap();
        for _ in 0..20 {
            manager.poll_endpoint_activity().await;
            manager.reconcile_lifecycle().await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(
            store.vm(&id).await.unwrap().unwrap().state,
            VmState::Active,
            "in use while a connection is open"
        );
        slow.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), slow.read_to_string(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        assert!(answer.contains(&format!("fake {id}")), "{answer:?}");
        drop(slow);

        // Closed: idle, it sleeps on its policy.
        let mut state = VmState::Active;
        for _ in 0..100 {
            manager.reconcile_lifecycle().await.unwrap();
            state = store.vm(&id).await.unwrap().unwrap().state;
            if state != VmState::Active {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state, VmState::Sleeping);
    }

    fn record(id: &str, state: VmState, stable: &str, direct: &str) -> VmRecord {
        VmRecord {
            mode: Mode::Shared,
            owner: "local".into(),
            endpoints: BTreeMap::from([("http".into(), stable.into())]),
            direct_endpoints: BTreeMap::from([("http".into(), direct.into())]),
            spec: serde_json::json!({}),
            created_at_ms: 1,
            updated_at_ms: 1,
            last_used_at_ms: 1,
            ..crate::test_support::vm_record(id, state)
        }
    }

    #[test]
    fn desired_endpoints_follow_vm_states() {
        let vms = [
            record("a", VmState::Active, "127.0.0.1:1000", "127.0.0.1:2000"),
            record("s", VmState::Sleeping, "127.0.0.1:1001", "127.0.0.1:2001"),
            record("z", VmState::Archived, "127.0.0.1:1002", "127.0.0.1:2002"),
            record("r", VmState::Ready, "127.0.0.1:1003", "127.0.0.1:2003"),
            record("f", VmState::Failed, "127.0.0.1:1004", "127.0.0.1:2004"),
            record("d", VmState::Deleted, "127.0.0.1:1005", "127.0.0.1:2005"),
            // Made before stable endpoints: its endpoint is its own port forward.
            record("o", VmState::Active, "127.0.0.1:1006", "127.0.0.1:1006"),
        ];
        let specs: Vec<(String, u16, u16, bool)> =
            desired_endpoints(&vms, &hangar_core::Catalog::demo())
                .into_iter()
                .map(|s| (s.vm, s.listen.port(), s.target.port(), s.active))
                .collect();
        assert_eq!(
            specs,
            vec![
                ("a".into(), 1000, 2000, true),
                ("s".into(), 1001, 2001, false),
                ("z".into(), 1002, 2002, false),
                ("r".into(), 1003, 2003, true),
            ]
        );
    }
}
