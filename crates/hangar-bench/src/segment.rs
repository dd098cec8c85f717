//! `hangar bench segment`: two `http-counter` VMs (busybox) on this machine, talking over
//! their private segment against over user-mode networking (guest A → host loopback
//! through `10.0.2.2` → the host port forwarded to guest B's web server). Measured from
//! inside guest A with busybox: throughput is one `wget` of a file of `--mib` MiB from B
//! (the median of `--runs`), latency the time of each of `--requests` `wget`s of a small
//! page, one after another (median and p95; each includes starting `wget` in the guest,
//! the same on both paths). Times come from busybox `ts -i` (microseconds).
//!
//! No server: the VMs are made on a [`LocalHost`] of this machine's QEMU in a temporary
//! directory, and joined to a segment with [`Host::join_segment`] directly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::Catalog;
use hangar_host::images::{DEFAULT_MIRROR, LocalImages};
use hangar_host::{Host, LocalHost, LocalHostConfig, Purpose, SegmentJoin, VmPlan};
use hangar_vmm::Accel;
use hangar_vmm::qemu::{QemuBackend, QemuConfig};
use serde::Serialize;

use crate::client::BenchError;

#[derive(clap::Args)]
pub struct SegmentBench {
    /// Size of the file transferred for throughput, in MiB.
    #[arg(long, default_value_t = 8)]
    pub mib: u32,
    /// Transfers per path; the figure is their median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Small requests per path for latency.
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Image cache (kernel, initramfs, busybox image), kept between runs.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Accelerator: tcg, kvm or auto.
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    /// The segment's switching, as `hangar server --segment-net`: auto (kernel bridges as
    /// root), bridge or switch.
    #[arg(long, default_value = "auto")]
    pub segment_net: hangar_vmm::tap::SegmentNet,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PathRun {
    pub path: &'static str,
    /// Bytes per second of each transfer, in order.
    pub transfers_bytes_per_s: Vec<f64>,
    pub throughput_bytes_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub requests: usize,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentRun {
    /// How the segment was switched: `bridge` (taps on a kernel bridge) or `switch`
    /// (hangar's own).
    pub switching: &'static str,
    pub file_bytes: u64,
    pub segment: PathRun,
    pub user_mode: PathRun,
    /// segment / user-mode throughput (above 1: the segment is faster).
    pub throughput_ratio: f64,
    /// segment / user-mode median latency (below 1: the segment is faster).
    pub latency_ratio: f64,
    /// Frames and bytes the segment's switch forwarded and dropped (a bridge's: what its
    /// taps handed to the guests).
    pub switch: hangar_host::segment::SegmentStats,
}

fn failed(what: &str) -> impl Fn(hangar_host::HostError) -> BenchError + '_ {
    move |err| BenchError::Failed(format!("{what}: {}", hangar_host::local::error_chain(&err)))
}

pub async fn run(args: SegmentBench) -> Result<(), BenchError> {
    let run = figures(&args).await?;
    crate::report::print_json_or(&run, args.json, print_table);
    Ok(())
}

/// Makes the two VMs (in a temporary directory, destroyed after), measures both paths as
/// `args` say and answers the figures.
pub async fn figures(args: &SegmentBench) -> Result<SegmentRun, BenchError> {
    if args.runs == 0 || args.requests == 0 || args.mib == 0 {
        return Err(BenchError::Usage(
            "--runs, --requests and --mib must be at least 1".into(),
        ));
    }
    let accel: Accel = args
        .accel
        .parse()
        .map_err(|err| BenchError::Usage(format!("--accel: {err}")))?;
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("hangar-bench-cache"));
    let tmp = tempfile::Builder::new()
        .prefix("hseg")
        .tempdir_in("/tmp")
        .map_err(|err| BenchError::Failed(format!("temporary directory: {err}")))?;
    let vms_dir = tmp.path().join("vms");
    let mut qemu = QemuConfig::new(vms_dir.clone(), accel);
    qemu.segment_netns = args
        .segment_net
        .resolve(tmp.path())
        .map_err(|err| BenchError::Usage(format!("--segment-net: {err}")))?;
    let switching = if qemu.segment_netns.is_some() {
        "bridge"
    } else {
        "switch"
    };
    let host = Arc::new(LocalHost::new(
        Arc::new(QemuBackend::new(qemu)),
        Arc::new(LocalImages::new(
            cache,
            hangar_image::AssetSources::default(),
            Arc::new(Catalog::demo()),
            DEFAULT_MIRROR.into(),
        )),
        LocalHostConfig {
            name: "bench".into(),
            guest_cmdline: hangar_image::kernel_cmdline(hangar_image::host_tsc_khz()),
            vms_dir: Some(vms_dir),
            ..LocalHostConfig::default()
        },
    ));
    let measured = measure(&host, args).await;
    for id in ["bench-a", "bench-b"] {
        let _ = host.destroy(id).await;
    }
    crate::server::remove_segment_netns(tmp.path());
    measured.map(|run| SegmentRun { switching, ..run })
}

