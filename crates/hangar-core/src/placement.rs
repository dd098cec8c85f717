//! Host choice for a new VM, as a pure decision: which host of a farm runs it, by
//! capacity, isolation, the operator's host priority, load and cost. The caller applies it
//! (starts the VM there and records the host's new use).
//!
//! The rules, in order:
//! 1. **Eligible** hosts are up, have room for the VM's vCPUs and memory, and respect
//!    isolation: a VM of an isolation group goes only to an empty host or one already
//!    reserved for its group; a VM without one never goes to a reserved host.
//! 2. Among eligible hosts, the highest host **priority** wins (operators fill preferred
//!    hosts first, e.g. owned before rented).
//! 3. Then by the VM's priority: a `high` VM goes to the **least loaded** host (then the
//!    cheapest); a `normal` VM to the **cheapest** (then the least loaded); a `low` VM to
//!    the cheapest, then the **most loaded** (packing, which keeps hosts free for others).
//!    Load is the larger of the vCPU and memory shares used once the VM is placed.
//! 4. Then a host that already holds the VM's image (nothing to copy), then the name, so
//!    that the choice never depends on the order hosts are listed in.

use serde::{Deserialize, Serialize};

/// What the decision knows of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub name: String,
    pub up: bool,
    /// vCPUs the host may give to VMs (its overcommit included).
    pub vcpus: u32,
    /// Guest memory the host may hold.
    pub memory_mib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    /// VMs on the host now.
    pub vms: u32,
    /// Relative cost of running a VM here (any unit; lower is cheaper).
    pub cost: u32,
    /// Operator preference: higher is filled first.
    pub priority: i32,
    /// The isolation group the host is reserved for while it holds that group's VMs.
    pub reserved_for: Option<String>,
    /// Whether the VM's image is already on the host (set per decision by the caller).
    pub has_image: bool,
}

impl HostFacts {
    /// An empty, up host of that size, cost 1, priority 0.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_mib: u64) -> HostFacts {
        HostFacts {
            name: name.into(),
            up: true,
            vcpus,
            memory_mib,
            used_vcpus: 0,
            used_memory_mib: 0,
            vms: 0,
            cost: 1,
            priority: 0,
            reserved_for: None,
            has_image: false,
        }
    }

    /// Records `vm` as running here (what the caller does once the VM is started).
    pub fn place(&mut self, vm: &VmNeeds) {
        self.used_vcpus = self.used_vcpus.saturating_add(vm.vcpus);
        self.used_memory_mib = self.used_memory_mib.saturating_add(vm.memory_mib);
        self.vms = self.vms.saturating_add(1);
        if let Some(group) = &vm.isolation {
            self.reserved_for = Some(group.clone());
        }
    }

    fn fits(&self, vm: &VmNeeds) -> bool {
        self.used_vcpus.saturating_add(vm.vcpus) <= self.vcpus
            && self.used_memory_mib.saturating_add(vm.memory_mib) <= self.memory_mib
    }

    fn isolation_allows(&self, vm: &VmNeeds) -> bool {
        match (&vm.isolation, &self.reserved_for) {
            (Some(group), Some(reserved)) => group == reserved,
            (Some(_), None) => self.vms == 0,
            (None, Some(_)) => false,
            (None, None) => true,
        }
    }

    /// Load once `vm` is placed, in thousandths: the larger of the vCPU and memory shares.
    fn load_after(&self, vm: &VmNeeds) -> u64 {
        let share =
            |used: u64, total: u64| used.saturating_mul(1000).checked_div(total).unwrap_or(1000);
        share(
            u64::from(self.used_vcpus) + u64::from(vm.vcpus),
            u64::from(self.vcpus),
        )
        .max(share(self.used_memory_mib + vm.memory_mib, self.memory_mib))
    }
}

/// How much a VM matters, for where it goes (rule 3 of the module).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum VmPriority {
    Low,
    #[default]
    Normal,
    High,
}

/// What the VM to place needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNeeds {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub priority: VmPriority,
    /// An isolation group (a tenant that shares hosts with no one else), if any.
    pub isolation: Option<String>,
}

/// Why no host was chosen: how many hosts each reason ruled out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no host can run a VM of {vcpus} vCPUs and {memory_mib} MiB: {down} down, {full} without room, {isolated} ruled out by isolation"
)]
pub struct NoHost {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub down: usize,
    pub full: usize,
    pub isolated: usize,
}

