//! `hangar bench pool`: request → endpoint answering, for cold boots and warm-pool hits of
//! the same service, measured in one run through the public API of a server this command
//! starts in a temporary data dir.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, ClientError};

#[derive(clap::Args)]
pub struct PoolBench {
    /// Service to measure (must be in the demo catalog or `--catalog`).
    #[arg(long, default_value = "http-static")]
    service: String,
    /// Cold boots to measure.
    #[arg(long, default_value_t = 5)]
    cold: usize,
    /// Pool hits to measure.
    #[arg(long, default_value_t = 30)]
    hits: usize,
    /// Pool size; hits are taken in bursts of this many from a full, idle pool.
    #[arg(long, default_value_t = 3)]
    pool: u32,
    /// Accelerator for the benchmark's server.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Catalog for the benchmark's server [default: built-in demo].
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Guest asset cache to reuse (kernel, images) [default: the default data dir's cache].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Summary {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Report {
    service: String,
    accel: String,
    machine: String,
    cold_boot: Summary,
    pool_hit: Summary,
    /// Of a pool hit: request → API answer (resume + final configuration).
    pool_hit_api: Summary,
    /// Of a pool hit: API answer → endpoint answering.
    pool_hit_endpoint: Summary,
    /// Of a pool hit's API answer: the server's own stages (its `Server-Timing` header), in
    /// order, then `total` (the handler's time; the rest of the API answer is HTTP).
    pool_hit_server: Vec<(String, Summary)>,
    /// The floor: one GET to a VM that is already running (the service's own cost).
    running_vm_get: Summary,
    cold_over_hit_p50: f64,
}

/// The server this benchmark runs; stopped, with every VM it made, when dropped.
struct BenchServer {
    child: Child,
    data_dir: tempfile::TempDir,
    url: String,
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The server leaves VMs running by design; this benchmark's are stopped here.
        let vms = self.data_dir.path().join("vms");
        for pid in qemu_pids_under(&vms) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid belongs to a QEMU
            // whose pid file lies in this benchmark's own data dir.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

fn qemu_pids_under(vms: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(vms) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pidfile = entry.path().join("qemu.pid");
            let pid: u32 = std::fs::read_to_string(&pidfile)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&*pidfile.to_string_lossy())
                .then_some(pid)
        })
        .collect()
}

