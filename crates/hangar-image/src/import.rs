//! Importing an existing machine's disk image (seed 003, claim 8): checked safely, staged
//! with its identity stripped, and stored as a qcow2 hangar owns.
//!
//! The pipeline, [`import_disk`], over an upload already written to a private file:
//!
//! 1. **Checked** ([`inspect`]): `qemu-img info --output=json -f FORMAT`, with the format the
//!    user named, never probed (a raw upload that looks like a qcow2 header stays raw). Refused:
//!    a backing file (a crafted qcow2 whose backing file is `/etc/shadow` would otherwise be
//!    read into the model), an external data file, a vmdk extent that is not the upload
//!    itself, encryption, a virtual size over the limit, a format qemu-img reports other than
//!    the one named. `qemu-img info` never opens a backing file.
//! 2. **Converted to raw** in the work directory (`qemu-img convert -f FORMAT -O raw`), which
//!    is only done after the checks pass, so no backing file or extent is ever read.
//! 3. **Staged** ([`strip_identity`]): the raw disk partitions read from its MBR or GPT, each on
//!    a loop device over its byte range, the root filesystem found by its `/etc/os-release`
//!    (a partition, or the whole disk when it is a bare filesystem), mounted `nodev,nosuid,noexec`, and the machine's identity
//!    removed: machine-id emptied, SSH host keys, DHCP and NetworkManager leases, cloud-init
//!    instance data and the random seed removed, the hostname set to a placeholder. Nothing
//!    in the guest's tree is followed out of it: every path is walked component by component
//!    without following links, and a link where a file is expected is removed, not written
//!    through. The mount and the loop device are undone on every path out.
//! 4. **Stored**: `qemu-img convert -f raw -O qcow2` to a temporary name next to the target,
//!    renamed into place.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::hostfs;
use crate::tools;

/// The disk formats an import accepts; the user names one and qemu-img is held to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
    Vmdk,
}

impl DiskFormat {
    /// qemu-img's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Vmdk => "vmdk",
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = ImportError;
    fn from_str(s: &str) -> Result<Self, ImportError> {
        match s {
            "qcow2" => Ok(DiskFormat::Qcow2),
            "raw" | "img" => Ok(DiskFormat::Raw),
            "vmdk" => Ok(DiskFormat::Vmdk),
            other => Err(ImportError::UnknownFormat(other.to_string())),
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the imported disk boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskLayout {
    /// A partitioned disk with its own bootloader; the root filesystem is partition
    /// `root_partition` (1-based).
    FullDisk { root_partition: u32 },
    /// A bare root filesystem at offset 0 (no partition table): booted with hangar's own
    /// kernel and initramfs.
    Filesystem,
}

/// Sizes an import may not exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    /// The most bytes the upload itself may hold.
    pub max_upload_bytes: u64,
    /// The largest virtual disk size accepted.
    pub max_virtual_bytes: u64,
}

impl Default for ImportLimits {
    /// 8 GiB uploads, 64 GiB virtual disks.
    fn default() -> Self {
        ImportLimits {
            max_upload_bytes: 8 << 30,
            max_virtual_bytes: 64 << 30,
        }
    }
}

/// What the checks found in an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub format: DiskFormat,
    pub virtual_bytes: u64,
    pub actual_bytes: u64,
}

/// An imported disk in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedDisk {
    pub path: PathBuf,
    pub layout: DiskLayout,
    pub virtual_bytes: u64,
    /// What staging removed or changed, as paths inside the guest.
    pub stripped: Vec<String>,
    /// Time spent checking, converting to raw, staging and storing.
    pub timings: Vec<(&'static str, Duration)>,
}

/// Why an import was refused or failed. The `Refused*` kinds are the upload's fault (422);
/// the others are the host's.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("unknown disk format {0:?}: name one of qcow2, raw, vmdk")]
    UnknownFormat(String),
    #[error(
        "the image has a backing file ({0}); import a standalone image (qemu-img convert it first)"
    )]
    RefusedBackingFile(String),
    #[error("the image has an external data file ({0}); import a standalone image")]
    RefusedDataFile(String),
    #[error(
        "the vmdk names an extent outside the upload ({0}); import a monolithic vmdk or convert it"
    )]
    RefusedExtent(String),
    #[error("the image is encrypted; import a decrypted image")]
    RefusedEncrypted,
    #[error("the image's virtual size {size} bytes exceeds the limit of {limit} bytes")]
    RefusedVirtualSize { size: u64, limit: u64 },
    #[error("the upload exceeds the limit of {limit} bytes")]
    RefusedUploadSize { limit: u64 },
    #[error("the image is not a valid {format} image: {detail}")]
    RefusedUnreadable { format: DiskFormat, detail: String },
    #[error("qemu-img reports format {found}, not the {named} named")]
    RefusedFormatMismatch { named: DiskFormat, found: String },
    #[error(
        "no root filesystem found: no partition or whole-disk filesystem holds /etc/os-release"
    )]
    RefusedNoRoot,
    #[error("importing needs root (loop devices and mounts)")]
    NotRoot,
    #[error(transparent)]
    Asset(#[from] crate::AssetError),
    #[error(transparent)]
    HostFs(#[from] hostfs::HostFsError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImportError {
    /// Whether the upload itself is at fault (answered 422), rather than the host.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ImportError::UnknownFormat(_)
                | ImportError::RefusedBackingFile(_)
                | ImportError::RefusedDataFile(_)
                | ImportError::RefusedExtent(_)
                | ImportError::RefusedEncrypted
                | ImportError::RefusedVirtualSize { .. }
                | ImportError::RefusedUploadSize { .. }
                | ImportError::RefusedUnreadable { .. }
                | ImportError::RefusedFormatMismatch { .. }
                | ImportError::RefusedNoRoot
        )
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> ImportError {
        ImportError::Io {
            context: context.into(),
            source,
        }
    }
}

