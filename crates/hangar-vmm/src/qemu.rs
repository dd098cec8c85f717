//! The QEMU backend: one `qemu-system-x86_64` process per VM on the `microvm` machine with
//! PVH direct kernel boot, virtio-mmio devices, user-mode networking with host port
//! forwards, a virtio-serial agent channel, and a QMP socket.
//!
//! Each VM owns one directory, `<vms_dir>/<id>/`:
//!
//! | file          | what                                             |
//! |---------------|--------------------------------------------------|
//! | `disk.qcow2`  | the VM's copy-on-write layer over the shared base |
//! | `qmp.sock`    | QMP control socket                                |
//! | `agent.sock`  | the agent channel to hangar-init                  |
//! | `console.log` | the guest's serial console                        |
//! | `qemu.pid`    | QEMU's pid (QEMU runs in its own session)        |
//! | `qemu.log`    | QEMU's own output                                 |
//! | `memory.*`, `archive.json` | an archived VM's snapshot (see [`crate::archive`]) |
//!
//! QEMU is started in its own session, so it outlives the server (a `kill -9` of the server
//! leaves guests running) and is re-adopted through its sockets on the next start. It is not
//! daemonized by `-daemonize`: that forks under the seccomp sandbox, which forbids it
//! ([`crate::confine`]). It runs as [`QemuConfig::user`] when one is set.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use crate::agent::Agent;
use crate::archive::{self, ArchiveRecord};
use crate::confine::VmUser;
use crate::qmp::Qmp;
use crate::{
    Accel, ArchiveInfo, ArchiveTier, Hypervisor, Launched, MemoryBacking, PortForward, RunState,
    TemplateInfo, VmSpec, VmmError, procs, template,
};

/// How long a refused connection to a starting QEMU's socket is retried.
const CONNECT_RETRY: Duration = Duration::from_secs(5);

/// How long QEMU may take to create its control sockets.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Nice value of VMs booted in the background (pool fills).
const BACKGROUND_NICE: libc::c_int = 10;

/// Longest path a unix socket address holds (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Names under which the migration pipe's end is given to QEMU (`getfd`).
const ARCHIVE_FD: &str = "hangar-archive";
const RESTORE_FD: &str = "hangar-restore";

/// Migration bandwidth limit while archiving or restoring: effectively none (QEMU's default
/// of 32 MiB/s is meant for live migration over a shared network).
const MIGRATE_MAX_BANDWIDTH: u64 = 1 << 40;

#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Directory holding one subdirectory per VM.
    pub vms_dir: PathBuf,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    /// A resolved accelerator (`kvm` or `tcg`).
    pub accel: Accel,
    /// The unprivileged user QEMU runs as (the server runs as root); `None`: this
    /// process's own user. QEMU always runs under [`crate::confine::SANDBOX`].
    pub user: Option<VmUser>,
    /// Where segment NICs get their taps ([`crate::tap`]); `None`: they are unix datagram
    /// netdevs ([`crate::SegmentSockets`]).
    pub segment_netns: Option<crate::tap::SegmentNetns>,
}

impl QemuConfig {
    pub fn new(vms_dir: PathBuf, accel: Accel) -> QemuConfig {
        QemuConfig {
            vms_dir,
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            accel: accel.resolve(),
            user: None,
            segment_netns: None,
        }
    }
}

/// The files of one VM.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub qmp: PathBuf,
    pub agent: PathBuf,
    pub console: PathBuf,
    pub pidfile: PathBuf,
    /// The segment NIC's sockets ([`crate::SegmentSockets`]): QEMU's end, the switch's.
    pub nic: PathBuf,
    pub port: PathBuf,
    /// The segment NIC is a tap given to QEMU as [`crate::tap::SEGMENT_TAP_FD`] instead.
    pub segment_tap: bool,
}

impl VmPaths {
    fn new(vms_dir: &Path, id: &str) -> VmPaths {
        let dir = vms_dir.join(id);
        VmPaths {
            disk: dir.join("disk.qcow2"),
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            console: dir.join("console.log"),
            pidfile: dir.join("qemu.pid"),
            nic: dir.join("nic1.sock"),
            port: dir.join("port.sock"),
            segment_tap: false,
            dir,
        }
    }
}

pub(crate) struct Running {
    pub(crate) pid: u32,
    pub(crate) qmp: Qmp,
    pub(crate) agent: Arc<Agent>,
    /// The VM's configuration as it would be started now (kept current by `attach_root`),
    /// recorded with an archive.
    spec: Mutex<VmSpec>,
}

impl Running {
    fn new(pid: u32, qmp: Qmp, agent: Arc<Agent>, spec: &VmSpec) -> Running {
        Running {
            pid,
            qmp,
            agent,
            spec: Mutex::new(spec.clone()),
        }
    }
}

pub struct QemuBackend {
    config: QemuConfig,
    vms: tokio::sync::Mutex<HashMap<String, Arc<Running>>>,
}

