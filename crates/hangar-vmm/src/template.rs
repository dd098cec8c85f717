//! Templates: a VM booted to its ready state, paused and snapshotted, from which new VMs
//! are cloned instead of booted (seed 000's pre-constructed image at a checkpoint).
//!
//! # Files in a template directory
//!
//! | file            | what                                                          |
//! |-----------------|---------------------------------------------------------------|
//! | `memory.raw`    | QEMU's migration stream of the paused VM, uncompressed: clones |
//! |                 | read it at full speed, and delta archives refer to its pages  |
//! | `disk.qcow2`    | the template VM's disk layer, read-only; each clone gets its  |
//! |                 | own copy-on-write layer over it                               |
//! | `template.json` | [`TemplateInfo`]                                              |
//!
//! The directory is assembled under `<dir>.tmp` and renamed into place, so a directory
//! with `template.json` is complete; anything else is debris of an interrupted build.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::VmSpec;
use crate::archive::sync_dir;

pub const RECORD_FILE: &str = "template.json";
pub const MEMORY_FILE: &str = "memory.raw";
pub const DISK_FILE: &str = "disk.qcow2";

/// What `template.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub dir: PathBuf,
    /// The raw migration stream.
    pub memory: PathBuf,
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
    (info.memory.is_file() && info.disk.as_ref().is_none_or(|disk| disk.is_file())).then_some(info)
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
        for file in [MEMORY_FILE, DISK_FILE] {
            let path = staging.join(file);
            if path.exists() {
                // The server's, not the user QEMU ran as: clones' QEMUs read it, none
                // may write it (see PLATFORM.md: QEMU opens it writable).
                // SAFETY: geteuid(2) and getegid(2) cannot fail.
                let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
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
        let info = TemplateInfo {
            dir: PathBuf::new(),
            memory: PathBuf::new(),
            disk: None,
            size_bytes: 0,
            took_ms: 5,
            qemu_version: "7.2.0".into(),
            created_unix_ms: 1,
            spec: spec(),
        };
        let made = assemble(
            &vm.join("memory.raw"),
            Some(&vm.join("disk.qcow2")),
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
    fn an_incomplete_template_is_none() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("svc");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), b"x").unwrap();
        assert_eq!(read(&dir), None, "no record");
    }
}
