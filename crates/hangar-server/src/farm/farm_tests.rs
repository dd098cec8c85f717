//! The farm on the fake backend: hosts registering and reporting, placement over them,
//! a host declared down then lost, its shared service made again elsewhere, and fencing
//! when it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hangar_api::{Heartbeat, HostFactsView, HostRegistration, HostVmView};
use hangar_core::{Catalog, Mode, VmState};
use hangar_host::{Host, LocalHost, LocalHostConfig};
use hangar_store::{HostState, Store, now_ms};
use hangar_vmm::fake::FakeBackend;

use crate::farm::FarmError;
use crate::images::NoImages;
use crate::manager::{Manager, ManagerConfig};
use crate::scheduler::{Connector, Scheduler};
use crate::test_support::{WEB, request};

/// A control plane without a host of its own whose farm hosts are fake-backend
/// [`LocalHost`]s, one per name, made when first connected.
pub(crate) struct Farm {
    pub(crate) manager: Arc<Manager>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) hosts: Arc<Mutex<HashMap<String, Arc<dyn Host>>>>,
    /// Where every host's fake backend keeps its VMs' segment sockets.
    pub(crate) _segments: Arc<tempfile::TempDir>,
}

impl Farm {
    pub(crate) fn new() -> Farm {
        let store: Arc<dyn Store> =
            Arc::new(hangar_store::SqliteStore::open_in_memory().expect("in-memory store"));
        let hosts: Arc<Mutex<HashMap<String, Arc<dyn Host>>>> = Arc::default();
        let made = hosts.clone();
        let segments = Arc::new(
            tempfile::Builder::new()
                .prefix("seg")
                .tempdir_in("/tmp")
                .expect("tempdir"),
        );
        let sockets = segments.clone();
        let connect: Connector = Arc::new(move |name: &str, _address: &str| {
            let mut made = made.lock().unwrap();
            let host = made
                .entry(name.to_owned())
                .or_insert_with(|| {
                    let backend = FakeBackend::new();
                    backend.keep_segment_sockets_in(sockets.path());
                    Arc::new(LocalHost::new(
                        Arc::new(backend),
                        Arc::new(NoImages),
                        LocalHostConfig {
                            name: name.to_owned(),
                            ..LocalHostConfig::default()
                        },
                    ))
                })
                .clone();
            Ok(host)
        });
        let manager = Manager::with_hosts(
            store.clone(),
            Scheduler::new(None, Some(connect)),
            Arc::new(NoImages),
            Arc::new(Catalog::from_toml(WEB).unwrap()),
            ManagerConfig {
                farm_token: "t".repeat(32),
                ..ManagerConfig::default()
            },
        );
        Farm {
            manager,
            store,
            hosts,
            _segments: segments,
        }
    }

    pub(crate) fn registration(name: &str, incarnation: &str) -> HostRegistration {
        HostRegistration {
            name: name.into(),
            address: format!("http://10.0.0.{}:7800", name.len()),
            incarnation: incarnation.into(),
            labels: Default::default(),
            cost: 1,
            priority: 0,
            facts: facts(),
            vms: Vec::new(),
        }
    }

    /// A farm of the hosts `names`, registered (incarnation `one`).
    pub(crate) async fn with_hosts(names: &[&str]) -> Farm {
        let farm = Farm::new();
        for name in names {
            farm.manager
                .register_host(Farm::registration(name, "one"))
                .await
                .unwrap();
        }
        farm
    }

    /// A farm of the hosts `names` (registered) with one dedicated `web` VM, active; the
    /// farm, the VM and its host.
    pub(crate) async fn with_vm(names: &[&str]) -> (Farm, String, String) {
        let farm = Farm::with_hosts(names).await;
        let grant = farm
            .manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap();
        (farm, grant.vm.id, grant.vm.host)
    }

    /// What the host `name` runs now, as its agent would report it.
    async fn running(&self, name: &str) -> Vec<HostVmView> {
        let host = self.hosts.lock().unwrap().get(name).cloned().unwrap();
        host.inventory()
            .await
            .unwrap()
            .into_iter()
            .map(|run| HostVmView {
                id: run.id,
                state: format!("{:?}", run.state).to_lowercase(),
            })
            .collect()
    }

