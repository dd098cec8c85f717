//! The host's side of hardening (issue 13): a private data dir, no build mounts left behind
//! a killed server, secrets kept out of answers, logs and plaintext files, and QEMU
//! confined. Real QEMU guests, through the real binary.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{TestServer, fetch};

/// The group a confined QEMU runs with, when the server runs as root (it is then given
/// search on the directories above its files and read on the images it opens).
fn vm_group() -> Option<u32> {
    if !hangar_image::hostfs::is_root() {
        return None;
    }
    hangar_vmm::confine::VM_USERS
        .iter()
        .find_map(|name| hangar_vmm::confine::lookup_user(name))
        .map(|(_, gid)| gid)
}

/// Whether a template's RAM file (`templates/NAME/ram`), which QEMU 7.2 opens read-write
/// to map it privately.
fn is_template_ram(path: &Path) -> bool {
    path.file_name().is_some_and(|name| name == "ram")
        && path
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .is_some_and(|name| name == "templates")
}

/// Whether a file or directory is open to anyone but its owner beyond what a confined
/// QEMU's group needs: search on a directory, read on a file (read and write on a
/// template's RAM file), nothing for others.
fn too_open(path: &Path, meta: &std::fs::Metadata) -> bool {
    let mode = meta.mode();
    if mode & 0o007 != 0 {
        return true;
    }
    let group = mode & 0o070;
    let allowed = if meta.is_dir() {
        0o010
    } else if is_template_ram(path) {
        0o060
    } else {
        0o040
    };
    group != 0 && (Some(meta.gid()) != vm_group() || group & !allowed != 0)
}

/// Every file and directory below `dir` (not following links) that group or others may
/// read, write or enter (beyond what [`too_open`] allows), with its mode.
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        if too_open(&dir, &meta) {
            found.push((dir.clone(), meta.mode() & 0o7777));
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // removed meanwhile
            };
            if meta.file_type().is_symlink() {
                continue; // a link's own mode is always 0777; its target is checked where it is
            }
            if meta.is_dir() {
                stack.push(path);
            } else if too_open(&path, &meta) {
                found.push((path, meta.mode() & 0o7777));
            }
        }
    }
    found
}

fn state(server: &TestServer, id: &str) -> serde_json::Value {
    server
        .json(&["vms", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id)
        .cloned()
        .unwrap()
}

/// Finding 3: the data dir was 0755 and the database, disks and archived guest memory 0644.
#[test]
fn the_data_dir_and_every_file_in_it_are_private_through_sleep_archive_and_wake() {
    let mut server = TestServer::start_with_templates(&["--pool-memory", "0"]);
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&endpoint, "/").trim(), "1");
    server.ok(&["sleep", &id]);
    server.ok(&["wake", &id]);
    server.ok(&["archive", &id, "--tier", "zstd"]);
    assert_eq!(state(&server, &id)["state"], "archived");
    let open = open_to_others(server.data_dir.path());
    assert!(open.is_empty(), "open to group or others: {open:#?}");
    server.ok(&["wake", &id]);
    assert_eq!(fetch(&endpoint, "/").trim(), "2");

    // A data dir found open is made private again at start-up.
    server.kill9();
    let data = server.data_dir.path().to_owned();
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    server.spawn();
    let mode = std::fs::metadata(&data).unwrap().mode() & 0o777;
    assert!(mode == 0o700 || mode == 0o710, "{mode:o}");
    assert!(server.log().contains("making it 0700"), "{}", server.log());
    let open = open_to_others(&data);
    assert!(open.is_empty(), "open to group or others: {open:#?}");
}

/// Mounts a test made, undone even when it fails (before the data dir is removed).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = hangar_image::hostfs::unmount_all_under(&self.0);
    }
}

fn mount(args: &[&str], source: &Path, target: &Path) {
    std::fs::create_dir_all(target).unwrap();
    let status = std::process::Command::new("mount")
        .args(args)
        .arg(source)
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "mount {args:?} {}", target.display());
}

