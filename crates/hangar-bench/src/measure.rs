//! What the benchmarks measure of hangar, through the public API of a [`BenchServer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_api::{GrantView, Served, VmView};
use hangar_core::VmState;
use serde::Serialize;

use crate::client::BenchError;
use crate::server::{BenchServer, Sample, rss_pss_kib};

/// Warm-pool grants: the pool is set to `pool` VMs; from a full, idle pool, bursts of
/// `pool` dedicated requests back to back (refills run meanwhile), each timed until its
/// endpoint answers. Every grant must be an exact pool match. The granted VMs are deleted.
pub async fn pool_grants(
    server: &BenchServer,
    service: &str,
    pool: u32,
    count: usize,
) -> Result<Vec<Sample>, BenchError> {
    server.set_pool(service, pool).await?;
    let mut grants = Vec::new();
    while grants.len() < count {
        server.wait_pool_full(service, pool).await?;
        let mut made = Vec::new();
        for _ in 0..pool.min((count - grants.len()) as u32) {
            let sample = server.timed_request(service, true).await?;
            made.push(sample.vm.clone());
            if sample.served != "exact" {
                return Err(BenchError::Reply(format!(
                    "expected a pool hit, got a {} match",
                    sample.served
                )));
            }
            grants.push(sample);
        }
        eprintln!("  pool grants {}/{count}", grants.len());
        for vm in made {
            server.delete_vm(&vm).await?;
        }
    }
    Ok(grants)
}

/// Dedicated grants back to back for `duration`, with the pool refilling as it can.
#[derive(Debug, Clone, Serialize)]
pub struct Sustained {
    pub pool: u32,
    pub seconds: f64,
    pub grants: usize,
    /// Grants served from the warm pool.
    pub from_pool: usize,
    /// Grants cloned from the service's template for the request (the others were booted).
    pub cloned: usize,
    pub per_s: f64,
    #[serde(skip)]
    pub latencies: Vec<Duration>,
}

/// One client asks for dedicated VMs one after the other for `duration` (each until its
/// endpoint answers), starting from a full pool of `pool` VMs whose refills run as they
/// can; every granted VM is deleted in the background right away.
pub async fn sustained_grants(
    server: &BenchServer,
    service: &str,
    pool: u32,
    duration: Duration,
) -> Result<Sustained, BenchError> {
    server.set_pool(service, pool).await?;
    server.wait_pool_full(service, pool).await?;
    let started = Instant::now();
    let mut latencies = Vec::new();
    let (mut from_pool, mut cloned) = (0, 0);
    let mut deletions = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        let sample = server.timed_request(service, true).await?;
        latencies.push(sample.total);
        match sample.served.as_str() {
            "exact" | "superset" => from_pool += 1,
            "cloned" => cloned += 1,
            _ => {}
        }
        let client = server.api_client();
        deletions.spawn(async move {
            client
                .delete::<serde_json::Value>(&format!("/v1/vms/{}", sample.vm))
                .await
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    while let Some(done) = deletions.join_next().await {
        if let Ok(Err(err)) = done {
            return Err(err);
        }
    }
    Ok(Sustained {
        pool,
        seconds,
        grants: latencies.len(),
        from_pool,
        cloned,
        per_s: latencies.len() as f64 / seconds,
        latencies,
    })
}

/// RSS and PSS (KiB) of every paused VM in `pool`.
pub async fn paused_pool_memory(
    server: &BenchServer,
    pool: &str,
) -> Result<Vec<(u64, u64)>, BenchError> {
    let vms: Vec<VmView> = server.client.get("/v1/vms").await?;
    Ok(vms
        .iter()
        .filter(|vm| vm.state == VmState::Ready && vm.pool.as_deref() == Some(pool))
        .filter_map(|vm| rss_pss_kib(vm.pid?))
        .collect())
}

/// Shared-mode requests per second for a service with an active VM.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub clients: usize,
    pub seconds: f64,
    pub requests: usize,
    pub per_s: f64,
    #[serde(skip)]
    pub latencies: Vec<Duration>,
}

/// `clients` concurrent clients send shared-mode requests for `service` (which has an
/// active shared VM once the first is answered) for `duration`; every answer must be a
/// `shared` match.
pub async fn shared_throughput(
    server: &BenchServer,
    service: &str,
    clients: usize,
    duration: Duration,
) -> Result<Throughput, BenchError> {
    let first = server.timed_request(service, false).await?;
    let body = Arc::new(serde_json::json!({ "service": service, "mode": "shared" }));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let client = server.api_client();
        let body = body.clone();
        let vm = first.vm.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                let sent = Instant::now();
                let answer: GrantView = client.post("/v1/requests", &body).await?;
                latencies.push(sent.elapsed());
                if answer.served != Served::Shared || answer.vm != vm {
                    return Err(BenchError::Reply(format!(
                        "expected the shared VM {vm}, got {answer:?}"
                    )));
                }
            }
            Ok::<_, BenchError>(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = workers.join_next().await {
        latencies.extend(done.map_err(|err| BenchError::Failed(err.to_string()))??);
    }
    let seconds = started.elapsed().as_secs_f64();
    server.delete_vm(&first.vm).await?;
    Ok(Throughput {
        clients,
        seconds,
        requests: latencies.len(),
        per_s: latencies.len() as f64 / seconds,
        latencies,
    })
}

/// Archives the (active or sleeping) VM with `tier`, then wakes it. Returns the time the
/// archive call took, the wake → endpoint answering time and the archive's size, or
/// `None` when the server does not offer that tier (it refuses the request and the VM
/// stays as it was).
pub async fn archive_and_wake(
    server: &BenchServer,
    vm: &str,
    tier: &str,
    endpoint: SocketAddr,
) -> Result<Option<(Duration, Duration, Option<u64>)>, BenchError> {
    let archived = server
        .timed_action(vm, "archive", &serde_json::json!({ "tier": tier }), None)
        .await;
    let (archived, answer) = match archived {
        Ok(done) => done,
        Err(BenchError::Api { status, .. }) if status == 400 || status == 422 => {
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    let size = answer.archive.as_ref().map(|a| a.size_bytes);
    if answer.archive.as_ref().map(|a| a.tier.as_str()) != Some(tier) {
        // Written in another tier (a delta needs a VM cloned from a template): not this
        // tier's figure. Woken again, for what comes next.
        server
            .timed_action(vm, "wake", &serde_json::json!({}), Some(endpoint))
            .await?;
        return Ok(None);
    }
    let (woken, _) = server
        .timed_action(vm, "wake", &serde_json::json!({}), Some(endpoint))
        .await?;
    Ok(Some((archived, woken, size)))
}
