//! `hangar bench install`: request → both endpoints answering, for a configuration of
//! debian-12 with redis and nginx (seed 003 claim 1, applications installed at deploy),
//! served three ways in one run:
//!
//! - **install at deploy**: a pre-OS shell given the OS layer and both applications' own
//!   layers, already cached (the path this measures);
//! - **full build**: the same configuration on a server with an empty image cache (only
//!   the kernel, guest assets and downloaded packages kept, so the network is not
//!   measured): debootstrap, the packages, the layers squashed, then a boot;
//! - **ready image**: a paused pool VM of `web-cache` (nginx and redis on one VM, an
//!   image of its own), an exact match resumed.
//!
//! Each server is started by the benchmark in a temporary data dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::BenchError;
use crate::server::{BenchServer, ServerOptions, machine, wait_answering};
use crate::stats::{self, Summary};

/// The pre-OS shell pool of the demo catalog.
const SHELL_POOL: &str = "shell-1x256";
/// The service whose pool VMs are the ready image of the same applications.
const READY_SERVICE: &str = "web-cache";

#[derive(clap::Args)]
pub struct InstallBench {
    /// Installs at deploy to measure.
    #[arg(long, default_value_t = 3)]
    installs: usize,
    /// Ready-image (exact pool) grants to measure.
    #[arg(long, default_value_t = 3)]
    ready: usize,
    /// Full builds from an empty image cache to measure (each takes minutes).
    #[arg(long, default_value_t = 1)]
    builds: usize,
    /// Accelerator for the benchmark's servers.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Image cache holding (or to hold) the redis and nginx layers [default: the default
    /// data dir's cache].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Where the full builds' empty image caches are made [default: a temporary dir
    /// beside the cache].
    #[arg(long)]
    build_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    accel: String,
    configuration: &'static str,
    install_at_deploy: Summary,
    full_build: Summary,
    ready_image: Summary,
    /// full build p50 / install at deploy p50 (target: at least 5).
    build_over_install_p50: f64,
    /// install at deploy p50 / ready image p50.
    install_over_ready_p50: f64,
}

/// The request measured: debian-12 with redis and nginx, 1 vCPU, 256 MiB.
fn composed_request() -> serde_json::Value {
    serde_json::json!({
        "config": {
            "vcpus": 1,
            "memory_mib": { "min": 256, "max": 256 },
            "os": { "name": "debian-12", "min_version": null },
            "apps": ["redis", "nginx"],
        },
        "mode": "dedicated",
        "deadline_ms": 3_600_000u64,
    })
}

/// One measured grant: request sent → its `http` endpoint answers 200 and its `redis`
/// endpoint answers PING.
struct Measured {
    total: Duration,
    vm: String,
    served: String,
    installed: Vec<String>,
}

