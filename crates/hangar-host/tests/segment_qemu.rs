//! Private segments with real QEMU guests (the demo catalog's `http-counter`, busybox):
//! two VMs joined to one segment reach each other's web server by private address and by
//! name; a VM on another segment (same addresses' subnet) reaches neither; the host does
//! not reach the private addresses; a join's files and restarts apply; the segment lasts
//! through sleep, archive and wake, and through a new host process adopting the VMs; a VM
//! that leaves is cut off. One join goes through the agent API ([`RemoteHost`]). Clones
//! of a template join the same way.
//!
//! Guest assets and images are built into `HANGAR_TEST_CACHE`, or a cache under cargo's
//! test temp dir (the first run fetches Debian's cloud kernel with `apt-get download`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hangar_core::Catalog;
use hangar_host::images::{DEFAULT_MIRROR, LocalImages};
use hangar_host::{
    ArchiveTier, Host, LaunchRecord, LocalHost, LocalHostConfig, MadeVm, Purpose, RemoteHost,
    SegmentJoin, VmPlan, WakeFrom,
};
use hangar_vmm::Accel;
use hangar_vmm::qemu::{QemuBackend, QemuConfig};
use hangar_vmm::tap::SegmentNetns;

use common::{Cleanup, cache_dir};

const TOKEN: &str = "segment-farm-token";

/// How the hosts of a test switch their segments.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// hangar's own switch: unix datagram netdevs.
    Switch,
    /// Taps on kernel bridges in the data dir's namespace (root only).
    Bridge,
}

/// Deletes a test's segment namespace, even when the test fails.
struct NetnsCleanup(Option<SegmentNetns>);

impl Drop for NetnsCleanup {
    fn drop(&mut self) {
        if let Some(netns) = &self.0
            && let Err(err) = netns.remove()
        {
            eprintln!("cannot delete network namespace {}: {err}", netns.name());
        }
    }
}

/// Whether kernel bridges can be tested here: root, else the test says why it is skipped.
fn bridges_testable() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: segments on kernel bridges need root");
    }
    root
}

/// The segment namespace of the data dir above `vms_dir` for `kind` (made), and its
/// cleanup.
fn netns_of(vms_dir: &Path, kind: Kind) -> NetnsCleanup {
    let root = vms_dir.parent().expect("vms dir has a parent");
    NetnsCleanup(match kind {
        Kind::Switch => None,
        Kind::Bridge => {
            let netns = SegmentNetns::for_data_dir(root);
            netns.ensure().expect("making the segment namespace");
            Some(netns)
        }
    })
}

/// A QEMU host on `vms_dir`, confined as `hangar server` confines it when run as root
/// (QEMU as `hangar-vm` or `nobody`, files private to the server: umask 0077), so that a
/// port socket the host binds must be handed to QEMU's user to be usable.
fn local_host(vms_dir: &Path, kind: Kind) -> Arc<LocalHost> {
    local_host_with(vms_dir, None, kind)
}

/// [`local_host`], making templates in `templates` when given.
fn local_host_with(vms_dir: &Path, templates: Option<PathBuf>, kind: Kind) -> Arc<LocalHost> {
    // SAFETY: umask(2) only sets the process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    let root = vms_dir.parent().expect("vms dir has a parent").to_owned();
    std::fs::create_dir_all(vms_dir).unwrap();
    let mut qemu = QemuConfig::new(vms_dir.to_owned(), Accel::Tcg);
    qemu.user =
        hangar_vmm::confine::VmUser::for_this_process(&[root.clone(), cache_dir()]).unwrap();
    qemu.segment_netns = (kind == Kind::Bridge).then(|| SegmentNetns::for_data_dir(&root));
    let images = Arc::new(LocalImages::new(
        cache_dir(),
        hangar_image::AssetSources::default(),
        Arc::new(Catalog::demo()),
        DEFAULT_MIRROR.into(),
    ));
    Arc::new(LocalHost::new(
        Arc::new(QemuBackend::new(qemu)),
        images,
        LocalHostConfig {
            name: "seg-1".into(),
            templates_dir: templates,
            guest_cmdline: hangar_image::kernel_cmdline(hangar_image::host_tsc_khz()),
            vms_dir: Some(vms_dir.to_owned()),
            ..LocalHostConfig::default()
        },
    ))
}

