//! Where the time of a pool grant goes, on a real guest: agent round trips to a running
//! guest, `cont` of a paused one, the first agent round trip after it, and HTTP GETs to the
//! guest's busybox httpd before and after a pause. Prints medians.
//!
//! `cargo run --release -p hangar-vmm --example resume_latency [ROUNDS]`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar_image::{AssetSources, ImageFile, ensure_busybox_image, ensure_guest_assets};
use hangar_proto::{GuestConfig, Identity, NetworkConfig, RootConfig, ServiceCommand};
use hangar_vmm::qemu::{QemuBackend, QemuConfig};
use hangar_vmm::{Accel, Hypervisor, PortForward, VmSpec, usernet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn median(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    format!(
        "p50 {:>8.0} us   min {:>8.0} us   max {:>8.0} us",
        us(samples[samples.len() / 2]),
        us(samples[0]),
        us(samples[samples.len() - 1])
    )
}

async fn get(port: u16) -> Duration {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.expect("read");
    assert_eq!(&head[9..12], b"200");
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(15);
    let cache = std::env::var_os("HANGAR_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/tmp/hangar-cache"));
    let sources = AssetSources::default();
    let assets = ensure_guest_assets(&cache, &sources).expect("guest assets");
    let mut files = BTreeMap::new();
    files.insert(
        "/www/index.html".to_string(),
        ImageFile {
            contents: b"hello\n".to_vec(),
            mode: 0o644,
        },
    );
    let image = ensure_busybox_image(&cache, &sources, &files).expect("image");
    let data = tempfile::tempdir().expect("tempdir");
    let backend = QemuBackend::new(QemuConfig::new(data.path().join("vms"), Accel::Tcg));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let spec = VmSpec {
        id: "probe".into(),
        vcpus: 1,
        memory_mib: 128,
        ram_tail_kib: 0,
        segment_nic: false,
        egress: hangar_core::EgressPolicy::Open,
        kernel: assets.vmlinux,
        initramfs: assets.initramfs,
        cmdline: hangar_image::kernel_cmdline(hangar_image::host_tsc_khz()),
        base_image: Some(image.path),
        layers: Vec::new(),
        forwards: vec![PortForward {
            host: "127.0.0.1".parse().expect("ip"),
            host_port: port,
            guest_port: 80,
        }],
        pre_os: false,
        layer_slots: 0,
        background: false,
        template: None,
        firmware: false,
        memory: Default::default(),
    };
    let launched = backend.launch(&spec).await.expect("launch");
    let agent = launched.agent.clone();
    let config = GuestConfig {
        identity: Identity {
            hostname: "probe".into(),
            unix_time_ms: 0,
            entropy_hex: "00".repeat(32),
        },
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: usernet::GUEST_ADDRESS.into(),
            gateway: Some(usernet::GATEWAY.into()),
            dns: vec![],
        }),
        root: Some(RootConfig {
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            layers: Vec::new(),
        }),
        files: vec![],
        services: vec![ServiceCommand {
            name: "httpd".into(),
            argv: ["httpd", "-f", "-p", "80", "-h", "/www"]
                .map(String::from)
                .into(),
            env: BTreeMap::new(),
            workdir: None,
        }],
    };
    let timeout = Duration::from_secs(120);
    let pause = Duration::from_millis(
        std::env::var("PAUSE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(300),
    );
    agent.configure(config, timeout).await.expect("configure");
    while agent.check_listen(80, timeout).await.ok() != Some(true) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut running_ping = Vec::new();
    let mut running_get = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        agent.ping(timeout).await.expect("ping");
        running_ping.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
        running_get.push(get(port).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mut cont, mut first_ping, mut second_ping, mut first_get, mut queued) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut identity, mut identity_guest, mut identity_no_clock) =
        (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds * 4 {
        backend.pause("probe").await.expect("pause");
        tokio::time::sleep(pause).await;
        if round % 4 >= 2 {
            // cont, then a re-identification (with and without a clock step).
            backend.resume("probe").await.expect("resume");
            let started = Instant::now();
            let unix_time_ms = if round % 4 == 2 {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_millis() as u64
            } else {
                0
            };
            let reply = agent
                .reidentify(
                    Identity {
                        hostname: format!("probe-{round}"),
                        unix_time_ms,
                        entropy_hex: "ab".repeat(32),
                    },
                    timeout,
                )
                .await
                .expect("reidentify");
            if unix_time_ms > 0 {
                identity.push(started.elapsed());
                let guest_us: u64 = reply
                    .stdout
                    .trim()
                    .trim_start_matches("guest_us=")
                    .parse()
                    .unwrap_or(0);
                identity_guest.push(Duration::from_micros(guest_us));
            } else {
                identity_no_clock.push(started.elapsed());
            }
        } else if round % 4 == 0 {
            // cont, then a ping: each timed on its own.
            let started = Instant::now();
            backend.resume("probe").await.expect("resume");
            cont.push(started.elapsed());
            let started = Instant::now();
            agent.ping(timeout).await.expect("ping");
            first_ping.push(started.elapsed());
            let started = Instant::now();
            agent.ping(timeout).await.expect("ping");
            second_ping.push(started.elapsed());
            first_get.push(get(port).await);
        } else {
            // The ping written while paused, then cont: what a grant does.
            let started = Instant::now();
            let ping = agent.ping(timeout);
            let resume = async {
                tokio::task::yield_now().await;
                backend.resume("probe").await
            };
            let (pinged, resumed) = tokio::join!(ping, resume);
            pinged.expect("ping");
            resumed.expect("resume");
            queued.push(started.elapsed());
        }
    }
    for (label, script) in [
        (
            "in guest: 20 x fork+exec /bin/true",
            "for i in $(seq 20); do /bin/true; done",
        ),
        (
            "in guest: 20 x wget of index.html",
            "for i in $(seq 20); do wget -q -O /dev/null http://127.0.0.1/index.html; done",
        ),
        (
            "in guest: 20 x wget, no server (refused)",
            "for i in $(seq 20); do wget -q -O /dev/null http://127.0.0.1:81/ 2>/dev/null; done; true",
        ),
    ] {
        let started = Instant::now();
        let reply = agent
            .exec(vec!["sh".into(), "-c".into(), script.into()], timeout)
            .await
            .expect("exec");
        assert!(reply.ok, "{label}: {reply:?}");
        println!(
            "{label:<40} {:>8.0} us",
            started.elapsed().as_secs_f64() * 1e6
        );
    }
    println!(
        "running guest, agent ping          {}",
        median(running_ping)
    );
    println!("running guest, GET                 {}", median(running_get));
    println!("cont (QMP round trip)              {}", median(cont));
    println!("first ping after cont              {}", median(first_ping));
    println!("second ping after cont             {}", median(second_ping));
    println!("first GET after cont + 2 pings     {}", median(first_get));
    println!("ping queued while paused, then cont {}", median(queued));
    println!("reidentify after cont              {}", median(identity));
    println!(
        "  of which in the guest            {}",
        median(identity_guest)
    );
    println!(
        "reidentify after cont, no clock    {}",
        median(identity_no_clock)
    );
    backend.destroy("probe").await.expect("destroy");
}
