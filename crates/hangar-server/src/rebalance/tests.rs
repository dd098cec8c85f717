use std::sync::Mutex;

use super::*;

/// A mover that records what it was asked, moves the VM in its copy of the store's
/// records unless told to fail for it.
#[derive(Default)]
struct FakeMover {
    vms: Mutex<Vec<VmRecord>>,
    failing: Vec<String>,
    asked: Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl Mover for FakeMover {
    async fn migrate(&self, vm: &str, to: &str) -> Result<(), String> {
        self.asked
            .lock()
            .unwrap()
            .push((vm.to_owned(), to.to_owned()));
        if self.failing.iter().any(|id| id == vm) {
            return Err(format!("{vm} cannot move"));
        }
        let mut vms = self.vms.lock().unwrap();
        let record = vms.iter_mut().find(|r| r.id == vm).expect("a known vm");
        record.host = to.to_owned();
        Ok(())
    }
}

impl FakeMover {
    fn with(vms: Vec<VmRecord>) -> FakeMover {
        FakeMover {
            vms: Mutex::new(vms),
            ..FakeMover::default()
        }
    }

    fn vms(&self) -> Vec<VmRecord> {
        self.vms.lock().unwrap().clone()
    }

    fn asked(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.asked.lock().unwrap())
    }

    fn on(&self, host: &str) -> usize {
        self.vms().iter().filter(|vm| vm.host == host).count()
    }
}

/// Three empty 8-vCPU (2 CPUs × 4), 8 GiB up hosts a, b, c.
fn hosts() -> Vec<HostFacts> {
    ["a", "b", "c"]
        .iter()
        .map(|name| HostFacts::new(*name, 8, 8192))
        .collect()
}

/// A 1-vCPU, 256 MiB VM `id` of service web on `host`, in `state`.
fn vm(id: &str, host: &str, state: VmState) -> VmRecord {
    VmRecord {
        host: host.into(),
        memory_mib: 256,
        ..crate::test_support::vm_record(id, state)
    }
}

/// `n` active VMs `{prefix}0..` on `host`.
fn active(prefix: &str, host: &str, n: usize) -> Vec<VmRecord> {
    (0..n)
        .map(|i| vm(&format!("{prefix}{i}"), host, VmState::Active))
        .collect()
}

fn config(max_moves: usize, cooldown: Duration) -> RebalanceConfig {
    RebalanceConfig {
        interval: Duration::from_secs(1),
        max_moves,
        margin_permille: 20,
        cooldown,
    }
}

#[tokio::test]
async fn vms_move_off_the_loaded_host_until_even_and_then_stay() {
    // No cooldown: the decision itself never moves a moved VM again.
    let mut rebalancer = Rebalancer::new(config(10, Duration::ZERO));
    let mover = FakeMover::with(active("v", "a", 6));
    let outcomes = rebalancer
        .round(&hosts(), &mover.vms(), &mover, 1_000)
        .await;
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes.iter().all(|o| o.from == "a" && o.result.is_ok()));
    assert!(
        outcomes[0].reason.contains("over the farm's 25.0%"),
        "{}",
        outcomes[0].reason
    );
    assert_eq!((mover.on("a"), mover.on("b"), mover.on("c")), (2, 2, 2));
    mover.asked();
    for now in [2_000, 3_000] {
        assert!(
            rebalancer
                .round(&hosts(), &mover.vms(), &mover, now)
                .await
                .is_empty()
        );
    }
    assert!(mover.asked().is_empty(), "nothing asked once even");
}

#[tokio::test]
async fn a_round_makes_at_most_max_moves() {
    let mut rebalancer = Rebalancer::new(config(1, Duration::from_secs(60)));
    let mover = FakeMover::with(active("v", "a", 6));
    let mut per_round = Vec::new();
    for round in 0..6 {
        let now = 1_000 * (round + 1);
        per_round.push(
            rebalancer
                .round(&hosts(), &mover.vms(), &mover, now)
                .await
                .len(),
        );
    }
    assert_eq!(per_round, [1, 1, 1, 1, 0, 0]);
    assert_eq!((mover.on("a"), mover.on("b"), mover.on("c")), (2, 2, 2));
}

#[tokio::test]
async fn a_failed_move_puts_the_vm_in_cooldown() {
    let mut rebalancer = Rebalancer::new(config(1, Duration::from_secs(60)));
    let mut mover = FakeMover::with(active("v", "a", 3));
    mover.failing = vec!["v0".into()];
    let first = rebalancer
        .round(&hosts(), &mover.vms(), &mover, 1_000)
        .await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].vm, "v0", "first by name");
    assert_eq!(first[0].result, Err("v0 cannot move".into()));
    assert_eq!(mover.on("a"), 3);
    // Within the cooldown another VM goes instead.
    let second = rebalancer
        .round(&hosts(), &mover.vms(), &mover, 2_000)
        .await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].vm, "v1");
    assert!(second[0].result.is_ok());
    // After it, v0 is tried again (a: 2 VMs, c: none).
    mover.asked();
    let later = rebalancer
        .round(&hosts(), &mover.vms(), &mover, 61_001)
        .await;
    assert_eq!(mover.asked(), [("v0".to_string(), "c".to_string())]);
    assert!(later[0].result.is_err());
}

#[tokio::test]
async fn pool_vms_and_vms_being_made_take_room_but_stay() {
    let mut rebalancer = Rebalancer::new(config(10, Duration::ZERO));
    let mut vms = active("v", "a", 6);
    // b is full of pool VMs and VMs being made; archived VMs take no room.
    for (i, state) in [VmState::Ready, VmState::Booting, VmState::Creating]
        .into_iter()
        .cycle()
        .take(8)
        .enumerate()
    {
        vms.push(vm(&format!("p{i}"), "b", state));
    }
    vms.push(vm("old", "c", VmState::Archived));
    vms.push(vm("elsewhere", "gone", VmState::Active));
    let mover = FakeMover::with(vms);
    let outcomes = rebalancer
        .round(&hosts(), &mover.vms(), &mover, 1_000)
        .await;
    assert!(!outcomes.is_empty());
    assert!(
        outcomes.iter().all(|o| o.from == "a" && o.to == "c"),
        "{outcomes:?}"
    );
    assert_eq!(mover.on("b"), 8);
    let (hosts, movable) = rebalancer.input(&hosts(), &mover.vms());
    assert_eq!(hosts[1].used_vcpus, 8, "b's VMs counted");
    assert!(
        movable.iter().all(|vm| vm.id.starts_with('v')),
        "{movable:?}"
    );
}

#[tokio::test]
async fn draining_hosts_are_left_to_their_drain() {
    let mut rebalancer = Rebalancer::new(config(10, Duration::ZERO));
    let mut hosts = hosts();
    hosts[0].state = hangar_core::placement::HostState::Draining;
    let mover = FakeMover::with(active("v", "a", 6));
    assert!(
        rebalancer
            .round(&hosts, &mover.vms(), &mover, 1_000)
            .await
            .is_empty()
    );
}
