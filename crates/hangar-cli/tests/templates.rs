//! Service templates with real QEMU guests, through the real binary: the first VM of a
//! service is booted and a template is snapshotted beside it; later VMs are clones of the
//! template, each with its own identity, entropy, endpoint and disk.

mod common;

use common::{TestServer, fetch, wait_for, whoami};

#[test]
fn clones_of_one_template_have_their_own_identity_and_entropy() {
    let server = TestServer::start_with_templates(&["--pool-memory", "0"]);
    let first = server.json(&["request", "http-static", "--dedicated"]);
    assert_eq!(first["match"], "created", "{first}");

    let template = server.wait_for_template("http-static", 240);
    assert!(
        template["size_bytes"].as_u64().unwrap() > 1 << 20,
        "{template}"
    );
    assert!(
        server.ok(&["templates"]).contains("http-static"),
        "the table lists it"
    );

    let mut seen = Vec::new();
    for _ in 0..2 {
        let grant = server.json(&["request", "http-static", "--dedicated"]);
        assert_eq!(grant["match"], "cloned", "{grant}");
        let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
        let who = whoami(&endpoint);
        assert!(
            who["hostname"].eq_ignore_ascii_case(grant["vm"].as_str().unwrap()),
            "a clone takes its own hostname: {who:?} for {grant}"
        );
        seen.push((grant["vm"].as_str().unwrap().to_owned(), who));
    }
    let first_who = whoami(first["endpoint"].as_str().unwrap());
    assert_ne!(
        seen[0].1["random"], seen[1].1["random"],
        "clones share entropy"
    );
    assert_ne!(seen[0].1["random"], first_who["random"]);
    assert_ne!(seen[0].1["hostname"], seen[1].1["hostname"]);

    // Removing clones leaves the template; their processes and files go.
    for (vm, _) in &seen {
        server.ok(&["rm", vm]);
    }
    server.ok(&["rm", first["vm"].as_str().unwrap()]);
    assert!(
        server.qemu_processes().is_empty(),
        "{:?}",
        server.qemu_processes()
    );
    let templates = server.json(&["templates"]);
    assert_eq!(templates.as_array().unwrap().len(), 1, "{templates}");
}

/// XXH64 of every file of every template directory under the server's data dir.
fn template_checksums(server: &TestServer) -> std::collections::BTreeMap<String, u64> {
    let mut sums = std::collections::BTreeMap::new();
    let root = server.data_dir.path().join("templates");
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let path = file.path();
            sums.insert(
                path.display().to_string(),
                hangar_vmm::template::file_xxh64(&path).unwrap(),
            );
        }
    }
    sums
}

/// A mapped template's files (its RAM file above all, which every clone's QEMU maps and
/// QEMU 7.2 opens read-write) are byte for byte the same after clones are made, granted
/// from the pool, slept, archived in every tier, woken and deleted; each clone keeps its
/// own memory through all of it. (A clone is never sliced: file-backed VMs have no balloon,
/// see hangar-vmm's command-line test and the heuristics' tests.)
#[test]
fn a_mapped_template_is_never_written_by_its_clones() {
    let server = TestServer::start_with_templates(&["--pool-memory", "1024"]);
    let first = server.json(&["request", "http-counter", "--dedicated"]);
    assert_eq!(first["match"], "created", "{first}");
    server.wait_for_template("http-counter", 240);
    let before = template_checksums(&server);
    assert!(
        before.keys().any(|path| path.ends_with("/ram")),
        "a mapped template has a RAM file: {before:?}"
    );
    let unchanged = |when: &str| {
        assert_eq!(template_checksums(&server), before, "after {when}");
    };

    // A cold request and a pool VM are clones; each counts on its own.
    let clone = server.json(&["request", "http-counter", "--dedicated"]);
    assert_eq!(clone["match"], "cloned", "{clone}");
    let id = clone["vm"].as_str().unwrap().to_owned();
    let endpoint = clone["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&endpoint, "/").trim(), "1");
    assert_eq!(fetch(&endpoint, "/").trim(), "2");
    unchanged("a clone served requests");

    server.ok(&["pool", "set", "http-counter", "--min", "1", "--max", "1"]);
    wait_for(240, "a ready http-counter pool VM", || {
        server
            .json(&["pools"])
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["service"] == "http-counter" && p["ready"].as_u64() >= Some(1))
            .cloned()
    });
    let pooled = server.json(&["request", "http-counter", "--dedicated"]);
    assert_eq!(pooled["match"], "exact", "{pooled}");
    let pooled_id = pooled["vm"].as_str().unwrap().to_owned();
    assert_eq!(
        fetch(pooled["endpoint"].as_str().unwrap(), "/").trim(),
        "1",
        "a pool clone starts from the template's memory"
    );
    unchanged("a pool grant");

    // Sleep, every archive tier and wake: the clone's own state survives each.
    let mut expected = 2;
    server.ok(&["sleep", &id]);
    server.ok(&["wake", &id]);
    expected += 1;
    assert_eq!(fetch(&endpoint, "/").trim(), expected.to_string());
    unchanged("sleep and wake");
    for tier in ["delta", "zstd", "raw"] {
        let out = server.ok(&["archive", &id, "--tier", tier]);
        assert!(out.contains(&format!("archived ({tier}")), "{out}");
        unchanged(&format!("a {tier} archive"));
        server.ok(&["wake", &id]);
        expected += 1;
        assert_eq!(
            fetch(&endpoint, "/").trim(),
            expected.to_string(),
            "after a {tier} archive"
        );
        unchanged(&format!("a wake from {tier}"));
    }

    server.ok(&["pool", "set", "http-counter", "--min", "0", "--max", "0"]);
    let removed = [
        id.as_str(),
        pooled_id.as_str(),
        first["vm"].as_str().unwrap(),
    ];
    server.ok(&[&["rm"][..], &removed[..]].concat());
    unchanged("deleting the clones");
    // (The demo catalog's other pools keep their VMs.)
    let left: Vec<_> = server
        .qemu_processes()
        .into_iter()
        .filter(|(vm, _)| removed.contains(&vm.as_str()))
        .collect();
    assert!(left.is_empty(), "QEMU left: {left:?}");
}

/// `PING` in RESP's inline form; the reply's first line.
fn redis_ping(endpoint: &str) -> String {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(endpoint).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    line
}

/// A layered Debian service (redis on debian-12: an OS layer, the package's layer and the
/// VM's upper disk) gets a mapped template too, and its clones answer with their own
/// identity.
#[test]
fn a_debian_service_is_cloned_from_its_mapped_template() {
    let server = TestServer::start_with_templates(&["--pool-memory", "0"]);
    let first = server.json(&["request", "redis", "--dedicated", "--deadline", "10m"]);
    assert_eq!(first["match"], "created", "{first}");
    assert_eq!(redis_ping(first["endpoint"].as_str().unwrap()), "+PONG\r\n");
    server.wait_for_template("redis", 300);
    let before = template_checksums(&server);
    assert!(
        before.keys().any(|path| path.ends_with("/ram")),
        "{before:?}"
    );
    let clone = server.json(&["request", "redis", "--dedicated"]);
    assert_eq!(clone["match"], "cloned", "{clone}");
    assert_eq!(redis_ping(clone["endpoint"].as_str().unwrap()), "+PONG\r\n");
    assert_ne!(clone["vm"], first["vm"]);
    server.ok(&[
        "rm",
        clone["vm"].as_str().unwrap(),
        first["vm"].as_str().unwrap(),
    ]);
    assert_eq!(template_checksums(&server), before, "the template changed");
}
