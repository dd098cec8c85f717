//! Debian services built from packages in shared layers, through the real `hangar` binary
//! and real QEMU guests: the directory ("never" with alternatives), `hangar build` and
//! `hangar images`, redis spoken to in RESP, a PostgreSQL login from a password setting, two
//! services on one VM, layer sharing measured on disk, identity kept out of the layers, a
//! failed build that leaves nothing and is retried, and an export that boots with plain QEMU.
//!
//! The debian-12 OS layer is built once (debootstrap, a minute or more) into the cache
//! shared by every test and run; builds serialise on a lock file in that cache.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, fetch, free_port, http_get, wait_for};

/// Builds `service` with `hangar build` and returns how long it took.
fn build(server: &TestServer, service: &str) -> Duration {
    let started = Instant::now();
    let out = server.ok(&["build", service]);
    assert!(out.contains(&format!("built {service}")), "{out}");
    started.elapsed()
}

/// One RESP command as an array of bulk strings; returns the raw reply.
fn resp(stream: &mut TcpStream, args: &[&str]) -> String {
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(command.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(10);
    // A reply is complete when it ends in CRLF and, for a bulk string, holds its payload.
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "redis closed the connection");
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply).into_owned();
        let complete = text.ends_with("\r\n")
            && (!text.starts_with('$')
                || text.starts_with("$-1")
                || text.matches("\r\n").count() >= 2);
        if complete || Instant::now() > deadline {
            return text;
        }
    }
}

fn redis_connect(endpoint: &str) -> TcpStream {
    let stream = TcpStream::connect(endpoint).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn images(server: &TestServer) -> serde_json::Value {
    server.json(&["images"])
}

fn image<'a>(images: &'a serde_json::Value, service: &str) -> &'a serde_json::Value {
    images["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["service"] == service && i["os"] == "debian-12")
        .unwrap_or_else(|| panic!("no image of {service}: {images:#}"))
}

fn layer<'a>(images: &'a serde_json::Value, hash: &str) -> &'a serde_json::Value {
    images["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["hash"] == hash)
        .unwrap_or_else(|| panic!("no layer {hash}"))
}

fn layer_path(server: &TestServer, hash: &str) -> std::path::PathBuf {
    server
        .data_dir
        .path()
        .join("cache/layers")
        .join(hash)
        .join("layer.sqfs")
}

/// Paths a squashfs layer holds (`unsquashfs -l`), relative to its root.
fn layer_files(path: &Path) -> Vec<String> {
    let output = Command::new("unsquashfs")
        .args(["-lc", "-d", ""])
        .arg(path)
        .output()
        .expect("unsquashfs (squashfs-tools)");
    assert!(output.status.success(), "unsquashfs -l {}", path.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.trim_start_matches('/').to_owned())
        .collect()
}

