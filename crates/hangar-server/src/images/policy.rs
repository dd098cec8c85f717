//! Images as the control plane manages them: build tasks (`hangar build`), the inventory
//! (`hangar images`), promotion of often requested services (their images are built ahead
//! and kept) and eviction of the least recently used layers under a disk budget, never
//! while a VM uses them (seed 000).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::eviction::{Cached, choose_evictions};
use hangar_core::pool::RequestRate;
use hangar_core::{ServiceRequest, TaskId, VmState};
use hangar_store::{TaskState, now_ms};

use crate::api::error::error_chain;
use crate::images::{ImageView, LayerView};
use crate::manager::Manager;
use crate::requests::RequestError;

/// A service requested at least this often (per minute, decayed with a 30 s half-life)
/// is promoted: its image is built ahead and kept from eviction.
pub const PROMOTE_PER_MIN: f64 = 2.0;

/// Layers used this recently are never evicted.
const RECENT_MS: u64 = 120_000;

/// How often promotion and eviction run.
const IMAGE_LOOP_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct ImageRuntime {
    /// Request rates per `service@os`.
    rates: Mutex<HashMap<String, RequestRate>>,
    /// Build tasks running, per `service@os`.
    building: Mutex<HashMap<String, String>>,
    /// Serialises eviction with itself.
    evicting: tokio::sync::Mutex<()>,
    /// Files listed to farm hosts, by sha256.
    pub(crate) blobs: super::blobs::BlobIndex,
}

pub use hangar_api::ImagesView;

