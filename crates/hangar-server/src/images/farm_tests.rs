//! Farm hosts pulling images: the `/v1/farm/...` routes over a real server on 127.0.0.1,
//! and `PulledImages` (the farm host's image source) against it, with an image source whose
//! assets, root and layers are real files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use hangar_api::{Blob, Client, RootBody};
use hangar_core::Service;
use hangar_host::LocalHostConfig;
use hangar_host::images::{PullError, PulledImages};
use hangar_image::GuestAssets;
use hangar_vmm::fake::FakeBackend;
use sha2::{Digest, Sha256};

use crate::images::{ImageSource, ImageSourceError, ProgressFn, RootImage};
use crate::manager::{Manager, ManagerConfig};

const TOKEN: &str = "farm-token-for-tests";

/// Files of a few hundred KiB (several chunks each), different per name.
fn contents(name: &str, size: usize) -> Vec<u8> {
    let seed = Sha256::digest(name.as_bytes());
    (0..size)
        .map(|i| seed[i % seed.len()].wrapping_add((i / 7) as u8))
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Guest assets, a layered root for every service (base + two layers) and an OS disk for
/// `busybox`, as files in a directory; counts root builds.
struct FileImages {
    dir: tempfile::TempDir,
    roots: AtomicU32,
}

impl FileImages {
    fn new() -> FileImages {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, size) in [
            ("vmlinux", 700_000),
            ("initramfs.cpio", 300_000),
            ("upper.qcow2", 200_000),
            ("top.sqfs", 900_000),
            ("bottom.sqfs", 600_000),
            ("busybox.qcow2", 100_000),
        ] {
            std::fs::write(dir.path().join(name), contents(name, size)).expect("write");
        }
        FileImages {
            dir,
            roots: AtomicU32::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[async_trait::async_trait]
impl ImageSource for FileImages {
    async fn guest_assets(&self) -> Result<GuestAssets, ImageSourceError> {
        Ok(GuestAssets {
            vmlinux: self.path("vmlinux"),
            initramfs: self.path("initramfs.cpio"),
            kernel_release: "6.1.0-test".into(),
            hash: "assets-hash".into(),
        })
    }

    async fn root_image(
        &self,
        _service: &Service,
        _os: &str,
        _progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        self.roots.fetch_add(1, Ordering::SeqCst);
        Ok(RootImage {
            base: Some(self.path("upper.qcow2")),
            layers: vec![self.path("top.sqfs"), self.path("bottom.sqfs")],
            layer_hashes: vec!["bottom-layer".into(), "top-layer".into()],
        })
    }

    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, ImageSourceError> {
        match os {
            "busybox" => Ok(Some(self.path("busybox.qcow2"))),
            "layered" => Ok(None),
            other => Err(ImageSourceError::NoOs(other.into())),
        }
    }
}

/// A server on 127.0.0.1 over `images`; its base URL.
async fn serve(images: Arc<FileImages>) -> (Arc<Manager>, String) {
    let store = Arc::new(hangar_store::SqliteStore::open_in_memory().expect("store"));
    let config = ManagerConfig {
        farm_token: TOKEN.into(),
        ..ManagerConfig::default()
    };
    let manager = crate::test_support::manager_with_images(
        store,
        FakeBackend::new(),
        images,
        crate::test_support::WEB,
        config,
        LocalHostConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let router = crate::api::router(manager.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (manager, format!("http://{addr}"))
}

async fn receive(client: &Client, sha256: &str, from: u64) -> (u64, Vec<u8>) {
    let mut download = client.farm_blob(sha256, from).await.expect("blob");
    let mut bytes = Vec::new();
    while let Some(chunk) = download.chunk().await.expect("chunk") {
        bytes.extend(chunk);
    }
    (download.offset(), bytes)
}

fn web() -> Service {
    hangar_core::Catalog::from_toml(crate::test_support::WEB)
        .expect("catalog")
        .get("web")
        .expect("web")
        .clone()
}

fn quiet() -> ProgressFn {
    Arc::new(|_: &str, _: u8| {})
}

/// Progress reports (stage, percent) as they came.
type Reports = Arc<Mutex<Vec<(String, u8)>>>;

/// Progress reports, collected.
fn recorder() -> (ProgressFn, Reports) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let progress: ProgressFn = Arc::new(move |stage: &str, percent: u8| {
        sink.lock().unwrap().push((stage.to_owned(), percent));
    });
    (progress, seen)
}

#[tokio::test]
async fn every_farm_route_wants_the_farm_token() {
    let (_, base) = serve(Arc::new(FileImages::new())).await;
    let body = RootBody {
        service: "web".into(),
        os: "busybox".into(),
    };
    for client in [
        Client::new(&base).unwrap(),
        Client::new(&base).unwrap().with_token("not-the-token"),
    ] {
        let errors = [
            client.farm_assets().await.unwrap_err(),
            client.farm_root(&body).await.unwrap_err(),
            client.farm_os("busybox").await.unwrap_err(),
            client.farm_blob(&"a".repeat(64), 0).await.unwrap_err(),
        ];
        for err in errors {
            assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");
        }
    }
}

#[tokio::test]
async fn manifests_list_blobs_that_download_whole_or_from_an_offset_and_nothing_else_does() {
    let images = Arc::new(FileImages::new());
    let (manager, base) = serve(images.clone()).await;
    let client = Client::new(&base).unwrap().with_token(TOKEN);

    let assets = client.farm_assets().await.unwrap();
    let vmlinux = std::fs::read(images.path("vmlinux")).unwrap();
    assert_eq!(assets.kernel_release, "6.1.0-test");
    assert_eq!(assets.hash, "assets-hash");
    assert_eq!(
        assets.vmlinux,
        Blob {
            sha256: sha256(&vmlinux),
            size: vmlinux.len() as u64
        }
    );

    // Whole (200), then resumed (206 from the offset asked for).
    assert_eq!(
        receive(&client, &assets.vmlinux.sha256, 0).await,
        (0, vmlinux.clone())
    );
    let (offset, rest) = receive(&client, &assets.vmlinux.sha256, 123_457).await;
    assert_eq!(offset, 123_457);
    assert_eq!(rest, vmlinux[123_457..]);
    assert_eq!(manager.image_runtime.blobs.sent(&assets.vmlinux.sha256), 2);

    // A range past the end is 416; a hash never listed, or not a hash, is 404.
    let err = client
        .farm_blob(&assets.vmlinux.sha256, vmlinux.len() as u64)
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(416), "{err}");
    let unknown = sha256(b"never listed");
    for hash in [unknown.as_str(), "../../etc/passwd", "vmlinux"] {
        let err = client.farm_blob(hash, 0).await.unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{hash}: {err}");
    }

    // The root: base, then layers top first, with the cache's layer hashes.
    let root = client
        .farm_root(&RootBody {
            service: "web".into(),
            os: "busybox".into(),
        })
        .await
        .unwrap();
    let hash_of = |name: &str| sha256(&std::fs::read(images.path(name)).unwrap());
    assert_eq!(root.base.unwrap().sha256, hash_of("upper.qcow2"));
    let layers: Vec<String> = root.layers.iter().map(|b| b.sha256.clone()).collect();
    assert_eq!(layers, vec![hash_of("top.sqfs"), hash_of("bottom.sqfs")]);
    assert_eq!(root.layer_hashes, vec!["bottom-layer", "top-layer"]);
    let err = client
        .farm_root(&RootBody {
            service: "nope".into(),
            os: "busybox".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");

    // OS disks: one, none (layered), or no such OS.
    let os = client.farm_os("busybox").await.unwrap().unwrap();
    assert_eq!(os.sha256, hash_of("busybox.qcow2"));
    assert_eq!(client.farm_os("layered").await.unwrap(), None);
    let err = client.farm_os("plan9").await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
}

#[tokio::test]
async fn a_host_pulls_assets_and_a_root_once_and_then_downloads_nothing() {
    let images = Arc::new(FileImages::new());
    let (manager, base) = serve(images.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    // The first server refuses connections: the next one is asked.
    let pulled = PulledImages::new(
        cache.path().into(),
        vec!["http://127.0.0.1:1".into(), base.clone()],
        TOKEN.into(),
    )
    .unwrap();
    let service = web();
    assert!(!pulled.is_built(&service, "busybox"));

    let assets = pulled.guest_assets().await.unwrap();
    assert_eq!(assets.kernel_release, "6.1.0-test");
    assert_eq!(
        std::fs::read(&assets.vmlinux).unwrap(),
        std::fs::read(images.path("vmlinux")).unwrap()
    );
    assert_eq!(
        std::fs::read(&assets.initramfs).unwrap(),
        std::fs::read(images.path("initramfs.cpio")).unwrap()
    );

    let (progress, seen) = recorder();
    let root = pulled
        .root_image(&service, "busybox", progress)
        .await
        .unwrap();
    let same = |local: &Path, name: &str| {
        assert_eq!(
            std::fs::read(local).unwrap(),
            std::fs::read(images.path(name)).unwrap(),
            "{name}"
        );
    };
    same(root.base.as_deref().unwrap(), "upper.qcow2");
    same(&root.layers[0], "top.sqfs");
    same(&root.layers[1], "bottom.sqfs");
    assert_eq!(root.layer_hashes, vec!["bottom-layer", "top-layer"]);
    let seen = seen.lock().unwrap().clone();
    let top = sha256(&std::fs::read(images.path("top.sqfs")).unwrap());
    let stage = format!("pulling layer {}", &top[..12]);
    assert!(seen.iter().any(|(s, p)| *s == stage && *p == 0), "{seen:?}");
    assert!(
        seen.iter().any(|(s, p)| *s == stage && *p > 0 && *p < 100),
        "{seen:?}"
    );
    assert!(pulled.is_built(&service, "busybox"));
    assert_eq!(
        pulled.chain(&service, "busybox"),
        vec!["bottom-layer", "top-layer"]
    );

    let mut held = pulled.held();
    held.sort();
    let mut expected: Vec<String> = [
        "vmlinux",
        "initramfs.cpio",
        "upper.qcow2",
        "top.sqfs",
        "bottom.sqfs",
    ]
    .iter()
    .map(|name| sha256(&std::fs::read(images.path(name)).unwrap()))
    .collect();
    expected.sort();
    assert_eq!(held, expected);
    for hash in &held {
        assert_eq!(manager.image_runtime.blobs.sent(hash), 1, "{hash}");
    }

    // Again: the same paths, and no blob is sent again.
    assert_eq!(pulled.guest_assets().await.unwrap(), assets);
    let again = pulled
        .root_image(&service, "busybox", Arc::new(|_: &str, _: u8| {}))
        .await
        .unwrap();
    assert_eq!(again, root);
    for hash in &held {
        assert_eq!(manager.image_runtime.blobs.sent(hash), 1, "{hash}");
    }

    // With no server answering, a host still has what it pulled.
    let offline = PulledImages::new(
        cache.path().into(),
        vec!["http://127.0.0.1:1".into()],
        TOKEN.into(),
    )
    .unwrap();
    assert_eq!(
        offline
            .root_image(&service, "busybox", Arc::new(|_: &str, _: u8| {}))
            .await
            .unwrap(),
        root
    );
    assert_eq!(offline.guest_assets().await.unwrap(), assets);

    // OS disks.
    let os = pulled.os_image("busybox").await.unwrap().unwrap();
    same(&os, "busybox.qcow2");
    assert_eq!(pulled.os_image("layered").await.unwrap(), None);
    assert!(matches!(
        pulled.os_image("plan9").await,
        Err(ImageSourceError::NoOs(os)) if os == "plan9"
    ));
}

#[tokio::test]
async fn a_cut_download_resumes_from_its_part_and_a_corrupt_one_is_refused() {
    let images = Arc::new(FileImages::new());
    let (manager, base) = serve(images.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let pulled = PulledImages::new(cache.path().into(), vec![base.clone()], TOKEN.into()).unwrap();
    let client = Client::new(&base).unwrap().with_token(TOKEN);
    let blob = client.farm_assets().await.unwrap().vmlinux;
    let bytes = std::fs::read(images.path("vmlinux")).unwrap();
    let part = cache
        .path()
        .join("blobs")
        .join(format!("{}.part", blob.sha256));

    // A part cut at half: the rest is asked for from there (the first report is 50%).
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    let (progress, seen) = recorder();
    let path = pulled.pull(&blob, "kernel", &progress).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(!part.exists());
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(
        first,
        (format!("pulling kernel {}", &blob.sha256[..12]), 50)
    );
    assert_eq!(manager.image_runtime.blobs.sent(&blob.sha256), 1);

    // A part whose bytes are wrong: the whole is refused, deleted, and pulled again next time.
    let other = client.farm_assets().await.unwrap().initramfs;
    let part = cache
        .path()
        .join("blobs")
        .join(format!("{}.part", other.sha256));
    std::fs::write(&part, vec![0u8; 1000]).unwrap();
    let err = pulled
        .pull(&other, "initramfs", &quiet())
        .await
        .unwrap_err();
    assert!(
        matches!(err, PullError::Corrupt { ref want, .. } if *want == other.sha256),
        "{err}"
    );
    assert!(!part.exists());
    assert!(!pulled.blob_path(&other.sha256).exists());
    let path = pulled.pull(&other, "initramfs", &quiet()).await.unwrap();
    assert_eq!(
        std::fs::read(path).unwrap(),
        std::fs::read(images.path("initramfs.cpio")).unwrap()
    );

    // A manifest that lies about the size is refused too.
    let lying = Blob {
        sha256: other.sha256.clone(),
        size: other.size - 10,
    };
    std::fs::remove_file(pulled.blob_path(&other.sha256)).unwrap();
    let err = pulled
        .pull(&lying, "initramfs", &quiet())
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::TooLong { .. }), "{err}");
    assert!(!pulled.blob_path(&other.sha256).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_download_each_blob_once() {
    let images = Arc::new(FileImages::new());
    let (manager, base) = serve(images.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let pulled =
        Arc::new(PulledImages::new(cache.path().into(), vec![base], TOKEN.into()).unwrap());
    let service = web();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let pulled = pulled.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let assets = pulled.guest_assets().await.unwrap();
                let root = pulled
                    .root_image(&service, "busybox", Arc::new(|_: &str, _: u8| {}))
                    .await
                    .unwrap();
                (assets, root)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(pulled.held().len(), 5);
    for hash in pulled.held() {
        assert_eq!(manager.image_runtime.blobs.sent(&hash), 1, "{hash}");
    }
    assert_eq!(images.roots.load(Ordering::SeqCst), 4);
}