/// Finding 5: a server killed during an image build left `proc`, `sysfs`, bind and
/// overlay mounts under the data dir after its restart.
#[test]
fn a_restarted_server_undoes_the_mounts_a_killed_build_left() {
    if !hangar_image::hostfs::is_root() {
        eprintln!("SKIPPED: making a build's mounts needs root");
        return;
    }
    let mut server = TestServer::start();
    server.kill9();
    let data = server.data_dir.path().to_owned();
    let _unmount = Unmount(data.clone());
    let source = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("precious"), b"kept").unwrap();
    // What a debootstrap/chroot package layer build has mounted while it runs.
    let build = data.join("layers/.tmp-crashed");
    for dir in ["lower", "upper", "work"] {
        std::fs::create_dir_all(build.join(dir)).unwrap();
    }
    let merged = build.join("merged");
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        build.join("lower").display(),
        build.join("upper").display(),
        build.join("work").display()
    );
    mount(
        &["-t", "overlay", "-o", &options],
        Path::new("overlay"),
        &merged,
    );
    mount(&["-t", "proc"], Path::new("proc"), &merged.join("proc"));
    mount(&["-t", "sysfs"], Path::new("sysfs"), &merged.join("sys"));
    mount(
        &["--bind"],
        source.path(),
        &merged.join("var/lib/apt/lists"),
    );
    assert_eq!(hangar_image::hostfs::mounts_under(&data).unwrap().len(), 4);

    server.spawn();
    let left = hangar_image::hostfs::mounts_under(&data).unwrap();
    assert!(left.is_empty(), "still mounted: {left:?}");
    assert!(
        server
            .log()
            .contains("unmounted what an interrupted image build left")
    );
    assert_eq!(
        std::fs::read(source.path().join("precious")).unwrap(),
        b"kept"
    );
    server.ok(&["services"]);
}

/// Every file below `dir` (not following links) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

/// Finding 3: `GET /v1/vms` answered the postgresql password the catalog marks secret,
/// and the SQLite store (and its WAL) held it in plaintext.
#[test]
fn a_secret_setting_reaches_the_guest_but_no_answer_log_or_file_of_the_server() {
    let server = TestServer::start();
    let out = server.ok(&["build", "postgresql"]);
    assert!(out.contains("built postgresql"), "{out}");
    let password = "Hx7-unguessable-pw-Qz";
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
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let psql = |password: &str| {
        std::process::Command::new("psql")
            .args([
                "-h", host, "-p", port, "-U", "alice", "-d", "hangar", "-tAc",
            ])
            .arg("select current_user")
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql (postgresql-client)")
    };
    let ok = psql(password);
    assert!(
        ok.status.success(),
        "the guest has the password: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!psql("wrong").status.success());

    // The answers (GET /v1/vms) show it as "(secret)".
    let vms = server.json(&["vms", "--all"]);
    assert!(!vms.to_string().contains(password), "GET /v1/vms: {vms}");
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(vm["env"]["password"], "(secret)");
    assert_eq!(vm["env"]["user"], "alice");

    // A second shared request with the same password is the same VM (matched sealed).
    let again = server.json(&[
        "request",
        "postgresql",
        "--env",
        &format!("password={password}"),
        "--env",
        "user=alice",
    ]);
    assert_eq!(again["vm"], id.as_str());

    // Not in the log, and in no file of the data dir: the database, its WAL, the VM's
    // files (read while the server runs: the WAL as it is).
    assert!(!server.log().contains(password), "the server log has it");
    let found = files_containing(server.data_dir.path(), password.as_bytes());
    assert!(found.is_empty(), "plaintext password in {found:?}");
    let key = std::fs::metadata(server.data_dir.path().join("secrets.key")).unwrap();
    assert_eq!(key.mode() & 0o777, 0o600);
}

/// A field of `/proc/PID/status`, such as `Uid` or `Seccomp`.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The regular files `pid` holds open for writing.
fn files_open_for_writing(pid: u32) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|line| line.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        let writes = flags & (libc::O_WRONLY | libc::O_RDWR) as u32 != 0;
        if writes && target.is_absolute() && !target.starts_with("/dev") && target.is_file() {
            found.push(target);
        }
    }
    found
}