    pub(crate) async fn heartbeat(
        &self,
        name: &str,
        incarnation: &str,
    ) -> hangar_api::HeartbeatReply {
        let vms = self.running(name).await;
        self.manager
            .host_heartbeat(
                name,
                Heartbeat {
                    incarnation: incarnation.into(),
                    facts: facts(),
                    vms,
                },
            )
            .await
            .unwrap()
    }

    /// Makes the host's last heartbeat `ago_ms` old.
    pub(crate) async fn silence(&self, name: &str, ago_ms: u64) {
        let record = self.store.host(name).await.unwrap().unwrap();
        self.store
            .heartbeat(name, record.state, &record.facts, now_ms() - ago_ms)
            .await
            .unwrap();
    }
}

fn facts() -> HostFactsView {
    HostFactsView {
        hypervisor: "fake".into(),
        vcpus: 4,
        memory_mib: 8192,
        free_memory_mib: 8000,
        free_disk_mib: 10_000,
        load: 0.1,
        ..HostFactsView::default()
    }
}

#[tokio::test]
async fn registered_hosts_are_listed_and_take_the_vms() {
    let farm = Farm::new();
    for name in ["a", "bb"] {
        let reply = farm
            .manager
            .register_host(Farm::registration(name, "one"))
            .await
            .unwrap();
        assert_eq!(reply.state, "up");
        assert!(reply.destroy.is_empty());
    }
    let grant = farm
        .manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    assert!(
        ["a", "bb"].contains(&grant.vm.host.as_str()),
        "{}",
        grant.vm.host
    );
    assert!(
        farm.manager.farm.placement(&grant.vm.id).is_some(),
        "the placement is explained"
    );
    let views = farm.manager.host_views().await.unwrap();
    let names: Vec<&str> = views.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a", "bb"], "no host of the server's own");
    let on = views.iter().find(|h| h.name == grant.vm.host).unwrap();
    assert_eq!(on.vms.get("active"), Some(&1));
    assert_eq!(on.state, "up");
    assert_eq!(on.vcpus, 4);
}

#[tokio::test]
async fn bad_names_unknown_hosts_and_stale_incarnations_are_refused() {
    let farm = Farm::new();
    for bad in ["", "a/b", "local", ".x"] {
        let err = farm
            .manager
            .register_host(Farm::registration(bad, "one"))
            .await
            .unwrap_err();
        assert!(matches!(err, FarmError::Invalid(_)), "{bad:?}: {err}");
    }
    let mut bad_address = Farm::registration("a", "one");
    bad_address.address = "not a url".into();
    assert!(matches!(
        farm.manager.register_host(bad_address).await,
        Err(FarmError::Invalid(_))
    ));
    let beat = |incarnation: &str| Heartbeat {
        incarnation: incarnation.into(),
        facts: facts(),
        vms: Vec::new(),
    };
    assert!(matches!(
        farm.manager.host_heartbeat("a", beat("one")).await,
        Err(FarmError::NotRegistered(_))
    ));
    farm.manager
        .register_host(Farm::registration("a", "one"))
        .await
        .unwrap();
    farm.manager.host_heartbeat("a", beat("one")).await.unwrap();
    assert!(
        matches!(
            farm.manager.host_heartbeat("a", beat("two")).await,
            Err(FarmError::NotRegistered(_))
        ),
        "another agent process registers first"
    );
    // Another agent at another address cannot take the name while this one is up.
    let mut impostor = Farm::registration("a", "three");
    impostor.address = "http://10.9.9.9:7800".into();
    assert!(matches!(
        farm.manager.register_host(impostor).await,
        Err(FarmError::NameTaken(_))
    ));
}

