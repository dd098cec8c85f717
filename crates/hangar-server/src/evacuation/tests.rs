//! Drain, resume and the evacuation task on fake-backend farm hosts, with a fake mover
//! (the moves themselves are proven on real hosts: `hangar-cli/tests/evacuate.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hangar_core::Mode;
use hangar_store::{HostState, TaskState};

use super::{EvacuationError, MOVES_AT_ONCE, evacuate};
use crate::farm::farm_tests::Farm;
use crate::rebalance::Mover;
use crate::test_support::request;

/// Says every move worked after `delay`, but for the VMs in `failing`; counts how many
/// run at once and records where each VM was sent.
#[derive(Default)]
struct FakeMover {
    delay: Duration,
    failing: Vec<String>,
    now: AtomicUsize,
    most: AtomicUsize,
    sent: std::sync::Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl Mover for FakeMover {
    async fn migrate(&self, vm: &str, to: &str) -> Result<(), String> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.sent
            .lock()
            .unwrap()
            .push((vm.to_owned(), to.to_owned()));
        if self.failing.iter().any(|id| id == vm) {
            return Err(format!("{vm} cannot move"));
        }
        Ok(())
    }
}

/// A farm whose host `a` holds `n` active `web` VMs; hosts `b` and `c` join after.
async fn farm_with_vms_on_a(n: usize) -> (Farm, Vec<String>) {
    let farm = Farm::new();
    let m = &farm.manager;
    m.register_host(Farm::registration("a", "one"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..n {
        let grant = m.request(request("web", Mode::Dedicated)).await.unwrap();
        assert_eq!(grant.vm.host, "a");
        ids.push(grant.vm.id);
    }
    for name in ["b", "c"] {
        m.register_host(Farm::registration(name, "one"))
            .await
            .unwrap();
    }
    (farm, ids)
}

async fn state(farm: &Farm, host: &str) -> HostState {
    farm.store.host(host).await.unwrap().unwrap().state
}

async fn ended(farm: &Farm, task: &str) -> hangar_store::TaskRecord {
    for _ in 0..500 {
        let record = farm.store.task(task).await.unwrap().unwrap();
        if record.state.ended() {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("task {task} did not end");
}

#[tokio::test]
async fn a_drained_host_stays_draining_takes_nothing_and_resumes() {
    let (farm, _) = farm_with_vms_on_a(1).await;
    let m = &farm.manager;
    let drained = m.drain_host("a").await.unwrap();
    assert_eq!(drained.state, "draining");
    assert_eq!(
        m.drain_host("a").await.unwrap().state,
        "draining",
        "again: same"
    );
    farm.heartbeat("a", "one").await;
    m.register_host(Farm::registration("a", "one"))
        .await
        .unwrap();
    assert_eq!(
        state(&farm, "a").await,
        HostState::Draining,
        "heartbeats keep it"
    );
    for _ in 0..4 {
        let grant = m.request(request("web", Mode::Dedicated)).await.unwrap();
        assert_ne!(grant.vm.host, "a", "nothing new on a draining host");
    }
    assert_eq!(m.resume_host("a").await.unwrap().state, "up");
    assert_eq!(state(&farm, "a").await, HostState::Up);
    assert_eq!(m.resume_host("a").await.unwrap().state, "up", "again: same");

    let err = m.drain_host("zz").await.unwrap_err();
    assert!(matches!(err, EvacuationError::NoHost(_)), "{err}");
    farm.silence("b", 60_000).await;
    m.watch_hosts_once().await;
    assert_eq!(state(&farm, "b").await, HostState::Lost);
    let err = m.drain_host("b").await.unwrap_err();
    assert!(err.to_string().contains("host b is lost"), "{err}");
    let err = m.resume_host("b").await.unwrap_err();
    assert!(matches!(err, EvacuationError::NotAnswering { .. }), "{err}");
}

#[tokio::test]
async fn an_evacuation_moves_two_at_a_time_goes_on_past_a_failure_and_names_it() {
    let (farm, ids) = farm_with_vms_on_a(5).await;
    let mover = Arc::new(FakeMover {
        delay: Duration::from_millis(50),
        failing: vec![ids[2].clone()],
        ..FakeMover::default()
    });
    let task = evacuate(&farm.manager, "a", "admin", mover.clone())
        .await
        .unwrap();
    assert_eq!(state(&farm, "a").await, HostState::Draining);
    let again = evacuate(&farm.manager, "a", "admin", mover.clone()).await;
    assert!(
        matches!(again, Err(EvacuationError::Evacuating { .. })),
        "{again:?}"
    );
    let record = ended(&farm, &task).await;
    assert_eq!(record.kind, "evacuate");
    assert_eq!(record.state, TaskState::Failed);
    let error = record.error.unwrap();
    assert!(
        error.contains("1 of 5 VMs not moved") && error.contains(&ids[2]),
        "{error}"
    );
    assert_eq!(mover.most.load(Ordering::SeqCst), MOVES_AT_ONCE);
    let sent = mover.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 5, "every VM tried once: {sent:?}");
    let to: BTreeSet<&str> = sent.iter().map(|(_, to)| to.as_str()).collect();
    assert_eq!(to, BTreeSet::from(["b", "c"]), "spread, never back to a");
    let report = farm.manager.evacuation_report("a").unwrap();
    assert_eq!((report.moved, report.failed), (4, 1));
    assert_eq!(report.state, "failed");
    let failed = report.vms.iter().find(|vm| vm.vm == ids[2]).unwrap();
    assert_eq!(failed.outcome, "failed");
    assert!(
        report
            .vms
            .iter()
            .all(|vm| vm.from == "a" && vm.to.is_some())
    );
    assert_eq!(
        state(&farm, "a").await,
        HostState::Draining,
        "a stays draining"
    );
    let steps = farm.store.task_steps(&task).await.unwrap();
    assert!(
        steps.iter().any(|s| s.stage.starts_with("moving vm-")),
        "stages name the VM: {steps:?}"
    );
    assert_eq!(record.percent, 100);
}

#[tokio::test]
async fn a_cancelled_evacuation_starts_no_new_move() {
    let (farm, ids) = farm_with_vms_on_a(5).await;
    let mover = Arc::new(FakeMover {
        delay: Duration::from_millis(300),
        ..FakeMover::default()
    });
    let task = evacuate(&farm.manager, "a", "admin", mover.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    farm.manager
        .tasks
        .cancel(&task, "admin", true)
        .await
        .unwrap();
    let record = ended(&farm, &task).await;
    assert_eq!(record.state, TaskState::Cancelled, "{record:?}");
    assert_eq!(
        mover.sent.lock().unwrap().len(),
        MOVES_AT_ONCE,
        "only those under way"
    );
    let report = farm.manager.evacuation_report("a").unwrap();
    assert_eq!(report.moved as usize, MOVES_AT_ONCE);
    let skipped = report
        .vms
        .iter()
        .filter(|vm| vm.outcome == "skipped")
        .count();
    assert_eq!(skipped, ids.len() - MOVES_AT_ONCE);
    // Once it ended, the host can be resumed.
    assert_eq!(farm.manager.resume_host("a").await.unwrap().state, "up");
}
