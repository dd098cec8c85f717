//! The image constructor: read-only root filesystem layers, each a squashfs file, stacked
//! by overlayfs inside the guest (hangar-init mounts them), with one writable ext4 disk per
//! VM on top (a qcow2 overlay over an empty, shared template).
//!
//! - **OS layer**: `debootstrap --variant=minbase SUITE` against the configured mirror,
//!   stripped of identity (hostname, machine-id, resolv.conf, host keys) and of apt's
//!   caches, documentation and manual pages.
//! - **Package layers** (software, patches): the packages are installed with apt-get,
//!   chrooted, into an overlayfs mount whose lower layers are the layers below and whose
//!   upper directory starts empty; the upper directory then holds exactly what the
//!   packages added or changed (deletions as overlayfs whiteouts), and becomes the layer.
//! - **Application layer**: the application's static files, written the same way into an
//!   overlay over the layers below (so that the directories they land in keep their owners
//!   and modes).
//!
//! Every layer is cached under `<cache>/layers/<hash>/` by the SHA-256 of its inputs and
//! of the layer below it (the OS layer: suite, mirror and packages), so that services
//! sharing a prefix of layers share those layers on disk. A layer is built in a temporary
//! directory and renamed into place when complete: a failed build (an unknown package, a
//! mirror that does not answer) leaves nothing behind, and the next build tries again.
//! One layer is built at a time per process (apt's lists are shared between builds).
//!
//! Building needs root (debootstrap, chroot, loop and overlay mounts). Every mount a
//! build makes is undone when the build ends, also when it fails.
//!
//! A build is cancellable ([`LayerBuild::cancel`]): the cancellation is checked between
//! stages, and the long tools (debootstrap, apt-get in the chroot, mksquashfs) run in a
//! process group of their own that a cancel kills whole. A cancelled build undoes its
//! mounts, also those the tools made inside the tree (debootstrap's `proc` and `sys`),
//! removes its temporary directory, publishes nothing, and returns
//! [`AssetError::Cancelled`].
//!
//! Layout:
//! ```text
//! <cache>/layers/<hash>/layer.sqfs     the layer
//! <cache>/layers/<hash>/layer.json     what it is (LayerInfo)
//! <cache>/layers/<hash>/last-used      touched when a VM starts with the layer
//! <cache>/apt/lists-<os hash>/         apt's package lists for builds over that OS layer
//! <cache>/apt/archives/                downloaded .debs, shared by builds
//! <cache>/images/upper-<hash>.qcow2    empty ext4: the template of every VM's writable layer
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{AssetError, ImageFile, cache, hostfs, rootfs, tools};

/// Version of the layer format; bump it when the build of a layer changes.
const LAYER_FORMAT: u32 = 2;

/// Virtual size of every VM's writable layer (sparse: only what is written takes space).
pub const UPPER_SIZE_BYTES: u64 = 4 << 30;

/// One layer at a time per process (and, with a lock file, per cache): builds share apt's
/// lists and download cache.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// What a layer is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerInput {
    /// An OS layer from debootstrap.
    Debootstrap {
        os: String,
        suite: String,
        mirror: String,
        /// Extra packages (`--include`).
        packages: Vec<String>,
    },
    /// Debian packages installed over the layers below.
    Packages {
        /// The component (software or patch) that names them.
        component: String,
        /// `software` or `patch`.
        kind: String,
        /// apt-get arguments: `name` or `name=version`.
        packages: Vec<String>,
    },
    /// Files written over the layers below.
    Files {
        component: String,
        files: BTreeMap<String, ImageFile>,
    },
}

impl LayerInput {
    fn kind(&self) -> &str {
        match self {
            LayerInput::Debootstrap { .. } => "os",
            LayerInput::Packages { kind, .. } => kind,
            LayerInput::Files { .. } => "app",
        }
    }

    fn name(&self) -> &str {
        match self {
            LayerInput::Debootstrap { os, .. } => os,
            LayerInput::Packages { component, .. } | LayerInput::Files { component, .. } => {
                component
            }
        }
    }

