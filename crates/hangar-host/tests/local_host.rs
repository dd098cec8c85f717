//! The Host trait through LocalHost on the fake backend: a VM made from a plan up to ready,
//! handed out from a pool, slept, archived and woken, destroyed; templates made and cloned;
//! inventory and facts. Only what the trait speaks crosses: ids, plans, endpoints, stages.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use hangar_core::{Catalog, Service};
use hangar_host::images::NoImages;
use hangar_host::{
    ArchiveTier, HandOut, Host, LaunchRecord, LocalHost, LocalHostConfig, Purpose, RunState,
    VmPlan, WakeFrom,
};
use hangar_vmm::fake::FakeBackend;

const CATALOG: &str = r#"
[service.web]
os = "busybox"
vcpus = 2
memory_mib = 512
[[service.web.port]]
name = "http"
guest = 80
[[service.web.process]]
name = "httpd"
argv = ["httpd"]
[service.web.ready]
checks = [{ tcp = { port = "http" } }, { http = { port = "http", body_contains = "fake" } }]
"#;

fn web() -> Service {
    Catalog::from_toml(CATALOG)
        .unwrap()
        .get("web")
        .unwrap()
        .clone()
}

fn host(backend: &FakeBackend, config: LocalHostConfig) -> LocalHost {
    LocalHost::new(Arc::new(backend.clone()), Arc::new(NoImages), config)
}

fn plan(id: &str, purpose: Purpose) -> VmPlan {
    let service = web();
    VmPlan {
        id: id.into(),
        vcpus: service.vcpus,
        memory_mib: service.memory_mib,
        os: Some(service.os.clone()),
        service: Some(service),
        env: Default::default(),
        hostname: id.into(),
        purpose,
        ready: None,
        egress: Default::default(),
    }
}

/// Stages reported through the progress callback, in order.
fn recorder() -> (hangar_host::ProgressFn, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = seen.clone();
    (
        Arc::new(move |stage: &str, _percent: u8| into.lock().unwrap().push(stage.to_owned())),
        seen,
    )
}

async fn get(endpoint: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(endpoint).await.unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn a_vm_is_made_to_ready_and_goes_through_its_life() {
    let backend = FakeBackend::new();
    let host = host(&backend, LocalHostConfig::default());
    let plan = plan("vm-a", Purpose::Request);
    let (progress, seen) = recorder();
    let prepared = host.prepare_vm(&plan, progress.clone()).await.unwrap();
    let endpoint = prepared.direct_endpoints["http"].clone();
    assert!(endpoint.starts_with("127.0.0.1:"), "{endpoint}");
    let made = host.make_vm(&plan, &prepared, progress).await.unwrap();
    assert!(!made.cloned && made.template.is_none());
    assert_eq!(
        *seen.lock().unwrap(),
        ["image", "launch", "boot", "ready"],
        "progress, in order"
    );
    assert!(get(&endpoint).await.contains("fake vm-a"));
    assert_eq!(host.run_state("vm-a").await.unwrap(), RunState::Running);
    assert_eq!(
        host.inventory().await.unwrap(),
        [hangar_host::VmRun {
            id: "vm-a".into(),
            state: RunState::Running
        }]
    );

    host.sleep("vm-a").await.unwrap();
    assert_eq!(host.run_state("vm-a").await.unwrap(), RunState::Paused);
    let woken = host.wake("vm-a", &WakeFrom::Sleeping).await.unwrap();
    let names: Vec<&str> = woken.stages.0.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["resume", "identity"]);

    let archive = host.archive("vm-a", ArchiveTier::Zstd).await.unwrap();
    assert_eq!(archive.tier, ArchiveTier::Zstd);
    assert_eq!(host.archive_facts("vm-a").await.unwrap(), Some(archive));
    assert_eq!(host.run_state("vm-a").await.unwrap(), RunState::Gone);
    let from = WakeFrom::Archived {
        launch: made.launch.clone(),
        services: vec![web()],
        direct_endpoints: prepared.direct_endpoints.clone(),
    };
    let woken = host.wake("vm-a", &from).await.unwrap();
    let names: Vec<&str> = woken.stages.0.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["restore", "identity", "ready"]);
    assert!(
        host.archive_facts("vm-a").await.unwrap().is_none(),
        "the archive is gone"
    );
    assert!(get(&endpoint).await.contains("fake vm-a"));

    host.destroy("vm-a").await.unwrap();
    host.destroy("vm-a").await.unwrap();
    assert!(host.inventory().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_pool_vm_waits_paused_and_is_handed_out_sliced() {
    let backend = FakeBackend::new();
    let host = host(&backend, LocalHostConfig::default());
    let plan = plan("vm-p", Purpose::Pool);
    let (progress, _) = recorder();
    let prepared = host.prepare_vm(&plan, progress.clone()).await.unwrap();
    host.make_vm(&plan, &prepared, progress).await.unwrap();
    assert_eq!(host.run_state("vm-p").await.unwrap(), RunState::Paused);

    let handed = host
        .hand_out(
            "vm-p",
            &HandOut {
                slice_to: Some((1, 256)),
                size: (2, 512),
            },
        )
        .await
        .unwrap();
    assert_eq!(handed.sliced_to, Some((1, 256)));
    assert_eq!(backend.memory_mib("vm-p"), Some(256));
    let names: Vec<&str> = handed.stages.0.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["priority", "resume", "identity", "slice"]);
    assert_eq!(host.run_state("vm-p").await.unwrap(), RunState::Running);
    host.destroy("vm-p").await.unwrap();
}

