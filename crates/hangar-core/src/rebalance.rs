//! Rebalancing, as a pure decision: which running VMs to move between a farm's hosts so
//! that the hosts are about as loaded as each other. The caller applies the moves (migrates
//! each VM) and decides again later.
//!
//! **Load and spread.** A host's *load* is the larger of its vCPU and memory shares
//! (used over what it may give, overcommit included): [`Share`], the same shares as
//! placement's load without the reported load average, which moving VMs does not set. The
//! *spread* of a farm is the population standard deviation of the loads of its **up**
//! hosts with some capacity; draining, down and lost hosts neither give nor receive (drain
//! and evacuation move their VMs) and do not count. The *target* is the farm's overall use:
//! the larger of (all vCPUs used / all vCPUs) and (all memory used / all memory) over the up
//! hosts; moving VMs between them does not change it.
//!
//! **A move** of VM `v` from host `s` to host `d` is made only when all hold:
//! 1. `v` may move: on an up host, not moved (or tried) within the cooldown.
//! 2. `d` may take it: up, another host, carries the labels `v` asks for, holds no VM of
//!    `v`'s isolation group, has room for its vCPUs and memory.
//! 3. `s` is **over** the target (`load(s) > target`) and `d` is **not over** it once it
//!    holds `v` (`load(d) + v ≤ target`).
//! 4. The spread falls by **more than the margin**.
//! 5. In this round, `s` has received nothing and `d` has given nothing, and `v` has not
//!    moved yet; fewer than `max_moves` moves are chosen.
//!
//! Among the candidates the decision takes the one that lowers the spread most (in whole
//! thousandths), then the destination of highest host priority (operators' preferred
//! hosts), then one holding fewer VMs of `v`'s service (replicas spread), then the VM's and
//! the destination's names, and repeats on the farm as
//! the moves leave it.
//!
//! **No ping-pong.** A VM only ever lands on a host that is not over the target, and a
//! host that is not over it never becomes so by receiving: nothing moves off it. The target
//! is the same after the moves. So applying the moves and deciding again moves no VM that
//! was moved, whatever the cooldown: without other changes to the farm, every VM moves at
//! most once. The margin keeps small gains from moving VMs at all; the cooldown keeps a VM
//! still when the farm changes under it (and after a move that failed).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::placement::{HostFacts, HostState, VmNeeds};

/// Moves per round unless the operator says otherwise.
pub const DEFAULT_MAX_MOVES: usize = 2;
/// Spread a move must remove, in thousandths, unless the operator says otherwise.
pub const DEFAULT_MARGIN_PERMILLE: u32 = 20;
/// How long a VM that moved (or failed to) stays where it is, unless the operator says
/// otherwise.
pub const DEFAULT_COOLDOWN_MS: u64 = 10 * 60 * 1000;

/// A VM the decision may move: one that runs (or sleeps) on its host and can be migrated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovableVm {
    /// Unique among the VMs given.
    pub id: String,
    /// The host it is on (a name among the hosts given; on another, it is left alone).
    pub host: String,
    /// Size, isolation group and label constraints (its priority is not used).
    pub needs: VmNeeds,
    /// The service it offers, if any: a destination holding fewer VMs of it comes first.
    pub service: Option<String>,
    /// When it last moved or a move of it was tried (milliseconds, the caller's clock).
    pub last_moved_ms: Option<u64>,
}

/// The operator's settings for one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// At most this many moves.
    pub max_moves: usize,
    /// A move must lower the spread by more than this, in thousandths of load.
    pub margin_permille: u32,
    /// A VM that moved less than this ago stays.
    pub cooldown_ms: u64,
    /// Now, on the clock of [`MovableVm::last_moved_ms`].
    pub now_ms: u64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            max_moves: DEFAULT_MAX_MOVES,
            margin_permille: DEFAULT_MARGIN_PERMILLE,
            cooldown_ms: DEFAULT_COOLDOWN_MS,
            now_ms: 0,
        }
    }
}

/// One move: VM `vm` (an index into the VMs given) from host `from` to host `to` (indices
/// into the hosts given), and the farm's spread before and after it, in thousandths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub vm: usize,
    pub from: usize,
    pub to: usize,
    /// Loads of the source and destination before and after, in thousandths.
    pub from_load: (u64, u64),
    pub to_load: (u64, u64),
    /// The farm's spread before and after this move, in thousandths.
    pub spread: (u64, u64),
    /// The target, in thousandths.
    pub target_permille: u64,
}

/// `source load 75% → 62% (over the farm's 25%), destination 0% → 12%; spread 35.4% →
/// 27.0%`.
impl fmt::Display for Move {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |permille: u64| Percent(permille);
        write!(
            f,
            "source load {} → {} (over the farm's {}), destination {} → {}; spread {} → {}",
            pct(self.from_load.0),
            pct(self.from_load.1),
            pct(self.target_permille),
            pct(self.to_load.0),
            pct(self.to_load.1),
            pct(self.spread.0),
            pct(self.spread.1),
        )
    }
}

