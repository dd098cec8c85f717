//! Remote against local warm-pool grants, in one run: a `hangar server` with its own host
//! (the single-node path) grants from a pool on that host; then a `hangar agent` on
//! 127.0.0.1 (another port, its own data dir) registers with a higher host priority, the
//! pool is emptied and refilled, and its VMs, now on the agent's host, are granted the
//! same way. Real QEMU guests; each grant is timed until the endpoint answers HTTP 200.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::agent::BenchAgent;
use crate::client::BenchError;
use crate::server::{BenchServer, ServerOptions};
use crate::stats::{self, Summary};

/// The agent's host name in the farm.
pub const AGENT_HOST: &str = "bench-agent";

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteGrants {
    pub service: String,
    pub pool: u32,
    /// Grants from a pool on the server's own host.
    pub local: Summary,
    /// Grants from a pool on the agent's host.
    pub remote: Summary,
    /// remote p50 - local p50, in milliseconds.
    pub added_p50_ms: f64,
}

/// `count` warm-pool grants of `service` from a pool of `pool` VMs on the server's own
/// host, then as many from a pool on an agent's host.
pub async fn run(
    service: &str,
    pool: u32,
    count: usize,
    accel: &str,
    cache: Option<PathBuf>,
) -> Result<RemoteGrants, BenchError> {
    let options = ServerOptions {
        accel: accel.to_owned(),
        catalog: None,
        cache,
        pool_memory_mib: 4096,
        templates: false,
    };
    let cache = options.cache_dir().map_err(BenchError::Failed)?;
    let server = BenchServer::start(&options).map_err(BenchError::Failed)?;

    eprintln!("  grants from a pool on the server's own host...");
    let local = grants_on(&server, service, pool, count, crate::farm::LOCAL_HOST).await?;

    eprintln!("  starting an agent on 127.0.0.1...");
    let agent =
        BenchAgent::start(&server, &cache, accel, AGENT_HOST, 10).map_err(BenchError::Failed)?;
    agent.wait_up(&server).await?;
    // Empty the pool: it refills on the agent's host, which has the higher priority.
    server.set_pool(service, 0).await?;
    wait_pool_empty(&server, service).await?;
    eprintln!("  grants from a pool on the agent's host...");
    let remote = grants_on(&server, service, pool, count, AGENT_HOST).await?;
    server.set_pool(service, 0).await?;
    drop(agent);
    drop(server);

    let mut local = local;
    let mut remote = remote;
    let local = stats::summary(&mut local).expect("count ≥ 1");
    let remote = stats::summary(&mut remote).expect("count ≥ 1");
    Ok(RemoteGrants {
        service: service.to_owned(),
        pool,
        added_p50_ms: remote.p50_ms - local.p50_ms,
        local,
        remote,
    })
}

/// Warm-pool grants (see [`crate::measure::pool_grants`]), each checked to come from a VM
/// on `host`.
async fn grants_on(
    server: &BenchServer,
    service: &str,
    pool: u32,
    count: usize,
    host: &str,
) -> Result<Vec<Duration>, BenchError> {
    let grants = crate::measure::pool_grants(server, service, pool, count).await?;
    let mut took = Vec::new();
    for grant in grants {
        // The VM is deleted by now; its record (with `all`) says where it ran.
        let vms: Vec<hangar_api::VmView> = server.client.get("/v1/vms?all=true").await?;
        let on = vms
            .iter()
            .find(|vm| vm.id == grant.vm)
            .map(|vm| vm.host.clone())
            .unwrap_or_default();
        if on != host {
            return Err(BenchError::Failed(format!(
                "grant {} came from host {on:?}, not {host:?}",
                grant.vm
            )));
        }
        took.push(grant.total);
    }
    Ok(took)
}

async fn wait_pool_empty(server: &BenchServer, pool: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pools: Vec<hangar_api::PoolView> = server.client.get("/v1/pools").await?;
        if pools
            .iter()
            .all(|p| p.name != pool || (p.ready == 0 && p.booting == 0))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!(
                "pool {pool} did not empty within a minute"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
