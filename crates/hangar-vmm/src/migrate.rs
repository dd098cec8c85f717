//! Live migration of a running VM between two hosts' QEMUs, over TCP, with its
//! copy-on-write disk layer mirrored first (the libvirt sequence for storage that is not
//! shared: `qemuMigrationSrcNBDStorageCopy`, then the RAM, then the mirror finished while the
//! source is paused).
//!
//! Destination ([`QemuBackend::migrate_incoming`]): QEMU started with `-incoming defer` and
//! `-S` (it never runs before it is told), its own new root overlay over the same backing
//! content (shared layers and bases are on both hosts by hash), the root disk exported
//! writable over QEMU's NBD server on the host's address, `migrate-incoming tcp:`.
//!
//! Source:
//! 1. [`QemuBackend::migrate_disk`]: `drive-mirror` of the root's top layer (`sync: top`,
//!    `copy-mode: write-blocking`) to the NBD export; returns once the job is READY (from
//!    then on every guest write reaches both disks before it completes).
//! 2. [`QemuBackend::migrate_ram`]: RAM pre-copy with `auto-converge` and
//!    `pause-before-switchover`, its downtime limit held at [`HOLD_DOWNTIME_MS`] so that the
//!    migration keeps iterating rather than completing on its own, and *frozen* before its
//!    first pass ends (see [`FREEZE_REMAINING`]): QEMU cannot complete then, so the guest
//!    runs on, whatever it dirties, until the switchover.
//! 3. [`QemuBackend::migrate_switchover`]: the stream and the downtime limit raised; QEMU
//!    sends what is left and pauses the guest
//!    and stops at `pre-switchover`; the ready mirror is cancelled (which leaves its
//!    target a consistent copy), `migrate-continue` sends the last pages and the devices.
//!    The source is left paused (`postmigrate`).
//! 4. [`QemuBackend::migrate_incoming_finish`] on the destination: waits for the stream,
//!    stops the NBD server and resumes the guest.
//!
//! [`QemuBackend::migrate_cancel`] at any point before the destination runs leaves the source
//! running as it was: the migration and the mirror cancelled (the source's disk was only
//! read), the guest resumed if the migration had paused it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::qemu::QemuBackend;
use crate::qmp::Qmp;
use crate::{Launched, VmSpec, VmmError};

/// The downtime limit while the migration must not complete (ms): QEMU completes once what
/// is left could be sent within it, so with 1 ms and a guest that dirties pages it iterates.
pub const HOLD_DOWNTIME_MS: u64 = 1;

/// QEMU's default downtime limit (ms).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// The downtime limit for the switchover of a frozen pre-copy (ms, QEMU's maximum): QEMU
/// completes once what is left could go within the limit at the rate it measured, and a
/// frozen stream's rate is a few bytes per millisecond, so any smaller limit would first
/// send the rest with the guest running (a 100 ms rate window or more, the clients held).
/// What is left is bounded by the freeze instead: at most [`FREEZE_REMAINING`] of the first
/// pass plus what the guest dirtied since the migration began.
pub const SWITCHOVER_DOWNTIME_MS: u64 = 2_000_000;

/// What is left of the first RAM pass when the stream is frozen (bytes).
///
/// QEMU 7.2 completes the pre-copy on its own (pausing the guest) as soon as its dirty
/// pages could go within the downtime limit at the rate it just measured, and always when
/// *none* is dirty: an idle guest that dirtied nothing since the last sync completes it at
/// any limit and any rate, and then a client's request in flight dies with the source.
/// During the first pass that cannot happen: every page not yet sent counts as dirty. So
/// the stream is frozen ([`FREEZE_BANDWIDTH`]) while that pass still has this much to send,
/// and QEMU completes only when the switchover lets it.
pub const FREEZE_REMAINING: u64 = 8 << 20;

/// What is left of the first pass when the stream slows to [`SLOW_BANDWIDTH`], so that the
/// agent's watch sees the pass cross [`FREEZE_REMAINING`]: at the full rate it moves up to
/// 6 MiB between two readings 1 ms apart (measured under TCG on a loaded 2-core host).
const SLOW_REMAINING: u64 = 32 << 20;

