//! Where VM images come from: the seam between the service manager and the image crate, so
//! that logic tests run without building real guest assets.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use hangar_core::Service;
use hangar_core::catalog::FileSpec;
use hangar_image::{AssetSources, GuestAssets, ImageFile};

#[async_trait::async_trait]
pub trait ImageSource: Send + Sync + 'static {
    /// Kernel and initramfs shared by every guest.
    async fn guest_assets(&self) -> Result<GuestAssets, String>;

    /// The read-only base root disk of `service`, shared by all its VMs.
    async fn base_image(&self, service: &Service) -> Result<Option<PathBuf>, String>;

    /// The bare root disk of an operating system (no application).
    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, String>;

    /// Images on disk that the disk budget may delete, least recently used first, when
    /// no VM needs them. None by default: images built here are small and always kept.
    fn disk_images(&self) -> Vec<hangar_core::lifecycle::ImageFacts> {
        Vec::new()
    }

    /// Deletes an image named by [`ImageSource::disk_images`].
    async fn remove_image(&self, key: &str) -> Result<(), String> {
        Err(format!(
            "image {key} cannot be removed by this image source"
        ))
    }
}

/// Images built on this host with `hangar-image`, cached under the data dir.
pub struct LocalImages {
    cache_dir: PathBuf,
    sources: AssetSources,
    assets: tokio::sync::OnceCell<GuestAssets>,
    /// Service name and content → image path; content is rechecked by hash inside
    /// `hangar-image`, this only saves re-hashing on every request.
    images: Mutex<HashMap<String, PathBuf>>,
}

impl LocalImages {
    pub fn new(cache_dir: PathBuf, sources: AssetSources) -> LocalImages {
        LocalImages {
            cache_dir,
            sources,
            assets: tokio::sync::OnceCell::new(),
            images: Mutex::default(),
        }
    }
}

#[async_trait::async_trait]
impl ImageSource for LocalImages {
    async fn guest_assets(&self) -> Result<GuestAssets, String> {
        self.assets
            .get_or_try_init(|| async {
                let cache_dir = self.cache_dir.clone();
                let sources = self.sources.clone();
                tokio::task::spawn_blocking(move || {
                    hangar_image::ensure_guest_assets(&cache_dir, &sources)
                })
                .await
                .map_err(|err| format!("guest assets: {err}"))?
                .map_err(|err| crate::error::error_chain(&err))
            })
            .await
            .cloned()
    }

    async fn base_image(&self, service: &Service) -> Result<Option<PathBuf>, String> {
        self.image(&service.name, &service.files).await
    }

    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, String> {
        self.image(&format!("os:{os}"), &BTreeMap::new()).await
    }
}

impl LocalImages {
    /// A busybox root disk holding `files`, cached under `key`.
    async fn image(
        &self,
        key: &str,
        files: &BTreeMap<String, FileSpec>,
    ) -> Result<Option<PathBuf>, String> {
        if let Some(path) = self.images.lock().expect("images lock").get(key)
            && path.exists()
        {
            return Ok(Some(path.clone()));
        }
        let files: BTreeMap<String, ImageFile> = files
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
            .collect();
        let cache_dir = self.cache_dir.clone();
        let sources = self.sources.clone();
        let image = tokio::task::spawn_blocking(move || {
            hangar_image::ensure_busybox_image(&cache_dir, &sources, &files)
        })
        .await
        .map_err(|err| format!("base image: {err}"))?
        .map_err(|err| crate::error::error_chain(&err))?;
        self.images
            .lock()
            .expect("images lock")
            .insert(key.to_owned(), image.path.clone());
        Ok(Some(image.path))
    }
}

/// Placeholder paths for backends that do not read images (the fake backend).
pub struct NoImages;

#[async_trait::async_trait]
impl ImageSource for NoImages {
    async fn guest_assets(&self) -> Result<GuestAssets, String> {
        Ok(GuestAssets {
            vmlinux: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs.cpio".into(),
            kernel_release: "none".into(),
            hash: "none".into(),
        })
    }

    async fn base_image(&self, service: &Service) -> Result<Option<PathBuf>, String> {
        Ok(Some(format!("/nonexistent/{}.qcow2", service.name).into()))
    }

    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, String> {
        Ok(Some(format!("/nonexistent/{os}.qcow2").into()))
    }
}