    /// The content hash of this layer over `parent`.
    pub fn hash(&self, parent: Option<&str>) -> String {
        let mut hasher = cache::InputHasher::new("layer", LAYER_FORMAT);
        hasher.field("parent", parent.unwrap_or_default().as_bytes());
        match self {
            LayerInput::Debootstrap {
                os: _,
                suite,
                mirror,
                packages,
            } => {
                hasher.field("debootstrap", b"minbase");
                hasher.field("suite", suite.as_bytes());
                hasher.field("mirror", mirror.as_bytes());
                for package in packages {
                    hasher.field("include", package.as_bytes());
                }
            }
            LayerInput::Packages { packages, .. } => {
                for package in packages {
                    hasher.field("package", package.as_bytes());
                }
            }
            LayerInput::Files { files, .. } => {
                for (path, file) in files {
                    hasher.field("path", path.as_bytes());
                    hasher.field("mode", &file.mode.to_le_bytes());
                    hasher.field("contents", &file.contents);
                }
            }
        }
        hasher.finish()
    }
}

/// What a cached layer is (`layer.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub hash: String,
    /// `os`, `software`, `patch` or `app`.
    pub kind: String,
    /// The OS or component it was built for.
    pub name: String,
    /// The layer it was built over (none for an OS layer).
    pub parent: Option<String>,
    /// Packages it installed (for OS layers: the extra ones).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Size of `layer.sqfs`.
    pub size_bytes: u64,
    pub built_at_ms: u64,
    /// How long the build took.
    pub build_ms: u64,
}

/// A layer in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub info: LayerInfo,
    /// The squashfs file, attached read-only to VMs.
    pub path: PathBuf,
}

/// Where a build reports progress: a stage name and a percent of this build.
pub type Progress<'a> = &'a (dyn Fn(&str, u8) + Sync);

/// Options for building layers.
#[derive(Debug, Clone)]
pub struct LayerBuild {
    pub cache_dir: PathBuf,
    /// Interrupts the build when set (see the module's documentation).
    pub cancel: tools::Cancel,
}

fn layers_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("layers")
}

/// The cached layer with this hash, if complete.
pub fn cached_layer(cache_dir: &Path, hash: &str) -> Option<Layer> {
    let dir = layers_dir(cache_dir).join(hash);
    let info: LayerInfo =
        serde_json::from_slice(&std::fs::read(dir.join("layer.json")).ok()?).ok()?;
    let path = dir.join("layer.sqfs");
    path.is_file().then_some(Layer { info, path })
}

/// Every complete layer in the cache.
pub fn cached_layers(cache_dir: &Path) -> Vec<Layer> {
    let Ok(entries) = std::fs::read_dir(layers_dir(cache_dir)) else {
        return Vec::new();
    };
    let mut layers: Vec<Layer> = entries
        .flatten()
        .filter_map(|entry| cached_layer(cache_dir, &entry.file_name().to_string_lossy()))
        .collect();
    layers.sort_by(|a, b| a.info.hash.cmp(&b.info.hash));
    layers
}

/// When a VM last started with the layer (ms since the epoch), if ever.
pub fn last_used_ms(cache_dir: &Path, hash: &str) -> Option<u64> {
    let modified = std::fs::metadata(layers_dir(cache_dir).join(hash).join("last-used"))
        .and_then(|m| m.modified())
        .ok()?;
    modified
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

/// Records that a VM starts with the layer now.
pub fn touch_layer(cache_dir: &Path, hash: &str) {
    let path = layers_dir(cache_dir).join(hash).join("last-used");
    if let Err(err) = std::fs::write(&path, b"") {
        tracing::debug!(path = %path.display(), error = %err, "cannot record layer use");
    }
}

/// Removes a layer from the cache (eviction). The caller makes sure no VM uses it.
pub fn remove_layer(cache_dir: &Path, hash: &str) -> Result<(), AssetError> {
    let dir = layers_dir(cache_dir).join(hash);
    // Rename first, so that a half-removed layer is never mistaken for a complete one.
    let doomed = layers_dir(cache_dir).join(format!(".tmp-evict-{hash}"));
    match std::fs::rename(&dir, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AssetError::io(format!("evict {}", dir.display()), e)),
    }
    Ok(hostfs::remove_tree(&doomed)?)
}

/// The hashes the chain `inputs` (bottom first) would have.
pub fn chain_hashes(inputs: &[LayerInput]) -> Vec<String> {
    let mut hashes: Vec<String> = Vec::with_capacity(inputs.len());
    for input in inputs {
        let hash = input.hash(hashes.last().map(String::as_str));
        hashes.push(hash);
    }
    hashes
}