/// The stream's rate from [`SLOW_REMAINING`] to the freeze (bytes/s): QEMU sends a tenth of
/// it (2 MiB, a quarter of [`FREEZE_REMAINING`]) at the start of each 100 ms window, at the
/// link's speed, then waits for the next window: the watch has about 400 ms to see the
/// pass under [`FREEZE_REMAINING`] (it missed it now and then with 4 MiB, under load).
const SLOW_BANDWIDTH: u64 = 20 << 20;

/// The stream's rate while frozen (bytes/s): QEMU's rate limit is a tenth of it per 100 ms
/// window, so it sends about one page (or ten zero pages) a window, and the first pass's
/// [`FREEZE_REMAINING`] would take many minutes to go. (0 would mean no limit.)
const FREEZE_BANDWIDTH: u64 = 100;

/// QEMU's migration rate window (`BUFFER_DELAY` in QEMU 7.2's `migration.c`): a rate-limited
/// stream sends its share at the start of each window and its thread sleeps out the rest,
/// woken early only by post-copy page requests. So a limit raised at the switchover takes
/// effect at the next window's start ([`QemuBackend::migration_window`]).
pub const RATE_WINDOW: Duration = Duration::from_millis(100);

/// How often the source's agent reads the first pass's progress to freeze it in time (the
/// zero pages of a guest's unused memory go at gigabytes a second).
const FREEZE_POLL: Duration = Duration::from_millis(1);

/// The name of the root disk's NBD export and mirror job.
const EXPORT: &str = "root";
const MIRROR_JOB: &str = "hangar-migrate-root";

/// Bandwidth for the migration stream: effectively none (a farm's hosts share a fast link).
const MAX_BANDWIDTH: u64 = 1 << 40;

/// The stream's rate once the first pass ended without being frozen (a missed freeze),
/// until the switchover (bytes/s): with the 1 ms limit it lets QEMU complete on its own
/// only below 4 dirty pages. See [`QemuBackend::migration_progress`].
const SETTLE_BANDWIDTH: u64 = 16 << 20;

/// How long the disk mirror may take to become ready.
const MIRROR_READY_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the last step of the migration (switchover) may take.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a destination waits for its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingAddrs {
    /// The migration stream's address (`migrate tcp:`).
    pub migration: SocketAddr,
    /// The root disk's writable NBD export (export name `root`), when the VM has a root
    /// disk.
    pub disk: Option<SocketAddr>,
}

/// How far an outgoing migration is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// QEMU's migration status (`none` before the RAM copy starts, `active`,
    /// `pre-switchover`, `device`, `completed`, `failed`, `cancelled`).
    pub status: String,
    /// RAM bytes sent so far.
    pub ram_transferred: u64,
    /// RAM bytes still to send (dirty).
    pub ram_remaining: u64,
    pub ram_total: u64,
    /// Dirty-page synchronisations so far (1: the first pass is still running).
    pub ram_iterations: u64,
    /// The disk mirror's progress (bytes) out of its length, and whether it is ready.
    pub disk_offset: u64,
    pub disk_len: u64,
    pub disk_ready: bool,
    /// The guest's pause at the switchover (ms), once completed.
    pub downtime_ms: Option<u64>,
    /// QEMU's reason, when failed.
    pub error: Option<String>,
}

impl MigrationProgress {
    /// Whether the stream is to be frozen now: the first pass is under way, with at most
    /// [`FREEZE_REMAINING`] left (see there).
    pub fn freezes(&self) -> bool {
        self.status == "active"
            && self.ram_transferred > 0
            && self.ram_iterations <= 1
            && self.ram_remaining <= FREEZE_REMAINING
    }
}

