//! Egress policies on real QEMU guests (issue 18): what a guest can connect to out of its
//! VM is decided on the host side. Each VM runs a busybox probe (`/cgi-bin/probe?HOST:PORT`
//! runs `nc` in the guest); TCP listeners on the host's loopback record who reached them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestServer, fetch};

/// The demo catalog plus `egress-probe`: busybox httpd with a CGI that connects from the
/// guest to `QUERY_STRING` (`HOST:PORT`), sends `probe HOSTNAME`, and prints what came back.
fn probe_catalog(dir: &std::path::Path) -> std::path::PathBuf {
    let demo = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../catalog/demo.toml"
    ))
    .unwrap();
    let probe = r#"
[service.egress-probe]
description = "busybox httpd whose CGI connects out of the guest"
os = "busybox"
vcpus = 1
memory_mib = 128

[[service.egress-probe.port]]
name = "http"
guest = 80

[[service.egress-probe.process]]
name = "httpd"
argv = ["httpd", "-f", "-p", "80", "-h", "/www"]

[service.egress-probe.files."/www/index.html"]
content = "probe\n"

[service.egress-probe.files."/www/cgi-bin/probe"]
mode = 0o755
content = '''
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
host="${QUERY_STRING%:*}"
port="${QUERY_STRING##*:}"
reply=$(echo "probe $(hostname)" | timeout 6 nc -w 3 "$host" "$port" 2>&1)
echo "rc=$? reply=$reply"
'''

[service.egress-probe.files."/www/cgi-bin/hosts"]
mode = 0o755
content = '''
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
cat /etc/hosts
'''

[service.egress-probe.ready]
timeout = "60s"
checks = [{ http = { port = "http", path = "/", status = 200 } }]
"#;
    let path = dir.join("catalog.toml");
    std::fs::write(&path, format!("{demo}\n{probe}")).unwrap();
    path
}

/// A TCP listener on the host's loopback that greets each connection with `hello NAME`
/// and records the first line each one sends.
struct Target {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Target {
    fn start(name: &str) -> Target {
        Target::on(TcpListener::bind("127.0.0.1:0").unwrap(), name)
    }

    fn on(listener: TcpListener, name: &str) -> Target {
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen_by, stopped, name) = (seen.clone(), stop.clone(), name.to_owned());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        let _ = writeln!(stream, "hello {name}");
                        let mut line = String::new();
                        let _ = BufReader::new(&stream).read_line(&mut line);
                        seen_by.lock().unwrap().push(line.trim().to_owned());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Target { port, seen, stop }
    }

