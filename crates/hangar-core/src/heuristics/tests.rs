use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::matching::{MemoryRange, OsRequirement};

fn ask(vcpus: u32, min: u32, max: u32, os: &str, apps: &[&str]) -> Ask {
    let (name, version) = match os.split_once('@') {
        Some((name, version)) => (name, Some(version.to_owned())),
        None => (os, None),
    };
    Ask {
        machine: MachineRequest {
            vcpus,
            memory_mib: MemoryRange { min, max },
            os: OsRequirement {
                name: name.into(),
                min_version: version,
            },
            apps: apps.iter().map(|a| a.to_string()).collect(),
            disk_mib: None,
        },
        settings: BTreeMap::new(),
        exact_size: false,
    }
}

fn pool_vm(id: &str, vcpus: u32, memory_mib: u32, os: Option<&str>, apps: &[&str]) -> PoolVm {
    PoolVm {
        id: id.into(),
        vcpus,
        memory_mib,
        os: os.map(|os| {
            let (name, version) = os.split_once(' ').unwrap_or((os, "1.35"));
            (name.to_owned(), version.to_owned())
        }),
        apps: apps.iter().map(|a| a.to_string()).collect(),
        sliceable: true,
    }
}

fn hosts() -> Vec<HostLimit> {
    vec![HostLimit {
        name: "local".into(),
        vcpus: 2,
        memory_mib: 24_000,
    }]
}

fn verdict(ask: &Ask, supply: &Supply) -> Verdict {
    let catalog = Catalog::demo();
    check(&Input {
        ask,
        catalog: &catalog,
        hosts: &hosts(),
        supply,
    })
}

fn codes(verdict: &Verdict) -> Vec<ProblemCode> {
    verdict.errors().map(|p| p.code).collect()
}

#[test]
fn a_sound_request_is_ok_and_chooses_a_build_without_pool() {
    let v = verdict(
        &ask(1, 128, 128, "busybox@1.35", &["http-static"]),
        &Supply::default(),
    );
    assert!(v.ok, "{:?}", v.problems);
    let chosen = v.chosen.unwrap();
    assert_eq!(chosen.kind, CandidateKind::Build);
    assert_eq!(chosen.source, "new image http-static");
    assert!(
        chosen.reason.starts_with("build a new VM"),
        "{}",
        chosen.reason
    );
}

#[test]
fn postgres_below_its_minimum_names_the_floor_and_the_pool_vm() {
    let mut a = ask(1, 256, 256, "debian-12", &["postgresql"]);
    a.settings.insert("password".into(), "secret".into());
    let supply = Supply {
        pool: vec![pool_vm(
            "vm-big",
            1,
            512,
            Some("debian-12 12"),
            &["postgresql"],
        )],
        ..Supply::default()
    };
    let v = verdict(&a, &supply);
    assert!(!v.ok);
    let problem = v
        .errors()
        .find(|p| p.code == ProblemCode::MemoryBelowAppMin)
        .unwrap();
    assert_eq!(
        problem.message,
        "postgresql needs at least 384 MiB, 256 asked"
    );
    assert_eq!(
        problem.suggestion,
        "ask for --memory 384, or take the 512 MiB pool VM (vm-big: --memory 512)"
    );
    assert_eq!(
        v.chosen, None,
        "nothing is chosen for a request with hard problems"
    );
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let mut a = ask(0, 32, 32, "debain", &["postgresq", "http-static"]);
    a.machine.disk_mib = Some(0);
    let v = verdict(&a, &Supply::default());
    let found = codes(&v);
    for code in [
        ProblemCode::VcpusZero,
        ProblemCode::MemoryBelowVmMin,
        ProblemCode::UnknownOs,
        ProblemCode::UnknownApp,
        ProblemCode::DiskBelowMin,
    ] {
        assert!(found.contains(&code), "{code:?} missing from {found:?}");
    }
    let unknown_os = v
        .errors()
        .find(|p| p.code == ProblemCode::UnknownOs)
        .unwrap();
    assert_eq!(
        unknown_os.suggestion,
        "ask for --os busybox or --os debian-12"
    );
    let unknown_app = v
        .errors()
        .find(|p| p.code == ProblemCode::UnknownApp)
        .unwrap();
    assert_eq!(unknown_app.suggestion, "ask for --app postgresql");
}

