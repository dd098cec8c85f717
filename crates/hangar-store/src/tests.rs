use super::*;

fn vm(id: &str, service: &str, mode: Mode, state: VmState) -> VmRecord {
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
    }
}

#[test]
fn vm_round_trip_and_listing() {
    let store = Store::open_in_memory().unwrap();
    let record = vm("vm-a", "web", Mode::Shared, VmState::Creating);
    store.insert_vm(&record).unwrap();
    assert_eq!(store.vm("vm-a").unwrap().unwrap(), record);
    assert!(store.vm("vm-b").unwrap().is_none());
    assert_eq!(store.vms(false).unwrap().len(), 1);
    assert!(store.insert_vm(&record).is_err(), "ids are unique");
}

#[test]
fn transitions_follow_the_state_machine() {
    let store = Store::open_in_memory().unwrap();
    store
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Creating))
        .unwrap();
    let err = store.transition("vm-a", VmState::Active, None).unwrap_err();
    assert_eq!(err.to_string(), "a VM cannot go from creating to active");
    assert_eq!(store.vm("vm-a").unwrap().unwrap().state, VmState::Creating);
    store.transition("vm-a", VmState::Booting, None).unwrap();
    let failed = store
        .transition("vm-a", VmState::Failed, Some("boom"))
        .unwrap();
    assert_eq!(
        (failed.state, failed.error.as_deref()),
        (VmState::Failed, Some("boom"))
    );
    store.transition("vm-a", VmState::Deleted, None).unwrap();
    assert!(store.vms(false).unwrap().is_empty());
    assert_eq!(store.vms(true).unwrap().len(), 1);
    assert!(matches!(
        store.transition("vm-x", VmState::Deleted, None),
        Err(StoreError::NoVm(_))
    ));
}

#[test]
fn shared_candidates_match_service_env_mode_and_state() {
    let store = Store::open_in_memory().unwrap();
    store
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Active))
        .unwrap();
    store
        .insert_vm(&vm("vm-b", "web", Mode::Dedicated, VmState::Active))
        .unwrap();
    store
        .insert_vm(&vm("vm-c", "web", Mode::Shared, VmState::Booting))
        .unwrap();
    store
        .insert_vm(&vm("vm-d", "db", Mode::Shared, VmState::Active))
        .unwrap();
    let mut with_env = vm("vm-e", "web", Mode::Shared, VmState::Active);
    with_env.env.insert("greeting".into(), "hi".into());
    store.insert_vm(&with_env).unwrap();

    let ids = |env: &BTreeMap<String, String>| {
        store
            .shared_candidates("web", env)
            .unwrap()
            .into_iter()
            .map(|v| v.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&BTreeMap::new()), ["vm-a"]);
    assert_eq!(ids(&with_env.env), ["vm-e"]);
}

#[test]
fn tasks_progress_and_restart() {
    let store = Store::open_in_memory().unwrap();
    let task = TaskRecord {
        id: "task-1".into(),
        kind: "create_vm".into(),
        service: Some("web".into()),
        vm_id: None,
        state: TaskState::Running,
        stage: "queued".into(),
        percent: 0,
        error: None,
        created_at_ms: 5,
        updated_at_ms: 5,
    };
    store.insert_task(&task).unwrap();
    store
        .update_task("task-1", TaskState::Running, "boot", 60, None)
        .unwrap();
    store.set_task_vm("task-1", "vm-a").unwrap();
    let read = store.task("task-1").unwrap().unwrap();
    assert_eq!(
        (read.stage.as_str(), read.percent, read.vm_id.as_deref()),
        ("boot", 60, Some("vm-a"))
    );
    assert_eq!(store.fail_running_tasks("server restarted").unwrap(), 1);
    let read = store.task("task-1").unwrap().unwrap();
    assert_eq!(
        (read.state, read.error.as_deref()),
        (TaskState::Failed, Some("server restarted"))
    );
    assert!(matches!(
        store.update_task("task-2", TaskState::Running, "x", 0, None),
        Err(StoreError::NoTask(_))
    ));
}

#[test]
fn reopening_a_file_keeps_data_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hangar.db");
    {
        let store = Store::open(&path).unwrap();
        store
            .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Creating))
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.vms(false).unwrap().len(), 1);
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(store);
    let err = Store::open(&path).err().expect("a newer schema is refused");
    assert!(err.to_string().contains("newer than this hangar"), "{err}");
}

