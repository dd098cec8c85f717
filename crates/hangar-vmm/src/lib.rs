//! The hypervisor seam.
//!
//! [`Hypervisor`] is the host's view of its VMs: start one from a [`VmSpec`], re-attach to
//! one started by an earlier server process, pause, resume, destroy. Two backends:
//! [`qemu::QemuBackend`] runs real QEMU processes (microvm machine, QMP, virtio-serial agent
//! channel, qcow2 overlays), and [`fake::FakeBackend`] simulates guests in-process for fast
//! tests of the logic above it. [`Hypervisor::archive`] and [`Hypervisor::restore`] move a
//! VM between a process and a memory snapshot on disk (the `archived` state). Neither keeps state that the store does not also hold: a
//! backend can be dropped and re-created and [`Hypervisor::adopt`] finds its VMs again.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod accel;
pub mod agent;
pub mod archive;
pub mod confine;
pub mod delta;
pub mod egress;
pub mod fake;
pub mod migrate;
pub mod procs;
pub mod qemu;
pub mod qmp;
pub mod sparse;
pub mod tap;
pub mod template;

pub use accel::Accel;
pub use agent::{Agent, AgentError};
pub use template::TemplateInfo;

/// Everything needed to start (or re-attach to) one VM. Persisted by the server so that a
/// restarted server can adopt the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Uncompressed kernel (PVH boot).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// Read-only base of the root disk; the VM writes to its own qcow2 overlay over it.
    /// The root disk has the virtio serial [`ROOT_SERIAL`].
    pub base_image: Option<PathBuf>,
    /// Read-only root filesystem layers (squashfs files), top first, attached as virtio
    /// disks with the serials [`layer_serial`]`(0..)`; the root disk is then their
    /// writable upper layer (the guest stacks them with overlayfs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<PathBuf>,
    /// Host TCP ports forwarded to guest ports (user-mode networking).
    pub forwards: Vec<PortForward>,
    /// A hardware shell: QEMU starts paused before any guest code runs, with an empty root
    /// disk slot; [`Hypervisor::attach_root`] gives it an OS image later.
    #[serde(default)]
    pub pre_os: bool,
    /// Read-only layer disks the VM has devices for: a pre-OS shell starts with
    /// [`SHELL_LAYER_SLOTS`] empty ones that [`Hypervisor::attach_root`] fills; the ones left
    /// over stay empty (a restored VM needs the same devices as the one archived). Never
    /// fewer than `layers`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub layer_slots: usize,
    /// Start at low CPU priority (a pool fill): VMs being handed out or in use come first.
    #[serde(default)]
    pub background: bool,
    /// The template directory this VM was cloned from (its memory started as the
    /// template's snapshot, its disk is a layer over the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PathBuf>,
    /// Boots its root disk ([`VmSpec::base_image`], a whole disk with its own bootloader)
    /// through firmware on the `q35` machine (SeaBIOS) with PCI virtio devices, instead of
    /// hangar's kernel on `microvm`: an imported machine. `kernel`, `initramfs` and
    /// `cmdline` are not used; no hangar-init runs in it (its agent channel stays silent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub firmware: bool,
    /// Where the guest's RAM lives: private anonymous memory, or a file (a VM that will
    /// become a template, or a clone mapping its template's RAM copy-on-write).
    #[serde(default, skip_serializing_if = "MemoryBacking::is_anonymous")]
    pub memory: MemoryBacking,
    /// Guest RAM beyond `memory_mib`, in KiB: [`Hypervisor::ram_tail_kib`] when the VM was
    /// planned (0 for VMs planned before it existed: a VM keeps the RAM size its snapshots
    /// and templates were made with, so it is never changed afterwards).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub ram_tail_kib: u32,
    /// A second NIC (the guest's `eth1`) for a private segment: a virtio-net device with
    /// the MAC [`SEGMENT_NIC_MAC`], on a tap in the host's segment namespace when the host
    /// runs as root, else on a unix datagram netdev (see [`SegmentNic`]). Until the VM
    /// joins a segment, the guest's frames on it go nowhere. False for VMs planned before it existed: a VM
    /// keeps the device set its snapshots and templates were made with (clones and
    /// migrations take it from their source).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub segment_nic: bool,
    /// What the guest may reach out of its user-mode NIC, enforced by QEMU's slirp
    /// ([`crate::egress`]). A spec recorded before policies existed has none and keeps the
    /// unrestricted behaviour it was made with (`open`); new VMs are planned with the
    /// request's policy (`none` by default).
    #[serde(default = "hangar_core::EgressPolicy::legacy")]
    pub egress: hangar_core::EgressPolicy,
}

