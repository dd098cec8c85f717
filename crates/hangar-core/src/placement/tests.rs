use super::*;
use proptest::prelude::*;

fn vm(vcpus: u32, memory_mib: u64, priority: VmPriority) -> VmNeeds {
    VmNeeds {
        priority,
        ..VmNeeds::new(vcpus, memory_mib)
    }
}

fn isolated(group: &str) -> VmNeeds {
    VmNeeds {
        isolation: Some(group.into()),
        ..VmNeeds::new(1, 512)
    }
}

fn on(vm: VmNeeds, labels: &[(&str, &str)]) -> VmNeeds {
    VmNeeds {
        on: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..vm
    }
}

/// An 8-vCPU, 8 GiB host with `used_vcpus` vCPUs and GiB used.
fn host(name: &str, used_vcpus: u32, cost: u32) -> HostFacts {
    HostFacts {
        used_vcpus,
        used_memory_mib: u64::from(used_vcpus) * 1024,
        cost,
        ..HostFacts::new(name, 8, 8192)
    }
}

fn chosen<'a>(hosts: &'a [HostFacts], vm: &VmNeeds) -> &'a str {
    &hosts[choose_host(hosts, vm).unwrap().index].name
}

#[test]
fn a_draining_host_takes_nothing_new_and_no_move() {
    let mut draining = host("a", 0, 1);
    draining.state = HostState::Draining;
    let hosts = [draining.clone(), host("b", 6, 5)];
    let vm = VmNeeds::new(1, 512);
    assert_eq!(
        chosen(&hosts, &vm),
        "b",
        "the busier, dearer host that is up"
    );
    assert_eq!(
        check_destination(&draining, &vm),
        Err(Exclusion::NotUp(HostState::Draining))
    );
    let only = [draining];
    let err = choose_host(&only, &vm).unwrap_err();
    assert_eq!(err.ruled_out.not_up, 1, "{err}");
}

#[test]
fn a_destination_is_checked_by_the_placement_rules_in_order() {
    let vm = on(isolated("db"), &[("zone", "a")]);
    let mut dest = host("d", 0, 1);
    assert!(matches!(
        check_destination(&dest, &vm),
        Err(Exclusion::Label { .. })
    ));
    dest.labels.insert("zone".into(), "a".into());
    assert_eq!(check_destination(&dest, &vm), Ok(()));
    dest.groups.insert("db".into());
    assert_eq!(
        check_destination(&dest, &vm),
        Err(Exclusion::Isolation("db".into()))
    );
    dest.groups.clear();
    dest.used_memory_mib = dest.memory_mib;
    assert!(matches!(
        check_destination(&dest, &vm),
        Err(Exclusion::NoRoom { .. })
    ));
    dest.state = HostState::Down;
    assert_eq!(
        check_destination(&dest, &vm),
        Err(Exclusion::NotUp(HostState::Down))
    );
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
        let placement = choose_host(&hosts, &vm(1, 512, priority)).unwrap();
        assert_eq!(hosts[placement.index].name, "owned");
        assert_eq!(placement.decided_by, Decision::HostPriority);
    }
}

#[test]
fn the_reported_load_counts_with_the_shares() {
    // Equal shares; b's machine is busy with something else.
    let mut hosts = [host("a", 2, 1), host("b", 2, 1)];
    hosts[1].load = 6.0; // 6 of 8 CPUs: 75%, above its 3/8 share.
    let placement = choose_host(&hosts, &vm(1, 512, VmPriority::High)).unwrap();
    assert_eq!(hosts[placement.index].name, "a");
    assert_eq!(placement.decided_by, Decision::LeastLoaded);
    assert_eq!(hosts[1].load_after(&vm(1, 512, VmPriority::High)), 750);
    // A load the host cannot have reported sensibly is not counted, or counts as full.
    hosts[1].load = f64::NAN;
    assert_eq!(hosts[1].load_after(&VmNeeds::new(1, 512)), 375);
    hosts[1].load = f64::INFINITY;
    assert_eq!(hosts[1].load_after(&VmNeeds::new(1, 512)), u64::MAX);
    hosts[1].cpus = 0;
    assert_eq!(hosts[1].load_after(&VmNeeds::new(1, 512)), 375);
}

