//! Stacks with real QEMU guests, through the real binary: the example stack
//! (`examples/shop.toml`: nginx as a reverse proxy → 2 × http-counter + redis) answers
//! through its one public endpoint and spreads requests over both backends; the backends
//! have no endpoint, their QEMU processes forward no host port to them and their private
//! addresses are not reachable from the host; the front's DNS name resolves to its
//! endpoint (`dig`); the stack
//! sleeps and wakes as a unit with its state kept (a connection to the front's endpoint
//! wakes it, the counters go on); `down` leaves no QEMU process, live VM or endpoint.
//! Prints how long `stack up` took cold (images cached, VMs booted) and with templates.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{TestServer, dig, dns_status, free_port, hostfwds, wait_for};

const DOMAIN: &str = "vms.test";

fn shop() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/shop.toml")
        .display()
        .to_string()
}

/// `GET path` over HTTP/1.0: status, headers (lowercase names), body.
fn get(addr: &str, path: &str) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: shop\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

/// Whether `addr` answers `GET /health.txt` with the counter's `ok` within a few seconds.
fn serves_health(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    if write!(stream, "GET /health.txt HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") && answer.ends_with("ok\n")
}

/// Sends `n` requests to the front; answers each backend's (X-Upstream) last count.
fn spread(front: &str, n: usize) -> BTreeMap<String, u64> {
    let mut last = BTreeMap::new();
    for _ in 0..n {
        let (status, headers, body) = get(front, "/").unwrap();
        assert_eq!(status, 200, "{headers:?} {body}");
        let upstream = headers.get("x-upstream").cloned().unwrap_or_default();
        let count: u64 = body.trim().parse().unwrap_or_else(|_| panic!("{body:?}"));
        last.insert(upstream, count);
    }
    last
}

fn member<'a>(stack: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    stack["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no member {name} in {stack}"))
}

/// `hangar stack up` timed: the stack, the seconds the command took, and the seconds its
/// task took on the server (the last `up_ms` the server logged).
fn up(server: &TestServer) -> (serde_json::Value, f64, f64) {
    let started = Instant::now();
    let stack = server.json(&["stack", "up", &shop()]);
    let took = started.elapsed().as_secs_f64();
    let log = server.log();
    let up_ms: f64 = log
        .rsplit("up_ms=")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(f64::NAN);
    (stack, took, up_ms / 1000.0)
}

fn member_vms(stack: &serde_json::Value) -> Vec<String> {
    stack["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["vm"].as_str().unwrap().to_owned())
        .collect()
}

/// Every host port forward of a member's QEMU process to a port the stack does not make
/// public is closed, and none is recorded as a direct endpoint; the front's public one
/// answers.
fn private_ports_are_closed(server: &TestServer, stack: &serde_json::Value) {
    let processes = server.qemu_processes();
    let vms = server.json(&["vms"]);
    for m in stack["members"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let vm = m["vm"].as_str().unwrap();
        let public: Vec<u16> = if name == "front" { vec![80] } else { vec![] };
        let (_, pid) = processes
            .iter()
            .find(|(id, _)| id == vm)
            .unwrap_or_else(|| panic!("no QEMU process for {name} ({vm})"));
        for (host_port, guest_port) in hostfwds(*pid) {
            let addr = SocketAddr::from(([127, 0, 0, 1], host_port));
            let open = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
            assert_eq!(
                open,
                public.contains(&guest_port),
                "{name}: host port {host_port} → guest port {guest_port}"
            );
        }
        let record = vms
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == vm)
            .unwrap_or_else(|| panic!("{vm} not listed"));
        let direct: Vec<&String> = record["direct_endpoints"]
            .as_object()
            .map(|d| d.keys().collect())
            .unwrap_or_default();
        let want: Vec<&str> = if name == "front" {
            vec!["http"]
        } else {
            vec![]
        };
        assert_eq!(direct, want, "{name}: {record}");
    }
}

