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
