//! Warm pools, as pure planning: how many paused VMs each pool should hold (adaptive, from
//! the request rate) and which VMs to make or remove to get there within a memory budget.
//! The loop that applies the plan lives in the server.

use serde::{Deserialize, Serialize};

/// One pool: identical VMs booted to ready and paused, or hardware shells paused before
/// any OS (`os: None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: String,
    /// The service this pool serves (service pools), if any.
    pub service: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub min: u32,
    pub max: u32,
}

/// Paused and booting VMs a pool holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCount {
    pub ready: u32,
    pub booting: u32,
}

impl PoolCount {
    pub fn total(self) -> u32 {
        self.ready + self.booting
    }
}

/// An exponentially weighted request rate, in requests per second, that halves its weight
/// of the past every `half_life_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RequestRate {
    per_s: f64,
    at_ms: u64,
}

impl RequestRate {
    pub const HALF_LIFE_S: f64 = 30.0;

    pub fn new(now_ms: u64) -> RequestRate {
        RequestRate {
            per_s: 0.0,
            at_ms: now_ms,
        }
    }

    /// The rate as of `now_ms`, decayed since the last request.
    pub fn per_s(&self, now_ms: u64) -> f64 {
        self.per_s * decay(now_ms.saturating_sub(self.at_ms))
    }

    /// Records one request at `now_ms`.
    pub fn record(&mut self, now_ms: u64) {
        // Each request adds an impulse whose integral over time is one request.
        let impulse = std::f64::consts::LN_2 / Self::HALF_LIFE_S;
        self.per_s = self.per_s(now_ms) + impulse;
        self.at_ms = now_ms.max(self.at_ms);
    }
}

fn decay(elapsed_ms: u64) -> f64 {
    (-(elapsed_ms as f64 / 1000.0) * std::f64::consts::LN_2 / RequestRate::HALF_LIFE_S).exp()
}

/// The pool size that covers the requests expected while one VM is being refilled (twice
/// over, for bursts), between `min` and `max`.
pub fn adaptive_target(min: u32, max: u32, rate_per_s: f64, refill_s: f64) -> u32 {
    let wanted = (rate_per_s * refill_s * 2.0).ceil();
    let wanted = if wanted.is_finite() && wanted > 0.0 {
        wanted.min(f64::from(u32::MAX)) as u32
    } else {
        0
    };
    wanted.max(min).min(max.max(min))
}

/// What to do to a set of pools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolPlan {
    /// (pool index, VMs to make).
    pub create: Vec<(usize, u32)>,
    /// (pool index, paused VMs to remove).
    pub remove: Vec<(usize, u32)>,
}