#[tokio::test]
async fn a_template_is_made_then_cloned_and_a_restarted_host_adopts() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalHostConfig {
        templates_dir: Some(dir.path().join("templates")),
        vms_dir: Some(dir.path().join("vms")),
        ..LocalHostConfig::default()
    };
    let backend = FakeBackend::new();
    let host = host(&backend, config.clone());
    assert!(host.templates_apply(&web()).await);
    assert!(!host.has_template(&web()).await.unwrap());

    let plan_t = plan("vm-t", Purpose::Template);
    let (progress, _) = recorder();
    let prepared = host.prepare_vm(&plan_t, progress.clone()).await.unwrap();
    let made = host
        .make_vm(&plan_t, &prepared, progress.clone())
        .await
        .unwrap();
    let template = made.template.expect("a template");
    assert_eq!(template.service, "web");
    assert!(host.has_template(&web()).await.unwrap());
    let held = host.templates(&[web()]).await.unwrap();
    assert_eq!(held.len(), 1);
    assert!(held[0].current);
    assert_eq!(
        host.facts().await.unwrap().templates,
        vec![template.id.clone()]
    );

    let plan_c = plan("vm-c", Purpose::Request);
    let prepared = host.prepare_vm(&plan_c, progress.clone()).await.unwrap();
    let made = host.make_vm(&plan_c, &prepared, progress).await.unwrap();
    assert!(made.cloned);
    assert_eq!(host.template_of(&made.launch), Some(template.id.clone()));
    assert_eq!(backend.clones(), 1);

    // A new host process finds the clone again from its launch record.
    let again = self::host(&backend, config);
    let adopted = again
        .adopt("vm-c", &made.launch, true)
        .await
        .unwrap()
        .expect("adopted");
    assert_eq!(adopted.process, None, "the fake backend has no processes");
    assert!(
        again
            .adopt(
                "vm-gone",
                &LaunchRecord(serde_json::json!({
                    "id": "vm-gone", "vcpus": 1, "memory_mib": 64, "kernel": "/k",
                    "initramfs": "/i", "cmdline": "", "base_image": null, "forwards": []
                })),
                true
            )
            .await
            .unwrap()
            .is_none()
    );
    again.wake("vm-c", &WakeFrom::Sleeping).await.unwrap();

    let keep: HashSet<String> = ["vm-c".to_owned()].into();
    std::fs::create_dir_all(dir.path().join("vms/vm-old")).unwrap();
    assert_eq!(again.remove_leftovers(&keep).await.unwrap(), ["vm-old"]);
    again.destroy("vm-c").await.unwrap();
    again.remove_template(&template.id).await.unwrap();
    assert!(!again.has_template(&web()).await.unwrap());
}

#[tokio::test]
async fn the_host_is_object_safe_and_reports_facts() {
    let host: Arc<dyn Host> = Arc::new(host(&FakeBackend::new(), LocalHostConfig::default()));
    let facts = host.facts().await.unwrap();
    assert_eq!(
        (facts.name.as_str(), facts.hypervisor.as_str()),
        ("local", "fake")
    );
    assert!(facts.vcpus >= 1 && facts.memory_mib > 0);
}

/// On the fake backend a VM joins a segment (its guest answers the private network), an
/// invalid join is refused before anything changes, and leaving or destroying removes the
/// segment's switch with its last member.
#[tokio::test]
async fn a_vm_joins_and_leaves_a_private_segment() {
    let backend = FakeBackend::new();
    let sockets = tempfile::tempdir().unwrap();
    backend.keep_segment_sockets_in(sockets.path());
    let host = host(&backend, LocalHostConfig::default());
    let (progress, _) = recorder();
    for id in ["vm-s1", "vm-s2"] {
        let plan = plan(id, Purpose::Request);
        let prepared = host.prepare_vm(&plan, progress.clone()).await.unwrap();
        host.make_vm(&plan, &prepared, progress.clone())
            .await
            .unwrap();
    }
    let join = |address: &str| hangar_host::SegmentJoin {
        segment: "shop".into(),
        mac: "02:68:00:00:00:0b".into(),
        address: address.into(),
        hosts: vec![("peer".into(), "10.213.0.12".into())],
        files: Vec::new(),
        restart: vec!["httpd".into()],
        reload: Vec::new(),
    };
    let refused = host.join_segment("vm-s1", &join("8.8.8.8/24")).await;
    assert!(
        matches!(refused, Err(hangar_host::HostError::Segment(_))),
        "{refused:?}"
    );
    assert!(
        host.segment_stats().is_empty(),
        "nothing made for a refused join"
    );
    host.join_segment("vm-s1", &join("10.213.0.11/24"))
        .await
        .unwrap();
    host.join_segment("vm-s2", &join("10.213.0.12/24"))
        .await
        .unwrap();
    assert_eq!(host.segment_stats().len(), 1, "one switch for the segment");
    assert!(matches!(
        host.join_segment("nobody", &join("10.213.0.13/24")).await,
        Err(hangar_host::HostError::NoAgent)
    ));
    host.leave_segment("vm-s1").await.unwrap();
    host.leave_segment("vm-s1").await.unwrap();
    assert_eq!(host.segment_stats().len(), 1, "vm-s2 is still in it");
    host.destroy("vm-s2").await.unwrap();
    assert!(host.segment_stats().is_empty(), "gone with its last member");
    host.destroy("vm-s1").await.unwrap();
}
