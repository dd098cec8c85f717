use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const S: u64 = 1000;

fn vm(id: &str, service: &str, state: VmState, last_used_ms: u64) -> VmFacts {
    VmFacts {
        id: id.into(),
        services: vec![service.into()],
        state,
        last_used_ms,
        state_since_ms: 0,
        memory_mib: 256,
        archive_bytes: (state == VmState::Archived).then_some(10 << 20),
    }
}

fn policy(sleep: Option<u64>, archive: Option<u64>, delete: Option<u64>) -> Policy {
    Policy {
        sleep_after: sleep.map(Duration::from_secs),
        archive_after: archive.map(Duration::from_secs),
        delete_after: delete.map(Duration::from_secs),
        ..Policy::default()
    }
}

fn inputs(now_ms: u64, vms: Vec<VmFacts>, policies: &[(&str, Policy)]) -> Inputs {
    Inputs {
        now_ms,
        vms,
        policies: policies
            .iter()
            .map(|(name, p)| (name.to_string(), *p))
            .collect(),
        ..Inputs::default()
    }
}

#[test]
fn idle_vms_move_down_one_state_each() {
    let p = policy(Some(3), Some(5), Some(10));
    let vms = vec![
        vm("fresh", "web", VmState::Active, 98 * S),
        vm("idle", "web", VmState::Active, 96 * S),
        vm("asleep", "web", VmState::Sleeping, 90 * S),
        vm("archived", "web", VmState::Archived, 50 * S),
        vm("pool", "web", VmState::Ready, 0),
        vm("booting", "web", VmState::Booting, 0),
        vm("broken", "web", VmState::Failed, 0),
        vm("other", "db", VmState::Active, 0),
    ];
    let actions = decide(&inputs(100 * S, vms, &[("web", p)]));
    assert_eq!(
        actions,
        [
            Action::Delete {
                vm: "archived".into(),
                reason: Reason::Idle
            },
            Action::Archive {
                vm: "asleep".into(),
                tier: TierChoice::Zstd,
                reason: Reason::Idle
            },
            Action::Sleep {
                vm: "idle".into(),
                reason: Reason::Idle
            },
        ]
    );
}

#[test]
fn timers_count_from_entering_the_state() {
    let p = policy(Some(3), Some(5), None);
    let mut asleep = vm("asleep", "web", VmState::Sleeping, 0);
    asleep.state_since_ms = 97 * S;
    let actions = decide(&inputs(100 * S, vec![asleep.clone()], &[("web", p)]));
    assert!(actions.is_empty(), "asleep for 3 s only: {actions:?}");
    asleep.state_since_ms = 95 * S;
    let actions = decide(&inputs(100 * S, vec![asleep], &[("web", p)]));
    assert_eq!(actions.len(), 1);
}

#[test]
fn without_sleep_after_idle_active_vms_are_archived_directly() {
    let p = Policy {
        archive_tier: TierChoice::Raw,
        ..policy(None, Some(5), None)
    };
    let actions = decide(&inputs(
        100 * S,
        vec![vm("a", "web", VmState::Active, 90 * S)],
        &[("web", p)],
    ));
    assert_eq!(
        actions,
        [Action::Archive {
            vm: "a".into(),
            tier: TierChoice::Raw,
            reason: Reason::Idle
        }]
    );
}

#[test]
fn frequently_requested_services_stay_active() {
    let p = Policy {
        keep_active_above: Some(PerMinute(6.0)),
        ..policy(Some(3), Some(5), None)
    };
    let vms = vec![
        vm("idle", "web", VmState::Active, 0),
        vm("asleep", "web", VmState::Sleeping, 0),
    ];
    let mut busy = inputs(100 * S, vms, &[("web", p)]);
    busy.rates_per_min.insert("web".into(), 10.0);
    let actions = decide(&busy);
    assert_eq!(
        actions.iter().filter_map(Action::vm).collect::<Vec<_>>(),
        ["asleep"],
        "only the active VM is kept: {actions:?}"
    );
    busy.rates_per_min.insert("web".into(), 6.0);
    assert_eq!(
        decide(&busy).len(),
        2,
        "at the threshold it is not above it"
    );
}