fn start_server(args: &PoolBench) -> Result<BenchServer, String> {
    let data_dir = tempfile::Builder::new()
        .prefix("hgbench")
        .tempdir_in("/tmp")
        .map_err(|err| format!("temporary data dir: {err}"))?;
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| crate::default_data_dir().join("cache"));
    std::fs::create_dir_all(&cache)
        .map_err(|err| format!("cache dir {}: {err}", cache.display()))?;
    // The data dir links to it, so it must not be relative.
    let cache = cache
        .canonicalize()
        .map_err(|err| format!("cache dir {}: {err}", cache.display()))?;
    std::os::unix::fs::symlink(&cache, data_dir.path().join("cache"))
        .map_err(|err| err.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|err| err.to_string())?
        .port();
    let log =
        std::fs::File::create(data_dir.path().join("server.log")).map_err(|err| err.to_string())?;
    let exe = std::env::current_exe().map_err(|err| err.to_string())?;
    let mut command = Command::new(exe);
    command
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--accel",
            &args.accel,
            "--pool-memory",
            "4096",
        ])
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|err| err.to_string())?)
        .stderr(log);
    if let Some(catalog) = &args.catalog {
        command.arg("--catalog").arg(catalog);
    }
    let child = command
        .spawn()
        .map_err(|err| format!("cannot start the server: {err}"))?;
    let mut server = BenchServer {
        child,
        data_dir,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while http_status(
        &format!("127.0.0.1:{port}").parse().expect("addr"),
        "/healthz",
    )
    .ok()
        != Some(200)
    {
        if let Ok(Some(status)) = server.child.try_wait() {
            let log = std::fs::read_to_string(server.data_dir.path().join("server.log"))
                .unwrap_or_default();
            return Err(format!("the benchmark's server exited ({status}):\n{log}"));
        }
        if Instant::now() > deadline {
            return Err("the benchmark's server did not start within 5 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(server)
}

/// One plain HTTP/1.0 GET; the status code.
fn http_status(addr: &SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// One measured request.
struct Sample {
    /// Request sent → endpoint answered 200.
    total: Duration,
    /// Request sent → the API answered (VM resumed and configured, or booted).
    api: Duration,
    vm: String,
    served: String,
    /// The server's stages, from its `Server-Timing` header.
    stages: Vec<(String, Duration)>,
}

/// `name;dur=MS, ...` → (name, duration) pairs.
fn parse_server_timing(header: &str) -> Vec<(String, Duration)> {
    header
        .split(',')
        .filter_map(|metric| {
            let (name, dur) = metric.trim().split_once(";dur=")?;
            let ms: f64 = dur.trim().parse().ok()?;
            Some((name.to_owned(), Duration::from_secs_f64(ms / 1000.0)))
        })
        .collect()
}

/// Requests the service and waits until its endpoint answers 200.
async fn timed_request(
    client: &Client,
    service: &str,
    dedicated: bool,
) -> Result<Sample, ClientError> {
    let body = serde_json::json!({ "service": service, "mode": if dedicated { "dedicated" } else { "shared" } });
    let started = Instant::now();
    let (grant, timing): (serde_json::Value, String) =
        client.post_timed("/v1/requests", &body).await?;
    let api = started.elapsed();
    let endpoint: SocketAddr = grant["endpoint"]
        .as_str()
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| ClientError::Reply(format!("no endpoint in {grant}")))?;
    loop {
        if http_status(&endpoint, "/").ok() == Some(200) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(ClientError::Reply(format!("{endpoint} never answered")));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(Sample {
        total: started.elapsed(),
        api,
        vm: grant["vm"].as_str().unwrap_or_default().to_owned(),
        served: grant["match"].as_str().unwrap_or_default().to_owned(),
        stages: parse_server_timing(&timing),
    })
}

async fn wait_pool_full(client: &Client, pool: &str, size: u32) -> Result<(), ClientError> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let pools: serde_json::Value = client.get("/v1/pools").await?;
        let full = pools.as_array().into_iter().flatten().any(|p| {
            p["name"] == pool
                && p["ready"].as_u64() >= Some(u64::from(size))
                && p["booting"].as_u64() == Some(0)
        });
        if full {
            // Let the last boot's tail (page cache, QEMU threads) quiet down.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ClientError::Reply(format!(
                "pool {pool} did not fill to {size}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn summary(samples: &mut [Duration]) -> Summary {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        ms(samples[index.min(samples.len() - 1)])
    };
    Summary {
        n: samples.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        min_ms: ms(samples[0]),
        max_ms: ms(samples[samples.len() - 1]),
    }
}

fn print_row(name: &str, s: &Summary) {
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        s.n, s.p50_ms, s.p99_ms, s.min_ms, s.max_ms
    );
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown cpu")
        .trim()
        .to_owned();
    format!("{cpus} cpus, {model}")
}

pub async fn run(args: PoolBench) -> Result<(), ClientError> {
    if args.cold == 0 || args.hits == 0 || args.pool == 0 {
        return Err(ClientError::Reply(
            "--cold, --hits and --pool must be at least 1".into(),
        ));
    }
    eprintln!(
        "starting a server for the benchmark (accel {})...",
        args.accel
    );
    let server = start_server(&args).map_err(ClientError::Reply)?;
    let client = Client::new(&server.url);
    let set_pool = |min: u32| serde_json::json!({ "min": min, "max": min });

    // Cold boots: no pool.
    let _: serde_json::Value = client
        .put(&format!("/v1/pools/{}", args.service), &set_pool(0))
        .await?;
    let mut cold = Vec::new();
    for i in 0..args.cold {
        let sample = timed_request(&client, &args.service, true).await?;
        if sample.served != "created" {
            return Err(ClientError::Reply(format!(
                "expected a cold boot, got a {} match",
                sample.served
            )));
        }
        eprintln!(
            "cold boot {}/{}: {:.0} ms",
            i + 1,
            args.cold,
            sample.total.as_secs_f64() * 1000.0
        );
        cold.push(sample.total);
        let _: serde_json::Value = client.delete(&format!("/v1/vms/{}", sample.vm)).await?;
    }

    // Pool hits, in bursts of the pool's size from a full, idle pool.
    let _: serde_json::Value = client
        .put(&format!("/v1/pools/{}", args.service), &set_pool(args.pool))
        .await?;
    let mut hits = Vec::new();
    let mut hit_api = Vec::new();
    let mut hit_endpoint = Vec::new();
    let mut hit_stages: Vec<(String, Vec<Duration>)> = Vec::new();
    while hits.len() < args.hits {
        wait_pool_full(&client, &args.service, args.pool).await?;
        let mut made = Vec::new();
        for _ in 0..args.pool.min((args.hits - hits.len()) as u32) {
            let sample = timed_request(&client, &args.service, true).await?;
            if sample.served != "exact" {
                return Err(ClientError::Reply(format!(
                    "expected a pool hit, got {}",
                    sample.served
                )));
            }
            hits.push(sample.total);
            hit_api.push(sample.api);
            hit_endpoint.push(sample.total - sample.api);
            for (name, took) in sample.stages {
                match hit_stages.iter_mut().find(|(known, _)| *known == name) {
                    Some((_, samples)) => samples.push(took),
                    None => hit_stages.push((name, vec![took])),
                }
            }
            made.push(sample.vm);
        }
        eprintln!("pool hits {}/{}", hits.len(), args.hits);
        for vm in made {
            let _: serde_json::Value = client.delete(&format!("/v1/vms/{vm}")).await?;
        }
    }

    // The floor: GETs against a VM that has been running for a while.
    let sample = timed_request(&client, &args.service, true).await?;
    let endpoint: SocketAddr = client
        .get::<serde_json::Value>(&format!("/v1/vms/{}", sample.vm))
        .await?["endpoints"]
        .as_object()
        .and_then(|e| e.values().next())
        .and_then(|e| e.as_str())
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| ClientError::Reply("no endpoint".into()))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut floor = Vec::new();
    for _ in 0..args.hits {
        let started = Instant::now();
        if http_status(&endpoint, "/").ok() != Some(200) {
            return Err(ClientError::Reply(format!("{endpoint} did not answer")));
        }
        floor.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let cold = summary(&mut cold);
    let hit = summary(&mut hits);
    let report = Report {
        service: args.service.clone(),
        accel: args.accel.clone(),
        machine: machine(),
        cold_over_hit_p50: cold.p50_ms / hit.p50_ms,
        cold_boot: cold,
        pool_hit: hit,
        pool_hit_api: summary(&mut hit_api),
        pool_hit_endpoint: summary(&mut hit_endpoint),
        pool_hit_server: hit_stages
            .into_iter()
            .map(|(name, mut samples)| (name, summary(&mut samples)))
            .collect(),
        running_vm_get: summary(&mut floor),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    } else {
        println!(
            "hangar bench pool: {} on {} (accel {})",
            report.service, report.machine, report.accel
        );
        println!(
            "request -> endpoint answering HTTP 200, measured by the client through the public API\n"
        );
        println!("| metric | n | p50 ms | p99 ms | min ms | max ms |");
        println!("|---|---|---|---|---|---|");
        for (name, s) in [
            ("cold boot", &report.cold_boot),
            ("warm-pool hit", &report.pool_hit),
            (
                "  of which: API answer (resume + final configuration)",
                &report.pool_hit_api,
            ),
            (
                "  of which: API answer -> endpoint answering",
                &report.pool_hit_endpoint,
            ),
            (
                "floor: one GET to an already running VM",
                &report.running_vm_get,
            ),
        ] {
            print_row(name, s);
        }
        for (stage, s) in &report.pool_hit_server {
            print_row(&format!("    server stage: {stage}"), s);
        }
        println!("\ncold / hit (p50): {:.0}x", report.cold_over_hit_p50);
    }
    drop(server);
    Ok(())
}