#[test]
fn the_example_stack_answers_spreads_sleeps_and_wakes_as_a_unit_and_leaves_nothing() {
    let dns_port = free_port();
    let dns_listen = format!("127.0.0.1:{dns_port}");
    let server = TestServer::start_with_templates(&[
        "--pool-memory",
        "0",
        "--dns-domain",
        DOMAIN,
        "--dns-listen",
        &dns_listen,
    ]);
    let (stack, cold_s, cold_task_s) = up(&server);
    println!(
        "stack up (cold: images cached, 4 VMs booted): {cold_s:.2} s (its task {cold_task_s:.2} s)"
    );
    assert_eq!(stack["state"], "up", "{stack}");
    let order: Vec<&str> = stack["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(order.last(), Some(&"front"), "peers first: {order:?}");
    let front = member(&stack, "front")["endpoints"]["http"]
        .as_str()
        .unwrap()
        .to_owned();
    for name in ["api-1", "api-2", "cache"] {
        let m = member(&stack, name);
        assert_eq!(
            m["endpoints"],
            serde_json::json!({}),
            "{name} is not public"
        );
        // Its private address does not serve the host. (These machines' network accepts
        // any outbound TCP connection, so what is checked is that no counter answers.)
        let private = format!("{}:80", m["address"].as_str().unwrap());
        assert!(!serves_health(&private), "{private} answers the host");
    }
    private_ports_are_closed(&server, &stack);

    // The front's name resolves to its endpoint; the backends have none.
    let front_addr: SocketAddr = front.parse().unwrap();
    let name = format!("front.shop.{DOMAIN}");
    assert_eq!(
        dig(dns_port, &["+short", &name, "A"]).trim(),
        front_addr.ip().to_string()
    );
    assert_eq!(
        dig(dns_port, &["+short", &format!("_http._tcp.{name}"), "SRV"]).trim(),
        format!("0 0 {} {name}.", front_addr.port())
    );
    let backend = dig(dns_port, &[&format!("api-1.shop.{DOMAIN}"), "A"]);
    assert_eq!(dns_status(&backend), "NXDOMAIN", "{backend}");

    // The front answers (its nginx restarted with the peers' addresses at join).
    let waited = Instant::now();
    wait_for(30, "the front answers", || {
        get(&front, "/hangar-proxy-health")
            .ok()
            .filter(|(status, _, _)| *status == 200)
    });
    println!(
        "front answering {:.2} s after stack up returned",
        waited.elapsed().as_secs_f64()
    );
    // Requests spread over both backends, each counting its own.
    let counts = spread(&front, 20);
    let api1 = member(&stack, "api-1")["address"].as_str().unwrap();
    let api2 = member(&stack, "api-2")["address"].as_str().unwrap();
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        [format!("{api1}:80"), format!("{api2}:80")],
        "{counts:?}"
    );
    assert!(counts.values().all(|&n| n > 0), "{counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 20, "{counts:?}");

    // Asleep as a unit; a connection to the front wakes it, peers first, counts kept.
    let slept = server.json(&["stack", "sleep", "shop"]);
    assert_eq!(slept["state"], "sleeping", "{slept}");
    for m in slept["members"].as_array().unwrap() {
        assert_eq!(m["state"], "sleeping", "{slept}");
    }
    let woken_at = Instant::now();
    let after = spread(&front, 2);
    println!(
        "stack woken by a connection to its front: first answers after {:.2} s",
        woken_at.elapsed().as_secs_f64()
    );
    for (upstream, n) in &after {
        assert!(
            *n > counts[upstream],
            "{upstream} counts on from {}: {n}",
            counts[upstream]
        );
    }
    let shown = server.json(&["stack", "show", "shop"]);
    assert_eq!(shown["state"], "up", "{shown}");
    for m in shown["members"].as_array().unwrap() {
        assert_eq!(m["state"], "active", "{shown}");
    }
    private_ports_are_closed(&server, &shown);

    // Down leaves no QEMU process, live VM or endpoint.
    let vms = member_vms(&stack);
    server.ok(&["stack", "down", "shop"]);
    let running: Vec<String> = server
        .qemu_processes()
        .into_iter()
        .map(|(vm, _)| vm)
        .filter(|vm| vms.contains(vm))
        .collect();
    assert!(running.is_empty(), "{running:?}");
    let live = server.json(&["vms"]);
    for vm in live.as_array().unwrap() {
        assert!(
            !vms.contains(&vm["id"].as_str().unwrap().to_owned()),
            "{vm}"
        );
    }
    assert!(
        TcpStream::connect_timeout(&front.parse().unwrap(), Duration::from_secs(1)).is_err(),
        "the front's endpoint is closed"
    );
    assert_eq!(server.json(&["stack", "ls"]), serde_json::json!([]));

    // Again, from templates: every member a clone.
    for service in ["http-counter", "web-proxy", "redis"] {
        server.wait_for_template(service, 600);
    }
    let (stack, warm_s, warm_task_s) = up(&server);
    println!("stack up (templates warm, 4 clones): {warm_s:.2} s (its task {warm_task_s:.2} s)");
    // Where the time went: each member made (served how) and joined.
    let log = server.log();
    let steps: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("stack member") || line.contains("stack up ended"))
        .collect();
    for line in &steps[steps.len().saturating_sub(9)..] {
        println!("  {line}");
    }
    let front = member(&stack, "front")["endpoints"]["http"]
        .as_str()
        .unwrap()
        .to_owned();
    let counts = spread(&front, 4);
    assert_eq!(counts.len(), 2, "{counts:?}");
    server.ok(&["stack", "down", "shop"]);
    wait_for(30, "member processes gone", || {
        let vms = member_vms(&stack);
        server
            .qemu_processes()
            .iter()
            .all(|(vm, _)| !vms.contains(vm))
            .then_some(())
    });
}
