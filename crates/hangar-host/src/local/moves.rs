//! Archived VMs moving between hosts (cold migration), the local host's side: offering an
//! archived VM's files to a peer ([`LocalHost::offer_vm`], `vm-bundle.json` in its
//! directory) and taking one in from a peer ([`LocalHost::take_vm`]).
//!
//! An archived VM's directory holds `memory.<tier>`, `archive.json` (its spec, with this
//! host's paths) and `disk.qcow2` (a qcow2 layer over its base: the service's root disk, or
//! for a clone its template's frozen disk). The taker pulls the memory file and the disk
//! layer by hash (verified, resumable: the template pull's code), resolves every other
//! file the spec names to its own copy with the same content hash, rewrites the spec and
//! the layer's backing file to its paths, chooses its own host ports, and writes
//! `archive.json` last: a directory without it is no archive. Everything is assembled in
//! `.incoming-<id>` beside the VM directories and renamed into place at the end, so a
//! failure leaves nothing that looks like the VM (leftovers are removed at start-up).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar_vmm::{MemoryBacking, PortForward, VmSpec};

use super::{LocalHost, record, spec_of};
use crate::{HostError, PulledVm, TemplateBundle, TemplateRef, VmArrival, VmBundle};

/// The bundle an archived VM is offered as, beside its archive.
const BUNDLE_FILE: &str = "vm-bundle.json";