#[test]
fn debian_services_share_layers_and_answer_their_protocols() {
    let server = TestServer::start();
    let started = Instant::now();
    let redis_build = build(&server, "redis");
    let nginx_build = build(&server, "nginx");
    eprintln!(
        "build redis {:.1} s, nginx {:.1} s (debian-12 OS layer included when it was not cached)",
        redis_build.as_secs_f64(),
        nginx_build.as_secs_f64()
    );
    // Cached: building again does nothing.
    let again = build(&server, "redis");
    assert!(
        again < Duration::from_secs(5),
        "a cached build took {again:?}"
    );

    // Disk: one OS layer shared by both images, plus small deltas.
    let inventory = images(&server);
    let redis = image(&inventory, "redis");
    let nginx = image(&inventory, "nginx");
    assert_eq!(redis["built"], true);
    assert_eq!(nginx["built"], true);
    let redis_layers: Vec<&str> = redis["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    let nginx_layers: Vec<&str> = nginx["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(redis_layers[0], nginx_layers[0], "one OS layer for both");
    let os = layer(&inventory, redis_layers[0]);
    assert_eq!(os["kind"], "os");
    assert_eq!(os["name"], "debian-12");
    let os_bytes = os["size_bytes"].as_u64().unwrap();
    let mut unique: Vec<&str> = redis_layers.iter().chain(&nginx_layers).copied().collect();
    unique.sort();
    unique.dedup();
    let on_disk: u64 = unique
        .iter()
        .map(|h| std::fs::metadata(layer_path(&server, h)).unwrap().len())
        .sum();
    let deltas = on_disk - os_bytes;
    eprintln!(
        "redis + nginx on disk: {:.1} MB = OS layer {:.1} MB + deltas {:.1} MB (each image alone: {:.1} MB, {:.1} MB)",
        on_disk as f64 / 1e6,
        os_bytes as f64 / 1e6,
        deltas as f64 / 1e6,
        redis["size_bytes"].as_f64().unwrap() / 1e6,
        nginx["size_bytes"].as_f64().unwrap() / 1e6,
    );
    for hash in unique.iter().filter(|h| **h != redis_layers[0]) {
        let l = layer(&inventory, hash);
        assert!(
            l["size_bytes"].as_u64().unwrap() < 16 << 20,
            "layer {} ({}) is not small: {l:#}",
            l["name"],
            l["kind"]
        );
    }
    // The OS layer is stored once: together the two images take what each takes alone,
    // less one OS layer; what is theirs alone is small next to what they share.
    assert_eq!(
        on_disk + os_bytes,
        redis["size_bytes"].as_u64().unwrap() + nginx["size_bytes"].as_u64().unwrap()
    );
    assert!(
        deltas * 2 < os_bytes,
        "deltas of {deltas} bytes are not small next to the OS layer's {os_bytes}"
    );
    // No layer carries identity or host leftovers.
    for hash in &unique {
        let files = layer_files(&layer_path(&server, hash));
        for identity in [
            "etc/hostname",
            "etc/machine-id",
            "etc/resolv.conf",
            "usr/sbin/policy-rc.d",
        ] {
            assert!(
                !files.iter().any(|f| f == identity),
                "layer {hash} carries {identity}"
            );
        }
    }
    // The redis layer holds what the package added, not the OS again.
    let redis_files = layer_files(&layer_path(&server, redis_layers[1]));
    assert!(redis_files.iter().any(|f| f == "usr/bin/redis-server"));
    assert!(!redis_files.iter().any(|f| f == "usr/bin/apt-get"));

    // redis: RESP through the endpoint.
    let grant = server.json(&["request", "redis", "--deadline", "5m"]);
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    let mut conn = redis_connect(&endpoint);
    assert_eq!(resp(&mut conn, &["PING"]), "+PONG\r\n");
    assert_eq!(
        resp(&mut conn, &["SET", "greeting", "hello hangar"]),
        "+OK\r\n"
    );
    assert_eq!(
        resp(&mut conn, &["GET", "greeting"]),
        "$12\r\nhello hangar\r\n"
    );
    // The per-request setting's default reached the rendered configuration.
    assert!(resp(&mut conn, &["CONFIG", "GET", "maxmemory"]).contains("67108864"));
    let inventory = images(&server);
    let vm = grant["vm"].as_str().unwrap();
    assert!(
        image(&inventory, "redis")["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == vm),
        "the redis image lists its VM as a user"
    );

    // Never: a combination the catalog's constraints rule out, with alternatives.
    let never = server.hangar(&["request", "redis", "--env", "os=busybox"]);
    assert_eq!(never.status.code(), Some(4), "{never:?}");
    let stderr = String::from_utf8_lossy(&never.stderr);
    assert!(stderr.contains("can never be offered"), "{stderr}");
    assert!(
        stderr.contains("try: hangar request redis --env os=debian-12"),
        "{stderr}"
    );
    let services = server.json(&["services"]);
    let listed = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "redis")
        .unwrap();
    assert_eq!(listed["environments"], serde_json::json!(["os=debian-12"]));

    // Two services on one VM, each with its own endpoint; hello.txt is rendered per VM.
    let both = server.json(&[
        "request",
        "web-cache",
        "--env",
        "greeting=Howdy",
        "--deadline",
        "5m",
    ]);
    let http = both["endpoints"]["http"].as_str().unwrap();
    let cache = both["endpoints"]["redis"].as_str().unwrap();
    assert!(fetch(http, "/").contains("Hello from a hangar VM"));
    let vm = both["vm"].as_str().unwrap();
    assert_eq!(fetch(http, "/hello.txt").trim(), format!("Howdy from {vm}"));
    let mut conn = redis_connect(cache);
    assert_eq!(resp(&mut conn, &["PING"]), "+PONG\r\n");
    // Its chain starts with the nginx image's software layer: shared, not rebuilt.
    let inventory = images(&server);
    let web_cache = image(&inventory, "web-cache");
    assert_eq!(web_cache["layers"][0], nginx_layers[0]);
    assert_eq!(web_cache["layers"][1], nginx_layers[1]);
    eprintln!("whole test {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn postgresql_logs_in_with_the_requested_password() {
    let server = TestServer::start();
    let took = build(&server, "postgresql");
    eprintln!("build postgresql {:.1} s", took.as_secs_f64());
    // A required setting left out is a malformed request.
    let missing = server.hangar(&["request", "postgresql"]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("needs the setting password"));

    let password = "s3cret 'quoted'";
    let grant = server.json(&[
        "request",
        "postgresql",
        "--env",
        &format!("password={password}"),
        "--env",
        "user=alice",
        "--deadline",
        "5m",
    ]);
    let endpoint = grant["endpoint"].as_str().unwrap();
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let psql = |password: &str| {
        Command::new("psql")
            .args([
                "-h", host, "-p", port, "-U", "alice", "-d", "hangar", "-tAc",
            ])
            .arg("select current_user || ' ' || current_database()")
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql (postgresql-client)")
    };
    let ok = psql(password);
    assert!(
        ok.status.success(),
        "login failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "alice hangar");
    let wrong = psql("not the password");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

/// A QEMU started by the test, killed when dropped.
struct PlainQemu(Child);

impl Drop for PlainQemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn exported_image_boots_with_plain_qemu() {
    let server = TestServer::start();
    build(&server, "nginx");
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("nginx.tar");
    server.ok(&[
        "export",
        "nginx",
        tar.to_str().unwrap(),
        "--env",
        "greeting=Exported",
    ]);
    // The export is its caller's task, ended with its outcome.
    let tasks = server.json(&["tasks"]);
    let export = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "export")
        .unwrap_or_else(|| panic!("no export task in {tasks}"));
    assert_eq!(export["state"], "succeeded", "{export}");
    assert_eq!(export["owner"], "admin", "{export}");
    assert_eq!(export["service"], "nginx", "{export}");
    let unpacked = dir.path().join("image");
    std::fs::create_dir(&unpacked).unwrap();
    let status = Command::new("tar")
        .arg("-C")
        .arg(&unpacked)
        .arg("-xf")
        .arg(&tar)
        .status()
        .unwrap();
    assert!(status.success());
    for file in [
        "vmlinux",
        "initramfs.cpio",
        "disk.qcow2",
        "hangar-export.json",
        "run.sh",
    ] {
        assert!(unpacked.join(file).is_file(), "export lacks {file}");
    }
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unpacked.join("hangar-export.json")).unwrap())
            .unwrap();
    assert_eq!(info["ports"]["http"], 80);
    // The export's own command line, with the port forward moved to a free port.
    let port = free_port();
    let args: Vec<String> = info["qemu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            if a.starts_with("user,id=n0") {
                format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80")
            } else {
                a.to_owned()
            }
        })
        .collect();
    assert_eq!(args[0], "qemu-system-x86_64");
    let console = std::fs::File::create(dir.path().join("console.log")).unwrap();
    let _qemu = PlainQemu(
        Command::new(&args[0])
            .args(&args[1..])
            .current_dir(&unpacked)
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = wait_for(120, "the exported nginx to answer", || {
        http_get(&addr, "/hello.txt")
            .ok()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
    });
    assert_eq!(body.trim(), "Exported from nginx");
    let (_, page) = http_get(&addr, "/").unwrap();
    assert!(page.contains("Hello from a hangar VM"), "{page}");
}

