//! The host layer: what one machine that runs VMs can do, as whole operations.
//!
//! [`Host`] is the seam between the control plane and a machine: make a VM from a
//! [`VmPlan`] up to ready, hand out a paused pool VM, sleep, archive, wake, destroy, make and
//! clone templates, and report what runs there ([`Host::inventory`]) and what the machine
//! has ([`Host::facts`]). Everything that crosses it is data a network call could carry:
//! ids, plans, endpoints as `host:port` text, stages, facts, an opaque [`LaunchRecord`] and
//! typed errors ([`HostError`]); no paths the caller must open, no process handles, no
//! in-process channels.
//!
//! - [`local`]: [`LocalHost`], the machine the server runs on: QEMU through
//!   [`hangar_vmm::Hypervisor`], guest configuration and identity, ready checks, host
//!   ports, template directories, console logs, `/proc`.
//! - [`ready`]: ready criteria, checked from the host.
//! - [`guest`]: what a guest is told to become (hangar-init's configuration).
//! - [`images`]: where a host's images come from ([`images::ImageSource`]): the local
//!   image cache ([`images::LocalImages`]) and exports.
//! - [`agent`]: the host agent: any [`Host`] served over HTTP (`/agent/v1/...`), and
//!   the agent process's loop (registration and heartbeats to the control plane).
//! - [`remote`]: [`RemoteHost`], a [`Host`] on another machine, reached through its agent.
//! - [`segment`]: private segments (an L2 network per stack): the switches of this host's
//!   segments, the join a VM is given ([`SegmentJoin`]).
//! - [`facts`]: what the machine has (CPUs, memory, disk, load), read from the OS.
//! - [`metrics`]: the process's metrics recorder (the `metrics` facade), rendered at
//!   `/metrics`.
//!
//! In single-node mode the server holds one [`LocalHost`]; a farm adds remote hosts
//! ([`RemoteHost`]) behind the same trait.

use std::collections::BTreeMap;
use std::time::Duration;

use hangar_core::{ReadySpec, Service};
use serde::{Deserialize, Serialize};

pub mod agent;
pub mod facts;
pub mod guest;
pub mod images;
pub mod local;
pub mod metrics;
pub mod ready;
pub mod remote;
pub mod segment;

pub use hangar_vmm::migrate::MigrationProgress;
pub use hangar_vmm::{ArchiveTier, RunState};
pub use images::ProgressFn;
pub use local::{LocalHost, LocalHostConfig};
pub use remote::RemoteHost;
pub use segment::{SegmentError, SegmentJoin};

/// What a VM is made for; decides its hostname, CPU priority and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Handed to a request: left running once ready.
    Request,
    /// Filled into a warm pool: paused once ready, at low CPU priority while it boots.
    Pool,
    /// Becomes its service's template: snapshotted once ready, then gone as a VM.
    Template,
}

/// What to make: a service VM, or (no service) a pre-OS hardware shell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmPlan {
    /// The VM's id, chosen by the control plane.
    pub id: String,
    pub service: Option<Service>,
    /// The OS its root runs (the service's own unless the request names another).
    pub os: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The request's settings.
    pub env: BTreeMap<String, String>,
    /// The guest's hostname until it is handed out.
    pub hostname: String,
    pub purpose: Purpose,
    /// A ready criterion other than the service's (a pool's, set at run time).
    pub ready: Option<ReadySpec>,
    /// What the guest may reach out of the VM, enforced by the host (`none` by default).
    #[serde(default)]
    pub egress: hangar_core::EgressPolicy,
}

impl VmPlan {
    /// A VM of `service` as its catalog entry describes it (its OS, size and ready
    /// criterion, no settings), named `id` (its hostname too), made for `purpose`.
    pub fn for_service(id: &str, service: &Service, purpose: Purpose) -> VmPlan {
        VmPlan {
            id: id.to_owned(),
            service: Some(service.clone()),
            os: Some(service.os.clone()),
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            env: BTreeMap::new(),
            hostname: id.to_owned(),
            purpose,
            ready: None,
            egress: hangar_core::EgressPolicy::default(),
        }
    }
}

