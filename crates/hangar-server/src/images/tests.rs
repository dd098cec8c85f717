//! Image promotion and eviction on the fake backend, with an image source that keeps its
//! layers in memory (the real layer builds are tested in `crates/hangar-cli/tests/images.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::{Mode, Service, ServiceRequest};
use hangar_image::GuestAssets;
use hangar_image::layers::{Layer, LayerInfo};
use hangar_store::{TaskState, now_ms};
use hangar_vmm::fake::FakeBackend;

use crate::images::{ImageSource, ImageSourceError, NoImages, ProgressFn, RootImage};
use crate::manager::{Manager, ManagerConfig};

const MIB: u64 = 1 << 20;

const CATALOG: &str = r#"
[service.a]
os = "busybox"
[[service.a.port]]
name = "http"
guest = 80
[[service.a.process]]
name = "httpd"
argv = ["httpd"]
[service.a.ready]
checks = [{ tcp = { port = "http" } }]

[service.b]
os = "busybox"
[[service.b.port]]
name = "http"
guest = 80
[[service.b.process]]
name = "httpd"
argv = ["httpd"]
[service.b.ready]
checks = [{ tcp = { port = "http" } }]

[service.c]
os = "busybox"
[[service.c.port]]
name = "http"
guest = 80
[[service.c.process]]
name = "httpd"
argv = ["httpd"]
[service.c.ready]
checks = [{ tcp = { port = "http" } }]
"#;

/// Layers in memory: an OS layer of 100 MiB shared by services a, b and c, each with a
/// 10 MiB layer of its own.
struct FakeLayers {
    layers: Mutex<BTreeMap<String, (Layer, u64)>>,
    builds: AtomicU32,
    /// Builds run until cancelled (then take a moment to stop, as a real one does).
    hold_builds: AtomicBool,
    /// A held build saw its cancellation and stopped.
    stopped: AtomicBool,
}

impl FakeLayers {
    fn chain_of(service: &str) -> Vec<String> {
        vec!["os".into(), format!("sw-{service}")]
    }

    fn set_last_used(&self, hash: &str, ms: u64) {
        if let Some(entry) = self.layers.lock().unwrap().get_mut(hash) {
            entry.1 = ms;
        }
    }

    fn hashes(&self) -> Vec<String> {
        self.layers.lock().unwrap().keys().cloned().collect()
    }
}

#[async_trait::async_trait]
impl ImageSource for FakeLayers {
    async fn guest_assets(&self) -> Result<GuestAssets, ImageSourceError> {
        NoImages.guest_assets().await
    }

    async fn root_image_cancellable(
        &self,
        service: &Service,
        os: &str,
        progress: ProgressFn,
        cancel: hangar_image::Cancel,
    ) -> Result<RootImage, ImageSourceError> {
        if !self.hold_builds.load(Ordering::SeqCst) {
            return self.root_image(service, os, progress).await;
        }
        while !cancel.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Killing the tools and undoing the mounts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stopped.store(true, Ordering::SeqCst);
        Err(ImageSourceError::Asset {
            what: "image build",
            source: hangar_image::AssetError::Cancelled,
        })
    }

    async fn root_image(
        &self,
        service: &Service,
        _os: &str,
        _progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        let chain = Self::chain_of(&service.name);
        let mut layers = self.layers.lock().unwrap();
        let mut parent: Option<String> = None;
        for hash in &chain {
            layers.entry(hash.clone()).or_insert_with(|| {
                self.builds.fetch_add(1, Ordering::SeqCst);
                let size = if hash == "os" { 100 * MIB } else { 10 * MIB };
                (
                    Layer {
                        info: LayerInfo {
                            hash: hash.clone(),
                            kind: if hash == "os" { "os" } else { "software" }.into(),
                            name: hash.clone(),
                            parent: parent.clone(),
                            packages: Vec::new(),
                            size_bytes: size,
                            built_at_ms: now_ms(),
                            build_ms: 1,
                        },
                        path: PathBuf::from(format!("/cache/layers/{hash}/layer.sqfs")),
                    },
                    now_ms(),
                )
            });
            parent = Some(hash.clone());
        }
        Ok(RootImage {
            base: Some("/cache/images/upper.qcow2".into()),
            layers: chain
                .iter()
                .rev()
                .map(|h| PathBuf::from(format!("/cache/layers/{h}/layer.sqfs")))
                .collect(),
            layer_hashes: chain,
        })
    }

    async fn os_image(&self, _os: &str) -> Result<Option<PathBuf>, ImageSourceError> {
        Ok(None)
    }

    fn is_built(&self, service: &Service, _os: &str) -> bool {
        let layers = self.layers.lock().unwrap();
        Self::chain_of(&service.name)
            .iter()
            .all(|h| layers.contains_key(h))
    }

    fn chain(&self, service: &Service, _os: &str) -> Vec<String> {
        Self::chain_of(&service.name)
    }

    fn layers(&self) -> Vec<Layer> {
        self.layers
            .lock()
            .unwrap()
            .values()
            .map(|(l, _)| l.clone())
            .collect()
    }

    fn touch(&self, hashes: &[String]) {
        for hash in hashes {
            self.set_last_used(hash, now_ms());
        }
    }

    fn last_used_ms(&self, hash: &str) -> Option<u64> {
        self.layers.lock().unwrap().get(hash).map(|(_, ms)| *ms)
    }

    fn evict(&self, hash: &str) -> Result<(), ImageSourceError> {
        self.layers.lock().unwrap().remove(hash);
        Ok(())
    }
}

