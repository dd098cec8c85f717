//! Templates: a VM booted to its ready state, paused and snapshotted, from which new VMs
//! are cloned instead of booted (seed 000's pre-constructed image at a checkpoint).
//!
//! # Files in a template directory
//!
//! | file            | what                                                          |
//! |-----------------|---------------------------------------------------------------|
//! | `ram`           | the guest's RAM, byte for byte (a *mapped* template): clones   |
//! |                 | map it privately, copy-on-write ([`crate::MemoryBacking`])    |
//! | `memory.raw`    | QEMU's migration stream of the paused VM, uncompressed: of a  |
//! |                 | mapped template only the device state (tens of KB, written    |
//! |                 | with `x-ignore-shared`); of an older, unmapped one the whole  |
//! |                 | memory too, which clones read through the stream              |
//! | `disk.qcow2`    | the template VM's disk layer, read-only; each clone gets its  |
//! |                 | own copy-on-write layer over it                               |
//! | `template.json` | [`TemplateInfo`]                                              |
//!
//! The directory is assembled under `<dir>.tmp` and renamed into place, so a directory
//! with `template.json` is complete; anything else is debris of an interrupted build.
//!
//! # The RAM file is never written
//!
//! Every clone's QEMU maps `ram`; QEMU 7.2 opens it read-write even for a private mapping
//! (`readonly=on` maps it read-only and the guest hangs), so the file's safety rests on
//! what hangar does with it: no clone maps it shared, no template-backed VM has a balloon
//! (a file-backed guest giving memory back punches holes in the file), nothing rewrites
//! it in place (a template is replaced by a new directory, renamed into place), and its
//! checksum ([`TemplateInfo::ram_xxh64`]) is taken when it is made and checked by
//! [`verify_ram`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::VmSpec;
use crate::archive::sync_dir;

pub const RECORD_FILE: &str = "template.json";
pub const MEMORY_FILE: &str = "memory.raw";
pub const DISK_FILE: &str = "disk.qcow2";
pub const RAM_FILE: &str = "ram";

/// What `template.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub dir: PathBuf,
    /// The raw migration stream (device state only when [`TemplateInfo::ram`] is set).
    pub memory: PathBuf,
    /// The guest's RAM as a file, mapped by clones; none for an older template whose
    /// stream holds the memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<PathBuf>,
    /// XXH64 of [`TemplateInfo::ram`] when the template was made: what the file must still
    /// hold, and the identity delta archives of clones are made against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_xxh64: Option<u64>,
    /// The frozen disk layer (none for a VM without a root disk).
    pub disk: Option<PathBuf>,
    /// Bytes on disk: memory stream plus disk layer.
    pub size_bytes: u64,
    /// How long snapshotting took.
    pub took_ms: u64,
    /// The QEMU that wrote the stream.
    pub qemu_version: String,
    pub created_unix_ms: u64,
    /// The template VM's configuration: what clones run with.
    pub spec: VmSpec,
}

/// The template in `dir`, if it is complete.
pub fn read(dir: &Path) -> Option<TemplateInfo> {
    let bytes = std::fs::read(dir.join(RECORD_FILE)).ok()?;
    let info: TemplateInfo = serde_json::from_slice(&bytes)
        .inspect_err(
            |err| tracing::warn!(dir = %dir.display(), error = %err, "unreadable template record"),
        )
        .ok()?;
    (info.memory.is_file()
        && info.disk.as_ref().is_none_or(|disk| disk.is_file())
        && info.ram.as_ref().is_none_or(|ram| ram.is_file()))
    .then_some(info)
}

/// The spec a VM launched as `spec` runs with once cloned from `template`: the template's
/// guest-visible machine (kernel, command line, disk chain, layers, memory) with `spec`'s
/// own id, ports and priority.
pub fn clone_spec(spec: &VmSpec, template: &TemplateInfo) -> VmSpec {
    VmSpec {
        kernel: template.spec.kernel.clone(),
        initramfs: template.spec.initramfs.clone(),
        cmdline: template.spec.cmdline.clone(),
        base_image: template.disk.clone(),
        layers: template.spec.layers.clone(),
        layer_slots: template.spec.layer_slots,
        ram_tail_kib: template.spec.ram_tail_kib,
        segment_nic: template.spec.segment_nic,
        pre_os: false,
        template: Some(template.dir.clone()),
        memory: match &template.ram {
            Some(file) => crate::MemoryBacking::Mapped { file: file.clone() },
            None => crate::MemoryBacking::Anonymous,
        },
        ..spec.clone()
    }
}