async fn measure(host: &LocalHost, args: &SegmentBench) -> Result<SegmentRun, BenchError> {
    let service = Catalog::demo()
        .get("http-counter")
        .cloned()
        .ok_or_else(|| BenchError::Failed("no http-counter in the demo catalog".into()))?;
    let mut endpoints = Vec::new();
    for id in ["bench-a", "bench-b"] {
        let mut plan = VmPlan::for_service(id, &service, Purpose::Request);
        // User-mode networking as it is without an egress policy: A reaches the host's
        // loopback (B's forwarded port) through slirp's gateway.
        plan.egress = hangar_core::EgressPolicy::Open;
        let silent: hangar_host::ProgressFn = Arc::new(|_: &str, _: u8| {});
        let prepared = host
            .prepare_vm(&plan, silent.clone())
            .await
            .map_err(failed("preparing a VM"))?;
        host.make_vm(&plan, &prepared, silent)
            .await
            .map_err(failed("making a VM"))?;
        endpoints.push(prepared.direct_endpoints["http"].clone());
    }
    for (id, last, address, peer, peer_ip) in [
        ("bench-a", 0x0a, "10.213.0.11/24", "bench-b", "10.213.0.12"),
        ("bench-b", 0x0b, "10.213.0.12/24", "bench-a", "10.213.0.11"),
    ] {
        let join = SegmentJoin {
            segment: "bench".into(),
            mac: format!("02:68:00:00:00:{last:02x}"),
            address: address.into(),
            hosts: vec![(peer.into(), peer_ip.into())],
            files: Vec::new(),
            restart: Vec::new(),
            reload: Vec::new(),
        };
        host.join_segment(id, &join)
            .await
            .map_err(failed("joining the segment"))?;
    }
    let file_bytes = u64::from(args.mib) << 20;
    sh(
        host,
        "bench-b",
        &format!(
            "dd if=/dev/zero of=/www/big.bin bs=65536 count={} 2>/dev/null",
            args.mib * 16
        ),
    )
    .await?;
    // Guest A reaches B's forwarded port through slirp's gateway, which is the host.
    let port = endpoints[1]
        .rsplit_once(':')
        .map(|(_, port)| port.to_owned())
        .unwrap_or_default();
    let segment = path_run(host, args, "segment", "http://10.213.0.12", file_bytes).await?;
    let user_mode = path_run(
        host,
        args,
        "user-mode",
        &format!("http://10.0.2.2:{port}"),
        file_bytes,
    )
    .await?;
    let switch = host
        .segment_stats()
        .into_iter()
        .find(|(name, _)| name == "bench")
        .map(|(_, stats)| stats)
        .unwrap_or_default();
    Ok(SegmentRun {
        switching: "switch",
        file_bytes,
        throughput_ratio: segment.throughput_bytes_per_s / user_mode.throughput_bytes_per_s,
        latency_ratio: segment.latency_p50_ms / user_mode.latency_p50_ms,
        segment,
        user_mode,
        switch,
    })
}