#[tokio::test]
async fn a_lost_host_s_shared_service_is_made_elsewhere_and_fenced_when_it_returns() {
    let farm = Farm::with_hosts(&["a", "bb"]).await;
    let first = farm
        .manager
        .request(request("web", Mode::Shared))
        .await
        .unwrap();
    let lost_host = first.vm.host.clone();
    let other = if lost_host == "a" { "bb" } else { "a" };
    farm.heartbeat(other, "one").await;

    // Silent past down_after: down, nothing else changes.
    farm.silence(&lost_host, 3_500).await;
    assert!(farm.manager.watch_hosts_once().await.is_empty());
    let record = farm.store.host(&lost_host).await.unwrap().unwrap();
    assert_eq!(record.state, HostState::Down);
    assert_eq!(
        farm.store.vm(&first.vm.id).await.unwrap().unwrap().state,
        VmState::Active
    );

    // Silent past lost_after: lost; its VM is lost (kept), the service is made again.
    farm.silence(&lost_host, 7_000).await;
    assert_eq!(
        farm.manager.watch_hosts_once().await,
        vec![lost_host.clone()]
    );
    let vm = farm.store.vm(&first.vm.id).await.unwrap().unwrap();
    assert_eq!(vm.state, VmState::Lost);
    assert!(
        vm.error
            .as_deref()
            .unwrap_or_default()
            .contains("stopped answering"),
        "{:?}",
        vm.error
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let replacement = loop {
        let again = farm
            .store
            .shared_candidates("web", &Default::default())
            .await
            .unwrap();
        if let Some(vm) = again.into_iter().find(|vm| vm.state == VmState::Active) {
            break vm;
        }
        assert!(std::time::Instant::now() < deadline, "no replacement made");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(replacement.host, other, "made on the host that answers");
    let again = farm
        .manager
        .request(request("web", Mode::Shared))
        .await
        .unwrap();
    assert_eq!(again.vm.id, replacement.id, "requests get the replacement");

    // The lost host comes back still running the old VM: it is told to destroy it.
    assert!(
        farm.running(&lost_host)
            .await
            .iter()
            .any(|run| run.id == first.vm.id),
        "the old VM still runs there"
    );
    let reply = farm.heartbeat(&lost_host, "one").await;
    assert_eq!(reply.state, "up");
    assert_eq!(reply.destroy, vec![first.vm.id.clone()]);
    let host = farm.hosts.lock().unwrap().get(&lost_host).cloned().unwrap();
    host.destroy(&first.vm.id).await.unwrap();
    farm.heartbeat(&lost_host, "one").await;
    assert_eq!(
        farm.store.vm(&first.vm.id).await.unwrap().unwrap().state,
        VmState::Deleted,
        "gone from its host: deleted"
    );
}

#[tokio::test]
async fn a_dry_run_placement_names_the_host_a_request_then_takes_and_makes_nothing() {
    let farm = Farm::new();
    for name in ["a", "bb"] {
        farm.manager
            .register_host(Farm::registration(name, "one"))
            .await
            .unwrap();
    }
    let body = hangar_api::PlacementBody {
        service: Some("web".into()),
        ..Default::default()
    };
    // A request's VM goes to the least loaded host: the two are equal, so the first by
    // name; once it holds a VM, the other.
    let first = farm.manager.preview_placement(&body).await.unwrap();
    assert_eq!(first.host, "a");
    assert!(
        first.why.contains("among 2 eligible hosts"),
        "the placement is explained: {}",
        first.why
    );
    assert_eq!(
        farm.manager.preview_placement(&body).await.unwrap(),
        first,
        "nothing reserved"
    );
    assert!(
        farm.store.vms(true).await.unwrap().is_empty(),
        "nothing made"
    );
    let grant = farm
        .manager
        .request(request("web", Mode::Dedicated))
        .await
        .unwrap();
    assert_eq!(grant.vm.host, first.host);
    let second = farm.manager.preview_placement(&body).await.unwrap();
    assert_eq!(second.host, "bb");
    assert_eq!(
        farm.manager
            .request(request("web", Mode::Dedicated))
            .await
            .unwrap()
            .vm
            .host,
        "bb"
    );

    // A bare size; too big for any host, or every host down: no host, saying why.
    let sized = |vcpus, memory_mib| hangar_api::PlacementBody {
        vcpus: Some(vcpus),
        memory_mib: Some(memory_mib),
        ..Default::default()
    };
    let placed = farm.manager.preview_placement(&sized(1, 64)).await.unwrap();
    assert_eq!((placed.vcpus, placed.memory_mib), (1, 64));
    let err = farm
        .manager
        .preview_placement(&sized(1, 1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            crate::scheduler::preview::PreviewError::Placement(
                crate::scheduler::PlacementError::NoHost(_)
            )
        ),
        "{err}"
    );
    for name in ["a", "bb"] {
        let record = farm.store.host(name).await.unwrap().unwrap();
        farm.store
            .heartbeat(
                name,
                HostState::Down,
                &record.facts,
                record.last_heartbeat_ms,
            )
            .await
            .unwrap();
    }
    farm.manager.refresh_farm().await;
    let err = farm
        .manager
        .preview_placement(&sized(1, 64))
        .await
        .unwrap_err();
    let why = err.to_string();
    assert!(
        why.contains("a (down)") && why.contains("bb (down)"),
        "{why}"
    );
}

#[tokio::test]
async fn isolation_groups_never_share_a_host_and_labels_choose_one() {
    let farm = Farm::new();
    for (name, zone) in [("a", "east"), ("bb", "west")] {
        let mut registration = Farm::registration(name, "one");
        registration.labels.insert("zone".into(), zone.into());
        farm.manager.register_host(registration).await.unwrap();
    }
    let isolated = |group: &str| hangar_core::ServiceRequest {
        isolate: Some(group.into()),
        ..request("web", Mode::Shared)
    };
    let first = farm.manager.request(isolated("db")).await.unwrap();
    let second = farm.manager.request(isolated("db")).await.unwrap();
    assert_ne!(
        first.vm.host, second.vm.host,
        "one VM of the group per host"
    );
    assert_eq!(
        first.vm.mode,
        Mode::Dedicated,
        "constrained requests get their own VM"
    );
    assert_eq!(first.vm.isolation.as_deref(), Some("db"));
    let err = farm.manager.request(isolated("db")).await.unwrap_err();
    assert!(
        matches!(err, crate::requests::RequestError::NoHost(ref why) if why.contains("isolation")),
        "{err}"
    );
    // Another group still fits beside them.
    farm.manager.request(isolated("cache")).await.unwrap();

    let west = farm
        .manager
        .request(hangar_core::ServiceRequest {
            on: [("zone".to_owned(), "west".to_owned())].into(),
            ..request("web", Mode::Dedicated)
        })
        .await
        .unwrap();
    assert_eq!(west.vm.host, "bb");
    assert!(
        west.placement.as_deref().is_some_and(|why| !why.is_empty()),
        "{:?}",
        west.placement
    );
    let nowhere = farm
        .manager
        .request(hangar_core::ServiceRequest {
            on: [("zone".to_owned(), "north".to_owned())].into(),
            ..request("web", Mode::Dedicated)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(nowhere, crate::requests::RequestError::NoHost(_)),
        "{nowhere}"
    );
}

/// A VM live-migrating to a host runs there before the store places it there. Another
/// replica (here: a task and journal written to the shared store, not this server's
/// memory) runs the migration: the destination's heartbeat to this server does not fence
/// the arriving VM; a third host reporting it, or the destination once the journal's entry
/// is undone, does.
#[tokio::test]
async fn a_vm_another_replica_migrates_is_not_fenced_on_its_destination() {
    let (farm, vm, source) = Farm::with_vm(&["a", "bb", "ccc"]).await;
    let destination = ["a", "bb", "ccc"]
        .into_iter()
        .find(|name| *name != source)
        .unwrap();
    let bystander = ["a", "bb", "ccc"]
        .into_iter()
        .find(|name| *name != source && *name != destination)
        .unwrap();

    let (task, _outcome) = farm
        .manager
        .tasks
        .begin_as(crate::migration::TASK_KIND, "admin", None)
        .await
        .unwrap();
    farm.store.set_task_vm(&task, &vm).await.unwrap();
    let entry = farm
        .manager
        .tasks
        .record_undo(
            &task,
            &crate::tasks::Undo::AbortLiveMigration {
                vm: vm.clone(),
                source: source.clone(),
                destination: destination.to_owned(),
            },
        )
        .await
        .unwrap();
    assert!(
        farm.manager.migrations.all().is_empty(),
        "this server runs no migration"
    );

    let reporting = |vm: &str| Heartbeat {
        incarnation: "one".into(),
        facts: facts(),
        vms: vec![HostVmView {
            id: vm.to_owned(),
            state: "running".into(),
        }],
    };
    let reply = farm
        .manager
        .host_heartbeat(destination, reporting(&vm))
        .await
        .unwrap();
    assert!(reply.destroy.is_empty(), "arriving: {:?}", reply.destroy);
    let reply = farm
        .manager
        .host_heartbeat(bystander, reporting(&vm))
        .await
        .unwrap();
    assert_eq!(
        reply.destroy,
        std::slice::from_ref(&vm),
        "not migrating there"
    );

    farm.store.mark_task_undone(&task, entry).await.unwrap();
    let reply = farm
        .manager
        .host_heartbeat(destination, reporting(&vm))
        .await
        .unwrap();
    assert_eq!(
        reply.destroy,
        std::slice::from_ref(&vm),
        "the migration was undone"
    );
}
