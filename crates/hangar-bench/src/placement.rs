//! Placement decisions per second: [`hangar_core::placement::choose_host`] over a simulated
//! farm, each decision applied, the farm reset when it is full. Pure CPU; no server.

use std::time::{Duration, Instant};

use hangar_core::placement::{HostFacts, VmNeeds, VmPriority, choose_host};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PlacementRun {
    pub hosts: usize,
    pub decisions: u64,
    /// Decisions that found no host (the farm was full; it is then reset).
    pub refused: u64,
    pub seconds: f64,
    pub per_s: f64,
    pub mean_us: f64,
}

/// A small deterministic generator (xorshift64*), so every run simulates the same farm.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A farm of `n` hosts of mixed sizes, costs, priorities and use: about 2% down, 3%
/// reserved for an isolation group, 30% holding the image.
fn farm(n: usize, rng: &mut Rng) -> Vec<HostFacts> {
    (0..n)
        .map(|i| {
            let vcpus = 16 << rng.below(4); // 16..128
            let memory_mib = u64::from(vcpus) * 4096;
            let used_share = rng.below(70);
            let used_vcpus = vcpus * used_share as u32 / 100;
            HostFacts {
                up: rng.below(50) != 0,
                used_vcpus,
                used_memory_mib: memory_mib * used_share / 100,
                vms: used_vcpus / 2,
                cost: 1 + rng.below(5) as u32,
                priority: rng.below(3) as i32,
                reserved_for: (rng.below(33) == 0).then(|| format!("tenant-{}", rng.below(4))),
                has_image: rng.below(10) < 3,
                ..HostFacts::new(format!("host-{i:04}"), vcpus, memory_mib)
            }
        })
        .collect()
}

fn vm(rng: &mut Rng) -> VmNeeds {
    VmNeeds {
        vcpus: 1 << rng.below(4),
        memory_mib: 512 << rng.below(5),
        priority: match rng.below(3) {
            0 => VmPriority::Low,
            1 => VmPriority::Normal,
            _ => VmPriority::High,
        },
        isolation: (rng.below(50) == 0).then(|| format!("tenant-{}", rng.below(4))),
    }
}

/// Places VMs on a farm of `hosts` simulated hosts for `duration`.
pub fn run(hosts: usize, duration: Duration) -> PlacementRun {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let initial = farm(hosts, &mut rng);
    let mut farm = initial.clone();
    let vms: Vec<VmNeeds> = (0..4096).map(|_| vm(&mut rng)).collect();
    let (mut decisions, mut refused) = (0u64, 0u64);
    let started = Instant::now();
    let mut busy = Duration::ZERO;
    while started.elapsed() < duration {
        // Time batches, so the clock is not read around every decision.
        let batch = Instant::now();
        for _ in 0..256 {
            let vm = &vms[(decisions % vms.len() as u64) as usize];
            decisions += 1;
            match choose_host(&farm, vm) {
                Ok(i) => farm[i].place(vm),
                Err(_) => {
                    refused += 1;
                    farm.clone_from(&initial);
                }
            }
        }
        busy += batch.elapsed();
    }
    let seconds = busy.as_secs_f64();
    PlacementRun {
        hosts,
        decisions,
        refused,
        seconds,
        per_s: decisions as f64 / seconds,
        mean_us: seconds * 1e6 / decisions as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_farm_is_the_same_every_run_and_decisions_are_counted() {
        let a = farm(50, &mut Rng(7));
        assert_eq!(a, farm(50, &mut Rng(7)));
        assert!(a.iter().all(|h| h.used_vcpus <= h.vcpus));
        let run = run(100, Duration::from_millis(20));
        assert!(run.decisions >= 256 && run.per_s > 0.0, "{run:?}");
    }
}