/// `qemu-img info --output=json`, the fields the checks read.
#[derive(Debug, Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename", default)]
    full_backing_filename: Option<String>,
    #[serde(default)]
    encrypted: Option<bool>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: serde_json::Value,
}

/// Checks the image at `path`, read as `format` only, against `limits`.
pub fn inspect(
    path: &Path,
    format: DiskFormat,
    limits: &ImportLimits,
) -> Result<ImageFacts, ImportError> {
    let size = std::fs::metadata(path)
        .map_err(|e| ImportError::io(format!("stat {}", path.display()), e))?
        .len();
    if size > limits.max_upload_bytes {
        return Err(ImportError::RefusedUploadSize {
            limit: limits.max_upload_bytes,
        });
    }
    let qemu_img = tools::find("qemu-img", "qemu-utils")?;
    let output = Command::new(qemu_img)
        .args(["info", "--output=json", "-f", format.as_str()])
        .arg(path)
        .output()
        .map_err(|e| ImportError::io("run qemu-img info", e))?;
    if !output.status.success() {
        return Err(ImportError::RefusedUnreadable {
            format,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let info: QemuImgInfo =
        serde_json::from_slice(&output.stdout).map_err(|e| ImportError::RefusedUnreadable {
            format,
            detail: format!("qemu-img info answered unreadable JSON: {e}"),
        })?;
    check_info(path, format, limits, &info)
}

fn check_info(
    path: &Path,
    format: DiskFormat,
    limits: &ImportLimits,
    info: &QemuImgInfo,
) -> Result<ImageFacts, ImportError> {
    if info.format != format.as_str() {
        return Err(ImportError::RefusedFormatMismatch {
            named: format,
            found: info.format.clone(),
        });
    }
    if let Some(backing) = info
        .full_backing_filename
        .as_ref()
        .or(info.backing_filename.as_ref())
    {
        return Err(ImportError::RefusedBackingFile(backing.clone()));
    }
    if info.encrypted == Some(true) {
        return Err(ImportError::RefusedEncrypted);
    }
    if let Some(specific) = &info.format_specific
        && let Some(data) = specific.data.as_object()
    {
        if let Some(file) = data.get("data-file") {
            return Err(ImportError::RefusedDataFile(
                file.as_str().unwrap_or("?").to_string(),
            ));
        }
        if data.contains_key("encrypt") {
            return Err(ImportError::RefusedEncrypted);
        }
        if specific.kind == "vmdk" {
            // qemu-img names each extent as it opened it: the upload's own path for a
            // monolithic vmdk, another file for a descriptor that points elsewhere.
            let extents = data.get("extents").and_then(|e| e.as_array());
            for extent in extents.into_iter().flatten() {
                let name = extent
                    .get("filename")
                    .and_then(|f| f.as_str())
                    .unwrap_or("");
                if Path::new(name) != path {
                    return Err(ImportError::RefusedExtent(name.to_string()));
                }
            }
        }
    }
    if info.virtual_size > limits.max_virtual_bytes {
        return Err(ImportError::RefusedVirtualSize {
            size: info.virtual_size,
            limit: limits.max_virtual_bytes,
        });
    }
    Ok(ImageFacts {
        format,
        virtual_bytes: info.virtual_size,
        actual_bytes: info.actual_size,
    })
}

/// Imports the upload at `upload` (read as `format`) into `target` (a qcow2), using `work`
/// (a private directory on the same filesystem, removed by the caller) for the raw copy it
/// stages. `hostname` is the placeholder the image gets. Nothing is left at `target` on
/// failure.
pub fn import_disk(
    upload: &Path,
    format: DiskFormat,
    limits: &ImportLimits,
    work: &Path,
    target: &Path,
    hostname: &str,
) -> Result<ImportedDisk, ImportError> {
    let mut timings = Vec::new();
    let started = Instant::now();
    let facts = inspect(upload, format, limits)?;
    timings.push(("check", started.elapsed()));

    let started = Instant::now();
    let raw = work.join("disk.raw");
    let qemu_img = tools::find("qemu-img", "qemu-utils")?;
    tools::run(
        Command::new(&qemu_img)
            .args(["convert", "-f", format.as_str(), "-O", "raw"])
            .arg(upload)
            .arg(&raw),
    )?;
    timings.push(("convert", started.elapsed()));

    let started = Instant::now();
    let staged = strip_identity(&raw, work, hostname)?;
    timings.push(("stage", started.elapsed()));

    let started = Instant::now();
    let partial = target.with_extension("qcow2.part");
    let _ = std::fs::remove_file(&partial);
    let stored = tools::run(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&partial),
    )
    .map_err(ImportError::from)
    .and_then(|_| {
        std::fs::rename(&partial, target)
            .map_err(|e| ImportError::io(format!("rename to {}", target.display()), e))
    });
    if let Err(err) = stored {
        let _ = std::fs::remove_file(&partial);
        return Err(err);
    }
    let _ = std::fs::remove_file(&raw);
    timings.push(("store", started.elapsed()));
    Ok(ImportedDisk {
        path: target.to_owned(),
        layout: staged.layout,
        virtual_bytes: facts.virtual_bytes,
        stripped: staged.stripped,
        timings,
    })
}

/// What [`strip_identity`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub layout: DiskLayout,
    /// Paths inside the guest removed, emptied or rewritten.
    pub stripped: Vec<String>,
}

/// A partition of a disk image: its number (1-based) and byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
}