/// What a host keeps of a VM it started, to adopt, restore or change it later. Opaque to
/// the control plane: it is stored with the VM and handed back to the host that wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LaunchRecord(pub serde_json::Value);

impl LaunchRecord {
    /// The egress policy the VM was started with (and is restored with): `open` for a VM
    /// recorded before policies existed.
    pub fn egress(&self) -> hangar_core::EgressPolicy {
        self.0
            .get("egress")
            .and_then(|policy| serde_json::from_value(policy.clone()).ok())
            .unwrap_or_else(hangar_core::EgressPolicy::legacy)
    }
}

/// A VM prepared by [`Host::prepare_vm`]: images resolved, host ports chosen, no process
/// yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedVm {
    /// The VM's own endpoints (`host:port`) by service port name.
    pub direct_endpoints: BTreeMap<String, String>,
    pub launch: LaunchRecord,
}

/// A VM made by [`Host::make_vm`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MadeVm {
    /// The record to store with the VM from now on.
    pub launch: LaunchRecord,
    /// The host's process id of the VM, for operators only (shown in listings); the
    /// control plane never acts on it.
    pub process: Option<u32>,
    /// Cloned from its service's template rather than booted.
    pub cloned: bool,
    /// For [`Purpose::Template`]: the template it became (the VM is gone).
    pub template: Option<TemplateFacts>,
}

/// How to hand out a paused pool VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandOut {
    /// Slice it down to (vCPUs, MiB): balloon and offline vCPUs.
    pub slice_to: Option<(u32, u32)>,
    /// Its current size (vCPUs, MiB).
    pub size: (u32, u32),
}

/// A pool VM handed out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandedOut {
    pub stages: Stages,
    /// The size it was sliced to, as (vCPUs, MiB).
    pub sliced_to: Option<(u32, u32)>,
}

/// What a pre-OS shell becomes when it is handed out (the partial match).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShellPlan {
    pub service: Option<Service>,
    pub os: String,
    pub env: BTreeMap<String, String>,
    /// The applications `service` is composed of, when it offers several
    /// (`hangar_core::compose`): the shell is given their layers stacked over the OS layer
    /// (see `ImageSource::composed_root`). Empty: `service`'s own image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Service>,
    /// Slice the booted VM down to (vCPUs, MiB) before its service is checked ready
    /// (exact size on a shell larger than the request).
    #[serde(default)]
    pub slice_to: Option<(u32, u32)>,
}

/// A pre-OS shell booted with its OS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootedShell {
    pub launch: LaunchRecord,
    pub direct_endpoints: BTreeMap<String, String>,
    /// The size it was sliced to, when the plan asked.
    #[serde(default)]
    pub sliced_to: Option<(u32, u32)>,
}

/// How a VM sleeps now, for [`Host::wake`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WakeFrom {
    /// Paused in memory: resumed exactly as it was.
    Sleeping,
    /// An archive on disk: restored into a new process, then its services' ready criteria
    /// checked through its own endpoints.
    Archived {
        launch: LaunchRecord,
        services: Vec<Service>,
        direct_endpoints: BTreeMap<String, String>,
    },
}

/// A woken VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Woken {
    pub stages: Stages,
    /// The new process id after a restore, for operators only.
    pub process: Option<u32>,
}

/// A VM re-attached by [`Host::adopt`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Adopted {
    /// Its process id, for operators only.
    pub process: Option<u32>,
}

/// Bytes of a VM's serial console ([`Host::console`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// Where `data` starts in the console's output.
    pub offset: u64,
    pub data: Vec<u8>,
    /// How much output the console holds now: ask again from here for what comes next.
    pub size: u64,
}

/// An archived VM's memory snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveFacts {
    pub tier: ArchiveTier,
    pub size_bytes: u64,
    /// Guest memory it holds.
    pub memory_mib: u32,
    /// How long archiving took, pause to process exit.
    pub took_ms: u64,
}

/// One VM that has a process on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRun {
    pub id: String,
    pub state: RunState,
}

