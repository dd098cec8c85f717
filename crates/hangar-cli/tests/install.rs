//! Applications installed at deploy (seed 003 claim 1), through the real `hangar` binary
//! and real QEMU guests: a configuration of debian-12 with redis and nginx, which no image
//! offers together, is served from a pre-OS shell given the OS layer and both
//! applications' own layers (the ones their single-application images built), and both
//! answer through their endpoints, also once archived and woken; deleting the VM leaves
//! nothing of it.
//!
//! The redis and nginx layers are built once into the cache shared by every test and run
//! (debootstrap and apt the first time, minutes).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{TestServer, fetch, http_get, wait_for};

fn wait_shell(server: &TestServer) -> String {
    wait_for(180, "a ready pre-OS shell", || {
        server
            .json(&["vms"])
            .as_array()
            .unwrap()
            .iter()
            .find(|vm| vm["pool"] == "shell-1x256" && vm["state"] == "ready")
            .map(|vm| vm["id"].as_str().unwrap().to_owned())
    })
}

fn redis_ping(endpoint: &str) -> String {
    let mut stream = TcpStream::connect(endpoint).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn redis_and_nginx_are_installed_at_deploy_onto_a_shell_and_both_answer() {
    let server = TestServer::start_with(&[]);
    server.ok(&["pool", "set", "http-static", "--min", "0", "--max", "0"]);
    // Each application's own image (cached after the first run).
    for service in ["redis", "nginx"] {
        let out = server.ok(&["build", service]);
        assert!(out.contains(&format!("built {service}")), "{out}");
    }
    server.ok(&["pool", "set", "shell-1x256", "--min", "1", "--max", "1"]);
    let shell = wait_shell(&server);

    let grant = server.json(&[
        "request",
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--os",
        "debian-12",
        "--app",
        "redis",
        "--app",
        "nginx",
        "--env",
        "greeting=Howdy",
        "--deadline",
        "5m",
    ]);
    assert_eq!(grant["match"], "partial", "{grant:#}");
    assert_eq!(grant["vm"], shell.as_str(), "the shell was given the apps");
    assert_eq!(
        grant["installed_at_deploy"],
        serde_json::json!(["nginx", "redis"]),
        "{grant:#}"
    );
    assert!(grant["task"].is_string(), "{grant:#}");
    let vm = grant["vm"].as_str().unwrap().to_owned();

    // Both applications answer, each through its own endpoint.
    let redis = grant["endpoints"]["redis"].as_str().unwrap();
    assert_eq!(redis_ping(redis), "+PONG\r\n");
    let http = grant["endpoints"]["http"].as_str().unwrap();
    let (status, body) = http_get(&http.parse().unwrap(), "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("Hello from a hangar VM"), "{body}");
    // The request's setting reached nginx's template, rendered for this VM.
    assert_eq!(fetch(http, "/hello.txt").trim(), format!("Howdy from {vm}"));

    // The install was a task of its own.
    let task = server
        .json(&["tasks"])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == grant["task"])
        .cloned()
        .unwrap_or_default();
    assert_eq!(task["kind"], "install", "{task:#}");
    assert_eq!(task["state"], "succeeded", "{task:#}");

    // Both applications' users and packages exist: hangar-init merged the layers'
    // databases (the console is read before an archive's restore starts a new one).
    let console =
        std::fs::read_to_string(server.vms_dir().join(&vm).join("console.log")).unwrap_or_default();
    assert!(
        console.contains("merged"),
        "hangar-init merged the layers' databases: {console}"
    );

    // Archived and woken, it comes back with the same disks (the shell's empty layer
    // slots included) and both applications answer again.
    server.ok(&["archive", &vm, "--tier", "zstd"]);
    server.ok(&["wake", &vm]);
    assert_eq!(redis_ping(redis), "+PONG\r\n");
    assert_eq!(fetch(http, "/hello.txt").trim(), format!("Howdy from {vm}"));

    // The VM lists both applications; deleting it leaves no process and no files.
    let listed = server
        .json(&["vms"])
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == vm.as_str())
        .cloned()
        .unwrap();
    assert_eq!(listed["services"], serde_json::json!(["nginx", "redis"]));
    server.ok(&["rm", &vm]);
    wait_for(30, "the VM's process and files to go", || {
        let gone = !server.vms_dir().join(&vm).exists()
            && !server.qemu_processes().iter().any(|(id, _)| *id == vm);
        gone.then_some(())
    });
}