/// XXH64 of a file (streamed): a template RAM file's checksum.
pub fn file_xxh64(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crate::delta::Xxh64::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.digest());
        }
        hasher.update(&buffer[..n]);
    }
}

/// Whether a mapped template's RAM file still holds what it held when the template was
/// made (`Ok(true)` for a template without one).
pub fn verify_ram(info: &TemplateInfo) -> std::io::Result<bool> {
    match (&info.ram, info.ram_xxh64) {
        (Some(ram), Some(expected)) => Ok(file_xxh64(ram)? == expected),
        (Some(_), None) => Ok(false),
        (None, _) => Ok(true),
    }
}

/// `<dir>.tmp`: where a template is assembled.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Moves a snapshot (memory stream and disk layer) from `from` into the template `dir`,
/// writes `template.json` and makes the files read-only; atomically (staged, then renamed).
pub fn assemble(
    from_memory: &Path,
    from_disk: Option<&Path>,
    from_ram: Option<&Path>,
    dir: &Path,
    mut info: TemplateInfo,
) -> std::io::Result<TemplateInfo> {
    use std::os::unix::fs::PermissionsExt;
    let staging = staging_dir(dir);
    let _ = std::fs::remove_dir_all(&staging);
    let result = (|| {
        std::fs::create_dir_all(&staging)?;
        std::fs::rename(from_memory, staging.join(MEMORY_FILE))?;
        info.dir = dir.to_owned();
        info.memory = dir.join(MEMORY_FILE);
        info.disk = None;
        info.size_bytes = std::fs::metadata(staging.join(MEMORY_FILE))?.len();
        if let Some(disk) = from_disk {
            std::fs::rename(disk, staging.join(DISK_FILE))?;
            info.disk = Some(dir.join(DISK_FILE));
            info.size_bytes += std::fs::metadata(staging.join(DISK_FILE))?.len();
        }
        info.ram = None;
        if let Some(ram) = from_ram {
            let staged = staging.join(RAM_FILE);
            std::fs::rename(ram, &staged)?;
            std::fs::File::open(&staged)?.sync_all()?;
            if info.ram_xxh64.is_none() {
                info.ram_xxh64 = Some(file_xxh64(&staged)?);
            }
            info.ram = Some(dir.join(RAM_FILE));
            info.size_bytes += std::fs::metadata(&staged)?.len();
        }
        for file in [MEMORY_FILE, DISK_FILE, RAM_FILE] {
            let path = staging.join(file);
            if path.exists() {
                // The server's, not the user QEMU ran as: clones' QEMUs read it, none
                // may write it (see PLATFORM.md: QEMU opens it writable).
                // SAFETY: geteuid(2) and getegid(2) cannot fail.
                let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                // QEMU 7.2 opens a memory file read-write even to map it privately: the
                // RAM file is writable to its owner (and, confined, to the clones' group;
                // see the module doc for what keeps it unwritten).
                let mode = if file == RAM_FILE { 0o600 } else { 0o400 };
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
        }
        let record = staging.join(RECORD_FILE);
        std::fs::write(&record, serde_json::to_vec_pretty(&info)?)?;
        std::fs::File::open(&record)?.sync_all()?;
        sync_dir(&staging)?;
        std::fs::rename(&staging, dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(info)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Points the qcow2 layer `disk` at `base` as its backing file, without touching its data
/// (`qemu-img rebase -u`): for a template layer copied from another host, whose header names
/// that host's path of the same base disk.
pub async fn rebase_disk(disk: &Path, base: &Path) -> std::io::Result<()> {
    let base = std::path::absolute(base)?;
    let output = tokio::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(disk)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "qemu-img rebase: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Removes a template directory (and any staging debris beside it).
pub fn remove(dir: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(staging_dir(dir));
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: "t".into(),
            vcpus: 1,
            memory_mib: 64,
            ram_tail_kib: 0,
            segment_nic: false,
            egress: hangar_core::EgressPolicy::Open,
            kernel: "k".into(),
            initramfs: "i".into(),
            cmdline: String::new(),
            base_image: None,
            layers: Vec::new(),
            forwards: vec![],
            pre_os: false,
            layer_slots: 0,
            background: false,
            template: None,
            firmware: false,
            memory: Default::default(),
        }
    }

    /// A record to assemble (`assemble` fills in the paths and sizes).
    fn info() -> TemplateInfo {
        TemplateInfo {
            dir: PathBuf::new(),
            memory: PathBuf::new(),
            ram: None,
            ram_xxh64: None,
            disk: None,
            size_bytes: 0,
            took_ms: 5,
            qemu_version: "7.2.0".into(),
            created_unix_ms: 1,
            spec: spec(),
        }
    }

    #[test]
    fn assembles_atomically_and_reads_back() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        std::fs::write(vm.join("memory.raw"), b"stream").unwrap();
        std::fs::write(vm.join("disk.qcow2"), b"disk").unwrap();
        let dir = root.path().join("templates").join("svc-abc");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        assert_eq!(read(&dir), None);
        let info = info();
        let made = assemble(
            &vm.join("memory.raw"),
            Some(&vm.join("disk.qcow2")),
            None,
            &dir,
            info,
        )
        .unwrap();
        assert_eq!(made.size_bytes, 10);
        assert_eq!(made.disk, Some(dir.join(DISK_FILE)));
        assert_eq!(read(&dir), Some(made));
        assert!(!staging_dir(&dir).exists());
        assert!(!vm.join("memory.raw").exists(), "moved, not copied");
        let mode = std::fs::metadata(dir.join(MEMORY_FILE))
            .unwrap()
            .permissions();
        assert!(mode.readonly());
        remove(&dir).unwrap();
        assert_eq!(read(&dir), None);
    }

    #[test]
    fn a_mapped_template_keeps_its_ram_and_its_checksum() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        std::fs::write(vm.join("memory.raw"), b"devices").unwrap();
        std::fs::write(vm.join(RAM_FILE), vec![7u8; 3 * 4096]).unwrap();
        let dir = root.path().join("svc-abc");
        let info = info();
        let made = assemble(
            &vm.join("memory.raw"),
            None,
            Some(&vm.join(RAM_FILE)),
            &dir,
            info,
        )
        .unwrap();
        assert_eq!(made.ram, Some(dir.join(RAM_FILE)));
        assert_eq!(made.size_bytes, 7 + 3 * 4096);
        assert_eq!(read(&dir), Some(made.clone()));
        assert!(verify_ram(&made).unwrap());
        let clone = clone_spec(&spec(), &made);
        // The clone maps the template's RAM: it has the template's size, tail included
        // (`spec()` was planned without one).
        let mut tailed = made.clone();
        tailed.spec.ram_tail_kib = 8;
        assert_eq!(clone_spec(&spec(), &tailed).ram_tail_kib, 8);
        assert_eq!(
            clone.memory,
            crate::MemoryBacking::Mapped {
                file: dir.join(RAM_FILE)
            }
        );
        assert_eq!(clone.template, Some(dir.clone()));
        // Any change to the file is seen.
        use std::os::unix::fs::{FileExt, PermissionsExt};
        std::fs::set_permissions(dir.join(RAM_FILE), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(RAM_FILE))
            .unwrap();
        file.write_all_at(&[0], 4096).unwrap();
        assert!(!verify_ram(&made).unwrap());
        // A RAM file gone: no template.
        std::fs::remove_file(dir.join(RAM_FILE)).unwrap();
        assert_eq!(read(&dir), None);
    }

    #[test]
    fn an_incomplete_template_is_none() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("svc");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), b"x").unwrap();
        assert_eq!(read(&dir), None, "no record");
    }
}