/// Thousandths shown as a percentage with one decimal.
struct Percent(u64);

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}%", self.0 / 10, self.0 % 10)
    }
}

/// What [`decide`] answers: the moves in the order to make them, and the farm's spread
/// before and once they are made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebalance {
    pub moves: Vec<Move>,
    /// Spread now, in thousandths.
    pub spread_permille: u64,
    /// Spread once every move is made, in thousandths.
    pub spread_after_permille: u64,
    /// The farm's overall use (see the module), in thousandths.
    pub target_permille: u64,
}

/// A fraction `used / total`, compared exactly (`total` 0: full if anything is used, else
/// empty).
#[derive(Debug, Clone, Copy)]
pub struct Share {
    pub used: u64,
    pub total: u64,
}

impl Share {
    /// As a fraction of 1 (`total` 0: 1 if anything is used, else 0).
    pub fn ratio(self) -> f64 {
        if self.total == 0 {
            return if self.used == 0 { 0.0 } else { 1.0 };
        }
        self.used as f64 / self.total as f64
    }

    /// In thousandths, rounded down.
    pub fn permille(self) -> u64 {
        (self.ratio() * 1000.0) as u64
    }

    /// `(used, total)` as a comparable fraction: 0 total is 0/1 or 1/1.
    fn normal(self) -> (u128, u128) {
        if self.total == 0 {
            (u128::from(self.used > 0), 1)
        } else {
            (u128::from(self.used), u128::from(self.total))
        }
    }
}

impl PartialEq for Share {
    fn eq(&self, other: &Share) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Share {}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Share) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Share {
    fn cmp(&self, other: &Share) -> std::cmp::Ordering {
        let (a, b) = self.normal();
        let (c, d) = other.normal();
        (a * d).cmp(&(c * b))
    }
}

/// A host's load: the larger of its vCPU and memory shares ([`HostFacts::used_vcpus`] and
/// [`HostFacts::used_memory_mib`] over [`HostFacts::vcpus`] and [`HostFacts::memory_mib`]).
pub fn load(host: &HostFacts) -> Share {
    let vcpus = Share {
        used: u64::from(host.used_vcpus),
        total: u64::from(host.vcpus),
    };
    let memory = Share {
        used: host.used_memory_mib,
        total: host.memory_mib,
    };
    vcpus.max(memory)
}

/// Whether a host counts for the spread and may give or take VMs: up, with vCPUs and
/// memory to give.
pub fn counts(host: &HostFacts) -> bool {
    host.state == HostState::Up && host.vcpus > 0 && host.memory_mib > 0
}

/// The spread of these hosts' loads (see the module) as a fraction of 1: the population
/// standard deviation over the hosts that [`counts`], 0 for fewer than two.
pub fn spread(hosts: &[HostFacts]) -> f64 {
    let mut counted: Vec<&HostFacts> = hosts.iter().filter(|host| counts(host)).collect();
    counted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut sums = Sums::default();
    for host in counted {
        sums.add(load(host).ratio());
    }
    sums.deviation()
}

/// The farm's overall use (see the module) over the hosts that [`counts`].
pub fn target(hosts: &[HostFacts]) -> Share {
    let (mut vcpus, mut memory) = (Share { used: 0, total: 0 }, Share { used: 0, total: 0 });
    for host in hosts.iter().filter(|host| counts(host)) {
        vcpus.used += u64::from(host.used_vcpus);
        vcpus.total += u64::from(host.vcpus);
        memory.used = memory.used.saturating_add(host.used_memory_mib);
        memory.total = memory.total.saturating_add(host.memory_mib);
    }
    vcpus.max(memory)
}

/// Count, sum and sum of squares of loads: the spread in O(1) as one host's load changes.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    n: f64,
    sum: f64,
    squares: f64,
}

impl Sums {
    fn add(&mut self, x: f64) {
        self.n += 1.0;
        self.sum += x;
        self.squares += x * x;
    }

    /// With `old` replaced by `new`.
    fn replaced(mut self, old: f64, new: f64) -> Sums {
        self.sum += new - old;
        self.squares += new * new - old * old;
        self
    }

    fn deviation(self) -> f64 {
        if self.n < 2.0 {
            return 0.0;
        }
        let mean = self.sum / self.n;
        (self.squares / self.n - mean * mean).max(0.0).sqrt()
    }
}

