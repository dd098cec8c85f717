//! Warm pools with real QEMU guests: VMs booted to ready, paused, and handed out.

mod common;

use common::{TestServer, fetch, wait_for, whoami};

fn pool(server: &TestServer, name: &str) -> serde_json::Value {
    let pools = server.json(&["pools"]);
    pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no pool {name}: {pools}"))
}

fn wait_ready(server: &TestServer, name: &str, ready: u64) {
    wait_for(
        120,
        &format!("pool {name} to hold {ready} ready VMs"),
        || {
            let p = pool(server, name);
            (p["ready"].as_u64() == Some(ready) && p["booting"].as_u64() == Some(0)).then_some(())
        },
    );
}

fn console_boots(server: &TestServer, vm: &str) -> usize {
    let console =
        std::fs::read_to_string(server.vms_dir().join(vm).join("console.log")).unwrap_or_default();
    console.matches("hangar-init 0.1.0: starting").count()
}

#[test]
fn a_pool_of_two_fills_hands_out_distinct_identities_and_refills() {
    let server = TestServer::start_with(&[]);
    server.ok(&["pool", "set", "http-static", "--min", "2", "--max", "2"]);
    wait_ready(&server, "http-static", 2);
    let p = pool(&server, "http-static");
    assert_eq!(
        (p["target"].as_u64(), p["memory_mib"].as_u64()),
        (Some(2), Some(256))
    );

    let a = server.json(&["request", "http-static", "--dedicated"]);
    let b = server.json(&["request", "http-static", "--dedicated"]);
    assert_eq!(
        (a["match"].as_str(), b["match"].as_str()),
        (Some("exact"), Some("exact"))
    );
    assert_ne!(a["vm"], b["vm"]);
    let (ea, eb) = (
        a["endpoint"].as_str().unwrap(),
        b["endpoint"].as_str().unwrap(),
    );
    assert!(fetch(ea, "/").contains("hangar VM"));
    assert!(fetch(eb, "/").contains("hangar VM"));

    // Each VM got its own identity when handed out (pooled VMs carry a staging hostname).
    let (wa, wb) = (whoami(ea), whoami(eb));
    assert_eq!(wa["hostname"], a["vm"].as_str().unwrap());
    assert_eq!(wb["hostname"], b["vm"].as_str().unwrap());
    assert_ne!(
        wa["random"], wb["random"],
        "two VMs from one pool share no random bytes"
    );
    assert_eq!(wa["random"].len(), 32);

    // Both were booted once, before the requests: handed out, not rebooted.
    assert_eq!(console_boots(&server, a["vm"].as_str().unwrap()), 1);
    wait_ready(&server, "http-static", 2);
    let vms = server.json(&["vms"]);
    assert_eq!(
        vms.as_array().unwrap().len(),
        4,
        "two handed out, two refilled: {vms}"
    );
}

#[test]
fn superset_matches_are_reported_and_exact_size_slices_them() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    let demo = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../catalog/demo.toml"
    ))
    .unwrap();
    std::fs::write(
        &catalog,
        format!("{demo}\n[pool.big-static]\nservice = \"http-static\"\nvcpus = 2\nmemory_mib = 512\nmin = 1\nmax = 1\n"),
    )
    .unwrap();
    let server = TestServer::start_with(&["--catalog", catalog.to_str().unwrap()]);
    server.ok(&["pool", "set", "http-static", "--min", "0", "--max", "0"]);
    // A VM the default pool was filling when it was emptied would be an exact match.
    wait_ready(&server, "http-static", 0);
    wait_ready(&server, "big-static", 1);

    let grant = server.json(&[
        "request",
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--app",
        "http-static",
        "--exact-size",
    ]);
    assert_eq!(grant["match"], "superset");
    assert_eq!(
        (grant["vcpus"].as_u64(), grant["memory_mib"].as_u64()),
        (Some(2), Some(512))
    );
    assert_eq!(
        grant["sliced_to"],
        serde_json::json!({"vcpus": 1, "memory_mib": 128})
    );
    let endpoint = grant["endpoint"].as_str().unwrap();
    // The balloon inflates asynchronously; the guest sees the requested memory.
    let memtotal = wait_for(30, "the balloon to inflate", || {
        let kib: u64 = whoami(endpoint)["memtotal_kib"].parse().unwrap();
        (kib <= 128 * 1024).then_some(kib)
    });
    assert!(memtotal > 64 * 1024, "{memtotal} KiB");
    assert_eq!(whoami(endpoint)["cpus_online"], "0", "one vCPU left online");

    wait_ready(&server, "big-static", 1);
    let unsliced = server.json(&[
        "request",
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--app",
        "http-static",
    ]);
    assert_eq!(
        (unsliced["match"].as_str(), &unsliced["sliced_to"]),
        (Some("superset"), &serde_json::Value::Null)
    );
    let kib: u64 = whoami(unsliced["endpoint"].as_str().unwrap())["memtotal_kib"]
        .parse()
        .unwrap();
    assert!(kib > 400 * 1024, "unsliced keeps its memory: {kib} KiB");
    assert_eq!(
        whoami(unsliced["endpoint"].as_str().unwrap())["cpus_online"],
        "0-1"
    );
}