#[test]
fn each_kind_of_problem() {
    let none = Supply::default();
    let case = |a: Ask| codes(&verdict(&a, &none));
    assert_eq!(
        case(ask(65, 128, 128, "busybox", &[])),
        [ProblemCode::VcpusOverMax]
    );
    assert_eq!(
        case(ask(4, 128, 128, "busybox", &[])),
        [ProblemCode::VcpusOverHost]
    );
    assert_eq!(
        case(ask(1, 100_000, 100_000, "busybox", &[])),
        [ProblemCode::MemoryOverHost]
    );
    assert_eq!(
        case(ask(1, 300_000, 300_000, "busybox", &[])),
        [ProblemCode::MemoryOverMax]
    );
    assert_eq!(
        case(ask(1, 256, 128, "busybox", &[])),
        [ProblemCode::MemoryRangeEmpty]
    );
    assert_eq!(
        case(ask(1, 96, 96, "debian-12", &[])),
        [ProblemCode::MemoryBelowOsMin]
    );
    assert_eq!(
        case(ask(1, 128, 128, "busybox@1.36", &[])),
        [ProblemCode::OsTooOld]
    );
    assert_eq!(
        case(ask(1, 128, 128, "busybox@1.x", &[])),
        [ProblemCode::BadVersion]
    );
    assert_eq!(
        case(ask(1, 256, 256, "busybox", &["redis"])),
        [ProblemCode::AppNotOnOs]
    );
    let mut missing = ask(1, 384, 384, "debian-12", &["postgresql"]);
    assert_eq!(case(missing.clone()), [ProblemCode::MissingSetting]);
    missing.settings.insert("password".into(), "pw".into());
    missing.settings.insert("user".into(), "two words".into());
    assert_eq!(case(missing), [ProblemCode::BadSetting]);
    let mut disk = ask(1, 384, 384, "debian-12", &["redis"]);
    disk.machine.disk_mib = Some(100);
    let v = verdict(&disk, &none);
    assert_eq!(codes(&v), [ProblemCode::DiskBelowMin]);
    assert_eq!(v.problems[0].suggestion, "ask for --disk 576 or more");
}

#[test]
fn conflicting_apps_are_named() {
    let text = format!(
        "{}\n[app.full-page]\nrequires = [\"nginx-full\"]\n[[app.full-page.port]]\nname = \"http\"\nguest = 8080\n[[app.full-page.process]]\nname = \"nginx\"\nargv = [\"nginx\"]\n[app.full-page.ready]\nchecks = [{{ tcp = {{ port = \"http\" }} }}]\n[service.nginx-full]\napps = [\"full-page\"]\nmemory_mib = 256\n",
        crate::catalog::DEMO_CATALOG
    );
    let catalog = Catalog::from_toml(&text).unwrap();
    let a = ask(1, 256, 256, "debian-12", &["nginx", "nginx-full"]);
    let v = check(&Input {
        ask: &a,
        catalog: &catalog,
        hosts: &hosts(),
        supply: &Supply::default(),
    });
    let conflict = v
        .errors()
        .find(|p| p.code == ProblemCode::Conflict)
        .unwrap();
    assert!(
        conflict
            .message
            .contains("nginx-light and software nginx-full conflict"),
        "{}",
        conflict.message
    );
    assert!(
        conflict
            .suggestion
            .starts_with("request them on separate VMs")
    );
}

#[test]
fn apps_on_the_same_guest_port_clash() {
    let a = ask(1, 256, 256, "busybox", &["http-static", "http-counter"]);
    let v = verdict(&a, &Supply::default());
    let clash = v.errors().find(|p| p.code == ProblemCode::Clash).unwrap();
    assert_eq!(
        clash.message,
        "http-counter and http-static cannot share a VM: http-counter and http-static both listen on guest port 80"
    );
    assert!(clash.suggestion.starts_with("request them on separate VMs"));
}

