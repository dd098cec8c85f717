//! Cancel, rollback and restart of tasks on the fake backend (the real-QEMU tests are in
//! `crates/hangar-cli/tests/tasks.rs`).

use std::sync::Arc;
use std::time::Duration;

use hangar_core::Mode;
use hangar_store::{StepOutcome, Store, TaskRecord, TaskState, now_ms};
use hangar_vmm::Hypervisor;
use hangar_vmm::fake::FakeBackend;

use super::{CancelError, Undo};
use crate::manager::{Manager, ManagerConfig};
use crate::requests::RequestError;
use crate::test_support::*;

const CATALOG: &str = crate::test_support::WEB_AND_NEVER_READY;

fn setup() -> (Arc<Manager>, FakeBackend, Arc<dyn Store>) {
    fake_manager(CATALOG, ManagerConfig::default())
}

/// Starts a creation that never gets ready; returns its task once it is at its boot step.
async fn creation_at_boot(manager: &Arc<Manager>, store: &Arc<dyn Store>) -> TaskRecord {
    let mut hurried = request("never-ready", Mode::Dedicated);
    hurried.deadline_ms = Some(50);
    let task = match manager.request(hurried).await {
        Err(RequestError::TryAgain {
            task: Some(task), ..
        }) => task,
        other => panic!("expected try again, got {:?}", other.map(|g| g.vm.id)),
    };
    for _ in 0..200 {
        let record = store.task(&task).await.unwrap().unwrap();
        let steps = store.task_steps(&task).await.unwrap();
        if record.vm_id.is_some() && steps.last().is_some_and(|step| step.stage == "boot") {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the task never reached its boot step");
}

async fn wait_ended(store: &Arc<dyn Store>, task: &str) -> TaskRecord {
    for _ in 0..400 {
        let record = store.task(task).await.unwrap().unwrap();
        if record.state.ended() {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("task {task} never ended");
}

#[tokio::test]
async fn a_cancel_at_boot_undoes_every_step_and_ends_cancelled() {
    let (manager, backend, store) = setup();
    let task = creation_at_boot(&manager, &store).await;
    let vm = task.vm_id.clone().unwrap();
    assert_eq!(backend.running().await.unwrap(), [vm.as_str()]);

    let asked = manager
        .tasks
        .cancel(&task.id, &task.owner, false)
        .await
        .unwrap();
    assert_eq!(asked.state, TaskState::Running);
    let ended = wait_ended(&store, &task.id).await;
    assert_eq!(ended.state, TaskState::Cancelled);
    assert_eq!(ended.error.as_deref(), Some("cancelled"));
    assert!(ended.ended_at_ms.is_some());

    // Nothing left: no process, the VM's row deleted, every journal entry undone.
    assert!(backend.running().await.unwrap().is_empty());
    let record = store.vm(&vm).await.unwrap().unwrap();
    assert_eq!(record.state, hangar_core::VmState::Deleted);
    let journal = store.task_undos(&task.id).await.unwrap();
    assert_eq!(journal.len(), 3, "{journal:?}");
    assert!(journal.iter().all(|entry| entry.done), "{journal:?}");
    // Its steps: the ones done rolled back, the one cut short failed.
    let steps = store.task_steps(&task.id).await.unwrap();
    let stages: Vec<(&str, Option<StepOutcome>)> = steps
        .iter()
        .map(|step| (step.stage.as_str(), step.outcome))
        .collect();
    assert_eq!(
        stages,
        [
            ("place", Some(StepOutcome::RolledBack)),
            ("prepare", Some(StepOutcome::RolledBack)),
            ("endpoints", Some(StepOutcome::RolledBack)),
            ("record", Some(StepOutcome::RolledBack)),
            ("boot", Some(StepOutcome::Failed)),
        ]
    );
    // Ended: a second cancel is refused.
    let again = manager.tasks.cancel(&task.id, &task.owner, false).await;
    assert!(matches!(again, Err(CancelError::Ended { .. })), "{again:?}");
}

#[tokio::test]
async fn only_the_owner_or_an_admin_cancels_and_unknown_tasks_are_not_found() {
    let (manager, _backend, store) = setup();
    let task = creation_at_boot(&manager, &store).await;
    let refused = manager.tasks.cancel(&task.id, "mallory", false).await;
    assert!(
        matches!(refused, Err(CancelError::NotOwner { .. })),
        "{refused:?}"
    );
    assert_eq!(
        store.task(&task.id).await.unwrap().unwrap().state,
        TaskState::Running
    );
    manager.tasks.cancel(&task.id, "root", true).await.unwrap();
    assert_eq!(
        wait_ended(&store, &task.id).await.state,
        TaskState::Cancelled
    );
    let unknown = manager.tasks.cancel("task-none", "root", true).await;
    assert!(
        matches!(unknown, Err(CancelError::NotFound(_))),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn a_failure_is_undone_from_the_journal_and_ends_failed() {
    let (manager, backend, store) = setup();
    let task = creation_at_boot(&manager, &store).await;
    // The never-ready VM fails its criterion after its timeout.
    let ended = wait_ended(&store, &task.id).await;
    assert_eq!(ended.state, TaskState::Failed);
    assert!(backend.running().await.unwrap().is_empty());
    let record = store.vm(task.vm_id.as_deref().unwrap()).await.unwrap();
    assert_eq!(record.unwrap().state, hangar_core::VmState::Failed);
    assert!(
        store
            .task_undos(&task.id)
            .await
            .unwrap()
            .iter()
            .all(|entry| entry.done)
    );
}

#[tokio::test]
async fn at_restart_a_half_task_is_undone_from_its_journal() {
    let (manager, backend, store) = setup();
    let host = manager.default_host().name().to_owned();
    drop(manager);
    // What a server killed at a creation's boot step leaves: its QEMU process, its task
    // running, its journal.
    let spec = hangar_vmm::VmSpec {
        id: "vm-half".into(),
        vcpus: 1,
        memory_mib: 64,
        ram_tail_kib: 0,
        segment_nic: false,
        egress: hangar_core::EgressPolicy::Open,
        kernel: "k".into(),
        initramfs: "i".into(),
        cmdline: String::new(),
        base_image: None,
        layers: Vec::new(),
        layer_slots: 0,
        firmware: false,
        memory: Default::default(),
        forwards: vec![],
        pre_os: false,
        background: false,
        template: None,
    };
    backend.launch(&spec).await.unwrap();
    let now = now_ms();
    store
        .insert_task(&TaskRecord {
            id: "task-half".into(),
            kind: "create_vm".into(),
            owner: "ana".into(),
            service: Some("web".into()),
            vm_id: Some("vm-half".into()),
            state: TaskState::Running,
            stage: "boot".into(),
            percent: 50,
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
            ended_at_ms: None,
        })
        .await
        .unwrap();
    for undo in [
        Undo::DestroyVm {
            vm: "vm-half".into(),
            host,
        },
        Undo::CloseEndpoints {
            vm: "vm-half".into(),
        },
        Undo::RetireVm {
            vm: "vm-half".into(),
        },
    ] {
        store
            .push_task_undo("task-half", &undo.encode())
            .await
            .unwrap();
    }

    let restarted = manager_on(
        store.clone(),
        backend.clone(),
        CATALOG,
        ManagerConfig::default(),
    );
    let report = restarted.reconcile().await.unwrap();
    // The journal stopped it, not the pass over strangers.
    assert!(report.stopped_unknown.is_empty(), "{report:?}");
    assert!(backend.running().await.unwrap().is_empty());
    let task = store.task("task-half").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Failed);
    assert!(
        task.error
            .as_deref()
            .unwrap()
            .contains("the server stopped before the task finished"),
        "{:?}",
        task.error
    );
    assert!(
        store
            .task_undos("task-half")
            .await
            .unwrap()
            .iter()
            .all(|entry| entry.done)
    );
    assert!(store.unfinished_tasks().await.unwrap().is_empty());
}

#[tokio::test]
async fn at_restart_a_task_whose_vm_got_ready_ends_succeeded() {
    let (manager, backend, store) = setup();
    let granted = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    let task = granted.task.clone().expect("a made VM has its task");
    drop(manager);
    // Killed after the VM got ready, before the task's end was recorded.
    store
        .update_task(&task, TaskState::Running, "boot", 90, None)
        .await
        .unwrap();
    let restarted = manager_on(
        store.clone(),
        backend.clone(),
        CATALOG,
        ManagerConfig::default(),
    );
    restarted.reconcile().await.unwrap();
    assert_eq!(
        store.task(&task).await.unwrap().unwrap().state,
        TaskState::Succeeded
    );
    assert_eq!(backend.running().await.unwrap(), [granted.vm.id.as_str()]);
}

#[test]
fn undo_entries_round_trip_through_their_journal_text() {
    let undo = Undo::DestroyVm {
        vm: "vm-1".into(),
        host: "local".into(),
    };
    assert_eq!(
        undo.encode(),
        r#"{"undo":"destroy_vm","vm":"vm-1","host":"local"}"#
    );
    assert_eq!(Undo::decode(&undo.encode()).unwrap(), undo);
    assert!(Undo::decode(r#"{"undo":"format_disk"}"#).is_err());
}

#[tokio::test]
async fn archives_and_wakes_are_recorded_as_their_vms_owners_tasks() {
    let (manager, _backend, store) = setup();
    let granted = manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    let vm = granted.vm.id.clone();
    manager
        .archive(&vm, hangar_vmm::ArchiveTier::Zstd)
        .await
        .unwrap();
    manager.wake(&vm).await.unwrap();
    let tasks = store.tasks(10).await.unwrap();
    // Tasks begun within one millisecond list in either order: compare them as a set.
    let mut seen: Vec<(&str, &str, TaskState, Option<&str>)> = tasks
        .iter()
        .map(|t| {
            (
                t.kind.as_str(),
                t.owner.as_str(),
                t.state,
                t.vm_id.as_deref(),
            )
        })
        .collect();
    seen.sort_by_key(|&(kind, ..)| kind);
    let owner = granted.vm.owner.as_str();
    assert_eq!(
        seen,
        [
            ("archive", owner, TaskState::Succeeded, Some(vm.as_str())),
            ("create_vm", owner, TaskState::Succeeded, Some(vm.as_str())),
            ("wake", owner, TaskState::Succeeded, Some(vm.as_str())),
        ]
    );
}

#[tokio::test]
async fn a_task_that_does_not_act_on_a_cancel_refuses_it() {
    let (manager, _backend, store) = setup();
    let (task, _outcome) = manager.tasks.begin("import", None).await.unwrap();
    let refused = manager.tasks.cancel(&task, "root", true).await;
    assert!(
        matches!(refused, Err(CancelError::NotHere(_))),
        "{refused:?}"
    );
    assert_eq!(
        store.task(&task).await.unwrap().unwrap().state,
        TaskState::Running
    );
}
