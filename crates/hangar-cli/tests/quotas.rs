//! Quotas, usage metering, size and setting checks and policy floors with real QEMU guests,
//! through the real binary (issue 13, findings 2 and 4).

mod common;

use std::time::{Duration, Instant};

use common::TestServer;

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

/// Milliseconds since the epoch of an RFC 3339 time the API answered.
fn epoch_ms(value: &serde_json::Value) -> u128 {
    let time = humantime::parse_rfc3339(value.as_str().unwrap()).unwrap();
    time.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[test]
fn of_thirty_concurrent_requests_against_a_quota_of_three_at_most_three_get_vms() {
    // The harness's CLI is the server's admin: the VMs it requests are admin's.
    let server = TestServer::start();
    let out = server.ok(&["quota", "set", "admin", "--vms", "3"]);
    assert!(out.contains("admin: vms=3, vcpus=unlimited"), "{out}");

    let started = Instant::now();
    let outcomes: Vec<std::process::Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..30)
            .map(|_| {
                scope.spawn(|| server.hangar(&["request", "http-static", "--dedicated", "--json"]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let granted: Vec<serde_json::Value> = outcomes
        .iter()
        .filter(|out| out.status.success())
        .map(|out| serde_json::from_slice(&out.stdout).unwrap())
        .collect();
    let refused: Vec<String> = outcomes
        .iter()
        .filter(|out| !out.status.success())
        .map(|out| {
            assert_eq!(
                out.status.code(),
                Some(7),
                "refused for another reason than the quota: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stderr).into_owned()
        })
        .collect();
    eprintln!(
        "30 concurrent dedicated requests against a quota of 3: {} granted, {} refused, in {:.1} s",
        granted.len(),
        refused.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(granted.len(), 3, "{refused:?}");
    assert_eq!(refused.len(), 27);
    for message in &refused {
        assert!(
            message.contains("quota of admin exceeded: vms would be")
                && message.contains("the quota is 3"),
            "{message}"
        );
    }
    let mut ids: Vec<&str> = granted.iter().map(|g| g["vm"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct VMs");
    assert_eq!(
        server.qemu_processes().len(),
        3,
        "nothing was started for the refused"
    );
    let quotas = server.json(&["quotas"]);
    let local = &quotas["users"][0];
    assert_eq!(local["user"], "admin");
    assert_eq!(local["used"]["vms"], 3);
    assert_eq!(local["limits"]["vms"], 3);

    // Deleting one frees its place.
    server.ok(&["rm", ids[0]]);
    server.ok(&["request", "http-static", "--dedicated"]);
}

#[test]
fn a_vms_usage_adds_up_to_its_life_across_active_sleeping_archived_and_a_restart() {
    let mut server = TestServer::start_with(&[
        "--pool-memory",
        "0",
        "--price-active-vcpu-hour",
        "3600",
        "--price-archive-gb-hour",
        "1",
    ]);
    let grant = server.json(&["request", "http-static", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(2));
    server.ok(&["sleep", &id]);
    std::thread::sleep(Duration::from_secs(2));
    server.ok(&["archive", &id]);
    std::thread::sleep(Duration::from_secs(1));
    // The record survives the server.
    server.kill9();
    server.spawn();
    std::thread::sleep(Duration::from_secs(1));
    server.ok(&["rm", &id]);

    let vm = row(&server, &id);
    assert_eq!(vm["state"], "deleted");
    let life_s = (epoch_ms(&vm["state_since"]) - epoch_ms(&vm["created_at"])) as f64 / 1000.0;
    let usage = server.json(&["usage", "--by", "vm"]);
    let metered = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no usage of {id}: {usage}"));
    let seconds = |key: &str| metered[key].as_f64().unwrap();
    let total =
        seconds("active_s") + seconds("sleeping_s") + seconds("archived_s") + seconds("other_s");
    eprintln!(
        "life {life_s:.3} s; metered {total:.3} s: active {:.3}, sleeping {:.3}, archived {:.3}, other {:.3}; archive {:.9} GB-h; cost {:.6}",
        seconds("active_s"),
        seconds("sleeping_s"),
        seconds("archived_s"),
        seconds("other_s"),
        seconds("archive_gb_hours"),
        seconds("cost"),
    );
    assert!(
        (total - life_s).abs() <= life_s * 0.01,
        "metered {total} s of a life of {life_s} s"
    );
    assert!(seconds("active_s") >= 2.0, "{metered}");
    assert!(seconds("sleeping_s") >= 2.0, "{metered}");
    assert!(seconds("archived_s") >= 1.0, "{metered}");
    assert!(
        seconds("archive_gb_hours") > 0.0,
        "the archive's size counts: {metered}"
    );
    // One vCPU active for active_s seconds at 3600 per vCPU-hour: active_s, plus the archive.
    let expected_cost = seconds("active_s") + seconds("archive_gb_hours");
    assert!((seconds("cost") - expected_cost).abs() < 1e-6, "{metered}");

    // By user and service, the same VM.
    let by_user = server.json(&["usage", "--by", "user", "--since", "1h"]);
    assert_eq!(by_user["rows"][0]["key"], "admin");
    let by_service = server.json(&["usage", "--by", "service"]);
    assert_eq!(by_service["rows"][0]["key"], "http-static");
    let csv = server.ok(&["usage", "--by", "host", "--csv"]);
    let mut lines = csv.lines();
    assert!(
        lines.next().unwrap().starts_with("host,vms,active_s,"),
        "{csv}"
    );
    assert!(lines.next().unwrap().starts_with("local,1,"), "{csv}");
    assert!(lines.next().unwrap().starts_with("total,1,"), "{csv}");
}

#[test]
fn sizes_settings_and_policies_outside_their_limits_are_refused_at_once() {
    let server = TestServer::start();
    // Finding 4: larger than the host, or absurd: refused before QEMU starts, no VM row.
    let out = server.hangar(&["request", "--vcpus", "64", "--memory", "128"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("64 vCPUs asked; the largest host has"),
        "{stderr}"
    );
    // Absurd sizes are a configuration's problems too (422, with what to ask instead).
    let out = server.hangar(&["request", "--vcpus", "1000000000", "--memory", "128"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("1000000000 vCPUs asked; a VM has at most 64"),
        "{stderr}"
    );
    let out = server.hangar(&["request", "--vcpus", "1", "--memory", "4000000000"]);
    assert_eq!(out.status.code(), Some(4));
    // A setting value outside its format: 400 at once (not a redis that never starts).
    let started = Instant::now();
    let out = server.hangar(&["request", "redis", "--env", "maxmemory=64mb requirepass"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("setting maxmemory=\"64mb requirepass\" must be a size"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        server
            .json(&["vms", "--all"])
            .as_array()
            .unwrap()
            .is_empty(),
        "no VM row"
    );
    assert!(server.qemu_processes().is_empty());

    // Finding 2: a policy cannot delete a service's data faster than the floor.
    let out = server.hangar(&[
        "policy",
        "set",
        "http-counter",
        "--sleep-after",
        "1ms",
        "--archive-after",
        "1ms",
        "--delete-after",
        "1ms",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("shorter than the floor of 1s"), "{stderr}");
    let out = server.hangar(&["policy", "set", "http-counter", "--delete-after", "10m"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--policy-min-delete-after"), "{stderr}");
    server.ok(&["policy", "set", "http-counter", "--delete-after", "2h"]);
}
