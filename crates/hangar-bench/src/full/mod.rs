//! `hangar bench`: hangar's performance table, side by side with libvirt, in one run.
//!
//! It starts its own `hangar server` in a temporary data dir (sharing a guest asset cache)
//! and measures through the public REST API; it runs the same guest (kernel, initramfs,
//! root image, memory, vCPUs, machine type, accelerator) under libvirt with `virsh`, and
//! takes the samples of each pair alternately, so that both see the same machine load.
//! Everything it made (VMs, QEMU processes, libvirt domains, files, daemons it started) is
//! removed when it ends, also when it fails or is interrupted.
//!
//! `hangar bench pool` ([`crate::pool`]) is the older, narrower cold-boot/pool-hit benchmark.

mod archive;
mod setup;
mod templated;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar_vmm::Accel;

use crate::client::BenchError;
use crate::report::Report;
use crate::server::{self, BenchServer, ServerOptions};
use crate::{libvirt, measure, placement, stats};
use archive::archives;
use setup::{libvirt_guest, libvirt_setup};

#[derive(clap::Args)]
pub struct FullBench {
    /// A shorter run (under 5 minutes here): fewer samples, 20 s of sustained grants.
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Directory for bench.md, bench.json, latency.png and the servers' logs.
    #[arg(long, default_value = "hangar-bench")]
    out: PathBuf,
    /// Service to measure (must be in the demo catalog or `--catalog`).
    #[arg(long, default_value = "http-static")]
    service: String,
    /// Accelerator for hangar's VMs and libvirt's domains.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Catalog for the benchmark's server [default: built-in demo].
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Guest asset cache to reuse (kernel, images) [default: the default data dir's cache].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Measure hangar alone (no libvirt set-up).
    #[arg(long)]
    no_libvirt: bool,
    /// One or two samples of everything and seconds instead of minutes: proves that the
    /// benchmark works (tests), its figures mean nothing.
    #[arg(long, hide = true, env = "HANGAR_BENCH_SMOKE", value_parser = clap::builder::FalseyValueParser::new())]
    smoke: bool,
}

/// How many samples and how long, per mode.
#[derive(Debug, Clone)]
struct Plan {
    mode: &'static str,
    cold: usize,
    pool: u32,
    grants: usize,
    wakes: usize,
    archives: usize,
    sustained: Duration,
    shared_clients: usize,
    shared: Duration,
    placement: Duration,
}

impl Plan {
    fn of(args: &FullBench) -> Plan {
        if args.smoke {
            Plan {
                mode: "smoke",
                cold: 1,
                pool: 1,
                grants: 2,
                wakes: 2,
                archives: 1,
                sustained: Duration::from_secs(3),
                shared_clients: 2,
                shared: Duration::from_secs(1),
                placement: Duration::from_millis(200),
            }
        } else if args.quick {
            Plan {
                mode: "quick",
                cold: 3,
                pool: 3,
                grants: 9,
                wakes: 6,
                archives: 3,
                sustained: Duration::from_secs(20),
                shared_clients: 4,
                shared: Duration::from_secs(5),
                placement: Duration::from_secs(1),
            }
        } else {
            Plan {
                mode: "full",
                cold: 10,
                pool: 3,
                grants: 30,
                wakes: 20,
                archives: 10,
                sustained: Duration::from_secs(60),
                shared_clients: 4,
                shared: Duration::from_secs(20),
                placement: Duration::from_secs(3),
            }
        }
    }
}

fn failed(err: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(err.to_string())
}

pub async fn run(args: FullBench) -> Result<(), BenchError> {
    let plan = Plan::of(&args);
    let accel = args
        .accel
        .parse::<Accel>()
        .map_err(BenchError::Usage)?
        .resolve();
    let started = Instant::now();
    let mut report = Report::new(&accel.to_string(), plan.mode, &args.service);
    eprintln!(
        "hangar bench ({}): {} on {}, accel {accel}",
        plan.mode, args.service, report.machine
    );
    // Interrupted, the run's future is dropped: its server, VMs, domains and daemons with it.
    tokio::select! {
        measured = measure_all(&args, &plan, accel, &mut report) => measured?,
        _ = tokio::signal::ctrl_c() => {
            return Err(failed("interrupted; what this run made was removed"));
        }
    }
    report.date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    report.load_average[1] = server::load_average();
    report.seconds = started.elapsed().as_secs_f64();
    report.write(&args.out).map_err(failed)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    } else {
        println!("{}", report.markdown());
        println!(
            "written to {}: bench.md, bench.json, latency.png, server.log, server-templates.log",
            args.out.display()
        );
    }
    Ok(())
}