/// One template a host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateFacts {
    /// `<service>-<key>`: unique on its host.
    pub id: String,
    pub service: String,
    /// Hash of everything its snapshot depends on.
    pub key: String,
    /// Where the host keeps it, for operators.
    pub location: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Memory snapshot plus frozen disk layer.
    pub size_bytes: u64,
    pub took_ms: u64,
    pub created_unix_ms: u64,
    /// Made from the service's current definition (new VMs may be cloned from it).
    pub current: bool,
}

/// A template as peers pull it: its files by content hash, and the content identity of
/// what its snapshot was taken from. Two hosts whose images came from the same blobs (farm
/// hosts pull them by hash) compute the same [`TemplateBundle::content_key`] for a service,
/// so a template made on one can be cloned from on the other instead of being built again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateBundle {
    pub service: String,
    /// Hash of the service's definition, the kernel's, initramfs's and base disk's content
    /// hashes, the kernel command line and the machine size.
    pub content_key: String,
    /// The raw migration stream (the device state only, for a mapped template).
    pub memory: hangar_api::Blob,
    /// A mapped template's RAM file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<hangar_api::Blob>,
    /// The frozen disk layer (a qcow2 over the base disk), if the VM has one.
    pub disk: Option<hangar_api::Blob>,
    /// The QEMU that wrote the stream: a clone needs the same.
    pub qemu_version: String,
}

/// Where a host pulls a peer's template files from: the peer agent's base URL and the
/// farm token it accepts. Blobs come from `GET {url}/v1/farm/blobs/{sha256}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSource {
    /// The peer host's name, for messages.
    pub host: String,
    pub url: String,
    pub token: String,
}

/// A live migration's destination, waiting ([`Host::migrate_incoming`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingVm {
    /// The VM's record on the destination, to store once it runs there.
    pub launch: LaunchRecord,
    /// Its own endpoints on the destination (`host:port`) by service port name.
    pub direct_endpoints: BTreeMap<String, String>,
    /// Where the source sends the migration stream (`host:port`).
    pub migration: String,
    /// The destination's writable NBD export of the new root disk (`host:port`, export
    /// `root`), when the VM has a root disk.
    pub disk: Option<String>,
    /// Its process on the destination, for operators only.
    pub process: Option<u32>,
}

/// An archived VM as a peer pulls it to run it there instead (a cold migration): its
/// files by content hash, and the content identity of the read-only files it runs over.
/// The destination resolves those to its own copies (same hashes) and refuses when it
/// holds other ones, so the VM wakes there exactly as it would have on its source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmBundle {
    pub id: String,
    /// The VM's launch record on the source (its paths are the source's).
    pub launch: LaunchRecord,
    pub tier: ArchiveTier,
    /// The archive's memory and device state.
    pub memory: hangar_api::Blob,
    /// The VM's own disk layer (a qcow2 over its base), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<hangar_api::Blob>,
    /// The sha256 of each read-only file the launch record names (kernel, initramfs, base
    /// disk, layers), by its path on the source; a clone's template files are named by
    /// [`VmBundle::template`] instead.
    pub files: BTreeMap<String, String>,
    /// For a VM cloned from a template: the template the destination must hold (its disk
    /// layer and, for a mapped template, its RAM are what the VM runs over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    /// The QEMU that wrote the archive: a restore needs a compatible one.
    pub qemu_version: String,
}

/// A template by its content identity (see [`TemplateBundle::content_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    pub service: String,
    pub content_key: String,
}

/// What a host needs besides the bundle to take an archived VM ([`Host::pull_vm`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmArrival {
    pub bundle: VmBundle,
    /// The services the VM offers (their ports get host ports here; a clone's template is
    /// looked up by its service).
    pub services: Vec<Service>,
    /// The OS its root runs, when not its service's own (the request's `os` setting).
    #[serde(default)]
    pub os: Option<String>,
    /// The VM's direct endpoints on the source, by port name: which guest ports get a host
    /// port here.
    pub direct_endpoints: BTreeMap<String, String>,
    /// The source host's agent, where the bundle's files are pulled from.
    pub from: PeerSource,
}

/// An archived VM taken in by [`Host::pull_vm`]: what the control plane records of it on
/// its new host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PulledVm {
    pub launch: LaunchRecord,
    /// Its own port forwards here, by port name.
    pub direct_endpoints: BTreeMap<String, String>,
    /// Bytes pulled from the source.
    pub bytes: u64,
}

