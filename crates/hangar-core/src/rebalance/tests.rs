use std::collections::{BTreeMap, BTreeSet};

use super::*;
use proptest::prelude::*;

/// An empty 8-vCPU, 8 GiB up host.
fn host(name: &str) -> HostFacts {
    HostFacts::new(name, 8, 8192)
}

/// A 1-vCPU, 512 MiB VM on `host`, never moved.
fn vm(id: &str, host: &str) -> MovableVm {
    MovableVm {
        id: id.into(),
        host: host.into(),
        needs: VmNeeds::new(1, 512),
        service: None,
        last_moved_ms: None,
    }
}

/// `n` VMs `{prefix}0..` on `host`.
fn vms_on(prefix: &str, host: &str, n: usize) -> Vec<MovableVm> {
    (0..n).map(|i| vm(&format!("{prefix}{i}"), host)).collect()
}

fn params(max_moves: usize) -> Params {
    Params {
        max_moves,
        margin_permille: 20,
        cooldown_ms: 1000,
        now_ms: 10_000,
    }
}

/// The VMs where the moves leave them.
fn apply(hosts: &[HostFacts], vms: &[MovableVm], moves: &[Move]) -> Vec<MovableVm> {
    let mut vms = vms.to_vec();
    for m in moves {
        assert_eq!(vms[m.vm].host, hosts[m.from].name, "moved from where it is");
        vms[m.vm].host = hosts[m.to].name.clone();
    }
    vms
}

/// The hosts holding every VM given (as [`decide`] sees them).
fn farm(hosts: &[HostFacts], vms: &[MovableVm]) -> Vec<HostFacts> {
    let mut farm = hosts.to_vec();
    for vm in vms {
        if let Some(host) = farm.iter_mut().find(|h| h.name == vm.host) {
            host.place(&vm.needs);
        }
    }
    farm
}

/// (host, group) pairs held by more than one VM (fixed groups count once).
fn doubled_groups(hosts: &[HostFacts], vms: &[MovableVm]) -> BTreeSet<(String, String)> {
    let mut count: BTreeMap<(String, String), usize> = BTreeMap::new();
    for host in hosts {
        for group in &host.groups {
            *count.entry((host.name.clone(), group.clone())).or_default() += 1;
        }
    }
    for vm in vms {
        if let Some(group) = &vm.needs.isolation {
            *count.entry((vm.host.clone(), group.clone())).or_default() += 1;
        }
    }
    count
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(pair, _)| pair)
        .collect()
}

/// Moves as (vm id, from, to) names.
fn named(hosts: &[HostFacts], vms: &[MovableVm], moves: &[Move]) -> Vec<(String, String, String)> {
    moves
        .iter()
        .map(|m| {
            (
                vms[m.vm].id.clone(),
                hosts[m.from].name.clone(),
                hosts[m.to].name.clone(),
            )
        })
        .collect()
}

#[test]
fn an_overloaded_host_gives_to_the_others_until_even() {
    let hosts = [host("a"), host("b"), host("c")];
    let vms = vms_on("v", "a", 6);
    let answer = decide(&hosts, &vms, &params(10));
    assert_eq!(answer.target_permille, 250);
    assert_eq!(answer.moves.len(), 4, "{answer:?}");
    let after = apply(&hosts, &vms, &answer.moves);
    let per_host = |name: &str| after.iter().filter(|vm| vm.host == name).count();
    assert_eq!((per_host("a"), per_host("b"), per_host("c")), (2, 2, 2));
    assert_eq!(answer.spread_after_permille, 0);
    assert_eq!(answer.spread_permille, 354);
    // The best first move: to an empty host, the first by name among equals.
    let first = &answer.moves[0];
    assert_eq!((first.from, first.to), (0, 1));
    assert_eq!(
        first.to_string(),
        "source load 75.0% → 62.5% (over the farm's 25.0%), destination 0.0% → 12.5%; spread 35.4% → 27.0%"
    );
    assert!(
        decide(&hosts, &after, &params(10)).moves.is_empty(),
        "even: nothing more"
    );
}

