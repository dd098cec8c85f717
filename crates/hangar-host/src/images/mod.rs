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
    /// The applications' layer chains do not start from the same OS layer, so they
    /// cannot be stacked on one root.
    #[error("{first} and {second} on {os} are not built over the same OS layer")]
    NotComposable {
        first: String,
        second: String,
        os: String,
    },
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

    /// [`ImageSource::root_image`], interrupted when `cancel` is set: a source that builds
    /// (a [`cache::LocalImages`]) kills the build's tools, undoes its mounts, publishes
    /// nothing and fails with `hangar_image::AssetError::Cancelled`. By default (a source
    /// that builds nothing here) the cancellation is not looked at; the caller drops the
    /// future instead.
    async fn root_image_cancellable(
        &self,
        service: &Service,
        os: &str,
        progress: ProgressFn,
        cancel: hangar_image::Cancel,
    ) -> Result<RootImage, ImageSourceError> {
        let _ = cancel;
        self.root_image(service, os, progress).await
    }

    /// The root of several applications composed on one VM (`composed`, made of
    /// `parts`: see `hangar_core::compose`) on `os`, each part's missing layers built
    /// first (reporting to `progress`, each part a share of the percent). On a layered
    /// OS it is the OS layer once, then each part's own layers above it (those its chain
    /// has over the OS layer, built and cached for the part alone), later parts on top;
    /// nothing is built for the combination itself. On a single-disk OS it is one disk
    /// with `composed`'s files.
    async fn composed_root(
        &self,
        composed: &Service,
        parts: &[Service],
        os: &str,
        progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        let mut roots = Vec::with_capacity(parts.len());
        let share = 100 / parts.len().max(1) as u32;
        for (i, part) in parts.iter().enumerate() {
            let progress = progress.clone();
            let from = i as u32 * share;
            let name = part.name.clone();
            let scaled: ProgressFn = Arc::new(move |stage: &str, percent: u8| {
                let percent = from + share * u32::from(percent.min(100)) / 100;
                progress(&format!("{name}: {stage}"), percent as u8);
            });
            roots.push(self.root_image(part, os, scaled).await?);
        }
        if roots.iter().all(|root| root.layers.is_empty()) {
            return self.root_image(composed, os, progress).await;
        }
        stack_roots(parts, &roots, os)
    }

    /// The accounts `root`'s layers number differently (see [`id_clashes`]): layers of
    /// applications built side by side over one OS layer may give one uid or gid to two
    /// different users or groups, and their files are owned by number, so such layers
    /// cannot share a root. Empty when they can (or this source cannot tell).
    async fn id_clashes(&self, _root: &RootImage) -> Result<Vec<String>, ImageSourceError> {
        Ok(Vec::new())
    }

    /// Whether every layer of every part of a composed root is cached (composing will not
    /// build).
    fn is_composed_built(&self, parts: &[Service], os: &str) -> bool {
        parts.iter().all(|part| self.is_built(part, os))
    }

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

/// One root stacking the layered roots of `parts` (bottom-first hashes, top-first
/// paths) over their shared OS layer: the OS layer at the bottom, then each part's layers
/// above it in order, the last part's on top; the writable base is the first part's.
pub fn stack_roots(
    parts: &[Service],
    roots: &[RootImage],
    os: &str,
) -> Result<RootImage, ImageSourceError> {
    let first = roots.first().ok_or(ImageSourceError::NothingToAttach)?;
    let os_layer = first
        .layer_hashes
        .first()
        .ok_or(ImageSourceError::NothingToAttach)?;
    let mut bottom_first: Vec<(String, PathBuf)> = Vec::new();
    for (i, (part, root)) in parts.iter().zip(roots).enumerate() {
        if root.layer_hashes.first() != Some(os_layer)
            || root.layers.len() != root.layer_hashes.len()
        {
            return Err(ImageSourceError::NotComposable {
                first: parts[0].name.clone(),
                second: part.name.clone(),
                os: os.to_owned(),
            });
        }
        // `layers` is top first: the OS layer is its last.
        let chain: Vec<(String, PathBuf)> = root
            .layer_hashes
            .iter()
            .cloned()
            .zip(root.layers.iter().rev().cloned())
            .collect();
        let skip = if i == 0 { 0 } else { 1 };
        bottom_first.extend(chain.into_iter().skip(skip));
    }
    Ok(RootImage {
        base: first.base.clone(),
        layers: bottom_first
            .iter()
            .rev()
            .map(|(_, path)| path.clone())
            .collect(),
        layer_hashes: bottom_first.into_iter().map(|(hash, _)| hash).collect(),
    })
}

/// One layer's account databases, for [`id_clashes`].
#[derive(Debug, Clone, Default)]
pub struct LayerAccounts {
    /// The layer, as named in messages.
    pub layer: String,
    /// Its `/etc/passwd`, if it has one.
    pub passwd: Option<String>,
    /// Its `/etc/group`, if it has one.
    pub group: Option<String>,
}

