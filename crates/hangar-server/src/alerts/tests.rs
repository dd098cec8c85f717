//! The alert loop on the fake backend: host records and tasks in a real (in-memory) store,
//! the webhook sink against a real HTTP listener on loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::VmState;
use hangar_core::alerts::{AlertConfig, AlertKind, Timing, Transition, WebhookConfig};
use hangar_core::usage::UsageEvent;
use hangar_store::{HostRecord, HostState, TaskRecord, TaskState, now_ms};

use super::observe::{crash_observations, migration_observations, pool_observations};
use super::*;
use crate::manager::ManagerConfig;
use crate::test_support::{WEB, fake_manager};

/// Only `kinds` on, each with `timing`.
fn only(kinds: &[AlertKind], timing: Timing) -> AlertConfig {
    let mut config = AlertConfig::default();
    for (kind, rule) in config.rules.iter_mut() {
        rule.enabled = kinds.contains(kind);
        rule.timing = timing;
    }
    config
}

fn host(name: &str, state: HostState) -> HostRecord {
    HostRecord {
        name: name.into(),
        address: "http://10.0.0.9:7800".into(),
        state,
        facts: serde_json::json!({}),
        last_heartbeat_ms: now_ms() - 5_000,
    }
}

/// A receiver of webhook notices on loopback: answers 503 to the first `refuse` POSTs,
/// 200 to the others, and keeps every body it accepted.
async fn receiver(refuse: usize) -> (String, Arc<Mutex<Vec<hangar_api::AlertNotice>>>) {
    let got: Arc<Mutex<Vec<hangar_api::AlertNotice>>> = Arc::default();
    let calls = Arc::new(Mutex::new(0usize));
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |axum::Json(notice): axum::Json<hangar_api::AlertNotice>| {
                let kept = kept.clone();
                let calls = calls.clone();
                async move {
                    let mut calls = calls.lock().unwrap();
                    *calls += 1;
                    if *calls <= refuse {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    kept.lock().unwrap().push(notice);
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

async fn wait_for_notices(got: &Mutex<Vec<hangar_api::AlertNotice>>, n: usize) {
    for _ in 0..200 {
        if got.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{n} notices expected, got {:?}", got.lock().unwrap());
}

#[tokio::test]
async fn a_down_host_fires_once_is_posted_and_resolves_after_its_hold() {
    let (url, got) = receiver(1).await;
    let config = AlertConfig {
        webhook: Some(WebhookConfig {
            url,
            timeout: Duration::from_secs(2),
            attempts: 3,
        }),
        ..only(
            &[AlertKind::HostDown],
            Timing {
                for_: Duration::ZERO,
                hold: Duration::from_millis(300),
            },
        )
    };
    let (manager, _backend, store) = fake_manager(
        WEB,
        ManagerConfig {
            alerts: config.clone(),
            ..ManagerConfig::default()
        },
    );
    let sink = WebhookSink::start(config.webhook.clone().unwrap());
    store
        .upsert_host(&host("host1", HostState::Down))
        .await
        .unwrap();
    let step = manager.look_for_alerts(Some(&sink)).await.unwrap();
    assert_eq!(step.transitions.len(), 1);
    assert_eq!(step.transitions[0].0, Transition::Fired);
    // Looking again changes nothing: no second notice.
    let again = manager.look_for_alerts(Some(&sink)).await.unwrap();
    assert_eq!(again, Step::default());
    let views = manager.alert_views(false).await.unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(
        (
            views[0].key.as_str(),
            views[0].state.as_str(),
            views[0].name.as_str()
        ),
        ("host_down/host1", "firing", "HostDown")
    );
    assert_eq!(views[0].labels["host"], "host1");
    assert_eq!(views[0].labels["state"], "down");
    // The first POST was refused (503): delivered on the retry.
    wait_for_notices(&got, 1).await;
    {
        let notices = got.lock().unwrap();
        assert_eq!(notices[0].status, "firing");
        assert_eq!(notices[0].alerts[0].labels["alertname"], "HostDown");
        assert_eq!(notices[0].alerts[0].labels["host"], "host1");
        assert_eq!(notices[0].alerts[0].ends_at, "0001-01-01T00:00:00Z");
    }

    // Back up: cleared, and resolved only after the hold.
    store
        .upsert_host(&host("host1", HostState::Up))
        .await
        .unwrap();
    let clearing = manager.look_for_alerts(Some(&sink)).await.unwrap();
    assert!(clearing.transitions.is_empty());
    assert_eq!(
        manager.alert_views(false).await.unwrap().len(),
        1,
        "still firing"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let resolved = manager.look_for_alerts(Some(&sink)).await.unwrap();
    assert_eq!(resolved.transitions.len(), 1);
    assert_eq!(resolved.transitions[0].0, Transition::Resolved);
    assert!(manager.alert_views(false).await.unwrap().is_empty());
    let all = manager.alert_views(true).await.unwrap();
    assert_eq!(all[0].state, "resolved");
    assert!(all[0].resolved_at.is_some());
    wait_for_notices(&got, 2).await;
    let notices = got.lock().unwrap();
    assert_eq!(notices[1].status, "resolved");
    assert_ne!(notices[1].alerts[0].ends_at, "0001-01-01T00:00:00Z");
}

#[tokio::test]
async fn another_leader_on_the_same_store_does_not_fire_again() {
    let config = only(
        &[AlertKind::HostDown],
        Timing {
            for_: Duration::ZERO,
            hold: Duration::from_secs(60),
        },
    );
    let (first, _backend, store) = fake_manager(
        WEB,
        ManagerConfig {
            alerts: config.clone(),
            ..ManagerConfig::default()
        },
    );
    store
        .upsert_host(&host("host1", HostState::Lost))
        .await
        .unwrap();
    assert_eq!(
        first.look_for_alerts(None).await.unwrap().transitions.len(),
        1
    );
    let second = crate::test_support::manager_on(
        store.clone(),
        hangar_vmm::fake::FakeBackend::new(),
        WEB,
        ManagerConfig {
            alerts: config,
            ..ManagerConfig::default()
        },
    );
    let step = second.look_for_alerts(None).await.unwrap();
    assert!(step.transitions.is_empty(), "{step:?}");
    assert_eq!(second.alert_views(false).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_migration_task_fires_and_other_tasks_do_not() {
    let config = only(
        &[AlertKind::MigrationFailed],
        Timing {
            for_: Duration::ZERO,
            hold: Duration::ZERO,
        },
    );
    let (manager, _backend, store) = fake_manager(
        WEB,
        ManagerConfig {
            alerts: config,
            ..ManagerConfig::default()
        },
    );
    let task = |id: &str, kind: &str, state| TaskRecord {
        id: id.into(),
        kind: kind.into(),
        owner: "hangar".into(),
        service: None,
        vm_id: Some("vm-1".into()),
        state,
        stage: "copy".into(),
        percent: 50,
        error: Some("destination refused the stream".into()),
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
        ended_at_ms: Some(now_ms()),
    };
    store
        .insert_task(&task("t-ok", "migrate", TaskState::Succeeded))
        .await
        .unwrap();
    store
        .insert_task(&task("t-other", "create_vm", TaskState::Failed))
        .await
        .unwrap();
    store
        .insert_task(&task("t-bad", "migrate", TaskState::Failed))
        .await
        .unwrap();
    let step = manager.look_for_alerts(None).await.unwrap();
    let fired: Vec<&str> = step
        .transitions
        .iter()
        .map(|(_, a)| a.key.as_str())
        .collect();
    assert_eq!(fired, vec!["migration_failed/t-bad"]);
    assert!(
        step.transitions[0]
            .1
            .summary
            .contains("destination refused")
    );
    assert_eq!(step.transitions[0].1.labels["vm"], "vm-1");
}

#[test]
fn crashes_are_counted_per_service_within_the_window() {
    let config = AlertConfig::default();
    let now = 10_000_000;
    let failed = |vm: &str, services: &str, ago_ms: u64| UsageEvent {
        vm_id: vm.into(),
        state: VmState::Failed,
        at_ms: now - ago_ms,
        owner: "a".into(),
        services: services.into(),
        host: "h".into(),
        vcpus: 1,
        memory_mib: 64,
        archive_bytes: 0,
    };
    let mut events = vec![
        failed("v1", "redis", 1_000),
        failed("v2", "redis", 2_000),
        failed("v3", "redis", 3_000),
        failed("v4", "web", 1_000),
        failed("v5", "web", 2_000),
        // Outside the 10-minute window.
        failed("v6", "web", 700_000),
    ];
    events.push(UsageEvent {
        state: VmState::Active,
        ..failed("v7", "web", 1_000)
    });
    let seen = crash_observations(&config, &events, now);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].key, "vm_crashing/redis");
    assert!(seen[0].summary.contains("failed 3 times"));
}

#[test]
fn an_empty_pool_alerts_only_while_requests_ask_for_it_and_the_budget_by_share() {
    let config = AlertConfig::default();
    let pool = |name: &str, ready, rate: f64, memory_mib| hangar_api::PoolView {
        name: name.into(),
        service: Some(name.into()),
        vcpus: 1,
        vm_memory_mib: 64,
        min: 0,
        max: 4,
        target: 1,
        ready,
        booting: 0,
        memory_mib,
        rate_per_min: rate,
        ready_criterion: None,
    };
    let pools = [
        pool("asked", 0, 2.0, 0),
        pool("idle", 0, 0.0, 0),
        pool("stocked", 2, 5.0, 128),
    ];
    let seen = pool_observations(&config, &pools, 1024);
    let keys: Vec<&str> = seen.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, vec!["pool_empty/asked"]);
    let full = [pool("stocked", 15, 5.0, 960)];
    let seen = pool_observations(&config, &full, 1024);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].key, "pool_memory/server");
    assert!(seen[0].summary.contains("94%"), "{}", seen[0].summary);
}

#[test]
fn only_failed_migrations_in_the_window_are_seen() {
    let config = AlertConfig::default();
    let now = 10_000_000;
    let old = TaskRecord {
        id: "old".into(),
        kind: "migrate".into(),
        owner: "hangar".into(),
        service: None,
        vm_id: None,
        state: TaskState::Failed,
        stage: "copy".into(),
        percent: 10,
        error: None,
        created_at_ms: 0,
        updated_at_ms: 0,
        ended_at_ms: Some(now - 3_600_000),
    };
    assert!(migration_observations(&config, &[old], now).is_empty());
}
