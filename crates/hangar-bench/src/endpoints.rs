//! `hangar bench endpoints`: what a stable endpoint costs against a direct connection.
//!
//! Two measurements, each alternating direct and forwarded requests so that drift on a
//! shared machine falls on both alike:
//! - **loopback**: a `hangar forwarder` process in front of a plain HTTP server in this
//!   process: the forwarder's own cost, nothing else in the way;
//! - **guest**: a real VM of a small busybox httpd service, its stable endpoint against its
//!   direct port forward (QEMU user-mode networking).
//!
//! Plus the control round trip that sets a mapping (as on the grant path), and the
//! connection → first byte time through the endpoint of a sleeping and of an archived VM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar_api::GrantView;
use hangar_forward::{EndpointSpec, Reply, Request};
use serde::Serialize;

use crate::client::BenchError;
use crate::server::{BenchServer, ServerOptions, machine};
use crate::stats::{Summary, summary_or_zero as summary};

#[derive(clap::Args)]
pub struct EndpointsBench {
    /// Small requests per path (direct, forwarded) against the loopback server.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Small requests per path against the guest.
    #[arg(long, default_value_t = 100)]
    vm_requests: usize,
    /// MiB per large transfer against the loopback server.
    #[arg(long, default_value_t = 1024)]
    loopback_mib: u64,
    /// MiB per large transfer from the guest.
    #[arg(long, default_value_t = 64)]
    vm_mib: u64,
    /// Large transfers per path.
    #[arg(long, default_value_t = 3)]
    transfers: usize,
    /// Wakes measured from sleeping and from a zstd archive each.
    #[arg(long, default_value_t = 5)]
    wakes: usize,
    /// Accelerator for the benchmark's server.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Guest asset cache to reuse (kernel, images) [default: the default data dir's cache].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The benchmark's guest: busybox httpd with a small file and a CGI that streams zeros.
const CATALOG: &str = r#"
[os.busybox]
version = "1.35"
description = "busybox-static userland"

[service.bench-http]
description = "busybox httpd: a small file and a large generated answer"
os = "busybox"
vcpus = 1
memory_mib = 256

[[service.bench-http.port]]
name = "http"
guest = 80

[[service.bench-http.process]]
name = "httpd"
argv = ["httpd", "-f", "-p", "80", "-h", "/www"]

[service.bench-http.files."/www/small.txt"]
content = "ok\n"

# GET /cgi-bin/big?N answers N blocks of 64 KiB.
[service.bench-http.files."/www/cgi-bin/big"]
mode = 0o755
content = """
#!/bin/sh
printf 'Content-Type: application/octet-stream\\r\\n\\r\\n'
exec dd if=/dev/zero bs=65536 count=${QUERY_STRING:-16} 2>/dev/null
"""

[service.bench-http.ready]
checks = [{ http = { port = "http", path = "/small.txt", status = 200 } }]
"#;

#[derive(Serialize)]
struct PathPair {
    direct: Summary,
    forwarded: Summary,
    /// Forwarded minus direct, of the medians.
    overhead_p50_ms: f64,
    direct_mb_s: f64,
    forwarded_mb_s: f64,
    transfer_mib: u64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    accel: String,
    /// Connect + `GET` + whole answer of a few bytes; and a large transfer.
    loopback: PathPair,
    guest: PathPair,
    /// One `SetActive` round trip on the forwarder's control socket.
    control_round_trip: Summary,
    /// Connection to the endpoint of a sleeping VM → first byte of the answer.
    wake_from_sleeping: Summary,
    /// The same for a VM archived with zstd.
    wake_from_archived_zstd: Summary,
    /// Without the endpoint: `POST /v1/vms/{id}/wake`, then a GET to the direct port
    /// forward → first byte; from sleeping and from a zstd archive.
    api_wake_from_sleeping: Summary,
    api_wake_from_archived_zstd: Summary,
}

/// Wake latencies, each through the endpoint and through the API + direct port forward.
struct Wakes {
    sleeping: Summary,
    archived: Summary,
    api_sleeping: Summary,
    api_archived: Summary,
}

/// Connect, `GET path`, read the whole answer: (time to the last byte, bytes).
fn timed_get(addr: SocketAddr, path: &str) -> std::io::Result<(Duration, u64)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((started.elapsed(), total))
}

/// Connect, `GET path`: the time to the first byte of the answer.
pub(crate) fn first_byte(addr: SocketAddr, path: &str) -> std::io::Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut one = [0u8; 1];
    stream.read_exact(&mut one)?;
    let took = started.elapsed();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok(took)
}

/// A plain HTTP server on loopback, a thread per connection: `/big` answers `big` bytes,
/// anything else three.
fn loopback_server(big: u64) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_loopback(stream, big));
        }
    });
    Ok(addr)
}

fn serve_loopback(mut stream: TcpStream, big: u64) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    if request.starts_with(b"GET /big") {
        write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {big}\r\n\r\n")?;
        let block = vec![0u8; 256 * 1024];
        let mut left = big;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            stream.write_all(&block[..n])?;
            left -= n as u64;
        }
    } else {
        stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")?;
    }
    Ok(())
}