fn setup(budget_mib: u64) -> (Arc<Manager>, Arc<FakeLayers>) {
    let layers = Arc::new(FakeLayers {
        layers: Mutex::default(),
        builds: AtomicU32::new(0),
        hold_builds: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
    });
    let manager = crate::test_support::manager_with_images(
        Arc::new(hangar_store::SqliteStore::open_in_memory().unwrap()),
        FakeBackend::new(),
        layers.clone(),
        CATALOG,
        ManagerConfig {
            image_budget_mib: budget_mib,
            ..ManagerConfig::default()
        },
        hangar_host::LocalHostConfig::default(),
    );
    (manager, layers)
}

fn request(service: &str) -> ServiceRequest {
    ServiceRequest {
        service: Some(service.into()),
        mode: Mode::Dedicated,
        ..ServiceRequest::default()
    }
}

async fn build(manager: &Arc<Manager>, service: &str) {
    let task = manager.build_image(&request(service)).await.unwrap();
    for _ in 0..200 {
        let record = manager.store().task(&task).await.unwrap().unwrap();
        if record.state != TaskState::Running {
            assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("build of {service} did not end");
}

#[tokio::test]
async fn eviction_takes_least_recently_used_layers_no_vm_uses() {
    // 100 MiB OS + 3 × 10 MiB; the budget holds the OS layer and one more.
    let (manager, layers) = setup(115);
    build(&manager, "b").await;
    build(&manager, "c").await;
    // Layers reused by a later build are not rebuilt: one OS layer for all.
    assert_eq!(layers.builds.load(Ordering::SeqCst), 3);
    let grant = manager.request(request("a")).await.unwrap();
    let spec_layers = grant.vm.spec["layers"].as_array().unwrap().len();
    assert_eq!(spec_layers, 2, "the VM has its image's layers as disks");
    let old = now_ms() - 3_600_000;
    layers.set_last_used("sw-b", old + 2);
    layers.set_last_used("sw-c", old + 1);
    layers.set_last_used("os", old);

    // 130 MiB over a 115 MiB budget: c (least recently used), then b; never a's layers or
    // the OS layer below them, which a VM uses.
    let evicted = manager.evict_images().await;
    assert_eq!(evicted, ["sw-c", "sw-b"]);
    assert_eq!(layers.hashes(), ["os", "sw-a"]);
    let view = manager.images().await.unwrap();
    let a = view.images.iter().find(|i| i.service == "a").unwrap();
    assert!(a.built);
    assert_eq!(a.users, std::slice::from_ref(&grant.vm.id));
    assert!(!view.images.iter().find(|i| i.service == "b").unwrap().built);

    // Once the VM is gone and the layers are old, everything may go.
    manager.delete(&grant.vm.id).await.unwrap();
    layers.set_last_used("sw-a", old);
    layers.set_last_used("os", old);
    let manager = {
        // A budget of nothing, on the same store and layers.
        Manager::new(
            manager.store.clone(),
            manager.default_host(),
            layers.clone(),
            manager.catalog.clone(),
            ManagerConfig {
                image_budget_mib: 0,
                ..ManagerConfig::default()
            },
        )
    };
    assert_eq!(manager.evict_images().await, ["sw-a", "os"]);
    assert!(layers.hashes().is_empty());
}

#[tokio::test]
async fn often_requested_services_are_promoted_kept_and_rebuilt() {
    let (manager, layers) = setup(0);
    build(&manager, "a").await;
    build(&manager, "b").await;
    let old = now_ms() - 3_600_000;
    for hash in layers.hashes() {
        layers.set_last_used(&hash, old);
    }
    // b is requested often: promoted, so its layers stay whatever the budget.
    for _ in 0..5 {
        manager.record_image_demand("b", "busybox");
    }
    assert!(manager.promoted().await.contains("b@busybox"));
    assert!(!manager.promoted().await.contains("a@busybox"));
    assert_eq!(manager.evict_images().await, ["sw-a"]);
    assert_eq!(layers.hashes(), ["os", "sw-b"]);
    let view = manager.images().await.unwrap();
    assert!(
        view.images
            .iter()
            .find(|i| i.service == "b")
            .unwrap()
            .promoted
    );

    // A promoted image that went missing is built again ahead of requests.
    layers.evict("sw-b").unwrap();
    manager.promote_images().await;
    for _ in 0..200 {
        if layers.hashes().contains(&"sw-b".to_string()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the promoted image was not rebuilt");
}

#[tokio::test]
async fn a_cancelled_build_ends_cancelled_after_its_build_stopped_for_every_waiter() {
    let (manager, layers) = setup(1024);
    layers.hold_builds.store(true, Ordering::SeqCst);
    let task = manager.build_image(&request("a")).await.unwrap();
    // A second request for the same image joins the build.
    assert_eq!(manager.build_image(&request("a")).await.unwrap(), task);
    tokio::time::sleep(Duration::from_millis(50)).await;
    manager.tasks.cancel(&task, "root", true).await.unwrap();
    let record = loop {
        let record = manager.store().task(&task).await.unwrap().unwrap();
        if record.state.ended() {
            break record;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(record.state, TaskState::Cancelled, "{record:?}");
    assert!(
        record
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("cancel"),
        "{record:?}"
    );
    assert!(
        layers.stopped.load(Ordering::SeqCst),
        "the task ended only once its build had stopped"
    );
    assert!(
        layers.hashes().is_empty(),
        "a cancelled build keeps no layer"
    );
    // The image is not building any more: a new request starts a new build.
    layers.hold_builds.store(false, Ordering::SeqCst);
    let again = manager.build_image(&request("a")).await.unwrap();
    assert_ne!(again, task);
}