/// The partitions of the disk image `raw`, read from its MBR (and GPT when the MBR is
/// protective). hangar reads the table itself rather than asking the kernel (`losetup -P`):
/// a host kernel built without partition-table support (as some VM kernels are) finds no
/// partitions at all. Entries past the end of the file are left out. No table: empty.
pub fn partitions(raw: &Path) -> Result<Vec<Partition>, ImportError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(raw)
        .map_err(|e| ImportError::io(format!("open {}", raw.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| ImportError::io(format!("stat {}", raw.display()), e))?
        .len();
    let mut mbr = [0u8; 512];
    if file.read_exact(&mut mbr).is_err() || mbr[510..512] != [0x55, 0xaa] {
        return Ok(Vec::new());
    }
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let u64_at =
        |b: &[u8], at: usize| u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32);
    let mut found = Vec::new();
    let mut protective = false;
    for i in 0..4u32 {
        let entry = &mbr[446 + 16 * i as usize..462 + 16 * i as usize];
        let kind = entry[4];
        let start = u64::from(u32_at(entry, 8)) * 512;
        let size = u64::from(u32_at(entry, 12)) * 512;
        if kind == 0xee {
            protective = true;
        } else if kind != 0 && size > 0 && start > 0 && start + size <= len {
            found.push(Partition {
                number: i + 1,
                offset: start,
                size,
            });
        }
    }
    if !protective {
        return Ok(found);
    }
    let mut header = [0u8; 92];
    file.seek(SeekFrom::Start(512))
        .and_then(|_| file.read_exact(&mut header))
        .map_err(|e| ImportError::io("read the GPT header", e))?;
    if &header[0..8] != b"EFI PART" {
        return Ok(found);
    }
    let entries_at = u64_at(&header, 72).saturating_mul(512);
    let count = u32_at(&header, 80).min(256);
    let entry_size = u32_at(&header, 84) as usize;
    if !(128..=4096).contains(&entry_size) {
        return Ok(found);
    }
    let mut table = vec![0u8; entry_size * count as usize];
    file.seek(SeekFrom::Start(entries_at))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|e| ImportError::io("read the GPT entries", e))?;
    found.clear();
    for i in 0..count {
        let entry = &table[i as usize * entry_size..(i as usize + 1) * entry_size];
        if entry[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = u64_at(entry, 32).saturating_mul(512);
        let last = u64_at(entry, 40).saturating_mul(512);
        if first == 0 || last < first || last + 512 > len {
            continue;
        }
        found.push(Partition {
            number: i + 1,
            offset: first,
            size: last - first + 512,
        });
    }
    Ok(found)
}

