//! Rebalancing, end to end: a real `hangar server --rebalance` on a real PostgreSQL, three
//! real `hangar agent`s in their own network namespaces, real QEMU guests. VMs placed on one
//! host (by a label constraint, which VMs do not keep) move off it through migration until
//! the hosts are even, then stay; each moved VM still serves its page.

mod common;
#[path = "common/farm.rs"]
mod farm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use farm::{Agent, FarmServer, hosts, page, skip_without_namespaces, wait_for};
use hangar_test_farm::FarmNet;
use hangar_test_postgres::TestDatabase;
use serde_json::Value;

/// VMs placed on host0 at first.
const VMS: usize = 4;

/// The test's VMs (`ids`; not a template VM the server may be making) by id: (host,
/// state, the whole entry).
fn vms(server: &FarmServer, ids: &[String]) -> BTreeMap<String, (String, String, Value)> {
    server
        .json(&["vms"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| ids.iter().any(|id| vm["id"] == id.as_str()))
        .map(|vm| {
            let field = |name: &str| vm[name].as_str().unwrap_or_default().to_owned();
            (field("id"), (field("host"), field("state"), vm.clone()))
        })
        .collect()
}

/// How many of the VMs each host holds.
fn per_host(vms: &BTreeMap<String, (String, String, Value)>) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::from([
        ("host0".to_string(), 0),
        ("host1".to_string(), 0),
        ("host2".to_string(), 0),
    ]);
    for (host, _, _) in vms.values() {
        *count.entry(host.clone()).or_default() += 1;
    }
    count
}

#[test]
fn rebalancing_moves_vms_off_a_loaded_host_and_stops() {
    if skip_without_namespaces() {
        return;
    }
    let net = FarmNet::create(3).unwrap();
    let db = TestDatabase::create();
    let mut server = FarmServer::start(&net, &db, &[]);
    let _agents: Vec<Agent> = (0..3)
        .map(|i| {
            let zone = format!("zone={}", ["a", "b", "c"][i]);
            Agent::start(&net, i, &[&server], &["--labels", &zone])
        })
        .collect();
    wait_for(Duration::from_secs(60), "three hosts are up", || {
        let listed = hosts(&server);
        listed.len() == 3 && listed.iter().all(|h| h["state"] == "up")
    });

    // Every VM on host0; then asleep, so that each moves with its snapshot.
    let mut ids = Vec::new();
    for _ in 0..VMS {
        let grant = server.json(&["request", "http-static", "--dedicated", "--on", "zone=a"]);
        assert_eq!(grant["host"], "host0");
        assert!(page(&grant).is_some(), "the VM answers on host0");
        ids.push(grant["vm"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let (ok, _, err) = server.hangar(&["sleep", id]);
        assert!(ok, "sleep {id}: {err}");
    }
    let before = vms(&server, &ids);
    assert_eq!(per_host(&before)["host0"], VMS, "{before:?}");

    // The same server, rebalancing every 2 s, one move a round.
    server.kill9();
    server.args.extend(
        [
            "--rebalance",
            "--rebalance-interval",
            "2s",
            "--rebalance-max-moves",
            "1",
            "--rebalance-margin",
            "5",
        ]
        .map(String::from),
    );
    server.spawn();
    let started = Instant::now();
    let moving = |server: &FarmServer| server.log().matches("rebalance: moving vm ").count();
    let moved_lines = |server: &FarmServer| server.log().matches("rebalance: vm moved").count();
    wait_for(Duration::from_secs(300), "a VM moves", || {
        moved_lines(&server) >= 1
    });
    // Then moves stop: five rounds (10 s) without one.
    let mut last = (moving(&server), Instant::now());
    wait_for(
        Duration::from_secs(600),
        "ten seconds without a move",
        || {
            let now = moving(&server);
            if now != last.0 {
                last = (now, Instant::now());
            }
            last.1.elapsed() >= Duration::from_secs(10)
        },
    );
    let settled = started.elapsed() - Duration::from_secs(10);
    let after = vms(&server, &ids);
    let count = per_host(&after);
    let moved = moved_lines(&server);
    eprintln!("{moved} VMs moved in {settled:?}, then none for 10 s: {count:?}");
    assert!(count["host0"] < VMS, "VMs left host0: {count:?}");
    assert_eq!(moving(&server), moved, "every move tried was made");
    let changed: Vec<&String> = ids
        .iter()
        .filter(|id| after[*id].0 != before[*id].0)
        .collect();
    assert_eq!(
        changed.len(),
        moved,
        "every move logged was made, once: {changed:?}"
    );
    let log = server.log();
    let last_round = log
        .lines()
        .rev()
        .find(|line| line.contains("rebalance: "))
        .unwrap_or_default();
    assert!(
        last_round.contains("nothing to move"),
        "the last round found nothing to move: {last_round}"
    );
    eprintln!("last round: {last_round}");

    // Each moved VM wakes on its new host and serves its page from there.
    for id in changed {
        let (ok, _, err) = server.hangar(&["wake", id]);
        assert!(ok, "wake {id}: {err}");
        let (host, state, entry) = &vms(&server, &ids)[id];
        assert_eq!(state, "active");
        let endpoint = entry["direct_endpoints"]
            .as_object()
            .and_then(|ports| ports.values().next())
            .and_then(Value::as_str)
            .unwrap();
        let index: usize = host.trim_start_matches("host").parse().unwrap();
        assert!(
            endpoint.starts_with(&format!("{}:", net.ip(index))),
            "{id}'s endpoint {endpoint} is on its new host {host}"
        );
        let addr: SocketAddr = endpoint.parse().unwrap();
        let (status, body) = common::http_get(&addr, "/").unwrap();
        assert_eq!(status, 200, "{id} answers on {host}");
        assert!(!body.is_empty());
    }
}