impl QemuBackend {
    pub fn new(config: QemuConfig) -> QemuBackend {
        QemuBackend {
            config,
            vms: tokio::sync::Mutex::default(),
        }
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    pub fn paths(&self, id: &str) -> VmPaths {
        VmPaths {
            segment_tap: self.config.segment_netns.is_some(),
            ..VmPaths::new(&self.config.vms_dir, id)
        }
    }

    /// The VM's serial console output so far (last `max` bytes).
    pub fn console_tail(&self, id: &str, max: usize) -> String {
        let bytes = std::fs::read(self.paths(id).console).unwrap_or_default();
        String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(max)..]).into_owned()
    }

    async fn running(&self, id: &str) -> Result<Arc<Running>, VmmError> {
        self.vms
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))
    }

    async fn start(&self, spec: &VmSpec, paths: &VmPaths) -> Result<Running, VmmError> {
        self.start_with(spec, paths, &qemu_args(self.config.accel, spec, paths))
            .await
    }

    /// Makes the VM's root overlay (over `spec.base_image`), runs QEMU with `args` and
    /// connects its control channels. A QEMU that started but cannot be connected to is
    /// killed.
    pub(crate) async fn start_with(
        &self,
        spec: &VmSpec,
        paths: &VmPaths,
        args: &[String],
    ) -> Result<Running, VmmError> {
        check_socket_paths(paths)?;
        if let Some(base) = &spec.base_image {
            create_overlay(&self.config.qemu_img, base, &paths.disk).await?;
        }
        let pid = self.spawn_qemu(spec, args, paths).await?;
        match connect(paths).await {
            Ok((qmp, agent)) => Ok(Running::new(pid, qmp, agent, spec)),
            Err(err) => {
                self.kill_started(&spec.id, pid, paths).await;
                Err(err)
            }
        }
    }

    /// Kills a QEMU this backend started for VM `id` (not yet recorded as running).
    pub(crate) async fn kill_started(&self, id: &str, pid: u32, paths: &VmPaths) {
        if procs::is_qemu_with_pidfile(pid, &paths.pidfile)
            && !procs::kill_and_wait(pid, Duration::from_secs(5)).await
        {
            tracing::warn!(vm = %id, pid, "qemu did not exit after SIGKILL");
        }
    }

    /// Records a started VM as running.
    pub(crate) async fn insert_running(&self, id: &str, running: Running) {
        self.vms
            .lock()
            .await
            .insert(id.to_owned(), Arc::new(running));
    }

    /// A running VM's handles.
    pub(crate) async fn running_vm(&self, id: &str) -> Result<Arc<Running>, VmmError> {
        self.running(id).await
    }

    /// Kills the VM's process (if it is ours) and removes its directory.
    pub(crate) async fn remove_vm_dir(
        &self,
        paths: &VmPaths,
        known_pid: Option<u32>,
    ) -> Result<(), VmmError> {
        self.cleanup(paths, known_pid).await
    }

    /// Runs QEMU with `args` in its own session (it outlives this process), as
    /// [`QemuConfig::user`] when one is set, and returns its pid once its control sockets
    /// listen. QEMU's output goes to `qemu.log` in the VM's directory; a QEMU that exits
    /// first is an error with that output.
    async fn spawn_qemu(
        &self,
        spec: &VmSpec,
        args: &[String],
        paths: &VmPaths,
    ) -> Result<u32, VmmError> {
        self.give_files(spec, paths)?;
        // What an earlier process of this VM left (it ran until archived): readiness is
        // these files appearing anew.
        for stale in [&paths.qmp, &paths.agent, &paths.pidfile, &paths.nic] {
            match std::fs::remove_file(stale) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err.into()),
                _ => {}
            }
        }
        let log_path = paths.dir.join("qemu.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&log_path)?;
        // The segment tap, made for this start: QEMU's copy is its only one once this one is
        // closed below, so the tap goes when QEMU exits.
        let tap = match (
            &self.config.segment_netns,
            spec.segment_nic && paths.segment_tap,
        ) {
            (Some(netns), true) => {
                let name = crate::tap::tap_name(&spec.id);
                Some(netns.open_tap(&name).map_err(|err| {
                    VmmError::Launch(format!(
                        "making segment tap {name} in network namespace {}: {err}",
                        netns.name()
                    ))
                })?)
            }
            _ => None,
        };
        let tap_fd = tap.as_ref().map(|fd| fd.as_raw_fd());
        let mut command = tokio::process::Command::new(&self.config.qemu);
        let nice = spec.background.then_some(BACKGROUND_NICE);
        let credentials = self.config.user.as_ref().map(VmUser::credentials);
        // SAFETY: runs in the forked child before exec; setsid(2), setpriority(2), dup2(2),
        // fcntl(2) and the credential calls are async-signal-safe and touch only memory
        // prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = tap_fd {
                    // dup2 clears close-on-exec on the copy; the same number keeps the flag.
                    let target = crate::tap::SEGMENT_TAP_FD;
                    let kept = if fd == target {
                        libc::fcntl(fd, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, target)
                    };
                    if kept < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(nice) = nice {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                }
                if let Some(credentials) = &credentials {
                    credentials.apply()?;
                }
                Ok(())
            });
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                program: self.config.qemu.display().to_string(),
                source,
            })?;
        drop(tap);
        let pid = child
            .id()
            .ok_or_else(|| VmmError::Launch("QEMU exited at once".into()))?;
        let deadline = Instant::now() + QEMU_START_TIMEOUT;
        let exited = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if paths.qmp.exists() && paths.agent.exists() && read_pid(&paths.pidfile) == Some(pid) {
                break None;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Launch(format!(
                    "its sockets did not appear within {} s",
                    QEMU_START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if let Some(status) = exited {
            let output = std::fs::read_to_string(&log_path).unwrap_or_default();
            let output = output.trim();
            return Err(VmmError::Launch(if output.is_empty() {
                format!("exit status {status}")
            } else {
                output.to_owned()
            }));
        }
        // Reaped here while this process lives; after it, by init.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(pid)
    }

    /// As [`QemuConfig::user`]: the VM's directory and disk become its own, and the files
    /// QEMU opens by name (kernel, initramfs, base image, layers) readable to it.
    fn give_files(&self, spec: &VmSpec, paths: &VmPaths) -> Result<(), VmmError> {
        let Some(user) = &self.config.user else {
            return Ok(());
        };
        user.grant_enter_above(&paths.dir)?;
        user.own(&paths.dir)?;
        if paths.disk.exists() {
            user.own(&paths.disk)?;
            user.grant_backing_chain(&paths.disk, false)?;
        }
        if let Some(base) = spec.base_image.as_ref().filter(|base| base.exists()) {
            user.grant_backing_chain(base, true)?;
        }
        for file in [&spec.kernel, &spec.initramfs]
            .into_iter()
            .chain(&spec.layers)
        {
            if file.exists() {
                user.grant_read(file)?;
            }
        }
        if let MemoryBacking::Mapped { file } = &spec.memory {
            // QEMU 7.2 opens it read-write to map it privately (see `template`).
            user.grant_read_write(file)?;
        }
        Ok(())
    }

    /// Kills the VM's process (if it is ours) and removes its directory.
    async fn cleanup(&self, paths: &VmPaths, known_pid: Option<u32>) -> Result<(), VmmError> {
        let pid = known_pid.or_else(|| read_pid(&paths.pidfile));
        if let Some(pid) = pid
            && procs::is_qemu_with_pidfile(pid, &paths.pidfile)
            && !procs::kill_and_wait(pid, Duration::from_secs(5)).await
        {
            tracing::warn!(pid, "qemu did not exit after SIGKILL");
        }
        match tokio::fs::remove_dir_all(&paths.dir).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}

#[async_trait::async_trait]
impl Hypervisor for QemuBackend {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn ram_tail_kib(&self) -> u32 {
        match self.config.accel {
            Accel::Tcg => TCG_RAM_TAIL_KIB,
            Accel::Kvm | Accel::Auto => 0,
        }
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Launched, VmmError> {
        let paths = self.paths(&spec.id);
        tokio::fs::create_dir_all(&self.config.vms_dir).await?;
        tokio::fs::create_dir(&paths.dir).await?;
        match self.start(spec, &paths).await {
            Ok(running) => {
                let launched = Launched {
                    pid: Some(running.pid),
                    agent: running.agent.clone(),
                };
                tracing::info!(vm = %spec.id, pid = running.pid, accel = %self.config.accel, "qemu started");
                self.vms
                    .lock()
                    .await
                    .insert(spec.id.clone(), Arc::new(running));
                Ok(launched)
            }
            Err(err) => {
                if let Err(cleanup) = self.cleanup(&paths, None).await {
                    tracing::warn!(vm = %spec.id, error = %cleanup, "cleanup after failed launch");
                }
                Err(err)
            }
        }
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Launched>, VmmError> {
        if let Some(running) = self.vms.lock().await.get(&spec.id) {
            return Ok(Some(Launched {
                pid: Some(running.pid),
                agent: running.agent.clone(),
            }));
        }
        let paths = self.paths(&spec.id);
        let Some(pid) = read_pid(&paths.pidfile) else {
            return Ok(None);
        };
        if !procs::is_qemu_with_pidfile(pid, &paths.pidfile) {
            return Ok(None);
        }
        let (qmp, agent) = connect(&paths).await?;
        let launched = Launched {
            pid: Some(pid),
            agent: agent.clone(),
        };
        match archive::remove_stale(&paths.dir) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(vm = %spec.id, ?removed, "removed an interrupted archive's files");
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(vm = %spec.id, error = %err, "cannot remove an interrupted archive's files");
            }
        }
        tracing::info!(vm = %spec.id, pid, "qemu adopted");
        self.vms.lock().await.insert(
            spec.id.clone(),
            Arc::new(Running::new(pid, qmp, agent, spec)),
        );
        Ok(Some(launched))
    }

    async fn running(&self) -> Result<Vec<String>, VmmError> {
        Ok(procs::qemu_processes_under(&self.config.vms_dir)
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    async fn pause(&self, id: &str) -> Result<(), VmmError> {
        Ok(self.running(id).await?.qmp.stop().await?)
    }

    async fn resume(&self, id: &str) -> Result<(), VmmError> {
        Ok(self.running(id).await?.qmp.cont().await?)
    }

    async fn run_state(&self, id: &str) -> Result<RunState, VmmError> {
        let Ok(running) = self.running(id).await else {
            return Ok(RunState::Gone);
        };
        if !procs::alive(running.pid) {
            return Ok(RunState::Gone);
        }
        match running.qmp.query_status().await {
            Ok(status) if status.running => Ok(RunState::Running),
            Ok(_) => Ok(RunState::Paused),
            Err(_) if !procs::alive(running.pid) => Ok(RunState::Gone),
            Err(err) => Err(err.into()),
        }
    }

    async fn attach_root(
        &self,
        id: &str,
        base_image: &Path,
        layers: &[PathBuf],
    ) -> Result<(), VmmError> {
        let running = self.running(id).await?;
        let slots = running.spec.lock().expect("vm spec lock").layer_slots;
        if layers.len() > slots {
            return Err(VmmError::Launch(format!(
                "{} layers do not fit the shell's {slots} layer slots",
                layers.len()
            )));
        }
        let paths = self.paths(id);
        create_overlay(&self.config.qemu_img, base_image, &paths.disk).await?;
        let attached = self.attach_disks(&running, &paths, layers).await;
        if let Err(err) = attached {
            let _ = tokio::fs::remove_file(&paths.disk).await;
            return Err(err);
        }
        let mut spec = running.spec.lock().expect("vm spec lock");
        spec.base_image = Some(base_image.to_owned());
        spec.layers = layers.to_vec();
        spec.pre_os = false;
        Ok(())
    }

    async fn add_forwards(&self, id: &str, forwards: &[PortForward]) -> Result<(), VmmError> {
        let running = self.running(id).await?;
        for forward in forwards {
            let command = format!(
                "hostfwd_add n0 tcp:{}:{}-:{}",
                forward.host, forward.host_port, forward.guest_port
            );
            // Silent when it added the rule.
            hmp(&running.qmp, &command, str::is_empty).await?;
        }
        Ok(())
    }

    async fn remove_forwards(&self, id: &str, forwards: &[PortForward]) -> Result<(), VmmError> {
        let running = self.running(id).await?;
        for forward in forwards {
            // QEMU 7.2 answers "host forwarding rule for tcp:ADDR:PORT removed" (or "not
            // found"); the listening socket is closed when it was removed.
            let command = format!(
                "hostfwd_remove n0 tcp:{}:{}",
                forward.host, forward.host_port
            );
            hmp(&running.qmp, &command, |text| text.ends_with(" removed")).await?;
            running
                .spec
                .lock()
                .expect("vm spec lock")
                .forwards
                .retain(|f| f != forward);
        }
        Ok(())
    }

    async fn set_memory(&self, id: &str, memory_mib: u32) -> Result<(), VmmError> {
        let running = self.running(id).await?;
        if !running
            .spec
            .lock()
            .expect("vm spec lock")
            .memory
            .is_anonymous()
        {
            return Err(VmmError::Launch(format!(
                "VM {id}'s memory is file-backed (a template or a clone of one): it has no \
                 balloon, its memory cannot be reduced"
            )));
        }
        let bytes = u64::from(memory_mib) * 1024 * 1024;
        running
            .qmp
            .execute("balloon", Some(serde_json::json!({ "value": bytes })))
            .await?;
        Ok(())
    }

    async fn set_foreground(&self, id: &str) -> Result<(), VmmError> {
        let running = self.running(id).await?;
        // Nice values are per thread on Linux: every QEMU thread (vCPUs, I/O) is raised.
        let tasks = std::fs::read_dir(format!("/proc/{}/task", running.pid))?;
        for tid in tasks
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse::<libc::id_t>().ok())
        {
            // SAFETY: setpriority(2) has no memory-safety preconditions; the thread ids
            // belong to this VM's QEMU process.
            let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) };
            if ret != 0 {
                tracing::debug!(vm = %id, tid, error = %std::io::Error::last_os_error(), "cannot raise qemu thread priority");
                break;
            }
        }
        Ok(())
    }

    fn console_log(&self, id: &str) -> Option<PathBuf> {
        Some(self.paths(id).console)
    }

    async fn segment_nic(&self, id: &str) -> Option<crate::SegmentNic> {
        let running = self.vms.lock().await.get(id).cloned()?;
        let has_nic = running.spec.lock().map(|spec| spec.segment_nic).ok()?;
        let paths = self.paths(id);
        // A QEMU started by an earlier process with the other kind of NIC (the host's
        // `--segment-net` changed since) keeps it: its command line says which.
        let datagram =
            std::fs::read(format!("/proc/{}/cmdline", running.pid)).is_ok_and(|cmdline| {
                cmdline
                    .split(|b| *b == 0)
                    .any(|arg| arg.starts_with(b"dgram,id=n1,"))
            });
        has_nic.then(|| match &self.config.segment_netns {
            Some(netns) if !datagram => crate::SegmentNic::Tap(crate::SegmentTap {
                name: crate::tap::tap_name(id),
                netns: netns.clone(),
                dir: paths.dir,
            }),
            _ => crate::SegmentNic::Datagram(crate::SegmentSockets {
                nic: paths.nic,
                port: paths.port,
            }),
        })
    }

    fn give_socket(&self, _id: &str, socket: &Path) -> Result<(), VmmError> {
        if let Some(user) = &self.config.user {
            user.own(socket)?;
        }
        Ok(())
    }

    async fn migrate_incoming(
        &self,
        spec: &VmSpec,
        listen: std::net::IpAddr,
    ) -> Result<crate::migrate::IncomingAddrs, VmmError> {
        QemuBackend::migrate_incoming(self, spec, listen).await
    }

    async fn migrate_disk(&self, id: &str, disk: std::net::SocketAddr) -> Result<(), VmmError> {
        QemuBackend::migrate_disk(self, id, disk).await
    }

    async fn migrate_ram(&self, id: &str, to: std::net::SocketAddr) -> Result<(), VmmError> {
        QemuBackend::migrate_ram(self, id, to).await
    }

    async fn migration_progress(
        &self,
        id: &str,
    ) -> Result<crate::migrate::MigrationProgress, VmmError> {
        QemuBackend::migration_progress(self, id).await
    }

    async fn migration_window(&self, id: &str) -> Result<Option<Duration>, VmmError> {
        QemuBackend::migration_window(self, id).await
    }

    async fn migrate_switchover(
        &self,
        id: &str,
        downtime_ms: u64,
    ) -> Result<crate::migrate::MigrationProgress, VmmError> {
        QemuBackend::migrate_switchover(self, id, downtime_ms).await
    }

    async fn migrate_cancel(&self, id: &str) -> Result<(), VmmError> {
        QemuBackend::migrate_cancel(self, id).await
    }

    async fn migrate_incoming_finish(&self, id: &str) -> Result<Launched, VmmError> {
        QemuBackend::migrate_incoming_finish(self, id).await
    }

    async fn archive(&self, id: &str, tier: ArchiveTier) -> Result<ArchiveInfo, VmmError> {
        let started = Instant::now();
        let running = self.running(id).await?;
        let paths = self.paths(id);
        let fail = |reason: String| VmmError::Archive {
            id: id.to_owned(),
            reason,
        };
        let was_running = running.qmp.query_status().await?.running;
        if was_running {
            running.qmp.stop().await?;
        }
        // Snapshot and commit; on any error the VM is put back as it was.
        let committed = async {
            let spec = running.spec.lock().expect("vm spec lock").clone();
            // A delta refers to the template the VM was cloned from; without one, zstd.
            let template = archive::delta_base(&spec);
            let tier = match (tier, &template) {
                (ArchiveTier::Delta, None) => ArchiveTier::Zstd,
                (tier, _) => tier,
            };
            let (path, size_bytes) =
                snapshot(&running.qmp, &paths, tier, template, spec.memory_mib).await?;
            let info = ArchiveInfo {
                tier,
                path: path.clone(),
                size_bytes,
                memory_mib: spec.memory_mib,
                took_ms: 0,
            };
            let record = ArchiveRecord {
                info,
                disk: paths.disk.exists().then(|| "disk.qcow2".into()),
                disk_bytes: std::fs::metadata(&paths.disk).ok().map(|m| m.len()),
                qemu_version: running.qmp.version().await.unwrap_or_default(),
                created_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                spec,
            };
            if let Err(err) = archive::write_record(&paths.dir, &record) {
                let _ = archive::remove_if_present(&path);
                return Err(format!("cannot write {}: {err}", archive::RECORD_FILE));
            }
            Ok(record)
        }
        .await;
        let mut record = match committed {
            Ok(record) => record,
            Err(reason) => {
                if was_running && let Err(err) = running.qmp.cont().await {
                    tracing::warn!(vm = %id, error = %err, "cannot resume after a failed archive");
                }
                return Err(fail(reason));
            }
        };

        // The archive is complete: end the process.
        self.vms.lock().await.remove(id);
        let quit = tokio::time::timeout(Duration::from_secs(5), running.qmp.quit()).await;
        if !(matches!(quit, Ok(Ok(())))
            && procs::wait_gone(running.pid, Duration::from_secs(10)).await)
            && procs::is_qemu_with_pidfile(running.pid, &paths.pidfile)
            && !procs::kill_and_wait(running.pid, Duration::from_secs(5)).await
        {
            tracing::warn!(vm = %id, pid = running.pid, "qemu did not exit after SIGKILL");
        }
        let _ = archive::remove_if_present(&paths.pidfile);
        record.info.took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Err(err) = archive::write_record(&paths.dir, &record) {
            tracing::warn!(vm = %id, error = %err, "cannot record the archive's duration");
        }
        tracing::info!(vm = %id, %tier, size_bytes = record.info.size_bytes, took_ms = record.info.took_ms, "vm archived");
        Ok(record.info)
    }

    async fn restore(&self, spec: &VmSpec) -> Result<Launched, VmmError> {
        let started = Instant::now();
        let fail = |reason: String| VmmError::Restore {
            id: spec.id.clone(),
            reason,
        };
        if self.vms.lock().await.contains_key(&spec.id) {
            return Err(fail("the VM is running".into()));
        }
        let paths = self.paths(&spec.id);
        let record = archive::read_record(&paths.dir)
            .ok_or_else(|| fail(format!("no archive in {}", paths.dir.display())))?;
        if (spec.memory_mib, spec.vcpus) != (record.spec.memory_mib, record.spec.vcpus) {
            return Err(fail(format!(
                "the archive holds {} MiB and {} vCPUs, the spec asks for {} MiB and {} vCPUs",
                record.spec.memory_mib, record.spec.vcpus, spec.memory_mib, spec.vcpus
            )));
        }
        check_socket_paths(&paths)?;
        // The devices must be those the snapshot was taken with: a shell that got its root
        // disk runs with that disk now.
        let mut spec = spec.clone();
        if paths.disk.exists() {
            spec.pre_os = false;
            spec.base_image = spec
                .base_image
                .or_else(|| record.spec.base_image.clone())
                .or_else(|| Some(paths.disk.clone()));
        }
        let args = restore_args(self.config.accel, &spec, &paths);
        let stream = archive::Prefetch::start(
            &record.info.path,
            record.info.tier,
            archive::delta_base(&record.spec),
            PREFETCH_AHEAD,
        )
        .map_err(|err| fail(format!("reading {}: {err}", record.info.path.display())))?;
        let pid = self
            .spawn_qemu(&spec, &args, &paths)
            .await
            .map_err(|err| fail(err.to_string()))?;
        let (qmp, agent) = match incoming(
            &paths,
            stream,
            &record.info.path,
            record.spec.memory_mib,
            Incoming {
                resume: true,
                ignore_shared: false,
            },
        )
        .await
        {
            Ok(connected) => connected,
            Err(reason) => {
                if procs::is_qemu_with_pidfile(pid, &paths.pidfile)
                    && !procs::kill_and_wait(pid, Duration::from_secs(5)).await
                {
                    tracing::warn!(vm = %spec.id, pid, "qemu did not exit after SIGKILL");
                }
                let _ = archive::remove_if_present(&paths.pidfile);
                return Err(fail(reason));
            }
        };
        let launched = Launched {
            pid: Some(pid),
            agent: agent.clone(),
        };
        self.vms.lock().await.insert(
            spec.id.clone(),
            Arc::new(Running::new(pid, qmp, agent, &spec)),
        );
        // The VM runs from here on; its memory lives in the process, not in the archive.
        if let Err(err) = archive::remove(&paths.dir, &record) {
            tracing::warn!(vm = %spec.id, error = %err, "cannot remove the archive after a restore");
        }
        tracing::info!(vm = %spec.id, pid, tier = %record.info.tier, took_ms = started.elapsed().as_millis(), "vm restored");
        Ok(launched)
    }

    fn archive_info(&self, id: &str) -> Option<ArchiveInfo> {
        archive::read_record(&self.paths(id).dir).map(|record| record.info)
    }

    async fn make_template(&self, id: &str, dir: &Path) -> Result<TemplateInfo, VmmError> {
        let started = Instant::now();
        let fail = |reason: String| VmmError::Archive {
            id: id.to_owned(),
            reason: format!("making a template: {reason}"),
        };
        let paths = self.paths(id);
        let made = async {
            if dir.exists() {
                return Err(fail(format!("{} exists", dir.display())));
            }
            let running = self.running(id).await?;
            let mapped = matches!(
                running.spec.lock().expect("vm spec lock").memory,
                MemoryBacking::TemplateSource
            );
            if mapped {
                // The RAM is in the file already: the stream carries the device state only.
                set_ignore_shared(&running.qmp, true)
                    .await
                    .map_err(|err| fail(err.to_string()))?;
            }
            drop(running);
            self.archive(id, ArchiveTier::Raw).await?;
            let record = archive::read_record(&paths.dir)
                .ok_or_else(|| fail("the snapshot has no record".into()))?;
            let info = TemplateInfo {
                dir: dir.to_owned(),
                memory: record.info.path.clone(),
                ram: None,
                ram_xxh64: None,
                disk: None,
                size_bytes: 0,
                took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                qemu_version: record.qemu_version.clone(),
                created_unix_ms: record.created_unix_ms,
                spec: record.spec.clone(),
            };
            let disk = record.disk.as_ref().map(|disk| paths.dir.join(disk));
            let ram = mapped.then(|| paths.dir.join(template::RAM_FILE));
            let dir = dir.to_owned();
            let memory = record.info.path.clone();
            tokio::task::spawn_blocking(move || {
                template::assemble(&memory, disk.as_deref(), ram.as_deref(), &dir, info)
            })
            .await
            .map_err(|join| fail(join.to_string()))?
            .map_err(|err| fail(err.to_string()))
        }
        .await;
        // The VM is consumed either way.
        if let Err(err) = self.destroy(id).await {
            tracing::warn!(vm = %id, error = %err, "cannot remove a template's source vm");
        }
        let info = made?;
        tracing::info!(vm = %id, template = %dir.display(), size_bytes = info.size_bytes, took_ms = info.took_ms, "template made");
        Ok(info)
    }

    async fn clone_template(
        &self,
        spec: &VmSpec,
        template: &TemplateInfo,
    ) -> Result<Launched, VmmError> {
        let started = Instant::now();
        let fail = |reason: String| {
            VmmError::Launch(format!("cloning {}: {reason}", template.dir.display()))
        };
        if (spec.memory_mib, spec.vcpus) != (template.spec.memory_mib, template.spec.vcpus) {
            return Err(fail(format!(
                "the template holds {} MiB and {} vCPUs, the spec asks for {} MiB and {} vCPUs",
                template.spec.memory_mib, template.spec.vcpus, spec.memory_mib, spec.vcpus
            )));
        }
        // The guest-visible machine is the template's; ports, sockets and files are the
        // clone's own.
        let spec = template::clone_spec(spec, template);
        let mapped = template.ram.is_some();
        let paths = self.paths(&spec.id);
        tokio::fs::create_dir_all(&self.config.vms_dir).await?;
        tokio::fs::create_dir(&paths.dir).await?;
        let cloned = async {
            check_socket_paths(&paths)?;
            if let Some(disk) = &template.disk {
                create_overlay(&self.config.qemu_img, disk, &paths.disk).await?;
            }
            let args = restore_args(self.config.accel, &spec, &paths);
            let stream =
                archive::Prefetch::start(&template.memory, ArchiveTier::Raw, None, PREFETCH_AHEAD)
                    .map_err(|err| fail(format!("reading {}: {err}", template.memory.display())))?;
            let pid = self.spawn_qemu(&spec, &args, &paths).await?;
            match incoming(
                &paths,
                stream,
                &template.memory,
                spec.memory_mib,
                Incoming {
                    resume: false,
                    ignore_shared: mapped,
                },
            )
            .await
            {
                Ok((qmp, agent)) => Ok(Running::new(pid, qmp, agent, &spec)),
                Err(reason) => {
                    if procs::is_qemu_with_pidfile(pid, &paths.pidfile)
                        && !procs::kill_and_wait(pid, Duration::from_secs(5)).await
                    {
                        tracing::warn!(vm = %spec.id, pid, "qemu did not exit after SIGKILL");
                    }
                    Err(fail(reason))
                }
            }
        }
        .await;
        match cloned {
            Ok(running) => {
                let launched = Launched {
                    pid: Some(running.pid),
                    agent: running.agent.clone(),
                };
                tracing::info!(vm = %spec.id, pid = running.pid, took_ms = started.elapsed().as_millis() as u64, "vm cloned from template");
                self.vms
                    .lock()
                    .await
                    .insert(spec.id.clone(), Arc::new(running));
                Ok(launched)
            }
            Err(err) => {
                if let Err(cleanup) = self.cleanup(&paths, None).await {
                    tracing::warn!(vm = %spec.id, error = %cleanup, "cleanup after failed clone");
                }
                Err(err)
            }
        }
    }

    async fn stop(&self, id: &str) -> Result<(), VmmError> {
        let paths = self.paths(id);
        let known = self.vms.lock().await.remove(id).map(|running| running.pid);
        if let Some(pid) = known.or_else(|| read_pid(&paths.pidfile))
            && procs::is_qemu_with_pidfile(pid, &paths.pidfile)
            && !procs::kill_and_wait(pid, Duration::from_secs(5)).await
        {
            tracing::warn!(pid, "qemu did not exit after SIGKILL");
        }
        for socket in [&paths.qmp, &paths.agent, &paths.pidfile] {
            let _ = tokio::fs::remove_file(socket).await;
        }
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<(), VmmError> {
        let paths = self.paths(id);
        let running = self.vms.lock().await.remove(id);
        let mut pid = None;
        if let Some(running) = running {
            pid = Some(running.pid);
            // A clean quit first: QEMU flushes and removes its sockets.
            let quit = tokio::time::timeout(Duration::from_secs(2), running.qmp.quit()).await;
            if matches!(quit, Ok(Ok(()))) {
                procs::wait_gone(running.pid, Duration::from_secs(3)).await;
            }
        }
        self.cleanup(&paths, pid).await?;
        tracing::info!(vm = %id, "vm destroyed");
        Ok(())
    }
}

/// QEMU's command line to restore `spec` from an archive: the same machine and devices as
/// [`qemu_args`], waiting for `migrate-incoming`.
///
/// It names no kernel or initramfs: the guest's memory, kernel included, comes with the
/// stream, and leaving them out spares QEMU loading a kernel image into memory that the
/// stream overwrites (tens of milliseconds of every wake). A restored guest that reboots
/// therefore has nothing to boot, and `-no-reboot` makes QEMU exit instead: the VM is seen
/// as crashed, as a rebooted guest (its state gone) should be.
pub fn restore_args(accel: Accel, spec: &VmSpec, paths: &VmPaths) -> Vec<String> {
    let mut args = command_line(accel, spec, paths, false);
    args.extend(["-incoming".into(), "defer".into()]);
    args
}

/// Runs a human monitor `command` (slirp's forwards have no QMP command in QEMU 7.2); its
/// output, trimmed, must be what `done` accepts, or it is the error.
async fn hmp(qmp: &Qmp, command: &str, done: impl Fn(&str) -> bool) -> Result<(), VmmError> {
    let output = qmp
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": command })),
        )
        .await?;
    let text = output.as_str().unwrap_or_default().trim();
    if done(text) {
        Ok(())
    } else {
        Err(VmmError::Launch(format!("{command}: {text}")))
    }
}

/// How long a migration to or from a file may take: generous, scaled by guest memory.
fn migration_timeout(memory_mib: u32) -> Duration {
    Duration::from_secs(120 + u64::from(memory_mib) / 16)
}

/// Streams the paused VM's state to `memory.<tier>` (see [`crate::archive`] for why a pipe
/// and `fd:`). Returns the file and its size. On error no file remains and QEMU's migration
/// has ended (failed or cancelled), so the VM can continue.
async fn snapshot(
    qmp: &Qmp,
    paths: &VmPaths,
    tier: ArchiveTier,
    template: Option<archive::DeltaBase>,
    memory_mib: u32,
) -> Result<(PathBuf, u64), String> {
    let partial = archive::partial_path(&paths.dir, tier);
    let path = archive::memory_path(&paths.dir, tier);
    archive::remove_if_present(&partial).map_err(|err| format!("{}: {err}", partial.display()))?;
    qmp.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": MIGRATE_MAX_BANDWIDTH })),
    )
    .await
    .map_err(|err| err.to_string())?;
    let (reader, writer) = std::io::pipe().map_err(|err| format!("pipe: {err}"))?;
    enlarge_pipe(&reader);
    qmp.getfd(ARCHIVE_FD, writer.as_fd())
        .await
        .map_err(|err| err.to_string())?;
    drop(writer); // QEMU holds the only write end: end of file when it closes it
    let target = partial.clone();
    let sink = tokio::task::spawn_blocking(move || {
        archive::write_memory(reader, &target, tier, template.as_ref())
    });
    let migrated = match qmp
        .execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("fd:{ARCHIVE_FD}") })),
        )
        .await
    {
        Ok(_) => wait_migration(qmp, migration_timeout(memory_mib)).await,
        Err(err) => {
            // The fd was not consumed: close it, or the pump waits forever.
            let _ = qmp.closefd(ARCHIVE_FD).await;
            Err(err.to_string())
        }
    };
    let written = match tokio::time::timeout(Duration::from_secs(60), sink).await {
        Ok(Ok(written)) => written.map_err(|err| format!("writing {}: {err}", partial.display())),
        Ok(Err(join)) => Err(format!("archive writer: {join}")),
        Err(_) => Err("archive writer did not finish".into()),
    };
    let committed = match (migrated, written) {
        (Ok(()), Ok(size)) => std::fs::rename(&partial, &path)
            .and_then(|()| archive::sync_dir(&paths.dir))
            .map(|()| size)
            .map_err(|err| format!("{}: {err}", path.display())),
        // The write error explains a migration that failed with a broken pipe.
        (_, Err(write)) => Err(write),
        (Err(migrate), Ok(_)) => Err(migrate),
    };
    match committed {
        Ok(size) => Ok((path, size)),
        Err(reason) => {
            let _ = archive::remove_if_present(&partial);
            let _ = archive::remove_if_present(&path);
            Err(reason)
        }
    }
}