/// Makes sure every layer of the chain `inputs` (bottom first: an OS layer, then package
/// and file layers) is in the cache, building the missing ones in order. Returns the
/// layers bottom first.
pub fn ensure_layers(
    build: &LayerBuild,
    inputs: &[LayerInput],
    progress: Progress<'_>,
) -> Result<Vec<Layer>, AssetError> {
    cache::create_dir(&layers_dir(&build.cache_dir))?;
    let hashes = chain_hashes(inputs);
    let mut layers: Vec<Layer> = Vec::with_capacity(inputs.len());
    let steps = inputs.len().max(1);
    for (i, (input, hash)) in inputs.iter().zip(&hashes).enumerate() {
        let percent = |within: u8| ((i * 100 + within as usize) / steps).min(99) as u8;
        let stage = format!("{} layer {}", input.kind(), input.name());
        if let Some(layer) = cached_layer(&build.cache_dir, hash) {
            tracing::debug!(hash = %hash, layer = %stage, "layer cached");
            touch_layer(&build.cache_dir, hash);
            layers.push(layer);
            continue;
        }
        build.cancel.check()?;
        let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let _file_lock = lock_builds(&build.cache_dir)?;
        build.cancel.check()?;
        recover_crashed_builds(&build.cache_dir);
        // Another build may have made it while we waited.
        if let Some(layer) = cached_layer(&build.cache_dir, hash) {
            layers.push(layer);
            continue;
        }
        progress(&stage, percent(0));
        let report =
            |what: &str, within: u8| progress(&format!("{stage}: {what}"), percent(within));
        let started = Instant::now();
        tracing::info!(hash = %hash, layer = %stage, "building layer");
        let parent = layers.last().map(|l| l.info.hash.clone());
        let lowers: Vec<&Layer> = layers.iter().rev().collect();
        let layer = build_layer(build, input, hash, parent, &lowers, &report)?;
        touch_layer(&build.cache_dir, hash);
        tracing::info!(
            hash = %hash,
            layer = %stage,
            size_bytes = layer.info.size_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "layer ready"
        );
        layers.push(layer);
    }
    Ok(layers)
}

/// Holds `<cache>/layers/.build.lock` exclusively: one build at a time also across
/// processes sharing the cache (two servers, or tests). Released when dropped.
fn lock_builds(cache_dir: &Path) -> Result<std::fs::File, AssetError> {
    let path = layers_dir(cache_dir).join(".build.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| AssetError::io(format!("open {}", path.display()), e))?;
    file.lock()
        .map_err(|e| AssetError::io(format!("lock {}", path.display()), e))?;
    Ok(file)
}

/// Undoes what builds of a crashed process left: mounts under temporary build
/// directories (unmounted first, deepest first), then the directories, with a delete that
/// never crosses a mount point (so it can never reach through a bind mount into the host).
/// Call it holding the build lock: then no temporary build directory belongs to a live
/// build.
fn recover_crashed_builds(cache_dir: &Path) {
    for root in [layers_dir(cache_dir), cache_dir.join("export")] {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(".tmp-") || name.starts_with(".tmp-evict-") {
                continue;
            }
            let path = entry.path();
            if let Err(err) = hostfs::unmount_all_under(&path) {
                tracing::warn!(error = %err, "a crashed build's mounts remain");
                continue;
            }
            if let Err(err) = hostfs::remove_tree(&path) {
                tracing::warn!(error = %err, "cannot remove a crashed build's directory");
            }
        }
    }
}

