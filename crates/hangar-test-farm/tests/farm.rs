//! The farm on this machine: hosts reach each other and the root namespace, processes are
//! killed as asked, and nothing is left behind, whether the farm is closed, dropped while
//! a test panics, or its process aborts.
//!
//! Listeners and clients are busybox's `httpd` and `wget` (scripts/install-deps.sh
//! installs busybox). The tests skip, saying why, only where farms cannot be made (not
//! root, no `ip`); CI runs as root, so there they run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hangar_test_farm::FarmNet;

fn skip() -> bool {
    match FarmNet::available() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipped: {why}");
            true
        }
    }
}

fn busybox(args: &[&str]) -> Command {
    let mut command = Command::new("busybox");
    command.args(args).stdin(Stdio::null());
    command
}

/// Serves `dir` over HTTP in host `host` at its address, port 8080, once it answers.
fn serve(farm: &FarmNet, host: usize, dir: &std::path::Path) -> Child {
    let bind = format!("{}:8080", farm.ip(host));
    let dir = dir.to_str().unwrap();
    let child = farm
        .spawn(host, busybox(&["httpd", "-f", "-p", &bind, "-h", dir]))
        .expect("busybox httpd starts (install busybox)");
    let addr = SocketAddr::from((farm.ip(host), 8080));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "httpd never answered at {addr}");
        thread::sleep(Duration::from_millis(20));
    }
    child
}