#[test]
fn the_template_beats_the_image_which_beats_nothing_among_about_equal_loads() {
    let mut hosts = [host("a", 2, 1), host("b", 2, 1), host("c", 2, 1)];
    let need = vm(1, 512, VmPriority::Normal);
    assert_eq!(chosen(&hosts, &need), "a");
    assert_eq!(
        choose_host(&hosts, &need).unwrap().decided_by,
        Decision::Name
    );
    hosts[1].has_image = true;
    assert_eq!(chosen(&hosts, &need), "b");
    hosts[2].has_template = true;
    hosts[2].used_memory_mib += 200; // a little busier: still the same load step
    let placement = choose_host(&hosts, &need).unwrap();
    assert_eq!(hosts[placement.index].name, "c");
    assert_eq!(
        (placement.decided_by, placement.locality),
        (Decision::Locality, Locality::Template)
    );
    assert!(
        placement
            .to_string()
            .starts_with("holds the template among 3")
    );
    // A host much less loaded wins over locality.
    hosts[0].used_vcpus = 0;
    hosts[0].used_memory_mib = 0;
    assert_eq!(chosen(&hosts, &need), "a");
}

#[test]
fn isolation_is_anti_affinity() {
    let mut hosts = [host("a", 0, 1), host("b", 0, 1), host("c", 0, 1)];
    let db = isolated("db");
    let mut used = BTreeSet::new();
    for _ in 0..3 {
        let i = choose_host(&hosts, &db).unwrap().index;
        assert!(used.insert(i), "two db VMs on {}", hosts[i].name);
        hosts[i].place(&db);
    }
    let err = choose_host(&hosts, &db).unwrap_err();
    assert_eq!(err.ruled_out.isolation, 3);
    assert_eq!(
        err.to_string(),
        "no host can run a VM of 1 vCPU and 512 MiB in isolation group db: 3 ruled out: \
         a (isolation group db), b (isolation group db), c (isolation group db)"
    );
    // Other groups and ungrouped VMs still go anywhere.
    assert!(choose_host(&hosts, &isolated("web")).is_ok());
    assert!(choose_host(&hosts, &VmNeeds::new(1, 512)).is_ok());
    assert!(hosts.iter().all(|h| h.groups.len() == 1));
}

#[test]
fn label_constraints_must_all_match() {
    let mut hosts = [host("a", 0, 1), host("b", 0, 1), host("c", 0, 1)];
    hosts[0].labels.insert("zone".into(), "eu".into());
    hosts[1].labels.insert("zone".into(), "us".into());
    hosts[1].labels.insert("disk".into(), "ssd".into());
    hosts[2].labels.insert("zone".into(), "us".into());
    let us = on(VmNeeds::new(1, 512), &[("zone", "us")]);
    let us_ssd = on(VmNeeds::new(1, 512), &[("zone", "us"), ("disk", "ssd")]);
    assert_eq!(chosen(&hosts, &us), "b");
    let placement = choose_host(&hosts, &us_ssd).unwrap();
    assert_eq!(hosts[placement.index].name, "b");
    assert_eq!(
        placement.to_string(),
        "only eligible host (load 13%, cost 1); 2 ruled out: a (no label disk), c (no label disk)"
    );
    let eu_ssd = on(VmNeeds::new(1, 512), &[("zone", "eu"), ("disk", "ssd")]);
    let err = choose_host(&hosts, &eu_ssd).unwrap_err();
    assert_eq!(err.ruled_out.labels, 3);
    assert!(
        err.to_string()
            .contains("b (label zone=us, not eu), c (no label disk)"),
        "{err}"
    );
}

#[test]
fn every_host_is_labelled_with_its_name() {
    let mut hosts = [host("a", 0, 1), host("b", 6, 5)];
    // The busier, dearer host, because it is the one named; a label of that key the host
    // was given does not stand in for its name.
    hosts[0].labels.insert(HOST_LABEL.into(), "b".into());
    assert_eq!(
        chosen(&hosts, &on(VmNeeds::new(1, 512), &[(HOST_LABEL, "b")])),
        "b"
    );
    let err = choose_host(&hosts, &on(VmNeeds::new(1, 512), &[(HOST_LABEL, "c")])).unwrap_err();
    assert_eq!(err.ruled_out.labels, 2);
    assert!(
        err.to_string().contains("a (label hangar.host=a, not c)"),
        "{err}"
    );
}

#[test]
fn hosts_not_up_are_never_chosen() {
    let mut hosts = [
        host("a", 0, 1),
        host("b", 0, 1),
        host("c", 0, 1),
        host("d", 7, 9),
    ];
    hosts[0].state = HostState::Draining;
    hosts[1].state = HostState::Down;
    hosts[2].state = HostState::Lost;
    let placement = choose_host(&hosts, &vm(1, 512, VmPriority::High)).unwrap();
    assert_eq!(placement.index, 3);
    assert_eq!(
        placement.to_string(),
        "only eligible host (load 100%, cost 9); 3 ruled out: a (draining), b (down), c (lost)"
    );
}