/// Builds one layer into a temporary directory and publishes it.
fn build_layer(
    build: &LayerBuild,
    input: &LayerInput,
    hash: &str,
    parent: Option<String>,
    lowers: &[&Layer],
    report: &(dyn Fn(&str, u8) + Sync),
) -> Result<Layer, AssetError> {
    require_root()?;
    let started = Instant::now();
    let cache_dir = &build.cache_dir;
    let cancel = &build.cancel;
    let mut packages = Vec::new();
    cache::publish_dir(&layers_dir(cache_dir), hash, |dir| {
        match input {
            LayerInput::Debootstrap {
                suite,
                mirror,
                packages: include,
                ..
            } => {
                packages = include.clone();
                build_os(cache_dir, hash, dir, suite, mirror, include, report, cancel)?;
            }
            LayerInput::Packages {
                component,
                packages: wanted,
                ..
            } => {
                packages = wanted.clone();
                let os_hash = lowers
                    .last()
                    .map(|l| l.info.hash.clone())
                    .ok_or_else(|| missing_os(component))?;
                build_over(dir, lowers, report, cancel, |root| {
                    install_packages(cache_dir, &os_hash, root, component, wanted, report, cancel)
                })?;
            }
            LayerInput::Files { component, files } => {
                if lowers.is_empty() {
                    return Err(missing_os(component));
                }
                build_over(dir, lowers, report, cancel, |root| write_files(root, files))?;
            }
        }
        cancel.check()?;
        report("compressing", 90);
        let size_bytes = std::fs::metadata(dir.join("layer.sqfs"))
            .map_err(|e| AssetError::io("stat layer.sqfs", e))?
            .len();
        let info = LayerInfo {
            hash: hash.to_owned(),
            kind: input.kind().to_owned(),
            name: input.name().to_owned(),
            parent: parent.clone(),
            packages: packages.clone(),
            size_bytes,
            built_at_ms: now_ms(),
            build_ms: started.elapsed().as_millis() as u64,
        };
        let json = serde_json::to_vec_pretty(&info).expect("layer info serializes");
        // Written last: its presence marks a complete layer.
        cache::write(&dir.join("layer.json"), &json)
    })?;
    cached_layer(cache_dir, hash).ok_or_else(|| {
        AssetError::io(
            format!("layer {hash} vanished after it was built"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })
}

/// `err` wrapped by `wrap`, except a cancellation, which stays [`AssetError::Cancelled`].
fn unless_cancelled(err: AssetError, wrap: impl FnOnce(AssetError) -> AssetError) -> AssetError {
    match err {
        AssetError::Cancelled => err,
        err => wrap(err),
    }
}

fn missing_os(component: &str) -> AssetError {
    AssetError::LayerBuild {
        layer: component.to_owned(),
        reason: "a package or file layer needs an OS layer below it".into(),
    }
}

fn require_root() -> Result<(), AssetError> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(AssetError::LayerBuild {
            layer: "any".into(),
            reason: "building Debian layers needs root (debootstrap, chroot, loop and overlay mounts); run the server as root".into(),
        });
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Files every layer is stripped of: they are identity (given to each VM at deploy time)
/// or host leftovers.
const IDENTITY_FILES: &[&str] = &[
    "etc/hostname",
    "etc/resolv.conf",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "etc/ssl/private/ssl-cert-snakeoil.key",
    "etc/ssl/certs/ssl-cert-snakeoil.pem",
    "usr/sbin/policy-rc.d",
];

/// Left out of every package install, so that layers hold what services run.
const DPKG_EXCLUDES: &str = "\
# hangar: layers carry no documentation, manual pages or translations
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
";

const APT_CONF: &str = "\
# hangar: image builds install exactly the packages they name
APT::Install-Recommends \"false\";
APT::Install-Suggests \"false\";
";

#[allow(clippy::too_many_arguments)]
fn build_os(
    cache_dir: &Path,
    hash: &str,
    dir: &Path,
    suite: &str,
    mirror: &str,
    include: &[String],
    report: &(dyn Fn(&str, u8) + Sync),
    cancel: &tools::Cancel,
) -> Result<(), AssetError> {
    let debootstrap = tools::find("debootstrap", "debootstrap")?;
    let root = dir.join("root");
    report("debootstrap", 5);
    let mut command = Command::new(debootstrap);
    tools::guest_tree_umask(&mut command);
    command.arg("--variant=minbase");
    if !include.is_empty() {
        command.arg(format!("--include={}", include.join(",")));
    }
    command.arg(suite).arg(&root).arg(mirror);
    tools::run_cancellable(&mut command, cancel).map_err(|err| {
        unless_cancelled(err, |err| AssetError::LayerBuild {
            layer: format!("os {suite}"),
            reason: format!("debootstrap against {mirror} failed: {err}"),
        })
    })?;
    cancel.check()?;
    report("stripping identity and caches", 70);
    // apt's lists move out of the layer, for the builds over it.
    let lists = root.join("var/lib/apt/lists");
    let apt_dir = cache_dir.join("apt");
    cache::create_dir(&apt_dir)?;
    cache::publish_dir(&apt_dir, &format!("lists-{hash}"), |dest| {
        for entry in std::fs::read_dir(&lists)
            .map_err(|e| AssetError::io(format!("list {}", lists.display()), e))?
            .flatten()
        {
            if entry.file_name() == "lock" {
                continue;
            }
            let target = dest.join(entry.file_name());
            std::fs::rename(entry.path(), &target)
                .map_err(|e| AssetError::io(format!("move {}", entry.path().display()), e))?;
        }
        Ok(())
    })?;
    hostfs::remove_tree(&lists)?;
    cache::create_dir(&lists.join("partial"))?;
    for pattern_dir in ["var/cache/apt/archives", "var/cache/apt"] {
        remove_files_in(&root.join(pattern_dir), |name| {
            name.ends_with(".deb") || name.ends_with(".bin")
        })?;
    }
    for doc_dir in ["usr/share/doc", "usr/share/man", "usr/share/info"] {
        remove_children(&root.join(doc_dir), |_| true)?;
    }
    remove_children(&root.join("usr/share/locale"), |name| {
        name != "locale.alias"
    })?;
    strip_identity(&root)?;
    for (path, contents) in [
        ("etc/dpkg/dpkg.cfg.d/hangar-minimal", DPKG_EXCLUDES),
        ("etc/apt/apt.conf.d/90hangar", APT_CONF),
    ] {
        cache::write(&root.join(path), contents.as_bytes())?;
        set_mode(&root.join(path), 0o644)?;
    }
    cancel.check()?;
    squash(&root, &dir.join("layer.sqfs"), cancel)?;
    hostfs::remove_tree(&root)?;
    Ok(())
}

fn remove_files_in(dir: &Path, doomed: impl Fn(&str) -> bool) -> Result<(), AssetError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && doomed(&name) {
            std::fs::remove_file(entry.path())
                .map_err(|e| AssetError::io(format!("remove {}", entry.path().display()), e))?;
        }
    }
    Ok(())
}