#[test]
fn vms_made_before_stable_endpoints_keep_their_direct_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hangar.db");
    {
        // The schema as it was before stable endpoints (migrations 1-3), with one VM.
        let conn = Connection::open(&path).unwrap();
        for sql in &schema::MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute(
            "INSERT INTO vms (id, host, services, env, mode, owner, state, endpoints, spec,
                              created_at_ms, updated_at_ms, last_used_at_ms, memory_mib, vcpus)
             VALUES ('vm-old', 'local', '[\"web\"]', '{}', 'shared', 'local', 'active',
                     '{\"http\":\"127.0.0.1:4000\"}', '{}', 1, 1, 1, 128, 1)",
            [],
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let old = store.vm("vm-old").unwrap().unwrap();
    assert_eq!(old.endpoints["http"], "127.0.0.1:4000");
    assert_eq!(old.direct_endpoints, old.endpoints);

    let direct = BTreeMap::from([("http".to_owned(), "127.0.0.1:5001".to_owned())]);
    let stable = BTreeMap::from([("http".to_owned(), "127.0.0.1:5000".to_owned())]);
    store
        .set_offer(
            "vm-old",
            &["web".into()],
            &("busybox".into(), "1.35".into()),
            &stable,
            &direct,
        )
        .unwrap();
    let vm = store.vm("vm-old").unwrap().unwrap();
    assert_eq!((vm.endpoints, vm.direct_endpoints), (stable, direct));
}

#[test]
fn claiming_a_pool_vm_happens_once() {
    let store = Store::open_in_memory().unwrap();
    let mut pooled = vm("vm-a", "web", Mode::Dedicated, VmState::Ready);
    pooled.pool = Some("web".into());
    store.insert_vm(&pooled).unwrap();
    assert_eq!(store.vm("vm-a").unwrap().unwrap(), pooled);
    let env = BTreeMap::from([("k".to_string(), "v".to_string())]);
    let claimed = store.claim("vm-a", Mode::Shared, &env).unwrap();
    assert_eq!(
        (claimed.state, claimed.pool.as_deref(), claimed.mode),
        (VmState::Active, None, Mode::Shared)
    );
    assert_eq!(claimed.env, env);
    let again = store
        .claim("vm-a", Mode::Dedicated, &BTreeMap::new())
        .unwrap_err();
    assert!(matches!(again, StoreError::Transition(_)), "{again}");
}

/// The pool loop removes a paused VM above target while a request may claim it: whichever
/// comes first wins, and the other sees it is too late.
#[test]
fn a_pool_vm_is_either_claimed_or_retired() {
    let store = Store::open_in_memory().unwrap();
    for id in ["vm-a", "vm-b"] {
        let mut pooled = vm(id, "web", Mode::Dedicated, VmState::Ready);
        pooled.pool = Some("web".into());
        store.insert_vm(&pooled).unwrap();
    }
    // Claimed first: not retired, still active.
    store.claim("vm-a", Mode::Shared, &BTreeMap::new()).unwrap();
    assert!(!store.retire_ready("vm-a").unwrap());
    assert_eq!(store.vm("vm-a").unwrap().unwrap().state, VmState::Active);
    // Retired first: deleted, and a claim fails.
    assert!(store.retire_ready("vm-b").unwrap());
    assert_eq!(store.vm("vm-b").unwrap().unwrap().state, VmState::Deleted);
    assert!(store.claim("vm-b", Mode::Shared, &BTreeMap::new()).is_err());
    assert!(!store.retire_ready("vm-b").unwrap());
}

#[test]
fn pool_bounds_override() {
    let store = Store::open_in_memory().unwrap();
    assert!(store.pool_bounds().unwrap().is_empty());
    store.set_pool_bounds("web", 1, 3).unwrap();
    store.set_pool_bounds("web", 2, 4).unwrap();
    assert_eq!(
        store.pool_bounds().unwrap(),
        BTreeMap::from([("web".to_string(), (2, 4))])
    );
}

#[test]
fn state_changes_stamp_their_time_and_last_use_only_moves_forward() {
    let store = Store::open_in_memory().unwrap();
    store
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Active))
        .unwrap();
    assert_eq!(store.vm("vm-a").unwrap().unwrap().state_since_ms, 1);
    let before = now_ms();
    let asleep = store.transition("vm-a", VmState::Sleeping, None).unwrap();
    assert!(asleep.state_since_ms >= before);
    assert_eq!(asleep.last_used_at_ms, 1, "a state change is not a use");
    store.set_last_used("vm-a", 500).unwrap();
    store.set_last_used("vm-a", 400).unwrap();
    assert_eq!(store.vm("vm-a").unwrap().unwrap().last_used_at_ms, 500);
    assert!(matches!(
        store.set_last_used("vm-x", 1),
        Err(StoreError::NoVm(_))
    ));
}

#[test]
fn run_time_policies_are_kept_and_cleared() {
    let store = Store::open_in_memory().unwrap();
    assert!(store.policies().unwrap().is_empty());
    store
        .set_policy("web", Some(r#"{"sleep_after":"3s"}"#))
        .unwrap();
    store
        .set_policy("web", Some(r#"{"sleep_after":"5s"}"#))
        .unwrap();
    assert_eq!(
        store.policies().unwrap(),
        BTreeMap::from([("web".to_string(), r#"{"sleep_after":"5s"}"#.to_string())])
    );
    store.set_policy("web", None).unwrap();
    assert!(store.policies().unwrap().is_empty());
}
