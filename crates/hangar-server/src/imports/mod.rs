//! Machines imported from disk images (seed 003, claim 8): `POST /v1/imports` streams the
//! image into a private file under the data dir, [`hangar_image::import::import_disk`]
//! checks it (format pinned, no backing or data file, no foreign extent, no encryption,
//! sizes), stages it (identity stripped) and stores it as `DATA_DIR/models/NAME.qcow2`; the
//! store keeps the model ([`hangar_store::ImportRecord`]), so it survives a restart. The
//! import runs as a task of kind `import`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use hangar_api::{ImportQuery, ImportView};
use hangar_image::import::{DiskFormat, DiskLayout, ImportError};
use hangar_store::{ImportRecord, StoreError, TaskState, now_ms};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::manager::Manager;

/// Default vCPUs and memory of an imported machine's VMs.
const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u32 = 512;

/// The hostname an imported image is staged with until a VM of it is handed out.
pub const PLACEHOLDER_HOSTNAME: &str = "hangar-imported";

/// How an imported machine boots and what it serves: the store record's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportSpec {
    pub layout: DiskLayout,
    pub ports: BTreeMap<String, u16>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub virtual_bytes: u64,
    pub stripped: Vec<String>,
    pub timings_ms: BTreeMap<String, u64>,
    pub task: Option<String>,
}

/// Why an import, a listing or a removal failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportsError {
    /// The query is malformed (name, format, ports, sizes).
    #[error("{0}")]
    BadRequest(String),
    /// The image is refused (answered 422).
    #[error("the image is refused: {0}")]
    Refused(ImportError),
    #[error("a service or imported machine named {0:?} exists already")]
    NameTaken(String),
    #[error("no imported machine named {0:?}")]
    NotFound(String),
    #[error("{count} VM(s) of the imported machine {name:?} still live; delete them first")]
    InUse { name: String, count: usize },
    #[error("imports are not enabled on this server (no data dir)")]
    Disabled,
    #[error("the import failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The ports of an import query: `NAME=PORT` separated by commas.
pub fn parse_ports(text: Option<&str>) -> Result<BTreeMap<String, u16>, ImportsError> {
    let mut ports = BTreeMap::new();
    for item in text
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let Some((name, port)) = item.split_once('=') else {
            return Err(ImportsError::BadRequest(format!(
                "port {item:?} is not NAME=PORT"
            )));
        };
        if !hangar_core::catalog::is_name(name) {
            return Err(ImportsError::BadRequest(format!(
                "port name {name:?} must be lowercase letters, digits and '-'"
            )));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ImportsError::BadRequest(format!("port {item:?}: 1 to 65535")))?;
        if ports.insert(name.to_string(), port).is_some() {
            return Err(ImportsError::BadRequest(format!("port {name:?} twice")));
        }
    }
    Ok(ports)
}

