//! The conformance suite, continued: tasks and their steps, hosts, templates, archives.

use futures::future::join_all;

use super::{is_not_found, task};
use crate::*;

pub(super) async fn tasks_progress_and_restart(store: &dyn Store) {
    store.insert_task(&task("task-1", 5)).await.unwrap();
    store
        .update_task("task-1", TaskState::Running, "boot", 160, None)
        .await
        .unwrap();
    store.set_task_vm("task-1", "vm-a").await.unwrap();
    let read = store.task("task-1").await.unwrap().unwrap();
    assert_eq!(
        (read.stage.as_str(), read.percent, read.vm_id.as_deref()),
        ("boot", 100, Some("vm-a"))
    );
    store.insert_task(&task("task-2", 6)).await.unwrap();
    store
        .update_task("task-2", TaskState::Succeeded, "ready", 100, None)
        .await
        .unwrap();
    assert_eq!(
        store.fail_running_tasks("server restarted").await.unwrap(),
        1
    );
    let read = store.task("task-1").await.unwrap().unwrap();
    assert_eq!(
        (read.state, read.error.as_deref()),
        (TaskState::Failed, Some("server restarted"))
    );
    let done = store.task("task-2").await.unwrap().unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert!(store.task("task-9").await.unwrap().is_none());
    assert!(is_not_found(
        store
            .update_task("task-9", TaskState::Running, "x", 0, None)
            .await
    ));
    assert!(is_not_found(store.set_task_vm("task-9", "vm-a").await));
    let dup = store.insert_task(&task("task-1", 7)).await.unwrap_err();
    assert!(
        matches!(dup, StoreError::Conflict(Conflict::Exists { .. })),
        "{dup}"
    );
}

pub(super) async fn tasks_list_newest_first(store: &dyn Store) {
    for (id, at) in [("t-a", 10), ("t-b", 30), ("t-c", 20)] {
        store.insert_task(&task(id, at)).await.unwrap();
    }
    let ids = |tasks: Vec<TaskRecord>| tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(store.tasks(10).await.unwrap()), ["t-b", "t-c", "t-a"]);
    assert_eq!(ids(store.tasks(2).await.unwrap()), ["t-b", "t-c"]);
    assert_eq!(store.tasks(3).await.unwrap()[0], task("t-b", 30));
}

pub(super) async fn task_steps_record_outcomes(store: &dyn Store) {
    store.insert_task(&task("task-1", 5)).await.unwrap();
    let first = store
        .start_task_step("task-1", "image", 10, 100)
        .await
        .unwrap();
    store
        .end_task_step("task-1", first, StepOutcome::Succeeded, None, 150)
        .await
        .unwrap();
    let second = store
        .start_task_step("task-1", "boot", 40, 150)
        .await
        .unwrap();
    assert_eq!((first, second), (1, 2));
    store
        .end_task_step(
            "task-1",
            second,
            StepOutcome::Failed,
            Some("no network"),
            190,
        )
        .await
        .unwrap();
    store
        .end_task_step("task-1", first, StepOutcome::RolledBack, None, 200)
        .await
        .unwrap();
    let third = store
        .start_task_step("task-1", "cleanup", 90, 210)
        .await
        .unwrap();
    let steps = store.task_steps("task-1").await.unwrap();
    assert_eq!(
        steps[1],
        TaskStep {
            task_id: "task-1".into(),
            step: 2,
            stage: "boot".into(),
            percent: 40,
            started_at_ms: 150,
            ended_at_ms: Some(190),
            outcome: Some(StepOutcome::Failed),
            error: Some("no network".into()),
        }
    );
    assert_eq!(steps[0].outcome, Some(StepOutcome::RolledBack));
    assert_eq!((steps[2].step, steps[2].outcome), (third, None));
    // A restart fails the task and ends its open step.
    store.fail_running_tasks("server restarted").await.unwrap();
    let open = &store.task_steps("task-1").await.unwrap()[2];
    assert_eq!(open.outcome, Some(StepOutcome::Failed));
    assert_eq!(open.error.as_deref(), Some("server restarted"));
    assert!(open.ended_at_ms.is_some());
    assert!(store.task_steps("task-9").await.unwrap().is_empty());
    assert!(is_not_found(
        store.start_task_step("task-9", "x", 0, 1).await
    ));
    assert!(is_not_found(
        store
            .end_task_step("task-1", 9, StepOutcome::Succeeded, None, 1)
            .await
    ));
}

