//! The farm, end to end: real `hangar server`s on a real PostgreSQL, real `hangar agent`s,
//! each in its own network namespace with its own address (see `hangar-test-farm`), real
//! QEMU guests serving HTTP. Traffic goes only to those namespaces and loopback.
//!
//! - Three hosts: placement spreads requests, an isolation group never shares a host, an
//!   image built once on the server is pulled by hash by every host, a host whose agent is
//!   killed (kill -9) is declared lost and its shared service answers from another host
//!   within 10 s, and when the agent starts again the VM that was replaced is destroyed.
//! - Two servers on one store: one leads; when it is killed (kill -9) the other leads
//!   within 5 s, the VMs keep answering meanwhile, and requests keep working.

mod common;
#[path = "common/farm.rs"]
mod farm;

use std::time::{Duration, Instant};

use farm::{Agent, FarmServer, host_state, hosts, page, skip_without_namespaces, wait_for};
use hangar_test_farm::FarmNet;
use hangar_test_postgres::TestDatabase;
use serde_json::Value;

#[test]
fn three_hosts_spread_isolate_pull_and_survive_a_lost_host() {
    if skip_without_namespaces() {
        return;
    }
    let net = FarmNet::create(3).unwrap();
    let db = TestDatabase::create();
    let server = FarmServer::start(&net, &db, &[]);
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| {
            let cost = (i + 1).to_string();
            let zone = format!("zone={}", ["a", "b", "c"][i]);
            Agent::start(&net, i, &[&server], &["--cost", &cost, "--labels", &zone])
        })
        .collect();
    wait_for(Duration::from_secs(60), "three hosts are up", || {
        let listed = hosts(&server);
        listed.len() == 3 && listed.iter().all(|h| h["state"] == "up")
    });

    // Three requests of one isolation group: each on its own host; a fourth has no host.
    let mut placed = Vec::new();
    for _ in 0..3 {
        let grant = server.json(&["request", "http-static", "--dedicated", "--isolate", "web"]);
        assert!(
            page(&grant).is_some_and(|body| !body.is_empty()),
            "the VM answers at {} from the root namespace",
            grant["direct_endpoint"]
        );
        let host = grant["host"].as_str().unwrap().to_owned();
        let address = grant["direct_endpoint"].as_str().unwrap();
        let index = agents.iter().position(|a| a.name == host).unwrap();
        assert!(
            address.starts_with(&format!("{}:", net.ip(index))),
            "the endpoint {address} is on its host's address"
        );
        assert!(
            grant["placement"]
                .as_str()
                .is_some_and(|why| !why.is_empty()),
            "the placement is explained: {grant}"
        );
        placed.push(host);
    }
    let mut distinct = placed.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "spread over the hosts: {placed:?}");
    let (ok, _, err) =
        server.hangar(&["request", "http-static", "--dedicated", "--isolate", "web"]);
    assert!(!ok, "a fourth VM of the group has no host of its own");
    assert!(err.contains("isolation"), "says why: {err}");

    // A label constraint picks its host.
    let grant = server.json(&["request", "http-static", "--dedicated", "--on", "zone=b"]);
    assert_eq!(grant["host"], "host1");

    // The image was built once (on the server) and pulled by hash by every host.
    let listed = hosts(&server);
    let blobs: Vec<Vec<String>> = listed
        .iter()
        .map(|h| {
            let mut held: Vec<String> = h["facts"]["blobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_owned())
                .collect();
            held.sort();
            held
        })
        .collect();
    assert!(!blobs[0].is_empty(), "hosts report the blobs they hold");
    for host in &listed {
        assert!(
            host["facts"]["images"]
                .as_array()
                .is_some_and(|roots| roots.iter().any(|r| r == "http-static@busybox")),
            "hosts report the roots they hold whole, which placement prefers: {host}"
        );
    }
    assert!(
        blobs.iter().all(|held| held == &blobs[0]),
        "the same content on every host: {blobs:?}"
    );
    for agent in &agents {
        assert!(
            !agent.log().contains("building layer") && !agent.log().contains("debootstrap"),
            "host {} built nothing itself",
            agent.name
        );
    }

    // A shared service on a host whose agent is killed: lost, then served elsewhere.
    for grant in server.json(&["vms"]).as_array().unwrap() {
        server.hangar(&["rm", grant["id"].as_str().unwrap()]);
    }
    let shared = server.json(&["request", "http-static"]);
    let lost_host = shared["host"].as_str().unwrap().to_owned();
    let lost = agents.iter().position(|a| a.name == lost_host).unwrap();
    let old_vm = shared["vm"].as_str().unwrap().to_owned();
    assert!(page(&shared).is_some());
    net.kill(lost).unwrap();
    agents[lost].reap();
    let killed = Instant::now();
    let mut answered = None;
    while killed.elapsed() < Duration::from_secs(30) {
        let (ok, out, _) = server.hangar(&["request", "http-static", "--json"]);
        if ok
            && let Ok(grant) = serde_json::from_str::<Value>(&out)
            && grant["host"] != lost_host.as_str()
            && page(&grant).is_some()
        {
            answered = Some((killed.elapsed(), grant));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (took, replacement) = answered.expect("the shared service answers from another host");
    eprintln!(
        "shared service answered from {} {:?} after its host's agent was killed",
        replacement["host"], took
    );
    assert!(took <= Duration::from_secs(10), "within 10 s: {took:?}");
    wait_for(Duration::from_secs(15), "the host is lost", || {
        host_state(&server, &lost_host).as_deref() == Some("lost")
    });
    let old = server.json(&["vms", "--all"]);
    let old = old
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == old_vm.as_str())
        .unwrap()
        .clone();
    assert_eq!(old["state"], "lost", "kept, not deleted: {old}");
    assert!(
        agents[lost].qemus().iter().any(|(id, _)| *id == old_vm),
        "its QEMU still runs on the unreachable host (nothing was deleted there)"
    );

    // The agent starts again: it is told to destroy the replaced VM.
    let agent = &mut agents[lost];
    let cost = (lost + 1).to_string();
    let zone = format!("zone={}", ["a", "b", "c"][lost]);
    agent.spawn(&net, &[&server], &["--cost", &cost, "--labels", &zone]);
    wait_for(
        Duration::from_secs(30),
        "the replaced VM is destroyed",
        || !agent.qemus().iter().any(|(id, _)| *id == old_vm),
    );
    wait_for(Duration::from_secs(15), "the host is up again", || {
        host_state(&server, &lost_host).as_deref() == Some("up")
    });
    wait_for(
        Duration::from_secs(15),
        "the lost VM's record is deleted",
        || {
            server
                .json(&["vms", "--all"])
                .as_array()
                .unwrap()
                .iter()
                .any(|vm| vm["id"] == old_vm.as_str() && vm["state"] == "deleted")
        },
    );
    assert!(
        page(&replacement).is_some(),
        "the replacement still answers"
    );
    drop(agents);
    drop(server);
    net.close().unwrap();
}

#[test]
fn a_template_is_built_once_and_pulled_by_the_other_hosts() {
    if skip_without_namespaces() {
        return;
    }
    let net = FarmNet::create(2).unwrap();
    let db = TestDatabase::create();
    let server = FarmServer::start(&net, &db, &[]);
    // The hosts tell their guests TSC frequencies 2 kHz apart, on either side of the edge
    // between two 10 MHz steps of the templates' keys nearest this machine's frequency:
    // what two hosts of one CPU model measure when their rate lies near such an edge.
    let measured = hangar_image::host_tsc_khz().unwrap_or(2_445_000);
    let edge = measured / 10_000 * 10_000 + 5_000;
    let tsc = [edge - 1, edge + 1].map(|khz| khz.to_string());
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            let zone = format!("zone={}", ["a", "b"][i]);
            let args = ["--labels", &zone, "--guest-tsc-khz", &tsc[i]];
            Agent::start(&net, i, &[&server], &args)
        })
        .collect();
    wait_for(Duration::from_secs(60), "two hosts are up", || {
        let listed = hosts(&server);
        listed.len() == 2 && listed.iter().all(|h| h["state"] == "up")
    });
    let holds_template = |host: &Value| {
        host["facts"]["templates"].as_array().is_some_and(|held| {
            held.iter()
                .any(|id| id.as_str().is_some_and(|id| id.starts_with("http-static-")))
        })
    };

    // The first VM boots, and the service's template is built once, on one host.
    let first = server.json(&["request", "http-static", "--dedicated"]);
    assert!(page(&first).is_some());
    wait_for(
        Duration::from_secs(120),
        "a host holds the template",
        || hosts(&server).iter().any(holds_template),
    );
    let listed = hosts(&server);
    let holder = listed.iter().find(|h| holds_template(h)).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    // The scheduler's view of the hosts follows their heartbeats within about 2 s.
    std::thread::sleep(Duration::from_secs(3));
    let (other, zone) = if holder == "host0" {
        ("host1", "zone=b")
    } else {
        ("host0", "zone=a")
    };

    // A VM placed on the other host is cloned there, from the template pulled from the
    // holder, not booted and not built again.
    let grant = server.json(&["request", "http-static", "--dedicated", "--on", zone]);
    assert_eq!(grant["host"], other);
    assert_eq!(
        grant["match"], "cloned",
        "cloned from the pulled template: {grant}"
    );
    assert!(page(&grant).is_some(), "the clone answers");
    let templates = server.json(&["templates"]);
    let mut held_on: Vec<&str> = templates
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["service"] == "http-static")
        .map(|t| t["host"].as_str().unwrap())
        .collect();
    held_on.sort();
    assert_eq!(
        held_on,
        ["host0", "host1"],
        "each host holds a copy: {templates}"
    );
    let made: usize = agents
        .iter()
        .map(|agent| {
            agent
                .log()
                .matches("hangar_host::local::templates: template made")
                .count()
        })
        .sum();
    assert_eq!(made, 1, "the template was built once in the farm");
    let index = agents.iter().position(|a| a.name == other).unwrap();
    assert!(
        agents[index].log().contains("template pulled from a peer"),
        "host {other} pulled it"
    );
    drop(agents);
    drop(server);
    net.close().unwrap();
}