#[test]
fn exact_size_slices_a_shell_and_blocks_what_cannot_be_sliced() {
    let mut a = ask(1, 128, 128, "busybox@1.35", &["http-static"]);
    a.exact_size = true;
    let shell = pool_vm("vm-shell", 1, 256, None, &[]);
    let mut clone = pool_vm("vm-clone", 1, 256, Some("busybox 1.35"), &["http-static"]);
    clone.sliceable = false;
    let supply = Supply {
        pool: vec![clone, shell],
        images: ["http-static".to_string()].into(),
        ..Supply::default()
    };
    let v = verdict(&a, &supply);
    assert!(v.ok, "{:?}", v.problems);
    let chosen = v.chosen_candidate().unwrap();
    assert_eq!(
        (chosen.kind, chosen.source.as_str()),
        (CandidateKind::Partial, "vm-shell")
    );
    assert_eq!(chosen.slice_to, Some((1, 128)));
    let clone = v
        .candidates
        .iter()
        .find(|c| c.source == "vm-clone")
        .unwrap();
    assert!(
        clone
            .blocked
            .as_deref()
            .unwrap()
            .starts_with("cannot be sliced")
    );
    assert!(
        v.chosen
            .unwrap()
            .reason
            .contains("sliced to 1 vCPUs and 128 MiB")
    );

    // Without exact size the clone, resumed at once, wins.
    a.exact_size = false;
    let v = verdict(&a, &supply);
    assert_eq!(v.chosen.unwrap().source, "vm-clone");
}

#[test]
fn install_at_deploy_is_ranked_when_the_server_has_it() {
    let mut a = ask(1, 256, 256, "debian-12", &["redis"]);
    a.settings.clear();
    let mut supply = Supply {
        pool: vec![pool_vm("vm-shell", 1, 256, None, &[])],
        images: ["redis".to_string()].into(),
        ..Supply::default()
    };
    let v = verdict(&a, &supply);
    let install = v
        .candidates
        .iter()
        .find(|c| c.kind == CandidateKind::PartialInstall)
        .unwrap();
    assert_eq!(install.install, ["redis"]);
    assert!(install.blocked.is_some());
    assert_eq!(v.chosen.as_ref().unwrap().kind, CandidateKind::Build);

    supply.install_at_deploy = true;
    let v = verdict(&a, &supply);
    assert_eq!(
        v.chosen.as_ref().unwrap().kind,
        CandidateKind::PartialInstall
    );
}

#[test]
fn several_apps_without_install_have_no_candidate() {
    let a = ask(1, 384, 384, "debian-12", &["redis", "nginx"]);
    let v = verdict(&a, &Supply::default());
    assert_eq!(codes(&v), [ProblemCode::NoCandidate]);
    assert!(v.problems[0].message.contains("several applications"));
    let composing = Supply {
        compose: true,
        ..Supply::default()
    };
    let v = verdict(&a, &composing);
    assert_eq!(v.chosen.unwrap().source, "new image nginx+redis");
}

fn arb_ask() -> impl Strategy<Value = Ask> {
    (
        0u32..4,
        prop::sample::select(vec![32u32, 64, 128, 256, 384, 512]),
        0u32..3,
        prop::sample::select(vec![
            "busybox",
            "busybox@1.35",
            "busybox@1.36",
            "debian-12",
            "plan9",
        ]),
        prop::collection::btree_set(
            prop::sample::select(vec![
                "http-static",
                "http-counter",
                "redis",
                "postgresql",
                "nope",
            ]),
            0..3,
        ),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![0u32, 100, 1024])),
        prop::option::of(prop::sample::select(vec!["pw", "two words"])),
    )
        .prop_map(
            |(vcpus, min, extra, os, apps, exact_size, disk, password)| {
                let apps: Vec<&str> = apps.into_iter().collect();
                let mut a = ask(vcpus, min, min * (1 + extra), os, &apps);
                a.exact_size = exact_size;
                a.machine.disk_mib = disk;
                if let Some(password) = password {
                    a.settings.insert("password".into(), password.into());
                }
                a
            },
        )
}