#[test]
fn the_explanation_names_the_deciding_rule_locality_and_ruled_out_hosts() {
    let mut hosts = [
        host("a", 1, 1),
        host("b", 7, 1),
        host("c", 0, 1),
        host("d", 3, 1),
        host("e", 5, 1),
    ];
    hosts[1].used_memory_mib = 7936; // 256 MiB free
    hosts[2].groups.insert("db".into());
    hosts[0].has_template = true;
    let mut need = vm(1, 512, VmPriority::High);
    need.isolation = Some("db".into());
    let placement = choose_host(&hosts, &need).unwrap();
    assert_eq!(hosts[placement.index].name, "a");
    assert_eq!(
        placement.to_string(),
        "least loaded among 3 eligible hosts (load 25%, cost 1); holds the template; \
         2 ruled out: c (isolation group db), b (no room: 256 MiB free)"
    );
    hosts[0].has_template = false;
    hosts[3].cost = 0;
    hosts[3].has_image = true;
    need.priority = VmPriority::Normal;
    assert_eq!(
        choose_host(&hosts, &need).unwrap().to_string(),
        "cheapest among 3 eligible hosts (load 50%, cost 0); holds the image; \
         2 ruled out: c (isolation group db), b (no room: 256 MiB free)"
    );
    need.priority = VmPriority::Low;
    hosts[3].cost = 1;
    let placement = choose_host(&hosts, &need).unwrap();
    assert_eq!(hosts[placement.index].name, "e");
    assert_eq!(placement.decided_by, Decision::MostLoaded);
}

#[test]
fn no_room_says_what_is_short() {
    let full = |free_vcpus, free_memory_mib| Exclusion::NoRoom {
        free_vcpus,
        free_memory_mib,
        vcpus: 2,
        memory_mib: 1024,
    };
    assert_eq!(full(1, 4096).to_string(), "no room: 1 vCPU free");
    assert_eq!(full(4, 256).to_string(), "no room: 256 MiB free");
    assert_eq!(full(0, 0).to_string(), "no room: 0 vCPUs and 0 MiB free");
}

#[test]
fn no_host_says_why_and_stays_short_for_a_thousand_hosts() {
    let mut hosts = [host("full", 8, 1), host("down", 0, 1), host("ok", 0, 1)];
    hosts[1].state = HostState::Down;
    hosts[2].memory_mib = 256;
    let err = choose_host(&hosts, &vm(1, 512, VmPriority::Normal)).unwrap_err();
    assert_eq!(
        (
            err.ruled_out.not_up,
            err.ruled_out.room,
            err.ruled_out.total()
        ),
        (1, 2, 3)
    );
    assert_eq!(
        err.to_string(),
        "no host can run a VM of 1 vCPU and 512 MiB: 3 ruled out: down (down), \
         full (no room: 0 vCPUs and 0 MiB free), ok (no room: 256 MiB free)"
    );
    let err = choose_host(&[], &vm(1, 1, VmPriority::Low)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no host can run a VM of 1 vCPU and 1 MiB: no hosts are known"
    );

    let farm: Vec<HostFacts> = (0..1000)
        .map(|i| {
            let mut h = host(&format!("host-{i:04}"), 8, 1);
            match i % 10 {
                0 => h.state = HostState::Lost,
                1 => {
                    h.groups.insert("db".into());
                }
                2 => {
                    h.used_vcpus = 0;
                    h.used_memory_mib = 0;
                    h.labels.insert("zone".into(), "us".into());
                }
                _ => {}
            }
            h
        })
        .collect();
    let need = on(isolated("db"), &[("zone", "us")]);
    let mut need_nothing_fits = need.clone();
    need_nothing_fits.vcpus = 9;
    let err = choose_host(&farm, &need_nothing_fits).unwrap_err();
    assert_eq!(err.ruled_out.total(), 1000);
    assert_eq!(err.ruled_out.examples.len(), 9);
    assert_eq!(
        err.to_string(),
        "no host can run a VM of 9 vCPUs and 512 MiB in isolation group db on zone=us: \
         1000 ruled out: 100 not up (e.g. host-0000, host-0010, host-0020), 800 without the \
         labels (e.g. host-0001, host-0003, host-0004), 100 without room (e.g. host-0002, \
         host-0012, host-0022)"
    );
    let placement = choose_host(&farm, &need).unwrap();
    assert_eq!(placement.eligible, 100);
    assert!(placement.to_string().len() < 300, "{placement}");
}