/// `host` served through the agent API on loopback, as a [`RemoteHost`].
async fn served(host: Arc<LocalHost>) -> RemoteHost {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = hangar_host::agent::router(host, TOKEN);
    tokio::spawn(async move { axum::serve(listener, app).await });
    RemoteHost::new("seg-1", &url, TOKEN).unwrap()
}

async fn make(host: &LocalHost, id: &str) -> (LaunchRecord, String) {
    let (made, endpoint) = make_for(host, id, Purpose::Request).await;
    (made.launch, endpoint)
}

async fn make_for(host: &LocalHost, id: &str, purpose: Purpose) -> (MadeVm, String) {
    let service = Catalog::demo()
        .services()
        .find(|service| service.name == "http-counter")
        .expect("http-counter")
        .clone();
    let plan = VmPlan {
        // A stack member: nothing out of its user-mode NIC, its peers on the segment.
        egress: hangar_core::EgressPolicy::Segment,
        ..VmPlan::for_service(id, &service, purpose)
    };
    let silent: hangar_host::ProgressFn = Arc::new(|_: &str, _: u8| {});
    let prepared = host.prepare_vm(&plan, silent.clone()).await.unwrap();
    let made = host.make_vm(&plan, &prepared, silent).await.unwrap();
    let endpoint = prepared
        .direct_endpoints
        .get("http")
        .cloned()
        .unwrap_or_default();
    (made, endpoint)
}

fn join(segment: &str, mac_last: u8, address: &str, peers: &[(&str, &str)]) -> SegmentJoin {
    SegmentJoin {
        segment: segment.into(),
        mac: format!("02:68:00:00:00:{mac_last:02x}"),
        address: address.into(),
        hosts: peers
            .iter()
            .map(|(name, ip)| (name.to_string(), ip.to_string()))
            .collect(),
        files: Vec::new(),
        restart: Vec::new(),
        reload: Vec::new(),
    }
}

/// Runs a shell command in VM `id`'s guest: (exit code, stdout + stderr).
async fn sh(host: &LocalHost, id: &str, script: &str) -> (i32, String) {
    let reply = host
        .guest_exec(id, &["sh", "-c", script], Duration::from_secs(30))
        .await
        .unwrap_or_else(|err| panic!("exec in {id}: {err}"));
    (
        reply.code.unwrap_or(-1),
        format!("{}{}", reply.stdout, reply.stderr),
    )
}