fn remove_children(dir: &Path, doomed: impl Fn(&str) -> bool) -> Result<(), AssetError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !doomed(&name) {
            continue;
        }
        let path = entry.path();
        hostfs::remove_tree(&path)?;
    }
    Ok(())
}

/// Removes identity files from a tree (a layer's root or a merged overlay).
fn strip_identity(root: &Path) -> Result<(), AssetError> {
    for file in IDENTITY_FILES {
        let path = root.join(file);
        if path.symlink_metadata().is_ok() {
            std::fs::remove_file(&path)
                .map_err(|e| AssetError::io(format!("remove {}", path.display()), e))?;
        }
    }
    let ssh = root.join("etc/ssh");
    remove_files_in(&ssh, |name| name.starts_with("ssh_host_"))?;
    Ok(())
}

/// `mksquashfs SRC DEST` with fast zstd, keeping owners, modes, device nodes (overlayfs
/// whiteouts) and extended attributes (opaque directories).
fn squash(src: &Path, dest: &Path, cancel: &tools::Cancel) -> Result<(), AssetError> {
    let mksquashfs = tools::find("mksquashfs", "squashfs-tools")?;
    tools::run_cancellable(
        Command::new(mksquashfs)
            .arg(src)
            .arg(dest)
            .args(["-comp", "zstd", "-Xcompression-level", "3"])
            .args(["-noappend", "-quiet", "-no-progress", "-xattrs"]),
        cancel,
    )?;
    Ok(())
}

/// Mounts made for a build, undone in reverse order when dropped (also on failure).
struct Mounts {
    points: Vec<PathBuf>,
}

impl Mounts {
    fn new() -> Mounts {
        Mounts { points: Vec::new() }
    }

    fn mount(&mut self, args: &[&str], source: &Path, target: &Path) -> Result<(), AssetError> {
        cache::create_dir(target)?;
        tools::run(Command::new("mount").args(args).arg(source).arg(target))?;
        self.points.push(target.to_owned());
        Ok(())
    }