/// How far a restore reads its stream ahead while QEMU starts.
const PREFETCH_AHEAD: usize = 64 << 20;

/// How [`incoming`] loads a stream.
#[derive(Debug, Clone, Copy)]
struct Incoming {
    /// Resume the guest once loaded.
    resume: bool,
    /// The stream was written with `x-ignore-shared` (a mapped template's, without its
    /// RAM): the destination must say so too, and says it no longer once loaded, so that
    /// the VM's own archives carry its RAM and restore without it.
    ignore_shared: bool,
}

/// Sets the migration capability `x-ignore-shared`: RAM blocks mapped shared (a mapped
/// template's RAM file) are left out of the stream; the destination maps the same file.
async fn set_ignore_shared(qmp: &Qmp, on: bool) -> Result<(), crate::qmp::QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": on }],
        })),
    )
    .await
    .map(|_| ())
}

/// Feeds `stream` (read from `source`) to a QEMU started with `-incoming defer`, waits for
/// the migration to complete, and resumes the guest when asked. Returns the control
/// channels of the VM.
async fn incoming(
    paths: &VmPaths,
    stream: archive::Prefetch,
    source: &Path,
    memory_mib: u32,
    how: Incoming,
) -> Result<(Qmp, Arc<Agent>), String> {
    let (qmp, agent) = connect(paths).await.map_err(|err| err.to_string())?;
    if how.ignore_shared {
        set_ignore_shared(&qmp, true)
            .await
            .map_err(|err| err.to_string())?;
    }
    let (reader, writer) = std::io::pipe().map_err(|err| format!("pipe: {err}"))?;
    enlarge_pipe(&writer);
    qmp.getfd(RESTORE_FD, reader.as_fd())
        .await
        .map_err(|err| err.to_string())?;
    drop(reader); // QEMU holds the only read end: writes fail once it is gone
    let feed = tokio::task::spawn_blocking(move || stream.drain_into(writer));
    let migrated = match qmp
        .execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("fd:{RESTORE_FD}") })),
        )
        .await
    {
        Ok(_) => wait_migration(&qmp, migration_timeout(memory_mib)).await,
        Err(err) => Err(err.to_string()),
    };
    if let Err(reason) = migrated {
        // The feed ends with EPIPE once the caller kills QEMU; its error explains more.
        let feed = tokio::time::timeout(Duration::from_millis(200), feed).await;
        return Err(match feed {
            Ok(Ok(Err(err))) => format!("{reason} (reading {}: {err})", source.display()),
            _ => reason,
        });
    }
    match feed.await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => return Err(format!("reading {}: {err}", source.display())),
        Err(join) => return Err(format!("archive reader: {join}")),
    }
    if how.ignore_shared {
        set_ignore_shared(&qmp, false)
            .await
            .map_err(|err| err.to_string())?;
    }
    if how.resume {
        qmp.cont().await.map_err(|err| err.to_string())?;
    }
    Ok((qmp, agent))
}