fn refuse(text: impl Into<String>) -> HostError {
    HostError::Migration(text.into())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl LocalHost {
    fn vm_dir(&self, id: &str) -> Result<PathBuf, HostError> {
        let vms_dir = self
            .config
            .vms_dir
            .as_ref()
            .ok_or_else(|| refuse("this host keeps no VM directories"))?;
        Ok(vms_dir.join(id))
    }

    /// Removes what a move of VM `id` to this host left half made, if anything.
    pub(super) fn drop_incoming(&self, id: &str) {
        if let Some(vms_dir) = &self.config.vms_dir {
            let staging = vms_dir.join(format!(".incoming-{id}"));
            if staging.exists()
                && let Err(err) = hangar_image::hostfs::remove_tree(&staging)
            {
                tracing::warn!(dir = %staging.display(), error = %err, "cannot remove a half-made move");
            }
        }
    }

    /// Archived VM `id` as a [`VmBundle`] (see [`crate::Host::vm_bundle`]).
    pub(super) async fn offer_vm(&self, id: &str) -> Result<VmBundle, HostError> {
        let dir = self.vm_dir(id)?;
        let archive = hangar_vmm::archive::read_record(&dir)
            .ok_or_else(|| refuse(format!("VM {id} has no complete archive on this host")))?;
        let spec = &archive.spec;
        let mut files = BTreeMap::new();
        let mut name = |path: &Path| -> Result<(), HostError> {
            let hash = self.images.content_hash(path).ok_or_else(|| {
                refuse(format!(
                    "{} is not named by its content on this host: VM {id} cannot move",
                    path.display()
                ))
            })?;
            files.insert(path.display().to_string(), hash);
            Ok(())
        };
        name(&spec.kernel)?;
        name(&spec.initramfs)?;
        for layer in &spec.layers {
            name(layer)?;
        }
        let template = match &spec.template {
            Some(template_dir) => Some(template_ref(template_dir, id)?),
            None => {
                if let Some(base) = &spec.base_image {
                    name(base)?;
                }
                None
            }
        };
        let disk_path = dir.join(hangar_vmm::template::DISK_FILE);
        let memory_path = archive.info.path.clone();
        let (memory, disk) = tokio::task::spawn_blocking(move || {
            let memory = super::templates::blob_of(&memory_path)?;
            let disk = disk_path
                .is_file()
                .then(|| super::templates::blob_of(&disk_path))
                .transpose()?;
            Ok::<_, HostError>((memory, disk))
        })
        .await
        .map_err(|err| refuse(format!("hashing VM {id}'s files: {err}")))??;
        let bundle = VmBundle {
            id: id.to_owned(),
            launch: record(spec)?,
            tier: archive.info.tier,
            memory,
            disk,
            files,
            template,
            qemu_version: archive.qemu_version.clone(),
        };
        let json = serde_json::to_vec_pretty(&bundle).map_err(HostError::Record)?;
        super::templates::write_file(&dir.join(BUNDLE_FILE), &json)?;
        Ok(bundle)
    }

    /// The file of an offered VM's bundle with this hash, if this host offers one.
    pub(super) fn offered_vm_file(&self, sha256: &str) -> Option<PathBuf> {
        offered_file_in(self.config.vms_dir.as_ref()?, sha256)
    }

    /// Takes in a peer's archived VM (see [`crate::Host::pull_vm`]).
    pub(super) async fn take_vm(&self, arrival: &VmArrival) -> Result<PulledVm, HostError> {
        let bundle = &arrival.bundle;
        let id = bundle.id.as_str();
        let dir = self.vm_dir(id)?;
        if self.hv.running().await?.iter().any(|running| running == id) {
            return Err(refuse(format!("VM {id} already runs on this host")));
        }
        let source = spec_of(&bundle.launch)?;
        let mut spec = self.resolve_files(arrival, &source).await?;
        let (forwards, direct) = self.forwards_for(&source, &arrival.direct_endpoints)?;
        spec.forwards = forwards;

        let staging = dir.with_file_name(format!(".incoming-{id}"));
        self.drop_incoming(id);
        let assembled = self.assemble_vm(arrival, &spec, &staging).await;
        let bytes = match assembled {
            Ok(bytes) => bytes,
            Err(err) => {
                let _ = hangar_image::hostfs::remove_tree(&staging);
                return Err(err);
            }
        };
        if dir.exists() {
            // What an earlier move left (no process runs it: checked above).
            hangar_image::hostfs::remove_tree(&dir)
                .map_err(|err| refuse(format!("removing the old {}: {err}", dir.display())))?;
        }
        if let Err(err) = std::fs::rename(&staging, &dir) {
            let _ = hangar_image::hostfs::remove_tree(&staging);
            return Err(io(&dir)(err));
        }
        tracing::info!(vm = %id, from = %arrival.from.host, bytes, "archived vm taken in from a peer");
        Ok(PulledVm {
            launch: record(&spec)?,
            direct_endpoints: direct,
            bytes,
        })
    }

    /// `source` (the VM's spec on its old host) with every file it names replaced by this
    /// host's copy of the same content.
    async fn resolve_files(
        &self,
        arrival: &VmArrival,
        source: &VmSpec,
    ) -> Result<VmSpec, HostError> {
        let bundle = &arrival.bundle;
        let silent: crate::ProgressFn = Arc::new(|_: &str, _: u8| {});
        // What this host holds that the VM may run over, by content hash.
        let mut held: HashMap<String, PathBuf> = HashMap::new();
        let mut hold = |path: &Path| {
            if let Some(hash) = self.images.content_hash(path) {
                held.insert(hash, path.to_owned());
            }
        };
        let assets = self.images.guest_assets().await?;
        hold(&assets.vmlinux);
        hold(&assets.initramfs);
        for service in &arrival.services {
            let os = arrival.os.clone().unwrap_or_else(|| service.os.clone());
            let root = self.images.root_image(service, &os, silent.clone()).await?;
            if let Some(base) = &root.base {
                hold(base);
            }
            for layer in &root.layers {
                hold(layer);
            }
        }
        let find = |path: &Path| -> Result<PathBuf, HostError> {
            let key = path.display().to_string();
            let hash = bundle
                .files
                .get(&key)
                .ok_or_else(|| refuse(format!("the bundle does not name {key}")))?;
            held.get(hash).cloned().ok_or_else(|| {
                refuse(format!(
                    "this host holds no file with the content of the VM's {key} (sha256 {hash})"
                ))
            })
        };
        let mut spec = source.clone();
        spec.kernel = find(&source.kernel)?;
        spec.initramfs = find(&source.initramfs)?;
        spec.layers = source
            .layers
            .iter()
            .map(|layer| find(layer))
            .collect::<Result<_, _>>()?;
        match &bundle.template {
            Some(wanted) => {
                let service = arrival
                    .services
                    .iter()
                    .find(|service| service.name == wanted.service)
                    .ok_or_else(|| {
                        refuse(format!(
                            "VM {} is a clone of {}'s template, which it does not offer",
                            bundle.id, wanted.service
                        ))
                    })?;
                let probe = self.template_probe_spec(service).await?;
                let (template, probe) =
                    self.find_template_as(service, &probe).ok_or_else(|| {
                        refuse(format!(
                            "this host holds no template of {}: pull it first",
                            service.name
                        ))
                    })?;
                let mine = self.content_key(service, &probe);
                if mine.as_deref() != Some(wanted.content_key.as_str()) {
                    return Err(refuse(format!(
                        "this host's template of {} was made from other images (content key \
                         {mine:?}, the VM's {})",
                        service.name, wanted.content_key
                    )));
                }
                spec.base_image = template.disk.clone();
                spec.template = Some(template.dir.clone());
                spec.memory = match (&source.memory, &template.ram) {
                    (MemoryBacking::Mapped { .. }, Some(ram)) => {
                        MemoryBacking::Mapped { file: ram.clone() }
                    }
                    (MemoryBacking::Mapped { .. }, None) => {
                        return Err(refuse(format!(
                            "this host's template of {} keeps no RAM file",
                            service.name
                        )));
                    }
                    (other, _) => other.clone(),
                };
            }
            None => {
                spec.base_image = source.base_image.as_deref().map(find).transpose()?;
            }
        }
        Ok(spec)
    }

    /// Host ports here for the VM's forwarded guest ports (found through its direct
    /// endpoints on the source, by port name), and its direct endpoints here.
    fn forwards_for(
        &self,
        source: &VmSpec,
        direct: &BTreeMap<String, String>,
    ) -> Result<(Vec<PortForward>, BTreeMap<String, String>), HostError> {
        let mut guest_ports = Vec::new();
        for (name, addr) in direct {
            let port = addr
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .ok_or_else(|| refuse(format!("direct endpoint {name}={addr} has no port")))?;
            let forward = source
                .forwards
                .iter()
                .find(|forward| forward.host_port == port)
                .ok_or_else(|| refuse(format!("no port forward of the VM is {name}={addr}")))?;
            guest_ports.push((name.clone(), forward.guest_port));
        }
        let (forwards, endpoints) = self.allocate_guest_ports(&guest_ports)?;
        let endpoints = endpoints
            .into_iter()
            .map(|(name, addr)| (name, addr.to_string()))
            .collect();
        Ok((forwards, endpoints))
    }

    /// Pulls the bundle's files into `staging`, points the disk layer at `spec`'s base and
    /// writes the archive's record (last). Returns the bytes pulled.
    async fn assemble_vm(
        &self,
        arrival: &VmArrival,
        spec: &VmSpec,
        staging: &Path,
    ) -> Result<u64, HostError> {
        let bundle = &arrival.bundle;
        std::fs::create_dir_all(staging).map_err(io(staging))?;
        let silent: crate::ProgressFn = Arc::new(|_: &str, _: u8| {});
        let pulled = self
            .images
            .pull_peer_blob(&bundle.memory, &arrival.from, "vm memory", &silent)
            .await?;
        let memory = hangar_vmm::archive::memory_path(staging, bundle.tier);
        move_file(&pulled, &memory)?;
        let mut bytes = bundle.memory.size;
        let mut disk_bytes = None;
        if let Some(blob) = &bundle.disk {
            let pulled = self
                .images
                .pull_peer_blob(blob, &arrival.from, "vm disk", &silent)
                .await?;
            let disk = staging.join(hangar_vmm::template::DISK_FILE);
            move_file(&pulled, &disk)?;
            let base = spec
                .base_image
                .as_ref()
                .ok_or_else(|| refuse("the VM has a disk layer but no base disk"))?;
            hangar_vmm::template::rebase_disk(&disk, base)
                .await
                .map_err(io(&disk))?;
            bytes += blob.size;
            disk_bytes = Some(std::fs::metadata(&disk).map_err(io(&disk))?.len());
        }
        let dir = staging.with_file_name(&bundle.id);
        let record = hangar_vmm::archive::ArchiveRecord {
            info: hangar_vmm::ArchiveInfo {
                tier: bundle.tier,
                // Where it lies once the directory is in place.
                path: hangar_vmm::archive::memory_path(&dir, bundle.tier),
                size_bytes: bundle.memory.size,
                memory_mib: spec.memory_mib,
                took_ms: 0,
            },
            disk: bundle
                .disk
                .as_ref()
                .map(|_| hangar_vmm::template::DISK_FILE.into()),
            disk_bytes,
            qemu_version: bundle.qemu_version.clone(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            spec: spec.clone(),
        };
        hangar_vmm::archive::write_record(staging, &record).map_err(io(staging))?;
        Ok(bytes)
    }
}

/// The file with content `sha256` of a bundle offered in `vms_dir` (see
/// [`LocalHost::offer_vm`]), if one is there now. A VM that moved away is removed file by
/// file, so its bundle record can outlive its files for a moment: a bundle whose file is
/// gone is passed over, and another bundle offering the same content (files are named by
/// hash; nothing stops two VMs from holding equal bytes) may answer instead.
fn offered_file_in(vms_dir: &Path, sha256: &str) -> Option<PathBuf> {
    std::fs::read_dir(vms_dir)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let dir = entry.path();
            let bytes = std::fs::read(dir.join(BUNDLE_FILE)).ok()?;
            let bundle: OfferedFiles = serde_json::from_slice(&bytes).ok()?;
            let file = if bundle.memory.sha256 == sha256 {
                hangar_vmm::archive::read_record(&dir)?.info.path
            } else if bundle.disk.is_some_and(|disk| disk.sha256 == sha256) {
                dir.join(hangar_vmm::template::DISK_FILE)
            } else {
                return None;
            };
            file.is_file().then_some(file)
        })
}

