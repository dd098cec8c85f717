//! `hangar bench lifecycle`: for one service (`http-counter`, 256 MiB), how fast a VM comes
//! back from each resting state — sleeping, and archived raw, zstd and delta — measured as a
//! client sees it (connect to the stable endpoint, `GET /`, first byte of the answer; the
//! connection itself wakes the VM), against a cold boot and a restore from the service's
//! template; with each archive's size. Medians and ratios to the cold boot, from one run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar_api::{GrantView, Served, VmView};
use serde::Serialize;
use serde::de::IgnoredAny;

use crate::client::{BenchError, Client};
use crate::endpoints::first_byte;
use crate::server::{BenchServer, ServerOptions, machine, parse_server_timing};
use crate::stats::{Summary, summary_or_zero as summary};

#[derive(clap::Args)]
pub struct LifecycleBench {
    /// Service to measure (its VMs must answer `GET /`).
    #[arg(long, default_value = "http-counter")]
    service: String,
    /// Samples of each measurement (cold boots: at most 3).
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// Accelerator for the benchmark's servers.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Guest asset cache to reuse [default: the default data dir's cache].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    metric: &'static str,
    #[serde(flatten)]
    latency: Summary,
    /// Cold boot p50 over this p50.
    faster_than_cold: f64,
    /// The archive's size, for archive tiers.
    archive_bytes: Option<u64>,
}

/// Where one kind of wake spends its time: `POST /v1/vms/ID/wake` (the server's stages,
/// from its `Server-Timing` header), then the first `GET /` to the woken VM.
#[derive(Serialize)]
struct Breakdown {
    metric: &'static str,
    n: usize,
    /// Stage → median ms: `resume` or `restore`, `identity`, `ready` (restores only),
    /// `total` (the whole wake, server side).
    server_ms: std::collections::BTreeMap<String, f64>,
    /// The first `GET /` once the wake answered, median ms.
    first_get_ms: f64,
}

