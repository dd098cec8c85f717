//! `hangar bench pool`: request → endpoint answering, for cold boots and warm-pool hits of
//! the same service, measured in one run through the public API of a server this command
//! starts in a temporary data dir.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::BenchError;
use crate::measure;
use crate::server::{BenchServer, ServerOptions, http_status, machine};
use crate::stats::{self, Summary};

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

fn print_row(name: &str, s: &Summary) {
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        s.n, s.p50_ms, s.p99_ms, s.min_ms, s.max_ms
    );
}

/// Percentiles of samples known to be there.
fn summary(samples: &mut [Duration]) -> Summary {
    stats::summary(samples).expect("at least one sample")
}

pub async fn run(args: PoolBench) -> Result<(), BenchError> {
    if args.cold == 0 || args.hits == 0 || args.pool == 0 {
        return Err(BenchError::Reply(
            "--cold, --hits and --pool must be at least 1".into(),
        ));
    }
    eprintln!(
        "starting a server for the benchmark (accel {})...",
        args.accel
    );
    let server = BenchServer::start(&ServerOptions {
        accel: args.accel.clone(),
        catalog: args.catalog.clone(),
        cache: args.cache.clone(),
        pool_memory_mib: 4096,
        templates: false,
    })
    .map_err(BenchError::Reply)?;

    // Cold boots: no pool.
    server.set_pool(&args.service, 0).await?;
    let mut cold = Vec::new();
    for i in 0..args.cold {
        let sample = server.timed_request(&args.service, true).await?;
        if sample.served != "created" {
            return Err(BenchError::Reply(format!(
                "expected a cold boot, got a {} match",
                sample.served
            )));
        }
        eprintln!(
            "cold boot {}/{}: {:.0} ms",
            i + 1,
            args.cold,
            stats::ms(sample.total)
        );
        cold.push(sample.total);
        server.delete_vm(&sample.vm).await?;
    }

    // Pool hits, in bursts of the pool's size from a full, idle pool.
    let grants = measure::pool_grants(&server, &args.service, args.pool, args.hits).await?;
    let mut hits: Vec<Duration> = grants.iter().map(|g| g.total).collect();
    let mut hit_api: Vec<Duration> = grants.iter().map(|g| g.api).collect();
    let mut hit_endpoint: Vec<Duration> = grants.iter().map(|g| g.total - g.api).collect();
    let mut hit_stages: Vec<(String, Vec<Duration>)> = Vec::new();
    for (name, took) in grants.into_iter().flat_map(|g| g.stages) {
        match hit_stages.iter_mut().find(|(known, _)| *known == name) {
            Some((_, samples)) => samples.push(took),
            None => hit_stages.push((name, vec![took])),
        }
    }

    // The floor: GETs against a VM that has been running for a while.
    let sample = server.timed_request(&args.service, true).await?;
    let endpoint: SocketAddr = sample.endpoint;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut floor = Vec::new();
    for _ in 0..args.hits {
        let started = Instant::now();
        if http_status(endpoint, "/").await.ok() != Some(200) {
            return Err(BenchError::Failed(format!("{endpoint} did not answer")));
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
