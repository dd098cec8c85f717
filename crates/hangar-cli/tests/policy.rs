//! Lifecycle policies with real QEMU guests, through the real binary: an idle VM goes
//! through sleeping, archived and deleted on its own, and a wake before deletion keeps its
//! memory.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, fetch};

/// The VM's row in `hangar vms --all --json`.
fn row(server: &TestServer, id: &str) -> serde_json::Value {
    server
        .json(&["vms", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id)
        .cloned()
        .unwrap()
}

/// Polls the VM's state until it is `want`; returns its row then. Panics on any state
/// outside `path` (the states it may pass through) or after `secs`.
fn wait_state(
    server: &TestServer,
    id: &str,
    want: &str,
    path: &[&str],
    secs: u64,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let vm = row(server, id);
        let state = vm["state"].as_str().unwrap().to_owned();
        if state == want {
            return vm;
        }
        assert!(
            path.contains(&state.as_str()),
            "VM went {state} while waiting for {want}: {vm}"
        );
        assert!(
            Instant::now() < deadline,
            "VM still {state} after {secs} s, waiting for {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_idle_vm_sleeps_archives_and_is_deleted_on_a_short_policy() {
    // Timers this short need the floors lowered (the defaults refuse them).
    let server = TestServer::start_with(&[
        "--pool-memory",
        "0",
        "--policy-min-archive-after",
        "1s",
        "--policy-min-delete-after",
        "1s",
    ]);
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&endpoint, "/").trim(), "1");

    // Bad values are refused before anything changes.
    let bad = server.hangar(&["policy", "set", "http-counter", "--sleep-after", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = server.hangar(&["policy", "set", "http-count", "--sleep-after", "1s"]);
    assert_eq!(bad.status.code(), Some(3), "no such service");

    let out = server.ok(&[
        "policy",
        "set",
        "http-counter",
        "--sleep-after",
        "2s",
        "--archive-after",
        "2s",
        "--delete-after",
        "3s",
        "--archive-tier",
        "zstd",
    ]);
    assert!(
        out.contains("sleep after 2s, archive after 2s, delete after 3s"),
        "{out}"
    );
    let policies = server.json(&["policies"]);
    let counter = policies["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == "http-counter")
        .unwrap();
    assert_eq!(counter["source"], "run_time");
    assert_eq!(counter["policy"]["delete_after"], "3s");
    assert_eq!(policies["memory"]["used_mib"], 256.0);

    let started = Instant::now();
    let asleep = wait_state(&server, &id, "sleeping", &["active"], 30);
    let slept_at = started.elapsed();
    assert!(asleep["idle_ms"].as_u64().unwrap() >= 2000, "{asleep}");
    let archived = wait_state(&server, &id, "archived", &["sleeping"], 30);
    let archived_at = started.elapsed();
    assert_eq!(archived["archive"]["tier"], "zstd");
    assert!(archived["archive"]["size_bytes"].as_u64().unwrap() > 0);
    assert!(
        !server.qemu_processes().iter().any(|(vm, _)| *vm == id),
        "no process while archived"
    );
    eprintln!(
        "policy 2s/2s/3s: sleeping after {:.1} s, archived after {:.1} s",
        slept_at.as_secs_f64(),
        archived_at.as_secs_f64()
    );

    // Woken before its deletion, the counter goes on where it was.
    server.ok(&["wake", &id]);
    assert_eq!(fetch(&endpoint, "/").trim(), "2");

    // Idle again: down the whole way, to deleted.
    let started = Instant::now();
    wait_state(&server, &id, "sleeping", &["active"], 30);
    wait_state(&server, &id, "archived", &["sleeping"], 30);
    wait_state(&server, &id, "deleted", &["archived"], 30);
    eprintln!(
        "policy 2s/2s/3s: deleted {:.1} s after the last use",
        started.elapsed().as_secs_f64()
    );
    assert!(server.qemu_processes().is_empty());
    assert!(
        !server.vms_dir().join(&id).exists(),
        "the archive and disk layer went with the VM"
    );
    let log = server.log();
    assert!(log.contains("lifecycle: deleted"), "{log}");
}

#[test]
fn over_the_memory_budget_the_least_recently_used_vm_is_archived() {
    // Two 256 MiB counters do not fit in 400 MiB: the one used least recently is archived.
    let server = TestServer::start_with(&["--pool-memory", "0", "--memory-budget", "400"]);
    let first = server.json(&["request", "http-counter", "--dedicated"]);
    let first_id = first["vm"].as_str().unwrap().to_owned();
    let first_endpoint = first["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&first_endpoint, "/").trim(), "1");
    let second = server.json(&["request", "http-counter", "--dedicated"]);
    let second_id = second["vm"].as_str().unwrap().to_owned();

    let archived = wait_state(&server, &first_id, "archived", &["active"], 60);
    assert_eq!(archived["archive"]["tier"], "zstd");
    assert_eq!(row(&server, &second_id)["state"], "active");
    let policies = server.json(&["policies"]);
    assert_eq!(policies["memory"]["budget_mib"], 400);
    assert_eq!(policies["memory"]["used_mib"], 256.0);

    // Woken, the first is the most recently used: the second goes in its place.
    server.ok(&["wake", &first_id]);
    assert_eq!(fetch(&first_endpoint, "/").trim(), "2");
    wait_state(&server, &second_id, "archived", &["active"], 60);
    assert_eq!(row(&server, &first_id)["state"], "active");
    let log = server.log();
    assert!(log.contains("reason=memory budget"), "{log}");
}
