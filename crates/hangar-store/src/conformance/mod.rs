//! One test suite for every backend: each test is an async function taking `&dyn Store`,
//! instantiated by [`conformance!`] once on SQLite (in memory) and once on a real
//! PostgreSQL (a fresh database each, see `hangar-test-postgres`), so the backends cannot
//! drift.

use std::collections::BTreeMap;

use futures::future::join_all;
use hangar_core::{Mode, VmState};

use crate::*;

mod access;
mod accounting;
mod alerts;
mod facts;
mod leases;
mod stacks;

use access::*;
use accounting::*;
use alerts::*;
use facts::*;
use leases::*;
use stacks::*;

pub(crate) fn vm(id: &str, service: &str, mode: Mode, state: VmState) -> VmRecord {
    VmRecord {
        id: id.into(),
        host: "local".into(),
        services: vec![service.into()],
        env: BTreeMap::new(),
        mode,
        owner: "anonymous".into(),
        state,
        endpoints: BTreeMap::from([("http".into(), "127.0.0.1:4000".into())]),
        direct_endpoints: BTreeMap::from([("http".into(), "127.0.0.1:4001".into())]),
        spec: serde_json::json!({"id": id}),
        pid: None,
        error: None,
        created_at_ms: 1,
        updated_at_ms: 1,
        last_used_at_ms: 1,
        state_since_ms: 1,
        boot_ms: None,
        memory_mib: 128,
        vcpus: 1,
        pool: None,
        os: Some(("busybox".into(), "1.35".into())),
        isolation: Some("tenant-a".into()),
    }
}

pub(super) fn pooled(id: &str) -> VmRecord {
    VmRecord {
        pool: Some("web".into()),
        ..vm(id, "web", Mode::Dedicated, VmState::Ready)
    }
}

pub(super) fn task(id: &str, created_at_ms: u64) -> TaskRecord {
    TaskRecord {
        id: id.into(),
        kind: "create_vm".into(),
        owner: "alice".into(),
        service: Some("web".into()),
        vm_id: None,
        state: TaskState::Running,
        stage: "queued".into(),
        percent: 0,
        error: None,
        created_at_ms,
        updated_at_ms: created_at_ms,
        ended_at_ms: None,
    }
}

pub(super) fn is_not_found(result: Result<impl std::fmt::Debug, StoreError>) -> bool {
    matches!(result, Err(StoreError::NotFound { .. }))
}

async fn vm_round_trip_and_listing(store: &dyn Store) {
    let record = vm("vm-a", "web", Mode::Shared, VmState::Creating);
    store.insert_vm(&record).await.unwrap();
    assert_eq!(store.vm("vm-a").await.unwrap().unwrap(), record);
    assert!(store.vm("vm-b").await.unwrap().is_none());
    let mut later = vm("vm-b", "db", Mode::Dedicated, VmState::Active);
    later.created_at_ms = 2;
    later.os = None;
    later.pid = Some(4242);
    later.boot_ms = Some(u64::from(u32::MAX) + 5);
    later.env.insert("k".into(), "v".into());
    store.insert_vm(&later).await.unwrap();
    assert_eq!(store.vms(false).await.unwrap(), [record.clone(), later]);
    let err = store.insert_vm(&record).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict(Conflict::Exists {
                kind: Entity::Vm,
                ..
            })
        ),
        "ids are unique: {err}"
    );
}

async fn transitions_follow_the_state_machine(store: &dyn Store) {
    store
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Creating))
        .await
        .unwrap();
    let err = store
        .transition("vm-a", VmState::Active, None)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "a VM cannot go from creating to active");
    assert!(err.is_transition_conflict());
    assert_eq!(
        store.vm("vm-a").await.unwrap().unwrap().state,
        VmState::Creating
    );
    store
        .transition("vm-a", VmState::Booting, None)
        .await
        .unwrap();
    let failed = store
        .transition("vm-a", VmState::Failed, Some("boom"))
        .await
        .unwrap();
    assert_eq!(
        (failed.state, failed.error.as_deref()),
        (VmState::Failed, Some("boom"))
    );
    store
        .transition("vm-a", VmState::Deleted, None)
        .await
        .unwrap();
    assert!(store.vms(false).await.unwrap().is_empty());
    assert_eq!(store.vms(true).await.unwrap().len(), 1);
    assert!(is_not_found(
        store.transition("vm-x", VmState::Deleted, None).await
    ));
}