async fn timed(server: &BenchServer, body: &serde_json::Value) -> Result<Measured, BenchError> {
    let started = Instant::now();
    let grant: serde_json::Value = server.client.post("/v1/requests", body).await?;
    let endpoint = |name: &str| -> Result<SocketAddr, BenchError> {
        grant["endpoints"][name]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .ok_or_else(|| BenchError::Reply(format!("no {name} endpoint in {grant}")))
    };
    let (http, redis) = (endpoint("http")?, endpoint("redis")?);
    wait_answering(http, started, Duration::from_secs(600))
        .await
        .map_err(BenchError::Failed)?;
    redis_pong(redis, started, Duration::from_secs(600)).await?;
    Ok(Measured {
        total: started.elapsed(),
        vm: grant["vm"].as_str().unwrap_or_default().to_owned(),
        served: grant["match"].as_str().unwrap_or_default().to_owned(),
        installed: grant["installed_at_deploy"]
            .as_array()
            .map(|apps| {
                apps.iter()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Waits until `addr` answers `PING` with `+PONG`, at most `timeout` after `started`.
async fn redis_pong(
    addr: SocketAddr,
    started: Instant,
    timeout: Duration,
) -> Result<(), BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let answered = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            stream.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            buf[..n].starts_with(b"+PONG").then_some(())
        }
        .await;
        if answered.is_some() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(BenchError::Failed(format!(
                "redis at {addr} did not answer PING within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Builds `service`'s image on `server` and waits for the build task to end.
async fn build(server: &BenchServer, service: &str) -> Result<(), BenchError> {
    let started: serde_json::Value = server
        .client
        .post("/v1/images", &serde_json::json!({ "service": service }))
        .await?;
    let task = started["task"].as_str().unwrap_or_default().to_owned();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let view: serde_json::Value = server.client.get(&format!("/v1/tasks/{task}")).await?;
        match view["state"].as_str() {
            Some("succeeded") => return Ok(()),
            Some("running") | None => {}
            Some(other) => {
                return Err(BenchError::Failed(format!(
                    "building {service}: task {task} {other}: {}",
                    view["error"]
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!(
                "building {service} took over an hour"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An empty image cache in `parent` holding only what is not the image: the guest
/// kernel and assets, and the packages already downloaded (hard links).
fn empty_cache(shared: &Path, parent: &Path) -> Result<tempfile::TempDir, BenchError> {
    let dir = tempfile::Builder::new()
        .prefix("hangar-bench-build")
        .tempdir_in(parent)
        .map_err(|err| BenchError::Reply(format!("empty cache in {}: {err}", parent.display())))?;
    for part in ["assets", "kernels", "downloads", "apt"] {
        let from = shared.join(part);
        if !from.exists() {
            continue;
        }
        let status = std::process::Command::new("cp")
            .arg("-al")
            .arg(&from)
            .arg(dir.path().join(part))
            .status()
            .map_err(|err| BenchError::Reply(format!("cp: {err}")))?;
        if !status.success() {
            return Err(BenchError::Reply(format!(
                "cannot link {} into the empty cache",
                from.display()
            )));
        }
    }
    Ok(dir)
}

fn summary(samples: &mut [Duration]) -> Summary {
    stats::summary(samples).expect("at least one sample")
}

pub async fn run(args: InstallBench) -> Result<(), BenchError> {
    if args.installs == 0 || args.ready == 0 || args.builds == 0 {
        return Err(BenchError::Reply(
            "--installs, --ready and --builds must be at least 1".into(),
        ));
    }
    let options = ServerOptions {
        accel: args.accel.clone(),
        catalog: None,
        cache: args.cache.clone(),
        pool_memory_mib: 4096,
        templates: false,
    };
    let shared = options.cache_dir().map_err(BenchError::Reply)?;
    eprintln!(
        "starting a server for the benchmark (accel {})...",
        args.accel
    );
    let server = BenchServer::start(&options).map_err(BenchError::Reply)?;
    for pool in ["http-static", SHELL_POOL, READY_SERVICE] {
        server.set_pool(pool, 0).await?;
    }
    // The applications' own images, cached (built now if they are not).
    for service in ["redis", "nginx"] {
        eprintln!("making sure {service}'s layers are cached...");
        build(&server, service).await?;
    }

    // (a) Install at deploy onto a pre-OS shell.
    server.set_pool(SHELL_POOL, 1).await?;
    let mut installs = Vec::new();
    for i in 0..args.installs {
        server.wait_pool_full(SHELL_POOL, 1).await?;
        let sample = timed(&server, &composed_request()).await?;
        if sample.served != "partial" || sample.installed.is_empty() {
            return Err(BenchError::Reply(format!(
                "expected an install at deploy, got a {} match installing {:?}",
                sample.served, sample.installed
            )));
        }
        eprintln!(
            "install at deploy {}/{}: {:.0} ms",
            i + 1,
            args.installs,
            stats::ms(sample.total)
        );
        installs.push(sample.total);
        server.delete_vm(&sample.vm).await?;
    }
    server.set_pool(SHELL_POOL, 0).await?;

    // (c) A ready image: an exact pool VM of the same applications.
    eprintln!("filling a {READY_SERVICE} pool VM...");
    build(&server, READY_SERVICE).await?;
    server.set_pool(READY_SERVICE, 1).await?;
    let mut ready = Vec::new();
    for i in 0..args.ready {
        server.wait_pool_full(READY_SERVICE, 1).await?;
        let body = serde_json::json!({ "service": READY_SERVICE, "mode": "dedicated" });
        let sample = timed(&server, &body).await?;
        if sample.served != "exact" {
            return Err(BenchError::Reply(format!(
                "expected a ready pool VM, got a {} match",
                sample.served
            )));
        }
        eprintln!(
            "ready image {}/{}: {:.0} ms",
            i + 1,
            args.ready,
            stats::ms(sample.total)
        );
        ready.push(sample.total);
        server.delete_vm(&sample.vm).await?;
    }
    drop(server);

    // (b) The same configuration built from nothing, on a server with an empty cache.
    let parent = match &args.build_dir {
        Some(dir) => dir.clone(),
        None => shared
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir),
    };
    let mut builds = Vec::new();
    for i in 0..args.builds {
        let cache = empty_cache(&shared, &parent)?;
        let server = BenchServer::start(&ServerOptions {
            cache: Some(cache.path().to_path_buf()),
            pool_memory_mib: 0,
            ..options.clone()
        })
        .map_err(BenchError::Reply)?;
        eprintln!(
            "full build {}/{} (debootstrap, packages, boot; minutes)...",
            i + 1,
            args.builds
        );
        let sample = timed(&server, &composed_request()).await?;
        if sample.served != "created" {
            return Err(BenchError::Reply(format!(
                "expected a VM built from nothing, got a {} match",
                sample.served
            )));
        }
        eprintln!(
            "full build {}/{}: {:.0} ms",
            i + 1,
            args.builds,
            stats::ms(sample.total)
        );
        builds.push(sample.total);
        server.delete_vm(&sample.vm).await?;
        drop(server);
        drop(cache);
    }

    let install = summary(&mut installs);
    let build = summary(&mut builds);
    let ready = summary(&mut ready);
    let report = Report {
        machine: machine(),
        accel: args.accel.clone(),
        configuration: "1 vCPU, 256 MiB, debian-12, redis + nginx",
        build_over_install_p50: build.p50_ms / install.p50_ms,
        install_over_ready_p50: install.p50_ms / ready.p50_ms,
        install_at_deploy: install,
        full_build: build,
        ready_image: ready,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
        return Ok(());
    }
    println!(
        "hangar bench install: {} on {} (accel {})",
        report.configuration, report.machine, report.accel
    );
    println!("request -> http answering 200 and redis answering PING, through the public API\n");
    println!("| path | n | p50 ms | p99 ms | min ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [
        (
            "install at deploy (shell + cached layers)",
            &report.install_at_deploy,
        ),
        ("full build from an empty image cache", &report.full_build),
        (
            "ready image (exact pool VM of web-cache)",
            &report.ready_image,
        ),
    ] {
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s.n, s.p50_ms, s.p99_ms, s.min_ms, s.max_ms
        );
    }
    println!(
        "\nfull build / install at deploy (p50): {:.1}x (target: at least 5x)",
        report.build_over_install_p50
    );
    println!(
        "install at deploy / ready image (p50): {:.1}x",
        report.install_over_ready_p50
    );
    Ok(())
}
