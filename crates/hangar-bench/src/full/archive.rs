//! Archive and wake samples of each tier, against libvirt's save and restore.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Plan, failed, median};
use crate::client::BenchError;
use crate::libvirt;
use crate::measure;
use crate::report::Report;
use crate::server::BenchServer;

/// Archive and wake samples of one tier.
#[derive(Default)]
struct TierSamples {
    archives: Vec<Duration>,
    wakes: Vec<Duration>,
    /// Archive sizes, bytes.
    sizes: Vec<u64>,
}

/// Archive and wake samples of each tier, with libvirt's save and restore.
#[derive(Default)]
pub(super) struct Archived {
    /// Per tier; `None`: the server does not offer it.
    tiers: Vec<(&'static str, Option<TierSamples>)>,
    saves: Vec<Duration>,
    restores: Vec<Duration>,
    save_bytes: Vec<u64>,
}

pub(super) async fn archives(
    server: &BenchServer,
    vm: &str,
    endpoint: SocketAddr,
    plan: &Plan,
    lv: Option<&libvirt::Libvirt>,
    mut domain: Option<&mut libvirt::Domain>,
) -> Result<Archived, BenchError> {
    let mut archived = Archived::default();
    for tier in ["raw", "zstd", "delta"] {
        let mut samples = Some(TierSamples::default());
        for _ in 0..plan.archives {
            let Some((archive, wake, size)) =
                measure::archive_and_wake(server, vm, tier, endpoint).await?
            else {
                samples = None;
                break;
            };
            if let Some(samples) = samples.as_mut() {
                samples.archives.push(archive);
                samples.wakes.push(wake);
                samples.sizes.extend(size);
            }
            if tier == "raw"
                && let (Some(lv), Some(domain)) = (lv, domain.as_deref_mut())
            {
                archived.saves.push(lv.save(domain).await.map_err(failed)?);
                archived.save_bytes.extend(lv.saved_bytes(domain));
                archived
                    .restores
                    .push(lv.restore(domain).await.map_err(failed)?);
            }
        }
        archived.tiers.push((tier, samples));
    }
    Ok(archived)
}

impl Archived {
    pub(super) fn report(&self, report: &mut Report, with_libvirt: bool) {
        let size_mib = |sizes: &[u64]| {
            let mut sizes = sizes.to_vec();
            median(&mut sizes).map(|b| b / (1024.0 * 1024.0))
        };
        let save_mib = size_mib(&self.save_bytes);
        for (tier, samples) in &self.tiers {
            let Some(TierSamples {
                archives,
                wakes,
                sizes,
            }) = samples
            else {
                report.unavailable(
                    &format!("archive and wake, {tier} tier"),
                    &format!(
                        "not written as {tier} here (a delta needs a VM cloned from a template: see `hangar bench lifecycle`)"
                    ),
                );
                continue;
            };
            let raw = *tier == "raw" && with_libvirt;
            report.latency(
                &format!("archive an active VM, {tier} tier (API answer)"),
                archives,
                raw.then_some(("virsh save", self.saves.as_slice())),
                None,
            );
            report.latency(
                &format!("wake from archive, {tier} tier → answering"),
                wakes,
                raw.then_some(("virsh restore → answering", self.restores.as_slice())),
                None,
            );
            report.figure(
                &format!("archive size, {tier} tier, median"),
                "MiB",
                size_mib(sizes),
                raw.then_some(("virsh save file", save_mib)),
                None,
            );
        }
    }
}