/// The moves that even out the load of `hosts`, by the rules of the module.
///
/// `hosts` give each host's size, state, labels and priority; their `used_vcpus`,
/// `used_memory_mib` and `groups` are what the VMs **not** in `vms` take and hold there
/// (pool VMs, VMs being made): [`decide`] adds the VMs in `vms` itself. Names of hosts and
/// ids of VMs are unique; the answer does not depend on the order either is given in.
pub fn decide(hosts: &[HostFacts], vms: &[MovableVm], params: &Params) -> Rebalance {
    let mut farm: Vec<HostFacts> = hosts.to_vec();
    let by_name: BTreeMap<&str, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| (host.name.as_str(), i))
        .collect();
    // Where each VM is now (None: on a host not given), and its service per host.
    let mut at: Vec<Option<usize>> = vms
        .iter()
        .map(|vm| by_name.get(vm.host.as_str()).copied())
        .collect();
    let mut services: Vec<BTreeMap<&str, usize>> = vec![BTreeMap::new(); hosts.len()];
    for (vm, host) in vms.iter().zip(&at) {
        if let Some(h) = *host {
            farm[h].place(&vm.needs);
            if let Some(service) = &vm.service {
                *services[h].entry(service.as_str()).or_default() += 1;
            }
        }
    }
    let target = target(&farm);
    // Summed in the order of names, so that the order hosts are given in changes nothing.
    let mut sums = Sums::default();
    for &i in by_name.values().filter(|&&i| counts(&farm[i])) {
        sums.add(load(&farm[i]).ratio());
    }
    let spread_permille = permille(sums.deviation());
    let margin = f64::from(params.margin_permille) / 1000.0;
    let mut gave = vec![false; farm.len()];
    let mut took = vec![false; farm.len()];
    let mut moved = vec![false; vms.len()];
    let mut moves = Vec::new();
    while moves.len() < params.max_moves {
        let before = sums.deviation();
        let mut best: Option<(Key<'_>, usize, usize, usize, Sums)> = None;
        for (v, vm) in vms.iter().enumerate() {
            let Some(s) = at[v] else { continue };
            if moved[v]
                || took[s]
                || !counts(&farm[s])
                || load(&farm[s]) <= target
                || in_cooldown(vm, params)
            {
                continue;
            }
            let source = load(&farm[s]);
            let source_after = load(&without(&farm[s], &vm.needs));
            for (d, dest) in farm.iter().enumerate() {
                if d == s || gave[d] || !counts(dest) || !dest.admits(&vm.needs) {
                    continue;
                }
                let mut after = dest.clone();
                after.used_vcpus = after.used_vcpus.saturating_add(vm.needs.vcpus);
                after.used_memory_mib = after.used_memory_mib.saturating_add(vm.needs.memory_mib);
                let dest_after = load(&after);
                if dest_after > target {
                    continue;
                }
                let next = sums
                    .replaced(source.ratio(), source_after.ratio())
                    .replaced(load(dest).ratio(), dest_after.ratio());
                let gain = before - next.deviation();
                if gain <= margin {
                    continue;
                }
                let same_service = vm
                    .service
                    .as_deref()
                    .and_then(|service| services[d].get(service).copied())
                    .unwrap_or(0);
                let key: Key<'_> = (
                    std::cmp::Reverse(permille(gain)),
                    std::cmp::Reverse(dest.priority),
                    same_service,
                    vm.id.as_str(),
                    dest.name.as_str(),
                );
                if best.as_ref().is_none_or(|(known, ..)| key < *known) {
                    best = Some((key, v, s, d, next));
                }
            }
        }
        let Some((_, v, s, d, next)) = best else {
            break;
        };
        let from_before = load(&farm[s]).permille();
        let to_before = load(&farm[d]).permille();
        farm[s] = without(&farm[s], &vms[v].needs);
        farm[d].place(&vms[v].needs);
        if let Some(service) = &vms[v].service {
            if let Some(count) = services[s].get_mut(service.as_str()) {
                *count = count.saturating_sub(1);
            }
            *services[d].entry(service.as_str()).or_default() += 1;
        }
        moves.push(Move {
            vm: v,
            from: s,
            to: d,
            from_load: (from_before, load(&farm[s]).permille()),
            to_load: (to_before, load(&farm[d]).permille()),
            spread: (permille(before), permille(next.deviation())),
            target_permille: target.permille(),
        });
        sums = next;
        at[v] = Some(d);
        moved[v] = true;
        gave[s] = true;
        took[d] = true;
    }
    Rebalance {
        moves,
        spread_permille,
        spread_after_permille: permille(sums.deviation()),
        target_permille: target.permille(),
    }
}

/// Ordering of candidate moves: smaller is better (see the module).
type Key<'a> = (
    std::cmp::Reverse<u64>,
    std::cmp::Reverse<i32>,
    usize,
    &'a str,
    &'a str,
);

fn permille(fraction: f64) -> u64 {
    (fraction * 1000.0).round() as u64
}

fn in_cooldown(vm: &MovableVm, params: &Params) -> bool {
    vm.last_moved_ms
        .is_some_and(|at| params.now_ms.saturating_sub(at) < params.cooldown_ms)
}

/// `host` without `vm`'s vCPUs and memory. Its isolation group stays listed: another VM
/// there may hold it too, and a host that gave receives nothing in the round anyway.
fn without(host: &HostFacts, vm: &VmNeeds) -> HostFacts {
    let mut host = host.clone();
    host.used_vcpus = host.used_vcpus.saturating_sub(vm.vcpus);
    host.used_memory_mib = host.used_memory_mib.saturating_sub(vm.memory_mib);
    host
}

#[cfg(test)]
mod tests;