#[test]
fn at_most_max_moves_per_round() {
    let hosts = [host("a"), host("b"), host("c")];
    let vms = vms_on("v", "a", 6);
    assert_eq!(decide(&hosts, &vms, &params(1)).moves.len(), 1);
    assert!(decide(&hosts, &vms, &params(0)).moves.is_empty());
}

#[test]
fn a_balanced_farm_yields_nothing() {
    let hosts = [host("a"), host("b"), host("c")];
    let mut vms = vms_on("a", "a", 2);
    vms.extend(vms_on("b", "b", 2));
    vms.extend(vms_on("c", "c", 2));
    let answer = decide(&hosts, &vms, &params(10));
    assert!(answer.moves.is_empty());
    assert_eq!(answer.spread_permille, 0);
    // One VM more than the others: moving it only swaps which host has it.
    vms.push(vm("extra", "a"));
    assert!(decide(&hosts, &vms, &params(10)).moves.is_empty());
}

#[test]
fn a_gain_within_the_margin_is_not_worth_a_move() {
    // 4, 2 and 3 VMs of 1/16: moving one from a to b evens them, a gain of 5.1% of spread.
    let hosts: Vec<HostFacts> = ["a", "b", "c"]
        .iter()
        .map(|name| HostFacts::new(*name, 16, 65_536))
        .collect();
    let mut vms = vms_on("a", "a", 4);
    vms.extend(vms_on("b", "b", 2));
    vms.extend(vms_on("c", "c", 3));
    let mut wide = params(10);
    wide.margin_permille = 52;
    let answer = decide(&hosts, &vms, &wide);
    assert!(answer.moves.is_empty());
    assert_eq!(answer.spread_permille, 51);
    wide.margin_permille = 50;
    let answer = decide(&hosts, &vms, &wide);
    assert_eq!(
        named(&hosts, &vms, &answer.moves),
        [("a0".into(), "a".into(), "b".into())]
    );
    assert_eq!(answer.spread_after_permille, 0);
}

#[test]
fn isolation_groups_never_share_a_host() {
    let mut hosts = [host("a"), host("b"), host("c")];
    hosts[1].groups.insert("db".into()); // a fixed VM of db on b.
    let mut vms = vms_on("v", "a", 6);
    for vm in &mut vms {
        vm.needs.isolation = Some("db".into());
    }
    vms[0].needs.isolation = None;
    vms[1].needs.isolation = None;
    // a holds 4 db VMs already (a farm given may break the rule; the decision never does).
    let answer = decide(&hosts, &vms, &params(10));
    let after = apply(&hosts, &vms, &answer.moves);
    let to_c = after
        .iter()
        .filter(|vm| vm.host == "c" && vm.needs.isolation.is_some())
        .count();
    assert_eq!(
        to_c,
        1,
        "one db VM to c: {:?}",
        named(&hosts, &vms, &answer.moves)
    );
    assert!(
        after
            .iter()
            .filter(|vm| vm.host == "b")
            .all(|vm| vm.needs.isolation.is_none()),
        "no db VM to b, which holds one"
    );
}

#[test]
fn labels_and_room_limit_where_a_vm_goes() {
    let mut hosts = [host("a"), host("b"), HostFacts::new("small", 8, 256)];
    hosts[0].labels.insert("zone".into(), "x".into());
    hosts[2].labels.insert("zone".into(), "x".into());
    let mut vms = vms_on("v", "a", 4);
    for vm in &mut vms {
        vm.needs.on.insert("zone".into(), "x".into());
    }
    // b lacks the label, small lacks the memory.
    assert!(decide(&hosts, &vms, &params(10)).moves.is_empty());
    hosts[1].labels.insert("zone".into(), "x".into());
    let answer = decide(&hosts, &vms, &params(10));
    assert!(!answer.moves.is_empty());
    assert!(answer.moves.iter().all(|m| hosts[m.to].name == "b"));
}