#[test]
fn memory_budget_archives_least_recently_used_first() {
    let vms = vec![
        vm("new", "web", VmState::Active, 90 * S),
        vm("old", "web", VmState::Active, 10 * S),
        vm("asleep", "web", VmState::Sleeping, 20 * S),
        vm("pool", "web", VmState::Ready, 0),
    ];
    let mut over = inputs(100 * S, vms, &[]);
    over.budgets.memory_mib = Some(300);
    let actions = decide(&over);
    let archived: Vec<_> = actions
        .iter()
        .map(|a| (a.vm().unwrap(), a.reason()))
        .collect();
    assert_eq!(
        archived,
        [("asleep", Reason::Memory), ("old", Reason::Memory)],
        "two of three 256 MiB VMs go; the pool VM does not count"
    );
    over.budgets.memory_mib = Some(768);
    assert!(decide(&over).is_empty(), "within budget");
}

#[test]
fn memory_eviction_spares_kept_active_services_until_last() {
    let p = Policy {
        keep_active_above: Some(PerMinute(1.0)),
        ..Policy::default()
    };
    let vms = vec![
        vm("hot", "web", VmState::Active, 0),
        vm("cold", "db", VmState::Active, 50 * S),
    ];
    let mut over = inputs(100 * S, vms, &[("web", p)]);
    over.rates_per_min.insert("web".into(), 5.0);
    over.budgets.memory_mib = Some(256);
    let actions = decide(&over);
    assert_eq!(
        actions.iter().filter_map(Action::vm).collect::<Vec<_>>(),
        ["cold"]
    );
    over.budgets.memory_mib = Some(0);
    assert_eq!(decide(&over).len(), 2, "the budget is a limit");
}

#[test]
fn idle_sleep_becomes_an_archive_when_memory_is_short() {
    let vms = vec![vm("idle", "web", VmState::Active, 0)];
    let mut over = inputs(100 * S, vms, &[("web", policy(Some(3), None, None))]);
    over.budgets.memory_mib = Some(100);
    assert_eq!(
        decide(&over),
        [Action::Archive {
            vm: "idle".into(),
            tier: TierChoice::Zstd,
            reason: Reason::Memory
        }]
    );
}

#[test]
fn disk_budget_deletes_archives_and_unused_images_lru() {
    let vms = vec![
        vm("a-old", "web", VmState::Archived, 10 * S),
        vm("a-new", "web", VmState::Archived, 90 * S),
    ];
    let mut over = inputs(100 * S, vms, &[]);
    over.images = vec![
        ImageFacts {
            key: "img-old".into(),
            bytes: 10 << 20,
            last_used_ms: 5 * S,
            in_use: false,
        },
        ImageFacts {
            key: "img-used".into(),
            bytes: 10 << 20,
            last_used_ms: 0,
            in_use: true,
        },
    ];
    over.budgets.disk_bytes = Some(25 << 20);
    let actions = decide(&over);
    assert_eq!(
        actions,
        [
            Action::Delete {
                vm: "a-old".into(),
                reason: Reason::Disk
            },
            Action::RemoveImage {
                key: "img-old".into(),
                reason: Reason::Disk
            },
        ]
    );
}

#[test]
fn several_services_merge_to_the_most_patient_policy() {
    let policies: BTreeMap<String, Policy> = [
        ("a".to_string(), policy(Some(3), Some(5), None)),
        ("b".to_string(), policy(Some(10), None, None)),
    ]
    .into();
    let merged = vm_policy(&["a".into(), "b".into()], &policies);
    assert_eq!(merged, policy(Some(10), None, None));
    let merged = vm_policy(&["a".into(), "none".into()], &policies);
    assert!(
        !merged.has_timers(),
        "a service without a policy holds the VM"
    );
}