#[test]
fn the_standby_server_leads_within_five_seconds_of_the_leader_s_end() {
    if skip_without_namespaces() {
        return;
    }
    let net = FarmNet::create(1).unwrap();
    let db = TestDatabase::create();
    let mut first = FarmServer::start(&net, &db, &[]);
    let token = first.token_file();
    let second = FarmServer::start(&net, &db, &["--farm-token-file", token.to_str().unwrap()]);
    assert_eq!(first.role().as_deref(), Some("leader"));
    assert_eq!(second.role().as_deref(), Some("standby"));
    let agent = Agent::start(&net, 0, &[&first, &second], &[]);
    wait_for(Duration::from_secs(60), "the host is up", || {
        host_state(&second, "host0").as_deref() == Some("up")
    });
    let grant = second.json(&["request", "http-static", "--dedicated"]);
    assert!(page(&grant).is_some(), "a standby serves requests");

    first.kill9();
    let killed = Instant::now();
    assert!(
        page(&grant).is_some(),
        "the VM answers while no server leads"
    );
    let took = wait_for(Duration::from_secs(10), "the standby leads", || {
        second.role().as_deref() == Some("leader")
    });
    eprintln!(
        "the standby led {:?} after the leader was killed",
        killed.elapsed()
    );
    assert!(took <= Duration::from_secs(5), "within 5 s: {took:?}");
    let again = second.json(&["request", "http-static", "--dedicated"]);
    assert!(page(&again).is_some(), "requests keep working");
    wait_for(
        Duration::from_secs(10),
        "the agent reports to the new leader",
        || {
            hosts(&second).iter().any(|h| {
                h["name"] == "host0"
                    && h["state"] == "up"
                    && h["heartbeat_age_s"].as_f64().is_some_and(|age| age < 2.0)
            })
        },
    );
    assert!(page(&grant).is_some(), "the first VM still answers");
    drop(agent);
    drop(second);
    drop(first);
    net.close().unwrap();
}
