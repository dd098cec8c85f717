//! The local image cache: [`LocalImages`] builds images with `hangar-image` and keeps
//! them under the data dir.
//!
//! A service on a busybox OS gets one ext4 disk (busybox and its files). A service on a
//! Debian OS gets a chain of read-only squashfs layers (OS, one per software or patch
//! component, its application files) under a writable per-VM layer; see
//! [`hangar_image::layers`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hangar_core::catalog::{FileSpec, OsBase};
use hangar_core::components::ComponentKind;
use hangar_core::{Catalog, Service};
use hangar_image::layers::{self, LayerBuild, LayerInput};
use hangar_image::{AssetSources, GuestAssets, ImageFile};

use super::{ExportInfo, ImageSource, ImageSourceError, ProgressFn, RootImage};

/// Images built on this host with `hangar-image`, cached under the data dir.
pub struct LocalImages {
    cache_dir: PathBuf,
    sources: AssetSources,
    catalog: Arc<Catalog>,
    /// Debian mirror for debootstrap and apt.
    mirror: String,
    assets: tokio::sync::OnceCell<GuestAssets>,
    /// Busybox image key → its path, once built. Concurrent requests for one key wait for
    /// one build (two builds of one image differ in bytes, and hosts pulling it must
    /// agree on its hash); this also saves re-hashing the inputs on every request.
    images: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<PathBuf>>>>,
}

/// The default Debian mirror.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

impl LocalImages {
    pub fn new(
        cache_dir: PathBuf,
        sources: AssetSources,
        catalog: Arc<Catalog>,
        mirror: String,
    ) -> LocalImages {
        LocalImages {
            cache_dir,
            sources,
            catalog,
            mirror,
            assets: tokio::sync::OnceCell::new(),
            images: Mutex::default(),
        }
    }

    /// The layer inputs of `service` on `os`, bottom first; `None` for busybox roots.
    pub fn layer_inputs(
        &self,
        service: &Service,
        os: &str,
    ) -> Result<Option<Vec<LayerInput>>, ImageSourceError> {
        layer_inputs(&self.catalog, &self.mirror, service, os)
    }

    /// A busybox root disk holding `files`, cached under `key`.
    async fn busybox_image(
        &self,
        key: &str,
        files: &BTreeMap<String, FileSpec>,
    ) -> Result<PathBuf, ImageSourceError> {
        let cell = {
            let mut images = self.images.lock().expect("images lock");
            let cell = images.entry(key.to_owned()).or_default();
            // An image removed from the cache since is built again.
            if cell.get().is_some_and(|path| !path.exists()) {
                *cell = Arc::default();
            }
            cell.clone()
        };
        let path = cell
            .get_or_try_init(|| async {
                let files = image_files(files);
                let cache_dir = self.cache_dir.clone();
                let sources = self.sources.clone();
                let image = build_blocking("base image", move || {
                    hangar_image::ensure_busybox_image(&cache_dir, &sources, &files)
                })
                .await?;
                Ok::<_, ImageSourceError>(image.path)
            })
            .await?;
        Ok(path.clone())
    }
}

/// Runs the `hangar-image` build `build` (blocking IO and tools) off the runtime's threads;
/// `what` names it in errors.
async fn build_blocking<T: Send + 'static>(
    what: &'static str,
    build: impl FnOnce() -> Result<T, hangar_image::AssetError> + Send + 'static,
) -> Result<T, ImageSourceError> {
    tokio::task::spawn_blocking(build)
        .await
        .map_err(|source| ImageSourceError::Interrupted { what, source })?
        .map_err(|source| ImageSourceError::Asset { what, source })
}