#[test]
fn policies_parse_check_and_round_trip() {
    let p: Policy = toml::from_str(
        r#"
        sleep_after = "500ms"
        archive_after = "10m"
        delete_after = "1h"
        keep_active_above = 6
        archive_tier = "delta"
        "#,
    )
    .unwrap();
    assert_eq!(p.sleep_after, Some(Duration::from_millis(500)));
    assert_eq!(p.archive_after, Some(Duration::from_secs(600)));
    assert_eq!(p.delete_after, Some(Duration::from_secs(3600)));
    assert_eq!(p.keep_active_above, Some(PerMinute(6.0)));
    assert_eq!(p.archive_tier, TierChoice::Delta);
    p.check().unwrap();
    let json = serde_json::to_value(p).unwrap();
    assert_eq!(json["sleep_after"], "500ms");
    assert_eq!(json["archive_tier"], "delta");
    assert_eq!(serde_json::from_value::<Policy>(json).unwrap(), p);
    assert_eq!(
        serde_json::to_value(Policy::default()).unwrap(),
        serde_json::json!({ "archive_tier": "zstd" })
    );

    let zero = Policy {
        sleep_after: Some(Duration::ZERO),
        ..Policy::default()
    };
    assert!(zero.check().unwrap_err().contains("sleep_after"));
    let nan = Policy {
        keep_active_above: Some(PerMinute(f64::NAN)),
        ..Policy::default()
    };
    assert!(nan.check().unwrap_err().contains("keep_active_above"));
    let err = toml::from_str::<Policy>(r#"archive_tier = "lz4""#).unwrap_err();
    assert!(err.to_string().contains("unknown variant"), "{err}");
    let err = toml::from_str::<Policy>(r#"sleep_after = "soon""#).unwrap_err();
    assert!(err.to_string().contains("sleep_after"), "{err}");
    assert_eq!("raw".parse::<TierChoice>(), Ok(TierChoice::Raw));
    assert!("lz4".parse::<TierChoice>().is_err());
}

fn state_strategy() -> impl Strategy<Value = VmState> {
    prop::sample::select(VmState::ALL.to_vec())
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    let timer = || prop::option::of((1u64..50).prop_map(Duration::from_secs));
    (
        timer(),
        timer(),
        timer(),
        prop::option::of((0u32..20).prop_map(|r| PerMinute(f64::from(r)))),
    )
        .prop_map(|(s, a, d, k)| Policy {
            sleep_after: s,
            archive_after: a,
            delete_after: d,
            keep_active_above: k,
            archive_tier: TierChoice::Zstd,
        })
}

prop_compose! {
    fn inputs_strategy()(
        vms in prop::collection::vec(
            (state_strategy(), 0u64..100, 0u64..100, prop::sample::select(vec![64u32, 128, 256]),
             0u64..(64 << 20), prop::sample::select(vec!["a", "b", "c"])),
            0..12),
        policies in prop::collection::btree_map(
            prop::sample::select(vec!["a".to_string(), "b".to_string()]), policy_strategy(), 0..3),
        rates in prop::collection::btree_map(
            prop::sample::select(vec!["a".to_string(), "b".to_string()]), 0.0f64..30.0, 0..3),
        memory in prop::option::of(0u64..2048),
        disk in prop::option::of(0u64..(256 << 20)),
        images in prop::collection::vec((0u64..(64 << 20), 0u64..100, any::<bool>()), 0..4),
    ) -> Inputs {
        Inputs {
            now_ms: 100 * S,
            vms: vms
                .into_iter()
                .enumerate()
                .map(|(i, (state, used, since, memory_mib, bytes, service))| VmFacts {
                    id: format!("vm{i}"),
                    services: vec![service.to_string()],
                    state,
                    last_used_ms: used * S,
                    state_since_ms: since * S,
                    memory_mib,
                    archive_bytes: (state == VmState::Archived).then_some(bytes),
                })
                .collect(),
            policies,
            rates_per_min: rates,
            budgets: Budgets { memory_mib: memory, disk_bytes: disk },
            images: images
                .into_iter()
                .enumerate()
                .map(|(i, (bytes, used, in_use))| ImageFacts {
                    key: format!("img{i}"),
                    bytes,
                    last_used_ms: used * S,
                    in_use,
                })
                .collect(),
        }
    }
}

/// The state a VM is in after its action.
fn after(vm: &VmFacts, action: Option<&Action>) -> VmState {
    match action {
        None => vm.state,
        Some(Action::Sleep { .. }) => VmState::Sleeping,
        Some(Action::Archive { .. }) => VmState::Archived,
        Some(Action::Delete { .. }) => VmState::Deleted,
        Some(Action::RemoveImage { .. }) => unreachable!("not a VM action"),
    }
}

proptest! {
    #[test]
    fn decisions_are_legal_and_keep_the_budgets(inputs in inputs_strategy()) {
        let actions = decide(&inputs);
        let by_vm: BTreeMap<&str, &Action> =
            actions.iter().filter_map(|a| Some((a.vm()?, a))).collect();
        let vm_actions = actions.iter().filter(|a| a.vm().is_some()).count();
        prop_assert_eq!(by_vm.len(), vm_actions, "one action per VM: {:?}", actions);

        for vm in &inputs.vms {
            let action = by_vm.get(vm.id.as_str()).copied();
            let to = after(vm, action);
            if action.is_some() {
                prop_assert!(crate::valid_transition(vm.state, to), "{:?} {:?}", vm, action);
                prop_assert!(
                    matches!(vm.state, VmState::Active | VmState::Sleeping | VmState::Archived),
                    "pool, booting and failed VMs are left alone: {:?}", vm
                );
            }
            let kept = kept_active(&vm.services, &inputs.policies, &inputs.rates_per_min);
            if let Some(action) = action && action.reason() == Reason::Idle {
                let policy = vm_policy(&vm.services, &inputs.policies);
                let idle = inputs.now_ms - vm.last_used_ms.max(vm.state_since_ms).min(inputs.now_ms);
                let timer = match (vm.state, policy.sleep_after) {
                    (VmState::Active, Some(sleep)) => sleep,
                    (VmState::Active | VmState::Sleeping, _) => policy.archive_after.unwrap(),
                    _ => policy.delete_after.unwrap(),
                };
                prop_assert!(idle >= timer.as_millis() as u64, "fired early: {:?} {:?}", vm, action);
                prop_assert!(!(kept && vm.state == VmState::Active), "kept active: {:?}", vm);
            }
        }

        if let Some(budget) = inputs.budgets.memory_mib {
            let held = |vm: &&VmFacts| {
                matches!(after(vm, by_vm.get(vm.id.as_str()).copied()), VmState::Active | VmState::Sleeping)
            };
            let used: u64 = inputs.vms.iter().filter(held).map(|vm| u64::from(vm.memory_mib)).sum();
            prop_assert!(used <= budget, "memory {} over budget {}", used, budget);
            // LRU: no VM evicted for memory was used after one of its class left holding memory.
            for evicted in inputs.vms.iter().filter(|vm| {
                by_vm.get(vm.id.as_str()).is_some_and(|a| a.reason() == Reason::Memory)
            }) {
                let class = kept_active(&evicted.services, &inputs.policies, &inputs.rates_per_min);
                for spared in inputs.vms.iter().filter(held) {
                    if kept_active(&spared.services, &inputs.policies, &inputs.rates_per_min) == class {
                        prop_assert!(evicted.last_used_ms <= spared.last_used_ms,
                            "evicted {:?} before {:?}", evicted, spared);
                    }
                }
            }
        }

        if let Some(budget) = inputs.budgets.disk_bytes {
            let removed: BTreeSet<&str> = actions.iter().filter_map(|a| match a {
                Action::RemoveImage { key, .. } => Some(key.as_str()),
                _ => None,
            }).collect();
            for key in &removed {
                let image = inputs.images.iter().find(|i| i.key == *key).unwrap();
                prop_assert!(!image.in_use, "removed an image in use");
            }
            let archives: u64 = inputs.vms.iter()
                .filter(|vm| after(vm, by_vm.get(vm.id.as_str()).copied()) == VmState::Archived
                    && vm.state == VmState::Archived)
                .filter_map(|vm| vm.archive_bytes).sum();
            let images: u64 = inputs.images.iter()
                .filter(|i| !removed.contains(i.key.as_str())).map(|i| i.bytes).sum();
            let all_gone = inputs.vms.iter().all(|vm| vm.state != VmState::Archived
                    || by_vm.contains_key(vm.id.as_str()))
                && inputs.images.iter().all(|i| i.in_use || removed.contains(i.key.as_str()));
            prop_assert!(archives + images <= budget || all_gone,
                "disk {} over budget {} with more to delete", archives + images, budget);
        }
    }

    #[test]
    fn without_policies_or_budgets_nothing_happens(mut inputs in inputs_strategy()) {
        inputs.policies.clear();
        inputs.budgets = Budgets::default();
        prop_assert!(decide(&inputs).is_empty());
    }
}

#[test]
fn policy_floors_refuse_timers_shorter_than_theirs() {
    let floors = PolicyFloors::default();
    let ms = Duration::from_millis;
    assert_eq!(
        floors
            .check([("sleep_after", ms(1)), ("delete_after", ms(1))])
            .unwrap_err()
            .to_string(),
        "policy sleep_after of 1ms is shorter than the floor of 1s (the server's --policy-min-sleep-after)"
    );
    let err = floors
        .check([("delete_after", Duration::from_secs(3599))])
        .unwrap_err();
    assert_eq!(
        (err.field.as_str(), err.floor),
        ("delete_after", Duration::from_secs(3600))
    );
    assert!(
        err.to_string().contains("--policy-min-delete-after"),
        "{err}"
    );
    assert!(
        floors
            .check([
                ("sleep_after", Duration::from_secs(1)),
                ("archive_after", Duration::from_secs(10)),
                ("delete_after", Duration::from_secs(3600)),
            ])
            .is_ok()
    );
    assert!(PolicyFloors::NONE.check([("delete_after", ms(1))]).is_ok());
}