fn arb_host(name: String) -> impl Strategy<Value = HostFacts> {
    (
        (
            prop::sample::select(vec![
                HostState::Up,
                HostState::Up,
                HostState::Up,
                HostState::Draining,
                HostState::Down,
                HostState::Lost,
            ]),
            1u32..16,
            1u64..16_384,
            0u32..20,
            0u64..20_000,
            0u32..16,
            0.0f64..24.0,
        ),
        (
            0u32..4,
            -1i32..2,
            prop::option::of(prop::sample::select(vec!["eu", "us"])),
            prop::collection::btree_set(prop::sample::select(vec!["a", "b"]), 0..2),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            move |(
                (state, vcpus, memory_mib, used, used_mem, cpus, load),
                (cost, priority, zone, groups, image, template),
            )| {
                HostFacts {
                    name: name.clone(),
                    state,
                    vcpus,
                    memory_mib,
                    used_vcpus: used,
                    used_memory_mib: used_mem,
                    cpus,
                    load,
                    cost,
                    priority,
                    labels: zone
                        .map(|zone| [("zone".to_string(), zone.to_string())].into())
                        .unwrap_or_default(),
                    groups: groups.into_iter().map(str::to_owned).collect(),
                    has_image: image,
                    has_template: template,
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
        prop::option::of(prop::sample::select(vec!["eu", "us"])),
    )
        .prop_map(|(vcpus, memory_mib, priority, isolation, zone)| VmNeeds {
            vcpus,
            memory_mib,
            priority,
            isolation: isolation.map(str::to_owned),
            on: zone
                .map(|zone| [("zone".to_string(), zone.to_string())].into())
                .unwrap_or_default(),
        })
}

fn eligible(host: &HostFacts, vm: &VmNeeds) -> bool {
    host.state == HostState::Up
        && host.fits(vm)
        && vm.on.iter().all(|(k, v)| host.labels.get(k) == Some(v))
        && vm
            .isolation
            .as_ref()
            .is_none_or(|g| !host.groups.contains(g))
}

proptest! {
    #[test]
    fn the_choice_is_eligible_and_best(hosts in arb_hosts(), vm in arb_vm()) {
        match choose_host(&hosts, &vm) {
            Ok(placement) => {
                let i = placement.index;
                prop_assert!(eligible(&hosts[i], &vm));
                prop_assert_eq!(placement.eligible, hosts.iter().filter(|h| eligible(h, &vm)).count());
                prop_assert_eq!(placement.ruled_out.total(), hosts.len() - placement.eligible);
                for other in hosts.iter().filter(|h| eligible(h, &vm)) {
                    prop_assert!(key(&hosts[i], &vm) <= key(other, &vm));
                }
                prop_assert_eq!(placement.decided_by == Decision::Only, placement.eligible == 1);
            }
            Err(no_host) => {
                prop_assert!(!hosts.iter().any(|h| eligible(h, &vm)));
                prop_assert_eq!(no_host.ruled_out.total(), hosts.len());
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
        let answer = |hosts: &[HostFacts]| match choose_host(hosts, &vm) {
            Ok(placement) => Ok((hosts[placement.index].name.clone(), placement.to_string())),
            Err(no_host) => Err(no_host.to_string()),
        };
        prop_assert_eq!(answer(&hosts), answer(&rotated));
    }

    #[test]
    fn placing_until_full_never_overcommits_nor_breaks_isolation(
        mut hosts in arb_hosts(),
        vms in prop::collection::vec(arb_vm(), 1..40),
    ) {
        for host in &mut hosts {
            host.used_vcpus = host.used_vcpus.min(host.vcpus);
            host.used_memory_mib = host.used_memory_mib.min(host.memory_mib);
        }
        // VMs of each group on each host, the groups hosts start with counted once.
        let mut members: Vec<BTreeMap<String, u32>> = hosts
            .iter()
            .map(|h| h.groups.iter().map(|g| (g.clone(), 1)).collect())
            .collect();
        for vm in &vms {
            if let Ok(placement) = choose_host(&hosts, vm) {
                let host = &hosts[placement.index];
                prop_assert!(host.state == HostState::Up);
                prop_assert!(vm.on.iter().all(|(k, v)| host.labels.get(k) == Some(v)));
                hosts[placement.index].place(vm);
                if let Some(group) = &vm.isolation {
                    *members[placement.index].entry(group.clone()).or_default() += 1;
                }
            }
        }
        for (host, members) in hosts.iter().zip(&members) {
            prop_assert!(host.used_vcpus <= host.vcpus && host.used_memory_mib <= host.memory_mib);
            prop_assert!(members.values().all(|&n| n <= 1), "{}: {:?}", host.name, members);
        }
    }
}