/// Plans creations and removals so each pool approaches its target without the memory held
/// by all pools (`pool_memory_mib`: ready and booting VMs of every pool) exceeding
/// `budget_mib`. Scarce memory goes to the emptiest pool first (relative to its target),
/// one VM at a time.
pub fn plan(
    pools: &[(PoolSpec, PoolCount, u32)],
    pool_memory_mib: u64,
    budget_mib: u64,
) -> PoolPlan {
    let mut plan = PoolPlan::default();
    let mut have: Vec<u32> = pools.iter().map(|(_, count, _)| count.total()).collect();
    for (i, (_, count, target)) in pools.iter().enumerate() {
        // Only paused VMs are removed; booting ones finish and are trimmed next time.
        let excess = count.total().saturating_sub(*target).min(count.ready);
        if excess > 0 {
            plan.remove.push((i, excess));
            have[i] -= excess;
        }
    }
    let freed: u64 = plan
        .remove
        .iter()
        .map(|(i, n)| u64::from(pools[*i].0.memory_mib) * u64::from(*n))
        .sum();
    let mut used = pool_memory_mib.saturating_sub(freed);
    let mut create = vec![0u32; pools.len()];
    loop {
        let neediest = pools
            .iter()
            .enumerate()
            .filter(|(i, (spec, _, target))| {
                have[*i] < *target && used + u64::from(spec.memory_mib) <= budget_mib
            })
            .min_by(|(a, (_, _, ta)), (b, (_, _, tb))| {
                let fill = |i: usize, t: u32| f64::from(have[i]) / f64::from(t.max(1));
                fill(*a, *ta).total_cmp(&fill(*b, *tb)).then(a.cmp(b))
            })
            .map(|(i, _)| i);
        let Some(i) = neediest else { break };
        have[i] += 1;
        create[i] += 1;
        used += u64::from(pools[i].0.memory_mib);
    }
    plan.create = create
        .into_iter()
        .enumerate()
        .filter(|(_, n)| *n > 0)
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(memory_mib: u32) -> PoolSpec {
        PoolSpec {
            name: format!("p{memory_mib}"),
            service: None,
            vcpus: 1,
            memory_mib,
            min: 0,
            max: 8,
        }
    }

    #[test]
    fn rate_rises_with_requests_and_decays() {
        let mut rate = RequestRate::new(0);
        for second in 0..60 {
            rate.record(second * 1000);
        }
        let busy = rate.per_s(60_000);
        assert!(
            (0.5..1.5).contains(&busy),
            "about one per second, got {busy}"
        );
        let later = rate.per_s(60_000 + 30_000);
        assert!((later - busy / 2.0).abs() < 1e-9, "halves in 30 s");
    }

    #[test]
    fn targets_follow_the_rate_within_bounds() {
        assert_eq!(adaptive_target(1, 4, 0.0, 3.0), 1);
        assert_eq!(adaptive_target(1, 4, 0.5, 3.0), 3);
        assert_eq!(adaptive_target(1, 4, 10.0, 3.0), 4);
        assert_eq!(
            adaptive_target(2, 1, 10.0, 3.0),
            2,
            "min wins over a smaller max"
        );
        assert_eq!(adaptive_target(0, 4, f64::NAN, 3.0), 0);
    }

    #[test]
    fn plan_fills_the_emptiest_pool_first_within_budget() {
        let pools = [
            (
                spec(128),
                PoolCount {
                    ready: 2,
                    booting: 0,
                },
                2,
            ),
            (spec(256), PoolCount::default(), 2),
            (spec(128), PoolCount::default(), 1),
        ];
        let plan = plan(&pools, 256, 256 + 256 + 128);
        assert_eq!(plan.create, vec![(1, 1), (2, 1)]);
        assert!(plan.remove.is_empty());
    }

    #[test]
    fn plan_removes_paused_excess_and_reuses_its_memory() {
        let pools = [
            (
                spec(256),
                PoolCount {
                    ready: 3,
                    booting: 1,
                },
                1,
            ),
            (spec(256), PoolCount::default(), 2),
        ];
        let plan = plan(&pools, 1024, 1024);
        assert_eq!(plan.remove, vec![(0, 3)]);
        assert_eq!(plan.create, vec![(1, 2)]);
    }

    proptest! {
        #[test]
        fn plans_never_exceed_budget_or_targets(
            counts in prop::collection::vec((0u32..4, 0u32..3, 0u32..6, prop::sample::select(vec![64u32, 128, 256])), 1..6),
            budget in 0u64..4096,
        ) {
            let pools: Vec<_> = counts
                .iter()
                .map(|(ready, booting, target, mem)| (spec(*mem), PoolCount { ready: *ready, booting: *booting }, *target))
                .collect();
            let used: u64 = pools.iter().map(|(s, c, _)| u64::from(s.memory_mib) * u64::from(c.total())).sum();
            let plan = plan(&pools, used, budget);
            let mut after: Vec<u32> = pools.iter().map(|(_, c, _)| c.total()).collect();
            let mut memory = used as i64;
            for (i, n) in &plan.remove {
                prop_assert!(*n <= pools[*i].1.ready);
                after[*i] -= n;
                memory -= i64::from(pools[*i].0.memory_mib) * i64::from(*n);
            }
            for (i, n) in &plan.create {
                after[*i] += n;
                memory += i64::from(pools[*i].0.memory_mib) * i64::from(*n);
                prop_assert!(after[*i] <= pools[*i].2, "created past the target");
            }
            if !plan.create.is_empty() {
                prop_assert!(memory as u64 <= budget, "over budget: {} > {}", memory, budget);
            }
        }
    }
}
