//! The migration's checks and its failure path on fake-backend farm hosts (which cannot
//! offer a VM's files: the move itself is proven on real hosts, `hangar-cli/tests/migrate.rs`).

use hangar_core::VmState;
use hangar_store::TaskState;

use super::{MigrationError, migrate};
use crate::farm::farm_tests::Farm;

/// A farm of hosts `a` and `b` with one dedicated `web` VM (active), and its host.
async fn farm_with_vm() -> (Farm, String, String) {
    Farm::with_vm(&["a", "b"]).await
}

fn other(host: &str) -> &'static str {
    if host == "a" { "b" } else { "a" }
}

#[tokio::test]
async fn a_migration_is_refused_before_any_task_when_it_cannot_be() {
    let (farm, vm, host) = farm_with_vm().await;
    let m = &farm.manager;
    let err = migrate(m, "vm-nope", "a", "admin").await.unwrap_err();
    assert!(matches!(err, MigrationError::NoVm(_)), "{err}");
    let err = migrate(m, &vm, "zz", "admin").await.unwrap_err();
    assert!(matches!(err, MigrationError::NoHost(_)), "{err}");
    let err = migrate(m, &vm, &host, "admin").await.unwrap_err();
    assert!(matches!(err, MigrationError::SameHost { .. }), "{err}");
    m.sleep(&vm).await.unwrap();
    farm.store
        .upsert_host(&{
            let mut record = farm.store.host(other(&host)).await.unwrap().unwrap();
            record.state = hangar_store::HostState::Draining;
            record
        })
        .await
        .unwrap();
    m.refresh_farm().await;
    let err = migrate(m, &vm, other(&host), "admin").await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Destination { .. }) && err.to_string().contains("draining"),
        "{err}"
    );
    assert!(
        farm.store
            .tasks(10)
            .await
            .unwrap()
            .iter()
            .all(|task| task.kind != super::TASK_KIND),
        "no task was started"
    );
}

#[tokio::test]
async fn a_failed_move_leaves_the_vm_where_it_was_and_says_why() {
    let (farm, vm, host) = farm_with_vm().await;
    let m = &farm.manager;
    m.sleep(&vm).await.unwrap();
    let task = migrate(m, &vm, other(&host), "admin").await.unwrap();
    let again = migrate(m, &vm, other(&host), "admin").await;
    assert!(
        matches!(again, Err(MigrationError::AlreadyMoving { .. }) | Ok(_)),
        "{again:?}"
    );
    let outcome = m.tasks.outcome(&task).await.expect("outcome kept");
    let err = outcome.expect_err("fake hosts offer no VM files");
    assert!(err.contains("keeps no VM directories"), "{err}");
    let record = farm.store.task(&task).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Failed);
    assert_eq!(record.kind, "migrate");
    assert_eq!(record.vm_id.as_deref(), Some(vm.as_str()));
    let now = farm.store.vm(&vm).await.unwrap().unwrap();
    assert_eq!(now.host, host, "still on its host");
    assert_eq!(
        now.state,
        VmState::Archived,
        "a sleeping VM is archived before it moves, and stays so"
    );
    assert!(m.migrations.of(&vm).is_none());
}

#[tokio::test]
async fn a_stack_member_stays_on_its_host() {
    let (farm, vm, host) = farm_with_vm().await;
    farm.store
        .insert_stack(&hangar_store::StackRecord {
            name: "shop".into(),
            owner: "admin".into(),
            spec: serde_json::json!({ "name": "shop", "member": { "front": { "service": "web" } } }),
            segment: "10.213.0.0/24".into(),
            state: hangar_core::stack::StackState::Up,
            members: [("front".to_owned(), vm.clone())].into(),
            created_at_ms: 0,
            updated_at_ms: 0,
        })
        .await
        .unwrap();
    let err = migrate(&farm.manager, &vm, other(&host), "admin")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrationError::StackMember { stack, .. } if stack == "shop"),
        "{err}"
    );
    assert_eq!(farm.store.vm(&vm).await.unwrap().unwrap().host, host);
}