#[test]
fn bad_catalogs_and_failed_builds_name_the_component() {
    // Catalogs refused at start-up, naming what is wrong.
    let dir = tempfile::tempdir().unwrap();
    let demo = include_str!("../../../catalog/demo.toml");
    let cases = [
        (
            "cycle",
            format!(
                "{demo}\n[software.a]\npackages = [\"hello\"]\nrequires = [\"b\"]\n[software.b]\npackages = [\"hello\"]\nrequires = [\"a\"]\n"
            ),
            "components require each other in a cycle: a -> b -> a",
        ),
        (
            "conflict",
            format!(
                "{demo}\n[service.both-nginx]\napps = [\"web-page\"]\nrequires = [\"nginx-full\"]\n"
            ),
            "service \"both-nginx\": can never be built: software nginx-light and software nginx-full conflict",
        ),
        (
            "unknown",
            format!(
                "{demo}\n[service.ghost]\napps = [\"redis\"]\nrequires = [\"no-such-thing\"]\n"
            ),
            "component \"ghost\" requires unknown component \"no-such-thing\"",
        ),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = Command::new(common::HANGAR)
            .args(["server", "--listen", "127.0.0.1:0", "--catalog"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join(format!("data-{name}")))
            .output()
            .unwrap();
        assert!(!output.status.success(), "{name}: the server started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }

    // An unknown Debian package: the build fails naming the component and the package,
    // leaves no layer, and the next build tries again.
    let catalog = dir.path().join("bogus.toml");
    std::fs::write(
        &catalog,
        format!(
            "{demo}\n[software.bogus]\npackages = [\"hangar-no-such-package\"]\n\
             [service.redis-bogus]\napps = [\"redis\"]\nrequires = [\"bogus\"]\n\
             [patch.hello]\npackages = [\"hello\"]\n\
             [service.redis-hello]\napps = [\"redis\"]\nrequires = [\"hello\"]\n"
        ),
    )
    .unwrap();
    let server =
        TestServer::start_with(&["--pool-memory", "0", "--catalog", catalog.to_str().unwrap()]);
    build(&server, "redis");
    let layers_dir = server.data_dir.path().join("cache/layers");
    for attempt in 1..=2 {
        let failed = server.hangar(&["build", "redis-bogus"]);
        assert!(!failed.status.success(), "attempt {attempt}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(
            stderr.contains("component bogus")
                && stderr.contains("\"hangar-no-such-package\" is not in the mirror"),
            "attempt {attempt}: {stderr}"
        );
        // Other tests build in the same cache: hold the build lock, so that no build is
        // in progress and any temporary directory would be a leftover.
        let lock = std::fs::File::open(layers_dir.join(".build.lock")).unwrap();
        lock.lock().unwrap();
        let leftovers: Vec<String> = std::fs::read_dir(&layers_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "partial builds left: {leftovers:?}");
        // The layer that failed is not in the cache (its hash, from the build's log line).
        let log = server.log();
        let hash = log
            .lines()
            .rev()
            .filter(|l| l.contains("building layer") && l.contains("bogus"))
            .filter_map(|l| l.split("hash=").nth(1))
            .find_map(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no build of the bogus layer logged:\n{log}"))
            .to_owned();
        assert!(
            !layers_dir.join(&hash).exists(),
            "attempt {attempt} left layer {hash}"
        );
        drop(lock);
    }
    let attempts = server
        .log()
        .lines()
        .filter(|l| l.contains("building layer") && l.contains("bogus"))
        .count();
    assert_eq!(attempts, 2, "each build tried again:\n{}", server.log());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let real_layers_dir = std::fs::canonicalize(&layers_dir).unwrap();
    assert!(
        !mounts.contains(real_layers_dir.to_str().unwrap()),
        "a build left a mount:\n{mounts}"
    );

    // A viable image not built yet, with a deadline shorter than the build and boot:
    // "try again shortly" while the build goes on, and the next request finds the VM.
    let hurried = server.hangar(&["request", "redis-hello", "--deadline", "1s"]);
    assert_eq!(hurried.status.code(), Some(5), "{hurried:?}");
    assert!(String::from_utf8_lossy(&hurried.stderr).contains("try again shortly"));
    let grant = wait_for(300, "redis-hello to be made", || {
        let output = server.hangar(&["request", "redis-hello", "--deadline", "2s", "--json"]);
        output
            .status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap())
    });
    let mut conn = redis_connect(grant["endpoint"].as_str().unwrap());
    assert_eq!(resp(&mut conn, &["PING"]), "+PONG\r\n");
}
