//! Evacuating a host, end to end: a real `hangar server` (stable endpoints, warm pools) on a
//! real PostgreSQL, three real `hangar agent`s in their own network namespaces, real QEMU
//! guests. Host0 holds a sleeping and an archived http-counter VM and the http-static pool;
//! `hangar host evacuate host0` moves the VMs to host1/host2 and the pool refills there;
//! each VM then wakes through its stable endpoint on its new host and counts on from where
//! it was; host0 stays draining until `hangar host resume`, and then takes VMs again.

mod common;
#[path = "common/farm.rs"]
mod farm;

use std::time::{Duration, Instant};

use common::fetch;
use farm::{Agent, FarmServer, host_state, hosts, skip_without_namespaces, wait_for};
use hangar_test_farm::FarmNet;
use hangar_test_postgres::TestDatabase;
use serde_json::Value;

/// How each evacuated http-counter VM is left before the evacuation (more than
/// [`hangar_server::evacuation::MOVES_AT_ONCE`], so that moves queue). Live migration adds
/// `"active"` here (a VM left running).
const VMS: [&str; 5] = ["sleep", "archive", "sleep", "archive", "active"];

/// Paused http-static VMs the pool keeps.
const POOL: usize = 2;

/// VM `id` as `hangar vms --json` lists it.
fn vm(server: &FarmServer, id: &str) -> Value {
    server
        .json(&["vms"])
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no VM {id}"))
}

/// The http-static pool's paused VMs: (id, host).
fn pool_vms(server: &FarmServer) -> Vec<(String, String)> {
    server
        .json(&["vms"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| vm["pool"] == "http-static" && vm["state"] == "ready")
        .map(|vm| {
            let field = |name: &str| vm[name].as_str().unwrap().to_owned();
            (field("id"), field("host"))
        })
        .collect()
}

#[test]
fn evacuating_a_host_moves_its_vms_and_pool_and_they_serve_elsewhere() {
    if skip_without_namespaces() {
        return;
    }
    let net = FarmNet::create(3).unwrap();
    let db = TestDatabase::create();
    let mut server = FarmServer::start(&net, &db, &[]);
    // Stable endpoints (held by this server's forwarder) and room for warm pools.
    server.kill9();
    server.args.retain(|arg| arg != "--direct-endpoints");
    let at = server
        .args
        .iter()
        .position(|a| a == "--pool-memory")
        .unwrap();
    server.args[at + 1] = "1024".into();
    server.spawn();
    for pool in server.json(&["pools"]).as_array().unwrap() {
        let name = pool["name"].as_str().unwrap();
        let size = if name == "http-static" { POOL } else { 0 }.to_string();
        server.json(&["pool", "set", name, "--min", &size, "--max", &size]);
    }
    let zone = |i: usize| format!("zone={}", ["a", "b", "c"][i]);
    // Only host0 at first: everything is made there.
    let mut agents = vec![Agent::start(&net, 0, &[&server], &["--labels", &zone(0)])];
    wait_for(Duration::from_secs(60), "host0 is up", || {
        host_state(&server, "host0").as_deref() == Some("up")
    });
    let mut counters = Vec::new();
    for how in VMS {
        let grant = server.json(&["request", "http-counter", "--dedicated"]);
        assert_eq!(grant["host"], "host0");
        let id = grant["vm"].as_str().unwrap().to_owned();
        let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
        assert_ne!(
            Some(endpoint.as_str()),
            grant["direct_endpoint"].as_str(),
            "a stable endpoint"
        );
        assert_eq!(fetch(&endpoint, "/").trim(), "1");
        if how != "active" {
            let (ok, _, err) = server.hangar(&[how, &id]);
            assert!(ok, "{how} {id}: {err}");
        }
        counters.push((id, endpoint, how));
    }
    wait_for(
        Duration::from_secs(300),
        "the pool is full on host0",
        || {
            let pool = pool_vms(&server);
            pool.len() == POOL && pool.iter().all(|(_, host)| host == "host0")
        },
    );
    let pooled_before: Vec<String> = pool_vms(&server).into_iter().map(|(id, _)| id).collect();
    for i in 1..3 {
        agents.push(Agent::start(&net, i, &[&server], &["--labels", &zone(i)]));
    }
    wait_for(Duration::from_secs(60), "three hosts are up", || {
        let listed = hosts(&server);
        listed.len() == 3 && listed.iter().all(|h| h["state"] == "up")
    });

    let started = Instant::now();
    let report = server.json(&["host", "evacuate", "host0"]);
    let took = started.elapsed();
    eprintln!(
        "EVACUATION: {} vms in {:.1} s (task {:.1} s; {} pool VMs removed)",
        VMS.len(),
        took.as_secs_f64(),
        report["elapsed_ms"].as_f64().unwrap() / 1000.0,
        report["pool_vms_removed"]
    );
    eprintln!("{report:#}");
    assert_eq!(report["state"], "succeeded", "{report}");
    assert_eq!(report["moved"], VMS.len(), "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let listed = report["vms"].as_array().unwrap();
    assert_eq!(listed.len(), VMS.len(), "{report}");
    for entry in listed {
        assert_eq!(entry["outcome"], "moved", "{entry}");
        assert_eq!(entry["from"], "host0");
        assert!(
            matches!(entry["to"].as_str(), Some("host1" | "host2")),
            "{entry}"
        );
    }
    let task = server.json(&["task", "show", report["task"].as_str().unwrap()]);
    assert_eq!(task["kind"], "evacuate");
    assert_eq!(task["percent"], 100);
    assert_eq!(host_state(&server, "host0").as_deref(), Some("draining"));

    // The pool is made again on the other hosts; none of host0's paused VMs is left.
    wait_for(
        Duration::from_secs(300),
        "the pool is full on host1/host2",
        || {
            let pool = pool_vms(&server);
            pool.len() == POOL && pool.iter().all(|(_, host)| host != "host0")
        },
    );
    let listed = server.json(&["vms"]);
    for id in &pooled_before {
        assert!(
            !listed
                .as_array()
                .unwrap()
                .iter()
                .any(|vm| vm["id"] == id.as_str()),
            "host0's pool VM {id} was removed"
        );
    }
    assert!(
        agents[0].qemus().is_empty(),
        "nothing runs on host0: {:?}",
        agents[0].qemus()
    );

    // Each VM wakes through its stable endpoint on its new host and counts on.
    for (id, endpoint, how) in &counters {
        let before = vm(&server, id);
        let host = before["host"].as_str().unwrap().to_owned();
        assert!(host == "host1" || host == "host2", "{id} is on {host}");
        let woken = Instant::now();
        assert_eq!(fetch(endpoint, "/").trim(), "2", "{id} ({how}) counts on");
        eprintln!(
            "{id} ({how}) woke on {host} through its stable endpoint in {:?}",
            woken.elapsed()
        );
        let after = vm(&server, id);
        assert_eq!(after["state"], "active");
        assert_eq!(after["host"], host.as_str());
    }

    // Nothing new goes to host0 while it drains; once resumed, placement uses it again.
    let (ok, _, err) = server.hangar(&["request", "http-counter", "--dedicated", "--on", "zone=a"]);
    assert!(!ok, "a draining host takes no VM");
    assert!(err.contains("draining") || err.contains("not up"), "{err}");
    let resumed = server.json(&["host", "resume", "host0"]);
    assert_eq!(resumed["state"], "up");
    let grant = server.json(&["request", "http-counter", "--dedicated", "--on", "zone=a"]);
    assert_eq!(grant["host"], "host0");
    assert_eq!(fetch(grant["endpoint"].as_str().unwrap(), "/").trim(), "1");
}
