//! Guest assets and base images.
//!
//! - [`ensure_guest_assets`]: the uncompressed kernel (`vmlinux`, for PVH direct boot on
//!   QEMU's `microvm`) and an initramfs holding `hangar-init` as `/init`, a static busybox,
//!   and the virtio/overlay/squashfs/erofs modules in dependency order. The kernel comes
//!   from Debian's `linux-image-cloud-amd64` (fetched once with `apt-get download`) or
//!   from a given `.deb` / extracted directory.
//! - [`ensure_busybox_image`]: a small ext4 root disk (qcow2) with busybox and given files.
//!
//! Everything is content-addressed under the cache directory: the same inputs give the
//! same hash and no work; entries are built in a temporary directory next to their final
//! place and renamed into it, so a crash never leaves a half-built entry.
//!
//! Cache layout:
//! ```text
//! <cache>/downloads/linux-image-<release>_<version>_amd64.deb   fetched kernel package
//! <cache>/kernels/<sha256 of the .deb>/                         its extracted contents
//! <cache>/assets/<hash>/{vmlinux,initramfs.cpio,release}        guest assets
//! <cache>/images/<hash>.qcow2                                   base images
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod boot;
mod cache;
pub mod hostfs;
pub mod import;
mod initramfs;
mod kernel;
pub mod layers;
mod modules;
mod rootfs;
mod tools;

pub use boot::{host_tsc_khz, kernel_cmdline};
pub use initramfs::{CpioEntry, write_newc};
pub use kernel::{decode_legacy_lz4, extract_vmlinux};
pub use modules::{REQUIRED_MODULES, load_order, modinfo_depends};
pub use tools::Cancel;

/// `hangar-init`, built as a static x86_64 binary by this crate's build script.
pub const HANGAR_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hangar-init"));

/// SHA-256 (hex) of [`HANGAR_INIT`], computed at build time.
pub const HANGAR_INIT_SHA256: &str = include_str!(concat!(env!("OUT_DIR"), "/hangar-init.sha256"));

/// Where busybox is looked for when [`AssetSources::busybox`] is `None`.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Where the guest kernel and busybox come from.
#[derive(Debug, Clone, Default)]
pub struct AssetSources {
    /// A Debian `linux-image-*` .deb, or a directory holding one extracted (`boot/vmlinuz-*`
    /// and `lib/modules/*`). `None`: fetch `linux-image-cloud-amd64` and the package it
    /// depends on with `apt-get download` into the cache (once).
    pub kernel: Option<PathBuf>,
    /// A statically linked busybox. `None`: `/bin/busybox` (Debian's busybox-static).
    pub busybox: Option<PathBuf>,
}

/// Boot assets ready for QEMU, content-addressed under the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// Uncompressed ELF kernel for PVH direct boot on the `microvm` machine.
    pub vmlinux: PathBuf,
    /// Uncompressed newc cpio: hangar-init as /init, busybox, modules.
    pub initramfs: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// Hex content hash of every input.
    pub hash: String,
}

/// A file placed in a base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// A read-only base disk (qcow2), shared by every VM of the services that use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub path: PathBuf,
    pub hash: String,
    /// Virtual size of the disk (what the guest sees), in bytes.
    pub size_bytes: u64,
}

/// Why assets or images could not be made. Messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A directory could not be removed or unmounted safely (see [`hostfs`]).
    #[error(transparent)]
    HostFs(#[from] hostfs::HostFsError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "busybox not found at {path}: install it with `apt-get install busybox-static` \
         or point AssetSources::busybox at a static busybox"
    )]
    BusyboxMissing { path: PathBuf },
    #[error(
        "busybox at {path} is not statically linked and cannot run in the guest: install \
         `busybox-static` (apt-get install busybox-static) or give a static busybox"
    )]
    BusyboxNotStatic { path: PathBuf },
    #[error(
        "could not fetch the guest kernel with apt-get download: {detail}; install it or \
         pass --kernel PATH to a linux-image .deb"
    )]
    KernelFetch { detail: String },
    #[error(
        "guest kernel source {path}: {reason}; pass a Debian linux-image .deb or a \
         directory extracted from one (with boot/vmlinuz-* and lib/modules/*)"
    )]
    KernelSource { path: PathBuf, reason: String },
    #[error(
        "cannot extract vmlinux from {path}: {reason}; use a Debian cloud kernel \
         (linux-image-cloud-amd64), whose bzImage payload is lz4"
    )]
    KernelFormat { path: PathBuf, reason: String },
    #[error(
        "kernel module {name} not found under {dir}; the guest needs it as an uncompressed \
         .ko: use a kernel package that ships it (linux-image-cloud-amd64 does)"
    )]
    ModuleMissing { name: String, dir: PathBuf },
    #[error(
        "kernel module {path} is compressed; hangar-init loads only uncompressed .ko files: \
         decompress the kernel's modules or use Debian 12's linux-image-cloud-amd64"
    )]
    ModuleCompressed { path: PathBuf },
    #[error("cannot read the module information of {path}: {reason}")]
    ModuleInfo { path: PathBuf, reason: String },
    #[error("kernel modules depend on each other in a cycle: {}", cycle.join(" -> "))]
    ModuleCycle { cycle: Vec<String> },
    #[error("{tool} not found: install it with `apt-get install {package}`")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    /// The build was cancelled ([`tools::Cancel`]): its tools were killed, its mounts
    /// undone and its temporary directory removed; nothing entered the cache.
    #[error("the image build was cancelled")]
    Cancelled,
    #[error("`{command}` failed ({status}): {stderr}")]
    ToolFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "image file {path:?}: {reason}; paths must be absolute, without '..', and \
         not the root itself"
    )]
    InvalidImageFile { path: String, reason: String },
    #[error("building layer {layer}: {reason}")]
    LayerBuild { layer: String, reason: String },
    #[error(
        "component {component}: Debian package {package:?} is not in the mirror's archive \
         (check the name with `apt-cache search`)"
    )]
    UnknownPackage { component: String, package: String },
}

