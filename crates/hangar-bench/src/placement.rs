//! `hangar bench placement`: placement decisions per second, [`choose_host`] over a
//! simulated farm, VMs placed one after another and each decision applied with
//! [`HostFacts::place`], the farm reset when nothing fits any more. Pure CPU; no server.
//! The figure is the median of several rounds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hangar_core::placement::{HostFacts, HostState, VmNeeds, VmPriority, choose_host};
use serde::Serialize;

use crate::client::BenchError;

#[derive(clap::Args)]
pub struct PlacementBench {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Rounds; the figure is their median.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Length of one round, e.g. 500ms, 2s.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    round: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementRun {
    pub hosts: usize,
    pub rounds: usize,
    /// Decisions over all rounds.
    pub decisions: u64,
    /// Decisions that found no host (the farm was full; it is then reset, untimed).
    pub refused: u64,
    /// Time spent deciding and placing, over all rounds.
    pub seconds: f64,
    /// Decisions per second, the median of the rounds.
    pub per_s: f64,
    /// Microseconds per decision, at the median rate.
    pub mean_us: f64,
    /// Decisions per second of each round, in order.
    pub round_per_s: Vec<f64>,
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

const ZONES: [&str; 3] = ["eu", "us", "ap"];

/// A farm of `n` hosts of mixed sizes, costs, priorities, loads and use: about 2% not up,
/// every host labelled with a zone and a third with `disk=ssd`, 3% holding VMs of an
/// isolation group, 30% holding the image and 10% the template.
fn farm(n: usize, rng: &mut Rng) -> Vec<HostFacts> {
    (0..n)
        .map(|i| {
            let vcpus = 16 << rng.below(4); // 16..128
            let memory_mib = u64::from(vcpus) * 4096;
            let used_share = rng.below(70);
            let used_vcpus = vcpus * used_share as u32 / 100;
            let mut labels =
                BTreeMap::from([("zone".to_owned(), ZONES[rng.below(3) as usize].to_owned())]);
            if rng.below(3) == 0 {
                labels.insert("disk".into(), "ssd".into());
            }
            HostFacts {
                state: match rng.below(100) {
                    0 => HostState::Draining,
                    1 => HostState::Down,
                    _ => HostState::Up,
                },
                used_vcpus,
                used_memory_mib: memory_mib * used_share / 100,
                cpus: vcpus / 2,
                load: rng.below(u64::from(vcpus) * 100) as f64 / 200.0,
                cost: 1 + rng.below(5) as u32,
                priority: rng.below(3) as i32,
                labels,
                groups: (rng.below(33) == 0)
                    .then(|| format!("tenant-{}", rng.below(50)))
                    .into_iter()
                    .collect(),
                has_image: rng.below(10) < 3,
                has_template: rng.below(10) == 0,
                ..HostFacts::new(format!("host-{i:04}"), vcpus, memory_mib)
            }
        })
        .collect()
}

/// A VM of a mixed size and priority; 10% in one of 50 isolation groups, 10% asking for a
/// zone and 5% for an SSD.
fn vm(rng: &mut Rng) -> VmNeeds {
    let mut on = BTreeMap::new();
    if rng.below(10) == 0 {
        on.insert("zone".to_owned(), ZONES[rng.below(3) as usize].to_owned());
    }
    if rng.below(20) == 0 {
        on.insert("disk".to_owned(), "ssd".to_owned());
    }
    VmNeeds {
        vcpus: 1 << rng.below(4),
        memory_mib: 512 << rng.below(5),
        priority: match rng.below(3) {
            0 => VmPriority::Low,
            1 => VmPriority::Normal,
            _ => VmPriority::High,
        },
        isolation: (rng.below(10) == 0).then(|| format!("tenant-{}", rng.below(50))),
        on,
    }
}

/// Places VMs on a farm of `hosts` simulated hosts for `rounds` rounds of `round` each.
pub fn run_rounds(hosts: usize, rounds: usize, round: Duration) -> PlacementRun {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let initial = farm(hosts, &mut rng);
    let mut farm = initial.clone();
    let vms: Vec<VmNeeds> = (0..4096).map(|_| vm(&mut rng)).collect();
    let (mut decisions, mut refused) = (0u64, 0u64);
    let mut round_per_s = Vec::with_capacity(rounds);
    let mut total = Duration::ZERO;
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        let mut resetting = Duration::ZERO;
        let mut made = 0u64;
        while started.elapsed() < round + resetting {
            // Read the clock once per batch, not around every decision.
            for _ in 0..64 {
                let vm = &vms[(decisions % vms.len() as u64) as usize];
                decisions += 1;
                made += 1;
                match choose_host(&farm, vm) {
                    Ok(placement) => farm[placement.index].place(vm),
                    Err(_) => {
                        refused += 1;
                        let reset = Instant::now();
                        farm.clone_from(&initial);
                        resetting += reset.elapsed();
                    }
                }
            }
        }
        let busy = started.elapsed().saturating_sub(resetting);
        total += busy;
        round_per_s.push(made as f64 / busy.as_secs_f64());
    }
    let mut sorted = round_per_s.clone();
    sorted.sort_by(f64::total_cmp);
    let per_s = sorted[sorted.len() / 2];
    PlacementRun {
        hosts,
        rounds: round_per_s.len(),
        decisions,
        refused,
        seconds: total.as_secs_f64(),
        per_s,
        mean_us: 1e6 / per_s,
        round_per_s,
    }
}

/// Places VMs on a farm of `hosts` simulated hosts for about `duration`, in 5 rounds.
pub fn run(hosts: usize, duration: Duration) -> PlacementRun {
    run_rounds(hosts, 5, duration / 5)
}

/// `hangar bench placement`.
pub async fn bench(args: PlacementBench) -> Result<(), BenchError> {
    if args.hosts == 0 || args.rounds == 0 || args.round.is_zero() {
        return Err(BenchError::Reply(
            "--hosts, --rounds and --round must be above zero".into(),
        ));
    }
    let PlacementBench {
        hosts,
        rounds,
        round,
        json,
    } = args;
    let run = tokio::task::spawn_blocking(move || run_rounds(hosts, rounds, round))
        .await
        .map_err(|err| BenchError::Reply(format!("the placement benchmark failed: {err}")))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&run).expect("a run serializes")
        );
        return Ok(());
    }
    println!(
        "| hosts | decisions/s (median of {}) | µs per decision | decisions | refused |",
        run.rounds
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {:.0} | {:.2} | {} | {} |",
        run.hosts, run.per_s, run.mean_us, run.decisions, run.refused
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_farm_is_the_same_every_run_and_decisions_are_counted() {
        let a = farm(50, &mut Rng(7));
        assert_eq!(a, farm(50, &mut Rng(7)));
        assert!(a.iter().all(|h| h.used_vcpus <= h.vcpus));
        let run = run_rounds(100, 3, Duration::from_millis(10));
        assert_eq!((run.rounds, run.round_per_s.len()), (3, 3));
        assert!(run.decisions >= 3 * 64 && run.per_s > 0.0, "{run:?}");
        assert!(run.round_per_s.contains(&run.per_s));
    }

    #[test]
    fn the_simulated_vms_find_hosts_and_are_sometimes_refused_when_the_farm_fills() {
        let mut rng = Rng(1);
        let mut hosts = farm(20, &mut rng);
        let (mut placed, mut refused) = (0, 0);
        for _ in 0..2000 {
            let need = vm(&mut rng);
            match choose_host(&hosts, &need) {
                Ok(placement) => {
                    hosts[placement.index].place(&need);
                    placed += 1;
                }
                Err(_) => refused += 1,
            }
        }
        assert!(
            placed > 100 && refused > 0,
            "{placed} placed, {refused} refused"
        );
    }
}
