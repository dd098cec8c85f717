//! Live migration of an active VM to another farm host (issue 17): the VM keeps running
//! while its disk layer and memory are copied, and its clients keep their stable endpoint.
//!
//! The steps of the `migrate` task, each a call to one host (`hangar_host::Host`'s
//! `migrate_*`, QEMU's side in `hangar_vmm::migrate`):
//!
//! 1. `prepare` (5%): the destination resolves the VM's images (pulling by hash what it
//!    lacks) and host ports, then starts QEMU paused, waiting for the stream, its new root
//!    overlay exported over NBD.
//! 2. `disk` (15%): the source mirrors its root's copy-on-write layer to that export and
//!    returns once the copy follows every write; then it starts the RAM pre-copy, held from
//!    completing on its own.
//! 3. `memory` (30–90%): polled every [`POLL`] until the source froze the stream before
//!    the first pass's end ([`hangar_vmm::migrate::FREEZE_REMAINING`]: QEMU cannot complete
//!    on its own then, so the guest keeps running), or, if that pass ended unfrozen, until
//!    what is left is under [`SWITCH_REMAINING`] (or after [`MAX_PASSES`] passes:
//!    auto-converge throttled it).
//! 4. `switchover`: timed by the source's rate window (`Host::migrate_window`: QEMU's
//!    migration thread, rate-limited while frozen, sees the switchover only when its
//!    next 100 ms window starts, so the hold begins [`HOLD_LEAD`] + [`RAISE_LEAD`] before
//!    one), the forwarder *holds* the VM's new connections (they wait, no wake),
//!    connections already forwarded get up to [`DRAIN_WAIT`] to end (the source's final
//!    pause would cut them) while the guest runs. If one is still open (a slow request),
//!    the clients are let through again until it ends (at most [`HOLD_AGAIN_WITHIN`]) and
//!    held again, for up to [`HOLDS_WITHIN`], so that no hold is long and no request is
//!    cut unless one outlasts them all. The source then completes at once
//!    ([`hangar_vmm::migrate::SWITCHOVER_DOWNTIME_MS`]: what is left is bounded by the
//!    freeze), finishing the disk mirror while paused; the destination resumes; the store
//!    moves the VM (one conditional write) and its stable endpoints point at the
//!    destination, which releases the held connections.
//!    Only when the freeze was missed can QEMU complete the pre-copy on its own before the
//!    drain is over (pausing the guest: it does once what is dirty could go within the
//!    held 1 ms at the rate it just measured, and always when nothing was dirtied since
//!    its last sync, which an idle guest does). If a connection is still open then, its
//!    request would die with the source: the migration is undone (the guest resumes and
//!    answers) and starts again from a fresh destination, up to [`MAX_ATTEMPTS`] times.
//! 5. `clean`: the source's QEMU and files go (`Move::clean_source`).
//!
//! Undo (cancel, failure, or a server that stopped mid-way: the journal's one
//! [`Undo::AbortLiveMigration`]) looks at the store: a VM not yet moved is left on the
//! source, running (its migration cancelled, resumed if paused), and everything on the
//! destination is destroyed; a VM the store already places on the destination keeps
//! running there and the source's copy goes. So there is always exactly one VM.
//!
//! While it runs, the destination's heartbeats report the incoming VM; fencing leaves it
//! alone (`crate::farm::agents`): this server's `MigrationRuntime` names the destination,
//! and a replica that did not start the migration finds the unfinished `migrate` task
//! whose journal holds an `AbortLiveMigration` to that host in the store. So a migration
//! may start on any replica.
//!
//! A template clone (its memory and disk map its template's files) moves once the
//! destination holds the same template (pulled by content hash first, `Move::bring_template`):
//! its disk layer is mirrored over the destination's copy of the template's disk, and its
//! memory arrives whole (the destination's clone then shares no page with its template).
//! Shells given an OS at deploy are refused. The NBD export and the migration stream are plain TCP on the farm
//! network, unauthenticated, like the agents' peers' blob pulls are authenticated but not
//! encrypted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hangar_host::{Host, IncomingVm, LaunchRecord, MigrationProgress, Purpose, VmPlan};
use hangar_store::VmRecord;

use super::Move;
use crate::api::error::error_chain;
use crate::endpoints::EndpointUse;
use crate::tasks::undo::Undo;

/// How often the pre-copy's progress is read.
pub const POLL: Duration = Duration::from_millis(20);

/// RAM still to send under which the switchover starts (a 300 ms downtime sends far more
/// on a farm's link; under TCG the guest dirties pages slower than that).
pub const SWITCH_REMAINING: u64 = 16 << 20;