pub(super) async fn concurrent_task_steps_get_distinct_numbers(store: &dyn Store) {
    store.insert_task(&task("task-1", 5)).await.unwrap();
    let steps = join_all((0..10).map(|i| store.start_task_step("task-1", "s", i, 1))).await;
    let mut numbers: Vec<u32> = steps.into_iter().map(Result::unwrap).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=10).collect::<Vec<_>>());
}

pub(super) async fn hosts_register_and_heartbeat(store: &dyn Store) {
    assert!(store.hosts().await.unwrap().is_empty());
    let mut local = HostRecord {
        name: "local".into(),
        address: String::new(),
        state: HostState::Up,
        facts: serde_json::json!({"vcpus": 2, "memory_mib": 4096}),
        last_heartbeat_ms: 10,
    };
    store.upsert_host(&local).await.unwrap();
    assert_eq!(store.host("local").await.unwrap().unwrap(), local);
    local.address = "10.0.0.2:7000".into();
    store.upsert_host(&local).await.unwrap();
    let other = HostRecord {
        name: "b-host".into(),
        ..local.clone()
    };
    store.upsert_host(&other).await.unwrap();
    let facts = serde_json::json!({"free_memory_mib": 1024});
    store
        .heartbeat("local", HostState::Draining, &facts, 20)
        .await
        .unwrap();
    let read = store.host("local").await.unwrap().unwrap();
    assert_eq!(
        (
            read.state,
            &read.facts,
            read.last_heartbeat_ms,
            read.address.as_str()
        ),
        (HostState::Draining, &facts, 20, "10.0.0.2:7000")
    );
    let names: Vec<String> = store
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(names, ["b-host", "local"]);
    assert!(store.host("nowhere").await.unwrap().is_none());
    assert!(is_not_found(
        store.heartbeat("nowhere", HostState::Down, &facts, 1).await
    ));
}

async fn host_state(store: &dyn Store, name: &str) -> HostState {
    store.host(name).await.unwrap().unwrap().state
}

pub(super) async fn a_drain_survives_heartbeats_and_ends_by_a_change(store: &dyn Store) {
    let mut host = HostRecord {
        name: "h1".into(),
        address: "10.0.0.2:7000".into(),
        state: HostState::Up,
        facts: serde_json::json!({}),
        last_heartbeat_ms: 10,
    };
    store.upsert_host(&host).await.unwrap();
    // A drain only from `up`; asked again, it answers alike.
    assert!(
        !store
            .change_host_state("h1", HostState::Down, HostState::Draining)
            .await
            .unwrap()
    );
    assert_eq!(host_state(store, "h1").await, HostState::Up);
    for _ in 0..2 {
        assert!(
            store
                .change_host_state("h1", HostState::Up, HostState::Draining)
                .await
                .unwrap()
        );
    }
    // Neither a heartbeat nor a registration writing `up` ends it.
    store
        .heartbeat("h1", HostState::Up, &serde_json::json!({}), 20)
        .await
        .unwrap();
    assert_eq!(host_state(store, "h1").await, HostState::Draining);
    store.upsert_host(&host).await.unwrap();
    assert_eq!(host_state(store, "h1").await, HostState::Draining);
    // The loss loop still takes it down.
    host.state = HostState::Down;
    store.upsert_host(&host).await.unwrap();
    assert_eq!(host_state(store, "h1").await, HostState::Down);
    store
        .heartbeat("h1", HostState::Draining, &serde_json::json!({}), 30)
        .await
        .unwrap();
    // A resume ends it.
    assert!(
        store
            .change_host_state("h1", HostState::Draining, HostState::Up)
            .await
            .unwrap()
    );
    assert_eq!(host_state(store, "h1").await, HostState::Up);
    assert!(is_not_found(
        store
            .change_host_state("nowhere", HostState::Up, HostState::Draining)
            .await
    ));
}

