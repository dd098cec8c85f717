use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::placement::check_destination;

/// An up 8-vCPU, 8 GiB host.
fn host(name: &str) -> HostFacts {
    HostFacts::new(name, 8, 8192)
}

fn small() -> VmNeeds {
    VmNeeds::new(1, 512)
}

fn isolated(group: &str) -> VmNeeds {
    VmNeeds {
        isolation: Some(group.into()),
        ..small()
    }
}

fn chosen(destinations: &mut Destinations, vm: &VmNeeds) -> String {
    destinations.choose(vm).unwrap().host
}

#[test]
fn vms_spread_over_the_other_hosts_counting_those_already_sent() {
    let mut a = host("a");
    a.used_vcpus = 4;
    a.used_memory_mib = 2048;
    let mut destinations = Destinations::new(vec![a, host("b"), host("c")], "a");
    let mut count = BTreeMap::<String, usize>::new();
    for _ in 0..4 {
        *count
            .entry(chosen(&mut destinations, &small()))
            .or_default() += 1;
    }
    assert_eq!(count, BTreeMap::from([("b".into(), 2), ("c".into(), 2)]));
    let b = &destinations.hosts()[1];
    assert_eq!((b.used_vcpus, b.used_memory_mib), (2, 1024));
}

#[test]
fn the_source_is_never_chosen_even_when_it_is_up_and_emptiest() {
    let mut b = host("b");
    b.used_vcpus = 7;
    let mut destinations = Destinations::new(vec![host("a"), b], "a");
    assert_eq!(chosen(&mut destinations, &small()), "b");
    let err = destinations.choose(&small()).unwrap_err();
    assert_eq!(err.ruled_out.not_up, 1, "{err}");
    assert_eq!(err.ruled_out.room, 1, "{err}");
}

#[test]
fn draining_down_and_lost_hosts_take_nothing() {
    let mut hosts = vec![host("a"), host("b"), host("c"), host("d"), host("e")];
    hosts[1].state = HostState::Draining;
    hosts[2].state = HostState::Down;
    hosts[3].state = HostState::Lost;
    let mut destinations = Destinations::new(hosts, "a");
    for _ in 0..3 {
        assert_eq!(chosen(&mut destinations, &small()), "e");
    }
}

#[test]
fn an_isolation_group_never_lands_twice_on_one_host() {
    let mut destinations = Destinations::new(vec![host("a"), host("b"), host("c")], "a");
    let first = chosen(&mut destinations, &isolated("db"));
    let second = chosen(&mut destinations, &isolated("db"));
    assert_ne!(first, second);
    let err = destinations.choose(&isolated("db")).unwrap_err();
    assert_eq!(err.ruled_out.isolation, 2, "{err}");
    assert!(err.to_string().contains("isolation group db"), "{err}");
    // Other VMs still go.
    assert!(destinations.choose(&small()).is_ok());
}

#[test]
fn a_group_already_on_a_host_keeps_its_vms_away() {
    let mut b = host("b");
    b.groups.insert("db".into());
    let mut destinations = Destinations::new(vec![host("a"), b, host("c")], "a");
    assert_eq!(chosen(&mut destinations, &isolated("db")), "c");
}

#[test]
fn room_runs_out_and_a_failed_move_gives_it_back() {
    let mut b = host("b");
    b.used_memory_mib = 8192 - 1024;
    let mut destinations = Destinations::new(vec![host("a"), b], "a");
    assert_eq!(chosen(&mut destinations, &small()), "b");
    assert_eq!(chosen(&mut destinations, &small()), "b");
    let err = destinations.choose(&small()).unwrap_err();
    assert_eq!(err.ruled_out.room, 1, "{err}");
    destinations.release("b", &small());
    assert_eq!(chosen(&mut destinations, &small()), "b");
}

#[test]
fn a_released_group_still_rules_its_host_out() {
    let mut destinations = Destinations::new(vec![host("a"), host("b")], "a");
    assert_eq!(chosen(&mut destinations, &isolated("db")), "b");
    destinations.release("b", &isolated("db"));
    assert!(destinations.choose(&isolated("db")).is_err());
}

#[test]
fn labels_count_even_though_moved_vms_rarely_carry_them() {
    let mut b = host("b");
    b.labels.insert("zone".into(), "x".into());
    let mut destinations = Destinations::new(vec![host("a"), b, host("c")], "a");
    let vm = VmNeeds {
        on: BTreeMap::from([("zone".into(), "x".into())]),
        ..small()
    };
    assert_eq!(chosen(&mut destinations, &vm), "b");
}

fn farm() -> impl Strategy<Value = Vec<HostFacts>> {
    prop::collection::vec(
        (
            1u32..16,
            512u64..8192,
            0u32..4,
            prop::option::of(0usize..3),
            0u8..4,
        ),
        2..6,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (vcpus, memory, used, group, state))| {
                let mut host = HostFacts::new(format!("h{i}"), vcpus, memory);
                host.used_vcpus = used.min(vcpus);
                if let Some(group) = group {
                    host.groups.insert(format!("g{group}"));
                }
                host.state = match state {
                    0 => HostState::Draining,
                    1 => HostState::Down,
                    _ => HostState::Up,
                };
                host
            })
            .collect()
    })
}

fn vms() -> impl Strategy<Value = Vec<VmNeeds>> {
    prop::collection::vec((1u32..4, 64u64..2048, prop::option::of(0usize..3)), 0..12).prop_map(
        |specs| {
            specs
                .into_iter()
                .map(|(vcpus, memory, group)| VmNeeds {
                    isolation: group.map(|g| format!("g{g}")),
                    ..VmNeeds::new(vcpus, memory)
                })
                .collect()
        },
    )
}

proptest! {
    /// Every choice is a host other than the source that placement's rules accepted with
    /// the VMs sent before it counted; no host ends over its size or with a group twice;
    /// a VM refused really fits nowhere.
    #[test]
    fn every_choice_keeps_placement_rules(hosts in farm(), vms in vms()) {
        let source = hosts[0].name.clone();
        let mut shadow = hosts.clone();
        let mut destinations = Destinations::new(hosts.clone(), &source);
        for vm in &vms {
            match destinations.choose(vm) {
                Ok(chosen) => {
                    prop_assert_ne!(&chosen.host, &source);
                    let at = shadow.iter().position(|h| h.name == chosen.host).unwrap();
                    prop_assert!(check_destination(&shadow[at], vm).is_ok());
                    shadow[at].place(vm);
                }
                Err(_) => {
                    for host in shadow.iter().filter(|h| h.name != source) {
                        prop_assert!(check_destination(host, vm).is_err());
                    }
                }
            }
        }
        for (host, before) in shadow.iter().zip(&hosts) {
            let added = host.used_vcpus - before.used_vcpus;
            prop_assert!(added == 0 || host.used_vcpus <= host.vcpus);
            prop_assert!(host.used_memory_mib - before.used_memory_mib == 0
                || host.used_memory_mib <= host.memory_mib);
        }
        prop_assert_eq!(destinations.hosts().iter().skip(1).cloned().collect::<Vec<_>>(),
            shadow.iter().skip(1).cloned().collect::<Vec<_>>());
    }
}