fn median(values: &mut [u64]) -> Option<f64> {
    values.sort_unstable();
    values.get(values.len() / 2).map(|v| *v as f64)
}

fn mib(kib: Option<f64>) -> Option<f64> {
    kib.map(|k| k / 1024.0)
}

async fn measure_all(
    args: &FullBench,
    plan: &Plan,
    accel: Accel,
    report: &mut Report,
) -> Result<(), BenchError> {
    let service = args.service.as_str();
    // Dropped last: libvirt's daemons outlive the domains.
    let daemons = libvirt_setup(args, report).await;
    let options = ServerOptions {
        accel: accel.to_string(),
        catalog: args.catalog.clone(),
        cache: args.cache.clone(),
        pool_memory_mib: 4096,
        // Cold boots are boots here; the templated rows run on a second server.
        templates: false,
    };
    eprintln!("starting a hangar server for the benchmark (templates off)...");
    let mut server = BenchServer::start(&options).map_err(failed)?;
    server.keep_log_in(&args.out);
    let mut lv = match &daemons {
        Some(_) => Some(
            libvirt::Libvirt::new(libvirt_guest(args, &options, accel).await.map_err(failed)?)
                .await
                .map_err(failed)?,
        ),
        None => None,
    };
    // Where this run's files live (all removed when it ends), for checks that nothing is left.
    report.details.insert(
        "server_data_dir".into(),
        server.data_dir().display().to_string().into(),
    );
    if let Some(lv) = &lv {
        report
            .details
            .insert("libvirt_dir".into(), lv.dir().display().to_string().into());
        report
            .details
            .insert("libvirt_domain_prefix".into(), lv.prefix().into());
    }

    // Cold boots (no pool) against `virsh create`, alternately.
    eprintln!("cold boots...");
    server.set_pool(service, 0).await?;
    let mut cold = Vec::new();
    let mut other_matches: Vec<(String, Duration)> = Vec::new();
    let mut lv_create = Vec::new();
    let mut lv_memory: Vec<(u64, u64)> = Vec::new();
    let mut domain = None;
    for i in 0..plan.cold {
        let sample = server.timed_request(service, true).await?;
        if sample.served == "created" {
            cold.push(sample.total);
        } else {
            other_matches.push((sample.served.clone(), sample.total));
        }
        server.delete_vm(&sample.vm).await?;
        if let Some(lv) = lv.as_mut() {
            let (made, took) = lv.create().await.map_err(failed)?;
            lv_create.push(took);
            // Memory held by a booted, suspended domain: what a pool VM is to hangar.
            lv.suspend(&made).await.map_err(failed)?;
            lv_memory.extend(lv.memory(&made));
            if i + 1 == plan.cold {
                lv.resume(&made).await.map_err(failed)?;
                domain = Some(made);
            } else {
                lv.destroy(made).await.map_err(failed)?;
            }
        }
        eprintln!("  {}/{}", i + 1, plan.cold);
    }

    // Sleep and wake against suspend and resume; then archives against save and restore.
    eprintln!("sleep/wake, archive/wake...");
    let vm = server.timed_request(service, true).await?;
    let (mut wakes, mut lv_resumes, mut lv_resumes_cli) = (Vec::new(), Vec::new(), Vec::new());
    let (mut calls, mut lv_calls, mut lv_calls_cli) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.wakes {
        let call = Instant::now();
        let _: serde_json::Value = server.client.get(&format!("/v1/vms/{}", vm.vm)).await?;
        calls.push(call.elapsed());
        if let (Some(lv), Some(domain)) = (lv.as_ref(), domain.as_ref()) {
            lv_calls.push(lv.domstate_connected(domain).await.map_err(failed)?);
            lv_calls_cli.push(lv.domstate(domain).await.map_err(failed)?);
        }
        server
            .timed_action(&vm.vm, "sleep", &serde_json::json!({}), None)
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (woken, _) = server
            .timed_action(&vm.vm, "wake", &serde_json::json!({}), Some(vm.endpoint))
            .await?;
        wakes.push(woken);
        if let (Some(lv), Some(domain)) = (lv.as_ref(), domain.as_ref()) {
            lv.suspend(domain).await.map_err(failed)?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            lv_resumes.push(lv.resume_connected(domain).await.map_err(failed)?);
            lv.suspend(domain).await.map_err(failed)?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            lv_resumes_cli.push(lv.resume(domain).await.map_err(failed)?);
        }
    }
    let mut archived = archives(
        &server,
        &vm.vm,
        vm.endpoint,
        &["raw", "zstd"],
        &["raw"],
        plan.archives,
        lv.as_ref(),
        domain.as_mut(),
    )
    .await?;
    server.delete_vm(&vm.vm).await?;

    // Control plane: shared-mode requests for an active service (no pool refills meanwhile).
    eprintln!("shared-mode requests for {:?}...", plan.shared);
    let shared =
        measure::shared_throughput(&server, service, plan.shared_clients, plan.shared).await?;
    drop(server); // its log goes to args.out

    // The templated rows, on a server that clones; the libvirt domain stays for its peers.
    eprintln!("starting a hangar server with templates...");
    let mut server = BenchServer::start(&ServerOptions {
        templates: true,
        ..options.clone()
    })
    .map_err(failed)?;
    server.keep_log_as(&args.out.join("server-templates.log"));
    report.details.insert(
        "templates_server_data_dir".into(),
        server.data_dir().display().to_string().into(),
    );
    let mut templated =
        templated::measure(&server, service, plan, lv.as_ref(), domain.as_mut()).await?;
    drop(server);
    if let (Some(lv), Some(domain)) = (lv.as_mut(), domain.take()) {
        lv.destroy(domain).await.map_err(failed)?;
    }
    drop(lv);
    archived.extend(std::mem::take(&mut templated.archived));

    // The table.
    let with_libvirt = daemons.is_some();
    report.latency(
        "cold boot → answering",
        &cold,
        with_libvirt.then_some(("virsh create → answering", lv_create.as_slice())),
        None,
    );
    let mut served: Vec<String> = Vec::new();
    for (kind, _) in &other_matches {
        if !served.contains(kind) {
            served.push(kind.clone());
        }
    }
    for kind in &served {
        let samples: Vec<Duration> = other_matches
            .iter()
            .filter(|(m, _)| m == kind)
            .map(|(_, d)| *d)
            .collect();
        report.latency(
            &format!("request with an empty pool, served as `{kind}` → answering"),
            &samples,
            None,
            None,
        );
    }
    let p50 = |samples: &[Duration]| stats::summary(&mut samples.to_vec()).map(|s| s.p50_ms);
    let faster_than_cold = p50(&cold)
        .zip(p50(&templated.clones))
        .map(|(cold, clone)| format!("{:.1}x faster than hangar's cold boot, p50", cold / clone));
    report.latency(
        "restore from template → answering",
        &templated.clones,
        with_libvirt.then_some(("virsh restore → answering", archived.restores())),
        faster_than_cold,
    );

    let grant_times: Vec<Duration> = templated.grants.iter().map(|g| g.total).collect();
    let libvirt_resume = with_libvirt.then_some((
        "resume over an open connection → answering",
        lv_resumes.as_slice(),
    ));
    report.latency(
        "warm-pool grant → answering (pool of clones)",
        &grant_times,
        libvirt_resume,
        Some("libvirt has no pool: its nearest is resuming a booted, suspended domain".into()),
    );
    let mut stages = serde_json::Map::new();
    for (name, took) in templated.grants.iter().flat_map(|g| g.stages.iter()) {
        let entry = stages
            .entry(name.clone())
            .or_insert_with(|| serde_json::json!([]));
        if let Some(list) = entry.as_array_mut() {
            list.push(serde_json::json!(stats::ms(*took)));
        }
    }
    report
        .details
        .insert("pool_grant_server_stages_ms".into(), stages.into());
    report.latency(
        "wake from sleeping → answering",
        &wakes,
        libvirt_resume,
        None,
    );
    archived.report(report, with_libvirt);
    if with_libvirt {
        report.latency(
            "libvirt alone: `virsh resume` (a virsh process per call) → answering",
            &[],
            Some(("virsh resume → answering", lv_resumes_cli.as_slice())),
            None,
        );
    }
    report.latency(
        "one control call (GET /v1/vms/ID)",
        &calls,
        with_libvirt.then_some(("domstate over an open connection", lv_calls.as_slice())),
        Some("the floor of each side's control path".into()),
    );
    if with_libvirt {
        report.latency(
            "libvirt alone: `virsh domstate` (a virsh process per call)",
            &[],
            Some(("virsh domstate", lv_calls_cli.as_slice())),
            None,
        );
    }

    memory_rows(report, &templated, &lv_memory, with_libvirt);

    let sustained = &templated.sustained;
    report.figure(
        &format!(
            "sustained dedicated grants per second, pool of {} refilling by clones, {:.0} s",
            sustained.pool, sustained.seconds
        ),
        "/s",
        Some(sustained.per_s),
        None,
        Some(format!(
            "{} grants, {} from the pool, {} cloned and {} booted for the request; p50 {:.0} ms",
            sustained.grants,
            sustained.from_pool,
            sustained.cloned,
            sustained.grants - sustained.from_pool - sustained.cloned,
            stats::summary(&mut sustained.latencies.clone()).map_or(f64::NAN, |s| s.p50_ms)
        )),
    );
    report.details.insert(
        "sustained".into(),
        serde_json::to_value(sustained).expect("serializable"),
    );

    let shared_latency = stats::summary(&mut shared.latencies.clone());
    report.figure(
        &format!(
            "shared-mode requests per second for an active service, {} clients",
            shared.clients
        ),
        "/s",
        Some(shared.per_s),
        None,
        shared_latency.map(|s| format!("p50 {:.2} ms, p99 {:.2} ms", s.p50_ms, s.p99_ms)),
    );
    report.details.insert(
        "shared".into(),
        serde_json::to_value(&shared).expect("serializable"),
    );

    // Placement, pure CPU.
    eprintln!("placement decisions...");
    let duration = plan.placement;
    let placed = tokio::task::spawn_blocking(move || placement::run(1000, duration))
        .await
        .map_err(failed)?;
    report.figure(
        "placement decisions per second, 1,000 simulated hosts",
        "/s",
        Some(placed.per_s),
        None,
        Some(format!("mean {:.2} µs per decision", placed.mean_us)),
    );
    report.details.insert(
        "placement".into(),
        serde_json::to_value(&placed).expect("serializable"),
    );
    drop(daemons);
    Ok(())
}

