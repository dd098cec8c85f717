//! Quotas on the fake backend: the check is atomic with the claim, shared grants of a
//! running VM cost nothing, the API sets and lists quotas and answers 429.

use std::sync::Arc;

use axum::http::StatusCode;
use hangar_core::quota::Limits;
use hangar_core::{Mode, VmState};

use crate::manager::ManagerConfig;
use crate::requests::RequestError;
use crate::requests::tests::http::call;
use crate::test_support::*;

fn vms(limit: u64) -> Limits {
    Limits {
        vms: Some(limit),
        ..Limits::UNLIMITED
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_concurrent_requests_at_most_the_quota_gets_vms() {
    let (manager, backend, store) = fake_manager(WEB, ManagerConfig::default());
    manager.set_quota("local", &vms(3)).await.unwrap();
    let requests: Vec<_> = (0..24)
        .map(|_| {
            let manager = manager.clone();
            tokio::spawn(async move { manager.request(request("web", Mode::Dedicated)).await })
        })
        .collect();
    let (mut granted, mut refused) = (0, 0);
    for handle in requests {
        match handle.await.unwrap() {
            Ok(_) => granted += 1,
            Err(RequestError::Quota(exceeded)) => {
                assert_eq!((exceeded.what, exceeded.limit), ("vms", 3));
                assert!(
                    exceeded
                        .to_string()
                        .starts_with("quota of local exceeded: vms would be 4, the quota is 3"),
                    "{exceeded}"
                );
                refused += 1;
            }
            Err(other) => panic!("neither granted nor over quota: {other}"),
        }
    }
    assert_eq!((granted, refused), (3, 21));
    assert_eq!(backend.launches(), 3, "nothing was made for the refused");
    let live = store.vms(false).await.unwrap();
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|vm| vm.state == VmState::Active));

    // Deleting one frees its place.
    manager.delete(&live[0].id).await.unwrap();
    assert!(
        manager
            .request(request("web", Mode::Dedicated))
            .await
            .is_ok()
    );
    assert!(matches!(
        manager.request(request("web", Mode::Dedicated)).await,
        Err(RequestError::Quota(_))
    ));
}

