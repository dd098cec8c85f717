//! Stacks on the fake backend: up (members made, recorded, endpoints only for public
//! ports), a failed member undoing everything, down, sleep and wake as a unit (a member's
//! wake wakes its peers), and the lifecycle loop acting on the stack through its front.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::VmState;
use hangar_core::stack::{StackSpec, StackState};
use hangar_store::{Store, TaskState};

use crate::manager::{Manager, ManagerConfig};
use crate::stacks::StacksError;
use crate::test_support::*;

const CATALOG: &str = r#"
[service.proxy]
os = "busybox"
memory_mib = 128
[[service.proxy.port]]
name = "http"
guest = 80
[[service.proxy.port]]
name = "admin"
guest = 81
[[service.proxy.process]]
name = "httpd"
argv = ["httpd"]
[service.proxy.settings.backends]
default = "none"
[service.proxy.templates."/etc/proxy.conf"]
content = "{{backends}}"
[service.proxy.ready]
checks = [{ tcp = { port = "http" } }]
[service.proxy.policy]
sleep_after = "150ms"

[service.api]
os = "busybox"
memory_mib = 128
[[service.api.port]]
name = "http"
guest = 8080
[[service.api.process]]
name = "api"
argv = ["api"]
[service.api.ready]
checks = [{ tcp = { port = "http" } }]
[service.api.policy]
sleep_after = "50ms"

"#;

const SHOP: &str = r#"
name = "shop"
[member.front]
service = "proxy"
public = ["http"]
env = { backends = "{{ peers.api-1.address }}:{{ peers.api-1.port }} {{ peers.api-2.address }}" }
[member.api-1]
service = "api"
[member.api-2]
service = "api"
"#;

fn setup() -> (Arc<Manager>, Arc<dyn Store>, tempfile::TempDir) {
    let (manager, backend, store) = fake_manager(
        &format!("{CATALOG}{WEB_AND_NEVER_READY}"),
        ManagerConfig::default(),
    );
    let segments = tempfile::Builder::new()
        .prefix("seg")
        .tempdir_in("/tmp")
        .unwrap();
    backend.keep_segment_sockets_in(segments.path());
    (manager, store, segments)
}

/// The segment VM `vm` joined, as its host recorded it beside its port.
fn joined(segments: &tempfile::TempDir, vm: &str) -> Option<String> {
    std::fs::read_to_string(
        segments
            .path()
            .join(vm)
            .join(hangar_host::segment::MEMBERSHIP_FILE),
    )
    .ok()
    .map(|s| s.trim().to_owned())
}