/// `query-migrate` as a [`MigrationProgress`] without the disk.
async fn ram_progress(qmp: &Qmp) -> Result<MigrationProgress, VmmError> {
    let migrate = qmp.execute("query-migrate", None).await?;
    let ram = &migrate["ram"];
    Ok(MigrationProgress {
        status: migrate["status"].as_str().unwrap_or("none").to_owned(),
        ram_transferred: ram["transferred"].as_u64().unwrap_or(0),
        ram_remaining: ram["remaining"].as_u64().unwrap_or(0),
        ram_total: ram["total"].as_u64().unwrap_or(0),
        ram_iterations: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        downtime_ms: migrate["downtime"].as_u64(),
        error: migrate["error-desc"].as_str().map(str::to_owned),
        ..MigrationProgress::default()
    })
}

/// `query-migrate` and `query-block-jobs` as one view.
async fn progress(qmp: &Qmp) -> Result<MigrationProgress, VmmError> {
    let mut progress = ram_progress(qmp).await?;
    if let Some(job) = mirror_job(qmp).await? {
        progress.disk_offset = job["offset"].as_u64().unwrap_or(0);
        progress.disk_len = job["len"].as_u64().unwrap_or(0);
        progress.disk_ready = job["ready"].as_bool().unwrap_or(false);
    }
    Ok(progress)
}

async fn mirror_job(qmp: &Qmp) -> Result<Option<Value>, VmmError> {
    let jobs = qmp.execute("query-block-jobs", None).await?;
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|job| job["device"] == MIRROR_JOB)
        .cloned())
}

fn failed(id: &str, reason: impl Into<String>) -> VmmError {
    VmmError::Migration {
        id: id.to_owned(),
        reason: reason.into(),
    }
}

/// A free TCP port on `ip` (probed: bound, then released for QEMU to take).
fn free_port(ip: IpAddr) -> Result<u16, VmmError> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

async fn set_capabilities(qmp: &Qmp, caps: &[(&str, bool)]) -> Result<(), VmmError> {
    let capabilities: Vec<Value> = caps
        .iter()
        .map(|(name, on)| json!({ "capability": name, "state": on }))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": capabilities })),
    )
    .await?;
    Ok(())
}

async fn set_bandwidth(qmp: &Qmp, bytes_per_second: u64) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": bytes_per_second })),
    )
    .await?;
    Ok(())
}

async fn set_downtime(qmp: &Qmp, ms: u64) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "downtime-limit": ms })),
    )
    .await?;
    Ok(())
}