/// Polls `query-migrate` until the migration completes. `failed` carries QEMU's
/// `error-desc`; a QMP connection that closes means QEMU exited (an incoming migration
/// that fails ends the process). Past `timeout` the migration is cancelled.
async fn wait_migration(qmp: &Qmp, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = match qmp.query_migrate().await {
            Ok(info) => info,
            Err(crate::qmp::QmpError::Closed) => {
                return Err("QEMU exited during the migration".into());
            }
            Err(err) => return Err(err.to_string()),
        };
        match info.status.as_deref() {
            Some("completed") => return Ok(()),
            Some("failed") => {
                return Err(format!(
                    "migration failed: {}",
                    info.error_desc.as_deref().unwrap_or("no reason given")
                ));
            }
            Some("cancelled") => return Err("migration cancelled".into()),
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(format!("migration did not complete within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl QemuBackend {
    /// Points a shell's placeholder root at its new disk and its first layer slots at
    /// `layers` (QEMU opens them as its own user); the slots left over keep their empty
    /// placeholders.
    async fn attach_disks(
        &self,
        running: &Running,
        paths: &VmPaths,
        layers: &[PathBuf],
    ) -> Result<(), VmmError> {
        if let Some(user) = &self.config.user {
            user.own(&paths.disk)?;
            user.grant_backing_chain(&paths.disk, false)?;
            for layer in layers {
                user.grant_read(layer)?;
            }
        }
        let qmp = &running.qmp;
        qmp.execute(
            "blockdev-add",
            Some(serde_json::json!({
                "driver": "qcow2",
                "node-name": "disk",
                "file": { "driver": "file", "filename": paths.disk.display().to_string() },
            })),
        )
        .await?;
        // The device was realized over a raw node on a placeholder; point the raw node at
        // the new disk. The guest has not run yet, so it reads the real size at probe.
        qmp.execute(
            "blockdev-reopen",
            Some(serde_json::json!({
                "options": [{ "driver": "raw", "node-name": "root", "file": "disk" }],
            })),
        )
        .await?;
        qmp.execute(
            "blockdev-del",
            Some(serde_json::json!({ "node-name": "placeholder" })),
        )
        .await?;
        for (i, layer) in layers.iter().enumerate() {
            let file = format!("layer{i}-file");
            qmp.execute(
                "blockdev-add",
                Some(serde_json::json!({
                    "driver": "file",
                    "node-name": file,
                    "filename": layer.display().to_string(),
                    "read-only": true,
                })),
            )
            .await?;
            qmp.execute(
                "blockdev-reopen",
                Some(serde_json::json!({
                    "options": [{
                        "driver": "raw",
                        "node-name": format!("layer{i}"),
                        "file": file,
                        "read-only": true,
                    }],
                })),
            )
            .await?;
            qmp.execute(
                "blockdev-del",
                Some(serde_json::json!({ "node-name": format!("slot{i}") })),
            )
            .await?;
        }
        Ok(())
    }
}

/// Best effort: a 1 MiB pipe buffer (64 KiB by default) means fewer context switches.
fn enlarge_pipe(fd: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl(2) with F_SETPIPE_SZ takes an int argument and touches no memory; the
    // fd is a live pipe end owned by the caller.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

fn check_socket_paths(paths: &VmPaths) -> Result<(), VmmError> {
    for socket in [&paths.qmp, &paths.agent, &paths.nic, &paths.port] {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmmError::SocketPath(socket.display().to_string()));
        }
    }
    Ok(())
}

/// QEMU's command line to boot `spec`.
pub fn qemu_args(accel: Accel, spec: &VmSpec, paths: &VmPaths) -> Vec<String> {
    command_line(accel, spec, paths, true)
}

/// Guest RAM that QEMU adds to a VM's `memory_mib` under TCG (KiB), so that the RAM block's
/// length is not a multiple of 64 pages.
///
/// QEMU 7.2 (Debian 12) syncs the migration dirty bitmap of a block whose length is a
/// multiple of 64 pages with whole-word exchanges that do not re-arm TCG's TLB dirty
/// tracking: a page the guest wrote before a sync is written through the same TLB entry
/// afterwards without being marked again, and live migration loses those writes (the
/// destination's RAM differs from the source's; its kernel soon crashes). Other lengths take
/// the per-page path, which resets the TLB entries of the pages it clears (upstream fixed
/// the word path in QEMU 9.0 with `cpu_physical_memory_dirty_bits_cleared`). 8 KiB: `-m`
/// is rounded to 8 KiB. KVM tracks dirty pages itself and needs no tail.
pub const TCG_RAM_TAIL_KIB: u32 = 8;

/// A VM's RAM in KiB: its `memory_mib` and its tail.
fn ram_kib(spec: &VmSpec) -> u64 {
    u64::from(spec.memory_mib) * 1024 + u64::from(spec.ram_tail_kib)
}

/// The machine and devices of `spec`; with its kernel, initramfs and command line when
/// `boot`.
fn command_line(accel: Accel, spec: &VmSpec, paths: &VmPaths, boot: bool) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    // A firmware-booted disk (an imported machine) runs on q35 with PCI devices; hangar's
    // own guests on microvm with virtio-mmio.
    let machine = if spec.firmware {
        "q35"
    } else {
        "microvm,acpi=on,isa-serial=on,rtc=on"
    };
    let bus = if spec.firmware { "pci" } else { "device" };
    let memory_file = match &spec.memory {
        MemoryBacking::Anonymous => None,
        MemoryBacking::TemplateSource => Some((paths.dir.join(template::RAM_FILE), true)),
        MemoryBacking::Mapped { file } => Some((file.clone(), false)),
    }
    .filter(|_| !spec.firmware);
    let machine = match &memory_file {
        Some(_) => format!("{machine},memory-backend={}", crate::RAM_BLOCK),
        None => machine.to_owned(),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("hangar-{}", spec.id),
        "-M".into(),
        machine,
    ];
    args.extend(accel.qemu_args().iter().map(|a| a.to_string()));
    args.extend([
        "-m".into(),
        format!("{}k", ram_kib(spec)),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-sandbox".into(),
        crate::egress::sandbox(spec).into(),
        "-pidfile".into(),
        path(&paths.pidfile),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", path(&paths.console)),
    ]);
    if let Some((file, shared)) = &memory_file {
        args.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id={},size={}K,mem-path={},share={}",
                crate::RAM_BLOCK,
                ram_kib(spec),
                path(file),
                if *shared { "on" } else { "off" }
            ),
        ]);
    }
    if boot && !spec.firmware {
        args.extend([
            "-kernel".into(),
            path(&spec.kernel),
            "-initrd".into(),
            path(&spec.initramfs),
            "-append".into(),
            spec.cmdline.clone(),
        ]);
    }
    if spec.pre_os {
        // Paused before the guest runs; the root slot holds a placeholder until
        // `attach_root` points it at a real disk. The placeholder must be writable: the
        // device fixes its read-only flag when it is created.
        args.extend([
            "-S".into(),
            "-blockdev".into(),
            "driver=null-co,node-name=placeholder,size=1073741824".into(),
            "-blockdev".into(),
            "driver=raw,file=placeholder,node-name=root".into(),
            "-device".into(),
            format!("virtio-blk-device,drive=root,serial={}", crate::ROOT_SERIAL),
        ]);
    } else if spec.base_image.is_some() {
        args.extend([
            "-drive".into(),
            format!("id=root,file={},format=qcow2,if=none", path(&paths.disk)),
            "-device".into(),
            format!("virtio-blk-{bus},drive=root,serial={}", crate::ROOT_SERIAL),
        ]);
    }
    for (i, layer) in spec.layers.iter().enumerate() {
        args.extend([
            "-drive".into(),
            format!(
                "id=layer{i},file={},format=raw,if=none,readonly=on",
                path(layer)
            ),
            "-device".into(),
            format!(
                "virtio-blk-device,drive=layer{i},serial={}",
                crate::layer_serial(i)
            ),
        ]);
    }
    // Empty layer slots (a pre-OS shell's, or what a composed root left of them): a
    // read-only placeholder each, its raw node named as a filled slot's drive.
    for i in spec.layers.len()..spec.layer_slots {
        args.extend([
            "-blockdev".into(),
            format!("driver=null-co,node-name=slot{i},size=1048576,read-only=on"),
            "-blockdev".into(),
            format!("driver=raw,file=slot{i},node-name=layer{i},read-only=on"),
            "-device".into(),
            format!(
                "virtio-blk-device,drive=layer{i},serial={}",
                crate::layer_serial(i)
            ),
        ]);
    }
    args.extend([
        "-netdev".into(),
        crate::egress::netdev(&spec.forwards, &spec.egress),
        "-device".into(),
        format!("virtio-net-{bus},netdev=n0"),
    ]);
    if spec.segment_nic {
        // A tap: the descriptor the host process made for this start. A datagram netdev:
        // connectionless, QEMU sends each frame to the switch's socket whether or not it is
        // bound (none bound: the frame is dropped, silently).
        let netdev = if paths.segment_tap {
            format!("tap,id=n1,fd={}", crate::tap::SEGMENT_TAP_FD)
        } else {
            format!(
                "dgram,id=n1,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                path(&paths.nic),
                path(&paths.port)
            )
        };
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-{bus},netdev=n1,mac={}", crate::SEGMENT_NIC_MAC),
        ]);
    }
    args.extend([
        "-device".into(),
        format!("virtio-serial-{bus}"),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            path(&paths.agent)
        ),
        "-device".into(),
        format!(
            "virtserialport,chardev=agent,name={}",
            hangar_proto::AGENT_PORT_NAME
        ),
        "-device".into(),
        format!("virtio-rng-{bus}"),
    ]);
    // No balloon on file-backed RAM: giving memory back would punch holes in the file.
    if memory_file.is_none() {
        args.extend(["-device".into(), format!("virtio-balloon-{bus}")]);
    }
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path(&paths.qmp)),
    ]);
    args
}