/// Runs a shell script in a guest; its stdout, or an error with its output.
async fn sh(host: &LocalHost, id: &str, script: &str) -> Result<String, BenchError> {
    let reply = host
        .guest_exec(id, &["sh", "-c", script], Duration::from_secs(600))
        .await
        .map_err(failed("running a command in a guest"))?;
    if reply.code != Some(0) {
        return Err(BenchError::Failed(format!(
            "in {id}: {script}: exit {:?}: {}{}",
            reply.code, reply.stdout, reply.stderr
        )));
    }
    Ok(reply.stdout)
}

/// The seconds `ts -i '%.s'` put before each line.
fn deltas(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect()
}

async fn path_run(
    host: &LocalHost,
    args: &SegmentBench,
    path: &'static str,
    base: &str,
    file_bytes: u64,
) -> Result<PathRun, BenchError> {
    // Warm up (ARP, the translation cache of the guest's wget and httpd).
    sh(host, "bench-a", &format!("wget -q -O- {base}/health.txt")).await?;
    let mut transfers = Vec::new();
    for _ in 0..args.runs {
        let out = sh(
            host,
            "bench-a",
            &format!(
                "{{ echo start; wget -q -O /dev/null {base}/big.bin; echo done; }} | ts -i '%.s'"
            ),
        )
        .await?;
        let seconds = deltas(&out).get(1).copied().unwrap_or(0.0);
        transfers.push(file_bytes as f64 / seconds.max(1e-6));
    }
    let out = sh(
        host,
        "bench-a",
        &format!(
            "for i in $(seq {}); do wget -q -O- {base}/health.txt; done | ts -i '%.s'",
            args.requests
        ),
    )
    .await?;
    let mut latencies = deltas(&out);
    if latencies.len() != args.requests {
        return Err(BenchError::Failed(format!(
            "{path}: {} of {} requests answered",
            latencies.len(),
            args.requests
        )));
    }
    latencies.sort_by(f64::total_cmp);
    let mut sorted = transfers.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |v: &[f64], q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Ok(PathRun {
        path,
        throughput_bytes_per_s: at(&sorted, 0.5),
        transfers_bytes_per_s: transfers,
        latency_p50_ms: at(&latencies, 0.5) * 1000.0,
        latency_p95_ms: at(&latencies, 0.95) * 1000.0,
        requests: args.requests,
    })
}

fn print_table(run: &SegmentRun) {
    println!(
        "two http-counter VMs, guest A → guest B ({} MiB file, {} requests); segment on {}",
        run.file_bytes >> 20,
        run.segment.requests,
        if run.switching == "bridge" {
            "a kernel bridge"
        } else {
            "hangar's switch"
        }
    );
    println!(
        "{:<12} {:>16} {:>14} {:>14}",
        "path", "throughput MiB/s", "latency p50", "latency p95"
    );
    for p in [&run.segment, &run.user_mode] {
        println!(
            "{:<12} {:>16.2} {:>11.2} ms {:>11.2} ms",
            p.path,
            p.throughput_bytes_per_s / (1u64 << 20) as f64,
            p.latency_p50_ms,
            p.latency_p95_ms
        );
    }
    println!(
        "segment / user-mode: throughput ×{:.2}, median latency ×{:.2}",
        run.throughput_ratio, run.latency_ratio
    );
    println!(
        "{}: {} frames ({} bytes) forwarded, {} dropped",
        run.switching,
        run.switch.frames_forwarded,
        run.switch.bytes_forwarded,
        run.switch.frames_dropped
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ts_deltas() {
        assert_eq!(
            deltas("0.001654 start\n0.105759 done\n"),
            [0.001654, 0.105759]
        );
        assert_eq!(deltas("0.5 ok\n\n0.25 ok\n"), [0.5, 0.25]);
    }
}