/// The eligible host to run `vm` on, by the rules of this module, as an index into
/// `hosts`. The same hosts in another order give the same host (names are unique).
pub fn choose_host(hosts: &[HostFacts], vm: &VmNeeds) -> Result<usize, NoHost> {
    let mut best: Option<(usize, Key<'_>)> = None;
    let mut no_host = NoHost {
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        down: 0,
        full: 0,
        isolated: 0,
    };
    for (i, host) in hosts.iter().enumerate() {
        if !host.up {
            no_host.down += 1;
        } else if !host.fits(vm) {
            no_host.full += 1;
        } else if !host.isolation_allows(vm) {
            no_host.isolated += 1;
        } else {
            let key = key(host, vm);
            if best.as_ref().is_none_or(|(_, known)| key < *known) {
                best = Some((i, key));
            }
        }
    }
    best.map(|(i, _)| i).ok_or(no_host)
}

/// Ordering key of an eligible host: smaller is better.
type Key<'a> = (i64, u64, u64, bool, &'a str);

fn key<'a>(host: &'a HostFacts, vm: &VmNeeds) -> Key<'a> {
    let load = host.load_after(vm);
    let cost = u64::from(host.cost);
    let (first, second) = match vm.priority {
        VmPriority::High => (load, cost),
        VmPriority::Normal => (cost, load),
        VmPriority::Low => (cost, 1000u64.saturating_sub(load)),
    };
    (
        -i64::from(host.priority),
        first,
        second,
        !host.has_image,
        host.name.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(vcpus: u32, memory_mib: u64, priority: VmPriority) -> VmNeeds {
        VmNeeds {
            vcpus,
            memory_mib,
            priority,
            isolation: None,
        }
    }

    fn host(name: &str, used_vcpus: u32, cost: u32) -> HostFacts {
        HostFacts {
            used_vcpus,
            used_memory_mib: u64::from(used_vcpus) * 1024,
            vms: used_vcpus,
            cost,
            ..HostFacts::new(name, 8, 8192)
        }
    }

    fn chosen<'a>(hosts: &'a [HostFacts], vm: &VmNeeds) -> &'a str {
        &hosts[choose_host(hosts, vm).unwrap()].name
    }

    #[test]
    fn high_spreads_normal_saves_low_packs() {
        // a: cheap and busy; b: dear and idle; c: cheap and half used.
        let hosts = [host("a", 6, 1), host("b", 0, 5), host("c", 4, 1)];
        assert_eq!(chosen(&hosts, &vm(1, 512, VmPriority::High)), "b");
        assert_eq!(chosen(&hosts, &vm(1, 512, VmPriority::Normal)), "c");
        assert_eq!(chosen(&hosts, &vm(1, 512, VmPriority::Low)), "a");
    }

    #[test]
    fn host_priority_comes_before_load_and_cost() {
        let mut hosts = [host("owned", 6, 9), host("rented", 0, 1)];
        hosts[0].priority = 1;
        for priority in [VmPriority::Low, VmPriority::Normal, VmPriority::High] {
            assert_eq!(chosen(&hosts, &vm(1, 512, priority)), "owned");
        }
    }

    #[test]
    fn a_host_with_the_image_breaks_ties() {
        let mut hosts = [host("a", 2, 1), host("b", 2, 1)];
        assert_eq!(chosen(&hosts, &vm(1, 512, VmPriority::Normal)), "a");
        hosts[1].has_image = true;
        assert_eq!(chosen(&hosts, &vm(1, 512, VmPriority::Normal)), "b");
    }

    #[test]
    fn isolation_reserves_hosts() {
        let mut hosts = [host("busy", 2, 1), HostFacts::new("empty", 8, 8192)];
        let mut isolated = vm(1, 512, VmPriority::Normal);
        isolated.isolation = Some("tenant-a".into());
        // Only an empty host takes an isolated VM, and is then reserved for its group.
        let i = choose_host(&hosts, &isolated).unwrap();
        assert_eq!(hosts[i].name, "empty");
        hosts[i].place(&isolated);
        assert_eq!(chosen(&hosts, &isolated), "empty");
        assert_eq!(chosen(&hosts, &vm(1, 512, VmPriority::High)), "busy");
        let mut other = isolated.clone();
        other.isolation = Some("tenant-b".into());
        let err = choose_host(&hosts, &other).unwrap_err();
        assert_eq!((err.isolated, err.full, err.down), (2, 0, 0));
    }

    #[test]
    fn no_host_says_why() {
        let mut hosts = [host("full", 8, 1), host("down", 0, 1), host("ok", 0, 1)];
        hosts[1].up = false;
        hosts[2].memory_mib = 256;
        let err = choose_host(&hosts, &vm(1, 512, VmPriority::Normal)).unwrap_err();
        assert_eq!((err.down, err.full, err.isolated), (1, 2, 0));
        assert!(err.to_string().contains("1 down, 2 without room"), "{err}");
        assert!(choose_host(&[], &vm(1, 1, VmPriority::Low)).is_err());
    }

    fn arb_host(name: String) -> impl Strategy<Value = HostFacts> {
        (
            any::<bool>(),
            1u32..16,
            1u64..16_384,
            0u32..20,
            0u64..20_000,
            0u32..4,
            -1i32..2,
            prop::option::of(prop::sample::select(vec!["a", "b"])),
            any::<bool>(),
        )
            .prop_map(
                move |(up, vcpus, memory_mib, used, used_mem, cost, priority, reserved, img)| {
                    HostFacts {
                        name: name.clone(),
                        up: up || vcpus > 2,
                        vcpus,
                        memory_mib,
                        used_vcpus: used,
                        used_memory_mib: used_mem,
                        vms: used.min(3),
                        cost,
                        priority,
                        reserved_for: reserved.map(str::to_owned),
                        has_image: img,
                    }
                },
            )
    }

    fn arb_hosts() -> impl Strategy<Value = Vec<HostFacts>> {
        (0usize..12).prop_flat_map(|n| {
            (0..n)
                .map(|i| arb_host(format!("h{i}")))
                .collect::<Vec<_>>()
        })
    }

    fn arb_vm() -> impl Strategy<Value = VmNeeds> {
        (
            1u32..4,
            1u64..4096,
            prop::sample::select(vec![VmPriority::Low, VmPriority::Normal, VmPriority::High]),
            prop::option::of(prop::sample::select(vec!["a", "b"])),
        )
            .prop_map(|(vcpus, memory_mib, priority, isolation)| VmNeeds {
                vcpus,
                memory_mib,
                priority,
                isolation: isolation.map(str::to_owned),
            })
    }

    fn eligible(host: &HostFacts, vm: &VmNeeds) -> bool {
        host.up && host.fits(vm) && host.isolation_allows(vm)
    }

    proptest! {
        #[test]
        fn the_choice_is_eligible_and_best(hosts in arb_hosts(), vm in arb_vm()) {
            match choose_host(&hosts, &vm) {
                Ok(i) => {
                    prop_assert!(eligible(&hosts[i], &vm));
                    for other in hosts.iter().filter(|h| eligible(h, &vm)) {
                        prop_assert!(key(&hosts[i], &vm) <= key(other, &vm));
                    }
                }
                Err(no_host) => {
                    prop_assert!(!hosts.iter().any(|h| eligible(h, &vm)));
                    prop_assert_eq!(no_host.down + no_host.full + no_host.isolated, hosts.len());
                }
            }
        }

        #[test]
        fn the_order_of_hosts_does_not_matter(hosts in arb_hosts(), vm in arb_vm(), rotate in 0usize..12) {
            let mut rotated = hosts.clone();
            if !rotated.is_empty() {
                let by = rotate % rotated.len();
                rotated.rotate_left(by);
            }
            rotated.reverse();
            let name = |hosts: &[HostFacts]| choose_host(hosts, &vm).ok().map(|i| hosts[i].name.clone());
            prop_assert_eq!(name(&hosts), name(&rotated));
        }

        #[test]
        fn placing_until_full_never_overcommits(mut hosts in arb_hosts(), vms in prop::collection::vec(arb_vm(), 1..40)) {
            for host in &mut hosts {
                host.used_vcpus = host.used_vcpus.min(host.vcpus);
                host.used_memory_mib = host.used_memory_mib.min(host.memory_mib);
            }
            for vm in &vms {
                if let Ok(i) = choose_host(&hosts, vm) {
                    hosts[i].place(vm);
                }
            }
            for host in &hosts {
                prop_assert!(host.used_vcpus <= host.vcpus && host.used_memory_mib <= host.memory_mib);
            }
        }
    }
}