/// Dirty-page passes after which the switchover starts whatever is left (auto-converge
/// has throttled the guest by then).
pub const MAX_PASSES: u64 = 20;

/// The longest the pre-copy may run.
pub const PRECOPY_TIMEOUT: Duration = Duration::from_secs(600);

/// How many times a migration starts again when QEMU completed the pre-copy on its own
/// (pausing the guest) while connections were open; the last attempt switches over anyway.
pub const MAX_ATTEMPTS: u32 = 4;

/// How long before QEMU's next rate window the switchover is asked for: the call to the
/// source's host and QEMU's `migrate-set-parameters` must land before the window starts,
/// or the guest runs on for another window with its clients held.
pub const RAISE_LEAD: Duration = Duration::from_millis(15);

/// How long before the switchover is asked for the clients are held, for connections just
/// forwarded to end (an idle VM's drain is immediate).
pub const HOLD_LEAD: Duration = Duration::from_millis(15);

/// How long connections forwarded before the hold may take to end before the switchover.
pub const DRAIN_WAIT: Duration = Duration::from_millis(200);

/// How long the task keeps holding the VM's clients again, waiting for a slow request to
/// end while the guest runs; the first hold begun after this switches over anyway
/// (cutting it). Under TCG on a loaded host a request now and then takes seconds.
pub const HOLDS_WITHIN: Duration = Duration::from_secs(10);

/// Between two holds the clients go through to the running guest until no connection is
/// open, or this long.
pub const HOLD_AGAIN_WITHIN: Duration = Duration::from_millis(500);

