//! Lifecycle policies and budgets on the fake backend: the loop's rounds, last use,
//! keep-active, LRU eviction, run-time policies, shared requests waking dormant VMs.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::lifecycle::{Action, Reason};
use hangar_core::{Mode, TierChoice, VmState};
use hangar_store::Store;
use hangar_vmm::fake::FakeBackend;
use hangar_vmm::{ArchiveTier, Hypervisor};

use crate::lifecycle::policy::PolicyError;
use crate::lifecycle::policy::{PolicyChange, PolicySource};
use crate::manager::{Manager, ManagerConfig};
use crate::requests::Served;
use crate::test_support::*;

const CATALOG: &str = r#"
[service.web]
os = "busybox"
memory_mib = 128
[[service.web.port]]
name = "http"
guest = 80
[[service.web.process]]
name = "httpd"
argv = ["httpd"]
[service.web.ready]
checks = [{ http = { port = "http" } }]
[service.web.policy]
sleep_after = "150ms"
archive_after = "150ms"
delete_after = "150ms"

[service.db]
os = "busybox"
memory_mib = 128
[[service.db.port]]
name = "sql"
guest = 5432
[[service.db.process]]
name = "db"
argv = ["db"]
[service.db.ready]
checks = [{ tcp = { port = "sql" } }]
"#;

fn setup_with(config: ManagerConfig) -> (Arc<Manager>, FakeBackend, Arc<dyn Store>) {
    fake_manager(CATALOG, config)
}

fn setup() -> (Arc<Manager>, FakeBackend, Arc<dyn Store>) {
    setup_with(ManagerConfig::default())
}

async fn state(store: &Arc<dyn Store>, id: &str) -> VmState {
    store.vm(id).await.unwrap().unwrap().state
}

/// Runs lifecycle rounds every 20 ms until `id` is in `want` (at most 2 s).
async fn rounds_until(manager: &Manager, store: &Arc<dyn Store>, id: &str, want: VmState) {
    for _ in 0..100 {
        manager.reconcile_lifecycle().await.unwrap();
        if state(store, id).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "VM {id} is {} after 2 s, not {want}",
        state(store, id).await
    );
}