#[test]
fn hosts_not_up_neither_give_nor_take_and_do_not_count() {
    let mut hosts = [host("a"), host("b"), host("c")];
    hosts[1].state = HostState::Draining;
    hosts[2].state = HostState::Down;
    let vms = vms_on("v", "a", 6);
    let answer = decide(&hosts, &vms, &params(10));
    assert!(answer.moves.is_empty());
    assert_eq!(answer.spread_permille, 0, "one counted host: no spread");
    // A draining host's VMs are its evacuation's, not rebalancing's.
    let vms = vms_on("v", "b", 6);
    hosts[2].state = HostState::Up;
    assert!(decide(&hosts, &vms, &params(10)).moves.is_empty());
}

#[test]
fn a_vm_moved_within_the_cooldown_stays() {
    let hosts = [host("a"), host("b")];
    let mut vms = vms_on("v", "a", 2);
    for vm in &mut vms {
        vm.last_moved_ms = Some(9_500);
    }
    assert!(decide(&hosts, &vms, &params(10)).moves.is_empty());
    vms[1].last_moved_ms = Some(9_000); // 1000 ms ago: the cooldown is over.
    let answer = decide(&hosts, &vms, &params(10));
    assert_eq!(
        named(&hosts, &vms, &answer.moves),
        [("v1".into(), "a".into(), "b".into())]
    );
}

#[test]
fn fewer_of_the_service_then_host_priority_break_ties() {
    // a holds 6 redis VMs; b, c and d one VM each, b's of redis: any of them gains as much.
    let mut hosts = [host("a"), host("b"), host("c"), host("d")];
    let mut vms = vms_on("r", "a", 6);
    vms.push(vm("b0", "b"));
    vms.push(vm("c0", "c"));
    vms.push(vm("d0", "d"));
    let first_to = |hosts: &[HostFacts], vms: &[MovableVm]| {
        let answer = decide(hosts, vms, &params(1));
        hosts[answer.moves[0].to].name.clone()
    };
    assert_eq!(first_to(&hosts, &vms), "b", "equals: first by name");
    for vm in &mut vms {
        if vm.host == "a" || vm.id == "b0" {
            vm.service = Some("redis".into());
        }
    }
    assert_eq!(first_to(&hosts, &vms), "c", "fewer VMs of the service");
    hosts[1].priority = 1;
    assert_eq!(
        first_to(&hosts, &vms),
        "b",
        "host priority before the service"
    );
}

// Arbitrary farms: up to 6 hosts (mostly up, some labelled zone=x, some holding fixed VMs
// and groups) and up to 24 VMs that fit where they are and keep isolation.

fn arb_host(i: usize) -> impl Strategy<Value = HostFacts> {
    (
        1u32..=16,
        prop_oneof![Just(2048u64), Just(4096), Just(8192)],
        prop_oneof![
            6 => Just(HostState::Up),
            1 => Just(HostState::Draining),
            1 => Just(HostState::Down)
        ],
        0u32..=4,
        0u64..=1024,
        any::<bool>(),
        prop::option::of(prop_oneof![Just("g1"), Just("g2")]),
        -1i32..=1,
    )
        .prop_map(
            move |(
                vcpus,
                memory_mib,
                state,
                used_vcpus,
                used_memory_mib,
                labelled,
                group,
                priority,
            )| {
                let mut host = HostFacts::new(format!("h{i}"), vcpus, memory_mib);
                host.state = state;
                host.used_vcpus = used_vcpus.min(vcpus);
                host.used_memory_mib = used_memory_mib;
                host.priority = priority;
                if labelled {
                    host.labels.insert("zone".into(), "x".into());
                }
                if let Some(group) = group {
                    host.groups.insert(group.into());
                }
                host
            },
        )
}

fn arb_hosts() -> impl Strategy<Value = Vec<HostFacts>> {
    (1usize..=6).prop_flat_map(|n| (0..n).map(arb_host).collect::<Vec<_>>())
}