/// GET `path` from `addr`, from this (the root) namespace: the response's body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: farm\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// Runs `command` in host `host` to its end: its stdout.
fn run_in(farm: &FarmNet, host: usize, mut command: Command) -> String {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = farm
        .spawn(host, command)
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether process `pid` is gone (or a zombie: it has left every namespace).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn assert_nothing_left(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = FarmNet::leftovers(prefix).unwrap();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hosts_reach_each_other_and_the_root_namespace() {
    if skip() {
        return;
    }
    let farm = FarmNet::create(3).unwrap();
    assert_eq!(farm.host_count(), 3);
    let bridge = farm.bridge_ip().octets();
    assert_eq!((bridge[0], bridge[3]), (10, 1));
    for host in 0..3 {
        let octets = farm.ip(host).octets();
        assert_eq!(octets[..3], bridge[..3], "one /24 with the bridge");
        assert_eq!(octets[3], u8::try_from(host + 2).unwrap());
        assert!(farm.netns(host).starts_with(farm.prefix()));
    }

    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello"), "from host 1\n").unwrap();
    let mut httpd = serve(&farm, 1, site.path());

    // The root namespace reaches host 1 at its address …
    let body = get(SocketAddr::from((farm.ip(1), 8080)), "/hello").unwrap();
    assert_eq!(body, "from host 1\n");
    // … and so does host 2.
    let url = format!("http://{}:8080/hello", farm.ip(1));
    assert_eq!(
        run_in(&farm, 2, busybox(&["wget", "-q", "-O", "-", &url])),
        "from host 1\n"
    );
    // Host 1's address is its own: nothing listens at it in the root namespace.
    assert!(
        TcpListener::bind((farm.ip(1), 0)).is_err(),
        "the root namespace does not have host 1's address"
    );

    // A server in the root namespace at the bridge address is reachable from a host.
    let listener = TcpListener::bind((farm.bridge_ip(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream.write_all(b"root here\n").unwrap();
        peer
    });
    let out = run_in(
        &farm,
        0,
        busybox(&["nc", &farm.bridge_ip().to_string(), &port.to_string()]),
    );
    assert_eq!(out, "root here\n");
    let peer = answer.join().unwrap();
    assert_eq!(peer.ip(), farm.ip(0), "the connection came from host 0");

    let pid = httpd.id();
    let prefix = farm.prefix().to_owned();
    farm.close().unwrap();
    httpd.wait().unwrap();
    assert!(is_gone(pid));
    assert_nothing_left(&prefix);
}

#[test]
fn kill_ends_only_the_spawned_process_and_kill_all_ends_the_rest() {
    if skip() {
        return;
    }
    let farm = FarmNet::create(2).unwrap();
    // An "agent" with a child of its own (a QEMU, say), and a bystander on another host.
    let mut agent_cmd = Command::new("sh");
    agent_cmd
        .args(["-c", "busybox sleep 600 & echo $!; wait"])
        .stdout(Stdio::piped());
    let mut agent = farm.spawn(0, agent_cmd).unwrap();
    let mut line = String::new();
    BufReader::new(agent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grandchild: u32 = line.trim().parse().unwrap();
    let mut bystander = farm.spawn(1, busybox(&["sleep", "600"])).unwrap();
    let mut pids = farm.pids(0).unwrap();
    pids.sort_unstable();
    let mut expected = vec![agent.id(), grandchild];
    expected.sort_unstable();
    assert_eq!(pids, expected);

    assert_eq!(farm.kill(0).unwrap(), 1);
    let status = agent.wait().unwrap();
    assert!(!status.success(), "killed: {status}");
    assert_eq!(farm.pids(0).unwrap(), [grandchild], "its child lives on");
    assert_eq!(farm.kill(0).unwrap(), 0, "nothing spawned is left there");

    farm.kill_all(0).unwrap();
    assert!(farm.pids(0).unwrap().is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_gone(grandchild) {
        assert!(Instant::now() < deadline, "{grandchild} still runs");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        farm.pids(1).unwrap(),
        [bystander.id()],
        "other hosts untouched"
    );

    let prefix = farm.prefix().to_owned();
    drop(farm);
    bystander.wait().unwrap();
    assert_nothing_left(&prefix);
}

#[test]
fn a_disconnected_host_is_unreachable_until_reconnected() {
    if skip() {
        return;
    }
    let farm = FarmNet::create(2).unwrap();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("x"), "x").unwrap();
    let mut httpd = serve(&farm, 0, site.path());
    let addr = SocketAddr::from((farm.ip(0), 8080));
    farm.disconnect(0).unwrap();
    assert!(get(addr, "/x").is_err(), "cut off from the root namespace");
    let url = format!("http://{}:8080/x", farm.ip(0));
    let mut wget = busybox(&["wget", "-q", "-T", "2", "-O", "-", &url]);
    wget.stdout(Stdio::null()).stderr(Stdio::null());
    let status = farm.spawn(1, wget).unwrap().wait().unwrap();
    assert!(!status.success(), "cut off from the other host");
    farm.reconnect(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(addr, "/x") {
            Ok(body) => break assert_eq!(body, "x"),
            Err(err) => assert!(Instant::now() < deadline, "not back: {err}"),
        }
        thread::sleep(Duration::from_millis(50));
    }
    drop(farm);
    httpd.wait().unwrap();
}

#[test]
fn farms_made_at_once_get_their_own_names_and_subnets() {
    if skip() {
        return;
    }
    let farms: Vec<FarmNet> = (0..4)
        .map(|_| thread::spawn(|| FarmNet::create(1).unwrap()))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut prefixes: Vec<&str> = farms.iter().map(FarmNet::prefix).collect();
    let mut subnets: Vec<[u8; 3]> = farms
        .iter()
        .map(|f| {
            let [a, b, c, _] = f.bridge_ip().octets();
            [a, b, c]
        })
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    subnets.sort_unstable();
    subnets.dedup();
    assert_eq!((prefixes.len(), subnets.len()), (4, 4));
    for farm in &farms {
        assert!(farm.prefix().len() == 6 && farm.prefix().starts_with("hg"));
        assert!(farm.bridge().len() <= 15);
        assert_ne!(farm.bridge_ip(), Ipv4Addr::UNSPECIFIED);
    }
}

#[test]
fn a_farm_dropped_while_a_test_panics_is_removed() {
    if skip() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = thread::spawn(move || {
        let farm = FarmNet::create(2).unwrap();
        let sleeper = farm.spawn(1, busybox(&["sleep", "600"])).unwrap();
        tx.send((farm.prefix().to_owned(), sleeper)).unwrap();
        panic!("the test fails midway");
    })
    .join();
    assert!(panicked.is_err());
    let (prefix, mut sleeper) = rx.recv().unwrap();
    assert_nothing_left(&prefix);
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "killed: {status}");
}

/// Run by [`a_farm_whose_process_aborts_is_removed_by_its_keeper`] as a process of its
/// own: makes a farm with a process in it, says so, and aborts (no destructor runs).
#[test]
#[ignore = "run as a child process by a_farm_whose_process_aborts_is_removed_by_its_keeper"]
fn child_makes_a_farm_and_aborts() {
    if std::env::var_os("HANGAR_TEST_FARM_CHILD").is_none() {
        return;
    }
    let farm = FarmNet::create(2).unwrap();
    let mut sleep = busybox(&["sleep", "600"]);
    sleep.stdout(Stdio::null());
    let sleeper = farm.spawn(0, sleep).unwrap();
    println!("FARM {} {}", farm.prefix(), sleeper.id());
    std::io::stdout().flush().unwrap();
    std::process::abort();
}

#[test]
fn a_farm_whose_process_aborts_is_removed_by_its_keeper() {
    if skip() {
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_makes_a_farm_and_aborts", "--ignored"])
        .args(["--nocapture", "--test-threads", "1"])
        .env("HANGAR_TEST_FARM_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "it aborted");
    let line = out
        .lines()
        .find_map(|l| l.split_once("FARM ").map(|(_, farm)| farm))
        .unwrap_or_else(|| panic!("the child said nothing of its farm: {out}"));
    let (prefix, pid) = line.split_once(' ').unwrap();
    let pid: u32 = pid.parse().unwrap();
    assert_nothing_left(prefix);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_gone(pid) {
        assert!(Instant::now() < deadline, "{pid} still runs");
        thread::sleep(Duration::from_millis(20));
    }
}