/// A byte range of a file, as (offset, size); `None`: all of it.
type ByteRange = Option<(u64, u64)>;

/// A loop device attached to a file (or a byte range of it), detached when dropped.
struct Loop {
    device: PathBuf,
}

impl Loop {
    fn attach(file: &Path, range: ByteRange) -> Result<Loop, ImportError> {
        let losetup = tools::find("losetup", "mount")?;
        let mut cmd = Command::new(losetup);
        cmd.args(["--find", "--show"]);
        if let Some((offset, size)) = range {
            cmd.arg("--offset")
                .arg(offset.to_string())
                .arg("--sizelimit")
                .arg(size.to_string());
        }
        let out = tools::run(cmd.arg(file))?;
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Loop { device })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Ok(losetup) = tools::find("losetup", "mount")
            && let Err(err) = tools::run(Command::new(losetup).arg("-d").arg(&self.device))
        {
            tracing::warn!(device = %self.device.display(), error = %err, "cannot detach loop device");
        }
    }
}

/// A filesystem mounted on a directory, unmounted (and the directory removed) when
/// dropped.
struct Mounted {
    point: PathBuf,
}

impl Mounted {
    fn mount(device: &Path, point: &Path) -> Result<Option<Mounted>, ImportError> {
        std::fs::create_dir_all(point)
            .map_err(|e| ImportError::io(format!("create {}", point.display()), e))?;
        // Only filesystems a Linux root is made of are mounted at all: the kernel's
        // parser of an exotic filesystem is attack surface an import need not offer.
        let kind = Command::new(tools::find("blkid", "util-linux")?)
            .args(["-o", "value", "-s", "TYPE"])
            .arg(device)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if !matches!(kind.as_str(), "ext2" | "ext3" | "ext4" | "xfs" | "btrfs") {
            let _ = std::fs::remove_dir(point);
            return Ok(None);
        }
        let mounted = tools::run(
            Command::new(tools::find("mount", "mount")?)
                .args(["-t", &kind, "-o", "rw,nodev,nosuid,noexec"])
                .arg(device)
                .arg(point),
        );
        match mounted {
            Ok(_) => Ok(Some(Mounted {
                point: point.to_owned(),
            })),
            Err(err) => {
                tracing::debug!(device = %device.display(), error = %err, "not mountable");
                let _ = std::fs::remove_dir(point);
                Ok(None)
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(err) = hostfs::unmount_all_under(&self.point) {
            tracing::warn!(point = %self.point.display(), error = %err, "cannot unmount an imported disk");
            return;
        }
        let _ = std::fs::remove_dir(&self.point);
    }
}

/// Strips the machine identity from the raw disk `raw` (see the module's doc), mounting
/// under `work`. Needs root. The loop device and the mount are undone whatever happens.
pub fn strip_identity(raw: &Path, work: &Path, hostname: &str) -> Result<Staged, ImportError> {
    if !hostfs::is_root() {
        return Err(ImportError::NotRoot);
    }
    let point = work.join("root");
    // Each partition, then the whole disk (a bare filesystem has no table).
    let mut candidates: Vec<(Option<u32>, ByteRange)> = partitions(raw)?
        .into_iter()
        .map(|p| (Some(p.number), Some((p.offset, p.size))))
        .collect();
    candidates.push((None, None));
    for (number, range) in candidates {
        let attached = Loop::attach(raw, range)?;
        let Some(mounted) = Mounted::mount(&attached.device, &point)? else {
            continue;
        };
        let root = mounted.point.clone();
        if std::fs::symlink_metadata(root.join("etc/os-release")).is_err()
            && std::fs::symlink_metadata(root.join("usr/lib/os-release")).is_err()
        {
            continue;
        }
        let stripped = strip_tree(&root, hostname)?;
        drop(mounted);
        drop(attached);
        let layout = match number {
            Some(root_partition) => DiskLayout::FullDisk { root_partition },
            None => DiskLayout::Filesystem,
        };
        return Ok(Staged { layout, stripped });
    }
    Err(ImportError::RefusedNoRoot)
}

/// The guest paths whose whole contents are identity (leases, cloud-init's instance data).
const EMPTIED_DIRS: &[&str] = &[
    "var/lib/dhcp",
    "var/lib/dhclient",
    "var/lib/NetworkManager",
    "var/lib/systemd/network",
    "var/lib/cloud/instances",
    "var/lib/cloud/data",
    "var/lib/cloud/sem",
];

/// Single guest files that are identity, removed.
const REMOVED_FILES: &[&str] = &[
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/lib/cloud/instance",
];

/// Strips identity from the guest tree mounted at `root`.
fn strip_tree(root: &Path, hostname: &str) -> Result<Vec<String>, ImportError> {
    let mut done = Vec::new();
    // An empty machine-id: systemd makes a new one at first boot.
    if write_guest_file(root, "etc/machine-id", b"", 0o444)? {
        done.push("/etc/machine-id".to_string());
    }
    for file in REMOVED_FILES {
        if remove_guest_path(root, file)? {
            done.push(format!("/{file}"));
        }
    }
    if let Some(ssh) = guest_dir(root, "etc/ssh") {
        let mut keys: Vec<PathBuf> = std::fs::read_dir(&ssh)
            .map_err(|e| ImportError::io(format!("read {}", ssh.display()), e))?
            .flatten()
            .filter(|e| e.file_name().as_bytes().starts_with(b"ssh_host_"))
            .map(|e| e.path())
            .collect();
        keys.sort();
        for key in keys {
            std::fs::remove_file(&key)
                .map_err(|e| ImportError::io(format!("remove {}", key.display()), e))?;
            done.push(format!(
                "/etc/ssh/{}",
                key.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    for dir in EMPTIED_DIRS {
        let Some(path) = guest_dir(root, dir) else {
            continue;
        };
        for entry in std::fs::read_dir(&path)
            .map_err(|e| ImportError::io(format!("read {}", path.display()), e))?
            .flatten()
        {
            hostfs::remove_tree(&entry.path())?;
            done.push(format!("/{dir}/{}", entry.file_name().to_string_lossy()));
        }
    }
    write_guest_file(
        root,
        "etc/hostname",
        format!("{hostname}\n").as_bytes(),
        0o644,
    )?;
    done.push("/etc/hostname".to_string());
    Ok(done)
}

/// The host path of the guest directory `rel` under `root`, when every component of it is
/// a real directory (no link anywhere on the way); `None` otherwise.
fn guest_dir(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut path = root.to_owned();
    for part in Path::new(rel).components() {
        let Component::Normal(name) = part else {
            return None;
        };
        path.push(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_dir() => {}
            _ => return None,
        }
    }
    Some(path)
}

/// Removes the guest file (or link, or directory tree) `rel`, never following a link.
/// Returns whether something was there.
fn remove_guest_path(root: &Path, rel: &str) -> Result<bool, ImportError> {
    let rel_path = Path::new(rel);
    let (Some(parent), Some(name)) = (rel_path.parent(), rel_path.file_name()) else {
        return Ok(false);
    };
    let Some(dir) = guest_dir(root, &parent.to_string_lossy()) else {
        return Ok(false);
    };
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            hostfs::remove_tree(&path)?;
            Ok(true)
        }
        Ok(_) => std::fs::remove_file(&path)
            .map(|()| true)
            .map_err(|e| ImportError::io(format!("remove {}", path.display()), e)),
        Err(_) => Ok(false),
    }
}

/// Replaces the guest file `rel` with `contents` (mode `mode`), when its directory exists:
/// whatever was there (a link included) is removed first and the new file created with
/// `O_EXCL | O_NOFOLLOW`, so nothing outside the guest is written. Returns whether it was
/// written.
fn write_guest_file(
    root: &Path,
    rel: &str,
    contents: &[u8],
    mode: u32,
) -> Result<bool, ImportError> {
    let rel_path = Path::new(rel);
    let (Some(parent), Some(name)) = (rel_path.parent(), rel_path.file_name()) else {
        return Ok(false);
    };
    let Some(dir) = guest_dir(root, &parent.to_string_lossy()) else {
        return Ok(false);
    };
    remove_guest_path(root, rel)?;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| ImportError::io(format!("create {}", path.display()), e))?;
    file.write_all(contents)
        .map_err(|e| ImportError::io(format!("write {}", path.display()), e))?;
    // The process's umask (0077) must not make a guest's file private to root.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| ImportError::io(format!("chmod {}", path.display()), e))?;
    Ok(true)
}

#[cfg(test)]
mod tests;