/// Why an image cannot be listed, built or exported.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The request names no viable service, or is malformed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The request's settings do not make a VM configuration.
    #[error(transparent)]
    Guest(#[from] hangar_host::guest::GuestConfigError),
    /// The image could not be built or written out.
    #[error("cannot export the image")]
    Export(#[source] hangar_host::images::ImageSourceError),
    /// `tar` failed to pack the export.
    #[error("tar: {0}")]
    Tar(String),
    #[error("cannot {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { what, source }
}

fn key(service: &str, os: &str) -> String {
    format!("{service}@{os}")
}

impl Manager {
    /// Notes one request for `service` on `os` (feeds promotion).
    pub(crate) fn record_image_demand(&self, service: &str, os: &str) {
        self.image_runtime
            .rates
            .lock()
            .expect("rates lock")
            .entry(key(service, os))
            .or_insert_with(|| RequestRate::new(now_ms()))
            .record(now_ms());
    }

    /// `service@os` combinations whose images are promoted: often requested, or kept in a
    /// warm pool.
    pub async fn promoted(&self) -> BTreeSet<String> {
        let now = now_ms();
        let mut promoted: BTreeSet<String> = self
            .image_runtime
            .rates
            .lock()
            .expect("rates lock")
            .iter()
            .filter(|(_, rate)| rate.per_s(now) * 60.0 >= PROMOTE_PER_MIN)
            .map(|(k, _)| k.clone())
            .collect();
        if let Ok(specs) = self.pool_specs().await {
            for spec in specs.iter().filter(|s| s.min > 0) {
                if let Some(service) = spec.service.as_deref().and_then(|s| self.catalog.get(s)) {
                    promoted.insert(key(&service.name, &service.os));
                }
            }
        }
        promoted
    }

    /// Layer hash → the VMs (not deleted, not failed) that have it as a disk.
    async fn layer_users(&self) -> Result<BTreeMap<String, Vec<String>>, ImageError> {
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for vm in self.store.vms(false).await? {
            if matches!(vm.state, VmState::Deleted | VmState::Failed) {
                continue;
            }
            let Some(layers) = vm.spec.get("layers").and_then(|l| l.as_array()) else {
                continue;
            };
            for path in layers.iter().filter_map(|p| p.as_str()) {
                if let Some(hash) = std::path::Path::new(path)
                    .parent()
                    .and_then(|dir| dir.file_name())
                {
                    users
                        .entry(hash.to_string_lossy().into_owned())
                        .or_default()
                        .push(vm.id.clone());
                }
            }
        }
        Ok(users)
    }

    /// The inventory: every viable service × OS image with its layers, and every cached
    /// layer with its size, users and last use.
    pub async fn images(&self) -> Result<ImagesView, ImageError> {
        let users = self.layer_users().await?;
        let promoted = self.promoted().await;
        let cached = self.images.layers();
        let by_hash: BTreeMap<&str, &hangar_image::layers::Layer> =
            cached.iter().map(|l| (l.info.hash.as_str(), l)).collect();
        let mut images = Vec::new();
        let mut image_names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for service in self.catalog.services() {
            for os in &service.environments {
                let chain = self.images.chain(service, os);
                let name = key(&service.name, os);
                for hash in &chain {
                    image_names
                        .entry(hash.clone())
                        .or_default()
                        .push(name.clone());
                }
                let built = chain.iter().all(|h| by_hash.contains_key(h.as_str()));
                let mut vm_users: Vec<String> = chain
                    .last()
                    .and_then(|top| users.get(top))
                    .cloned()
                    .unwrap_or_default();
                vm_users.sort();
                images.push(ImageView {
                    service: service.name.clone(),
                    os: os.clone(),
                    format: if chain.is_empty() { "disk" } else { "layered" }.into(),
                    built,
                    size_bytes: chain
                        .iter()
                        .filter_map(|h| by_hash.get(h.as_str()))
                        .map(|l| l.info.size_bytes)
                        .sum(),
                    last_used_ms: chain.last().and_then(|h| self.images.last_used_ms(h)),
                    layers: chain,
                    users: vm_users,
                    promoted: promoted.contains(&name),
                });
            }
        }
        let layers: Vec<LayerView> = cached
            .iter()
            .map(|layer| LayerView {
                hash: layer.info.hash.clone(),
                kind: layer.info.kind.clone(),
                name: layer.info.name.clone(),
                parent: layer.info.parent.clone(),
                packages: layer.info.packages.clone(),
                size_bytes: layer.info.size_bytes,
                built_at_ms: layer.info.built_at_ms,
                build_ms: layer.info.build_ms,
                last_used_ms: self.images.last_used_ms(&layer.info.hash),
                images: image_names
                    .get(&layer.info.hash)
                    .cloned()
                    .unwrap_or_default(),
                users: users.get(&layer.info.hash).cloned().unwrap_or_default(),
            })
            .collect();
        Ok(ImagesView {
            images,
            total_bytes: layers.iter().map(|l| l.size_bytes).sum(),
            layers,
            budget_bytes: self.config.image_budget_mib.saturating_mul(1 << 20),
        })
    }

    /// Starts building the image of the request's service and environment (`hangar
    /// build`); returns the task. A build already running for it is returned instead.
    pub async fn build_image(
        self: &Arc<Self>,
        request: &ServiceRequest,
    ) -> Result<String, ImageError> {
        let service = self.directory_lookup(request)?;
        let os = request.env.get("os").cloned().unwrap_or(service.os.clone());
        let name = key(&service.name, &os);
        let task = {
            let mut building = self.image_runtime.building.lock().expect("building lock");
            if let Some(task) = building.get(&name) {
                return Ok(task.clone());
            }
            let task = TaskId::generate().to_string();
            // Reserved before the record is written, so a concurrent request joins it.
            building.insert(name.clone(), task.clone());
            task
        };
        let begun = self
            .tasks
            // Shared by every request that needs the image: the server's, cancellable by
            // an admin (a cancel fails every request that joined it).
            .begin_with_id(
                &task,
                "build_image",
                crate::tasks::SERVER_OWNER,
                Some(service.name.clone()),
            )
            .await;
        if let Err(err) = begun {
            self.image_runtime
                .building
                .lock()
                .expect("building lock")
                .remove(&name);
            return Err(err.into());
        }
        let manager = self.clone();
        let id = task.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let progress = manager.tasks.build_progress(&id, 0, 99);
            let cancel = hangar_image::Cancel::new();
            // The build runs on its own, so that a cancelled task still waits for it to
            // stop (its tools killed, its mounts undone) before it ends.
            let mut build = {
                let images = manager.images.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    images
                        .root_image_cancellable(&service, &os, progress, cancel)
                        .await
                })
            };
            let relay = {
                let token = manager.tasks.cancellation(&id);
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    token.cancelled().await;
                    cancel.cancel();
                })
            };
            let result = manager
                .run_task(&id, async {
                    match (&mut build).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(err)) => Err(error_chain(&err)),
                        Err(join) => Err(format!("the image build stopped: {join}")),
                    }
                })
                .await;
            relay.abort();
            if result.is_err() && !build.is_finished() {
                // A local build stops within a second or so (its tools killed, its mounts
                // undone); a source that ignores the cancellation is dropped after a while.
                cancel.cancel();
                match tokio::time::timeout(BUILD_STOP_WAIT, &mut build).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(join)) => {
                        tracing::warn!(task = %id, error = %join, "a cancelled image build stopped abnormally")
                    }
                    Err(_) => {
                        tracing::warn!(task = %id, "a cancelled image build did not stop; dropping it");
                        build.abort();
                    }
                }
            }
            let (state, error) = match &result {
                Ok(()) => (TaskState::Succeeded, None),
                Err((state, message)) => (*state, Some(message.as_str())),
            };
            tracing::info!(image = %name, task = %id, state = state.as_str(), elapsed_ms = started.elapsed().as_millis() as u64, "image build ended");
            let stage = match state {
                TaskState::Succeeded => "done",
                TaskState::Cancelled => "cancelled",
                _ => "failed",
            };
            manager
                .image_runtime
                .building
                .lock()
                .expect("building lock")
                .remove(&name);
            if let Err(err) = manager.tasks.end(&id, state, stage, error).await {
                tracing::warn!(task = %id, error = %err, "cannot record build outcome");
            }
            manager.tasks.forget(&id);
            manager.evict_images().await;
        });
        Ok(task)
    }

    /// Evicts least recently used layers that no VM uses and no promoted image needs,
    /// until the cache fits the budget. Returns the evicted hashes.
    pub async fn evict_images(&self) -> Vec<String> {
        let _serial = self.image_runtime.evicting.lock().await;
        if !self
            .image_runtime
            .building
            .lock()
            .expect("building lock")
            .is_empty()
        {
            // A build in flight may be about to use any layer.
            return Vec::new();
        }
        let Ok(users) = self.layer_users().await else {
            return Vec::new();
        };
        let mut pinned: HashSet<String> = HashSet::new();
        for name in self.promoted().await {
            if let Some((service, os)) = name.split_once('@')
                && let Some(service) = self.catalog.get(service)
            {
                pinned.extend(self.images.chain(service, os));
            }
        }
        let cached: Vec<Cached> = self
            .images
            .layers()
            .into_iter()
            .map(|layer| Cached {
                last_used_ms: self
                    .images
                    .last_used_ms(&layer.info.hash)
                    .unwrap_or(layer.info.built_at_ms),
                in_use: users.contains_key(&layer.info.hash),
                pinned: pinned.contains(&layer.info.hash),
                id: layer.info.hash,
                parent: layer.info.parent,
                size_bytes: layer.info.size_bytes,
            })
            .collect();
        let budget = self.config.image_budget_mib.saturating_mul(1 << 20);
        let mut evicted = Vec::new();
        // Layers used in the last minutes may be about to get a VM (a creation between
        // its image and its record): treat them as in use.
        let recent = now_ms().saturating_sub(RECENT_MS);
        let cached: Vec<Cached> = cached
            .into_iter()
            .map(|mut layer| {
                if layer.last_used_ms >= recent {
                    layer.in_use = true;
                }
                layer
            })
            .collect();
        for hash in choose_evictions(&cached, budget) {
            match self.images.evict(&hash) {
                Ok(()) => {
                    tracing::info!(layer = %hash, "evicted image layer (least recently used, over the disk budget)");
                    evicted.push(hash);
                }
                Err(err) => tracing::warn!(layer = %hash, error = %err, "cannot evict layer"),
            }
        }
        evicted
    }

    /// Builds the images of promoted services that are missing (after an eviction, or
    /// for a service that became popular while its image was being built elsewhere).
    pub async fn promote_images(self: &Arc<Self>) {
        for name in self.promoted().await {
            let Some((service, os)) = name.split_once('@') else {
                continue;
            };
            let Some(service) = self.catalog.get(service) else {
                continue;
            };
            if self.images.is_built(service, os) {
                continue;
            }
            let request = ServiceRequest {
                service: Some(service.name.clone()),
                env: [("os".to_string(), os.to_string())].into(),
                ..ServiceRequest::default()
            };
            match self.build_image(&request).await {
                Ok(task) => {
                    tracing::info!(image = %name, task = %task, "building a promoted image ahead of requests")
                }
                Err(err) => {
                    tracing::warn!(image = %name, error = %err, "cannot build a promoted image")
                }
            }
        }
    }

    /// Promotion and eviction, every `IMAGE_LOOP_INTERVAL`.
    pub fn spawn_image_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IMAGE_LOOP_INTERVAL);
            loop {
                tick.tick().await;
                if !manager.farm.leading() {
                    continue;
                }
                manager.promote_images().await;
                manager.evict_images().await;
            }
        })
    }
}