/// The MAC address the segment NIC ([`VmSpec::segment_nic`]) boots with. Every clone of a
/// template has its template's device state, this MAC included, so the guest is given its
/// own when it joins a segment (virtio-net lets the guest change it).
pub const SEGMENT_NIC_MAC: &str = "52:54:00:5e:00:01";

/// The unix datagram sockets of a VM's segment NIC on its host: QEMU binds `nic` and sends
/// every frame the guest transmits to `port`; the host's segment switch binds `port` and
/// sends the guest's incoming frames to `nic`. Both lie in the VM's own directory (private
/// to the VM's QEMU user and the host process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSockets {
    /// QEMU's end.
    pub nic: PathBuf,
    /// The switch's end.
    pub port: PathBuf,
}

/// The host side of a VM's segment NIC (the netdev behind the guest's `eth1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentNic {
    /// A unix datagram netdev, switched by the host process ([`SegmentSockets`]).
    Datagram(SegmentSockets),
    /// A tap in the host's segment namespace, switched by a kernel bridge ([`tap`]).
    Tap(SegmentTap),
}

/// A VM's segment tap ([`tap`]): it exists while the VM's QEMU runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentTap {
    /// The interface's name ([`tap::tap_name`]).
    pub name: String,
    /// The namespace it is in.
    pub netns: tap::SegmentNetns,
    /// The VM's directory (where its segment membership is recorded).
    pub dir: PathBuf,
}

impl SegmentNic {
    /// The VM's directory, where the host records which segment it joined.
    pub fn dir(&self) -> &Path {
        match self {
            SegmentNic::Datagram(sockets) => sockets.port.parent().unwrap_or(Path::new("/")),
            SegmentNic::Tap(tap) => &tap.dir,
        }
    }
}

/// Where a VM's RAM lives (the `memory-backend=mem` of its machine, see [`RAM_BLOCK`]).
///
/// A file-backed VM has no balloon device: QEMU 7.2 punches holes in the backing *file*
/// when a file-backed guest gives memory back (`ram_block_discard_range`), which for a
/// clone would zero pages of its template (PLATFORM.md). Template-backed VMs are
/// therefore never sliced by ballooning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum MemoryBacking {
    /// Anonymous memory, private to the QEMU process.
    #[default]
    Anonymous,
    /// RAM in the file [`template::RAM_FILE`] of the VM's own directory, mapped shared
    /// (`share=on`): what the guest writes reaches the file. A VM booted this way becomes a
    /// template ([`Hypervisor::make_template`]) whose RAM is that file.
    TemplateSource,
    /// The template's RAM file mapped privately (`share=off`): the guest starts with the
    /// template's memory, pages load lazily from the page cache (shared by every clone),
    /// and what the guest writes goes to pages of its own. The file is never written.
    Mapped { file: PathBuf },
}

impl MemoryBacking {
    pub fn is_anonymous(&self) -> bool {
        matches!(self, MemoryBacking::Anonymous)
    }
}

/// The id of a file-backed VM's memory backend, which is also its RAM block's name in the
/// migration stream: a restore must use the same one.
pub const RAM_BLOCK: &str = "mem";

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// How many read-only layers a pre-OS shell can be given at deploy (an OS layer and the
/// layers of the applications composed over it).
pub const SHELL_LAYER_SLOTS: usize = 8;

/// Serial number of a VM's root (or upper layer) disk.
pub const ROOT_SERIAL: &str = "hangar-root";

/// Serial number of the `i`th read-only layer disk (top first).
pub fn layer_serial(i: usize) -> String {
    format!("hangar-layer-{i}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    pub host: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

/// A running VM's handles.
#[derive(Clone)]
pub struct Launched {
    /// Host process id, when the backend has processes.
    pub pid: Option<u32>,
    pub agent: Arc<Agent>,
}

/// Whether the VM's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    /// No process (exited, killed, never started).
    Gone,
}

/// How a VM's memory and device state is kept on disk while it has no process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveTier {
    /// QEMU's migration stream as it is: the fastest restore, the most space.
    Raw,
    /// The migration stream compressed with zstd (level 1) in-process.
    Zstd,
    /// Only what differs from the snapshot of the template the VM was cloned from
    /// (content-specific, seed 000; see [`delta`]; for a template with mapped memory, the
    /// stream without the pages equal to its RAM file, see [`sparse`]), zstd-compressed. A
    /// VM not cloned from a template is archived with [`ArchiveTier::Zstd`] instead.
    Delta,
}

impl ArchiveTier {
    /// The name used in file names and JSON (`raw`, `zstd`).
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveTier::Raw => "raw",
            ArchiveTier::Zstd => "zstd",
            ArchiveTier::Delta => "delta",
        }
    }
}