    /// Unmounts everything, reporting the first failure.
    fn unmount_all(&mut self) -> Result<(), AssetError> {
        let mut first_error = None;
        while let Some(point) = self.points.pop() {
            if let Err(err) = tools::run(Command::new("umount").arg(&point)) {
                // Busy (a process started by a package still runs): detach it lazily.
                let _ = tools::run(Command::new("umount").arg("-l").arg(&point));
                first_error.get_or_insert(err);
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Err(err) = self.unmount_all() {
            tracing::warn!(error = %err, "unmounting a layer build");
        }
    }
}

/// Mounts the read-only layers `lowers` (top first) under `dir`, stacks them in an overlay
/// with an empty upper directory, runs `change` on the merged root, then squashes the
/// upper directory (what `change` added) into `dir/layer.sqfs`.
fn build_over(
    dir: &Path,
    lowers: &[&Layer],
    report: &(dyn Fn(&str, u8) + Sync),
    cancel: &tools::Cancel,
    change: impl FnOnce(&Path) -> Result<(), AssetError>,
) -> Result<(), AssetError> {
    let upper = dir.join("upper");
    let work = dir.join("work");
    let merged = dir.join("merged");
    // The upper directory's mode becomes the mode of `/` in the layer.
    cache::create_tree_dir(&upper)?;
    cache::create_dir(&work)?;
    let mut mounts = Mounts::new();
    report("mounting the layers below", 2);
    let mut lower_dirs = Vec::new();
    for (i, layer) in lowers.iter().enumerate() {
        let point = dir.join(format!("lower-{i}"));
        mounts.mount(&["-t", "squashfs", "-o", "loop,ro"], &layer.path, &point)?;
        lower_dirs.push(point.display().to_string());
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower_dirs.join(":"),
        upper.display(),
        work.display()
    );
    mounts.mount(
        &["-t", "overlay", "-o", &options],
        Path::new("overlay"),
        &merged,
    )?;
    let changed = change(&merged);
    mounts.unmount_all()?;
    changed?;
    cancel.check()?;
    strip_identity(&upper)?;
    report("compressing", 85);
    squash(&upper, &dir.join("layer.sqfs"), cancel)?;
    for tree in [&upper, &work, &merged] {
        hostfs::remove_tree(tree)?;
    }
    for i in 0..lowers.len() {
        let _ = std::fs::remove_dir(dir.join(format!("lower-{i}")));
    }
    Ok(())
}

/// Installs `packages` with apt-get, chrooted into `root` (the merged overlay), with apt's
/// lists and download cache bind-mounted from the cache (so they stay out of the layer)
/// and services kept from starting (policy-rc.d).
fn install_packages(
    cache_dir: &Path,
    os_hash: &str,
    root: &Path,
    component: &str,
    packages: &[String],
    report: &(dyn Fn(&str, u8) + Sync),
    cancel: &tools::Cancel,
) -> Result<(), AssetError> {
    let lists = cache_dir.join("apt").join(format!("lists-{os_hash}"));
    let archives = cache_dir.join("apt").join("archives");
    cache::create_dir(&archives.join("partial"))?;
    let have_lists = lists.is_dir();
    if !have_lists {
        cache::create_dir(&lists.join("partial"))?;
    }
    let mut mounts = Mounts::new();
    mounts.mount(&["--bind"], &lists, &root.join("var/lib/apt/lists"))?;
    mounts.mount(&["--bind"], &archives, &root.join("var/cache/apt/archives"))?;
    mounts.mount(&["-t", "proc"], Path::new("proc"), &root.join("proc"))?;
    mounts.mount(&["--bind"], Path::new("/dev"), &root.join("dev"))?;
    mounts.mount(&["-t", "sysfs"], Path::new("sysfs"), &root.join("sys"))?;
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))
        .map_err(|e| AssetError::io("copy /etc/resolv.conf into the build", e))?;
    cache::write(&root.join("usr/sbin/policy-rc.d"), b"#!/bin/sh\nexit 101\n")?;
    set_mode(&root.join("usr/sbin/policy-rc.d"), 0o755)?;