/// What a host has, for placement and listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub name: String,
    /// `qemu` or `fake`.
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub free_memory_mib: u64,
    pub free_disk_mib: u64,
    /// One-minute load average.
    pub load: f64,
    /// Templates held, by id.
    pub templates: Vec<String>,
    /// Image blobs held, by sha256 (hosts that pull their images from the control plane).
    #[serde(default)]
    pub blobs: Vec<String>,
    /// Service roots held whole, as `service@os` (a VM of one starts without pulling).
    #[serde(default)]
    pub images: Vec<String>,
}

/// Named stage durations of one operation, as the API's `Server-Timing` header reports
/// them.
///
/// On the wire (a remote host's reply) it is a list of `{"stage": NAME, "ms": F64}`; names
/// are read back as the known stage names ([`STAGE_NAMES`]), any other as `other`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stages(pub Vec<(&'static str, Duration)>);

/// Every stage name an operation reports; a name read from the wire that is not among them
/// becomes `other`.
pub const STAGE_NAMES: &[&str] = &[
    "priority", "resume", "identity", "slice", "restore", "ready", "boot", "claim", "match",
    "clone", "launch", "snapshot", "image",
];

/// One stage on the wire.
#[derive(Serialize, Deserialize)]
struct WireStage {
    stage: String,
    ms: f64,
}

impl Serialize for Stages {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(name, took)| WireStage {
            stage: (*name).to_owned(),
            ms: took.as_secs_f64() * 1000.0,
        }))
    }
}

impl<'de> Deserialize<'de> for Stages {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Vec::<WireStage>::deserialize(deserializer)?;
        Ok(Stages(
            wire.into_iter()
                .map(|stage| {
                    let name = STAGE_NAMES
                        .iter()
                        .find(|known| **known == stage.stage)
                        .copied()
                        .unwrap_or("other");
                    let ms = if stage.ms.is_finite() {
                        stage.ms.max(0.0)
                    } else {
                        0.0
                    };
                    (name, Duration::from_secs_f64(ms / 1000.0))
                })
                .collect(),
        ))
    }
}

impl Stages {
    /// Records the time since `since` as stage `name` and returns now.
    pub fn mark(&mut self, name: &'static str, since: std::time::Instant) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.0.push((name, now - since));
        now
    }