/// Many writers move one VM at once: the state machine holds for each, so exactly one
/// `active → sleeping` and then exactly one `→ deleted` succeed.
async fn transitions_under_concurrency(store: &dyn Store) {
    store
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Active))
        .await
        .unwrap();
    for to in [VmState::Sleeping, VmState::Deleted] {
        let results = join_all((0..12).map(|_| store.transition("vm-a", to, None))).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "exactly one writer moves the VM to {to}");
        for result in results.into_iter().filter_map(Result::err) {
            assert!(result.is_transition_conflict(), "{result}");
        }
        assert_eq!(store.vm("vm-a").await.unwrap().unwrap().state, to);
    }
}

async fn shared_candidates_match_service_env_mode_and_state(store: &dyn Store) {
    for record in [
        vm("vm-a", "web", Mode::Shared, VmState::Active),
        vm("vm-b", "web", Mode::Dedicated, VmState::Active),
        vm("vm-c", "web", Mode::Shared, VmState::Booting),
        vm("vm-d", "db", Mode::Shared, VmState::Active),
    ] {
        store.insert_vm(&record).await.unwrap();
    }
    let mut with_env = vm("vm-e", "web", Mode::Shared, VmState::Active);
    with_env.env.insert("greeting".into(), "hi".into());
    store.insert_vm(&with_env).await.unwrap();
    let ids = |vms: Vec<VmRecord>| vms.into_iter().map(|v| v.id).collect::<Vec<_>>();
    let plain = store.shared_candidates("web", &BTreeMap::new()).await;
    assert_eq!(ids(plain.unwrap()), ["vm-a"]);
    let greeted = store.shared_candidates("web", &with_env.env).await;
    assert_eq!(ids(greeted.unwrap()), ["vm-e"]);
}