    let chroot = |args: &[&str]| {
        let mut command = Command::new("chroot");
        tools::guest_tree_umask(&mut command);
        command
            .arg(root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root");
        command
    };
    let result = (|| {
        if !have_lists {
            report("apt-get update", 10);
            tools::run_cancellable(&mut chroot(&["apt-get", "update", "-q"]), cancel).map_err(
                |err| {
                    unless_cancelled(err, |err| AssetError::LayerBuild {
                        layer: component.to_owned(),
                        reason: format!("apt-get update failed: {err}"),
                    })
                },
            )?;
        }
        cancel.check()?;
        report("checking packages", 15);
        for package in packages {
            let name = package.split('=').next().unwrap_or(package);
            let output = chroot(&["apt-cache", "show", "--no-all-versions", name])
                .output()
                .map_err(|e| AssetError::io("run apt-cache in the build root", e))?;
            if !output.status.success() || output.stdout.is_empty() {
                return Err(AssetError::UnknownPackage {
                    component: component.to_owned(),
                    package: name.to_owned(),
                });
            }
        }
        report(&format!("apt-get install {}", packages.join(" ")), 20);
        let mut install = chroot(&[
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--allow-downgrades",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ]);
        install.args(packages);
        cancel.check()?;
        tools::run_cancellable(&mut install, cancel).map_err(|err| {
            unless_cancelled(err, |err| AssetError::LayerBuild {
                layer: component.to_owned(),
                reason: format!("installing {} failed: {err}", packages.join(" ")),
            })
        })?;
        remove_files_in(&root.join("var/cache/apt"), |name| name.ends_with(".bin"))?;
        for file in ["etc/resolv.conf", "usr/sbin/policy-rc.d"] {
            let _ = std::fs::remove_file(root.join(file));
        }
        Ok(())
    })();
    let unmounted = mounts.unmount_all();
    result?;
    unmounted
}

fn set_mode(path: &Path, mode: u32) -> Result<(), AssetError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| AssetError::io(format!("chmod {}", path.display()), e))
}

/// Writes the application's files into `root` (the merged overlay); directories that
/// already exist below keep their owners and modes, new ones are root's, mode 0755.
fn write_files(root: &Path, files: &BTreeMap<String, ImageFile>) -> Result<(), AssetError> {
    for (path, file) in files {
        let dest = root.join(rootfs::relative_path(path)?);
        if let Some(parent) = dest.parent() {
            cache::create_tree_dir(parent)?;
        }
        if dest.symlink_metadata().is_ok_and(|m| !m.is_file()) {
            let _ = std::fs::remove_file(&dest);
        }
        std::fs::write(&dest, &file.contents)
            .map_err(|e| AssetError::io(format!("write {}", dest.display()), e))?;
        set_mode(&dest, file.mode)?;
    }
    Ok(())
}

/// An empty ext4 filesystem of [`UPPER_SIZE_BYTES`] as qcow2: the template of every VM's
/// writable layer (each VM gets a qcow2 overlay over it).
pub fn ensure_upper_template(cache_dir: &Path) -> Result<PathBuf, AssetError> {
    let mut hasher = cache::InputHasher::new("upper", LAYER_FORMAT);
    hasher.field("size", &UPPER_SIZE_BYTES.to_le_bytes());
    let hash = hasher.finish();
    let images = cache_dir.join("images");
    let dest = images.join(format!("upper-{}.qcow2", &hash[..16]));
    if dest.is_file() {
        return Ok(dest);
    }
    let mkfs = tools::find("mkfs.ext4", "e2fsprogs")?;
    let qemu_img = tools::find("qemu-img", "qemu-utils")?;
    let tmp = cache::temp_dir_in(&images)?;
    let raw = tmp.path().join("upper.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(UPPER_SIZE_BYTES))
        .map_err(|e| AssetError::io(format!("create {}", raw.display()), e))?;
    tools::run(
        Command::new(&mkfs)
            .args(["-q", "-F", "-L", "hangar-upper", "-m", "0"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&raw),
    )?;
    let qcow2 = tmp.path().join("upper.qcow2");
    tools::run(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2),
    )?;
    cache::publish_file(&qcow2, &dest)?;
    Ok(dest)
}

/// Flattens the layers `layers` (bottom first) into one ext4 disk image (qcow2) at
/// `dest`: what the guest sees as its root, without the overlay.
pub fn flatten(cache_dir: &Path, layers: &[Layer], dest: &Path) -> Result<u64, AssetError> {
    require_root()?;
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _file_lock = lock_builds(cache_dir)?;
    recover_crashed_builds(cache_dir);
    let mkfs = tools::find("mkfs.ext4", "e2fsprogs")?;
    let qemu_img = tools::find("qemu-img", "qemu-utils")?;
    let tmp = cache::temp_dir_in(&cache_dir.join("export"))?;
    let merged = tmp.path().join("merged");
    let mut mounts = Mounts::new();
    let mut lower_dirs = Vec::new();
    for (i, layer) in layers.iter().rev().enumerate() {
        let point = tmp.path().join(format!("lower-{i}"));
        mounts.mount(&["-t", "squashfs", "-o", "loop,ro"], &layer.path, &point)?;
        lower_dirs.push(point.display().to_string());
    }
    // Overlayfs needs two lower layers for a read-only mount without an upper one.
    if lower_dirs.len() == 1 {
        let empty = tmp.path().join("empty");
        cache::create_dir(&empty)?;
        lower_dirs.push(empty.display().to_string());
    }
    mounts.mount(
        &[
            "-t",
            "overlay",
            "-o",
            &format!("ro,lowerdir={}", lower_dirs.join(":")),
        ],
        Path::new("overlay"),
        &merged,
    )?;
    let raw = tmp.path().join("root.raw");
    let mut size = 0;
    let made = (|| {
        // What the merged tree holds, plus a quarter for ext4's own blocks, plus room to
        // write.
        let content = rootfs::tree_size(&merged)?;
        size = rootfs::filesystem_size(content + content / 4) + (256 << 20);
        std::fs::File::create(&raw)
            .and_then(|f| f.set_len(size))
            .map_err(|e| AssetError::io(format!("create {}", raw.display()), e))?;
        tools::run(
            Command::new(&mkfs)
                .args(["-q", "-F", "-L", "hangar-root", "-m", "0", "-d"])
                .arg(&merged)
                .arg(&raw),
        )?;
        Ok::<_, AssetError>(())
    })();
    mounts.unmount_all()?;
    made?;
    let qcow2 = tmp.path().join("root.qcow2");
    tools::run(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2),
    )?;
    std::fs::copy(&qcow2, dest)
        .map_err(|e| AssetError::io(format!("write {}", dest.display()), e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packages(component: &str, names: &[&str]) -> LayerInput {
        LayerInput::Packages {
            component: component.into(),
            kind: "software".into(),
            packages: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn os(mirror: &str) -> LayerInput {
        LayerInput::Debootstrap {
            os: "debian-12".into(),
            suite: "bookworm".into(),
            mirror: mirror.into(),
            packages: Vec::new(),
        }
    }

    #[test]
    fn chains_share_prefixes_and_depend_on_what_is_below() {
        let redis = chain_hashes(&[os("http://m"), packages("redis-server", &["redis-server"])]);
        let nginx = chain_hashes(&[os("http://m"), packages("nginx-light", &["nginx-light"])]);
        assert_eq!(redis[0], nginx[0], "one OS layer");
        assert_ne!(redis[1], nginx[1]);
        // The same packages over another OS layer are another layer.
        let elsewhere = chain_hashes(&[
            os("http://other"),
            packages("redis-server", &["redis-server"]),
        ]);
        assert_ne!(redis[0], elsewhere[0]);
        assert_ne!(redis[1], elsewhere[1]);
        // The component's name is not an input: only what is installed.
        let renamed = chain_hashes(&[os("http://m"), packages("redis", &["redis-server"])]);
        assert_eq!(redis[1], renamed[1]);
    }

    #[test]
    fn file_layers_hash_their_contents() {
        let files = |text: &str| LayerInput::Files {
            component: "page".into(),
            files: [(
                "/var/www/html/index.html".to_string(),
                ImageFile {
                    contents: text.as_bytes().to_vec(),
                    mode: 0o644,
                },
            )]
            .into(),
        };
        assert_ne!(files("a").hash(Some("p")), files("b").hash(Some("p")));
        assert_ne!(files("a").hash(Some("p")), files("a").hash(Some("q")));
    }

    #[test]
    fn missing_layers_are_not_cached() {
        let cache = tempfile::tempdir().unwrap();
        assert!(cached_layer(cache.path(), "0123").is_none());
        assert!(cached_layers(cache.path()).is_empty());
        // A directory without layer.json is a build in progress or a crash's leftover.
        std::fs::create_dir_all(cache.path().join("layers/abc")).unwrap();
        std::fs::write(cache.path().join("layers/abc/layer.sqfs"), b"x").unwrap();
        assert!(cached_layer(cache.path(), "abc").is_none());
        remove_layer(cache.path(), "abc").unwrap();
        assert!(!cache.path().join("layers/abc").exists());
    }
}