    /// `name;dur=MS, ...`, the `Server-Timing` header value (RFC: W3C Server Timing).
    pub fn header(&self, total: Duration) -> String {
        self.0
            .iter()
            .chain(std::iter::once(&("total", total)))
            .map(|(name, took)| format!("{name};dur={:.3}", took.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Vmm(#[from] hangar_vmm::VmmError),
    #[error(transparent)]
    Agent(#[from] hangar_vmm::AgentError),
    /// An image could not be resolved or built.
    #[error(transparent)]
    Image(#[from] crate::images::ImageSourceError),
    #[error("allocating host ports: {0}")]
    Ports(#[source] std::io::Error),
    #[error("no agent channel")]
    NoAgent,
    /// The guest refused or failed a configuration step.
    #[error("{0}")]
    Guest(String),
    /// A private segment cannot be joined (an invalid join, a VM without the NIC).
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// The plan's settings do not make a guest configuration.
    #[error(transparent)]
    Config(#[from] crate::guest::GuestConfigError),
    /// The VM runs but its ready criterion did not pass; the message says what the guest
    /// reported.
    #[error("{0}")]
    NotReady(String),
    #[error("launch record")]
    Record(#[source] serde_json::Error),
    #[error("templates are off (--no-templates)")]
    TemplatesOff,
    /// A peer's template cannot be used here; the text says why.
    #[error("template: {0}")]
    Template(String),
    /// A VM cannot move to or from this host (cold migration); the text says why.
    #[error("migration: {0}")]
    Migration(String),
    /// The control plane knows no host of this name (or, empty, has no host of its own).
    #[error("no host {0:?} is known to this server")]
    Unknown(String),
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A remote host's agent did not answer (refused, reset, timed out): the host may be
    /// down or cut off.
    #[error("cannot reach host {host}")]
    Unreachable {
        host: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A remote host's agent answered with an error that has no variant of its own here
    /// (`kind` is the agent's [`agent::ErrorKind`]); `message` is the agent's error chain.
    #[error("host {host}: {message}")]
    Remote {
        host: String,
        kind: agent::ErrorKind,
        message: String,
    },
}

/// The id of the template a VM was cloned from: the last component of its launch record's
/// `template` directory (`<service>-<key>`). Launch records are written by
/// [`LocalHost`] (its `VmSpec`), on this machine or behind an agent, so every host reads
/// them the same way.
pub fn template_of_record(launch: &LaunchRecord) -> Option<String> {
    let dir = launch.0.get("template")?.as_str()?;
    Some(
        std::path::Path::new(dir)
            .file_name()?
            .to_string_lossy()
            .into_owned(),
    )
}

/// One machine that runs VMs. Every method is safe to call concurrently for different VMs;
/// the caller runs one operation at a time per VM. The trait is object-safe: the control
/// plane holds hosts as `Arc<dyn Host>`.
#[async_trait::async_trait]
pub trait Host: Send + Sync + 'static {
    /// The host's name, unique in a farm (`local` in single-node mode).
    fn name(&self) -> &str;

    /// What the machine has now.
    async fn facts(&self) -> Result<HostFacts, HostError>;

    /// The VMs that have a process here, adopted or not, with their run state.
    async fn inventory(&self) -> Result<Vec<VmRun>, HostError>;

    /// One VM's run state.
    async fn run_state(&self, id: &str) -> Result<RunState, HostError>;

    /// Resolves (building when needed, reported to `progress`) the VM's images and
    /// chooses its host ports. Starts nothing; [`Host::destroy`] frees what it chose.
    async fn prepare_vm(
        &self,
        plan: &VmPlan,
        progress: ProgressFn,
    ) -> Result<PreparedVm, HostError>;

    /// Starts a prepared VM and takes it to ready (reported to `progress`): booted and
    /// configured, or cloned from its service's template and re-identified; left running
    /// ([`Purpose::Request`]), paused ([`Purpose::Pool`]) or turned into a template
    /// ([`Purpose::Template`]). On error the VM may still run: [`Host::destroy`] it.
    async fn make_vm(
        &self,
        plan: &VmPlan,
        prepared: &PreparedVm,
        progress: ProgressFn,
    ) -> Result<MadeVm, HostError>;

    /// Hands out a paused, booted pool VM: normal priority, resumed, fresh identity,
    /// sliced when asked.
    async fn hand_out(&self, id: &str, how: &HandOut) -> Result<HandedOut, HostError>;

    /// Gives a paused pre-OS shell its OS image, port forwards and identity, and boots it
    /// to ready.
    async fn boot_shell(
        &self,
        id: &str,
        launch: &LaunchRecord,
        plan: &ShellPlan,
    ) -> Result<BootedShell, HostError>;

    /// At most `max` bytes of VM `id`'s serial console output from byte `from` on (none:
    /// the last `max` bytes). Empty (size 0) when the VM has no console output here (none
    /// yet, gone, or a backend that keeps none); from the start when `from` is past the
    /// end (the output began again).
    async fn console(
        &self,
        id: &str,
        from: Option<u64>,
        max: u32,
    ) -> Result<ConsoleChunk, HostError>;

    /// Pauses a running VM in memory.
    async fn sleep(&self, id: &str) -> Result<(), HostError>;

    /// Snapshots a VM's memory to disk in `tier` and ends its process. On error the VM
    /// runs (or sleeps) as it was.
    async fn archive(&self, id: &str, tier: ArchiveTier) -> Result<ArchiveFacts, HostError>;

    /// The archive of a VM, if it has one.
    async fn archive_facts(&self, id: &str) -> Result<Option<ArchiveFacts>, HostError>;

    /// Brings a sleeping or archived VM back, with a fresh identity; a restored VM also
    /// passes its ready criteria ([`HostError::NotReady`] when not: it then runs, for
    /// inspection). Returns where the time went (`resume` or `restore`, `identity`,
    /// `ready`).
    async fn wake(&self, id: &str, from: &WakeFrom) -> Result<Woken, HostError>;

    /// Re-attaches to a VM started earlier. `Ok(None)` when its process is gone. With
    /// `running`, a VM found paused is resumed.
    async fn adopt(
        &self,
        id: &str,
        launch: &LaunchRecord,
        running: bool,
    ) -> Result<Option<Adopted>, HostError>;

    /// Ends a VM's process and keeps its files (disk layer, archive).
    async fn stop(&self, id: &str) -> Result<(), HostError>;

    /// Ends a VM's process, if any, and deletes everything it had here. Idempotent.
    async fn destroy(&self, id: &str) -> Result<(), HostError>;

    /// Removes what the host keeps of VMs not in `keep` and without a process (leftover
    /// directories); returns their ids.
    async fn remove_leftovers(
        &self,
        keep: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>, HostError>;

    /// Whether new VMs of `service` can be cloned from a template here (templates are on
    /// and its root is a single disk). A host that cannot tell (unreachable) says no.
    async fn templates_apply(&self, service: &Service) -> bool;

    /// Whether `service`'s current template is built here.
    async fn has_template(&self, service: &Service) -> Result<bool, HostError>;

    /// The id of the template a VM was cloned from, read from its launch record (data
    /// only: no host is asked, see [`template_of_record`]).
    fn template_of(&self, launch: &LaunchRecord) -> Option<String> {
        template_of_record(launch)
    }

    /// Every template held here; [`TemplateFacts::current`] tells whether it was made
    /// from its service's definition in `services`.
    async fn templates(&self, services: &[Service]) -> Result<Vec<TemplateFacts>, HostError>;

    /// Removes a template (nothing uses it any more).
    async fn remove_template(&self, id: &str) -> Result<(), HostError>;

    /// `service`'s current template here as a bundle a peer can pull; `None` when there
    /// is none, or it cannot be shared (its images are not content-addressed here).
    async fn template_bundle(&self, service: &Service)
    -> Result<Option<TemplateBundle>, HostError>;

    /// Installs `service`'s template from `bundle`, pulling its files from the peer
    /// `from` by hash (verified, resumable), instead of building it: afterwards new VMs of
    /// the service are cloned here. Refused when this host's images for the service differ
    /// from the bundle's ([`TemplateBundle::content_key`]) or its QEMU is another.
    async fn pull_template(
        &self,
        service: &Service,
        bundle: &TemplateBundle,
        from: &PeerSource,
    ) -> Result<TemplateFacts, HostError>;

    /// The local file of a template bundle's blob held here, which peers may pull; none
    /// for a hash this host does not offer.
    async fn template_blob(&self, _sha256: &str) -> Option<std::path::PathBuf> {
        None
    }

    // Live migration, step by step (each step is one call, so the control plane can stop
    // between any two): on the destination `migrate_incoming`, on the source
    // `migrate_start`, `migrate_status` until little RAM is left, `migrate_switchover`;
    // then `migrate_finish` on the destination. `migrate_abort` on the source and
    // `destroy` on the destination undo it at any point before the destination runs.

    /// Destination: starts VM `id` paused, waiting for its state from another host.
    /// `prepared` is this host's [`Host::prepare_vm`] of the VM (its images and ports
    /// here), `source` its record on the source host (its machine: size, devices).
    /// A template clone needs this host's copy of its template (same service and content
    /// key: pull it first). Refused for shells and imported machines. On error nothing runs; [`Host::destroy`] frees the ports.
    async fn migrate_incoming(
        &self,
        id: &str,
        prepared: &PreparedVm,
        source: &LaunchRecord,
    ) -> Result<IncomingVm, HostError>;

    /// Source: copies VM `id`'s disk layer to `to`'s export (returns once the copy is
    /// complete and follows every write), then starts sending its RAM; the migration is
    /// held from completing until [`Host::migrate_switchover`].
    async fn migrate_start(&self, id: &str, to: &IncomingVm) -> Result<(), HostError>;

    /// Source: how far VM `id`'s migration is.
    async fn migrate_status(&self, id: &str) -> Result<MigrationProgress, HostError>;

    /// Source, the pre-copy frozen: how long until a switchover asked for would start
    /// (QEMU's migration thread sleeps out its rate window), so the control plane can hold
    /// the VM's clients just before (`hangar_vmm::migrate::RATE_WINDOW`); `None`: not
    /// known, switch at once. Takes up to about a window to find.
    async fn migrate_window(&self, _id: &str) -> Result<Option<Duration>, HostError> {
        Ok(None)
    }

    /// Source: completes the migration within `downtime_ms`; VM `id` is left paused here
    /// (abort resumes it). Returns the final progress with the measured downtime.
    async fn migrate_switchover(
        &self,
        id: &str,
        downtime_ms: u64,
    ) -> Result<MigrationProgress, HostError>;

    /// Source: cancels VM `id`'s migration at any stage; it runs on here as it was.
    async fn migrate_abort(&self, id: &str) -> Result<(), HostError>;

    /// Destination: waits for VM `id`'s state to arrive and runs it.
    async fn migrate_finish(&self, id: &str) -> Result<Adopted, HostError>;

    /// Connects VM `id`'s private NIC to `join.segment` on this host (creating the
    /// segment's switch when it is the first member) and tells its guest its private
    /// address, MAC and peers' names; then writes `join.files`, reloads `join.reload` and
    /// restarts `join.restart` processes. Idempotent: joining again replaces the guest's
    /// private settings. The VM must run here with a segment NIC (every VM made since
    /// segments exist; not imported machines): else [`HostError::Segment`]. The membership
    /// lasts through sleep, archive and wake and a restart of the host process; a VM
    /// migrated to another host must join again there.
    async fn join_segment(&self, id: &str, _join: &SegmentJoin) -> Result<(), HostError> {
        Err(HostError::Guest(format!(
            "host {} cannot connect VM {id} to a private segment",
            self.name()
        )))
    }

    /// Disconnects VM `id` from its segment (the switch goes with its last member); the
    /// guest keeps its settings, its frames go nowhere. Nothing to do when it is in none.
    async fn leave_segment(&self, id: &str) -> Result<(), HostError> {
        Err(HostError::Guest(format!(
            "host {} cannot disconnect VM {id} from a private segment",
            self.name()
        )))
    }

    /// Closes the host port forwards of running VM `id` to `guest_ports` (a stack
    /// member's private ports: reachable from its segment only): their host ports stop
    /// listening at once. `launch` is the VM's record; the answer is the record to store
    /// from now on, without those forwards, so that later starts (a wake from an archive)
    /// do not open them again. Ports the VM forwards nothing to are skipped.
    async fn close_forwards(
        &self,
        id: &str,
        _launch: &LaunchRecord,
        _guest_ports: &[u16],
    ) -> Result<LaunchRecord, HostError> {
        Err(HostError::Guest(format!(
            "host {} cannot close VM {id}'s port forwards",
            self.name()
        )))
    }

    /// Archived VM `id` as a bundle a peer can pull to take it over (a cold migration):
    /// its archive and disk layer hashed and offered through [`Host::template_blob`] until
    /// the VM's files go ([`Host::destroy`]). Refused for a VM without a complete archive
    /// here, or whose files cannot be named by content.
    async fn vm_bundle(&self, id: &str) -> Result<VmBundle, HostError> {
        Err(HostError::Migration(format!(
            "host {} cannot offer VM {id}'s files to peers",
            self.name()
        )))
    }

    /// Takes in an archived VM from a peer ([`VmArrival`]): its read-only files resolved
    /// to this host's copies by hash (a clone's template must be held here, same content
    /// key), its archive and disk layer pulled from the peer by hash (verified), the disk
    /// layer pointed at this host's base, host ports chosen for its services. Afterwards
    /// the VM is archived here: [`Host::wake`] with the returned launch record restores
    /// it. On error nothing of it is left here. The source keeps its copy.
    async fn pull_vm(&self, arrival: &VmArrival) -> Result<PulledVm, HostError> {
        Err(HostError::Migration(format!(
            "host {} cannot take VM {} from a peer",
            self.name(),
            arrival.bundle.id
        )))
    }
}