    /// Whether VM `vm` reached this target.
    fn reached_by(&self, vm: &str) -> bool {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .any(|line| *line == format!("probe {vm}"))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs the guest's probe of `host:port`; returns its report (`rc=… reply=…`).
fn probe(endpoint: &str, host: &str, port: u16) -> String {
    fetch(endpoint, &format!("/cgi-bin/probe?{host}:{port}"))
}

fn request(server: &TestServer, egress: &str) -> (String, String, serde_json::Value) {
    let grant = server.json(&["request", "egress-probe", "--dedicated", "--egress", egress]);
    (
        grant["vm"].as_str().unwrap().to_owned(),
        grant["endpoint"].as_str().unwrap().to_owned(),
        grant,
    )
}

#[test]
fn none_blocks_every_connection_allow_reaches_only_its_targets_and_open_reaches_all() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = probe_catalog(dir.path());
    let server =
        TestServer::start_with(&["--pool-memory", "0", "--catalog", catalog.to_str().unwrap()]);
    let allowed = Target::start("allowed");
    let other = Target::start("other");
    // A target that is down when its VM starts: reached once it listens.
    let later = TcpListener::bind("127.0.0.1:0").unwrap();
    let later_port = later.local_addr().unwrap().port();
    drop(later);

    // The default: no connection out, yet its endpoint answers.
    let grant = server.json(&["request", "egress-probe", "--dedicated"]);
    let (none_vm, none_endpoint) = (
        grant["vm"].as_str().unwrap().to_owned(),
        grant["endpoint"].as_str().unwrap().to_owned(),
    );
    assert_eq!(grant["egress"]["policy"], "none", "{grant}");
    let report = probe(&none_endpoint, "10.0.2.2", allowed.port);
    assert!(!report.contains("hello"), "none: {report}");
    assert!(
        !allowed.reached_by(&none_vm),
        "none reached the host: {report}"
    );

    // An allow list: the guest reaches each target at its own address, nothing else.
    let policy = format!(
        "allow=127.0.0.1:{},localhost:{},127.0.0.1:{later_port}",
        allowed.port, allowed.port
    );
    let (allow_vm, allow_endpoint, grant) = request(&server, &policy);
    let shown = &grant["egress"]["allow"];
    assert_eq!(grant["egress"]["policy"], "allow", "{grant}");
    assert_eq!(
        shown[0]["guest"],
        format!("10.0.2.100:{}", allowed.port),
        "{grant}"
    );
    assert_eq!(shown[1]["name"], "localhost", "{grant}");
    let report = probe(&allow_endpoint, "10.0.2.100", allowed.port);
    assert!(report.contains("hello allowed"), "allow: {report}");
    assert!(
        allowed.reached_by(&allow_vm),
        "allow: the target saw nothing"
    );
    let report = probe(&allow_endpoint, "10.0.2.2", other.port);
    assert!(
        !report.contains("hello") && !other.reached_by(&allow_vm),
        "allow reached another: {report}"
    );
    let report = probe(&allow_endpoint, "10.0.2.2", allowed.port);
    assert!(
        !report.contains("hello"),
        "allow reached the host directly: {report}"
    );
    // A named target: resolved by the host at each connection, named in the guest.
    let hosts = fetch(&allow_endpoint, "/cgi-bin/hosts");
    assert!(hosts.contains("10.0.2.101 localhost"), "{hosts}");
    let report = probe(&allow_endpoint, "10.0.2.101", allowed.port);
    assert!(report.contains("hello allowed"), "named target: {report}");
    // Several connections at once, each relayed on its own.
    let parallel: Vec<_> = (0..3)
        .map(|_| {
            let endpoint = allow_endpoint.clone();
            let port = allowed.port;
            std::thread::spawn(move || probe(&endpoint, "10.0.2.100", port))
        })
        .collect();
    for probe in parallel {
        let report = probe.join().unwrap();
        assert!(report.contains("hello allowed"), "in parallel: {report}");
    }
    let report = probe(&allow_endpoint, "10.0.2.102", later_port);
    assert!(!report.contains("hello"), "a target that is down: {report}");
    let later = Target::on(
        TcpListener::bind(("127.0.0.1", later_port)).unwrap(),
        "later",
    );
    let report = probe(&allow_endpoint, "10.0.2.102", later_port);
    assert!(report.contains("hello later"), "once it listens: {report}");
    assert!(later.reached_by(&allow_vm));

    // Open: anything the host reaches.
    let (open_vm, open_endpoint, grant) = request(&server, "open");
    assert_eq!(grant["egress"]["policy"], "open", "{grant}");
    for target in [&allowed, &other] {
        let report = probe(&open_endpoint, "10.0.2.2", target.port);
        assert!(report.contains("hello"), "open: {report}");
        assert!(target.reached_by(&open_vm));
    }

    // Listed with its policy; the none VM still reaches nothing after all that.
    let vms = server.json(&["vms"]);
    let policy_of = |id: &str| {
        vms.as_array()
            .unwrap()
            .iter()
            .find(|vm| vm["id"] == id)
            .map(|vm| vm["egress"]["policy"].clone())
            .unwrap()
    };
    assert_eq!(policy_of(&none_vm), "none");
    assert_eq!(policy_of(&allow_vm), "allow");
    assert_eq!(policy_of(&open_vm), "open");
    let report = probe(&none_endpoint, "10.0.2.2", other.port);
    assert!(
        !report.contains("hello") && !other.reached_by(&none_vm),
        "{report}"
    );
}