pub(super) async fn templates_are_kept_used_and_removed(store: &dyn Store) {
    let template = TemplateRecord {
        key: "redis-abc".into(),
        service: "redis".into(),
        host: "local".into(),
        hash: "abc".into(),
        size_bytes: 5 << 30,
        created_at_ms: 100,
        last_used_at_ms: 100,
    };
    store.put_template(&template).await.unwrap();
    assert_eq!(
        store.template("redis-abc").await.unwrap().unwrap(),
        template
    );
    store.template_used("redis-abc", 300).await.unwrap();
    store.template_used("redis-abc", 200).await.unwrap();
    assert_eq!(
        store
            .template("redis-abc")
            .await
            .unwrap()
            .unwrap()
            .last_used_at_ms,
        300
    );
    let remade = TemplateRecord {
        hash: "def".into(),
        ..template.clone()
    };
    store.put_template(&remade).await.unwrap();
    store
        .put_template(&TemplateRecord {
            key: "pg-1".into(),
            ..template
        })
        .await
        .unwrap();
    let keys: Vec<String> = store
        .templates()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.key)
        .collect();
    assert_eq!(keys, ["pg-1", "redis-abc"]);
    assert_eq!(
        store.template("redis-abc").await.unwrap().unwrap().hash,
        "def"
    );
    assert!(store.remove_template("redis-abc").await.unwrap());
    assert!(!store.remove_template("redis-abc").await.unwrap());
    assert!(store.template("redis-abc").await.unwrap().is_none());
    assert!(is_not_found(store.template_used("redis-abc", 1).await));
}

pub(super) async fn archives_are_kept_and_removed(store: &dyn Store) {
    let archive = ArchiveRecord {
        vm_id: "vm-a".into(),
        tier: "local-disk".into(),
        size_bytes: 123_456_789,
        host: "local".into(),
        created_at_ms: 42,
    };
    store.put_archive(&archive).await.unwrap();
    assert_eq!(store.archive("vm-a").await.unwrap().unwrap(), archive);
    let again = ArchiveRecord {
        size_bytes: 99,
        created_at_ms: 43,
        ..archive.clone()
    };
    store.put_archive(&again).await.unwrap();
    store
        .put_archive(&ArchiveRecord {
            vm_id: "vm-0".into(),
            ..archive
        })
        .await
        .unwrap();
    let all = store.archives().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].vm_id.as_str(), &all[1]), ("vm-0", &again));
    assert!(store.remove_archive("vm-a").await.unwrap());
    assert!(!store.remove_archive("vm-a").await.unwrap());
    assert!(store.archive("vm-a").await.unwrap().is_none());
}

