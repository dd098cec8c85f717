//! `GET /metrics` through the API's router on the fake backend: who may read it, and its
//! values (parsed with a Prometheus text-format parser) against what the server did and
//! what its other routes say.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use prometheus_parse::{Sample, Scrape, Value};

use crate::api::tests::{send, send_as};
use crate::manager::ManagerConfig;
use crate::test_support::{WEB, fake_manager, test_token};

const METRICS_TOKEN: &str = "metrics-token-for-the-metrics-tests";

/// Parses a page in Prometheus's text format; panics with the page when it is not.
pub(crate) fn parse(page: &str) -> Scrape {
    Scrape::parse(page.lines().map(|line| Ok(line.to_owned())))
        .unwrap_or_else(|err| panic!("not Prometheus text ({err}):\n{page}"))
}

/// The value of the gauge or counter `name` whose labels include `labels`; panics when
/// there is not exactly one.
pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:#?}");
    match &found[0].value {
        Value::Gauge(value) | Value::Counter(value) | Value::Untyped(value) => *value,
        other => panic!("{name} is not a single value: {other:?}"),
    }
}

#[tokio::test]
async fn the_page_counts_what_the_store_holds_and_what_the_server_did() {
    hangar_host::metrics::install();
    crate::metrics::describe();
    let (manager, _, _) = fake_manager(
        WEB,
        ManagerConfig {
            metrics_token: METRICS_TOKEN.into(),
            ..ManagerConfig::default()
        },
    );
    manager.set_pool_bounds("web", 1, Some(3)).await.unwrap();
    let router = crate::api::router(manager.clone());

    // Two dedicated VMs, one put to sleep.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let grant = send(
            &router,
            "POST",
            "/v1/requests",
            None,
            r#"{"service":"web","mode":"dedicated"}"#,
        )
        .await;
        assert_eq!(grant.status, StatusCode::OK, "{:?}", grant.json());
        ids.push(grant.json()["vm"].as_str().unwrap().to_owned());
    }
    let slept = send(
        &router,
        "POST",
        &format!("/v1/vms/{}/sleep", ids[0]),
        None,
        "",
    )
    .await;
    assert_eq!(slept.status, StatusCode::OK);

    let answer = send_as(&router, Some(METRICS_TOKEN), "GET", "/metrics", None, "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer
            .content_type()
            .starts_with("text/plain; version=0.0.4")
    );
    let page = String::from_utf8(answer.body.to_vec()).unwrap();
    let scrape = parse(&page);

    // VMs by state, as the store has them (every state listed, 0 included).
    let vms = manager.store().vms(false).await.unwrap();
    let mut by_state: BTreeMap<&str, f64> = BTreeMap::new();
    for vm in &vms {
        *by_state.entry(vm.state.as_str()).or_default() += 1.0;
    }
    for state in hangar_core::VmState::ALL {
        if state == hangar_core::VmState::Deleted {
            continue;
        }
        let expected = by_state.get(state.as_str()).copied().unwrap_or(0.0);
        let shown = value(
            &scrape,
            "hangar_vms",
            &[("host", "local"), ("state", state.as_str())],
        );
        assert_eq!(shown, expected, "hangar_vms in state {state}");
    }
    assert_eq!(
        value(&scrape, "hangar_vms", &[("state", "active")]),
        1.0,
        "{page}"
    );
    assert_eq!(value(&scrape, "hangar_vms", &[("state", "sleeping")]), 1.0);

    // Pools, as GET /v1/pools shows them.
    let pools = send(&router, "GET", "/v1/pools", None, "").await.json();
    let web = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|pool| pool["name"] == "web")
        .unwrap();
    let pool = [("pool", "web"), ("service", "web")];
    assert_eq!(
        value(&scrape, "hangar_pool_target", &pool),
        web["target"].as_f64().unwrap()
    );
    assert!(value(&scrape, "hangar_pool_target", &pool) >= 1.0);
    assert_eq!(
        value(&scrape, "hangar_pool_ready", &pool),
        web["ready"].as_f64().unwrap()
    );

    // The local host, up, with its memory.
    assert_eq!(value(&scrape, "hangar_host_up", &[("host", "local")]), 1.0);
    assert!(value(&scrape, "hangar_host_memory_bytes", &[("host", "local")]) > 0.0);
    let leading = if manager.farm.leading() { 1.0 } else { 0.0 };
    assert_eq!(value(&scrape, "hangar_server_leading", &[]), leading);

    // What the process recorded (the recorder is shared by the tests of this binary, so
    // at least what this test did).
    let created = value(&scrape, "hangar_grants_total", &[("served", "created")]);
    assert!(created >= 2.0, "{page}");
    assert!(
        scrape.samples.iter().any(|sample| {
            sample.metric == "hangar_request_duration_seconds"
                && matches!(&sample.value, Value::Histogram(buckets) if buckets.iter().any(|b| b.count >= 2.0))
        }),
        "{page}"
    );
    assert!(
        value(
            &scrape,
            "hangar_tasks_total",
            &[("kind", "create_vm"), ("outcome", "succeeded")]
        ) >= 2.0,
        "{page}"
    );
    // Described and registered before any migration: listed, with its help text.
    assert!(
        scrape
            .docs
            .contains_key("hangar_migration_downtime_seconds"),
        "{page}"
    );
}

#[tokio::test]
async fn only_the_metrics_token_and_admins_read_the_page() {
    let (manager, _, store) = fake_manager(
        WEB,
        ManagerConfig {
            metrics_token: METRICS_TOKEN.into(),
            farm_token: "farm-token-for-the-metrics-tests".into(),
            ..ManagerConfig::default()
        },
    );
    let provisioner = test_token(1);
    crate::test_support::install_token(
        store.as_ref(),
        "ana",
        hangar_core::Role::Provisioner,
        &provisioner,
    )
    .await;
    let router = crate::api::router(manager);
    let status = |token: Option<&str>| {
        let router = router.clone();
        let token = token.map(str::to_owned);
        async move {
            send_as(&router, token.as_deref(), "GET", "/metrics", None, "")
                .await
                .status
        }
    };
    assert_eq!(status(Some(METRICS_TOKEN)).await, StatusCode::OK);
    assert_eq!(
        status(Some(crate::test_support::ADMIN_TOKEN)).await,
        StatusCode::OK
    );
    assert_eq!(status(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(Some(&provisioner)).await, StatusCode::FORBIDDEN);
    assert_eq!(
        status(Some("farm-token-for-the-metrics-tests")).await,
        StatusCode::UNAUTHORIZED
    );
    // The metrics token opens nothing else.
    let vms = send_as(&router, Some(METRICS_TOKEN), "GET", "/v1/vms", None, "").await;
    assert_eq!(vms.status, StatusCode::UNAUTHORIZED);
    let hosts = send_as(&router, Some(METRICS_TOKEN), "GET", "/v1/hosts", None, "").await;
    assert_eq!(hosts.status, StatusCode::UNAUTHORIZED);
}
