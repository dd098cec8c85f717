//! Warm pools on the fake backend: fill, grant, refill, matching kinds, slicing, budget.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::matching::{MachineRequest, MemoryRange, OsRequirement};
use hangar_core::{Mode, ServiceRequest, VmState};
use hangar_store::Store;
use hangar_vmm::Hypervisor;
use hangar_vmm::fake::FakeBackend;

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
[service.web.pool]
min = 2
max = 3

[service.db]
os = "busybox"
[[service.db.port]]
name = "sql"
guest = 5432
[[service.db.process]]
name = "db"
argv = ["db"]
[service.db.ready]
checks = [{ tcp = { port = "sql" } }]

[pool.big-web]
service = "web"
vcpus = 2
memory_mib = 512
max = 1

[pool.shell]
vcpus = 1
memory_mib = 256
max = 1
"#;

fn setup(pool_memory_mib: u64) -> (Arc<Manager>, FakeBackend, Arc<dyn Store>) {
    fake_manager(
        CATALOG,
        ManagerConfig {
            pool_memory_mib,
            dns_domain: Some("vms.test".into()),
            ..ManagerConfig::default()
        },
    )
}

/// Runs pool rounds until every pool holds its target, or fails after a while.
async fn settle(manager: &Arc<Manager>) {
    for _ in 0..200 {
        manager.reconcile_pools().await.unwrap();
        let views = manager.pool_views().await.unwrap();
        if views.iter().all(|p| p.booting == 0) {
            manager.reconcile_pools().await.unwrap();
            let views = manager.pool_views().await.unwrap();
            if views.iter().all(|p| p.booting == 0) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "pools did not settle: {:?}",
        manager.pool_views().await.unwrap()
    );
}

async fn ready(manager: &Manager, pool: &str) -> u32 {
    manager
        .pool_views()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.name == pool)
        .unwrap()
        .ready
}

fn dedicated(service: &str) -> ServiceRequest {
    ServiceRequest {
        service: Some(service.into()),
        mode: Mode::Dedicated,
        ..ServiceRequest::default()
    }
}

fn config(vcpus: u32, min: u32, max: u32, apps: &[&str], exact_size: bool) -> ServiceRequest {
    ServiceRequest {
        config: Some(MachineRequest {
            vcpus,
            memory_mib: MemoryRange { min, max },
            os: OsRequirement {
                name: "busybox".into(),
                min_version: None,
            },
            apps: apps.iter().map(|a| a.to_string()).collect::<BTreeSet<_>>(),
            disk_mib: None,
        }),
        exact_size,
        ..ServiceRequest::default()
    }
}

#[tokio::test]
async fn pools_fill_to_min_and_grants_take_paused_vms_then_refill() {
    let (manager, backend, store) = setup(4096);
    settle(&manager).await;
    assert_eq!(ready(&manager, "web").await, 2);
    assert_eq!(
        ready(&manager, "big-web").await,
        0,
        "min 0 and no demand yet"
    );
    let paused: Vec<_> = store
        .vms(false)
        .await
        .unwrap()
        .into_iter()
        .filter(|vm| vm.state == VmState::Ready)
        .collect();
    assert_eq!(paused.len(), 2);
    for vm in &paused {
        assert_eq!(
            backend.run_state(&vm.id).await.unwrap(),
            hangar_vmm::RunState::Paused
        );
    }

    let a = manager.request(dedicated("web")).await.unwrap();
    let b = manager.request(dedicated("web")).await.unwrap();
    assert_eq!((a.served, b.served), (Served::Exact, Served::Exact));
    assert_ne!(a.vm.id, b.vm.id);
    assert_eq!((a.vm.state, a.vm.pool.as_deref()), (VmState::Active, None));
    assert_eq!(
        a.dns_name.as_deref(),
        Some(format!("{}.vms.test", a.vm.id).as_str())
    );
    assert_eq!(
        backend.run_state(&a.vm.id).await.unwrap(),
        hangar_vmm::RunState::Running
    );
    let launched = backend.launches();

    settle(&manager).await;
    assert!(ready(&manager, "web").await >= 2, "refilled");
    assert!(backend.launches() > launched);
}

