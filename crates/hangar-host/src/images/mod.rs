//! Where a host's VM images come from: [`ImageSource`], the seam between the host and its
//! image cache, so that logic tests run without building real guest assets.
//!
//! - [`cache`]: [`LocalImages`], images built with `hangar-image` and cached on this host.
//! - [`export`]: a self-contained, bootable export of an image.
//! - [`pulled`]: [`PulledImages`], images a farm host pulls from the control plane.
//! - [`NoImages`] serves the fake backend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar_core::Service;
use hangar_image::GuestAssets;

pub mod cache;
pub mod export;
pub mod pulled;

pub use cache::{DEFAULT_MIRROR, LocalImages};
pub use pulled::{PullError, PulledImages};

/// Why an image could not be resolved, built, removed or exported.
#[derive(Debug, thiserror::Error)]
pub enum ImageSourceError {
    /// The catalog has no such operating system.
    #[error("no os {0:?}")]
    NoOs(String),
    /// Guest assets, a root disk or a layer could not be built or removed.
    #[error("{what}")]
    Asset {
        what: &'static str,
        #[source]
        source: hangar_image::AssetError,
    },
    /// The blocking build ended abnormally (panicked or cancelled).
    #[error("{what}")]
    Interrupted {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A pre-OS shell takes one disk; this service's image is layered.
    #[error("{service} on {os} is a layered image; a pre-OS shell takes one disk")]
    LayeredShell { service: String, os: String },
    /// Neither the service nor the OS gives a disk to attach.
    #[error("no image to attach")]
    NothingToAttach,
    /// This image source keeps its images.
    #[error("image {0} cannot be removed by this image source")]
    CannotRemove(String),
    /// An imported machine's model disk is not on this host (imports are kept by the
    /// server that took them; farm hosts do not pull them).
    #[error("the model disk of imported machine {0} is not on this host")]
    NoModel(String),
    /// This image source cannot write exports.
    #[error("this host cannot export images")]
    CannotExport,
    /// Writing the export's files failed.
    #[error("export: {0}")]
    Export(String),
    /// This source keeps no files by hash, so it cannot take a peer's.
    #[error("this host's images are not content-addressed: it cannot pull from host {0}")]
    NoPeerPulls(String),
    /// Pulling an image from the control plane failed (farm hosts).
    #[error("pulling an image")]
    Pull(#[source] Box<pulled::PullError>),
}

/// Build progress: a stage and a percent of the whole build.
pub type ProgressFn = Arc<dyn Fn(&str, u8) + Send + Sync>;

/// The root disks of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RootImage {
    /// The qcow2 the VM's copy-on-write disk is made over: the whole root (busybox), or an
    /// empty filesystem that becomes the writable upper layer (layered roots).
    pub base: Option<PathBuf>,
    /// Read-only layers, top first (empty for a single-disk root).
    pub layers: Vec<PathBuf>,
    /// Their hashes, bottom first.
    pub layer_hashes: Vec<String>,
}

#[async_trait::async_trait]
pub trait ImageSource: Send + Sync + 'static {
    /// Kernel and initramfs shared by every guest.
    async fn guest_assets(&self) -> Result<GuestAssets, ImageSourceError>;

    /// The root of `service` on `os`, built first when it is not cached (reporting to
    /// `progress`).
    async fn root_image(
        &self,
        service: &Service,
        os: &str,
        progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError>;

    /// The bare root disk of an operating system (no application), for pre-OS shells.
    /// `None` when the OS has no single-disk image (layered OSes).
    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, ImageSourceError>;

    /// Images on disk that the disk budget may delete, least recently used first, when
    /// no VM needs them. None by default: images built here are small and always kept.
    fn disk_images(&self) -> Vec<hangar_core::lifecycle::ImageFacts> {
        Vec::new()
    }

    /// Deletes an image named by [`ImageSource::disk_images`].
    async fn remove_image(&self, key: &str) -> Result<(), ImageSourceError> {
        Err(ImageSourceError::CannotRemove(key.to_owned()))
    }
    /// Whether every layer of `service` on `os` is cached (a request will not build).
    fn is_built(&self, _service: &Service, _os: &str) -> bool {
        true
    }

    /// Layer hashes of `service` on `os`, bottom first (empty for single-disk roots).
    fn chain(&self, _service: &Service, _os: &str) -> Vec<String> {
        Vec::new()
    }

    /// Every cached layer.
    fn layers(&self) -> Vec<hangar_image::layers::Layer> {
        Vec::new()
    }

    /// The content hashes (sha256) of the image blobs this source holds, for hosts that
    /// pull them by hash; none for sources that build their own.
    fn held_blobs(&self) -> Vec<String> {
        Vec::new()
    }

    /// The content hash (sha256) of a file this source gave out, when it keeps its files
    /// by hash (a farm host's pulled images); `None` for sources that build their own. A
    /// template is shared between hosts only when all its inputs have one.
    fn content_hash(&self, _path: &Path) -> Option<String> {
        None
    }

    /// Pulls `blob` from the peer host `from` (a template's file), verified and
    /// resumable, and gives its local path. Only sources that keep files by hash can.
    async fn pull_peer_blob(
        &self,
        _blob: &hangar_api::Blob,
        from: &crate::PeerSource,
        _what: &str,
        _progress: &ProgressFn,
    ) -> Result<PathBuf, ImageSourceError> {
        Err(ImageSourceError::NoPeerPulls(from.host.clone()))
    }

    /// The service roots this source holds whole, as `service@os`, for placement's
    /// preference for hosts that hold a VM's image; none for sources that build their own.
    fn held_roots(&self) -> Vec<String> {
        Vec::new()
    }

    /// Records that a VM starts with these layers now.
    fn touch(&self, _hashes: &[String]) {}

    /// When a VM last started with the layer.
    fn last_used_ms(&self, _hash: &str) -> Option<u64> {
        None
    }

    /// Removes a layer from the cache.
    fn evict(&self, _hash: &str) -> Result<(), ImageSourceError> {
        Ok(())
    }

    /// Writes a self-contained, bootable export of `service` on `os` into `dir`.
    async fn export(
        &self,
        _service: &Service,
        _os: &str,
        _standalone: hangar_proto::GuestConfig,
        _dir: PathBuf,
    ) -> Result<ExportInfo, ImageSourceError> {
        Err(ImageSourceError::CannotExport)
    }
}

/// What `hangar export` wrote: how to boot it (`hangar-export.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportInfo {
    pub service: String,
    pub os: String,
    pub kernel: String,
    pub initramfs: String,
    pub disk: String,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Guest ports, by name.
    pub ports: BTreeMap<String, u16>,
    /// A complete QEMU command line, run from the export's directory, with each port
    /// forwarded to `127.0.0.1:<guest port + 10000>`.
    pub qemu: Vec<String>,
}

/// Placeholder paths for backends that do not read images (the fake backend).
pub struct NoImages;

#[async_trait::async_trait]
impl ImageSource for NoImages {
    async fn guest_assets(&self) -> Result<GuestAssets, ImageSourceError> {
        Ok(GuestAssets {
            vmlinux: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs.cpio".into(),
            kernel_release: "none".into(),
            hash: "none".into(),
        })
    }

    async fn root_image(
        &self,
        service: &Service,
        _os: &str,
        _progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        Ok(RootImage {
            base: Some(format!("/nonexistent/{}.qcow2", service.name).into()),
            ..RootImage::default()
        })
    }

    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, ImageSourceError> {
        Ok(Some(format!("/nonexistent/{os}.qcow2").into()))
    }
}
