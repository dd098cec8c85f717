//! Archive and wake samples of each tier, against libvirt's save and restore.

use std::net::SocketAddr;
use std::time::Duration;

use super::{failed, median};
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

/// Archives and wakes the VM `samples` times in each of `tiers`; in the tiers of `peers`,
/// each sample is followed by a `virsh save` and `virsh restore` of `domain` (alternately,
/// so that both see the same load). A tier the server does not write is kept as `None`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn archives(
    server: &BenchServer,
    vm: &str,
    endpoint: SocketAddr,
    tiers: &[&'static str],
    peers: &[&'static str],
    samples: usize,
    lv: Option<&libvirt::Libvirt>,
    mut domain: Option<&mut libvirt::Domain>,
) -> Result<Archived, BenchError> {
    let mut archived = Archived::default();
    for &tier in tiers {
        let mut taken = Some(TierSamples::default());
        for _ in 0..samples {
            let Some((archive, wake, size)) =
                measure::archive_and_wake(server, vm, tier, endpoint).await?
            else {
                taken = None;
                break;
            };
            if let Some(taken) = taken.as_mut() {
                taken.archives.push(archive);
                taken.wakes.push(wake);
                taken.sizes.extend(size);
            }
            if peers.contains(&tier)
                && let (Some(lv), Some(domain)) = (lv, domain.as_deref_mut())
            {
                archived.libvirt_restore(lv, domain).await?;
            }
        }
        archived.tiers.push((tier, taken));
    }
    Ok(archived)
}

impl Archived {
    /// The samples of `other` added to these (its tiers after these tiers).
    pub(super) fn extend(&mut self, other: Archived) {
        self.tiers.extend(other.tiers);
        self.saves.extend(other.saves);
        self.restores.extend(other.restores);
        self.save_bytes.extend(other.save_bytes);
    }

    /// Every `virsh restore → answering` sample taken so far.
    pub(super) fn restores(&self) -> &[Duration] {
        &self.restores
    }

    /// A `virsh save` and `virsh restore` of `domain`, as a peer sample of another row.
    pub(super) async fn libvirt_restore(
        &mut self,
        lv: &libvirt::Libvirt,
        domain: &mut libvirt::Domain,
    ) -> Result<(), BenchError> {
        self.saves.push(lv.save(domain).await.map_err(failed)?);
        self.save_bytes.extend(lv.saved_bytes(domain));
        self.restores
            .push(lv.restore(domain).await.map_err(failed)?);
        Ok(())
    }

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
                    &format!("the server did not write the {tier} tier"),
                );
                continue;
            };
            // libvirt's save and restore are the peers of the raw tier (the same full
            // stream) and of the delta tier (hangar's fastest way back from disk).
            let raw = (*tier == "raw" || *tier == "delta") && with_libvirt;
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