#[tokio::test]
async fn an_idle_vm_sleeps_is_archived_and_deleted_on_its_own() {
    let (manager, backend, store) = setup();
    let vm = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    assert!(
        manager.reconcile_lifecycle().await.unwrap().is_empty(),
        "just granted"
    );

    rounds_until(&manager, &store, &vm.id, VmState::Sleeping).await;
    assert_eq!(
        backend.run_state(&vm.id).await.unwrap(),
        hangar_vmm::RunState::Paused
    );
    rounds_until(&manager, &store, &vm.id, VmState::Archived).await;
    assert_eq!(
        backend.archive_info(&vm.id).unwrap().tier,
        ArchiveTier::Zstd
    );
    rounds_until(&manager, &store, &vm.id, VmState::Deleted).await;
    assert!(
        backend.archive_info(&vm.id).is_none(),
        "the archive went with it"
    );

    // The db service has no policy: its VM stays active however long it idles.
    let db = manager
        .request(request("db", Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(manager.reconcile_lifecycle().await.unwrap().is_empty());
    assert_eq!(state(&store, &db.id).await, VmState::Active);
}

#[tokio::test]
async fn use_restarts_the_idle_timer() {
    let (manager, _, store) = setup();
    let vm = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        manager.note_use(&vm.id).await.unwrap();
        manager.reconcile_lifecycle().await.unwrap();
        assert_eq!(
            state(&store, &vm.id).await,
            VmState::Active,
            "used every 60 ms"
        );
    }
    let used = store.vm(&vm.id).await.unwrap().unwrap().last_used_at_ms;
    assert!(used > vm.last_used_at_ms);
    rounds_until(&manager, &store, &vm.id, VmState::Sleeping).await;

    // Waking counts as use: the VM is active for a full sleep_after again.
    manager.wake(&vm.id).await.unwrap();
    assert!(manager.reconcile_lifecycle().await.unwrap().is_empty());
    assert!(matches!(
        manager.note_use("vm-nonexistent").await,
        Err(PolicyError::NoVm(_))
    ));
}

#[tokio::test]
async fn frequently_requested_services_stay_active_when_idle() {
    let (manager, _, store) = setup();
    manager
        .set_policy(
            "web",
            &PolicyChange {
                keep_active_above: Some(Some(30.0)),
                ..PolicyChange::default()
            },
        )
        .await
        .unwrap();
    let vm = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    // 40 requests at once: a rate of 40 × ln 2 / 30 s ≈ 55 per minute.
    for _ in 0..40 {
        manager.record_service_demand("web");
    }
    let views = manager.policy_views().await.unwrap();
    let web = views.services.iter().find(|v| v.service == "web").unwrap();
    assert!(web.kept_active, "{web:?}");
    assert!(web.rate_per_min > 30.0, "{web:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(manager.reconcile_lifecycle().await.unwrap().is_empty());
    assert_eq!(state(&store, &vm.id).await, VmState::Active);

    manager
        .set_policy(
            "web",
            &PolicyChange {
                keep_active_above: Some(None),
                ..PolicyChange::default()
            },
        )
        .await
        .unwrap();
    let applied = manager.reconcile_lifecycle().await.unwrap();
    assert_eq!(
        applied,
        [Action::Sleep {
            vm: vm.id.clone(),
            reason: Reason::Idle
        }]
    );
}

#[tokio::test]
async fn over_the_memory_budget_the_least_recently_used_are_archived() {
    let (manager, _, store) = setup_with(ManagerConfig {
        memory_budget_mib: Some(300),
        ..ManagerConfig::default()
    });
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            manager
                .request(request("db", Mode::Dedicated))
                .await
                .unwrap()
                .vm
                .id,
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let applied = manager.reconcile_lifecycle().await.unwrap();
    assert_eq!(
        applied,
        [Action::Archive {
            vm: ids[0].clone(),
            tier: TierChoice::Zstd,
            reason: Reason::Memory
        }]
    );
    assert_eq!(state(&store, &ids[0]).await, VmState::Archived);

    // Sleeping does not free memory; the oldest comes back, so the next oldest goes.
    manager.sleep(&ids[2]).await.unwrap();
    manager.wake(&ids[0]).await.unwrap();
    manager.reconcile_lifecycle().await.unwrap();
    let mut states = Vec::new();
    for id in &ids {
        states.push(state(&store, id).await);
    }
    assert_eq!(
        states,
        [VmState::Active, VmState::Archived, VmState::Sleeping]
    );
    let view = manager.policy_views().await.unwrap();
    assert_eq!(view.memory.budget_mib, Some(300));
    assert_eq!(view.memory.used_mib, 256.0);
}

#[tokio::test]
async fn over_the_disk_budget_the_least_recently_used_archives_are_deleted() {
    // Fake zstd archives of 128 MiB guests take 12.8 MiB.
    let (manager, backend, store) = setup_with(ManagerConfig {
        disk_budget_mib: Some(20),
        ..ManagerConfig::default()
    });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = manager
            .request(request("db", Mode::Dedicated))
            .await
            .unwrap()
            .vm
            .id;
        tokio::time::sleep(Duration::from_millis(5)).await;
        ids.push(id);
    }
    for id in &ids {
        manager.archive(id, ArchiveTier::Zstd).await.unwrap();
    }
    let applied = manager.reconcile_lifecycle().await.unwrap();
    assert_eq!(
        applied,
        [Action::Delete {
            vm: ids[0].clone(),
            reason: Reason::Disk
        }]
    );
    assert_eq!(state(&store, &ids[0]).await, VmState::Deleted);
    assert!(backend.archive_info(&ids[0]).is_none());
    assert_eq!(state(&store, &ids[1]).await, VmState::Archived);
    let disk = manager.policy_views().await.unwrap().disk;
    assert!((disk.used_mib - 12.8).abs() < 0.01, "{disk:?}");
}

#[tokio::test]
async fn run_time_policies_are_checked_kept_and_reset() {
    let (manager, _, store) = setup();
    let view = manager
        .set_policy(
            "db",
            &PolicyChange {
                sleep_after: Some(Some(Duration::from_secs(3))),
                archive_tier: Some(TierChoice::Delta),
                ..PolicyChange::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(view.source, PolicySource::RunTime);
    assert_eq!(view.policy.sleep_after, Some(Duration::from_secs(3)));
    assert_eq!(view.archive_tier_used, "delta");
    assert!(view.note.as_deref().unwrap().contains("template"));

    // Fields left out stay; the catalog's policy is the starting point.
    let web = manager
        .set_policy(
            "web",
            &PolicyChange {
                delete_after: Some(None),
                ..PolicyChange::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(web.policy.sleep_after, Some(Duration::from_millis(150)));
    assert_eq!(web.policy.delete_after, None);

    let zero = PolicyChange {
        archive_after: Some(Some(Duration::ZERO)),
        ..PolicyChange::default()
    };
    assert!(matches!(
        manager.set_policy("db", &zero).await,
        Err(PolicyError::Invalid(_))
    ));
    assert!(matches!(
        manager.set_policy("dbb", &PolicyChange::default()).await,
        Err(PolicyError::NoService { .. })
    ));

    // Kept in the store: a new manager over it sees them.
    let again = manager_on(
        store.clone(),
        FakeBackend::new(),
        CATALOG,
        ManagerConfig::default(),
    );
    let (db, source) = again.policies().await.unwrap()["db"];
    assert_eq!(
        (db.sleep_after, source),
        (Some(Duration::from_secs(3)), PolicySource::RunTime)
    );
    let reset = again.reset_policy("web").await.unwrap();
    assert_eq!(reset.source, PolicySource::Catalog);
    assert_eq!(reset.policy.delete_after, Some(Duration::from_millis(150)));
}

#[tokio::test]
async fn under_the_delta_tier_a_vm_not_cloned_from_a_template_gets_zstd() {
    let (manager, backend, store) = setup();
    manager
        .set_policy(
            "web",
            &PolicyChange {
                sleep_after: Some(None),
                archive_tier: Some(TierChoice::Delta),
                ..PolicyChange::default()
            },
        )
        .await
        .unwrap();
    let vm = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    rounds_until(&manager, &store, &vm.id, VmState::Archived).await;
    assert_eq!(
        backend.archive_info(&vm.id).unwrap().tier,
        ArchiveTier::Zstd
    );
}

#[tokio::test]
async fn a_failed_lifecycle_archive_leaves_the_vm_and_is_not_retried_at_once() {
    let (manager, backend, store) = setup();
    let vm = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    rounds_until(&manager, &store, &vm.id, VmState::Sleeping).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    backend.fail_next_archive();
    assert!(manager.reconcile_lifecycle().await.unwrap().is_empty());
    assert_eq!(state(&store, &vm.id).await, VmState::Sleeping);
    assert!(
        manager.reconcile_lifecycle().await.unwrap().is_empty(),
        "backing off"
    );
}

#[tokio::test]
async fn shared_requests_wake_a_sleeping_or_archived_vm() {
    let (manager, backend, store) = setup();
    let first = manager.request(request("db", Mode::Shared)).await.unwrap();
    manager.sleep(&first.vm.id).await.unwrap();
    let again = manager.request(request("db", Mode::Shared)).await.unwrap();
    assert_eq!(again.served, Served::Woken);
    assert_eq!(again.vm.id, first.vm.id);
    assert_eq!(again.vm.state, VmState::Active);

    manager
        .archive(&first.vm.id, ArchiveTier::Raw)
        .await
        .unwrap();
    let third = manager.request(request("db", Mode::Shared)).await.unwrap();
    assert_eq!(
        (third.served, third.vm.id.as_str()),
        (Served::Woken, first.vm.id.as_str())
    );
    assert_eq!(state(&store, &first.vm.id).await, VmState::Active);
    assert_eq!(backend.launches(), 2, "one boot, one restore");
}

#[tokio::test]
async fn the_policies_api_sets_shows_and_resets() {
    use axum::http::StatusCode;

    use crate::requests::tests::http::call;

    let (manager, _, _) = setup_with(ManagerConfig {
        memory_budget_mib: Some(512),
        ..ManagerConfig::default()
    });
    let (status, view, _) = call(
        manager.clone(),
        "PUT",
        "/v1/policies/db",
        r#"{"sleep_after":"3s","archive_after":"10m","keep_active_above":6,"archive_tier":"raw"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["policy"]["sleep_after"], "3s");
    assert_eq!(view["policy"]["archive_after"], "10m");
    assert_eq!(view["policy"]["keep_active_above"], 6.0);
    assert_eq!(view["source"], "run_time");
    assert_eq!(view["archive_tier_used"], "raw");

    let (status, view, _) = call(
        manager.clone(),
        "PUT",
        "/v1/policies/db",
        r#"{"sleep_after":null}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(view["policy"].get("sleep_after").is_none(), "{view}");
    assert_eq!(
        view["policy"]["archive_after"], "10m",
        "left out: unchanged"
    );

    for (body, status) in [
        (r#"{"sleep_after":"soon"}"#, StatusCode::BAD_REQUEST),
        (r#"{"sleep_after":"0s"}"#, StatusCode::BAD_REQUEST),
        (r#"{"keep_active_above":-1}"#, StatusCode::BAD_REQUEST),
        (r#"{"archive_tier":"lz4"}"#, StatusCode::BAD_REQUEST),
        (r#"{"colour":"red"}"#, StatusCode::BAD_REQUEST),
    ] {
        let (got, answer, _) = call(manager.clone(), "PUT", "/v1/policies/db", body).await;
        assert_eq!(got, status, "{body}: {answer}");
    }
    let (status, _, _) = call(manager.clone(), "PUT", "/v1/policies/nope", "{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Issue 13, finding 2: timers that would delete a service's data within seconds are
    // refused, naming the floor; nothing changes.
    let (status, before, _) = call(manager.clone(), "GET", "/v1/policies", "").await;
    assert_eq!(status, StatusCode::OK);
    for (body, floor) in [
        (
            r#"{"sleep_after":"1ms","archive_after":"1ms","delete_after":"1ms"}"#,
            "floor of 1s (the server's --policy-min-sleep-after)",
        ),
        (
            r#"{"archive_after":"9s"}"#,
            "floor of 10s (the server's --policy-min-archive-after)",
        ),
        (
            r#"{"delete_after":"59m"}"#,
            "floor of 1h (the server's --policy-min-delete-after)",
        ),
    ] {
        let (got, answer, _) = call(manager.clone(), "PUT", "/v1/policies/db", body).await;
        assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(floor), "{body}: {message}");
    }
    let (_, after, _) = call(manager.clone(), "GET", "/v1/policies", "").await;
    assert_eq!(before["services"], after["services"], "nothing changed");
    let (status, view, _) = call(
        manager.clone(),
        "PUT",
        "/v1/policies/db",
        r#"{"sleep_after":"1s","archive_after":"10s","delete_after":"1h"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "at the floors: {view}");

    let (status, all, _) = call(manager.clone(), "GET", "/v1/policies", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["memory"]["budget_mib"], 512);
    assert!(all["disk"]["budget_mib"].is_null());
    let names: Vec<_> = all["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"]);

    let (status, view, _) = call(manager.clone(), "DELETE", "/v1/policies/db", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["source"], "catalog");
    let (_, spec, _) = call(manager, "GET", "/v1/openapi.json", "").await;
    assert!(spec["paths"]["/v1/policies/{service}"]["put"].is_object());
}

/// Issue 13, finding 8: concurrent deletes of one VM all answer the deleted VM (none a
/// spurious conflict), and the VM is torn down once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deletes_of_one_vm_all_succeed() {
    let (manager, backend, store) = setup();
    for round in 0..5 {
        let vm = manager
            .request(request("db", Mode::Dedicated))
            .await
            .unwrap()
            .vm;
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let deletes: Vec<_> = (0..20)
            .map(|_| {
                let manager = manager.clone();
                let barrier = barrier.clone();
                let id = vm.id.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    manager.delete(&id).await
                })
            })
            .collect();
        for delete in deletes {
            let deleted = delete
                .await
                .unwrap()
                .unwrap_or_else(|err| panic!("round {round}: a delete failed: {err}"));
            assert_eq!(deleted.state, VmState::Deleted);
        }
        assert_eq!(state(&store, &vm.id).await, VmState::Deleted);
        assert_eq!(
            backend.run_state(&vm.id).await.unwrap(),
            hangar_vmm::RunState::Gone,
            "no process left"
        );
    }
}
