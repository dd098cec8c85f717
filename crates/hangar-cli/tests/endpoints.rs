//! Stable endpoints with a real `http-counter` guest, through the real binary: the endpoint
//! a client got wakes the VM from sleep and from its archive, answers while the server is
//! down (kill -9) and after it restarts, comes back when the forwarder is killed, and is
//! gone after `hangar rm`.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, fetch};

fn vm(server: &TestServer, id: &str) -> serde_json::Value {
    server
        .json(&["vms", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id)
        .cloned()
        .unwrap()
}

/// GET / with a long read timeout (the answer may wait for a server restart).
fn patient_get(endpoint: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(endpoint)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn the_endpoint_wakes_its_vm_and_outlives_server_restarts() {
    let mut server = TestServer::start();
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    let direct = grant["direct_endpoint"].as_str().unwrap().to_owned();
    assert_ne!(
        endpoint, direct,
        "a stable endpoint in front of the VM's own"
    );
    let forwarder = server.forwarder_pid().expect("a forwarder runs");
    assert_eq!(fetch(&endpoint, "/").trim(), "1");
    assert_eq!(
        fetch(&direct, "/").trim(),
        "2",
        "the direct endpoint is the same VM"
    );

    // Archived: no process; a connection to the endpoint wakes it, and the request the
    // client wrote before the VM was back is answered, the counter going on.
    server.ok(&["archive", &id]);
    assert_eq!(vm(&server, &id)["state"], "archived");
    assert!(!server.qemu_processes().iter().any(|(vm, _)| *vm == id));
    let started = Instant::now();
    assert_eq!(fetch(&endpoint, "/").trim(), "3");
    eprintln!(
        "archived (zstd) -> answered through the endpoint in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(vm(&server, &id)["state"], "active");

    // Sleeping: woken the same way.
    server.ok(&["sleep", &id]);
    let started = Instant::now();
    assert_eq!(fetch(&endpoint, "/").trim(), "4");
    eprintln!(
        "sleeping -> answered through the endpoint in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(vm(&server, &id)["state"], "active");

    // The server is killed: the endpoint answers on; the restarted server re-adopts the
    // same forwarder and the VM keeps its endpoint.
    server.kill9();
    assert_eq!(
        fetch(&endpoint, "/").trim(),
        "5",
        "answers without the server"
    );
    server.spawn();
    assert_eq!(
        server.forwarder_pid(),
        Some(forwarder),
        "the same forwarder"
    );
    let listed = vm(&server, &id);
    assert_eq!(listed["endpoints"]["http"], endpoint.as_str());
    assert_eq!(listed["direct_endpoints"]["http"], direct.as_str());
    assert_eq!(fetch(&endpoint, "/").trim(), "6");

    // Archived while the server is down: the connection waits (the forwarder retries its
    // wake request) until the server is back, then is answered.
    server.ok(&["archive", &id, "--tier", "raw"]);
    server.kill9();
    let waiting = {
        let endpoint = endpoint.clone();
        std::thread::spawn(move || patient_get(&endpoint))
    };
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!waiting.is_finished(), "no answer while the server is down");
    server.spawn();
    let answer = waiting.join().unwrap().expect("answered after the restart");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.split("\r\n\r\n").nth(1).map(str::trim), Some("7"));
    assert_eq!(vm(&server, &id)["state"], "active");

    // Activity through the endpoint shows as the VM's last use.
    let before = vm(&server, &id)["last_used_at"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_millis(50));
    fetch(&endpoint, "/");
    common::wait_for(10, "endpoint activity to reach last use", || {
        (vm(&server, &id)["last_used_at"].as_str().unwrap() > before.as_str()).then_some(())
    });

    // The forwarder dies: the server notices at its next activity poll (every 2 s), starts
    // a new one and gives it every endpoint, on the same ports.
    common::kill(server.forwarder_pid().unwrap());
    let answer = common::wait_for(20, "the endpoint to answer again", || {
        common::http_get(&endpoint.parse().unwrap(), "/").ok()
    });
    assert_eq!(answer, (200, "9\n".to_owned()));
    assert_ne!(server.forwarder_pid(), Some(forwarder));

    server.ok(&["rm", &id]);
    assert!(
        std::net::TcpStream::connect(&endpoint).is_err(),
        "no listener left on the endpoint"
    );
    assert!(server.qemu_processes().is_empty());
}

/// Polls the VM's state until it is `want` (at most `secs`).
fn wait_state(server: &TestServer, id: &str, want: &str, secs: u64) {
    common::wait_for(secs, &format!("{id} to be {want}"), || {
        (vm(server, id)["state"] == want).then_some(())
    });
}

/// Issue 13, finding 6: with `sleep_after 1s, archive_after 3s`, a request in flight
/// across the sleep time (a slow client, its request sent in two parts 6 s apart) gets
/// its whole answer: a VM with an open connection through its endpoint is in use. Once
/// the connection closes, the VM sleeps and is archived on its policy as before.
#[test]
fn a_request_in_flight_across_the_sleep_time_gets_its_whole_answer() {
    use std::io::{Read, Write};
    // Floors low enough for the finding's policy.
    let server =
        TestServer::start_with(&["--pool-memory", "0", "--policy-min-archive-after", "1s"]);
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&endpoint, "/").trim(), "1");
    server.ok(&[
        "policy",
        "set",
        "http-counter",
        "--sleep-after",
        "1s",
        "--archive-after",
        "3s",
        "--keep-active-above",
        "never",
    ]);

    let mut slow = std::net::TcpStream::connect(&endpoint).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    slow.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        vm(&server, &id)["state"],
        "active",
        "in use while a connection is open"
    );
    slow.write_all(b"Host: counter\r\n\r\n").unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(answer.split("\r\n\r\n").nth(1).map(str::trim), Some("2"));
    drop(slow);

    // Idle now: down its policy, and woken by the next request with its memory.
    wait_state(&server, &id, "sleeping", 30);
    wait_state(&server, &id, "archived", 30);
    assert_eq!(fetch(&endpoint, "/").trim(), "3");
    let log = server.log();
    assert!(log.contains("connections open; vm in use"), "{log}");
}

/// Issue 13, finding 7: bare connects to an archived VM's endpoint (a port scan: connect
/// and close, or connect and say nothing) leave it archived; a client that sends a request
/// wakes it and is answered.
#[test]
fn a_bare_connect_leaves_an_archived_vm_archived() {
    use std::io::Read;
    let server = TestServer::start();
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&endpoint, "/").trim(), "1");
    server.ok(&["archive", &id]);

    for _ in 0..10 {
        drop(std::net::TcpStream::connect(&endpoint).unwrap());
    }
    let mut silent = std::net::TcpStream::connect(&endpoint).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut nothing = [0u8; 16];
    let read = silent.read(&mut nothing);
    assert!(
        read.as_ref()
            .is_err_and(|err| err.kind() == std::io::ErrorKind::WouldBlock),
        "nothing answers a silent client: {read:?}"
    );
    drop(silent);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(vm(&server, &id)["state"], "archived", "no wake");
    assert!(!server.qemu_processes().iter().any(|(vm, _)| *vm == id));

    let started = Instant::now();
    assert_eq!(fetch(&endpoint, "/").trim(), "2");
    eprintln!(
        "archived -> first request answered in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(vm(&server, &id)["state"], "active");
}