/// How long a cancelled or failed image build task waits for its build to stop before it
/// ends.
const BUILD_STOP_WAIT: Duration = Duration::from_secs(30);

/// An export being sent: the tar file, removed with its directory when dropped.
pub struct ExportFile {
    pub path: std::path::PathBuf,
    pub size_bytes: u64,
    _dir: tempfile::TempDir,
}

impl Manager {
    /// Writes a self-contained export of the request's service and environment (kernel,
    /// initramfs with the VM's configuration, flattened disk, `hangar-export.json`) as a
    /// tar file, building the image first if needed.
    pub async fn export(
        &self,
        request: &ServiceRequest,
        work: &std::path::Path,
    ) -> Result<ExportFile, ImageError> {
        let service = self.viable_service(request)?;
        let os = request.env.get("os").cloned().unwrap_or(service.os.clone());
        std::fs::create_dir_all(work).map_err(io_error("make the export work directory"))?;
        let dir = tempfile::Builder::new()
            .prefix("export-")
            .tempdir_in(work)
            .map_err(io_error("make a temporary export directory"))?;
        let mut config = hangar_host::guest::guest_config(
            "export",
            &service.name,
            Some(&service),
            &request.env,
            0,
        )?;
        // The image boots anywhere, any number of times: no clock or entropy of ours, no
        // machine-id (the guest's kernel seeds itself from virtio-rng).
        config.identity.unix_time_ms = 0;
        config.identity.entropy_hex = String::new();
        config.files.retain(|file| file.path != "/etc/machine-id");
        if let Some(root) = &mut config.root {
            root.device = format!("serial:{}", hangar_vmm::ROOT_SERIAL);
        }
        let tree = dir.path().join("image");
        let info = self
            .images
            .export(&service, &os, config, tree.clone())
            .await
            .map_err(ImageError::Export)?;
        let tar = dir.path().join("image.tar");
        let output = tokio::process::Command::new("tar")
            .arg("-C")
            .arg(&tree)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .await
            .map_err(io_error("run tar"))?;
        if !output.status.success() {
            return Err(ImageError::Tar(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ));
        }
        if let Err(err) = hangar_image::hostfs::remove_tree(&tree) {
            tracing::warn!(error = %err, "cannot remove the export's tree");
        }
        let size_bytes = std::fs::metadata(&tar)
            .map_err(io_error("read the export's size"))?
            .len();
        tracing::info!(service = %info.service, os = %info.os, size_bytes, "image exported");
        Ok(ExportFile {
            path: tar,
            size_bytes,
            _dir: dir,
        })
    }
}