#[test]
fn a_pre_os_shell_pool_serves_different_os_images() {
    let server = TestServer::start_with(&[]);
    server.ok(&["pool", "set", "http-static", "--min", "0", "--max", "0"]);
    server.ok(&["pool", "set", "shell-1x256", "--min", "1", "--max", "1"]);
    wait_ready(&server, "shell-1x256", 1);
    let shell = server
        .json(&["vms"])
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["pool"] == "shell-1x256")
        .cloned()
        .unwrap();
    assert_eq!(shell["os"], serde_json::Value::Null, "paused before any OS");
    assert_eq!(
        console_boots(&server, shell["id"].as_str().unwrap()),
        0,
        "no guest code ran"
    );

    let web = server.json(&["request", "--memory", "128-256", "--app", "http-static"]);
    assert_eq!(web["match"], "partial");
    assert_eq!(web["vm"], shell["id"]);
    assert!(fetch(web["endpoint"].as_str().unwrap(), "/").contains("hangar VM"));

    wait_ready(&server, "shell-1x256", 1);
    let counter = server.json(&["request", "--memory", "128-256", "--app", "http-counter"]);
    assert_eq!(counter["match"], "partial");
    assert_ne!(counter["vm"], web["vm"]);
    assert_eq!(
        fetch(counter["endpoint"].as_str().unwrap(), "/").trim(),
        "1",
        "the counter image, freshly booted"
    );

    let vms = server.json(&["vms"]);
    let listed = |id: &serde_json::Value| {
        vms.as_array()
            .unwrap()
            .iter()
            .find(|vm| vm["id"] == *id)
            .cloned()
            .unwrap()
    };
    assert_eq!(listed(&web["vm"])["services"][0], "http-static");
    assert_eq!(listed(&counter["vm"])["services"][0], "http-counter");
    assert_eq!(listed(&counter["vm"])["os"], "busybox 1.35");
}

#[test]
fn paused_pool_vms_survive_kill_9_and_are_granted_after_restart_without_reboot() {
    let mut server = TestServer::start_with(&[]);
    wait_ready(&server, "http-static", 1);
    let pooled = server.json(&["vms"]).as_array().unwrap()[0].clone();
    let id = pooled["id"].as_str().unwrap().to_owned();
    let pid = pooled["pid"].as_u64().unwrap() as u32;

    server.kill9();
    assert!(
        server.qemu_processes().contains(&(id.clone(), pid)),
        "the paused VM outlives the server"
    );
    server.spawn();
    let after = server.json(&["vms"]);
    let vm = after
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(
        (vm["state"].as_str(), vm["pid"].as_u64()),
        (Some("ready"), Some(u64::from(pid)))
    );

    let grant = server.json(&["request", "http-static", "--dedicated"]);
    assert_eq!(
        (grant["vm"].as_str(), grant["match"].as_str()),
        (Some(id.as_str()), Some("exact"))
    );
    assert!(fetch(grant["endpoint"].as_str().unwrap(), "/").contains("hangar VM"));
    assert_eq!(
        console_boots(&server, &id),
        1,
        "re-adopted and granted, not rebooted"
    );
}

#[test]
fn a_ready_criterion_set_at_run_time_governs_real_pool_fills() {
    let server = TestServer::start_with(&["--pool-memory", "512"]);
    server.ok(&["pool", "set", "http-static", "--min", "0", "--max", "0"]);
    // In-guest command, console line, and the service's own answer, twice in a row.
    let criterion = r#"{"timeout": "60s", "consecutive": 2, "checks": [
        {"exec": {"argv": ["test", "-x", "/www/cgi-bin/whoami"]}},
        {"log": {"contains": "hangar-init"}},
        {"http": {"port": "http", "path": "/cgi-bin/whoami", "body_contains": "hostname pool-http-static"}}]}"#;
    let view = server.json(&[
        "pool",
        "set",
        "http-static",
        "--min",
        "1",
        "--max",
        "1",
        "--ready",
        criterion,
    ]);
    assert_eq!(view["ready_criterion"]["consecutive"], 2);
    wait_ready(&server, "http-static", 1);
    let grant = server.json(&["request", "http-static", "--dedicated"]);
    assert_eq!(grant["match"], "exact");
    assert_eq!(
        whoami(grant["endpoint"].as_str().unwrap())["hostname"],
        grant["vm"].as_str().unwrap()
    );

    // A criterion that never holds: the fill fails with a reason, and nothing is paused.
    let never = r#"{"timeout": "3s", "checks": [{"exec": {"argv": ["false"]}}]}"#;
    wait_ready(&server, "http-static", 1);
    server.ok(&[
        "pool",
        "set",
        "http-static",
        "--min",
        "2",
        "--max",
        "2",
        "--ready",
        never,
    ]);
    let failed = wait_for(90, "a failed fill", || {
        server
            .json(&["vms"])
            .as_array()
            .unwrap()
            .iter()
            .find(|vm| vm["state"] == "failed")
            .cloned()
    });
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("not ready after 3s"),
        "{failed}"
    );
    assert_eq!(
        pool(&server, "http-static")["ready"],
        1,
        "only the VM made under the first criterion"
    );
    let output = server.hangar(&["pool", "set", "http-static", "--ready", "{not json"]);
    assert_eq!(output.status.code(), Some(2));
}