#[tokio::test]
async fn shared_requests_use_the_pool_when_nothing_runs() {
    let (manager, _, _) = setup(4096);
    settle(&manager).await;
    let first = manager
        .request(ServiceRequest {
            service: Some("web".into()),
            ..ServiceRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(first.served, Served::Exact);
    assert_eq!(first.vm.mode, Mode::Shared);
    let second = manager
        .request(ServiceRequest {
            service: Some("web".into()),
            ..ServiceRequest::default()
        })
        .await
        .unwrap();
    assert_eq!((second.served, second.vm.id), (Served::Shared, first.vm.id));
}

/// A pool grant answers with the claimed record without reading the store again: it must
/// be what the store holds (active, the requester's, out of its pool), marked used by the
/// claim itself, no earlier than the request.
#[tokio::test]
async fn a_pool_grant_answers_with_the_stored_row_marked_used_by_its_claim() {
    let (manager, _, store) = setup(4096);
    settle(&manager).await;
    let asked_at = hangar_store::now_ms();
    let grant = manager.request_as("ana", dedicated("web")).await.unwrap();
    assert_eq!(grant.served, Served::Exact);
    let stored = store.vm(&grant.vm.id).await.unwrap().unwrap();
    assert_eq!(
        (
            grant.vm.state,
            grant.vm.owner.as_str(),
            grant.vm.pool.as_deref()
        ),
        (VmState::Active, "ana", None)
    );
    assert_eq!(
        (stored.state, stored.owner.as_str(), stored.pool.as_deref()),
        (VmState::Active, "ana", None)
    );
    assert!(
        grant.vm.last_used_at_ms >= asked_at,
        "marked used by the claim"
    );
    assert_eq!(grant.vm.last_used_at_ms, stored.last_used_at_ms);
    assert_eq!(grant.vm.endpoints, stored.endpoints);
    assert!(!grant.endpoint.is_empty());
}

#[tokio::test]
async fn an_empty_pool_falls_back_to_creating() {
    let (manager, _, _) = setup(4096);
    let grant = manager.request(dedicated("db")).await.unwrap();
    assert_eq!(grant.served, Served::Created);
}

#[tokio::test]
async fn superset_matches_are_reported_and_sliced_on_request() {
    let (manager, backend, _) = setup(4096);
    manager.set_pool_bounds("web", 0, Some(0)).await.unwrap();
    manager
        .set_pool_bounds("big-web", 1, Some(1))
        .await
        .unwrap();
    settle(&manager).await;
    assert_eq!(ready(&manager, "big-web").await, 1);

    let grant = manager
        .request(config(1, 128, 128, &["web"], true))
        .await
        .unwrap();
    assert_eq!(grant.served, Served::Superset);
    assert_eq!((grant.vm.vcpus, grant.vm.memory_mib), (2, 512));
    assert_eq!(grant.sliced_to, Some((1, 128)));
    assert_eq!(
        backend.memory_mib(&grant.vm.id),
        Some(128),
        "ballooned down"
    );

    settle(&manager).await;
    let unsliced = manager
        .request(config(1, 128, 128, &["web"], false))
        .await
        .unwrap();
    assert_eq!(
        (unsliced.served, unsliced.sliced_to),
        (Served::Superset, None)
    );
    assert_eq!(backend.memory_mib(&unsliced.vm.id), Some(512));
}

#[tokio::test]
async fn shells_take_the_requested_os_image_and_serve_it() {
    let (manager, backend, store) = setup(4096);
    manager.set_pool_bounds("web", 0, Some(0)).await.unwrap();
    manager.set_pool_bounds("shell", 1, Some(1)).await.unwrap();
    settle(&manager).await;
    let shell = store
        .vms(false)
        .await
        .unwrap()
        .into_iter()
        .find(|vm| vm.pool.as_deref() == Some("shell"))
        .unwrap();
    assert_eq!(shell.os, None);
    assert!(shell.services.is_empty());

    let grant = manager
        .request(config(1, 128, 256, &["web"], false))
        .await
        .unwrap();
    assert_eq!(grant.served, Served::Partial);
    assert_eq!(grant.vm.id, shell.id);
    assert_eq!(grant.vm.services, ["web"]);
    assert_eq!(
        grant.vm.os.as_ref().map(|(name, _)| name.as_str()),
        Some("busybox")
    );
    assert!(
        grant.endpoint.starts_with("127.0.0.1:"),
        "{}",
        grant.endpoint
    );
    assert_eq!(
        backend.root(&grant.vm.id).unwrap().to_string_lossy(),
        "/nonexistent/web.qcow2"
    );

    // The refilled shell serves a different OS image: the bare OS.
    settle(&manager).await;
    let bare = manager
        .request(config(1, 64, 256, &[], false))
        .await
        .unwrap();
    assert_eq!(bare.served, Served::Partial);
    assert_eq!(
        backend.root(&bare.vm.id).unwrap().to_string_lossy(),
        "/nonexistent/busybox.qcow2"
    );
}

#[tokio::test]
async fn exact_size_holds_on_a_shell_too_and_the_grant_says_why() {
    use hangar_core::heuristics::CandidateKind;
    let (manager, backend, store) = setup(4096);
    manager.set_pool_bounds("web", 0, Some(0)).await.unwrap();
    manager.set_pool_bounds("shell", 1, Some(1)).await.unwrap();
    settle(&manager).await;
    let shell = store
        .vms(false)
        .await
        .unwrap()
        .into_iter()
        .find(|vm| vm.pool.as_deref() == Some("shell"))
        .unwrap();

    // What the engine would do, without doing it.
    let verdict = manager
        .check_request(&config(1, 128, 128, &["web"], true))
        .await
        .unwrap();
    assert!(verdict.ok, "{:?}", verdict.problems);
    let chosen = verdict.chosen_candidate().unwrap();
    assert_eq!(
        (chosen.kind, chosen.source.as_str(), chosen.slice_to),
        (CandidateKind::Partial, shell.id.as_str(), Some((1, 128)))
    );
    assert_eq!(backend.launches(), 1, "the check started nothing");

    let grant = manager
        .request(config(1, 128, 128, &["web"], true))
        .await
        .unwrap();
    assert_eq!(grant.served, Served::Partial);
    assert_eq!(grant.vm.id, shell.id);
    assert_eq!(
        grant.sliced_to,
        Some((1, 128)),
        "a 256 MiB shell sliced to 128"
    );
    assert_eq!(
        backend.memory_mib(&grant.vm.id),
        Some(128),
        "ballooned down"
    );
    let chosen = grant.chosen.expect("the grant says what was chosen");
    assert_eq!(chosen.kind, CandidateKind::Partial);
    assert!(
        chosen.reason.contains("sliced to 1 vCPUs and 128 MiB"),
        "{}",
        chosen.reason
    );

    // Without a pool VM, a new VM of exactly that size is built, and the grant says so.
    manager.set_pool_bounds("shell", 0, Some(0)).await.unwrap();
    settle(&manager).await;
    let built = manager
        .request(config(1, 128, 128, &["web"], true))
        .await
        .unwrap();
    assert_eq!(built.served, Served::Created);
    assert_eq!((built.vm.vcpus, built.vm.memory_mib), (1, 128));
    assert_eq!(built.chosen.unwrap().kind, CandidateKind::Build);
}

#[tokio::test]
async fn pools_stay_within_the_memory_budget_and_shrink_when_asked() {
    // 256 MiB: two 128 MiB web VMs; nothing else fits.
    let (manager, _, store) = setup(256);
    manager.set_pool_bounds("shell", 1, Some(1)).await.unwrap();
    settle(&manager).await;
    let views = manager.pool_views().await.unwrap();
    let held: u64 = views.iter().map(|p| p.memory_mib).sum();
    // Full, and never over: the emptiest pool went first, and nothing else fits.
    assert_eq!(held, 256, "{views:?}");

    manager.set_pool_bounds("web", 0, Some(0)).await.unwrap();
    manager.set_pool_bounds("shell", 0, Some(0)).await.unwrap();
    settle(&manager).await;
    assert_eq!(ready(&manager, "web").await, 0);
    assert!(
        store
            .vms(false)
            .await
            .unwrap()
            .iter()
            .all(|vm| vm.state != VmState::Ready)
    );
    let err = manager
        .set_pool_bounds("web", 3, Some(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("larger than max"), "{err}");
    assert!(manager.set_pool_bounds("nope", 1, None).await.is_err());
}

#[tokio::test]
async fn demand_raises_the_target_between_min_and_max() {
    let (manager, _, _) = setup(4096);
    settle(&manager).await;
    for _ in 0..20 {
        manager.record_demand("web");
    }
    let web = manager
        .pool_views()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.name == "web")
        .unwrap();
    assert_eq!(web.target, 3, "capped at max: {web:?}");
    assert!(web.rate_per_min > 0.0);
}

#[tokio::test]
async fn failing_fills_back_off_instead_of_piling_up() {
    let (manager, backend, store) = setup(4096);
    manager.set_pool_bounds("web", 1, Some(1)).await.unwrap();
    backend.fail_next_launch();
    for _ in 0..50 {
        manager.reconcile_pools().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failed = store
        .vms(false)
        .await
        .unwrap()
        .into_iter()
        .filter(|vm| vm.state == VmState::Failed)
        .count();
    assert_eq!(failed, 1, "one failure, then a pause before the next try");
    assert_eq!(ready(&manager, "web").await, 0);
}

#[tokio::test]
async fn a_ready_criterion_set_at_run_time_governs_fills_and_is_validated() {
    let (manager, _, store) = setup(4096);
    let never: hangar_core::ReadySpec = serde_json::from_value(serde_json::json!({
        "timeout": "300ms",
        "interval": "20ms",
        "checks": [{ "bytes": { "port": "http", "send": "x", "expect": "never said" } }],
    }))
    .unwrap();
    let view = manager
        .set_pool("web", Some(1), Some(1), Some(Some(never.clone())))
        .await
        .unwrap();
    assert_eq!(view.ready_criterion, Some(never));
    for _ in 0..100 {
        manager.reconcile_pools().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready(&manager, "web").await, 0);
    let failed = store
        .vms(false)
        .await
        .unwrap()
        .into_iter()
        .find(|vm| vm.state == VmState::Failed)
        .unwrap();
    assert!(failed.error.unwrap().contains("not ready after 300ms"));

    let bad_port: hangar_core::ReadySpec =
        serde_json::from_value(serde_json::json!({ "checks": [{ "tcp": { "port": "https" } }] }))
            .unwrap();
    let err = manager
        .set_pool("web", None, None, Some(Some(bad_port.clone())))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(r#"names port "https""#), "{err}");
    let err = manager
        .set_pool("shell", None, None, Some(Some(bad_port)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pre-OS shells"), "{err}");

    let view = manager
        .set_pool("web", None, None, Some(None))
        .await
        .unwrap();
    assert_eq!(
        (view.ready_criterion, view.min),
        (None, 1),
        "back to the catalog's, bounds kept"
    );
}

#[tokio::test]
async fn a_service_without_a_catalog_pool_gets_one_at_run_time() {
    let (manager, _backend, store) = setup(4096);
    assert!(
        manager
            .pool_views()
            .await
            .unwrap()
            .iter()
            .all(|p| p.name != "db")
    );
    let view = manager.set_pool_bounds("db", 1, Some(2)).await.unwrap();
    assert_eq!((view.min, view.max), (1, 2));
    settle(&manager).await;
    assert_eq!(ready(&manager, "db").await, 1);
    // It serves requests as a catalog pool does, and is kept across restarts.
    let grant = manager.request(dedicated("db")).await.unwrap();
    assert_eq!(grant.served, Served::Exact);
    let restarted = manager_on(
        store.clone(),
        FakeBackend::new(),
        CATALOG,
        ManagerConfig::default(),
    );
    assert!(
        restarted
            .pool_views()
            .await
            .unwrap()
            .iter()
            .any(|p| p.name == "db")
    );
    // Neither a pool nor a service: not found, with suggestions.
    let err = manager.set_pool_bounds("dbx", 1, None).await.unwrap_err();
    assert!(err.to_string().contains("no pool or service"), "{err}");
}

#[tokio::test]
async fn pool_and_shared_vms_go_only_to_requests_of_their_own_egress_policy() {
    use hangar_core::EgressPolicy;
    let egress =
        |grant: &crate::requests::Grant| hangar_host::LaunchRecord(grant.vm.spec.clone()).egress();
    let (manager, _, _) = setup(4096);
    settle(&manager).await;
    // Pool VMs run the default policy: a request for another gets a VM made with its own.
    let mut open = dedicated("web");
    open.egress = EgressPolicy::Open;
    let made = manager.request(open).await.unwrap();
    assert_eq!(made.served, Served::Created);
    assert_eq!(egress(&made), EgressPolicy::Open);
    let pooled = manager.request(dedicated("web")).await.unwrap();
    assert_eq!(pooled.served, Served::Exact);
    assert_eq!(egress(&pooled), EgressPolicy::None);

    // Shared VMs are shared only between requests of one policy.
    let shared_none = manager.request(request("web", Mode::Shared)).await.unwrap();
    let mut allow = request("web", Mode::Shared);
    allow.egress = "allow=10.1.2.3:80".parse().unwrap();
    let shared_allow = manager.request(allow.clone()).await.unwrap();
    assert_ne!(shared_allow.vm.id, shared_none.vm.id);
    assert_eq!(shared_allow.served, Served::Created);
    assert_eq!(egress(&shared_allow), allow.egress);
    let again = manager.request(allow).await.unwrap();
    assert_eq!(
        (again.served, again.vm.id.as_str()),
        (Served::Shared, shared_allow.vm.id.as_str())
    );
}