impl AssetError {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AssetError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Makes sure the guest assets exist under `cache_dir`, building them when an input changed.
pub fn ensure_guest_assets(
    cache_dir: &Path,
    sources: &AssetSources,
) -> Result<GuestAssets, AssetError> {
    cache::create_dir(cache_dir)?;
    let busybox = rootfs::read_busybox(sources)?;
    let kernel = kernel::resolve(cache_dir, sources.kernel.as_deref())?;
    let mods = modules::resolve(&kernel.modules_dir, REQUIRED_MODULES)?;

    for module in &mods {
        tracing::debug!(module = %module.name, path = %module.path.display(), "guest module");
    }
    let mut hasher = cache::InputHasher::new("guest-assets", ASSET_FORMAT);
    hasher.field("release", kernel.release.as_bytes());
    hasher.field(
        "vmlinuz",
        cache::file_digest(cache_dir, &kernel.vmlinuz)?.as_bytes(),
    );
    for module in &mods {
        hasher.field(&module.name, &module.bytes);
    }
    hasher.field(
        "busybox",
        cache::file_digest(cache_dir, &busybox.path)?.as_bytes(),
    );
    hasher.field("hangar-init", HANGAR_INIT_SHA256.as_bytes());
    let hash = hasher.finish();

    let assets_dir = cache_dir.join("assets");
    let entry = assets_dir.join(&hash);
    let assets = GuestAssets {
        vmlinux: entry.join("vmlinux"),
        initramfs: entry.join("initramfs.cpio"),
        kernel_release: kernel.release.clone(),
        hash: hash.clone(),
    };
    if entry.join("release").is_file() {
        tracing::debug!(hash = %hash, "guest assets cached");
        return Ok(assets);
    }

    tracing::info!(hash = %hash, release = %kernel.release, "building guest assets");
    let started = std::time::Instant::now();
    cache::publish_dir(&assets_dir, &hash, |dir| {
        let vmlinuz = std::fs::read(&kernel.vmlinuz)
            .map_err(|e| AssetError::io(format!("read {}", kernel.vmlinuz.display()), e))?;
        let vmlinux = extract_vmlinux(&vmlinuz).map_err(|reason| AssetError::KernelFormat {
            path: kernel.vmlinuz.clone(),
            reason,
        })?;
        cache::write(&dir.join("vmlinux"), &vmlinux)?;
        let entries = initramfs::guest_entries(HANGAR_INIT, &busybox.bytes, &kernel.release, &mods);
        let cpio = write_newc(&entries, Vec::new())
            .map_err(|e| AssetError::io("write the initramfs", e))?;
        cache::write(&dir.join("initramfs.cpio"), &cpio)?;
        // Written last: its presence marks a complete entry.
        cache::write(&dir.join("release"), kernel.release.as_bytes())?;
        tracing::info!(
            vmlinux_bytes = vmlinux.len(),
            initramfs_bytes = cpio.len(),
            modules = mods.len(),
            "guest assets built"
        );
        Ok(())
    })?;
    tracing::info!(hash = %hash, elapsed_ms = started.elapsed().as_millis() as u64, "guest assets ready");
    Ok(assets)
}

/// Makes sure a busybox root disk holding `files` exists under `cache_dir`.
pub fn ensure_busybox_image(
    cache_dir: &Path,
    sources: &AssetSources,
    files: &BTreeMap<String, ImageFile>,
) -> Result<BaseImage, AssetError> {
    cache::create_dir(cache_dir)?;
    rootfs::ensure_busybox_image(cache_dir, sources, files)
}

/// Version of the asset layout; bump it when the build of an entry changes.
const ASSET_FORMAT: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object, read::elf::ElfFile64};

    #[test]
    fn hangar_init_digest_matches() {
        use sha2::Digest;
        assert_eq!(
            HANGAR_INIT_SHA256,
            hex::encode(sha2::Sha256::digest(HANGAR_INIT))
        );
    }

    #[test]
    fn hangar_init_is_a_static_x86_64_elf() {
        let elf = ElfFile64::<object::Endianness>::parse(HANGAR_INIT).expect("an ELF64 file");
        assert_eq!(elf.architecture(), object::Architecture::X86_64);
        assert!(
            !tools::has_interpreter(HANGAR_INIT),
            "hangar-init must be static (no PT_INTERP)"
        );
    }
}