#[tokio::test]
async fn shared_grants_of_a_running_vm_cost_nothing_and_limits_apply_to_vcpus_and_memory() {
    let (manager, _, store) = fake_manager(WEB, ManagerConfig::default());
    manager.set_quota("local", &vms(1)).await.unwrap();
    let first = manager.request(request("web", Mode::Shared)).await.unwrap();
    for _ in 0..3 {
        let again = manager.request(request("web", Mode::Shared)).await.unwrap();
        assert_eq!(again.vm.id, first.vm.id, "granted the running VM");
    }
    assert!(matches!(
        manager.request(request("web", Mode::Dedicated)).await,
        Err(RequestError::Quota(exceeded)) if exceeded.what == "vms"
    ));
    let memory = Limits {
        memory_mib: Some(200),
        ..Limits::UNLIMITED
    };
    manager.set_quota("local", &memory).await.unwrap();
    match manager.request(request("web", Mode::Dedicated)).await {
        Err(RequestError::Quota(exceeded)) => {
            assert_eq!((exceeded.what, exceeded.would_be), ("memory_mib", 256));
        }
        other => panic!("expected over quota, got {:?}", other.map(|g| g.vm.id)),
    }
    assert_eq!(store.vms(false).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_default_quota_applies_to_users_without_one() {
    let (manager, _, _) = fake_manager(
        WEB,
        ManagerConfig {
            default_quota: vms(1),
            ..ManagerConfig::default()
        },
    );
    manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    assert!(matches!(
        manager.request(request("web", Mode::Dedicated)).await,
        Err(RequestError::Quota(_))
    ));
    let views = manager.quota_views().await.unwrap();
    assert_eq!(views.default, vms(1));
    let local = &views.users[0];
    assert_eq!(
        (local.user.as_str(), local.source, local.used.vms),
        ("local", crate::quotas::QuotaSource::Default, 1)
    );
    // Another user is not counted against this one's.
    assert!(
        manager
            .request_as("ann", request("web", Mode::Dedicated))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_quotas_api_sets_lists_and_answers_429() {
    // Through the API the caller is the fake store's admin: the VMs requested are theirs.
    let (manager, _, store) = fake_manager(WEB, ManagerConfig::default());
    let manager: Arc<crate::manager::Manager> = manager;
    let (status, view, _) = call(
        manager.clone(),
        "PUT",
        "/v1/quotas/admin",
        r#"{"vms":1,"vcpus":4,"memory_mib":null}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["limits"]["vms"], 1);
    assert!(view["limits"]["memory_mib"].is_null());
    assert_eq!(view["source"], "user");
    for (uri, body) in [
        ("/v1/quotas/admin", r#"{"vms":-1}"#),
        ("/v1/quotas/admin", r#"{"disks":1}"#),
        ("/v1/quotas/no%20one", r#"{"vms":1}"#),
    ] {
        let (status, answer, _) = call(manager.clone(), "PUT", uri, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}: {answer}");
    }
    let body = r#"{"service":"web","mode":"dedicated"}"#;
    let (status, _, _) = call(manager.clone(), "POST", "/v1/requests", body).await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer, _) = call(manager.clone(), "POST", "/v1/requests", body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert_eq!(answer["error"]["code"], "quota_exceeded");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("vms would be 2, the quota is 1"),
        "{message}"
    );
    assert_eq!(store.vms(false).await.unwrap().len(), 1, "no VM row");

    let (status, all, _) = call(manager.clone(), "GET", "/v1/quotas", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(all["default"]["vms"].is_null(), "no default limits: {all}");
    assert_eq!(all["users"][0]["user"], "admin");
    assert_eq!(all["users"][0]["used"]["vms"], 1);
    assert_eq!(all["users"][0]["used"]["vcpus"], 1);
}

#[tokio::test]
async fn a_pool_vm_becomes_the_requesters_and_counts_against_their_quota() {
    const POOLED: &str = r#"
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
checks = [{ tcp = { port = "http" } }]
[service.web.pool]
min = 2
max = 2
"#;
    let (manager, _, store) = fake_manager(POOLED, ManagerConfig::default());
    for _ in 0..200 {
        manager.reconcile_pools().await.unwrap();
        let ready = store
            .vms(false)
            .await
            .unwrap()
            .iter()
            .filter(|vm| vm.state == VmState::Ready)
            .count();
        if ready == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let pooled = store.vms(false).await.unwrap();
    assert!(
        pooled
            .iter()
            .all(|vm| vm.owner == crate::requests::SYSTEM_OWNER),
        "pool VMs are hangar's own until claimed"
    );
    manager.set_quota("ann", &vms(1)).await.unwrap();
    let grant = manager
        .request_as("ann", request("web", Mode::Dedicated))
        .await
        .unwrap();
    assert_eq!(grant.served, crate::requests::Served::Exact);
    assert_eq!(grant.vm.owner, "ann");
    assert_eq!(store.vm(&grant.vm.id).await.unwrap().unwrap().owner, "ann");
    assert!(matches!(
        manager
            .request_as("ann", request("web", Mode::Dedicated))
            .await,
        Err(RequestError::Quota(_))
    ));
    let views = manager.quota_views().await.unwrap();
    let users: Vec<(&str, u64)> = views
        .users
        .iter()
        .map(|view| (view.user.as_str(), view.used.vms))
        .collect();
    assert_eq!(users, [("ann", 1)], "the pool's VM left is nobody's");
}

#[tokio::test]
async fn archives_count_against_the_archive_limit() {
    let (manager, _, _) = fake_manager(WEB, ManagerConfig::default());
    let vm = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    let (_, archive) = manager
        .archive(&vm.id, hangar_host::ArchiveTier::Zstd)
        .await
        .unwrap();
    assert!(archive.size_bytes > 0);
    let views = manager.quota_views().await.unwrap();
    assert_eq!(views.users[0].used.archive_bytes, archive.size_bytes);
    assert_eq!(views.users[0].used.vcpus, 0, "archived: no room on a host");
    let tight = Limits {
        archive_bytes: Some(archive.size_bytes - 1),
        ..Limits::UNLIMITED
    };
    manager.set_quota("local", &tight).await.unwrap();
    match manager.request(request("web", Mode::Dedicated)).await {
        Err(RequestError::Quota(exceeded)) => assert_eq!(exceeded.what, "archive_bytes"),
        other => panic!("expected over quota, got {:?}", other.map(|g| g.vm.id)),
    }
    manager.delete(&vm.id).await.unwrap();
    assert!(
        manager
            .request(request("web", Mode::Dedicated))
            .await
            .is_ok()
    );
}