#[derive(Serialize)]
struct Report {
    service: String,
    memory_mib: u64,
    accel: String,
    machine: String,
    rows: Vec<Row>,
    /// Where each wake's time goes.
    breakdown: Vec<Breakdown>,
    /// Delta archive size over zstd archive size.
    delta_over_zstd: Option<f64>,
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Puts the VM to rest: asleep (`tier` None) or archived in `tier`. Returns the archive's
/// size.
async fn rest(client: &Client, vm: &str, tier: Option<&str>) -> Result<Option<u64>, BenchError> {
    let view: VmView = match tier {
        None => {
            client
                .post(&format!("/v1/vms/{vm}/sleep"), &serde_json::json!({}))
                .await?
        }
        Some(tier) => {
            client
                .post(
                    &format!("/v1/vms/{vm}/archive"),
                    &serde_json::json!({ "tier": tier }),
                )
                .await?
        }
    };
    let archived_as = view.archive.as_ref().map(|a| a.tier.as_str());
    if let Some(tier) = tier
        && archived_as != Some(tier)
    {
        return Err(reply(format!("archived as {archived_as:?}, not {tier}")));
    }
    // Let the server finish with the VM before anything asks for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(view.archive.map(|a| a.size_bytes))
}

fn reply(err: impl std::fmt::Display) -> BenchError {
    BenchError::Reply(err.to_string())
}

/// Request → the endpoint's first byte; the grant.
async fn timed_grant(client: &Client, service: &str) -> Result<(Duration, GrantView), BenchError> {
    let started = Instant::now();
    let grant: GrantView = client
        .post(
            "/v1/requests",
            &serde_json::json!({ "service": service, "mode": "dedicated" }),
        )
        .await?;
    let endpoint = endpoint_of(&grant)?;
    first_byte(endpoint, "/").map_err(reply)?;
    Ok((started.elapsed(), grant))
}

fn endpoint_of(grant: &GrantView) -> Result<SocketAddr, BenchError> {
    grant
        .endpoint
        .parse()
        .map_err(|_| reply(format!("no endpoint in {grant:?}")))
}

pub async fn run(args: LifecycleBench) -> Result<(), BenchError> {
    if args.samples == 0 {
        return Err(BenchError::Usage("--samples must be at least 1".into()));
    }
    let options =
        |templates| ServerOptions::without_pools(&args.accel, args.cache.clone(), templates);

    // Cold boots, on a server that boots every VM.
    eprintln!("cold boots (templates off)...");
    let server = BenchServer::start(&options(false)).map_err(BenchError::Reply)?;
    let client = server.api_client();
    let mut cold = Vec::new();
    let mut memory_mib = 0;
    for i in 0..args.samples.min(3) {
        let (took, grant) = timed_grant(&client, &args.service).await?;
        if grant.served != Served::Created {
            return Err(reply(format!("expected a boot, got {:?}", grant.served)));
        }
        memory_mib = u64::from(grant.memory_mib);
        eprintln!("  cold boot {}: {:.0} ms", i + 1, took.as_secs_f64() * 1e3);
        cold.push(took);
        let _: IgnoredAny = client.delete(&format!("/v1/vms/{}", grant.vm)).await?;
    }
    drop(server);

    // Everything else on a server with templates.
    eprintln!("restores from the template (templates on)...");
    let server = BenchServer::start(&options(true)).map_err(BenchError::Reply)?;
    let client = server.api_client();
    let (_, first) = timed_grant(&client, &args.service).await?;
    server.wait_template(&args.service).await?;
    let _: IgnoredAny = client.delete(&format!("/v1/vms/{}", first.vm)).await?;
    let mut cloned = Vec::new();
    let mut vm = String::new();
    let mut endpoint = None;
    for i in 0..args.samples {
        let (took, grant) = timed_grant(&client, &args.service).await?;
        if grant.served != Served::Cloned {
            return Err(reply(format!("expected a clone, got {:?}", grant.served)));
        }
        eprintln!("  clone {}: {:.0} ms", i + 1, took.as_secs_f64() * 1e3);
        cloned.push(took);
        if i + 1 < args.samples {
            let _: IgnoredAny = client.delete(&format!("/v1/vms/{}", grant.vm)).await?;
        } else {
            endpoint = Some(endpoint_of(&grant)?);
            vm = grant.vm;
        }
    }
    let endpoint = endpoint.expect("at least one sample");

    // The floor of every wake below: the same GET to the VM while it is active.
    let mut active = Vec::new();
    for _ in 0..args.samples {
        active.push(first_byte(endpoint, "/").map_err(reply)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One clone goes to rest and is woken by a connection, again and again; then a few
    // times through the API, for where a wake's time goes.
    let mut rests: Vec<(&'static str, Vec<Duration>, Option<u64>)> = Vec::new();
    let mut breakdown = Vec::new();
    for (name, tier) in [
        ("wake from sleeping", None),
        ("wake from raw archive", Some("raw")),
        ("wake from zstd archive", Some("zstd")),
        ("wake from delta archive", Some("delta")),
    ] {
        eprintln!("{name}...");
        let mut samples = Vec::new();
        let mut size = None;
        for _ in 0..args.samples {
            size = rest(&client, &vm, tier).await?;
            samples.push(first_byte(endpoint, "/").map_err(reply)?);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        rests.push((name, samples, size));
        let mut stages: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
        let mut first_gets = Vec::new();
        let rounds = args.samples.min(3);
        for _ in 0..rounds {
            rest(&client, &vm, tier).await?;
            let (_, timing): (serde_json::Value, String) = client
                .post_timed(&format!("/v1/vms/{vm}/wake"), &serde_json::json!({}))
                .await?;
            first_gets.push(first_byte(endpoint, "/").map_err(reply)?);
            for (stage, took) in parse_server_timing(&timing) {
                stages.entry(stage).or_default().push(took);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        breakdown.push(Breakdown {
            metric: name,
            n: rounds,
            server_ms: stages
                .into_iter()
                .map(|(stage, mut took)| (stage, median_ms(&mut took)))
                .collect(),
            first_get_ms: median_ms(&mut first_gets),
        });
    }
    let _: serde_json::Value = client.delete(&format!("/v1/vms/{vm}")).await?;
    drop(server);

    let cold = summary(&mut cold);
    let row = |metric, mut samples: Vec<Duration>, archive_bytes| {
        let latency = summary(&mut samples);
        Row {
            metric,
            faster_than_cold: cold.p50_ms / latency.p50_ms,
            latency,
            archive_bytes,
        }
    };
    let mut rows = vec![
        row("restore from template (new VM)", cloned, None),
        row("GET / to the active VM (no wake)", active, None),
    ];
    for (name, samples, size) in rests {
        rows.push(row(name, samples, size));
    }
    let size_of = |metric: &str| rows.iter().find(|r| r.metric == metric)?.archive_bytes;
    let delta_over_zstd = size_of("wake from delta archive")
        .zip(size_of("wake from zstd archive"))
        .map(|(delta, zstd)| delta as f64 / zstd as f64);
    rows.insert(
        0,
        Row {
            metric: "cold boot (new VM)",
            faster_than_cold: 1.0,
            latency: cold,
            archive_bytes: None,
        },
    );
    let report = Report {
        service: args.service.clone(),
        memory_mib,
        accel: args.accel.clone(),
        machine: machine(),
        rows,
        breakdown,
        delta_over_zstd,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
        return Ok(());
    }
    println!(
        "hangar bench lifecycle: {} ({} MiB) on {} (accel {})",
        report.service, report.memory_mib, report.machine, report.accel
    );
    println!("connect to the endpoint → first byte of the answer to GET /\n");
    println!("| metric | n | p50 ms | p99 ms | min ms | max ms | cold / this | archive |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        let s = &r.latency;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}x | {} |",
            r.metric,
            s.n,
            s.p50_ms,
            s.p99_ms,
            s.min_ms,
            s.max_ms,
            r.faster_than_cold,
            r.archive_bytes
                .map_or(String::new(), |b| format!("{:.2} MB", b as f64 / 1e6))
        );
    }
    println!(
        "\nwhere a wake goes (POST /v1/vms/ID/wake: the server's stages; then the first GET /), \
         p50 ms\n"
    );
    println!("| wake | n | resume or restore | identity | ready | server total | first GET / |");
    println!("|---|---|---|---|---|---|---|");
    for b in &report.breakdown {
        let stage = |name: &str| {
            b.server_ms
                .get(name)
                .map_or("-".to_owned(), |ms| format!("{ms:.1}"))
        };
        let resumed = b.server_ms.get("resume").or(b.server_ms.get("restore"));
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} |",
            b.metric,
            b.n,
            resumed.map_or("-".to_owned(), |ms| format!("{ms:.1}")),
            stage("identity"),
            stage("ready"),
            stage("total"),
            b.first_get_ms
        );
    }
    if let Some(ratio) = report.delta_over_zstd {
        println!("\ndelta archive / zstd archive: {:.1}%", ratio * 100.0);
    }
    Ok(())
}