/// QEMU confined: an unprivileged user when the server is root, a seccomp filter always
/// (`Seccomp: 2`), and files written only in its VM directory; through sleep, archive
/// (zstd, raw, delta) and wake, and a clone of a template. The cache is private as a
/// server makes it, so the unprivileged QEMU reads only what it was given.
#[test]
fn qemu_runs_unprivileged_under_seccomp_writing_only_its_own_directory() {
    let server = TestServer::start_with_private_cache(&["--pool-memory", "0"]);
    let check = |id: &str| {
        let (_, pid) = server
            .qemu_processes()
            .into_iter()
            .find(|(vm, _)| vm == id)
            .unwrap_or_else(|| panic!("no QEMU for {id}"));
        assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
        let uid: u32 = status_field(pid, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if hangar_image::hostfs::is_root() {
            assert_ne!(uid, 0, "QEMU runs as root");
            let dir = server.vms_dir().join(id);
            let meta = std::fs::metadata(&dir).unwrap();
            assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
        }
        let dir = std::fs::canonicalize(server.vms_dir().join(id)).unwrap();
        for file in files_open_for_writing(pid) {
            // A clone's QEMU holds its template's RAM file open read-write (QEMU 7.2 opens
            // it so to map it privately); the file's checksum is checked below.
            assert!(
                file.starts_with(&dir) || is_template_ram(&file),
                "QEMU writes {}",
                file.display()
            );
        }
    };
    let grant = server.json(&["request", "http-counter", "--dedicated"]);
    let id = grant["vm"].as_str().unwrap().to_owned();
    let endpoint = grant["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&endpoint, "/").trim(), "1");
    check(&id);
    server.ok(&["sleep", &id]);
    server.ok(&["wake", &id]);
    assert_eq!(fetch(&endpoint, "/").trim(), "2");
    let mut expected = 2;
    for tier in ["zstd", "raw"] {
        let out = server.ok(&["archive", &id, "--tier", tier]);
        assert!(out.contains("archived"), "{out}");
        server.ok(&["wake", &id]);
        expected += 1;
        assert_eq!(fetch(&endpoint, "/").trim(), expected.to_string(), "{tier}");
        check(&id);
    }
    // Once the service's template exists, a new VM is its clone, confined the same, and
    // archived as a delta against the template.
    server.wait_for_template("http-counter", 240);
    let clone = server.json(&["request", "http-counter", "--dedicated"]);
    assert_eq!(clone["match"], "cloned", "{clone}");
    let clone_id = clone["vm"].as_str().unwrap().to_owned();
    let clone_endpoint = clone["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(fetch(&clone_endpoint, "/").trim(), "1");
    check(&clone_id);
    let open = open_to_others(server.data_dir.path());
    assert!(open.is_empty(), "open to group or others: {open:#?}");
    let out = server.ok(&["archive", &clone_id, "--tier", "delta"]);
    assert!(out.contains("archived (delta"), "{out}");
    server.ok(&["wake", &clone_id]);
    assert_eq!(fetch(&clone_endpoint, "/").trim(), "2");
    check(&clone_id);
    server.ok(&["rm", &id, &clone_id]);
    // The clone, its archive and its wake left the template's RAM as it was made.
    let templates = server.data_dir.path().join("templates");
    let mut checked = 0;
    for entry in std::fs::read_dir(&templates).unwrap().flatten() {
        if let Some(info) = hangar_vmm::template::read(&entry.path()) {
            assert!(info.ram.is_some(), "a mapped template: {info:?}");
            assert!(
                hangar_vmm::template::verify_ram(&info).unwrap(),
                "{} changed",
                entry.path().display()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "one http-counter template");
}