/// Live-migrates active VM `vm` as `mv` says (see the module's documentation). The outcome
/// is the VM as recorded on the destination; on error the journal's undo leaves it
/// running on its source.
pub async fn migrate_active(mv: &Move<'_>, vm: VmRecord) -> Result<VmRecord, String> {
    let manager = mv.manager;
    let started = Instant::now();
    let source = mv.source(&vm)?;
    let to = mv.to.record.name.clone();
    let dest = mv.to.host.clone();
    let service = vm
        .services
        .first()
        .and_then(|name| manager.catalog.get(name))
        .cloned()
        .ok_or_else(|| format!("VM {} offers no service of the catalog", vm.id))?;
    manager
        .tasks
        .record_undo(
            mv.task,
            &Undo::AbortLiveMigration {
                vm: vm.id.clone(),
                source: vm.host.clone(),
                destination: to.clone(),
            },
        )
        .await
        .map_err(|err| error_chain(&err))?;

    mv.bring_template(&vm, source.as_ref(), dest.as_ref(), 3)
        .await?;
    let plan = VmPlan {
        id: vm.id.clone(),
        service: Some(service),
        os: vm.os.as_ref().map(|(name, _)| name.clone()),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        // The guest keeps its settings: the destination only resolves images and ports.
        env: BTreeMap::new(),
        hostname: vm.id.clone(),
        purpose: Purpose::Request,
        ready: None,
        // Held to the policy it runs with.
        egress: LaunchRecord(vm.spec.clone()).egress(),
    };
    let mut attempt = 1;
    let (incoming, precopy, held, open, drained, holds, raise_at) = 'attempts: loop {
        let (incoming, precopy) = copy(mv, &vm, &plan, source.as_ref(), dest.as_ref()).await?;
        mv.step("switchover", 90).await;
        // The first hold is timed to end just before QEMU's next rate window.
        let raise_at = switch_time(source.as_ref(), &vm.id).await;
        let mut holds = 1;
        let holding = Instant::now();
        let open = loop {
            let aligned = raise_at.filter(|_| holds == 1);
            if let Some(hold_at) = aligned.and_then(|at| at.checked_sub(HOLD_LEAD)) {
                tokio::time::sleep_until(hold_at.into()).await;
            }
            let held = Instant::now();
            let open = match manager.hold_endpoints(&vm.id).await {
                EndpointUse::Idle => 0,
                EndpointUse::Busy { open } => open,
            };
            let drained = open == 0 || manager.wait_endpoints_idle(&vm.id, DRAIN_WAIT).await;
            if drained {
                if let Some(raise_at) = aligned {
                    tokio::time::sleep_until(raise_at.into()).await;
                }
                break 'attempts (incoming, precopy, held, open, drained, holds, aligned);
            }
            if paused_early(source.as_ref(), &vm.id).await? {
                if attempt == MAX_ATTEMPTS {
                    break 'attempts (incoming, precopy, held, open, drained, holds, None);
                }
                break open;
            }
            if holding.elapsed() >= HOLDS_WITHIN {
                break 'attempts (incoming, precopy, held, open, drained, holds, None);
            }
            // The guest runs (the pre-copy is frozen) but a request is slow: let the
            // clients through to it again while that request ends, then hold again.
            manager.set_endpoints_active(&vm.id, true).await;
            manager.wait_endpoints_idle(&vm.id, HOLD_AGAIN_WITHIN).await;
            holds += 1;
        };
        // QEMU paused the guest on its own while a client's request was in flight: that
        // request would die with the source. Undo (the guest resumes and answers, the held
        // connections go to it) and start again from a fresh destination.
        tracing::info!(
            vm = %vm.id,
            attempt,
            open,
            "the pre-copy completed on its own with a connection open; starting again"
        );
        manager
            .abort_live_migration(&vm.id, &vm.host, &to)
            .await
            .map_err(|err| format!("starting the migration again: {err}"))?;
        metrics::counter!(crate::metrics::MIGRATION_RESTARTS_TOTAL).increment(1);
        attempt += 1;
    };
    let drain_ms = held.elapsed().as_millis() as u64;
    let switching = Instant::now();
    let done = source
        .migrate_switchover(&vm.id, hangar_vmm::migrate::SWITCHOVER_DOWNTIME_MS)
        .await
        .map_err(|err| format!("switching over on {}: {}", vm.host, error_chain(&err)))?;
    let arrived = dest
        .migrate_finish(&vm.id)
        .await
        .map_err(|err| format!("resuming on {to}: {}", error_chain(&err)))?;
    // At most this long the guest did not run: from the switchover's start (it pauses
    // within it) to the destination's resume.
    let downtime = switching.elapsed();
    metrics::histogram!(crate::metrics::MIGRATION_DOWNTIME_SECONDS).record(downtime.as_secs_f64());
    let committing = Instant::now();
    let moved = mv
        .commit(
            &vm,
            arrived.process,
            incoming.launch.0.clone(),
            incoming.direct_endpoints.clone(),
            true,
        )
        .await?;
    tracing::info!(
        vm = %vm.id,
        from = %vm.host,
        to = %to,
        took_ms = started.elapsed().as_millis() as u64,
        passes = precopy.ram_iterations,
        frozen = precopy.freezes(),
        frozen_left = if precopy.freezes() { precopy.ram_remaining } else { 0 },
        ram_sent = done.ram_transferred,
        disk_bytes = precopy.disk_len,
        qemu_downtime_ms = done.downtime_ms.unwrap_or(0),
        switchover_ms = downtime.as_millis() as u64,
        held_ms = held.elapsed().as_millis() as u64,
        drain_ms,
        commit_ms = committing.elapsed().as_millis() as u64,
        open_at_hold = open,
        drained,
        holds,
        aligned = raise_at.is_some(),
        attempts = attempt,
        "vm live-migrated"
    );
    // A stack member's port is its host's: it joins its segment again here.
    manager.rejoin_stack_member(&moved).await;
    Ok(moved)
}

/// Steps 1 to 3: a destination prepared, the disk mirrored, the RAM pre-copied. Returns
/// the destination and the pre-copy's last progress.
async fn copy(
    mv: &Move<'_>,
    vm: &VmRecord,
    plan: &VmPlan,
    source: &dyn Host,
    dest: &dyn Host,
) -> Result<(IncomingVm, MigrationProgress), String> {
    let to = &mv.to.record.name;
    mv.step("prepare", 5).await;
    let prepared = dest
        .prepare_vm(plan, mv.manager.tasks.build_progress(mv.task, 5, 14))
        .await
        .map_err(|err| format!("preparing on {to}: {}", error_chain(&err)))?;
    let incoming = dest
        .migrate_incoming(&vm.id, &prepared, &LaunchRecord(vm.spec.clone()))
        .await
        .map_err(|err| format!("starting the destination on {to}: {}", error_chain(&err)))?;

    mv.step("disk", 15).await;
    source
        .migrate_start(&vm.id, &incoming)
        .await
        .map_err(|err| format!("copying from {}: {}", vm.host, error_chain(&err)))?;

    mv.step("memory", 30).await;
    let progress = precopy(mv, source, &vm.id).await?;
    Ok((incoming, progress))
}