impl std::fmt::Display for ArchiveTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An archived VM's memory snapshot (its disk layer stays where it was).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    pub tier: ArchiveTier,
    /// The memory/device-state file.
    pub path: PathBuf,
    /// Size of that file.
    pub size_bytes: u64,
    /// Guest memory it holds.
    pub memory_mib: u32,
    /// How long archiving took, pause to process exit.
    pub took_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("VM {0} is not running on this host")]
    NotRunning(String),
    #[error("QEMU failed to start: {0}")]
    Launch(String),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Tool { program: String, stderr: String },
    #[error("path too long for a unix socket ({0}); use a shorter --data-dir")]
    SocketPath(String),
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("VM files")]
    Io(#[from] std::io::Error),
    #[error("archiving VM {id} failed (the VM keeps running as it was): {reason}")]
    Archive { id: String, reason: String },
    #[error("restoring VM {id} failed (its archive is kept): {reason}")]
    Restore { id: String, reason: String },
    #[error("live migration of VM {id} failed: {reason}")]
    Migration { id: String, reason: String },
    /// QEMU cannot run confined as configured (its user cannot reach a file).
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
}

/// A host's hypervisor. Every method is safe to call concurrently for different VMs.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// `qemu` or `fake`.
    fn kind(&self) -> &'static str;

    /// The guest RAM this hypervisor adds beyond a VM's `memory_mib` (KiB), recorded in
    /// [`VmSpec::ram_tail_kib`] of the VMs planned for it. QEMU under TCG needs one: see
    /// [`qemu::TCG_RAM_TAIL_KIB`].
    fn ram_tail_kib(&self) -> u32 {
        0
    }

    /// Starts a VM and connects its control channels. On error nothing is left behind:
    /// no process, no files.
    async fn launch(&self, spec: &VmSpec) -> Result<Launched, VmmError>;

    /// Re-attaches to a VM started earlier (by this or an earlier server process).
    /// `Ok(None)` when its process is gone.
    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Launched>, VmmError>;

    /// Ids of this host's VMs whose processes run, adopted or not.
    async fn running(&self) -> Result<Vec<String>, VmmError>;

    async fn pause(&self, id: &str) -> Result<(), VmmError>;

    async fn resume(&self, id: &str) -> Result<(), VmmError>;

    async fn run_state(&self, id: &str) -> Result<RunState, VmmError>;

    /// Stops the VM's process, if any, and deletes every file it had. Idempotent.
    async fn destroy(&self, id: &str) -> Result<(), VmmError>;

    /// Ends the VM's process, if any, and keeps its files (disk layer, archive). Used when
    /// a process must go but its VM's data must stay, e.g. a restore cut short.
    async fn stop(&self, id: &str) -> Result<(), VmmError>;

    /// Gives a pre-OS shell its root disk: a fresh copy-on-write layer over `base_image`,
    /// and `layers` (read-only squashfs files, top first, at most the shell's
    /// [`VmSpec::layer_slots`]) in its empty layer slots, in order (serials
    /// [`layer_serial`]`(0..)`); the root disk is then their writable upper layer. The VM
    /// stays paused; resume it to boot. On error the shell keeps no new file.
    async fn attach_root(
        &self,
        id: &str,
        base_image: &Path,
        layers: &[PathBuf],
    ) -> Result<(), VmmError>;

    /// Adds host port forwards to a running VM.
    async fn add_forwards(&self, id: &str, forwards: &[PortForward]) -> Result<(), VmmError>;

    /// Removes host port forwards from a running VM: their host ports stop listening at
    /// once (connections already open keep going). A forward the VM does not have is an
    /// error; those before it in `forwards` are removed.
    async fn remove_forwards(&self, id: &str, forwards: &[PortForward]) -> Result<(), VmmError>;

    /// Sets the guest's memory target through the balloon (the guest sees less memory).
    async fn set_memory(&self, id: &str, memory_mib: u32) -> Result<(), VmmError>;

    /// Returns a VM started in the background to normal CPU priority (it is being handed
    /// out). Best effort: without the right to raise priority, it stays low.
    async fn set_foreground(&self, _id: &str) -> Result<(), VmmError> {
        Ok(())
    }

    /// Snapshots a VM's memory and device state to disk and ends its process: the
    /// `archived` state. A running VM is paused first (the snapshot is of a paused guest);
    /// its disk layer stays as it is, frozen. On error the VM is left as it was (running
    /// or paused) and no partial file remains.
    async fn archive(&self, id: &str, tier: ArchiveTier) -> Result<ArchiveInfo, VmmError>;

    /// Starts an archived VM again from its snapshot, with `spec`'s configuration (which
    /// must match the archived one in memory and vCPUs), running, with its agent channel
    /// connected. The archive is removed once the VM runs; on error nothing runs and the
    /// archive is kept.
    async fn restore(&self, spec: &VmSpec) -> Result<Launched, VmmError>;

    /// The VM's archive, if it has one.
    fn archive_info(&self, id: &str) -> Option<ArchiveInfo>;

    /// Turns VM `id`, booted to its ready state, into a template in `dir` (which must not
    /// exist): its memory and device state snapshotted (raw), its disk layer frozen beside
    /// it. The VM is consumed: its process ends and its directory goes, also on error; on
    /// error `dir` does not exist.
    async fn make_template(&self, id: &str, dir: &Path) -> Result<TemplateInfo, VmmError>;

    /// Starts VM `spec.id` as a clone of `template`: its own copy-on-write layer over the
    /// template's disk, its memory restored from the template's snapshot, its own ports
    /// and sockets. Kernel, initramfs, command line, memory and vCPUs are the template's
    /// (`spec`'s must match in memory and vCPUs). The clone is left paused, as the
    /// template was: resume it and give it a new identity. On error nothing is left.
    async fn clone_template(
        &self,
        spec: &VmSpec,
        template: &TemplateInfo,
    ) -> Result<Launched, VmmError>;

    /// The host side of VM `id`'s segment NIC here, when it runs (or is archived) with
    /// one ([`VmSpec::segment_nic`]); `None` for a VM without one or unknown here.
    async fn segment_nic(&self, _id: &str) -> Option<SegmentNic> {
        None
    }

    /// Lets VM `id`'s QEMU send to `socket`, a unix socket the host bound for it (the
    /// switch's end of its segment NIC): owned by the user QEMU runs as, when confined.
    fn give_socket(&self, _id: &str, _socket: &Path) -> Result<(), VmmError> {
        Ok(())
    }

    /// The file holding the guest's serial console output, if the backend keeps one.
    fn console_log(&self, _id: &str) -> Option<PathBuf> {
        None
    }

    /// Live migration, destination: starts VM `spec` paused, waiting for its state on a
    /// port of `listen` and exporting its new root disk there (see [`migrate`]). On error
    /// nothing is left.
    async fn migrate_incoming(
        &self,
        spec: &VmSpec,
        _listen: IpAddr,
    ) -> Result<migrate::IncomingAddrs, VmmError> {
        Err(no_migration(self.kind(), &spec.id))
    }

    /// Live migration, source: mirrors the root disk's top layer to the destination's
    /// export; returns once the mirror is ready.
    async fn migrate_disk(&self, id: &str, _disk: SocketAddr) -> Result<(), VmmError> {
        Err(no_migration(self.kind(), id))
    }

    /// Live migration, source: starts the RAM pre-copy, held from completing until
    /// [`Hypervisor::migrate_switchover`].
    async fn migrate_ram(&self, id: &str, _to: SocketAddr) -> Result<(), VmmError> {
        Err(no_migration(self.kind(), id))
    }

    /// Live migration, source: how far it is.
    async fn migration_progress(&self, id: &str) -> Result<migrate::MigrationProgress, VmmError> {
        Err(no_migration(self.kind(), id))
    }

    /// Live migration, source, frozen: how long until a switchover asked for takes effect
    /// ([`crate::qemu::QemuBackend::migration_window`]); `None`: unknown, at once.
    async fn migration_window(&self, _id: &str) -> Result<Option<std::time::Duration>, VmmError> {
        Ok(None)
    }

    /// Live migration, source: completes it within `downtime_ms` (the disk mirror
    /// finished consistently while the guest is paused); the source stays paused.
    async fn migrate_switchover(
        &self,
        id: &str,
        _downtime_ms: u64,
    ) -> Result<migrate::MigrationProgress, VmmError> {
        Err(no_migration(self.kind(), id))
    }

    /// Live migration, source: cancels it at any stage; the VM runs on here as it was.
    async fn migrate_cancel(&self, id: &str) -> Result<(), VmmError> {
        Err(no_migration(self.kind(), id))
    }

    /// Live migration, destination: waits for the stream to end and resumes the VM.
    async fn migrate_incoming_finish(&self, id: &str) -> Result<Launched, VmmError> {
        Err(no_migration(self.kind(), id))
    }
}

fn no_migration(kind: &str, id: &str) -> VmmError {
    VmmError::Migration {
        id: id.to_owned(),
        reason: format!("the {kind} backend cannot live-migrate"),
    }
}

/// Guest network addresses under user-mode networking (QEMU's slirp defaults).
pub mod usernet {
    pub const GUEST_ADDRESS: &str = "10.0.2.15/24";
    pub const GATEWAY: &str = "10.0.2.2";
    pub const DNS: &str = "10.0.2.3";
}