fn arb_supply() -> impl Strategy<Value = Supply> {
    let vm = (
        1u32..3,
        prop::sample::select(vec![128u32, 256, 384, 512]),
        prop::option::of(prop::sample::select(vec!["busybox 1.35", "debian-12 12"])),
        prop::collection::btree_set(
            prop::sample::select(vec!["http-static", "http-counter", "redis", "postgresql"]),
            0..2,
        ),
        any::<bool>(),
    );
    (
        prop::collection::vec(vm, 0..6),
        prop::collection::btree_set(prop::sample::select(vec!["http-static", "redis"]), 0..2),
        prop::collection::btree_set(
            prop::sample::select(vec!["http-static", "http-counter", "redis", "busybox"]),
            0..3,
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(vms, templates, images, install_at_deploy, compose)| Supply {
                pool: vms
                    .into_iter()
                    .enumerate()
                    .map(|(i, (vcpus, memory, os, apps, sliceable))| {
                        let apps: Vec<&str> = if os.is_some() {
                            apps.into_iter().collect()
                        } else {
                            Vec::new()
                        };
                        PoolVm {
                            sliceable,
                            ..pool_vm(&format!("vm-{i}"), vcpus, memory, os, &apps)
                        }
                    })
                    .collect(),
                templates: templates.into_iter().map(String::from).collect(),
                images: images.into_iter().map(String::from).collect(),
                install_at_deploy,
                compose,
            },
        )
}

proptest! {
    /// A chosen candidate is never blocked, exists only without hard problems, and serves
    /// the request: enough vCPUs and memory, and with exact size exactly the vCPUs and at
    /// most the memory asked once sliced.
    #[test]
    fn the_chosen_candidate_serves_the_request(a in arb_ask(), supply in arb_supply()) {
        let v = verdict(&a, &supply);
        prop_assert_eq!(v.ok, v.errors().next().is_none());
        match &v.chosen {
            None => prop_assert!(!v.ok),
            Some(chosen) => {
                prop_assert!(v.ok);
                let c = v.chosen_candidate().expect("the chosen one is a candidate");
                prop_assert_eq!(c.kind, chosen.kind);
                prop_assert!(c.blocked.is_none());
                prop_assert!(c.vcpus >= a.machine.vcpus && c.memory_mib >= a.machine.memory_mib.min);
                if a.exact_size {
                    let (vcpus, memory) = c.slice_to.unwrap_or((c.vcpus, c.memory_mib));
                    prop_assert_eq!(vcpus, a.machine.vcpus);
                    prop_assert!(memory <= a.machine.memory_mib.max);
                }
                prop_assert!(!chosen.reason.is_empty());
            }
        }
    }

    /// Every problem has a field, a message and a suggestion.
    #[test]
    fn every_problem_has_a_suggestion(a in arb_ask(), supply in arb_supply()) {
        for p in verdict(&a, &supply).problems {
            prop_assert!(!p.suggestion.is_empty() && !p.message.is_empty() && !p.field.is_empty(), "{:?}", p);
        }
    }

    /// The ranking is a total order: the same candidates in the same order whatever the
    /// order of the pool, sorted under [`rank::order`] with no two distinct candidates
    /// equal.
    #[test]
    fn ranking_is_stable_under_shuffling(a in arb_ask(), supply in arb_supply(), seed in any::<u64>()) {
        let v = verdict(&a, &supply);
        let mut shuffled = supply.clone();
        let n = shuffled.pool.len();
        let mut state = seed;
        for i in (1..n).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.pool.swap(i, (state >> 33) as usize % (i + 1));
        }
        let w = verdict(&a, &shuffled);
        prop_assert_eq!(&v.candidates, &w.candidates);
        prop_assert_eq!(&v.chosen, &w.chosen);
        for pair in v.candidates.windows(2) {
            prop_assert_eq!(rank::order(&pair[0], &pair[1]), std::cmp::Ordering::Less);
        }
        let blocked_after: BTreeSet<bool> = v.candidates.iter().skip_while(|c| c.blocked.is_none()).map(|c| c.blocked.is_some()).collect();
        prop_assert!(!blocked_after.contains(&false), "blocked candidates come last");
    }

    /// An exact pool VM, when it is there and the request is sound, is chosen.
    #[test]
    fn an_exact_pool_vm_is_chosen(a in arb_ask(), supply in arb_supply()) {
        let v = verdict(&a, &supply);
        if v.ok && v.candidates.iter().any(|c| c.kind == CandidateKind::Exact && c.blocked.is_none()) {
            prop_assert_eq!(v.chosen.map(|c| c.kind), Some(CandidateKind::Exact));
        }
    }
}
