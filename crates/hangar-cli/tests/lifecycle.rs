//! Sleep, archive and wake with real QEMU guests, through the real binary.

mod common;

use std::time::Duration;

use common::{TestServer, fetch};

fn state(server: &TestServer, id: &str) -> serde_json::Value {
    let vms = server.json(&["vms", "--all"]);
    vms.as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id)
        .cloned()
        .unwrap()
}

/// Whether the endpoint answers an HTTP request within `wait`.
fn answers_within(endpoint: &str, wait: Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&endpoint.parse().unwrap(), wait)
    else {
        return false;
    };
    stream.set_read_timeout(Some(wait)).unwrap();
    if stream
        .write_all(b"GET /health.txt HTTP/1.0\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if n > 0)
}

#[test]
fn the_counter_survives_sleep_and_ten_archive_wake_cycles() {
    let server = TestServer::start();
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    // The VM's own port forward: unlike the stable endpoint, it does not wake the VM.
    let direct = grant["direct_endpoint"].as_str().unwrap().to_owned();
    assert_ne!(endpoint, direct);
    assert_eq!(fetch(&endpoint, "/").trim(), "1");

    server.ok(&["sleep", &id]);
    assert_eq!(state(&server, &id)["state"], "sleeping");
    assert!(
        !answers_within(&direct, Duration::from_millis(500)),
        "a sleeping VM does not run"
    );
    server.ok(&["wake", &id]);
    assert_eq!(state(&server, &id)["state"], "active");
    assert_eq!(fetch(&endpoint, "/").trim(), "2");

    let mut expected = 2;
    for cycle in 0..10 {
        let tier = if cycle % 2 == 0 { "zstd" } else { "raw" };
        let out = server.ok(&["archive", &id, "--tier", tier]);
        assert!(out.contains(&format!("archived ({tier} archive")), "{out}");
        let vm = state(&server, &id);
        assert_eq!(vm["state"], "archived");
        assert_eq!(vm["archive"]["tier"], tier);
        let size = vm["archive"]["size_bytes"].as_u64().unwrap();
        assert!(size > 0 && size < 256 << 20, "{size}");
        assert!(
            !server.qemu_processes().iter().any(|(vm, _)| *vm == id),
            "no process while archived"
        );
        assert!(!answers_within(&direct, Duration::from_millis(300)));

        server.ok(&["wake", &id]);
        expected += 1;
        assert_eq!(
            fetch(&endpoint, "/").trim(),
            expected.to_string(),
            "cycle {cycle} ({tier})"
        );
    }
    let output = server.hangar(&["wake", "vm-01j00000000000000000000000"]);
    assert_eq!(output.status.code(), Some(3));
    server.ok(&["rm", &id]);
    assert!(server.qemu_processes().is_empty());
    assert!(
        !server.vms_dir().join(&id).exists(),
        "the archive went with the VM"
    );
}

/// Runs `hangar ARGS` in the background and kills the server `after` it started.
fn kill_server_during(server: &mut TestServer, args: &[&str], after: Duration) {
    let mut command = std::process::Command::new(common::HANGAR);
    command
        .args(args)
        .env("HANGAR_URL", &server.url)
        .env("HANGAR_DATA_DIR", server.data_dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().unwrap();
    std::thread::sleep(after);
    server.kill9();
    let _ = child.wait();
}

#[test]
fn kill_9_during_archive_or_wake_loses_nothing() {
    let mut server = TestServer::start();
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    let mut expected = 0;
    // Kill at different points of the operation, from its start to past its end.
    for (round, after_ms) in [50u64, 150, 300, 600].into_iter().enumerate() {
        expected += 1;
        assert_eq!(
            fetch(&endpoint, "/").trim(),
            expected.to_string(),
            "round {round}"
        );

        kill_server_during(
            &mut server,
            &["archive", &id],
            Duration::from_millis(after_ms),
        );
        server.spawn();
        let vm = state(&server, &id);
        let after_archive = vm["state"].as_str().unwrap().to_owned();
        assert!(
            ["active", "archived"].contains(&after_archive.as_str()),
            "round {round}: {vm}"
        );
        if after_archive == "archived" {
            assert!(vm["archive"]["size_bytes"].as_u64().unwrap() > 0, "{vm}");
            kill_server_during(&mut server, &["wake", &id], Duration::from_millis(after_ms));
            server.spawn();
            let vm = state(&server, &id);
            assert!(
                ["active", "archived"].contains(&vm["state"].as_str().unwrap()),
                "round {round}: {vm}"
            );
            if vm["state"] == "archived" {
                server.ok(&["wake", &id]);
            }
        }
        assert_eq!(state(&server, &id)["state"], "active");
        eprintln!(
            "round {round}: killed {after_ms} ms in; after restart the VM was {after_archive}"
        );
    }
    expected += 1;
    assert_eq!(
        fetch(&endpoint, "/").trim(),
        expected.to_string(),
        "guest memory intact"
    );
    let vms_dir = server.vms_dir().join(&id);
    let leftovers: Vec<_> = std::fs::read_dir(&vms_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("memory") || name.starts_with("archive"))
        .collect();
    assert!(
        leftovers.iter().all(|name| name.ends_with(".tmp")),
        "no complete archive left behind an active VM: {leftovers:?}"
    );
}
