//! Remote against local warm-pool grants, in one run: a `hangar server` with its own host
//! (the single-node path) grants from a pool on that host; then a `hangar agent` on
//! 127.0.0.1 (another port, its own data dir) registers with a higher host priority, the
//! pool is emptied and refilled, and its VMs, now on the agent's host, are granted the
//! same way. Real QEMU guests; each grant is timed until the endpoint answers HTTP 200.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

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

/// `hangar agent` started by the benchmark; stopped, with the VMs it made, when dropped.
struct BenchAgent {
    child: Child,
    data_dir: tempfile::TempDir,
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Agents leave VMs running by design; the benchmark's are stopped here.
        for (_, pid) in hangar_vmm::procs::qemu_processes_under(&self.data_dir.path().join("vms")) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid belongs to a QEMU
            // whose pid file lies in this agent's own data dir.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

impl BenchAgent {
    /// Starts `hangar agent` for `server` on a free port, in a temporary data dir whose
    /// `cache` links to the benchmarks' shared cache.
    fn start(server: &BenchServer, cache: &Path, accel: &str) -> Result<BenchAgent, String> {
        let data_dir = tempfile::Builder::new()
            .prefix("hgagent")
            .tempdir_in("/tmp")
            .map_err(|err| format!("temporary agent dir: {err}"))?;
        std::os::unix::fs::symlink(cache, data_dir.path().join("cache"))
            .map_err(|err| err.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|err| err.to_string())?
            .port();
        let log = std::fs::File::create(data_dir.path().join("agent.log"))
            .map_err(|err| err.to_string())?;
        let token_file: PathBuf = server.data_dir().join("farm.token");
        let child = Command::new(crate::hangar::hangar_exe()?)
            .args(["agent", "--server", &server.url, "--name", AGENT_HOST])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--priority", "10", "--no-templates", "--accel", accel])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--data-dir")
            .arg(data_dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|err| err.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|err| format!("cannot start the agent: {err}"))?;
        Ok(BenchAgent { child, data_dir })
    }

    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.data_dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Whether the `hangar` executable has the `agent` command.
pub fn agent_available() -> bool {
    crate::hangar::hangar_exe().is_ok_and(|exe| {
        Command::new(exe)
            .args(["agent", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
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
    let agent = BenchAgent::start(&server, &cache, accel).map_err(BenchError::Failed)?;
    wait_host_up(&server, &agent).await?;
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

async fn wait_host_up(server: &BenchServer, agent: &BenchAgent) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let hosts: Vec<hangar_api::HostView> = server.client.get("/v1/hosts").await?;
        if hosts
            .iter()
            .any(|host| host.name == AGENT_HOST && host.state == "up")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!(
                "the agent did not register within 2 minutes:\n{}",
                agent.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