pub(super) async fn imports_are_unique_kept_and_removed(store: &dyn Store) {
    let record = |name: &str, at: u64| ImportRecord {
        name: name.into(),
        owner: "alice".into(),
        format: "qcow2".into(),
        spec: serde_json::json!({"layout": {"full_disk": {"root_partition": 1}}, "ports": [["http", 80]]}),
        disk_bytes: 1 << 30,
        created_at_ms: at,
    };
    assert!(store.imports().await.unwrap().is_empty());
    store.insert_import(&record("web-b", 2)).await.unwrap();
    store.insert_import(&record("web-a", 1)).await.unwrap();
    let err = store.insert_import(&record("web-a", 3)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(
        store.import("web-a").await.unwrap(),
        Some(record("web-a", 1))
    );
    assert_eq!(
        store
            .imports()
            .await
            .unwrap()
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["web-a", "web-b"]
    );
    assert!(store.remove_import("web-a").await.unwrap());
    assert!(!store.remove_import("web-a").await.unwrap());
    assert_eq!(store.import("web-a").await.unwrap(), None);
}

pub(super) async fn tasks_keep_owner_end_and_every_state(store: &dyn Store) {
    let mut record = task("task-o", 5);
    record.owner = "bob".into();
    store.insert_task(&record).await.unwrap();
    let read = store.task("task-o").await.unwrap().unwrap();
    assert_eq!((read.owner.as_str(), read.ended_at_ms), ("bob", None));
    for state in [TaskState::RollingBack, TaskState::Running] {
        store
            .update_task("task-o", state, "undo", 50, None)
            .await
            .unwrap();
        let read = store.task("task-o").await.unwrap().unwrap();
        assert_eq!((read.state, read.ended_at_ms), (state, None));
    }
    store
        .update_task(
            "task-o",
            TaskState::Cancelled,
            "cancelled",
            100,
            Some("asked"),
        )
        .await
        .unwrap();
    let read = store.task("task-o").await.unwrap().unwrap();
    assert_eq!(read.state, TaskState::Cancelled);
    assert_eq!(read.error.as_deref(), Some("asked"));
    let ended = read.ended_at_ms.expect("an ended task has its end");
    assert!(ended >= read.created_at_ms);
    assert!(TaskState::Cancelled.ended() && !TaskState::RollingBack.ended());
}

pub(super) async fn unfinished_tasks_are_running_or_rolling_back(store: &dyn Store) {
    for (id, at, state) in [
        ("t-run", 3, TaskState::Running),
        ("t-back", 2, TaskState::RollingBack),
        ("t-done", 1, TaskState::Succeeded),
        ("t-failed", 4, TaskState::Failed),
        ("t-cancel", 5, TaskState::Cancelled),
    ] {
        store.insert_task(&task(id, at)).await.unwrap();
        store.update_task(id, state, "x", 0, None).await.unwrap();
    }
    let ids: Vec<String> = store
        .unfinished_tasks()
        .await
        .unwrap()
        .into_iter()
        .map(|task| task.id)
        .collect();
    assert_eq!(ids, ["t-back", "t-run"]);
    assert_eq!(store.fail_running_tasks("stopped").await.unwrap(), 2);
    assert!(store.unfinished_tasks().await.unwrap().is_empty());
}

pub(super) async fn the_undo_journal_keeps_order_and_marks(store: &dyn Store) {
    store.insert_task(&task("task-u", 5)).await.unwrap();
    assert!(is_not_found(store.push_task_undo("task-9", "{}").await));
    for (n, action) in ["destroy", "close", "row"].iter().enumerate() {
        let seq = store.push_task_undo("task-u", action).await.unwrap();
        assert_eq!(seq as usize, n + 1);
    }
    store.mark_task_undone("task-u", 3).await.unwrap();
    assert!(is_not_found(store.mark_task_undone("task-u", 9).await));
    let journal = store.task_undos("task-u").await.unwrap();
    let seen: Vec<(u32, &str, bool)> = journal
        .iter()
        .map(|undo| (undo.seq, undo.action.as_str(), undo.done))
        .collect();
    assert_eq!(
        seen,
        [(1, "destroy", false), (2, "close", false), (3, "row", true)]
    );
    assert!(store.task_undos("task-9").await.unwrap().is_empty());
}

pub(super) async fn concurrent_undo_entries_get_distinct_numbers(store: &dyn Store) {
    store.insert_task(&task("task-c", 5)).await.unwrap();
    let pushes = (0..8).map(|n| {
        let action = format!("a{n}");
        async move { store.push_task_undo("task-c", &action).await.unwrap() }
    });
    let mut seqs = join_all(pushes).await;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=8).collect::<Vec<u32>>());
}
