//! The agent's `GET /metrics` over a [`LocalHost`] on the fake backend: who may read it,
//! and its values (parsed with a Prometheus text-format parser) against the host's facts
//! and VMs.

use std::sync::Arc;

use hangar_vmm::fake::FakeBackend;
use prometheus_parse::{Scrape, Value};

use super::tests::plan;
use crate::images::NoImages;
use crate::{Host, LocalHost, LocalHostConfig, ProgressFn, Purpose};

const FARM_TOKEN: &str = "farm-secret-of-the-metrics-test";
const METRICS_TOKEN: &str = "metrics-secret-of-the-metrics-test";

/// `GET /metrics` with `token`: the status and the body.
async fn scrape(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(format!("{url}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.text().await.unwrap())
}

fn gauge(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:#?}");
    match found[0].value {
        Value::Gauge(value) => value,
        ref other => panic!("{name}: not a gauge: {other:?}"),
    }
}

#[tokio::test]
async fn the_agent_s_page_shows_its_facts_and_vms_to_the_farm_or_metrics_token() {
    let backend = FakeBackend::new();
    let host = Arc::new(LocalHost::new(
        Arc::new(backend),
        Arc::new(NoImages),
        LocalHostConfig {
            name: "h1".into(),
            ..LocalHostConfig::default()
        },
    ));
    let progress: ProgressFn = Arc::new(|_: &str, _: u8| {});
    for id in ["vm-a", "vm-b"] {
        let plan = plan(id, Purpose::Request);
        let prepared = host.prepare_vm(&plan, progress.clone()).await.unwrap();
        host.make_vm(&plan, &prepared, progress.clone())
            .await
            .unwrap();
    }
    host.sleep("vm-b").await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = super::router(host.clone(), FARM_TOKEN).merge(super::metrics::router(
        host.clone(),
        FARM_TOKEN,
        Some(METRICS_TOKEN),
    ));
    let served = tokio::spawn(async move { axum::serve(listener, app).await });

    assert_eq!(scrape(&url, None).await.0, 401);
    assert_eq!(scrape(&url, Some("not-the-token")).await.0, 401);
    assert_eq!(scrape(&url, Some(FARM_TOKEN)).await.0, 200);
    // The metrics token opens /metrics, and nothing else of the agent's API.
    let facts = reqwest::Client::new()
        .get(format!("{url}/agent/v1/facts"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(facts.status().as_u16(), 401);

    let (status, page) = scrape(&url, Some(METRICS_TOKEN)).await;
    assert_eq!(status, 200, "{page}");
    let parsed = Scrape::parse(page.lines().map(|line| Ok(line.to_owned()))).unwrap();
    assert_eq!(
        gauge(&parsed, "hangar_agent_vms", &[("state", "running")]),
        1.0,
        "{page}"
    );
    assert_eq!(
        gauge(&parsed, "hangar_agent_vms", &[("state", "paused")]),
        1.0
    );
    assert_eq!(
        gauge(&parsed, "hangar_agent_vms", &[("state", "gone")]),
        0.0
    );
    let facts = host.facts().await.unwrap();
    assert_eq!(
        gauge(&parsed, "hangar_agent_memory_bytes", &[]),
        facts.memory_mib as f64 * 1_048_576.0
    );
    assert_eq!(
        gauge(&parsed, "hangar_agent_vcpus", &[]),
        f64::from(facts.vcpus)
    );
    assert!(parsed.docs.contains_key("hangar_agent_load1"), "{page}");
    served.abort();
}