fn arb_vm() -> impl Strategy<Value = (usize, MovableVm)> {
    (
        // Half of them on the first host: farms worth rebalancing.
        prop_oneof![Just(0usize), 0usize..6],
        1u32..=4,
        prop_oneof![Just(128u64), Just(256), Just(512), Just(1024)],
        prop::option::of(prop_oneof![Just("g1"), Just("g2"), Just("g3")]),
        prop::option::weighted(0.2, Just(())),
        prop::option::of(prop_oneof![Just("redis"), Just("web")]),
        prop::option::weighted(0.3, 0u64..2_000),
    )
        .prop_map(|(host, vcpus, memory_mib, group, on, service, last)| {
            let mut needs = VmNeeds::new(vcpus, memory_mib);
            needs.isolation = group.map(String::from);
            if on.is_some() {
                needs.on.insert("zone".into(), "x".into());
            }
            (
                host,
                MovableVm {
                    id: String::new(),
                    host: String::new(),
                    needs,
                    service: service.map(String::from),
                    last_moved_ms: last,
                },
            )
        })
}

/// A farm whose VMs fit where they are and keep isolation (VMs that would not are left out).
fn arb_farm() -> impl Strategy<Value = (Vec<HostFacts>, Vec<MovableVm>)> {
    (arb_hosts(), prop::collection::vec(arb_vm(), 0..24)).prop_map(|(hosts, candidates)| {
        let mut filled = hosts.clone();
        let mut vms = Vec::new();
        for (n, (at, mut vm)) in candidates.into_iter().enumerate() {
            let host = &mut filled[at % hosts.len()];
            let room = vm.needs.vcpus <= host.free_vcpus()
                && vm.needs.memory_mib <= host.free_memory_mib();
            let labels = vm
                .needs
                .on
                .iter()
                .all(|(k, v)| host.labels.get(k) == Some(v));
            let alone = vm
                .needs
                .isolation
                .as_ref()
                .is_none_or(|group| !host.groups.contains(group));
            if room && labels && alone {
                host.place(&vm.needs);
                vm.id = format!("vm{n:02}");
                vm.host = host.name.clone();
                vms.push(vm);
            }
        }
        (hosts, vms)
    })
}

fn arb_params() -> impl Strategy<Value = Params> {
    (0usize..=5, 0u32..=60, 0u64..=1_000, 1_000u64..=3_000).prop_map(
        |(max_moves, margin_permille, cooldown_ms, now_ms)| Params {
            max_moves,
            margin_permille,
            cooldown_ms,
            now_ms,
        },
    )
}

/// Params that let every VM move and every gain count, as many times as wanted.
fn eager() -> Params {
    Params {
        max_moves: usize::MAX,
        margin_permille: 0,
        cooldown_ms: 0,
        now_ms: 0,
    }
}