/// The files a `vm-bundle.json` names by hash (the rest of a [`VmBundle`] is not read).
#[derive(serde::Deserialize)]
struct OfferedFiles {
    memory: hangar_api::Blob,
    #[serde(default)]
    disk: Option<hangar_api::Blob>,
}

/// The template a clone's spec names, by the content key its bundle was offered with
/// (written when a peer first asked for it).
fn template_ref(template_dir: &Path, id: &str) -> Result<TemplateRef, HostError> {
    let bytes = std::fs::read(template_dir.join("bundle.json")).map_err(|_| {
        refuse(format!(
            "VM {id} is a clone of {}, which is not offered to peers (an outdated template, \
             or one no peer asked for yet)",
            template_dir.display()
        ))
    })?;
    let bundle: TemplateBundle = serde_json::from_slice(&bytes).map_err(HostError::Record)?;
    Ok(TemplateRef {
        service: bundle.service,
        content_key: bundle.content_key,
    })
}

/// Renames `from` to `to` (same file system: the blob store and the VMs are both under the
/// data dir), copying when they are not.
fn move_file(from: &Path, to: &Path) -> Result<(), HostError> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(io(to))?;
    let _ = std::fs::remove_file(from);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{BUNDLE_FILE, offered_file_in};

    fn offer(vms_dir: &std::path::Path, id: &str, memory: &str, disk: &str) -> std::path::PathBuf {
        let dir = vms_dir.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let bundle = serde_json::json!({
            "id": id,
            "memory": { "sha256": memory, "size": 1 },
            "disk": { "sha256": disk, "size": 1 },
        });
        std::fs::write(dir.join(BUNDLE_FILE), bundle.to_string()).unwrap();
        let file = dir.join(hangar_vmm::template::DISK_FILE);
        std::fs::write(&file, b"layer").unwrap();
        file
    }

    #[test]
    fn a_disk_two_vms_offer_is_served_from_the_one_still_there() {
        let vms = tempfile::tempdir().unwrap();
        let (disk, a_memory, b_memory) = ("d".repeat(64), "a".repeat(64), "b".repeat(64));
        let a = offer(vms.path(), "vm-a", &a_memory, &disk);
        let b = offer(vms.path(), "vm-b", &b_memory, &disk);
        let found = offered_file_in(vms.path(), &disk).unwrap();
        assert!(found == a || found == b, "{}", found.display());

        // Whichever was found goes away first, its bundle last (as a removal may order it):
        // the other's file is offered.
        std::fs::remove_file(&found).unwrap();
        let other = if found == a { &b } else { &a };
        assert_eq!(offered_file_in(vms.path(), &disk).as_ref(), Some(other));

        std::fs::remove_file(other).unwrap();
        assert_eq!(offered_file_in(vms.path(), &disk), None);
        assert_eq!(offered_file_in(vms.path(), &"e".repeat(64)), None);
    }
}