/// Follows the RAM pre-copy until it is time to switch over; the task's percent follows
/// what is sent.
async fn precopy(mv: &Move<'_>, source: &dyn Host, id: &str) -> Result<MigrationProgress, String> {
    let deadline = Instant::now() + PRECOPY_TIMEOUT;
    let mut shown = 30;
    loop {
        let now = source
            .migrate_status(id)
            .await
            .map_err(|err| format!("reading the migration's progress: {}", error_chain(&err)))?;
        match now.status.as_str() {
            "failed" | "cancelled" => {
                return Err(format!(
                    "the migration {}: {}",
                    now.status,
                    now.error.as_deref().unwrap_or("QEMU gave no reason")
                ));
            }
            "active" if ready_to_switch(&now) => return Ok(now),
            // Little enough was dirty to complete even within the held downtime limit: QEMU
            // paused the guest and waits for the switchover (an idle guest does that).
            "pre-switchover" => return Ok(now),
            _ => {}
        }
        let sent = now.ram_transferred.min(now.ram_total.max(1));
        let percent = 30 + (60 * sent / now.ram_total.max(1)).min(59) as u8;
        if percent > shown {
            shown = percent;
            mv.manager.tasks.step(mv.task, "memory", percent).await;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the memory copy did not converge within {PRECOPY_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// When to ask the source for the switchover: [`RAISE_LEAD`] before the start of QEMU's
/// next rate window that is at least [`HOLD_LEAD`] + [`RAISE_LEAD`] away (the pre-copy
/// frozen: QEMU's migration thread acts on a switchover only when its window starts, so
/// the clients are held only from just before it); `None`: not known, switch at once.
async fn switch_time(source: &dyn Host, id: &str) -> Option<Instant> {
    let next = match source.migrate_window(id).await {
        Ok(next) => next?,
        Err(err) => {
            tracing::debug!(vm = %id, error = %error_chain(&err), "the migration's rate window is not known; switching at once");
            return None;
        }
    };
    Some(raise_time(Instant::now(), next))
}

/// [`switch_time`] for a window starting `next` after `now`.
fn raise_time(now: Instant, next: Duration) -> Instant {
    let mut window = now + next;
    while window < now + HOLD_LEAD + RAISE_LEAD {
        window += hangar_vmm::migrate::RATE_WINDOW;
    }
    window - RAISE_LEAD
}

/// Whether QEMU completed the pre-copy on its own: the guest paused, waiting for the
/// switchover.
async fn paused_early(source: &dyn Host, id: &str) -> Result<bool, String> {
    let now = source
        .migrate_status(id)
        .await
        .map_err(|err| format!("reading the migration's progress: {}", error_chain(&err)))?;
    Ok(now.status == "pre-switchover")
}

/// Whether the pre-copy has done what it can: the source froze it before the first pass's
/// end (the reading that says so is taken after the freeze), or that pass is over and
/// little is left, or it has gone round [`MAX_PASSES`] times.
pub fn ready_to_switch(now: &MigrationProgress) -> bool {
    now.freezes()
        || now.ram_iterations >= 2 && now.ram_remaining <= SWITCH_REMAINING
        || now.ram_iterations >= MAX_PASSES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switchover_is_asked_for_just_before_a_window_far_enough_away() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        // Far enough: the lead before it.
        assert_eq!(raise_time(now, ms(50)), now + ms(35));
        assert_eq!(raise_time(now, ms(30)), now + ms(15));
        // Too close to hold first: the window after it.
        assert_eq!(raise_time(now, ms(29)), now + ms(114));
        assert_eq!(raise_time(now, ms(0)), now + ms(85));
    }

    #[test]
    fn the_switchover_waits_for_the_first_pass_and_little_left() {
        let at = |passes, remaining| MigrationProgress {
            status: "active".into(),
            ram_iterations: passes,
            ram_remaining: remaining,
            ram_transferred: 1 << 30,
            ..MigrationProgress::default()
        };
        let freeze = hangar_vmm::migrate::FREEZE_REMAINING;
        assert!(
            !ready_to_switch(&at(1, freeze + 1)),
            "the first pass goes on"
        );
        assert!(ready_to_switch(&at(1, freeze)), "the first pass is frozen");
        assert!(
            !ready_to_switch(&MigrationProgress {
                ram_transferred: 0,
                ..at(1, 0)
            }),
            "nothing sent yet: the pass has not begun"
        );
        assert!(!ready_to_switch(&at(2, SWITCH_REMAINING + 1)));
        assert!(ready_to_switch(&at(2, SWITCH_REMAINING)));
        assert!(ready_to_switch(&at(MAX_PASSES, u64::MAX)));
    }
}