/// Small requests alternating between the two addresses, then large transfers likewise.
fn compare(
    direct: SocketAddr,
    forwarded: SocketAddr,
    small: &str,
    big: &str,
    requests: usize,
    transfers: usize,
    transfer_mib: u64,
) -> Result<PathPair, BenchError> {
    let fail = |what: &str, err: std::io::Error| BenchError::Reply(format!("{what}: {err}"));
    let (mut d, mut f) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        d.push(
            timed_get(direct, small)
                .map_err(|e| fail("direct GET", e))?
                .0,
        );
        f.push(
            timed_get(forwarded, small)
                .map_err(|e| fail("forwarded GET", e))?
                .0,
        );
    }
    let (mut d_rate, mut f_rate) = (Vec::new(), Vec::new());
    for _ in 0..transfers {
        for (addr, rates, what) in [
            (direct, &mut d_rate, "direct transfer"),
            (forwarded, &mut f_rate, "forwarded transfer"),
        ] {
            let (took, bytes) = timed_get(addr, big).map_err(|e| fail(what, e))?;
            if bytes < transfer_mib << 20 {
                return Err(BenchError::Reply(format!(
                    "{what}: {bytes} bytes, expected {transfer_mib} MiB"
                )));
            }
            rates.push(bytes as f64 / 1e6 / took.as_secs_f64());
        }
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let direct = summary(&mut d);
    let forwarded = summary(&mut f);
    Ok(PathPair {
        overhead_p50_ms: forwarded.p50_ms - direct.p50_ms,
        direct,
        forwarded,
        direct_mb_s: median(&mut d_rate),
        forwarded_mb_s: median(&mut f_rate),
        transfer_mib,
    })
}

/// The forwarder's own cost: a forwarder process in front of a loopback server.
async fn loopback(args: &EndpointsBench) -> Result<(PathPair, Summary), BenchError> {
    let err = |e: String| BenchError::Reply(e);
    let dir = tempfile::Builder::new()
        .prefix("hgfwd")
        .tempdir_in("/tmp")
        .map_err(|e| err(e.to_string()))?;
    let exe = crate::hangar::hangar_exe().map_err(err)?;
    let (control, _) = hangar_forward::connect_or_start(
        dir.path(),
        &[exe.into_os_string(), "forwarder".into()],
        "http://127.0.0.1:1",
    )
    .await
    .map_err(|e| err(format!("forwarder: {e}")))?;
    let result = async {
        let target = loopback_server(args.loopback_mib << 20).map_err(|e| err(e.to_string()))?;
        let spec = EndpointSpec {
            vm: "bench".into(),
            name: "http".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            target,
            active: true,
            wake: hangar_core::WakeOn::OnData,
        };
        let Ok(Reply::Port { port }) = control.call(&Request::Open(spec)).await else {
            return Err(err("the forwarder did not open the endpoint".into()));
        };
        let forwarded = SocketAddr::from(([127, 0, 0, 1], port));
        let pair = compare(
            target,
            forwarded,
            "/small",
            "/big",
            args.requests,
            args.transfers,
            args.loopback_mib,
        )?;
        // The grant path's cost of telling the forwarder something: one round trip.
        let mut rounds = Vec::new();
        for i in 0..1000 {
            let request = Request::SetActive {
                vm: "bench".into(),
                active: i % 2 == 1,
            };
            let started = Instant::now();
            control
                .call(&request)
                .await
                .map_err(|e| err(format!("control: {e}")))?;
            rounds.push(started.elapsed());
        }
        Ok((pair, summary(&mut rounds)))
    }
    .await;
    let _ = control.call(&Request::Shutdown).await;
    result
}