async fn claiming_a_pool_vm_happens_once(store: &dyn Store) {
    store.insert_vm(&pooled("vm-a")).await.unwrap();
    assert_eq!(store.vm("vm-a").await.unwrap().unwrap(), pooled("vm-a"));
    let env = BTreeMap::from([("k".to_string(), "v".to_string())]);
    let before = now_ms();
    let claimed = store.claim("vm-a", Mode::Shared, &env).await.unwrap();
    assert_eq!(
        (claimed.state, claimed.pool.as_deref(), claimed.mode),
        (VmState::Active, None, Mode::Shared)
    );
    assert_eq!(claimed.env, env);
    assert!(claimed.last_used_at_ms >= before && claimed.state_since_ms >= before);
    assert_eq!(store.vm("vm-a").await.unwrap().unwrap(), claimed);
    let again = store
        .claim("vm-a", Mode::Dedicated, &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(again.is_transition_conflict(), "{again}");
    assert!(is_not_found(
        store.claim("vm-x", Mode::Shared, &BTreeMap::new()).await
    ));
}

/// Many requests race for a few pool VMs, each trying every VM in its own order: each VM
/// goes to exactly one of them, and the losers see a conflict.
async fn the_claim_race_has_one_winner_per_vm(store: &dyn Store) {
    let ids: Vec<String> = (0..4).map(|i| format!("vm-{i}")).collect();
    for id in &ids {
        store.insert_vm(&pooled(id)).await.unwrap();
    }
    let claimer = |n: usize| {
        let ids = ids.clone();
        async move {
            let mut won = Vec::new();
            for k in 0..ids.len() {
                let id = &ids[(n + k) % ids.len()];
                let env = BTreeMap::from([("claimer".to_string(), n.to_string())]);
                match store.claim(id, Mode::Dedicated, &env).await {
                    Ok(vm) => won.push((vm.id, n)),
                    Err(err) => assert!(err.is_transition_conflict(), "{err}"),
                }
            }
            won
        }
    };
    let results = join_all((0..16).map(claimer)).await;
    let mut winners: Vec<(String, usize)> = results.into_iter().flatten().collect();
    winners.sort();
    assert_eq!(
        winners.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        ids,
        "every VM claimed exactly once"
    );
    for (id, n) in winners {
        let vm = store.vm(&id).await.unwrap().unwrap();
        assert_eq!(vm.state, VmState::Active);
        assert_eq!(
            vm.env["claimer"],
            n.to_string(),
            "the winner's claim is what is stored"
        );
    }
}

/// The pool loop removes a paused VM above target while a request may claim it: whichever
/// comes first wins, and the other sees it is too late.
async fn a_pool_vm_is_either_claimed_or_retired(store: &dyn Store) {
    for id in ["vm-a", "vm-b"] {
        store.insert_vm(&pooled(id)).await.unwrap();
    }
    store
        .claim("vm-a", Mode::Shared, &BTreeMap::new())
        .await
        .unwrap();
    assert!(!store.retire_ready("vm-a").await.unwrap());
    assert_eq!(
        store.vm("vm-a").await.unwrap().unwrap().state,
        VmState::Active
    );
    assert!(store.retire_ready("vm-b").await.unwrap());
    assert_eq!(
        store.vm("vm-b").await.unwrap().unwrap().state,
        VmState::Deleted
    );
    assert!(
        store
            .claim("vm-b", Mode::Shared, &BTreeMap::new())
            .await
            .is_err()
    );
    assert!(!store.retire_ready("vm-b").await.unwrap());
    assert!(!store.retire_ready("vm-x").await.unwrap());
    // At once: claims and a retire race for one VM; exactly one of them takes it.
    store.insert_vm(&pooled("vm-c")).await.unwrap();
    let none = BTreeMap::new();
    let claims = join_all((0..6).map(|_| store.claim("vm-c", Mode::Shared, &none)));
    let (claims, retired) = futures::join!(claims, store.retire_ready("vm-c"));
    let claimed = claims.iter().filter(|r| r.is_ok()).count();
    assert_eq!(claimed + usize::from(retired.unwrap()), 1);
}

async fn launch_offer_boot_and_owner_are_recorded(store: &dyn Store) {
    let mut shell = vm("vm-a", "web", Mode::Dedicated, VmState::Booting);
    shell.os = None;
    store.insert_vm(&shell).await.unwrap();
    let spec = serde_json::json!({"kernel": "/k", "args": [1, 2]});
    store.set_launch("vm-a", Some(77), &spec).await.unwrap();
    let direct = BTreeMap::from([("http".to_owned(), "127.0.0.1:5001".to_owned())]);
    let stable = BTreeMap::from([("http".to_owned(), "127.0.0.1:5000".to_owned())]);
    let os = ("debian".to_owned(), "12".to_owned());
    let services = ["redis".to_owned()];
    store
        .set_offer("vm-a", &services, &os, &stable, &direct)
        .await
        .unwrap();
    store.set_boot_ms("vm-a", 1234).await.unwrap();
    store.set_owner("vm-a", "alice").await.unwrap();
    let read = store.vm("vm-a").await.unwrap().unwrap();
    assert_eq!((read.pid, &read.spec), (Some(77), &spec));
    assert_eq!((read.endpoints, read.direct_endpoints), (stable, direct));
    assert_eq!((read.services, read.os), (services.to_vec(), Some(os)));
    assert_eq!((read.boot_ms, read.owner.as_str()), (Some(1234), "alice"));
    store
        .insert_vm(&vm("vm-b", "web", Mode::Shared, VmState::Active))
        .await
        .unwrap();
    let owned = store.vms_owned_by("alice").await.unwrap();
    assert_eq!(
        owned.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        ["vm-a"]
    );
    assert_eq!(store.vms_owned_by("anonymous").await.unwrap().len(), 1);
    store
        .transition("vm-a", VmState::Deleted, None)
        .await
        .unwrap();
    assert!(store.vms_owned_by("alice").await.unwrap().is_empty());
    store
        .insert_vm(&VmRecord {
            host: "farm-1".into(),
            ..vm("vm-far", "web", Mode::Shared, VmState::Active)
        })
        .await
        .unwrap();
    let on = |host: &'static str| async move {
        store
            .vms_on_host(host)
            .await
            .unwrap()
            .into_iter()
            .map(|vm| vm.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(on("farm-1").await, ["vm-far"]);
    assert!(on("farm-2").await.is_empty());
    assert!(
        !on("local").await.contains(&"vm-a".to_owned()),
        "deleted VMs are left out"
    );
    store
        .transition("vm-far", VmState::Deleted, None)
        .await
        .unwrap();
    assert!(on("farm-1").await.is_empty());
    assert!(is_not_found(store.set_launch("vm-x", None, &spec).await));
    assert!(is_not_found(
        store
            .set_offer(
                "vm-x",
                &[],
                &("a".into(), "b".into()),
                &BTreeMap::new(),
                &BTreeMap::new()
            )
            .await
    ));
    assert!(is_not_found(store.set_boot_ms("vm-x", 1).await));
    assert!(is_not_found(store.set_owner("vm-x", "bob").await));
}

async fn vm_use_is_summed_per_host_over_the_states_asked(store: &dyn Store) {
    let live = [VmState::Booting, VmState::Active, VmState::Sleeping];
    assert!(store.vm_use_by_host(&live).await.unwrap().is_empty());
    for (id, host, state, vcpus, memory_mib, group) in [
        ("vm-1", "a", VmState::Active, 1, 128, Some("db")),
        ("vm-2", "a", VmState::Sleeping, 2, 512, None),
        ("vm-3", "b", VmState::Active, 4, 1024, Some("web")),
        ("vm-6", "b", VmState::Active, 0, 0, Some("db")),
        ("vm-7", "b", VmState::Active, 0, 0, Some("web")),
        ("vm-4", "b", VmState::Failed, 8, 4096, Some("x")),
        ("vm-5", "c", VmState::Archived, 1, 128, None),
    ] {
        store
            .insert_vm(&VmRecord {
                host: host.into(),
                vcpus,
                memory_mib,
                isolation: group.map(str::to_owned),
                ..vm(id, "web", Mode::Shared, state)
            })
            .await
            .unwrap();
    }
    let use_of = |host: &str, vms, vcpus, memory_mib, groups: &[&str]| HostUse {
        host: host.into(),
        vms,
        vcpus,
        memory_mib,
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    assert_eq!(
        store.vm_use_by_host(&live).await.unwrap(),
        [
            use_of("a", 2, 3, 640, &["db"]),
            use_of("b", 3, 4, 1024, &["db", "web"])
        ]
    );
    assert_eq!(
        store.vm_use_by_host(&[VmState::Failed]).await.unwrap(),
        [use_of("b", 1, 8, 4096, &["x"])]
    );
    assert!(store.vm_use_by_host(&[]).await.unwrap().is_empty());
    store
        .transition("vm-1", VmState::Deleted, None)
        .await
        .unwrap();
    assert_eq!(
        store.vm_use_by_host(&live).await.unwrap(),
        [
            use_of("a", 1, 2, 512, &[]),
            use_of("b", 3, 4, 1024, &["db", "web"])
        ]
    );
}

async fn state_changes_stamp_their_time_and_last_use_only_moves_forward(store: &dyn Store) {
    store
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Active))
        .await
        .unwrap();
    assert_eq!(store.vm("vm-a").await.unwrap().unwrap().state_since_ms, 1);
    let before = now_ms();
    let asleep = store
        .transition("vm-a", VmState::Sleeping, None)
        .await
        .unwrap();
    assert!(asleep.state_since_ms >= before);
    assert_eq!(asleep.last_used_at_ms, 1, "a state change is not a use");
    store.set_last_used("vm-a", 500).await.unwrap();
    store.set_last_used("vm-a", 400).await.unwrap();
    assert_eq!(
        store.vm("vm-a").await.unwrap().unwrap().last_used_at_ms,
        500
    );
    store.touch("vm-a").await.unwrap();
    assert!(store.vm("vm-a").await.unwrap().unwrap().last_used_at_ms >= before);
    assert!(is_not_found(store.set_last_used("vm-x", 1).await));
    assert!(is_not_found(store.touch("vm-x").await));
}

async fn pool_bounds_and_ready_criteria_override(store: &dyn Store) {
    assert!(store.pool_bounds().await.unwrap().is_empty());
    store.set_pool_bounds("web", 1, 3).await.unwrap();
    store.set_pool_bounds("web", 2, u32::MAX).await.unwrap();
    assert_eq!(
        store.pool_bounds().await.unwrap(),
        BTreeMap::from([("web".to_string(), (2, u32::MAX))])
    );
    assert!(store.pool_ready().await.unwrap().is_empty());
    store
        .set_pool_ready("db", 0, 1, Some(r#"{"tcp":5432}"#))
        .await
        .unwrap();
    store.set_pool_ready("web", 1, 2, None).await.unwrap();
    assert_eq!(
        store.pool_ready().await.unwrap(),
        BTreeMap::from([("db".to_string(), r#"{"tcp":5432}"#.to_string())])
    );
    assert_eq!(store.pool_bounds().await.unwrap()["web"], (1, 2));
    store.set_pool_ready("db", 0, 1, None).await.unwrap();
    assert!(store.pool_ready().await.unwrap().is_empty());
}

async fn run_time_policies_are_kept_and_cleared(store: &dyn Store) {
    assert!(store.policies().await.unwrap().is_empty());
    store
        .set_policy("web", Some(r#"{"sleep_after":"3s"}"#))
        .await
        .unwrap();
    store
        .set_policy("web", Some(r#"{"sleep_after":"5s"}"#))
        .await
        .unwrap();
    assert_eq!(
        store.policies().await.unwrap(),
        BTreeMap::from([("web".to_string(), r#"{"sleep_after":"5s"}"#.to_string())])
    );
    store.set_policy("web", None).await.unwrap();
    assert!(store.policies().await.unwrap().is_empty());
}

/// A move is written whole, only from the host and state the mover saw.
async fn a_vm_moves_only_from_where_and_how_it_was(store: &dyn Store) {
    store
        .insert_vm(&vm("vm-m", "web", Mode::Shared, VmState::Archived))
        .await
        .unwrap();
    let mut m = crate::VmMove {
        id: "vm-m".into(),
        from: "elsewhere".into(),
        state: VmState::Archived,
        to: "b".into(),
        pid: None,
        spec: serde_json::json!({"id": "vm-m", "on": "b"}),
        direct_endpoints: BTreeMap::from([("http".into(), "10.0.0.2:5000".into())]),
    };
    assert!(!store.move_vm(&m).await.unwrap(), "not on that host");
    m.from = "local".into();
    m.state = VmState::Active;
    assert!(!store.move_vm(&m).await.unwrap(), "not in that state");
    m.state = VmState::Archived;
    assert!(store.move_vm(&m).await.unwrap());
    let moved = store.vm("vm-m").await.unwrap().unwrap();
    assert_eq!(moved.host, "b");
    assert_eq!(moved.state, VmState::Archived);
    assert_eq!(moved.spec, m.spec);
    assert_eq!(moved.direct_endpoints, m.direct_endpoints);
    assert_eq!(
        moved.endpoints["http"], "127.0.0.1:4000",
        "the stable endpoint stays"
    );
    assert!(!store.move_vm(&m).await.unwrap(), "moved once");
    m.id = "vm-none".into();
    assert!(!store.move_vm(&m).await.unwrap());
}

/// Instantiates each suite function once per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = crate::SqliteStore::open_in_memory().unwrap();
                    super::$name(&store).await;
                }
            )*
        }

        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = hangar_test_postgres::TestDatabase::create();
                    let store = crate::PgStore::connect(db.url()).await.unwrap();
                    super::$name(&store).await;
                }
            )*
        }
    };
}

conformance!(
    vm_round_trip_and_listing,
    transitions_follow_the_state_machine,
    transitions_under_concurrency,
    shared_candidates_match_service_env_mode_and_state,
    claiming_a_pool_vm_happens_once,
    the_claim_race_has_one_winner_per_vm,
    a_pool_vm_is_either_claimed_or_retired,
    launch_offer_boot_and_owner_are_recorded,
    a_vm_moves_only_from_where_and_how_it_was,
    state_changes_stamp_their_time_and_last_use_only_moves_forward,
    vm_use_is_summed_per_host_over_the_states_asked,
    pool_bounds_and_ready_criteria_override,
    run_time_policies_are_kept_and_cleared,
    tasks_progress_and_restart,
    tasks_list_newest_first,
    task_steps_record_outcomes,
    concurrent_task_steps_get_distinct_numbers,
    tasks_keep_owner_end_and_every_state,
    unfinished_tasks_are_running_or_rolling_back,
    the_undo_journal_keeps_order_and_marks,
    concurrent_undo_entries_get_distinct_numbers,
    hosts_register_and_heartbeat,
    a_drain_survives_heartbeats_and_ends_by_a_change,
    templates_are_kept_used_and_removed,
    imports_are_unique_kept_and_removed,
    archives_are_kept_and_removed,
    a_lease_is_taken_renewed_refused_and_taken_over,
    a_lease_is_released_only_by_its_holder,
    concurrent_acquires_have_one_winner,
    every_host_state_round_trips,
    quotas_are_set_replaced_and_removed,
    use_by_owner_counts_what_quotas_count,
    every_state_change_is_recorded_for_usage,
    users_are_unique_and_listed_by_name,
    tokens_are_kept_revoked_and_marked_used,
    the_audit_log_keeps_order_and_reads_by_time,
    an_idempotency_key_is_claimed_once_answered_and_released,
    concurrent_claims_of_a_key_have_one_holder,
    alerts_are_kept_replaced_and_removed,
    stacks_are_unique_kept_updated_and_removed,
);
