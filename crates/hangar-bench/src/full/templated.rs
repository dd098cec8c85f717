//! The rows measured on a second server with templates on: once the service's template
//! exists, a request with an empty pool is served by a clone of it (its RAM file mapped
//! privately, the device state restored), pools refill by clones, and a clone's delta
//! archive wakes onto the template's mapping.

use std::time::Duration;

use hangar_api::VmView;

use super::archive::{Archived, archives};
use super::{Plan, failed};
use crate::client::BenchError;
use crate::libvirt;
use crate::measure::{self, Sustained};
use crate::server::{BenchServer, Sample, rss_pss_kib};

/// What the templated server measured.
pub(super) struct Templated {
    /// Request with an empty pool, served as a clone → answering.
    pub clones: Vec<Duration>,
    /// The delta tier of a clone (and libvirt's save and restore, alternately).
    pub archived: Archived,
    /// Warm-pool grants from a pool filled by clones.
    pub grants: Vec<Sample>,
    /// RSS and PSS (KiB) of each paused pool VM (a clone, resumed, checked ready, paused).
    pub pool_memory: Vec<(u64, u64)>,
    /// RSS and PSS (KiB) of each sleeping clone (granted, answering, then put to sleep).
    pub clone_memory: Vec<(u64, u64)>,
    pub sustained: Sustained,
}

/// Runs the templated rows on `server` (started with templates on and an empty pool):
/// the template is made by a first boot, then `plan.cold` requests are served as clones
/// (each followed by a `virsh save` and `virsh restore` of `domain`, when there is one),
/// a clone is archived in the delta tier and woken `plan.archives` times, and the pool
/// rows are taken with the pool refilling by clones.
pub(super) async fn measure(
    server: &BenchServer,
    service: &str,
    plan: &Plan,
    lv: Option<&libvirt::Libvirt>,
    mut domain: Option<&mut libvirt::Domain>,
) -> Result<Templated, BenchError> {
    server.set_pool(service, 0).await?;
    eprintln!("the service's template (a first boot)...");
    let first = server.timed_request(service, true).await?;
    server.wait_template(service).await?;
    server.delete_vm(&first.vm).await?;

    eprintln!("restores from the template...");
    let mut clones = Vec::new();
    let mut archived = Archived::default();
    // The first few clones are put to sleep and kept, for the memory of paused clones.
    let mut sleeping = Vec::new();
    for i in 0..plan.cold {
        let sample = expect_clone(server.timed_request(service, true).await?)?;
        clones.push(sample.total);
        if sleeping.len() < plan.pool as usize {
            server
                .timed_action(&sample.vm, "sleep", &serde_json::json!({}), None)
                .await?;
            sleeping.push(sample.vm);
        } else {
            server.delete_vm(&sample.vm).await?;
        }
        if let (Some(lv), Some(domain)) = (lv, domain.as_deref_mut()) {
            archived.libvirt_restore(lv, domain).await?;
        }
        eprintln!("  {}/{}", i + 1, plan.cold);
    }

    eprintln!("archive/wake of a clone, delta tier...");
    let vm = expect_clone(server.timed_request(service, true).await?)?;
    archived.extend(
        archives(
            server,
            &vm.vm,
            vm.endpoint,
            &["delta"],
            &["delta"],
            plan.archives,
            lv,
            domain,
        )
        .await?,
    );
    server.delete_vm(&vm.vm).await?;

    eprintln!("warm-pool grants (pool of clones)...");
    let grants = measure::pool_grants(server, service, plan.pool, plan.grants).await?;

    server.wait_pool_full(service, plan.pool).await?;
    let pool_memory = measure::paused_pool_memory(server, service).await?;
    let clone_memory = vms_memory(server, &sleeping).await?;
    for vm in &sleeping {
        server.delete_vm(vm).await?;
    }

    eprintln!(
        "sustained grants for {:?} (pool of clones)...",
        plan.sustained
    );
    let sustained = measure::sustained_grants(server, service, plan.pool, plan.sustained).await?;
    server.set_pool(service, 0).await?;
    Ok(Templated {
        clones,
        archived,
        grants,
        pool_memory,
        clone_memory,
        sustained,
    })
}

fn expect_clone(sample: Sample) -> Result<Sample, BenchError> {
    if sample.served == "cloned" {
        Ok(sample)
    } else {
        Err(BenchError::Reply(format!(
            "expected a clone of the service's template, got a {} match",
            sample.served
        )))
    }
}

/// RSS and PSS (KiB) of the QEMU process of each of `vms`.
async fn vms_memory(server: &BenchServer, vms: &[String]) -> Result<Vec<(u64, u64)>, BenchError> {
    let mut memory = Vec::new();
    for id in vms {
        let vm: VmView = server.client.get(&format!("/v1/vms/{id}")).await?;
        let pid = vm
            .pid
            .ok_or_else(|| failed(format!("the sleeping clone {id} has no process")))?;
        memory.extend(rss_pss_kib(pid));
    }
    Ok(memory)
}