/// The guest: a real VM, its stable endpoint against its direct port forward; then wakes.
async fn guest(args: &EndpointsBench) -> Result<(PathPair, Wakes), BenchError> {
    let dir = tempfile::tempdir().map_err(|e| BenchError::Reply(e.to_string()))?;
    let catalog = dir.path().join("bench.toml");
    std::fs::write(&catalog, CATALOG).map_err(|e| BenchError::Reply(e.to_string()))?;
    eprintln!(
        "starting a server for the guest part (accel {})...",
        args.accel
    );
    let server = BenchServer::start(&ServerOptions {
        accel: args.accel.clone(),
        catalog: Some(catalog.clone()),
        cache: args.cache.clone(),
        pool_memory_mib: 0,
        templates: false,
    })
    .map_err(BenchError::Reply)?;
    let client = server.api_client();
    let grant: GrantView = client
        .post(
            "/v1/requests",
            &serde_json::json!({ "service": "bench-http", "mode": "dedicated" }),
        )
        .await?;
    let addr = |key: &str, addr: &str| -> Result<SocketAddr, BenchError> {
        addr.parse()
            .map_err(|_| BenchError::Reply(format!("no {key} in {grant:?}")))
    };
    let (endpoint, direct) = (
        addr("endpoint", &grant.endpoint)?,
        addr("direct_endpoint", &grant.direct_endpoint)?,
    );
    let vm = grant.vm.clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "guest {vm}: {} small requests per path...",
        args.vm_requests
    );
    let big = format!("/cgi-bin/big?{}", args.vm_mib * 16);
    let pair = compare(
        direct,
        endpoint,
        "/small.txt",
        &big,
        args.vm_requests,
        args.transfers,
        args.vm_mib,
    )?;

    // [endpoint from sleeping, endpoint from archive, API from sleeping, API from archive]
    let mut samples: [Vec<Duration>; 4] = Default::default();
    for round in 0..args.wakes {
        for (i, archived) in [(0, false), (1, true), (2, false), (3, true)] {
            if archived {
                let _: serde_json::Value = client
                    .post(
                        &format!("/v1/vms/{vm}/archive"),
                        &serde_json::json!({ "tier": "zstd" }),
                    )
                    .await?;
            } else {
                let _: serde_json::Value = client
                    .post(&format!("/v1/vms/{vm}/sleep"), &serde_json::json!({}))
                    .await?;
            }
            let took = if i < 2 {
                first_byte(endpoint, "/small.txt")
            } else {
                let started = Instant::now();
                let _: serde_json::Value = client
                    .post(&format!("/v1/vms/{vm}/wake"), &serde_json::json!({}))
                    .await?;
                first_byte(direct, "/small.txt").map(|_| started.elapsed())
            }
            .map_err(|e| BenchError::Reply(format!("wake: {e}")))?;
            samples[i].push(took);
        }
        let ms = |i: usize| samples[i][round].as_secs_f64() * 1000.0;
        eprintln!(
            "wake {}/{}: endpoint: sleeping {:.1} ms, archived {:.1} ms; API: sleeping {:.1} ms, archived {:.1} ms",
            round + 1,
            args.wakes,
            ms(0),
            ms(1),
            ms(2),
            ms(3)
        );
    }
    let _: serde_json::Value = client.delete(&format!("/v1/vms/{vm}")).await?;
    drop(server);
    let [mut a, mut b, mut c, mut d] = samples;
    Ok((
        pair,
        Wakes {
            sleeping: summary(&mut a),
            archived: summary(&mut b),
            api_sleeping: summary(&mut c),
            api_archived: summary(&mut d),
        },
    ))
}

pub async fn run(args: EndpointsBench) -> Result<(), BenchError> {
    if args.requests == 0 || args.vm_requests == 0 || args.transfers == 0 || args.wakes == 0 {
        return Err(BenchError::Usage(
            "--requests, --vm-requests, --transfers and --wakes must be at least 1".into(),
        ));
    }
    eprintln!("loopback: a forwarder process in front of a local HTTP server...");
    let (loopback, control_round_trip) = loopback(&args).await?;
    let (guest, wakes) = guest(&args).await?;
    let report = Report {
        machine: machine(),
        accel: args.accel.clone(),
        loopback,
        guest,
        control_round_trip,
        wake_from_sleeping: wakes.sleeping,
        wake_from_archived_zstd: wakes.archived,
        api_wake_from_sleeping: wakes.api_sleeping,
        api_wake_from_archived_zstd: wakes.api_archived,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
        return Ok(());
    }
    println!(
        "hangar bench endpoints on {} (accel {})\n",
        report.machine, report.accel
    );
    println!("| path | n | p50 ms | p99 ms | min ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [
        (
            "loopback, direct: connect + GET + answer",
            &report.loopback.direct,
        ),
        (
            "loopback, through the forwarder",
            &report.loopback.forwarded,
        ),
        ("guest, direct port forward", &report.guest.direct),
        ("guest, stable endpoint", &report.guest.forwarded),
        (
            "control round trip (set a mapping)",
            &report.control_round_trip,
        ),
        (
            "wake from sleeping: connect -> first byte",
            &report.wake_from_sleeping,
        ),
        (
            "wake from zstd archive: connect -> first byte",
            &report.wake_from_archived_zstd,
        ),
        (
            "without endpoint: API wake from sleeping + direct GET -> first byte",
            &report.api_wake_from_sleeping,
        ),
        (
            "without endpoint: API wake from zstd archive + direct GET -> first byte",
            &report.api_wake_from_archived_zstd,
        ),
    ] {
        println!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            s.n, s.p50_ms, s.p99_ms, s.min_ms, s.max_ms
        );
    }
    println!("\n| transfer | MiB | direct MB/s | forwarded MB/s | forwarded / direct |");
    println!("|---|---|---|---|---|");
    for (name, pair) in [("loopback", &report.loopback), ("guest", &report.guest)] {
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.2} |",
            pair.transfer_mib,
            pair.direct_mb_s,
            pair.forwarded_mb_s,
            pair.forwarded_mb_s / pair.direct_mb_s
        );
    }
    println!(
        "\nforwarding overhead (p50): loopback {:+.3} ms, guest {:+.3} ms per connection",
        report.loopback.overhead_p50_ms, report.guest.overhead_p50_ms
    );
    Ok(())
}
