//! End-to-end tests with real QEMU guests (TCG), through the real `hangar` binary.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, fetch, http_get};

fn request(server: &TestServer, service: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["request", service];
    args.extend_from_slice(extra);
    server.json(&args)
}

fn vm_by_id(server: &TestServer, id: &str) -> serde_json::Value {
    let vms = server.json(&["vms", "--all"]);
    vms.as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not listed: {vms}"))
}

#[test]
fn http_static_is_served_by_a_real_guest_and_rm_leaves_nothing() {
    let server = TestServer::start();
    let services = server.json(&["services"]);
    let names: Vec<_> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"http-static") && names.contains(&"http-counter"),
        "{names:?}"
    );

    let grant = request(&server, "http-static", &[]);
    assert_eq!(grant["service"], "http-static");
    assert_eq!(grant["state"], "active");
    let endpoint = grant["endpoint"].as_str().unwrap();
    let page = fetch(endpoint, "/");
    assert!(page.contains("Hello from a hangar VM"), "{page}");
    eprintln!("http-static: launch to ready in {} ms", grant["boot_ms"]);

    let id = grant["vm"].as_str().unwrap();
    let vm = vm_by_id(&server, id);
    assert_eq!(
        (vm["host"].as_str(), vm["state"].as_str()),
        (Some("local"), Some("active"))
    );
    assert_eq!(vm["services"][0], "http-static");
    assert_eq!(vm["endpoints"]["http"], endpoint);
    let pid = vm["pid"].as_u64().unwrap() as u32;
    assert!(server.qemu_processes().contains(&(id.to_owned(), pid)));
    let hostname = std::fs::read_to_string(server.vms_dir().join(id).join("console.log")).unwrap();
    assert!(!hostname.is_empty(), "the guest console is captured");

    let out = server.ok(&["rm", id]);
    assert_eq!(out.trim(), format!("{id} deleted"));
    assert!(server.qemu_processes().is_empty(), "no QEMU left");
    assert!(!server.vms_dir().join(id).exists(), "no VM files left");
    assert!(
        std::fs::read_dir(server.vms_dir())
            .unwrap()
            .next()
            .is_none()
    );
    assert!(
        http_get(&endpoint.parse().unwrap(), "/").is_err(),
        "the endpoint is closed"
    );
    assert_eq!(vm_by_id(&server, id)["state"], "deleted");
    assert!(server.json(&["vms"]).as_array().unwrap().is_empty());
}

#[test]
fn shared_requests_get_the_same_counter_vm_and_state_lives_in_guest_memory() {
    let server = TestServer::start();
    let first = request(&server, "http-counter", &[]);
    let second = request(&server, "http-counter", &[]);
    assert_eq!(first["vm"], second["vm"]);
    assert_eq!(
        (first["reused"].as_bool(), second["reused"].as_bool()),
        (Some(false), Some(true))
    );
    let endpoint = first["endpoint"].as_str().unwrap();
    assert_eq!(fetch(endpoint, "/").trim(), "1");
    assert_eq!(fetch(endpoint, "/").trim(), "2");
    assert_eq!(fetch(endpoint, "/health.txt").trim(), "ok");
    assert_eq!(
        fetch(endpoint, "/").trim(),
        "3",
        "health checks do not count"
    );

    let dedicated = request(&server, "http-counter", &["--dedicated"]);
    assert_ne!(dedicated["vm"], first["vm"]);
    assert_eq!(
        fetch(dedicated["endpoint"].as_str().unwrap(), "/").trim(),
        "1",
        "its own guest memory"
    );

    let task = server.json(&["task", "show", first["task"].as_str().unwrap()]);
    assert_eq!(
        (task["state"].as_str(), task["percent"].as_u64()),
        (Some("succeeded"), Some(100))
    );
}

#[test]
fn guests_survive_kill_9_of_the_server_and_are_adopted() {
    let mut server = TestServer::start();
    let grant = request(&server, "http-counter", &[]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&endpoint, "/").trim(), "1");

    server.kill9();
    assert_eq!(
        fetch(&endpoint, "/").trim(),
        "2",
        "the guest runs on without the server"
    );

    server.spawn();
    let vm = vm_by_id(&server, &id);
    assert_eq!(vm["state"], "active");
    assert!(server.log().contains("qemu adopted"), "{}", server.log());
    assert_eq!(fetch(&endpoint, "/").trim(), "3", "same guest, same memory");
    let again = request(&server, "http-counter", &[]);
    assert_eq!(
        again["vm"],
        id.as_str(),
        "the adopted VM serves shared requests"
    );
    server.ok(&["rm", &id]);
    assert!(server.qemu_processes().is_empty());
}

#[test]
fn restart_fails_vms_whose_qemu_died_and_stops_strangers() {
    let mut server = TestServer::start();
    let grant = request(&server, "http-static", &[]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let pid = vm_by_id(&server, &id)["pid"].as_u64().unwrap() as u32;
    server.kill9();
    common::kill(pid);

    // A QEMU under this data dir that the store does not know (e.g. from a lost database).
    let stranger_dir = server.vms_dir().join("vm-stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    let status = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-daemonize",
            "-pidfile",
        ])
        .arg(stranger_dir.join("qemu.pid"))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(server.qemu_processes().len(), 1);

    server.spawn();
    let vm = vm_by_id(&server, &id);
    assert_eq!(vm["state"], "failed");
    assert!(
        vm["error"]
            .as_str()
            .unwrap()
            .contains("gone when the server started"),
        "{vm}"
    );
    assert!(
        server.qemu_processes().is_empty(),
        "the stranger was stopped"
    );
    assert!(!stranger_dir.exists(), "and its files removed");
    assert!(
        !server.vms_dir().join(&id).exists(),
        "the failed VM's files are gone"
    );
    server.ok(&["rm", &id]);
    assert_eq!(vm_by_id(&server, &id)["state"], "deleted");
}

#[test]
fn a_vm_that_crashes_while_the_server_runs_is_marked_failed() {
    let server = TestServer::start();
    let grant = request(&server, "http-static", &[]);
    let id = grant["vm"].as_str().unwrap();
    let pid = vm_by_id(&server, id)["pid"].as_u64().unwrap() as u32;
    common::kill(pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let vm = vm_by_id(&server, id);
        if vm["state"] == "failed" {
            assert!(
                vm["error"]
                    .as_str()
                    .unwrap()
                    .contains("exited unexpectedly"),
                "{vm}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "crash not noticed: {vm}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!server.vms_dir().join(id).exists());
    // A shared request now gets a new, working VM.
    let fresh = request(&server, "http-static", &[]);
    assert_ne!(fresh["vm"].as_str(), Some(id));
    assert!(fetch(fresh["endpoint"].as_str().unwrap(), "/").contains("hangar VM"));
}

/// Issue 13, finding 8: 20 concurrent deletes of one real VM all succeed (deleting is
/// idempotent: never a spurious 409), and its QEMU is gone.
#[test]
fn twenty_concurrent_deletes_of_one_vm_all_succeed() {
    let server = TestServer::start();
    let grant = request(&server, "http-static", &["--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let barrier = std::sync::Barrier::new(20);
    let outputs: Vec<std::process::Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    server.hangar(&["rm", &id])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for output in &outputs {
        assert!(
            output.status.success(),
            "a delete failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(vm_by_id(&server, &id)["state"], "deleted");
    assert!(!server.qemu_processes().iter().any(|(vm, _)| *vm == id));
    // And once more after it is gone: still the deleted VM, not an error.
    server.ok(&["rm", &id]);
}