/// Waits (at most 10 s) for task `id` to end; answers its state and error.
async fn task_end(store: &Arc<dyn Store>, id: &str) -> (TaskState, Option<String>) {
    for _ in 0..500 {
        let task = store.task(id).await.unwrap().unwrap();
        if !matches!(task.state, TaskState::Running | TaskState::RollingBack) {
            return (task.state, task.error);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("task {id} did not end");
}

async fn up(manager: &Arc<Manager>, store: &Arc<dyn Store>, text: &str) -> hangar_api::StackView {
    let spec = StackSpec::from_toml(text).unwrap();
    let (task, view) = manager.stack_up("alice", spec).await.unwrap();
    assert_eq!(view.state, StackState::Creating);
    let (state, error) = task_end(store, &task).await;
    assert_eq!(state, TaskState::Succeeded, "{error:?}");
    manager.stack(&view.name, None).await.unwrap()
}

async fn vm_state(store: &Arc<dyn Store>, id: &str) -> VmState {
    store.vm(id).await.unwrap().unwrap().state
}

#[tokio::test]
async fn up_makes_every_member_with_endpoints_only_for_public_ports_and_down_removes_it() {
    let (manager, store, segments) = setup();
    let stack = up(&manager, &store, SHOP).await;
    assert_eq!(stack.state, StackState::Up);
    assert_eq!(stack.segment, "10.213.0.0/24");
    assert_eq!(stack.owner, "alice");
    let names: Vec<&str> = stack.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["api-1", "api-2", "front"], "peers first");
    for member in &stack.members {
        let vm = member.vm.as_deref().expect("every member has a VM");
        let record = store.vm(vm).await.unwrap().unwrap();
        assert_eq!(record.state, VmState::Active);
        assert_eq!(joined(&segments, vm).as_deref(), Some("shop"), "{vm}");
        assert_eq!(record.owner, "alice");
        assert_eq!(record.mode, hangar_core::Mode::Dedicated);
    }
    let front = &stack.members[2];
    assert_eq!(front.address, "10.213.0.12");
    assert_eq!(
        front.endpoints.keys().collect::<Vec<_>>(),
        ["http"],
        "admin is not public"
    );
    assert!(
        stack.members[0].endpoints.is_empty(),
        "backends: no endpoint"
    );
    // The store agrees (what the forwarder is given at start-up).
    let record = store
        .vm(front.vm.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.endpoints.len(), 1);
    // Only public ports are forwarded from the host: the front's admin port and the
    // backends' ports are closed, and recorded so (a wake does not open them again).
    let forwarded = |record: &hangar_store::VmRecord| -> Vec<u64> {
        record.spec["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["guest_port"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(forwarded(&record), [80], "{}", record.spec);
    assert_eq!(record.direct_endpoints.keys().collect::<Vec<_>>(), ["http"]);
    for backend in &stack.members[..2] {
        let record = store
            .vm(backend.vm.as_deref().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert!(forwarded(&record).is_empty(), "{}", record.spec);
        assert!(record.direct_endpoints.is_empty(), "{record:?}");
    }

    // A second stack of that name is refused; another name gets the next segment.
    let err = manager
        .stack_up("alice", StackSpec::from_toml(SHOP).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StacksError::NameTaken(_)), "{err:?}");
    let other = up(&manager, &store, &SHOP.replace("\"shop\"", "\"blog\"")).await;
    assert_eq!(other.segment, "10.213.1.0/24");
    // Another user sees neither.
    assert!(
        manager
            .stacks(Some(("bob", hangar_core::Role::Provisioner)))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        manager
            .stack_down("shop", Some(("bob", hangar_core::Role::Provisioner)))
            .await,
        Err(StacksError::NotFound(_))
    ));

    manager.stack_down("shop", None).await.unwrap();
    for member in &stack.members {
        let vm = member.vm.as_deref().unwrap();
        assert_eq!(vm_state(&store, vm).await, VmState::Deleted);
        assert_eq!(joined(&segments, vm), None, "{vm} left its segment");
    }
    assert!(store.stack("shop").await.unwrap().is_none());
    // Its segment is free again.
    let again = up(&manager, &store, SHOP).await;
    assert_eq!(again.segment, "10.213.0.0/24");
}

/// The DNS zone (`dns::Zone`) the store's VMs and stacks make now, for `vms.test`.
async fn dns_zone(store: &Arc<dyn Store>) -> crate::dns::Zone {
    let vms = store.vms(false).await.unwrap();
    let mut zone = crate::dns::Zone::from_vms("vms.test", &vms);
    zone.add_stacks(&store.stacks().await.unwrap(), &vms);
    zone
}

#[tokio::test]
async fn a_member_with_a_public_port_has_a_dns_name_until_down() {
    use crate::dns::Lookup;
    let (manager, store, _segments) = setup();
    let stack = up(&manager, &store, SHOP).await;
    let front = &stack.members[2];
    let endpoint: std::net::SocketAddr = front.endpoints["http"].parse().unwrap();
    let zone = dns_zone(&store).await;
    let Lookup::Name(entry) = zone.lookup("front.shop.vms.test") else {
        panic!("front.shop: {:?}", zone.lookup("front.shop.vms.test"))
    };
    assert_eq!(entry.addresses(), vec![endpoint.ip()]);
    assert_eq!(
        zone.lookup("_http._tcp.front.shop.vms.test"),
        Lookup::Port {
            name: "front.shop",
            port: endpoint
        }
    );
    assert_eq!(
        zone.lookup("api-1.shop.vms.test"),
        Lookup::NoSuchName,
        "not public"
    );

    manager.stack_down("shop", None).await.unwrap();
    assert_eq!(
        dns_zone(&store).await.lookup("front.shop.vms.test"),
        Lookup::NoSuchName
    );
}

#[tokio::test]
async fn a_member_that_fails_undoes_the_whole_stack() {
    let (manager, store, _segments) = setup();
    let text = "name = \"bad\"\n[member.api]\nservice = \"api\"\n[member.broken]\nservice = \"never-ready\"\n";
    let (task, _) = manager
        .stack_up("alice", StackSpec::from_toml(text).unwrap())
        .await
        .unwrap();
    let (state, error) = task_end(&store, &task).await;
    assert_eq!(state, TaskState::Failed);
    assert!(error.unwrap().contains("member broken"));
    assert!(store.stack("bad").await.unwrap().is_none());
    // No member is left live (the api member was made, then deleted by the undo).
    for vm in store.vms(false).await.unwrap() {
        assert!(
            matches!(vm.state, VmState::Deleted | VmState::Failed),
            "{} is {}",
            vm.id,
            vm.state
        );
    }
}

#[tokio::test]
async fn invalid_stacks_are_refused_before_anything_is_made() {
    let (manager, store, _segments) = setup();
    let err = manager
        .stack_up(
            "alice",
            StackSpec::from_toml("name = \"s\"\n[member.a]\nservice = \"apj\"\n").unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("did you mean api"), "{err}");
    assert!(store.stacks().await.unwrap().is_empty());
    assert!(store.vms(false).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_stack_sleeps_and_wakes_as_a_unit() {
    let (manager, store, _segments) = setup();
    let stack = up(&manager, &store, SHOP).await;
    let vms: Vec<String> = stack
        .members
        .iter()
        .map(|m| m.vm.clone().unwrap())
        .collect();
    let slept = manager.stack_sleep("shop", None).await.unwrap();
    assert_eq!(slept.state, StackState::Sleeping);
    for vm in &vms {
        assert_eq!(vm_state(&store, vm).await, VmState::Sleeping);
    }
    // Waking the front (as a connection to its endpoint does) wakes its peers too.
    manager.wake(&vms[2]).await.unwrap();
    for vm in &vms {
        assert_eq!(vm_state(&store, vm).await, VmState::Active);
    }
    assert_eq!(
        store.stack("shop").await.unwrap().unwrap().state,
        StackState::Up
    );
    // Archived together, woken together.
    manager.stack_archive("shop", None).await.unwrap();
    for vm in &vms {
        assert_eq!(vm_state(&store, vm).await, VmState::Archived);
    }
    let woken = manager.stack_wake("shop", None).await.unwrap();
    assert_eq!(woken.state, StackState::Up);
    for vm in &vms {
        assert_eq!(vm_state(&store, vm).await, VmState::Active);
    }
}

#[tokio::test]
async fn the_lifecycle_loop_sleeps_the_stack_when_its_front_is_idle_never_a_member_alone() {
    let (manager, store, _segments) = setup();
    let stack = up(&manager, &store, SHOP).await;
    let vms: Vec<String> = stack
        .members
        .iter()
        .map(|m| m.vm.clone().unwrap())
        .collect();
    // The backends' own policy (50 ms) would sleep them first: it is not applied.
    tokio::time::sleep(Duration::from_millis(80)).await;
    manager.reconcile_lifecycle().await.unwrap();
    assert_eq!(vm_state(&store, &vms[0]).await, VmState::Active);
    // The front's (150 ms) sleeps the whole stack.
    for _ in 0..100 {
        manager.reconcile_lifecycle().await.unwrap();
        if store.stack("shop").await.unwrap().unwrap().state == StackState::Sleeping {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for vm in &vms {
        assert_eq!(vm_state(&store, vm).await, VmState::Sleeping);
    }
}

#[tokio::test]
async fn a_member_off_its_segment_joins_again_as_after_a_live_move() {
    let (manager, store, segments) = setup();
    let stack = up(&manager, &store, SHOP).await;
    let vm = stack.members[0].vm.clone().unwrap();
    let record = store.vm(&vm).await.unwrap().unwrap();
    // As on a migration's destination: the VM runs there without a port.
    manager.host_of(&record).leave_segment(&vm).await.unwrap();
    assert_eq!(joined(&segments, &vm), None);
    manager.rejoin_stack_member(&record).await;
    assert_eq!(joined(&segments, &vm).as_deref(), Some("shop"));
    // A VM in no stack is left as it is.
    let alone = manager
        .request(request("api", hangar_core::Mode::Dedicated))
        .await
        .unwrap()
        .vm;
    manager.rejoin_stack_member(&alone).await;
    assert_eq!(joined(&segments, &alone.id), None);
}

#[tokio::test]
async fn on_a_farm_every_member_goes_to_the_first_ones_host() {
    let farm = crate::farm::farm_tests::Farm::new();
    for name in ["a", "bb", "ccc"] {
        farm.manager
            .register_host(crate::farm::farm_tests::Farm::registration(name, "one"))
            .await
            .unwrap();
    }
    let text = "name = \"trio\"\n[member.one]\nservice = \"web\"\npublic = [\"http\"]\n\
                [member.two]\nservice = \"web\"\n[member.three]\nservice = \"web\"\n";
    let stack = up(&farm.manager, &farm.store, text).await;
    let mut hosts = Vec::new();
    for member in &stack.members {
        let vm = member.vm.as_deref().unwrap();
        hosts.push(farm.store.vm(vm).await.unwrap().unwrap().host);
    }
    assert_eq!(hosts.len(), 3);
    assert!(hosts.iter().all(|h| *h == hosts[0]), "{hosts:?}");
    // Without the pin they would have spread: requests go to the least loaded host.
    let grant = farm
        .manager
        .request(request("web", hangar_core::Mode::Dedicated))
        .await
        .unwrap();
    assert_ne!(grant.vm.host, hosts[0], "a lone request goes elsewhere");
}
