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
    assert_eq!(fetch(&endpoint, "/").trim(), "1");

    server.ok(&["sleep", &id]);
    assert_eq!(state(&server, &id)["state"], "sleeping");
    assert!(
        !answers_within(&endpoint, Duration::from_millis(500)),
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
        assert!(!answers_within(&endpoint, Duration::from_millis(300)));

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
