//! Moving a sleeping or archived VM: its snapshot, not a running process.
//!
//! Steps of the `migrate` task (stage, percent):
//!
//! 1. `archive` (5): a sleeping VM is archived first on its source (tier `delta`: only what
//!    differs from its template, for a clone; else `zstd`). Its endpoints are asleep
//!    already, so the next connection wakes it, wherever it is by then.
//! 2. `template` (15): a VM cloned from a template runs over the template's disk (and maps
//!    its RAM): the destination pulls the service's template from the source first (by
//!    content hash, verified, as templates travel between hosts anyway), unless it holds it.
//! 3. `describe` (25): the source offers the VM's files by content hash
//!    ([`hangar_host::Host::vm_bundle`]).
//! 4. `copy` (30): the destination pulls them from the source's agent and resolves the rest
//!    (kernel, initramfs, layers, base disk, template) to its own copies of the same content
//!    ([`hangar_host::Host::pull_vm`]). Recorded first in the journal: undone, the
//!    destination's copy is removed unless the store has the VM there.
//! 5. `switch` (90): one conditional store write moves the VM's row (host, launch record,
//!    direct endpoints) if it is still archived on the source; its archive's record follows;
//!    its stable endpoints are re-pointed, still asleep.
//! 6. `clean` (95, after the task's work): the source's copy is removed.
//!
//! Until step 5 the source holds the VM whole and the store says it is there: a failure or
//! a cancel anywhere before leaves it as it was (archived, if it was sleeping), and the
//! destination's partial copy is removed.

use hangar_core::VmState;
use hangar_host::{ArchiveTier, VmArrival};
use hangar_store::VmRecord;

use super::{Move, host_error};
use crate::api::error::error_chain;
use crate::tasks::Undo;

/// Moves `vm` (sleeping or archived, read under its operation lock) as the module says.
pub(super) async fn move_cold(m: &Move<'_>, vm: VmRecord) -> Result<VmRecord, String> {
    let source = m.source(&vm)?;
    let dest = m.to.host.clone();
    let from = m.peer(&vm.host)?;
    let services: Vec<hangar_core::Service> = vm
        .services
        .iter()
        .filter_map(|name| m.manager.catalog.get(name).cloned())
        .collect();

    let vm = if vm.state == VmState::Sleeping {
        m.step("archive", 5).await;
        m.manager
            .archive_locked(&vm.id, ArchiveTier::Delta)
            .await
            .map_err(|err| format!("archiving it first: {}", error_chain(&err)))?
            .0
    } else {
        vm
    };

    m.bring_template(&vm, source.as_ref(), dest.as_ref(), 15)
        .await?;

    m.step("describe", 25).await;
    let bundle = source
        .vm_bundle(&vm.id)
        .await
        .map_err(|err| host_error(&vm.host, &err))?;

    m.manager
        .tasks
        .record_undo(
            m.task,
            &Undo::AbandonMove {
                vm: vm.id.clone(),
                host: dest.name().to_owned(),
            },
        )
        .await
        .map_err(|err| error_chain(&err))?;
    m.step("copy", 30).await;
    let arrival = VmArrival {
        bundle,
        services,
        os: vm.env.get("os").cloned(),
        direct_endpoints: vm.direct_endpoints.clone(),
        from,
    };
    let pulled = dest
        .pull_vm(&arrival)
        .await
        .map_err(|err| host_error(dest.name(), &err))?;
    tracing::info!(vm = %vm.id, from = %vm.host, to = %dest.name(), bytes = pulled.bytes, "archived vm copied");

    m.step("switch", 90).await;
    m.commit(&vm, None, pulled.launch.0, pulled.direct_endpoints, false)
        .await
}