/// Connects QMP and the agent channel. A socket QEMU has bound but not yet listens on
/// refuses connections for a moment after it appears (QEMU is not daemonized, so its
/// sockets are seen while it starts): refused connections are retried for a few seconds.
async fn connect(paths: &VmPaths) -> Result<(Qmp, Arc<Agent>), VmmError> {
    let deadline = Instant::now() + CONNECT_RETRY;
    let refused = |err: &std::io::Error| {
        err.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline
    };
    let qmp = loop {
        match Qmp::connect(&paths.qmp).await {
            Err(crate::qmp::QmpError::Connect { source, .. }) if refused(&source) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            other => break other?,
        }
    };
    let stream = loop {
        match UnixStream::connect(&paths.agent).await {
            Err(err) if refused(&err) => tokio::time::sleep(Duration::from_millis(1)).await,
            other => {
                break other.map_err(|err| {
                    VmmError::Launch(format!(
                        "cannot connect to agent socket {}: {err}",
                        paths.agent.display()
                    ))
                })?;
            }
        }
    };
    Ok((qmp, Agent::spawn(stream)))
}

/// A qcow2 copy-on-write layer at `disk` over the read-only `base`.
async fn create_overlay(qemu_img: &Path, base: &Path, disk: &Path) -> Result<(), VmmError> {
    let base = std::path::absolute(base)?;
    run_tool(
        qemu_img,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            disk.as_os_str(),
        ],
    )
    .await
}

fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

async fn run_tool(program: &Path, args: &[&std::ffi::OsStr]) -> Result<(), VmmError> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(VmmError::Tool {
            program: program.display().to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PortForward;

    #[test]
    fn command_line_has_devices_forwards_and_sockets() {
        let spec = VmSpec {
            id: "vm-1".into(),
            vcpus: 2,
            memory_mib: 256,
            ram_tail_kib: 0,
            segment_nic: false,
            egress: hangar_core::EgressPolicy::Open,
            kernel: "/a/vmlinux".into(),
            initramfs: "/a/initramfs.cpio".into(),
            cmdline: "console=ttyS0 quiet".into(),
            base_image: Some("/img/base.qcow2".into()),
            layers: vec![
                "/cache/layers/b/layer.sqfs".into(),
                "/cache/layers/a/layer.sqfs".into(),
            ],
            forwards: vec![
                PortForward {
                    host: "127.0.0.1".parse().unwrap(),
                    host_port: 40001,
                    guest_port: 80,
                },
                PortForward {
                    host: "127.0.0.1".parse().unwrap(),
                    host_port: 40002,
                    guest_port: 6379,
                },
            ],
            pre_os: false,
            layer_slots: 0,
            background: false,
            template: None,
            firmware: false,
            memory: Default::default(),
        };
        let paths = VmPaths::new(Path::new("/data/vms"), "vm-1");
        let args = qemu_args(Accel::Tcg, &spec, &paths).join(" ");
        for expected in [
            "-M microvm,acpi=on,isa-serial=on,rtc=on -accel tcg -m 262144k -smp 2",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -pidfile /data/vms/vm-1/qemu.pid",
            "-append console=ttyS0 quiet",
            "-drive id=root,file=/data/vms/vm-1/disk.qcow2,format=qcow2,if=none",
            "virtio-blk-device,drive=root,serial=hangar-root",
            "-drive id=layer0,file=/cache/layers/b/layer.sqfs,format=raw,if=none,readonly=on \
             -device virtio-blk-device,drive=layer0,serial=hangar-layer-0",
            "-drive id=layer1,file=/cache/layers/a/layer.sqfs,format=raw,if=none,readonly=on",
            "user,id=n0,hostfwd=tcp:127.0.0.1:40001-:80,hostfwd=tcp:127.0.0.1:40002-:6379",
            "socket,id=agent,path=/data/vms/vm-1/agent.sock,server=on,wait=off",
            "virtserialport,chardev=agent,name=org.hangar.agent",
            "-qmp unix:/data/vms/vm-1/qmp.sock,server=on,wait=off",
        ] {
            assert!(args.contains(expected), "missing {expected:?} in {args}");
        }
        assert!(args.contains("-device virtio-balloon-device"), "{args}");
        assert!(!args.contains("memory-backend"), "{args}");
        // A template's VM: RAM in a file of its directory, written through; no balloon.
        let source = qemu_args(
            Accel::Tcg,
            &VmSpec {
                memory: MemoryBacking::TemplateSource,
                ..spec.clone()
            },
            &paths,
        )
        .join(" ");
        assert!(
            source.contains("-M microvm,acpi=on,isa-serial=on,rtc=on,memory-backend=mem "),
            "{source}"
        );
        assert!(
            source.contains(
                "-object memory-backend-file,id=mem,size=262144K,mem-path=/data/vms/vm-1/ram,share=on"
            ),
            "{source}"
        );
        assert!(!source.contains("balloon"), "{source}");
        // A clone: the template's file mapped privately, restored, no balloon.
        let clone = restore_args(
            Accel::Tcg,
            &VmSpec {
                memory: MemoryBacking::Mapped {
                    file: "/data/templates/t/ram".into(),
                },
                ..spec.clone()
            },
            &paths,
        )
        .join(" ");
        assert!(
            clone.contains(
                "-object memory-backend-file,id=mem,size=262144K,mem-path=/data/templates/t/ram,share=off"
            ),
            "{clone}"
        );
        assert!(!clone.contains("balloon"), "{clone}");
        assert!(!clone.contains("share=on"), "{clone}");
        let kvm = qemu_args(
            Accel::Kvm,
            &VmSpec {
                base_image: None,
                layers: Vec::new(),
                ..spec.clone()
            },
            &paths,
        )
        .join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"));
        let restore = restore_args(Accel::Tcg, &spec, &paths).join(" ");
        assert!(restore.ends_with("-incoming defer"), "{restore}");
        assert!(restore.contains("-no-reboot"), "{restore}");
        assert!(restore.contains("serial=hangar-root"), "{restore}");
        assert!(!restore.contains("-kernel"), "{restore}");
        assert!(!restore.contains("-append"), "{restore}");
        assert!(!kvm.contains("-drive"));
        let shell_spec = VmSpec {
            pre_os: true,
            base_image: None,
            layers: Vec::new(),
            layer_slots: crate::SHELL_LAYER_SLOTS,
            ..spec.clone()
        };
        let shell = qemu_args(Accel::Tcg, &shell_spec, &paths).join(" ");
        assert!(shell.contains(" -S "), "{shell}");
        assert!(
            shell.contains("driver=raw,file=placeholder,node-name=root"),
            "{shell}"
        );
        assert!(
            shell.contains("virtio-blk-device,drive=root,serial=hangar-root"),
            "{shell}"
        );
        // Every layer slot is an empty read-only placeholder with its layer serial.
        for i in 0..crate::SHELL_LAYER_SLOTS {
            assert!(
                shell.contains(&format!(
                    "-blockdev driver=raw,file=slot{i},node-name=layer{i},read-only=on \
                     -device virtio-blk-device,drive=layer{i},serial=hangar-layer-{i}"
                )),
                "slot {i}: {shell}"
            );
        }
        // Once given a composed root, a restored shell has the same devices: the filled
        // slots as drives, the rest still placeholders.
        let composed = VmSpec {
            pre_os: false,
            base_image: Some("/cache/upper.qcow2".into()),
            layers: spec.layers.clone(),
            ..shell_spec
        };
        let restore = restore_args(Accel::Tcg, &composed, &paths).join(" ");
        assert_eq!(
            restore.matches("virtio-blk-device").count(),
            1 + crate::SHELL_LAYER_SLOTS
        );
        assert!(restore.contains("-drive id=layer1,file=/cache/layers/a/layer.sqfs"));
        assert!(restore.contains("node-name=slot2"), "{restore}");
        assert!(!restore.contains("node-name=slot1,"), "{restore}");
    }

    #[test]
    fn a_firmware_boot_runs_q35_with_pci_devices_and_no_kernel() {
        let spec = VmSpec {
            id: "vm-2".into(),
            vcpus: 1,
            memory_mib: 512,
            ram_tail_kib: 0,
            segment_nic: false,
            egress: hangar_core::EgressPolicy::Open,
            kernel: "/a/vmlinux".into(),
            initramfs: "/a/initramfs.cpio".into(),
            cmdline: "console=ttyS0".into(),
            base_image: Some("/data/models/legacy.qcow2".into()),
            layers: Vec::new(),
            forwards: vec![PortForward {
                host: "127.0.0.1".parse().unwrap(),
                host_port: 40003,
                guest_port: 80,
            }],
            pre_os: false,
            background: false,
            template: None,
            firmware: true,
            memory: Default::default(),
            layer_slots: 0,
        };
        let paths = VmPaths::new(Path::new("/data/vms"), "vm-2");
        let args = qemu_args(Accel::Tcg, &spec, &paths).join(" ");
        for expected in [
            "-M q35 -accel tcg -m 524288k -smp 1",
            "-drive id=root,file=/data/vms/vm-2/disk.qcow2,format=qcow2,if=none \
             -device virtio-blk-pci,drive=root,serial=hangar-root",
            "user,id=n0,hostfwd=tcp:127.0.0.1:40003-:80 -device virtio-net-pci,netdev=n0",
            "-device virtio-serial-pci",
            "-device virtio-rng-pci",
        ] {
            assert!(args.contains(expected), "missing {expected:?} in {args}");
        }
        for absent in [
            "microvm",
            "-kernel",
            "-initrd",
            "-append",
            "-device\x20virtio-net-device",
        ] {
            assert!(!args.contains(absent), "{absent} in {args}");
        }
    }

    /// Under TCG a VM's RAM block is not a multiple of 64 pages (see [`TCG_RAM_TAIL_KIB`]):
    /// `-m` and the file backing its RAM carry the tail; KVM adds none.
    #[test]
    fn tcg_guests_get_a_ram_tail_that_kvm_guests_do_not() {
        let tcg = QemuBackend::new(QemuConfig::new("/data/vms".into(), Accel::Tcg));
        let kvm = QemuBackend::new(QemuConfig::new("/data/vms".into(), Accel::Kvm));
        assert_eq!(tcg.ram_tail_kib(), TCG_RAM_TAIL_KIB);
        assert_eq!(kvm.ram_tail_kib(), 0);
        let pages = (256 * 1024 + u64::from(TCG_RAM_TAIL_KIB)) / 4;
        assert_ne!(pages % 64, 0, "the tail makes the block's length uneven");
        assert_eq!(u64::from(TCG_RAM_TAIL_KIB) % 8, 0, "-m is rounded to 8 KiB");

        let spec = VmSpec {
            id: "vm-3".into(),
            vcpus: 1,
            memory_mib: 256,
            ram_tail_kib: TCG_RAM_TAIL_KIB,
            segment_nic: false,
            egress: hangar_core::EgressPolicy::Open,
            kernel: "/a/vmlinux".into(),
            initramfs: "/a/initramfs.cpio".into(),
            cmdline: "console=ttyS0".into(),
            base_image: None,
            layers: Vec::new(),
            forwards: Vec::new(),
            pre_os: false,
            background: false,
            template: None,
            firmware: false,
            memory: MemoryBacking::Mapped {
                file: "/data/templates/t/ram".into(),
            },
            layer_slots: 0,
        };
        let paths = VmPaths::new(Path::new("/data/vms"), "vm-3");
        let args = restore_args(Accel::Tcg, &spec, &paths).join(" ");
        assert!(args.contains("-m 262152k "), "{args}");
        assert!(
            args.contains("memory-backend-file,id=mem,size=262152K,mem-path=/data/templates/t/ram"),
            "{args}"
        );
        // A spec recorded before the tail existed deserializes without one.
        let mut old = serde_json::to_value(&spec).unwrap();
        old.as_object_mut().unwrap().remove("ram_tail_kib");
        let old: VmSpec = serde_json::from_value(old).unwrap();
        assert_eq!(old.ram_tail_kib, 0);
        assert!(
            restore_args(Accel::Tcg, &old, &paths)
                .join(" ")
                .contains("-m 262144k ")
        );
    }

    /// A VM with a segment NIC gets a second virtio-net on a unix datagram netdev whose
    /// sockets lie in its directory; a spec recorded before the NIC existed has none (its
    /// snapshots and templates were made without it).
    #[test]
    fn the_segment_nic_is_a_datagram_netdev_only_when_the_spec_has_one() {
        let mut spec = VmSpec {
            id: "vm-4".into(),
            vcpus: 1,
            memory_mib: 256,
            ram_tail_kib: 0,
            segment_nic: true,
            egress: hangar_core::EgressPolicy::Open,
            kernel: "/a/vmlinux".into(),
            initramfs: "/a/initramfs.cpio".into(),
            cmdline: "console=ttyS0".into(),
            base_image: None,
            layers: Vec::new(),
            forwards: Vec::new(),
            pre_os: false,
            background: false,
            template: None,
            firmware: false,
            memory: MemoryBacking::Anonymous,
            layer_slots: 0,
        };
        let paths = VmPaths::new(Path::new("/data/vms"), "vm-4");
        let args = qemu_args(Accel::Tcg, &spec, &paths).join(" ");
        let nic = "-netdev dgram,id=n1,local.type=unix,local.path=/data/vms/vm-4/nic1.sock,\
                   remote.type=unix,remote.path=/data/vms/vm-4/port.sock \
                   -device virtio-net-device,netdev=n1,mac=52:54:00:5e:00:01";
        assert!(args.contains(nic), "{args}");
        assert!(
            args.find("netdev=n0") < args.find("netdev=n1"),
            "the user-mode NIC stays the guest's first: {args}"
        );
        let mut old = serde_json::to_value(&spec).unwrap();
        old.as_object_mut().unwrap().remove("segment_nic");
        let old: VmSpec = serde_json::from_value(old).unwrap();
        assert!(!old.segment_nic);
        assert!(
            !restore_args(Accel::Tcg, &old, &paths)
                .join(" ")
                .contains("n1")
        );
        spec.segment_nic = false;
        assert_eq!(
            serde_json::to_value(&spec).unwrap().get("segment_nic"),
            None,
            "absent when off, as before it existed"
        );
    }
}