/// A file of a squashfs layer (`unsquashfs -cat`), `None` when the layer lacks it or it
/// cannot be read.
fn layer_file(layer: &std::path::Path, path: &str) -> Option<String> {
    let output = std::process::Command::new("unsquashfs")
        .arg("-cat")
        .arg(layer)
        .arg(path)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn image_files(files: &BTreeMap<String, FileSpec>) -> BTreeMap<String, ImageFile> {
    files
        .iter()
        .map(|(path, file)| {
            (
                path.clone(),
                ImageFile {
                    contents: file.content.clone().into_bytes(),
                    mode: file.mode,
                },
            )
        })
        .collect()
}

/// The layer inputs of `service` on `os`, bottom first: the OS layer, one layer per
/// software or patch component (dependencies first), and the application files. `None`
/// when the OS is a busybox one (a single disk).
pub fn layer_inputs(
    catalog: &Catalog,
    mirror: &str,
    service: &Service,
    os: &str,
) -> Result<Option<Vec<LayerInput>>, ImageSourceError> {
    let os_def = catalog
        .os(os)
        .ok_or_else(|| ImageSourceError::NoOs(os.to_owned()))?;
    if os_def.base == OsBase::Busybox {
        return Ok(None);
    }
    let mut inputs = vec![LayerInput::Debootstrap {
        os: os_def.name.clone(),
        suite: os_def.suite.clone().unwrap_or_default(),
        mirror: mirror.to_owned(),
        packages: os_def.packages.clone(),
    }];
    for name in &service.components {
        let Some(component) = catalog.components().get(name) else {
            continue;
        };
        if component.packages.is_empty() {
            continue;
        }
        inputs.push(LayerInput::Packages {
            component: component.name.clone(),
            kind: match component.kind {
                ComponentKind::Patch => "patch",
                _ => "software",
            }
            .into(),
            packages: component.packages.iter().map(|p| p.apt_arg()).collect(),
        });
    }
    if !service.files.is_empty() {
        inputs.push(LayerInput::Files {
            component: service.name.clone(),
            files: image_files(&service.files),
        });
    }
    Ok(Some(inputs))
}

#[async_trait::async_trait]
impl ImageSource for LocalImages {
    async fn guest_assets(&self) -> Result<GuestAssets, ImageSourceError> {
        self.assets
            .get_or_try_init(|| async {
                let cache_dir = self.cache_dir.clone();
                let sources = self.sources.clone();
                build_blocking("guest assets", move || {
                    hangar_image::ensure_guest_assets(&cache_dir, &sources)
                })
                .await
            })
            .await
            .cloned()
    }

    async fn root_image(
        &self,
        service: &Service,
        os: &str,
        progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        self.root_image_cancellable(service, os, progress, hangar_image::Cancel::new())
            .await
    }

    async fn root_image_cancellable(
        &self,
        service: &Service,
        os: &str,
        progress: ProgressFn,
        cancel: hangar_image::Cancel,
    ) -> Result<RootImage, ImageSourceError> {
        let Some(inputs) = self.layer_inputs(service, os)? else {
            let base = self.busybox_image(&service.name, &service.files).await?;
            return Ok(RootImage {
                base: Some(base),
                ..RootImage::default()
            });
        };
        let build = LayerBuild {
            cache_dir: self.cache_dir.clone(),
            cancel,
        };
        let cache_dir = self.cache_dir.clone();
        let (upper, built) = build_blocking("image build", move || {
            let report = move |stage: &str, percent: u8| progress(stage, percent);
            let built = layers::ensure_layers(&build, &inputs, &report)?;
            let upper = layers::ensure_upper_template(&cache_dir)?;
            Ok((upper, built))
        })
        .await?;
        Ok(RootImage {
            base: Some(upper),
            layers: built.iter().rev().map(|l| l.path.clone()).collect(),
            layer_hashes: built.iter().map(|l| l.info.hash.clone()).collect(),
        })
    }

    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, ImageSourceError> {
        match self.catalog.os(os).map(|o| o.base) {
            Some(OsBase::Busybox) => self
                .busybox_image(&format!("os:{os}"), &BTreeMap::new())
                .await
                .map(Some),
            _ => Ok(None),
        }
    }

    async fn id_clashes(&self, root: &RootImage) -> Result<Vec<String>, ImageSourceError> {
        let layers = root.layers.clone();
        let accounts = tokio::task::spawn_blocking(move || {
            layers
                .iter()
                .map(|layer| super::LayerAccounts {
                    layer: layer
                        .parent()
                        .and_then(|dir| dir.file_name())
                        .map(|name| name.to_string_lossy().chars().take(12).collect())
                        .unwrap_or_else(|| layer.display().to_string()),
                    passwd: layer_file(layer, "etc/passwd"),
                    group: layer_file(layer, "etc/group"),
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|source| ImageSourceError::Interrupted {
            what: "reading layers' accounts",
            source,
        })?;
        Ok(super::id_clashes(&accounts))
    }

    fn is_built(&self, service: &Service, os: &str) -> bool {
        match self.layer_inputs(service, os) {
            Ok(Some(inputs)) => layers::chain_hashes(&inputs)
                .iter()
                .all(|hash| layers::cached_layer(&self.cache_dir, hash).is_some()),
            _ => true,
        }
    }

    fn chain(&self, service: &Service, os: &str) -> Vec<String> {
        match self.layer_inputs(service, os) {
            Ok(Some(inputs)) => layers::chain_hashes(&inputs),
            _ => Vec::new(),
        }
    }

    fn layers(&self) -> Vec<hangar_image::layers::Layer> {
        layers::cached_layers(&self.cache_dir)
    }

    fn touch(&self, hashes: &[String]) {
        for hash in hashes {
            layers::touch_layer(&self.cache_dir, hash);
        }
    }

    fn last_used_ms(&self, hash: &str) -> Option<u64> {
        layers::last_used_ms(&self.cache_dir, hash)
    }

    fn evict(&self, hash: &str) -> Result<(), ImageSourceError> {
        layers::remove_layer(&self.cache_dir, hash).map_err(|source| ImageSourceError::Asset {
            what: "layer removal",
            source,
        })
    }

    async fn export(
        &self,
        service: &Service,
        os: &str,
        standalone: hangar_proto::GuestConfig,
        dir: PathBuf,
    ) -> Result<ExportInfo, ImageSourceError> {
        let assets = self.guest_assets().await?;
        let root = self
            .root_image(service, os, Arc::new(|_: &str, _: u8| {}))
            .await?;
        let cache_dir = self.cache_dir.clone();
        let hashes = root.layer_hashes.clone();
        let service_name = service.name.clone();
        let os_name = os.to_owned();
        let (vcpus, memory_mib) = (service.vcpus, service.memory_mib);
        let ports: BTreeMap<String, u16> = service
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.guest))
            .collect();
        let base = root.base.clone();
        tokio::task::spawn_blocking(move || {
            super::export::write_export(super::export::ExportJob {
                cache_dir: &cache_dir,
                assets: &assets,
                layer_hashes: &hashes,
                single_disk: if hashes.is_empty() { base } else { None },
                standalone: &standalone,
                dir: &dir,
                service: &service_name,
                os: &os_name,
                vcpus,
                memory_mib,
                ports,
            })
        })
        .await
        .map_err(|source| ImageSourceError::Interrupted {
            what: "export",
            source,
        })?
        .map_err(ImageSourceError::Export)
    }
}