/// Accounts numbered differently by layers built side by side: a uid (gid) that two layers
/// give to different users (groups), or a user (group) that two layers give different
/// ids. Each clash is one line naming both layers. Entries every layer agrees on (the OS
/// layer's) never clash.
pub fn id_clashes(layers: &[LayerAccounts]) -> Vec<String> {
    let mut clashes = Vec::new();
    for (what, id_name, table) in [
        (
            "user",
            "uid",
            (|l: &LayerAccounts| l.passwd.clone()) as fn(&LayerAccounts) -> Option<String>,
        ),
        ("group", "gid", |l: &LayerAccounts| l.group.clone()),
    ] {
        let mut by_id: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut by_name: BTreeMap<String, (String, String)> = BTreeMap::new();
        for layer in layers {
            let Some(text) = table(layer) else { continue };
            for line in text.lines() {
                let fields: Vec<&str> = line.split(':').collect();
                let (Some(name), Some(id)) = (fields.first(), fields.get(2)) else {
                    continue;
                };
                let (name, id) = (name.to_string(), id.to_string());
                match by_id.get(&id) {
                    Some((other, at)) if *other != name => clashes.push(format!(
                        "{id_name} {id} is {what} {other} in layer {at} and {what} {name} in layer {}",
                        layer.layer
                    )),
                    Some(_) => {}
                    None => {
                        by_id.insert(id.clone(), (name.clone(), layer.layer.clone()));
                    }
                }
                match by_name.get(&name) {
                    Some((other, at)) if *other != id => clashes.push(format!(
                        "{what} {name} is {id_name} {other} in layer {at} and {id} in layer {}",
                        layer.layer
                    )),
                    Some(_) => {}
                    None => {
                        by_name.insert(name, (id, layer.layer.clone()));
                    }
                }
            }
        }
    }
    clashes
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

    /// Placeholder layers: the OS's, then one per part.
    async fn composed_root(
        &self,
        _composed: &Service,
        parts: &[Service],
        os: &str,
        _progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        let names: Vec<String> = std::iter::once(os.to_owned())
            .chain(parts.iter().map(|part| part.name.clone()))
            .collect();
        Ok(RootImage {
            base: Some("/nonexistent/upper.qcow2".into()),
            layers: names
                .iter()
                .rev()
                .map(|name| format!("/nonexistent/{name}.sqfs").into())
                .collect(),
            layer_hashes: names,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(hashes: &[&str]) -> RootImage {
        RootImage {
            base: Some("/cache/upper.qcow2".into()),
            layers: hashes
                .iter()
                .rev()
                .map(|h| format!("/cache/{h}").into())
                .collect(),
            layer_hashes: hashes.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn layers_numbering_accounts_differently_clash() {
        let os = "root:x:0:0::/root:/bin/sh\n_apt:x:42:65534::/:/bin/false\n";
        let layer = |name: &str, extra: &str, group: &str| LayerAccounts {
            layer: name.into(),
            passwd: Some(format!("{os}{extra}")),
            group: Some(format!("root:x:0:\nusers:x:100:\n{group}")),
        };
        // redis and postgresql, each built over the OS layer alone: both uid 100.
        let redis = layer("redis", "redis:x:100:101::/:/bin/false\n", "redis:x:101:\n");
        let postgres = layer(
            "postgres",
            "postgres:x:100:102::/:/bin/bash\n",
            "ssl-cert:x:101:postgres\npostgres:x:102:\n",
        );
        let clashes = id_clashes(&[redis.clone(), postgres]);
        assert_eq!(
            clashes,
            [
                "uid 100 is user redis in layer redis and user postgres in layer postgres",
                "gid 101 is group redis in layer redis and group ssl-cert in layer postgres",
            ]
        );
        // nginx adds no account: nothing clashes; a layer without the files neither.
        let nginx = layer("nginx", "", "");
        let files = LayerAccounts {
            layer: "files".into(),
            ..LayerAccounts::default()
        };
        assert!(id_clashes(&[redis, nginx, files]).is_empty());
    }

    #[test]
    fn stacked_roots_share_the_os_layer_once_later_parts_on_top() {
        let catalog = hangar_core::Catalog::demo();
        let parts = [
            catalog.get("redis").expect("redis").clone(),
            catalog.get("nginx").expect("nginx").clone(),
        ];
        let stacked = stack_roots(
            &parts,
            &[
                root(&["os", "redis-sw", "redis-files"]),
                root(&["os", "nginx-sw", "nginx-files"]),
            ],
            "debian-12",
        )
        .expect("stacks");
        assert_eq!(
            stacked.layer_hashes,
            ["os", "redis-sw", "redis-files", "nginx-sw", "nginx-files"]
        );
        let top_first: Vec<String> = stacked
            .layers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            top_first,
            [
                "/cache/nginx-files",
                "/cache/nginx-sw",
                "/cache/redis-files",
                "/cache/redis-sw",
                "/cache/os"
            ]
        );
        assert_eq!(stacked.base, Some("/cache/upper.qcow2".into()));
        let err = stack_roots(
            &parts,
            &[root(&["os", "redis-sw"]), root(&["other-os", "nginx-sw"])],
            "debian-12",
        )
        .expect_err("different OS layers");
        assert!(
            matches!(err, ImageSourceError::NotComposable { .. }),
            "{err}"
        );
    }
}
