//! What the real-QEMU tests of hangar-vmm share: the `http-counter` guest of
//! `catalog/demo.toml` (kernel, initramfs, busybox image with its CGI counter), its spec and
//! configuration, HTTP helpers, and a guard that ends the test's QEMU processes even when
//! the test panics.
//!
//! Guest assets come from Debian's cloud kernel (`apt-get download` the first time) into
//! `HANGAR_TEST_CACHE`, or a cache under cargo's test temp dir.
#![allow(dead_code)] // each test crate uses its own part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hangar_image::{AssetSources, ImageFile, ensure_busybox_image, ensure_guest_assets};
use hangar_proto::{GuestConfig, Identity, NetworkConfig, RootConfig, ServiceCommand};
use hangar_vmm::qemu::{QemuBackend, QemuConfig};
use hangar_vmm::{Accel, Hypervisor, Launched, PortForward, VmSpec, procs, usernet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const COUNTER_CGI: &str = r#"#!/bin/sh
exec 9>>/run/counter.lock
flock 9
{ read -r n < /run/counter; } 2>/dev/null
n=$((${n:-0} + 1))
echo "$n" > /run/counter
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$n"
"#;

pub const MEMORY_MIB: u32 = 256;

/// One real-QEMU test at a time: they share two cores with everything else.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("HANGAR_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("hangar-cache"))
}

/// Kernel, initramfs and the http-counter base image.
pub struct Guest {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub image: PathBuf,
}

pub fn guest() -> Guest {
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
pub struct Cleanup {
    pub vms_dir: PathBuf,
    pub mounted: bool,
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn spec(id: &str, guest: &Guest, port: u16) -> VmSpec {
    VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        ram_tail_kib: 0,
        segment_nic: false,
        egress: hangar_core::EgressPolicy::Open,
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
        layer_slots: 0,
        background: false,
        template: None,
        firmware: false,
        memory: Default::default(),
    }
}

/// What hangar-server's manager sends for the http-counter service.
pub fn counter_config(hostname: &str) -> GuestConfig {
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
pub async fn http_get(port: u16, path: &str, timeout: Duration) -> String {
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

pub async fn counter(port: u16) -> u32 {
    let body = http_get(port, "/", Duration::from_secs(20)).await;
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter body {body:?}"))
}

pub async fn exec(launched: &Launched, script: &str) -> String {
    let reply = launched
        .agent
        .exec(
            vec!["sh".into(), "-c".into(), script.into()],
            Duration::from_secs(10),
        )
        .await
        .expect("agent exec");
    assert!(reply.ok && reply.code == Some(0), "{script}: {reply:?}");
    reply.stdout
}

/// Launches the counter guest, configures it, waits until it serves.
pub async fn boot_counter(backend: &QemuBackend, spec: &VmSpec) -> Launched {
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

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A QEMU backend whose VMs live in a short temporary dir (unix socket addresses hold at
/// most 107 bytes), with the guard that ends them. Fields drop in order: the VMs end
/// before their dir goes.
pub struct Rig {
    _cleanup: Cleanup,
    pub backend: Arc<QemuBackend>,
    pub tmp: tempfile::TempDir,
}

pub fn rig(prefix: &str) -> Rig {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let vms_dir = tmp.path().join("vms");
    Rig {
        _cleanup: Cleanup {
            vms_dir: vms_dir.clone(),
            mounted: false,
        },
        backend: Arc::new(QemuBackend::new(QemuConfig::new(vms_dir, Accel::Tcg))),
        tmp,
    }
}