proptest! {
    #[test]
    fn moves_keep_capacity_isolation_labels_and_the_limit(
        (hosts, vms) in arb_farm(),
        params in arb_params(),
    ) {
        let answer = decide(&hosts, &vms, &params);
        prop_assert!(answer.moves.len() <= params.max_moves);
        let after = apply(&hosts, &vms, &answer.moves);
        for host in farm(&hosts, &after) {
            prop_assert!(host.used_vcpus <= host.vcpus, "{} over its vCPUs", host.name);
            prop_assert!(host.used_memory_mib <= host.memory_mib, "{} over its memory", host.name);
        }
        prop_assert!(doubled_groups(&hosts, &after).is_empty());
        let mut seen = BTreeSet::new();
        for m in &answer.moves {
            prop_assert!(seen.insert(m.vm), "a VM moves once per round");
            let vm = &vms[m.vm];
            prop_assert!(hosts[m.from].state == HostState::Up);
            prop_assert!(hosts[m.to].state == HostState::Up);
            prop_assert!(vm.needs.on.iter().all(|(k, v)| hosts[m.to].labels.get(k) == Some(v)));
            prop_assert!(!in_cooldown(vm, &params));
        }
    }

    #[test]
    fn the_spread_falls_by_more_than_the_margin_per_move(
        (hosts, vms) in arb_farm(),
        params in arb_params(),
    ) {
        let answer = decide(&hosts, &vms, &params);
        let before = spread(&farm(&hosts, &vms));
        let after = spread(&farm(&hosts, &apply(&hosts, &vms, &answer.moves)));
        prop_assert!(after <= before + 1e-9, "never worse: {before} → {after}");
        let margin = f64::from(params.margin_permille) / 1000.0;
        let needed = margin * answer.moves.len() as f64;
        prop_assert!(answer.moves.is_empty() || before - after > needed - 1e-9,
            "{} moves took {before} to {after}", answer.moves.len());
        prop_assert!(answer.spread_after_permille.abs_diff((after * 1000.0).round() as u64) <= 1);
        for pair in answer.moves.windows(2) {
            prop_assert_eq!(pair[0].spread.1, pair[1].spread.0);
        }
        if before * 1000.0 <= f64::from(params.margin_permille) {
            prop_assert!(answer.moves.is_empty(), "a balanced farm yields nothing");
        }
    }

    #[test]
    fn deciding_again_never_moves_a_moved_vm(
        (hosts, vms) in arb_farm(),
        params in arb_params(),
    ) {
        // Whatever the cooldown: the second round ignores it.
        let first = decide(&hosts, &vms, &params);
        let moved: BTreeSet<usize> = first.moves.iter().map(|m| m.vm).collect();
        let after = apply(&hosts, &vms, &first.moves);
        let mut again = params;
        again.cooldown_ms = 0;
        let second = decide(&hosts, &after, &again);
        for m in &second.moves {
            prop_assert!(!moved.contains(&m.vm), "{} moved back", vms[m.vm].id);
        }
    }

    #[test]
    fn rounds_end_and_move_each_vm_at_most_once((hosts, vms) in arb_farm(), k in 1usize..=3) {
        let mut params = eager();
        params.max_moves = k;
        let mut now = vms.clone();
        let mut moved = BTreeSet::new();
        for _ in 0..=vms.len() {
            let answer = decide(&hosts, &now, &params);
            if answer.moves.is_empty() {
                return Ok(());
            }
            for m in &answer.moves {
                prop_assert!(moved.insert(m.vm), "{} moved twice", now[m.vm].id);
            }
            now = apply(&hosts, &now, &answer.moves);
        }
        prop_assert!(false, "still moving after a round per VM");
    }

    #[test]
    fn the_order_of_hosts_and_vms_does_not_matter(
        (hosts, vms) in arb_farm(),
        params in arb_params(),
    ) {
        let answer = decide(&hosts, &vms, &params);
        let mut hosts_r = hosts.clone();
        hosts_r.reverse();
        let mut vms_r = vms.clone();
        vms_r.reverse();
        let reversed = decide(&hosts_r, &vms_r, &params);
        prop_assert_eq!(named(&hosts, &vms, &answer.moves), named(&hosts_r, &vms_r, &reversed.moves));
    }

    #[test]
    fn evenly_loaded_hosts_yield_nothing(
        n in 2usize..=6,
        per_host in 0usize..=4,
        vcpus in 1u32..=4,
        params in arb_params(),
    ) {
        let hosts: Vec<HostFacts> = (0..n).map(|i| host(&format!("h{i}"))).collect();
        let vms: Vec<MovableVm> = hosts
            .iter()
            .flat_map(|h| {
                vms_on(&h.name, &h.name, per_host).into_iter().map(|mut vm| {
                    vm.needs.vcpus = vcpus.min(8 / per_host.max(1) as u32);
                    vm
                })
            })
            .collect();
        prop_assert!(decide(&hosts, &vms, &params).moves.is_empty());
    }
}