/// Memory per paused VM: a full pool's VMs (clones) and sleeping clones, against booted,
/// suspended libvirt domains; and how many paused VMs a GiB of host memory holds (by PSS).
fn memory_rows(
    report: &mut Report,
    templated: &templated::Templated,
    lv_memory: &[(u64, u64)],
    with_libvirt: bool,
) {
    let mut lv_rss: Vec<u64> = lv_memory.iter().map(|(r, _)| *r).collect();
    let mut lv_pss: Vec<u64> = lv_memory.iter().map(|(_, p)| *p).collect();
    let op = |what: &str| format!("{what} of a booted, suspended domain (n={})", lv_rss.len());
    let (rss_op, pss_op) = (op("RSS"), op("PSS"));
    let lv_rss_mib = mib(median(&mut lv_rss));
    let lv_pss_mib = mib(median(&mut lv_pss));
    let peer = |op: &str, v: Option<f64>| with_libvirt.then(|| (op.to_owned(), v));
    let mut pool_pss = None;
    for (what, memory) in [
        ("paused pool VM (a clone)", &templated.pool_memory),
        ("sleeping clone", &templated.clone_memory),
    ] {
        let mut rss: Vec<u64> = memory.iter().map(|(r, _)| *r).collect();
        let mut pss: Vec<u64> = memory.iter().map(|(_, p)| *p).collect();
        for (kind, values, lv) in [
            ("RSS", &mut rss, peer(&rss_op, lv_rss_mib)),
            ("PSS", &mut pss, peer(&pss_op, lv_pss_mib)),
        ] {
            let value = mib(median(values));
            if kind == "PSS" && pool_pss.is_none() {
                pool_pss = value;
            }
            report.figure(
                &format!(
                    "host memory per {what}, {kind}, median (n={})",
                    values.len()
                ),
                "MiB",
                value,
                lv.as_ref().map(|(op, v)| (op.as_str(), *v)),
                None,
            );
        }
    }
    let per_gib = |pss_mib: Option<f64>| pss_mib.filter(|m| *m > 0.0).map(|m| 1024.0 / m);
    report.figure_more_is_better(
        "paused pool VMs per GiB of host memory (by PSS)",
        "/GiB",
        per_gib(pool_pss),
        with_libvirt.then_some((
            "booted, suspended domains per GiB (by PSS)",
            per_gib(lv_pss_mib),
        )),
    );
}
