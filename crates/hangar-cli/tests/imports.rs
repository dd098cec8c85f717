//! Imported machines through the real binary and server: a crafted image is refused with
//! nothing left behind; a real disk is checked, staged, stored, listed, kept across a
//! restart and removed.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::TestServer;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Files left in the server's model store (its work directories included).
fn models(server: &TestServer) -> Vec<String> {
    match std::fs::read_dir(server.data_dir.path().join("models")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn a_qcow2_backed_by_a_host_file_is_refused_and_leaves_nothing() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil.qcow2");
    let evil_s = evil.to_str().unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "/etc/shadow",
        "-u",
        evil_s,
        "64M",
    ]);
    let out = server.hangar(&["import", evil_s, "--name", "evil", "--format", "qcow2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backing file") && stderr.contains("/etc/shadow"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(4), "422 is exit status 4: {stderr}");
    assert_eq!(models(&server), Vec::<String>::new());
    assert_eq!(server.json(&["imports"]), serde_json::json!([]));
    let tasks = server.json(&["tasks"]);
    let task = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "import")
        .unwrap();
    assert_eq!(task["state"], "failed", "{task}");
}

/// A 40 MiB disk: an MBR with one Linux partition holding an ext4 root with an OS and
/// identity in it.
fn small_disk(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("tree");
    for sub in ["etc/ssh", "usr/lib", "var/lib/dhcp"] {
        std::fs::create_dir_all(tree.join(sub)).unwrap();
    }
    std::fs::write(tree.join("usr/lib/os-release"), "ID=debian\n").unwrap();
    std::os::unix::fs::symlink("../usr/lib/os-release", tree.join("etc/os-release")).unwrap();
    std::fs::write(
        tree.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    std::fs::write(tree.join("etc/hostname"), "old-host\n").unwrap();
    std::fs::write(tree.join("etc/ssh/ssh_host_ed25519_key"), "secret").unwrap();
    std::fs::write(tree.join("var/lib/dhcp/dhclient.leases"), "lease {}").unwrap();
    let fs = dir.join("root.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&fs)
        .arg("32M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk = dir.join("disk.img");
    let total: u64 = 40 << 20;
    let mut file = std::fs::File::create(&disk).unwrap();
    file.set_len(total).unwrap();
    let mut mbr = [0u8; 512];
    mbr[446] = 0x80;
    mbr[450] = 0x83;
    mbr[454..458].copy_from_slice(&2048u32.to_le_bytes());
    mbr[458..462].copy_from_slice(&((total / 512 - 2048) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    file.write_all(&mbr).unwrap();
    drop(file);
    let out = Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc", "status=none"])
        .output()
        .unwrap();
    assert!(out.status.success());
    disk
}

#[test]
fn an_imported_disk_is_stored_listed_kept_across_a_restart_and_removed() {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: importing needs root (loop devices, mounts)");
        return;
    }
    let mut server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let disk = small_disk(dir.path());
    let view = server.json(&[
        "import",
        disk.to_str().unwrap(),
        "--name",
        "legacy",
        "--format",
        "raw",
        "--port",
        "http=80",
        "--memory",
        "256",
    ]);
    assert_eq!(view["layout"], "full-disk", "{view}");
    assert_eq!(view["root_partition"], 1);
    assert_eq!(view["ports"]["http"], 80);
    let stripped: Vec<&str> = view["stripped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for path in [
        "/etc/machine-id",
        "/etc/ssh/ssh_host_ed25519_key",
        "/var/lib/dhcp/dhclient.leases",
        "/etc/hostname",
    ] {
        assert!(stripped.contains(&path), "{path} in {stripped:?}");
    }
    for step in ["upload", "check", "convert", "stage", "store"] {
        assert!(view["timings_ms"][step].is_u64(), "{step}: {view}");
    }
    eprintln!("import timings: {}", view["timings_ms"]);
    assert_eq!(models(&server), vec!["legacy.qcow2".to_string()]);
    // A second import of the name is a conflict.
    let again = server.hangar(&[
        "import",
        disk.to_str().unwrap(),
        "--name",
        "legacy",
        "--format",
        "raw",
    ]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("exists"), "{stderr}");

    server.kill9();
    server.spawn();
    let listed = server.json(&["imports"]);
    assert_eq!(listed[0]["name"], "legacy", "{listed}");
    assert!(server.ok(&["imports"]).contains("full-disk (root 1)"));
    // Offered as a service again after the restart.
    let services = server.json(&["services"]);
    assert!(
        services
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "legacy"),
        "{services}"
    );

    server.ok(&["unimport", "legacy"]);
    assert_eq!(server.json(&["imports"]), serde_json::json!([]));
    let services = server.json(&["services"]);
    assert!(
        !services
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "legacy"),
        "{services}"
    );
    assert_eq!(models(&server), Vec::<String>::new());
}

/// The bootable Debian disk of `tests/data/bootable-debian.sh`, built once per recipe
/// (the script's hash) into `/work/hangar-cache/imports` when that exists, else the
/// harness's shared cache.
fn bootable_debian() -> std::path::PathBuf {
    use sha2::{Digest, Sha256};
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bootable-debian.sh");
    let recipe = std::fs::read(&script).unwrap();
    let hash = hex::encode(&Sha256::digest(&recipe)[..8]);
    let base = if Path::new("/work/hangar-cache").is_dir() {
        std::path::PathBuf::from("/work/hangar-cache")
    } else {
        common::shared_cache()
    };
    let dir = base.join("imports");
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join(format!("bootable-debian-{hash}.qcow2"));
    if image.exists() {
        return image;
    }
    let mirror = std::env::var("HANGAR_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&image)
        .arg(&mirror)
        .arg(dir.join("debs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the bootable Debian disk failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("built {} in {:?}", image.display(), started.elapsed());
    image
}

#[test]
fn an_imported_debian_disk_boots_with_its_own_bootloader_and_serves_http() {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: building and importing a disk needs root");
        return;
    }
    let image = bootable_debian();
    let server = TestServer::start_with(&["--pool-memory", "1024"]);
    let started = std::time::Instant::now();
    let view = server.json(&[
        "import",
        image.to_str().unwrap(),
        "--name",
        "legacy-web",
        "--format",
        "qcow2",
        "--port",
        "http=80",
        "--memory",
        "512",
    ]);
    eprintln!(
        "import took {:?}: {}",
        started.elapsed(),
        view["timings_ms"]
    );
    assert_eq!(view["layout"], "full-disk", "{view}");
    assert!(
        view["stripped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/var/lib/dhcp/dhclient.eth0.leases"),
        "{view}"
    );
    let services = server.ok(&["services"]);
    assert!(services.contains("legacy-web"), "{services}");

    // Booted by SeaBIOS and its own GRUB under TCG: tens of seconds.
    let started = std::time::Instant::now();
    let grant = server.json(&["request", "legacy-web", "--deadline", "290s"]);
    let booted = started.elapsed();
    let endpoint: std::net::SocketAddr = grant["endpoint"].as_str().unwrap().parse().unwrap();
    let (status, body) = common::http_get(&endpoint, "/index.html").unwrap();
    eprintln!("first boot to answering: {booted:?}");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from an imported machine"), "{body}");
    let vms = server.json(&["vms"]);
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|vm| vm["services"][0] == "legacy-web" && vm["state"] == "active"),
        "{vms}"
    );
    // Pooled: booted to ready and paused, then handed out (no agent: not re-identified).
    server.ok(&["pool", "set", "legacy-web", "--min", "1", "--max", "1"]);
    let started = std::time::Instant::now();
    common::wait_for(290, "a ready legacy-web pool VM", || {
        let pools = server.json(&["pools"]);
        pools
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "legacy-web" && p["ready"].as_u64() == Some(1))
            .cloned()
    });
    eprintln!("pool VM ready after {:?}", started.elapsed());
    let pooled = server.json(&["request", "legacy-web", "--dedicated"]);
    assert_eq!(pooled["match"], "exact", "{pooled}");
    assert_ne!(pooled["vm"], grant["vm"]);
    let endpoint: std::net::SocketAddr = pooled["endpoint"].as_str().unwrap().parse().unwrap();
    let (status, body) = common::http_get(&endpoint, "/index.html").unwrap();
    assert_eq!(status, 200, "{body}");

    // A model with a live VM stays.
    let refused = server.hangar(&["unimport", "legacy-web"]);
    assert!(!refused.status.success());
}
