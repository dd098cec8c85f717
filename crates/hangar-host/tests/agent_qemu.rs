//! A real QEMU VM (the demo catalog's `http-static`) made and run through the agent API
//! with [`RemoteHost`]: progress streamed while it is made, its page served, sleep, wake,
//! archive and restore; the agent ended and a new one started on the same data directory
//! finds the VM still running and adopts it.
//!
//! Guest assets and the image are built into `HANGAR_TEST_CACHE`, or a cache under cargo's
//! test temp dir (the first run fetches Debian's cloud kernel with `apt-get download`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_core::Catalog;
use hangar_host::images::{DEFAULT_MIRROR, LocalImages};
use hangar_host::{
    ArchiveTier, Host, LocalHost, LocalHostConfig, ProgressFn, Purpose, RemoteHost, RunState,
    VmPlan, WakeFrom,
};
use hangar_vmm::Accel;
use hangar_vmm::procs;
use hangar_vmm::qemu::{QemuBackend, QemuConfig};

const TOKEN: &str = "qemu-farm-token";

fn cache_dir() -> PathBuf {
    std::env::var_os("HANGAR_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("hangar-cache"))
}

/// Ends every QEMU process under `vms_dir` when dropped, also when the test panics.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (id, pid) in procs::qemu_processes_under(&self.0) {
            if procs::is_qemu_with_pidfile(pid, &self.0.join(&id).join("qemu.pid")) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while procs::alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// An agent process stand-in: a QEMU local host served in a runtime of its own, so that
/// ending it closes everything it had open, as the end of the process does.
struct Agent {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start(vms_dir: &Path, cache: &Path) -> Agent {
        let images = Arc::new(LocalImages::new(
            cache.to_owned(),
            hangar_image::AssetSources::default(),
            Arc::new(Catalog::demo()),
            DEFAULT_MIRROR.into(),
        ));
        let host = LocalHost::new(
            Arc::new(QemuBackend::new(QemuConfig::new(
                vms_dir.to_owned(),
                Accel::Tcg,
            ))),
            images,
            LocalHostConfig {
                name: "qemu-1".into(),
                guest_cmdline: hangar_image::kernel_cmdline(hangar_image::host_tsc_khz()),
                vms_dir: Some(vms_dir.to_owned()),
                ..LocalHostConfig::default()
            },
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, url) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                bound.send(format!("http://{addr}")).expect("send url");
                let app = hangar_host::agent::router(Arc::new(host), TOKEN);
                tokio::select! {
                    served = axum::serve(listener, app) => served.expect("serve"),
                    _ = stopped => {}
                }
            });
        });
        Agent {
            url: url.recv().expect("agent url"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn page(endpoint: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = reqwest::Client::new()
            .get(format!("http://{endpoint}/"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match got {
            Ok(response) => return response.text().await.unwrap_or_default(),
            Err(err) if Instant::now() > deadline => panic!("GET {endpoint}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vm_lives_through_the_agent_and_outlives_it() {
    let tmp = tempfile::Builder::new()
        .prefix("hagent")
        .tempdir_in("/tmp")
        .unwrap();
    let vms_dir = tmp.path().join("vms");
    let _cleanup = Cleanup(vms_dir.clone());
    let cache = cache_dir();
    let mut agent = Agent::start(&vms_dir, &cache);
    let remote = RemoteHost::new("qemu-1", &agent.url, TOKEN).unwrap();

    let catalog = Catalog::demo();
    let service = catalog
        .services()
        .find(|service| service.name == "http-static")
        .expect("http-static")
        .clone();
    let plan = VmPlan {
        id: "agent-vm-1".into(),
        os: Some(service.os.clone()),
        vcpus: service.vcpus,
        memory_mib: service.memory_mib,
        service: Some(service.clone()),
        env: Default::default(),
        hostname: "agent-vm-1".into(),
        purpose: Purpose::Request,
        ready: None,
    };
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = seen.clone();
    let progress: ProgressFn = Arc::new(move |stage: &str, _percent: u8| {
        sink.lock().unwrap().push(stage.to_owned());
    });
    let prepared = remote.prepare_vm(&plan, progress.clone()).await.unwrap();
    let made = remote.make_vm(&plan, &prepared, progress).await.unwrap();
    let stages = seen.lock().unwrap().clone();
    for stage in ["launch", "boot", "ready"] {
        assert!(stages.iter().any(|s| s == stage), "{stage} in {stages:?}");
    }
    assert!(made.process.is_some());
    let endpoint = prepared.direct_endpoints["http"].clone();
    assert!(page(&endpoint).await.contains("Hello from a hangar VM"));

    remote.sleep("agent-vm-1").await.unwrap();
    assert_eq!(
        remote.run_state("agent-vm-1").await.unwrap(),
        RunState::Paused
    );
    remote
        .wake("agent-vm-1", &WakeFrom::Sleeping)
        .await
        .unwrap();

    let archive = remote
        .archive("agent-vm-1", ArchiveTier::Zstd)
        .await
        .unwrap();
    assert!(archive.size_bytes > 0);
    assert_eq!(
        remote.archive_facts("agent-vm-1").await.unwrap(),
        Some(archive)
    );
    let woken = remote
        .wake(
            "agent-vm-1",
            &WakeFrom::Archived {
                launch: made.launch.clone(),
                services: vec![service.clone()],
                direct_endpoints: prepared.direct_endpoints.clone(),
            },
        )
        .await
        .unwrap();
    let names: Vec<&str> = woken.stages.0.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["restore", "identity", "ready"]);
    assert!(page(&endpoint).await.contains("Hello from a hangar VM"));

    // The agent ends; the VM does not. A new agent on the same directory adopts it.
    agent.kill();
    assert!(matches!(
        remote.inventory().await,
        Err(hangar_host::HostError::Unreachable { .. })
    ));
    assert!(page(&endpoint).await.contains("Hello from a hangar VM"));
    let agent = Agent::start(&vms_dir, &cache);
    let remote = RemoteHost::new("qemu-1", &agent.url, TOKEN).unwrap();
    // Its process is found; its run state is known once it is adopted (QMP re-attached).
    let inventory = remote.inventory().await.unwrap();
    assert_eq!(inventory.len(), 1, "{inventory:?}");
    assert_eq!(inventory[0].id, "agent-vm-1");
    assert!(
        remote
            .adopt("agent-vm-1", &made.launch, true)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        remote.run_state("agent-vm-1").await.unwrap(),
        RunState::Running
    );
    remote.sleep("agent-vm-1").await.unwrap();
    remote.destroy("agent-vm-1").await.unwrap();
    assert!(remote.inventory().await.unwrap().is_empty());
}