/// Polls until `done` says so about the migration's status (Ok(true)), or it failed.
async fn wait_status(
    id: &str,
    qmp: &Qmp,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<MigrationProgress, VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = progress(qmp).await?;
        if done(&now.status) {
            return Ok(now);
        }
        match now.status.as_str() {
            "failed" => {
                return Err(failed(
                    id,
                    now.error.unwrap_or_else(|| "QEMU gave no reason".into()),
                ));
            }
            "cancelled" => return Err(failed(id, "the migration was cancelled")),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(failed(
                id,
                format!("still {} after {timeout:?}", now.status),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

impl QemuBackend {
    /// Starts VM `spec` as the destination of a live migration: QEMU paused before any
    /// guest code runs, waiting for the stream on `listen` (a free port), its root disk a
    /// new overlay over `spec.base_image` exported writable over NBD on `listen` for the
    /// source's mirror. On error nothing is left.
    pub async fn migrate_incoming(
        &self,
        spec: &VmSpec,
        listen: IpAddr,
    ) -> Result<IncomingAddrs, VmmError> {
        if spec.pre_os || spec.firmware {
            return Err(failed(
                &spec.id,
                "only VMs booted from hangar's kernel with a root disk can be live-migrated",
            ));
        }
        let paths = self.paths(&spec.id);
        tokio::fs::create_dir_all(&self.config().vms_dir).await?;
        tokio::fs::create_dir(&paths.dir).await?;
        let started = async {
            let mut args = crate::qemu::restore_args(self.config().accel, spec, &paths);
            args.push("-S".into());
            let running = self.start_with(spec, &paths, &args).await?;
            let addrs = match export_and_listen(&running.qmp, spec, listen).await {
                Ok(addrs) => addrs,
                Err(err) => {
                    self.kill_started(&spec.id, running.pid, &paths).await;
                    return Err(err);
                }
            };
            Ok((running, addrs))
        }
        .await;
        match started {
            Ok((running, addrs)) => {
                tracing::info!(vm = %spec.id, pid = running.pid, migration = %addrs.migration, "waiting for an incoming live migration");
                self.insert_running(&spec.id, running).await;
                Ok(addrs)
            }
            Err(err) => {
                if let Err(cleanup) = self.remove_vm_dir(&paths, None).await {
                    tracing::warn!(vm = %spec.id, error = %cleanup, "cleanup after a failed incoming migration");
                }
                Err(err)
            }
        }
    }

    /// On the source: mirrors VM `id`'s root disk layer to the destination's NBD export
    /// `disk` and returns once the mirror is ready (every later write reaches both). On
    /// error the mirror is cancelled; the VM runs on.
    pub async fn migrate_disk(&self, id: &str, disk: SocketAddr) -> Result<(), VmmError> {
        let running = self.running_vm(id).await?;
        let qmp = &running.qmp;
        qmp.execute(
            "drive-mirror",
            Some(json!({
                "job-id": MIRROR_JOB,
                "device": "root",
                "target": format!("nbd://{disk}/{EXPORT}"),
                "format": "raw",
                "mode": "existing",
                "sync": "top",
                "copy-mode": "write-blocking",
                "auto-dismiss": true,
            })),
        )
        .await?;
        let deadline = Instant::now() + MIRROR_READY_TIMEOUT;
        loop {
            match mirror_job(qmp).await? {
                Some(job) if job["ready"].as_bool() == Some(true) => return Ok(()),
                Some(_) if Instant::now() < deadline => {}
                Some(_) => {
                    cancel_mirror(qmp, true).await;
                    return Err(failed(id, "the disk mirror did not become ready in time"));
                }
                None => return Err(failed(id, "the disk mirror ended before it was ready")),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// On the source: starts the RAM pre-copy to the destination's `migration` address,
    /// with auto-converge and a pause before the switchover, held from completing (see
    /// [`HOLD_DOWNTIME_MS`]) until [`QemuBackend::migrate_switchover`]. Returns once the
    /// migration runs.
    pub async fn migrate_ram(&self, id: &str, to: SocketAddr) -> Result<(), VmmError> {
        let running = self.running_vm(id).await?;
        let qmp = &running.qmp;
        set_capabilities(
            qmp,
            // A template clone keeps `x-ignore-shared` on from its restore; its memory is
            // private (nothing is skipped), and the destination expects it off.
            &[
                ("auto-converge", true),
                ("pause-before-switchover", true),
                ("x-ignore-shared", false),
            ],
        )
        .await?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({
                "max-bandwidth": MAX_BANDWIDTH,
                "downtime-limit": HOLD_DOWNTIME_MS,
            })),
        )
        .await?;
        qmp.execute("migrate", Some(json!({ "uri": format!("tcp:{to}") })))
            .await?;
        let id = id.to_owned();
        tokio::spawn(async move { freeze_first_pass(&id, &running.qmp).await });
        Ok(())
    }

    /// How far VM `id`'s outgoing migration is.
    ///
    /// The stream is frozen near the end of the first pass ([`FREEZE_REMAINING`]; the
    /// agent's own 1 ms watch normally did it first, this read does it too so that a caller
    /// that sees [`MigrationProgress::freezes`] knows the stream is frozen). If that pass
    /// ended unfrozen, the stream is slowed to [`SETTLE_BANDWIDTH`] instead: at that rate
    /// only a guest that dirtied almost nothing (a few pages: an idle one) completes early.
    /// The switchover raises either.
    pub async fn migration_progress(&self, id: &str) -> Result<MigrationProgress, VmmError> {
        let running = self.running_vm(id).await?;
        let now = progress(&running.qmp).await?;
        if now.freezes() {
            set_bandwidth(&running.qmp, FREEZE_BANDWIDTH).await?;
        } else if now.status == "active" && now.ram_iterations >= 2 {
            set_bandwidth(&running.qmp, SETTLE_BANDWIDTH).await?;
        }
        Ok(now)
    }

    /// On the source, while the pre-copy is frozen: how long until QEMU's migration thread
    /// next wakes, at the start of its next [`RATE_WINDOW`] (when a switchover asked for
    /// before then starts). Found by reading the bytes the stream sent every
    /// [`FREEZE_POLL`] for at most a window and a fifth: a frozen stream sends a few bytes
    /// at each window's start. `None` when the stream is not frozen or no window began.
    pub async fn migration_window(&self, id: &str) -> Result<Option<Duration>, VmmError> {
        let running = self.running_vm(id).await?;
        let qmp = &running.qmp;
        let first = ram_progress(qmp).await?;
        if !first.freezes() {
            return Ok(None);
        }
        let watching = Instant::now();
        let (mut read_at, mut sent) = (watching, first.ram_transferred);
        while watching.elapsed() < RATE_WINDOW + RATE_WINDOW / 5 {
            tokio::time::sleep(FREEZE_POLL).await;
            let now = ram_progress(qmp).await?;
            if now.status != "active" {
                return Ok(None);
            }
            let at = Instant::now();
            if now.ram_transferred != sent {
                // A window began between the two readings: take the middle.
                let began = read_at + (at - read_at) / 2;
                return Ok(Some(RATE_WINDOW.saturating_sub(began.elapsed())));
            }
            (read_at, sent) = (at, now.ram_transferred);
        }
        Ok(None)
    }

    /// On the source: lets the migration complete within `downtime_ms`: the guest pauses,
    /// the disk mirror is finished (consistent), the rest of the RAM and the devices go.
    /// Returns the final progress (with QEMU's measured downtime); the source stays paused.
    pub async fn migrate_switchover(
        &self,
        id: &str,
        downtime_ms: u64,
    ) -> Result<MigrationProgress, VmmError> {
        let running = self.running_vm(id).await?;
        let qmp = &running.qmp;
        set_bandwidth(qmp, MAX_BANDWIDTH).await?;
        set_downtime(qmp, downtime_ms).await?;
        wait_status(id, qmp, SWITCHOVER_TIMEOUT, |status| {
            status == "pre-switchover"
        })
        .await?;
        // The guest is paused: finish the mirror before QEMU lets go of the disk.
        if mirror_job(qmp).await?.is_some() {
            qmp.execute("block-job-cancel", Some(json!({ "device": MIRROR_JOB })))
                .await?;
            let deadline = Instant::now() + SWITCHOVER_TIMEOUT;
            while mirror_job(qmp).await?.is_some() {
                if Instant::now() >= deadline {
                    return Err(failed(id, "the disk mirror did not finish"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        qmp.execute(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
        )
        .await?;
        wait_status(id, qmp, SWITCHOVER_TIMEOUT, |status| status == "completed").await
    }

    /// On the source: ends the migration and the mirror, whatever their stage, and resumes
    /// the guest if the migration paused it. The destination is left to be destroyed.
    pub async fn migrate_cancel(&self, id: &str) -> Result<(), VmmError> {
        let running = self.running_vm(id).await?;
        let qmp = &running.qmp;
        let _ = qmp.execute("migrate_cancel", None).await;
        cancel_mirror(qmp, true).await;
        // Wait for the cancel to be seen (a migration cancelled at pre-switchover passes
        // through `cancelling`).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = progress(qmp).await?;
            if !matches!(
                now.status.as_str(),
                "cancelling" | "active" | "setup" | "pre-switchover" | "device"
            ) || Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = set_capabilities(
            qmp,
            &[("auto-converge", false), ("pause-before-switchover", false)],
        )
        .await;
        if !qmp.query_status().await?.running {
            qmp.cont().await?;
        }
        tracing::info!(vm = %id, "live migration cancelled; the vm runs on here");
        Ok(())
    }

    /// On the destination: waits until the stream has arrived, stops the NBD export and
    /// resumes the guest. Returns its control channels.
    pub async fn migrate_incoming_finish(&self, id: &str) -> Result<Launched, VmmError> {
        let running = self.running_vm(id).await?;
        let qmp = &running.qmp;
        wait_status(id, qmp, SWITCHOVER_TIMEOUT, |status| status == "completed").await?;
        qmp.execute("nbd-server-stop", None).await?;
        qmp.cont().await?;
        tracing::info!(vm = %id, pid = running.pid, "live migration arrived; the vm runs here");
        Ok(Launched {
            pid: Some(running.pid),
            agent: Arc::clone(&running.agent),
        })
    }
}

/// Watches VM `id`'s first RAM pass every [`FREEZE_POLL`], slows the stream at
/// [`SLOW_REMAINING`] and freezes it once at most [`FREEZE_REMAINING`] of it is left (see
/// there). Ends then, or when the migration is
/// no longer starting or active, or QMP fails.
async fn freeze_first_pass(id: &str, qmp: &Qmp) {
    let deadline = Instant::now() + MIRROR_READY_TIMEOUT;
    let mut slowed = false;
    while Instant::now() < deadline {
        let now = match ram_progress(qmp).await {
            Ok(now) => now,
            Err(_) => return,
        };
        if !slowed
            && now.status == "active"
            && now.ram_transferred > 0
            && now.ram_iterations <= 1
            && now.ram_remaining <= SLOW_REMAINING
        {
            slowed = set_bandwidth(qmp, SLOW_BANDWIDTH).await.is_ok();
        }
        if now.freezes() {
            match set_bandwidth(qmp, FREEZE_BANDWIDTH).await {
                Ok(()) => tracing::info!(
                    vm = %id,
                    remaining = now.ram_remaining,
                    sent = now.ram_transferred,
                    "live migration frozen before its first pass ends"
                ),
                Err(err) => tracing::warn!(vm = %id, error = %err, "freezing the live migration"),
            }
            return;
        }
        if !matches!(now.status.as_str(), "none" | "setup" | "active") || now.ram_iterations >= 2 {
            if now.ram_iterations >= 2 {
                tracing::warn!(vm = %id, "the first pass of the live migration ended before it could be frozen");
            }
            return;
        }
        tokio::time::sleep(FREEZE_POLL).await;
    }
}

/// Cancels the mirror job if there is one (`force`: without finishing a ready mirror) and
/// waits until it is gone. Best effort.
async fn cancel_mirror(qmp: &Qmp, force: bool) {
    if !matches!(mirror_job(qmp).await, Ok(Some(_))) {
        return;
    }
    let _ = qmp
        .execute(
            "block-job-cancel",
            Some(json!({ "device": MIRROR_JOB, "force": force })),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(mirror_job(qmp).await, Ok(Some(_))) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The destination's listeners: the root disk's NBD export (writable) and the migration
/// stream, both on free ports of `listen`.
async fn export_and_listen(
    qmp: &Qmp,
    spec: &VmSpec,
    listen: IpAddr,
) -> Result<IncomingAddrs, VmmError> {
    let disk = match spec.base_image {
        Some(_) => {
            let addr = SocketAddr::new(listen, free_port(listen)?);
            qmp.execute(
                "nbd-server-start",
                Some(json!({
                    "addr": {
                        "type": "inet",
                        "data": { "host": addr.ip().to_string(), "port": addr.port().to_string() },
                    },
                })),
            )
            .await?;
            qmp.execute(
                "nbd-server-add",
                Some(json!({ "device": "root", "name": EXPORT, "writable": true })),
            )
            .await?;
            Some(addr)
        }
        None => None,
    };
    let migration = SocketAddr::new(listen, free_port(listen)?);
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("tcp:{migration}") })),
    )
    .await?;
    Ok(IncomingAddrs { migration, disk })
}
