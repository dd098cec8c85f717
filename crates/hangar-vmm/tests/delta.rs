//! The `delta` archive codec against real QEMU streams: a busybox guest serving a request
//! counter (the `http-counter` service of `catalog/demo.toml`) is archived raw as a template;
//! restored (a clone), it serves requests and is archived raw again. The clone's stream,
//! encoded against the template, decodes back byte for byte, is much smaller than its zstd
//! archive, and a VM restored from the decoded stream continues the counter.
//!
//! Guest assets come from Debian's cloud kernel (`apt-get download` the first time) into
//! `HANGAR_TEST_CACHE`, or a cache under cargo's test temp dir.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hangar_image::{AssetSources, ImageFile, ensure_busybox_image, ensure_guest_assets};
use hangar_proto::{GuestConfig, Identity, NetworkConfig, RootConfig, ServiceCommand};
use hangar_vmm::delta::{self, TemplateIndex};
use hangar_vmm::qemu::{QemuBackend, QemuConfig};
use hangar_vmm::{Accel, ArchiveTier, Hypervisor, Launched, PortForward, VmSpec, procs, usernet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const COUNTER_CGI: &str = r#"#!/bin/sh
exec 9>>/run/counter.lock
flock 9
n=$(cat /run/counter 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > /run/counter
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$n"
"#;

const MEMORY_MIB: u32 = 256;

/// One real-QEMU test at a time: they share two cores with everything else.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("HANGAR_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("hangar-cache"))
}

/// Kernel, initramfs and the http-counter base image.
struct Guest {
    vmlinux: PathBuf,
    initramfs: PathBuf,
    image: PathBuf,
}

fn guest() -> Guest {
    let cache = cache_dir();
    let sources = AssetSources::default();
    let assets = ensure_guest_assets(&cache, &sources).expect("guest assets");
    let mut files = BTreeMap::new();
    files.insert(
        "/www/cgi-bin/index.cgi".to_string(),
        ImageFile {
            contents: COUNTER_CGI.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    files.insert(
        "/www/health.txt".to_string(),
        ImageFile {
            contents: b"ok\n".to_vec(),
            mode: 0o644,
        },
    );
    let image = ensure_busybox_image(&cache, &sources, &files).expect("busybox image");
    Guest {
        vmlinux: assets.vmlinux,
        initramfs: assets.initramfs,
        image: image.path,
    }
}

/// Ends every QEMU process under `vms_dir` (only this test's VMs live there) when dropped,
/// also when the test panics, and shows the guest console then; unmounts a tmpfs last.
struct Cleanup {
    vms_dir: PathBuf,
    mounted: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (id, pid) in procs::qemu_processes_under(&self.vms_dir) {
            let pidfile = self.vms_dir.join(&id).join("qemu.pid");
            if procs::is_qemu_with_pidfile(pid, &pidfile) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while procs::alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if std::thread::panicking()
            && let Ok(entries) = std::fs::read_dir(&self.vms_dir)
        {
            for entry in entries.flatten() {
                let log = std::fs::read(entry.path().join("console.log")).unwrap_or_default();
                let tail =
                    String::from_utf8_lossy(&log[log.len().saturating_sub(3000)..]).into_owned();
                eprintln!(
                    "--- console of {} (tail) ---\n{tail}\n---",
                    entry.file_name().to_string_lossy()
                );
            }
        }
        if self.mounted {
            // A QEMU just killed may hold the mount for a moment while it exits.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let unmounted = std::process::Command::new("umount")
                    .arg(&self.vms_dir)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success());
                if unmounted {
                    break;
                }
                if Instant::now() > deadline {
                    // Detach it now; the kernel frees it once nothing uses it.
                    let _ = std::process::Command::new("umount")
                        .arg("-l")
                        .arg(&self.vms_dir)
                        .status();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spec(id: &str, guest: &Guest, port: u16) -> VmSpec {
    VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        kernel: guest.vmlinux.clone(),
        initramfs: guest.initramfs.clone(),
        cmdline: hangar_image::kernel_cmdline(hangar_image::host_tsc_khz()),
        base_image: Some(guest.image.clone()),
        layers: Vec::new(),
        forwards: vec![PortForward {
            host: "127.0.0.1".parse().unwrap(),
            host_port: port,
            guest_port: 80,
        }],
        pre_os: false,
        background: false,
        template: None,
    }
}

/// What hangar-server's manager sends for the http-counter service.
fn counter_config(hostname: &str) -> GuestConfig {
    GuestConfig {
        identity: Identity {
            hostname: hostname.into(),
            unix_time_ms: 0,
            entropy_hex: "00".repeat(32),
        },
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: usernet::GUEST_ADDRESS.into(),
            gateway: Some(usernet::GATEWAY.into()),
            dns: vec![usernet::DNS.into()],
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
    }
}

/// The body of `GET path`, retried until `timeout`.
async fn http_get(port: u16, path: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream
                .write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())
                .await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let result = tokio::time::timeout(Duration::from_secs(5), attempt).await;
        match result {
            Ok(Ok(response)) if response.contains(" 200 ") => {
                return response
                    .split_once("\r\n\r\n")
                    .map(|(_, body)| body.to_owned())
                    .unwrap_or_default();
            }
            other if Instant::now() >= deadline => {
                panic!("GET http://127.0.0.1:{port}{path} failed: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn counter(port: u16) -> u32 {
    let body = http_get(port, "/", Duration::from_secs(20)).await;
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter body {body:?}"))
}

/// Launches the counter guest, configures it, waits until it serves.
async fn boot_counter(backend: &QemuBackend, spec: &VmSpec) -> Launched {
    let started = Instant::now();
    let launched = backend.launch(spec).await.expect("launch");
    launched
        .agent
        .configure(counter_config(&spec.id), Duration::from_secs(120))
        .await
        .expect("configure");
    let port = spec.forwards[0].host_port;
    assert_eq!(
        http_get(port, "/health.txt", Duration::from_secs(60)).await,
        "ok\n"
    );
    eprintln!("booted {} in {:?}", spec.id, started.elapsed());
    launched
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Compares what is written with the bytes of a file, without holding either in memory.
struct SameAs {
    expected: std::io::BufReader<File>,
    offset: u64,
    scratch: Vec<u8>,
}

impl Write for SameAs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scratch.resize(buf.len(), 0);
        self.expected.read_exact(&mut self.scratch)?;
        if let Some(at) = buf.iter().zip(&self.scratch).position(|(a, b)| a != b) {
            return Err(std::io::Error::other(format!(
                "decoded stream differs at byte {}",
                self.offset + at as u64
            )));
        }
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Archives `id` raw and keeps its memory stream at `keep` (a hard link: restoring removes
/// the archive's own name).
async fn archive_raw(backend: &QemuBackend, id: &str, keep: &Path) -> u64 {
    let info = backend
        .archive(id, ArchiveTier::Raw)
        .await
        .expect("archive raw");
    std::fs::hard_link(&info.path, keep).unwrap();
    eprintln!(
        "{id}: raw archive {} bytes in {} ms",
        info.size_bytes, info.took_ms
    );
    info.size_bytes
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

#[test]
fn a_clone_is_stored_as_a_small_delta_of_its_template() {
    let _serial = serial();
    let guest = guest();
    // Short paths: unix socket addresses hold at most 107 bytes.
    let tmp = tempfile::Builder::new()
        .prefix("hgd")
        .tempdir_in("/tmp")
        .unwrap();
    let vms_dir = tmp.path().join("vms");
    let _cleanup = Cleanup {
        vms_dir: vms_dir.clone(),
        mounted: false,
    };
    let backend = Arc::new(QemuBackend::new(QemuConfig::new(vms_dir, Accel::Tcg)));
    let port = free_port();
    let spec = spec("ctr", &guest, port);
    let id = spec.id.as_str();
    let template = tmp.path().join("template.raw");
    let clone = tmp.path().join("clone.raw");

    runtime().block_on(async {
        // The template: booted to ready, one request served, archived raw.
        let _launched = boot_counter(&backend, &spec).await;
        assert_eq!(counter(port).await, 1);
        archive_raw(&backend, id, &template).await;

        // The clone: restored from it, serves requests, archived raw.
        backend.restore(&spec).await.expect("restore the template");
        for expected in 2..=6 {
            assert_eq!(counter(port).await, expected);
        }
        let raw_bytes = archive_raw(&backend, id, &clone).await;

        let started = Instant::now();
        let index = TemplateIndex::build(&template).unwrap();
        let index_took = started.elapsed();
        eprintln!(
            "template index: {} pages of {} in {index_took:?}",
            index.pages(),
            mb(index.template_len())
        );

        let delta_path = tmp.path().join("clone.delta");
        let started = Instant::now();
        let stats = delta::encode(File::open(&clone).unwrap(), &template, &index, &delta_path)
            .expect("encode");
        let encode_took = started.elapsed();
        eprintln!("encode: {stats:?} in {encode_took:?}");
        assert_eq!(stats.stream_bytes, raw_bytes);
        assert!(
            stats.pages_total > 0 && stats.pages_referenced > 0,
            "{stats:?}"
        );

        let started = Instant::now();
        let same = SameAs {
            expected: std::io::BufReader::new(File::open(&clone).unwrap()),
            offset: 0,
            scratch: Vec::new(),
        };
        let decoded = delta::decode(&delta_path, &template, same).expect("decode");
        eprintln!(
            "decode (compared with the clone's stream): {:?}",
            started.elapsed()
        );
        assert_eq!(decoded, raw_bytes);
        let started = Instant::now();
        delta::verify(&delta_path, &template).expect("verify");
        eprintln!("verify: {:?}", started.elapsed());

        let zstd_path = tmp.path().join("clone.zstd");
        let started = Instant::now();
        let zstd_bytes = hangar_vmm::archive::write_memory(
            File::open(&clone).unwrap(),
            &zstd_path,
            ArchiveTier::Zstd,
            None,
        )
        .unwrap();
        eprintln!("zstd -1 of the clone's stream: {:?}", started.elapsed());
        let template_zstd = hangar_vmm::archive::write_memory(
            File::open(&template).unwrap(),
            &tmp.path().join("template.zstd"),
            ArchiveTier::Zstd,
            None,
        )
        .unwrap();
        eprintln!(
            "sizes: template raw {}, zstd {}; clone raw {}, zstd {}, delta {} ({:.1}% of zstd)",
            mb(index.template_len()),
            mb(template_zstd),
            mb(raw_bytes),
            mb(zstd_bytes),
            mb(stats.output_bytes),
            stats.output_bytes as f64 * 100.0 / zstd_bytes as f64
        );
        assert!(
            stats.output_bytes * 4 <= zstd_bytes,
            "the delta ({}) should be at most 25% of the zstd archive ({zstd_bytes})",
            stats.output_bytes
        );

        // A VM restored from the decoded stream continues the counter: the decoded stream
        // replaces the raw archive's memory file.
        let memory = hangar_vmm::archive::memory_path(&backend.paths(id).dir, ArchiveTier::Raw);
        std::fs::remove_file(&memory).unwrap();
        let mut file = File::create(&memory).unwrap();
        delta::decode(&delta_path, &template, &mut file).unwrap();
        file.sync_all().unwrap();
        drop(file);
        let started = Instant::now();
        backend
            .restore(&spec)
            .await
            .expect("restore the decoded stream");
        assert_eq!(counter(port).await, 7, "the counter continues");
        eprintln!(
            "restored from the decoded stream, answering in {:?}",
            started.elapsed()
        );
        backend.destroy(id).await.unwrap();
    });
}