/// Whether VM `from` gets `/health.txt` from `peer` (an address or a name) over HTTP.
async fn reaches(host: &LocalHost, from: &str, peer: &str) -> bool {
    let (code, out) = sh(
        host,
        from,
        // busybox 1.35's `wget -T` crashes: `timeout` bounds it instead.
        &format!("timeout 5 wget -q -O- http://{peer}/health.txt"),
    )
    .await;
    if code != 0 {
        eprintln!("{from} → {peer}: exit {code}: {out}");
    }
    code == 0 && out.contains("ok")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Each phase runs in a runtime of its own, as a host process: ending it closes every
/// socket and task its host had (QMP, agent channels, segment ports).
#[test]
fn vms_on_a_segment_reach_each_other_and_nothing_else_does() {
    two_processes(Kind::Switch);
}

/// The same on kernel bridges (`--segment-net bridge`, root only).
#[test]
fn vms_on_a_bridged_segment_reach_each_other_and_nothing_else_does() {
    if bridges_testable() {
        two_processes(Kind::Bridge);
    }
}

fn two_processes(kind: Kind) {
    hangar_host::metrics::install();
    let tmp = tempfile::Builder::new()
        .prefix("hseg")
        .tempdir_in("/tmp")
        .unwrap();
    let vms_dir = tmp.path().join("vms");
    let _cleanup = Cleanup(vms_dir.clone());
    let _netns = netns_of(&vms_dir, kind);
    let launches = runtime().block_on(first_process(&vms_dir, kind));
    runtime().block_on(second_process(&vms_dir, launches, kind));
}

/// Joins, reachability, isolation, a join's files and restarts, sleep, archive and wake.
async fn first_process(vms_dir: &Path, kind: Kind) -> [(&'static str, LaunchRecord); 2] {
    let host = local_host(vms_dir, kind);
    let remote = served(host.clone()).await;

    let (launch_a, endpoint_a) = make(&host, "seg-a").await;
    let (launch_b, _) = make(&host, "seg-b").await;
    let (_, _) = make(&host, "seg-c").await;

    // a joins through the agent API, b and c here; c is on another segment, in the same
    // subnet, naming a as a peer.
    remote
        .join_segment(
            "seg-a",
            &join("shop", 0x0a, "10.213.0.11/24", &[("seg-b", "10.213.0.12")]),
        )
        .await
        .unwrap();
    host.join_segment(
        "seg-b",
        &join("shop", 0x0b, "10.213.0.12/24", &[("seg-a", "10.213.0.11")]),
    )
    .await
    .unwrap();
    host.join_segment(
        "seg-c",
        &join("other", 0x0c, "10.213.0.13/24", &[("seg-a", "10.213.0.11")]),
    )
    .await
    .unwrap();

    let (_, mac) = sh(&host, "seg-a", "cat /sys/class/net/eth1/address").await;
    assert_eq!(mac.trim(), "02:68:00:00:00:0a", "the guest's own MAC");
    assert!(
        reaches(&host, "seg-a", "10.213.0.12").await,
        "a → b by address"
    );
    assert!(
        reaches(&host, "seg-b", "10.213.0.11").await,
        "b → a by address"
    );
    assert!(reaches(&host, "seg-a", "seg-b").await, "a → b by name");
    assert!(
        !reaches(&host, "seg-c", "10.213.0.11").await,
        "c is on another segment"
    );
    assert!(
        !reaches(&host, "seg-c", "seg-a").await,
        "c's name for a leads nowhere"
    );
    let stats = host.segment_stats();
    let names: Vec<&str> = stats.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["other", "shop"]);
    assert!(stats[1].1.frames_forwarded > 0, "{stats:?}");
    if kind == Kind::Bridge {
        // The frames went over the kernel bridge: a's and b's taps are its ports.
        let netns = SegmentNetns::for_data_dir(vms_dir.parent().unwrap());
        let bridge = hangar_vmm::tap::bridge_name("shop");
        let ports = std::process::Command::new("ip")
            .args(["-n", netns.name(), "-o", "link", "show", "master", &bridge])
            .output()
            .unwrap();
        let ports = String::from_utf8_lossy(&ports.stdout);
        for vm in ["seg-a", "seg-b"] {
            let tap = hangar_vmm::tap::tap_name(vm);
            assert!(
                ports.contains(&tap),
                "{vm}'s tap {tap} on {bridge}: {ports}"
            );
        }
        assert!(
            !ports.contains(&hangar_vmm::tap::tap_name("seg-c")),
            "{ports}"
        );
        // The process's /metrics counts what the bridge's taps carried, within a round
        // of its counting task.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let page = hangar_host::metrics::render_recorded();
        let forwarded = page
            .lines()
            .find_map(|line| {
                line.strip_prefix("hangar_segment_frames_forwarded_total{segment=\"shop\"} ")
            })
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no frames counted for shop in:\n{page}"));
        assert!(forwarded > 0.0, "{forwarded}");
    }

    // The host has no way onto the segment: what answers there (nothing, or whatever
    // this machine's own network puts at any address) is not the guest's web server.
    let from_host = async {
        let response = reqwest::Client::new()
            .get("http://10.213.0.11/health.txt")
            .timeout(Duration::from_secs(3))
            .send()
            .await?;
        response.text().await
    }
    .await;
    assert!(
        from_host.as_ref().map_or(true, |body| body.trim() != "ok"),
        "the host reached a guest's private address: {from_host:?}"
    );

    // Joining again replaces the settings: a file written, the web server restarted.
    let (_, before) = sh(&host, "seg-b", "pidof httpd").await;
    let mut again = join("shop", 0x0b, "10.213.0.12/24", &[("seg-a", "10.213.0.11")]);
    again.files = vec![hangar_proto::FileWrite {
        path: "/www/peer.txt".into(),
        contents: "peer of seg-a\n".into(),
        mode: 0o644,
    }];
    again.restart = vec!["httpd".into()];
    host.join_segment("seg-b", &again).await.unwrap();
    let (_, after) = sh(&host, "seg-b", "pidof httpd").await;
    assert_ne!(before.trim(), after.trim(), "httpd was restarted");
    assert!(!after.trim().is_empty(), "httpd runs again");
    let (code, page) = sh(
        &host,
        "seg-a",
        "timeout 5 wget -q -O- http://seg-b/peer.txt",
    )
    .await;
    assert_eq!((code, page.trim()), (0, "peer of seg-a"));

    // Sleep and wake; archive and wake from the archive: still on the segment.
    host.sleep("seg-a").await.unwrap();
    host.wake("seg-a", &WakeFrom::Sleeping).await.unwrap();
    assert!(reaches(&host, "seg-b", "seg-a").await, "after sleep");
    host.archive("seg-a", ArchiveTier::Zstd).await.unwrap();
    assert!(
        !reaches(&host, "seg-b", "10.213.0.11").await,
        "a is archived"
    );
    let service = Catalog::demo().get("http-counter").unwrap().clone();
    host.wake(
        "seg-a",
        &WakeFrom::Archived {
            launch: launch_a.clone(),
            services: vec![service],
            direct_endpoints: [("http".to_string(), endpoint_a.clone())].into(),
        },
    )
    .await
    .unwrap();
    assert!(
        reaches(&host, "seg-b", "seg-a").await,
        "after archive and wake"
    );
    assert!(
        reaches(&host, "seg-a", "seg-b").await,
        "after archive and wake"
    );

    [("seg-a", launch_a), ("seg-b", launch_b)]
}

/// A new host process on the same directory adopts the VMs and binds their ports again
/// from the recorded membership; leaving cuts a VM off.
async fn second_process(vms_dir: &Path, launches: [(&'static str, LaunchRecord); 2], kind: Kind) {
    let host = local_host(vms_dir, kind);
    for (id, launch) in &launches {
        assert!(host.adopt(id, launch, true).await.unwrap().is_some());
    }
    assert!(
        reaches(&host, "seg-a", "seg-b").await,
        "after a new host process"
    );

    // b leaves: a cannot reach it any more.
    host.leave_segment("seg-b").await.unwrap();
    assert!(!reaches(&host, "seg-a", "10.213.0.12").await, "b left");
    // b's guest still sends on its NIC; with no port bound QEMU drops the frames quietly.
    let (code, _) = sh(&host, "seg-b", "ping -c 3 -W 1 10.213.0.11").await;
    assert_ne!(code, 0, "b's frames go nowhere");
    let log = std::fs::read_to_string(vms_dir.join("seg-b").join("qemu.log")).unwrap();
    assert!(
        !log.contains("dgram") && !log.contains("sendto") && !log.contains("n1"),
        "QEMU logged the unbound port: {log}"
    );
    assert_eq!(
        host.segment_stats().len(),
        1,
        "the switch stays while a is in it"
    );
    host.leave_segment("seg-a").await.unwrap();
    assert!(host.segment_stats().is_empty());
    for id in ["seg-a", "seg-b", "seg-c"] {
        host.destroy(id).await.unwrap();
    }
}

/// Clones of a template made since segments exist have the NIC too (their devices come
/// from the template's stream, its MAC included): two join a segment, each gets its own
/// MAC, and they reach each other by name. On kernel bridges when run as root (as
/// `hangar server` would), else on the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_clones_join_like_booted_vms() {
    let tmp = tempfile::Builder::new()
        .prefix("hsegt")
        .tempdir_in("/tmp")
        .unwrap();
    let vms_dir = tmp.path().join("vms");
    let _cleanup = Cleanup(vms_dir.clone());
    // SAFETY: geteuid(2) cannot fail.
    let kind = if unsafe { libc::geteuid() } == 0 {
        Kind::Bridge
    } else {
        Kind::Switch
    };
    let _netns = netns_of(&vms_dir, kind);
    let host = local_host_with(&vms_dir, Some(tmp.path().join("templates")), kind);
    let (template, _) = make_for(&host, "seg-template", Purpose::Template).await;
    assert!(template.template.is_some(), "a template was made");
    for (id, last, address, peer, peer_ip) in [
        ("clone-a", 0x1a, "10.213.1.11/24", "clone-b", "10.213.1.12"),
        ("clone-b", 0x1b, "10.213.1.12/24", "clone-a", "10.213.1.11"),
    ] {
        let (made, _) = make_for(&host, id, Purpose::Request).await;
        assert!(made.cloned, "{id} is a clone");
        host.join_segment(id, &join("clones", last, address, &[(peer, peer_ip)]))
            .await
            .unwrap();
        let (_, mac) = sh(&host, id, "cat /sys/class/net/eth1/address").await;
        assert_eq!(mac.trim(), format!("02:68:00:00:00:{last:02x}"));
    }
    assert!(reaches(&host, "clone-a", "clone-b").await, "a → b");
    assert!(reaches(&host, "clone-b", "clone-a").await, "b → a");
    for id in ["clone-a", "clone-b"] {
        host.destroy(id).await.unwrap();
    }
}