/// How long an imported machine's VM may take from launch to its ports answering: a
/// firmware boot of a full OS under emulation (TCG) takes tens of seconds.
const IMPORTED_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The service an imported machine offers, when it can be booted: a full disk (its own
/// bootloader) with at least one port. A bare root filesystem is stored but not booted
/// (yet): it would need hangar's kernel and initramfs with the filesystem as root.
pub fn imported_service(record: &ImportRecord) -> Option<hangar_core::Service> {
    let spec: ImportSpec = serde_json::from_value(record.spec.clone()).ok()?;
    if !matches!(spec.layout, DiskLayout::FullDisk { .. }) || spec.ports.is_empty() {
        return None;
    }
    Some(hangar_core::Service::imported_machine(
        &record.name,
        &spec.ports,
        spec.vcpus,
        spec.memory_mib,
        IMPORTED_READY_TIMEOUT,
    ))
}

/// The view of a stored import.
pub fn import_view(record: ImportRecord) -> Result<ImportView, ImportsError> {
    let spec: ImportSpec = serde_json::from_value(record.spec)
        .map_err(|err| ImportsError::Failed(format!("unreadable import record: {err}")))?;
    let (layout, root_partition) = match spec.layout {
        DiskLayout::FullDisk { root_partition } => ("full-disk", Some(root_partition)),
        DiskLayout::Filesystem => ("filesystem", None),
    };
    Ok(ImportView {
        name: record.name,
        owner: record.owner,
        format: record.format,
        layout: layout.into(),
        root_partition,
        ports: spec.ports,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        virtual_bytes: spec.virtual_bytes,
        disk_bytes: record.disk_bytes,
        stripped: spec.stripped,
        task: spec.task,
        timings_ms: spec.timings_ms,
        created_at: crate::api::rfc3339(record.created_at_ms),
    })
}

/// Where the model disk of imported machine `name` lies under `models`.
pub fn model_path(models: &Path, name: &str) -> PathBuf {
    models.join(format!("{name}.qcow2"))
}

impl Manager {
    /// Imports the disk image `body` streams as machine `query.name` for `owner` (see the
    /// module's doc). Nothing of a refused or failed import is left: the work directory
    /// is removed on every path, the model is renamed into place last and removed again
    /// when the record cannot be written.
    pub async fn import_machine<S, E>(
        &self,
        owner: &str,
        query: &ImportQuery,
        body: S,
    ) -> Result<ImportView, ImportsError>
    where
        S: futures::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let name = query.name.as_str();
        if !hangar_core::catalog::is_name(name) {
            return Err(ImportsError::BadRequest(format!(
                "name {name:?}: lowercase letters, digits and '-', starting with a letter, at most 40"
            )));
        }
        let format: DiskFormat = query.format.parse().map_err(ImportsError::Refused)?;
        let ports = parse_ports(query.ports.as_deref())?;
        let vcpus = query.vcpus.unwrap_or(DEFAULT_VCPUS);
        let memory_mib = query.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if !(1..=64).contains(&vcpus) || !(64..=256 * 1024).contains(&memory_mib) {
            return Err(ImportsError::BadRequest(
                "vcpus must be 1 to 64 and memory_mib 64 to 262144".into(),
            ));
        }
        let models = self
            .config
            .models_dir
            .clone()
            .ok_or(ImportsError::Disabled)?;
        if self.catalog.get(name).is_some() || self.store.import(name).await?.is_some() {
            return Err(ImportsError::NameTaken(name.to_string()));
        }

        let (task, outcome) = self.tasks.begin("import", Some(name.to_string())).await?;
        drop(outcome);
        self.tasks.forget(&task);
        let progress = self.tasks.progress(&task);
        progress("upload", 5);
        let result = self
            .run_import(
                &models,
                &task,
                owner,
                name,
                format,
                ports,
                (vcpus, memory_mib),
                body,
                &progress,
            )
            .await;
        let (state, stage, error) = match &result {
            Ok(_) => (TaskState::Succeeded, "done", None),
            Err(err) => (TaskState::Failed, "failed", Some(err.to_string())),
        };
        if let Err(err) = self.tasks.end(&task, state, stage, error.as_deref()).await {
            tracing::warn!(task = %task, error = %err, "cannot record the import's outcome");
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_import<S, E>(
        &self,
        models: &Path,
        task: &str,
        owner: &str,
        name: &str,
        format: DiskFormat,
        ports: BTreeMap<String, u16>,
        (vcpus, memory_mib): (u32, u32),
        body: S,
        progress: &hangar_host::ProgressFn,
    ) -> Result<ImportView, ImportsError>
    where
        S: futures::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        hangar_image::hostfs::secure_dir(models)
            .map_err(|err| ImportsError::Failed(err.to_string()))?;
        let work = models.join(format!(".import-{task}"));
        hangar_image::hostfs::secure_dir(&work)
            .map_err(|err| ImportsError::Failed(err.to_string()))?;
        let result = self
            .import_into(
                models,
                &work,
                task,
                owner,
                name,
                format,
                ports,
                (vcpus, memory_mib),
                body,
                progress,
            )
            .await;
        let removed = tokio::task::spawn_blocking({
            let work = work.clone();
            move || hangar_image::hostfs::remove_tree(&work)
        })
        .await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!(dir = %work.display(), "cannot remove an import's work directory");
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn import_into<S, E>(
        &self,
        models: &Path,
        work: &Path,
        task: &str,
        owner: &str,
        name: &str,
        format: DiskFormat,
        ports: BTreeMap<String, u16>,
        (vcpus, memory_mib): (u32, u32),
        mut body: S,
        progress: &hangar_host::ProgressFn,
    ) -> Result<ImportView, ImportsError>
    where
        S: futures::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let limits = self.config.import_limits;
        let started = Instant::now();
        let upload = work.join(format!("upload.{format}"));
        let mut file = tokio::fs::File::create(&upload)
            .await
            .map_err(|err| ImportsError::Failed(format!("create {}: {err}", upload.display())))?;
        let mut received: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|err| ImportsError::Failed(format!("the upload broke off: {err}")))?;
            received += chunk.len() as u64;
            if received > limits.max_upload_bytes {
                return Err(ImportsError::Refused(ImportError::RefusedUploadSize {
                    limit: limits.max_upload_bytes,
                }));
            }
            file.write_all(&chunk)
                .await
                .map_err(|err| ImportsError::Failed(format!("write the upload: {err}")))?;
        }
        file.flush()
            .await
            .map_err(|err| ImportsError::Failed(format!("write the upload: {err}")))?;
        drop(file);
        let upload_ms = started.elapsed().as_millis() as u64;
        progress("check", 30);

        let target = model_path(models, name);
        let imported = tokio::task::spawn_blocking({
            let (upload, work, target) = (upload.clone(), work.to_owned(), target.clone());
            move || {
                hangar_image::import::import_disk(
                    &upload,
                    format,
                    &limits,
                    &work,
                    &target,
                    PLACEHOLDER_HOSTNAME,
                )
            }
        })
        .await
        .map_err(|err| ImportsError::Failed(format!("the import stopped: {err}")))?
        .map_err(|err| {
            if err.is_refusal() {
                ImportsError::Refused(err)
            } else {
                ImportsError::Failed(crate::api::error::error_chain(&err))
            }
        })?;
        progress("record", 95);

        let mut timings_ms = BTreeMap::from([("upload".to_string(), upload_ms)]);
        for (step, took) in &imported.timings {
            timings_ms.insert((*step).to_string(), took.as_millis() as u64);
        }
        let disk_bytes = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
        let spec = ImportSpec {
            layout: imported.layout,
            ports,
            vcpus,
            memory_mib,
            virtual_bytes: imported.virtual_bytes,
            stripped: imported.stripped,
            timings_ms,
            task: Some(task.to_string()),
        };
        let record = ImportRecord {
            name: name.to_string(),
            owner: owner.to_string(),
            format: format.to_string(),
            spec: serde_json::to_value(&spec)
                .map_err(|err| ImportsError::Failed(err.to_string()))?,
            disk_bytes,
            created_at_ms: now_ms(),
        };
        if let Err(err) = self.store.insert_import(&record).await {
            let _ = std::fs::remove_file(&target);
            return Err(match err {
                StoreError::Conflict(_) => ImportsError::NameTaken(name.to_string()),
                other => ImportsError::Store(other),
            });
        }
        tracing::info!(name, task, timings = ?spec.timings_ms, "imported a machine");
        self.offer_import(&record);
        import_view(record)
    }

    /// Offers imported machine `record` as a service, when it can be booted.
    fn offer_import(&self, record: &ImportRecord) {
        match imported_service(record) {
            Some(service) => {
                if let Err(err) = self.catalog.add_imported(service) {
                    tracing::warn!(name = %record.name, error = %err, "cannot offer an imported machine");
                }
            }
            None => {
                tracing::info!(name = %record.name, "imported machine kept, not offered (a bare filesystem or no ports)");
            }
        }
    }

    /// Offers every imported machine in the store as a service (at start-up).
    pub async fn load_imports(&self) -> Result<usize, ImportsError> {
        let records = self.store.imports().await?;
        for record in &records {
            self.offer_import(record);
        }
        Ok(records.len())
    }

    /// The imported machines, by name.
    pub async fn imports(&self) -> Result<Vec<ImportView>, ImportsError> {
        self.store
            .imports()
            .await?
            .into_iter()
            .map(import_view)
            .collect()
    }

    /// Removes imported machine `name`: its record and its model disk. Refused while VMs
    /// of it live.
    pub async fn delete_import(&self, name: &str) -> Result<ImportView, ImportsError> {
        let record = self
            .store
            .import(name)
            .await?
            .ok_or_else(|| ImportsError::NotFound(name.to_string()))?;
        let live = self
            .store
            .vms(false)
            .await?
            .into_iter()
            .filter(|vm| vm.services.iter().any(|s| s == name))
            .count();
        if live > 0 {
            return Err(ImportsError::InUse {
                name: name.to_string(),
                count: live,
            });
        }
        let view = import_view(record)?;
        self.store.remove_import(name).await?;
        self.catalog.remove_imported(name);
        if let Some(models) = &self.config.models_dir {
            let path = model_path(models, name);
            if let Err(err) = std::fs::remove_file(&path)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove a model disk");
            }
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests;
