//! A Debian image build cancelled in the middle of its debootstrap, through the real
//! `hangar` binary and a real server with a private, empty layer cache: the task ends
//! `cancelled` within seconds, and nothing is left: no process of the build (debootstrap,
//! its chrooted helpers), no mount under the server's data dir, no temporary build
//! directory and no layer in the cache.
//!
//! Needs root (debootstrap, chroot, mounts) and the Debian mirror; skipped without root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{TestServer, wait_for};

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The parent pid of `pid`, from /proc/PID/stat.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes of the build still alive: descendants of the server that are not the server's
/// own helpers, and any process whose command line, working directory or root lies under
/// `data_dir` (a killed build's orphans are no longer the server's descendants).
fn build_processes(server_pid: u32, data_dir: &Path) -> Vec<String> {
    let data_dir = data_dir.to_string_lossy().into_owned();
    let own = std::process::id();
    let mut found = Vec::new();
    for pid in pids() {
        if pid == server_pid || pid == own {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        let link_under = |what: &str| {
            std::fs::read_link(format!("/proc/{pid}/{what}"))
                .is_ok_and(|target| target.to_string_lossy().starts_with(&data_dir))
        };
        let mut ancestor = Some(pid);
        let mut descendant = false;
        for _ in 0..64 {
            ancestor = ancestor.and_then(parent_of);
            match ancestor {
                Some(p) if p == server_pid => {
                    descendant = true;
                    break;
                }
                Some(0) | Some(1) | None => break,
                Some(_) => {}
            }
        }
        // The server's own helpers (the port forwarder, started with the data dir) are
        // `hangar` processes.
        if comm == "hangar" {
            continue;
        }
        let under = cmdline.contains(&data_dir) || link_under("cwd") || link_under("root");
        if descendant || under {
            found.push(format!("{pid} {comm}: {cmdline}"));
        }
    }
    found
}

/// Mount points under `dir` in /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

/// Entries of `dir`, but for its build lock.
fn entries(dir: &PathBuf) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name != ".build.lock")
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_cancelled_debian_build_stops_within_seconds_and_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: building Debian layers needs root");
        return;
    }
    let server = TestServer::start_with_private_cache(&["--pool-memory", "0", "--no-templates"]);
    let server_pid = server.pid().expect("server runs");
    let data_dir = server.data_dir.path().to_owned();
    let cache = data_dir.join("cache");
    let build = server
        .hangar_command(&["build", "redis"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The build task, once it runs debootstrap (the private cache has no OS layer).
    let task = wait_for(180, "the build to run debootstrap", || {
        let tasks = server.json(&["tasks"]);
        let task = tasks
            .as_array()?
            .iter()
            .find(|t| t["kind"] == "build_image" && t["state"] == "running")?;
        let stage = task["stage"].as_str()?;
        stage
            .contains("debootstrap")
            .then(|| task["id"].as_str().map(str::to_owned))?
    });
    std::thread::sleep(Duration::from_secs(4));
    // Later, once debootstrap's second stage has mounted proc and sys into the tree (within
    // a minute), so that the cancel has mounts of the tool's own to undo.
    let waited = Instant::now();
    while mounts_under(&data_dir).is_empty() && waited.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mounted = mounts_under(&data_dir);
    eprintln!("cancelling with these mounts in the build tree: {mounted:?}");
    let running = build_processes(server_pid, &data_dir);
    assert!(
        running.iter().any(|p| p.contains("debootstrap")),
        "debootstrap runs before the cancel: {running:?}"
    );

    let cancelled_at = Instant::now();
    server.ok(&["task", "cancel", &task]);
    let shown = wait_for(30, "the build task to end", || {
        let shown = server.json(&["task", "show", &task]);
        let state = shown["state"].as_str()?;
        (state != "running" && state != "rolling_back").then_some(shown)
    });
    let took = cancelled_at.elapsed();
    eprintln!("a Debian build cancelled during debootstrap ended cancelled after {took:?}");
    assert_eq!(shown["state"], "cancelled", "{shown}");
    assert!(
        took < Duration::from_secs(5),
        "the cancel took {took:?} to end the task"
    );

    // `hangar build` waiting on it fails, saying why.
    let output = build.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cancel"), "{stderr}");

    assert_eq!(
        build_processes(server_pid, &data_dir),
        Vec::<String>::new(),
        "no process of the build is left"
    );
    assert_eq!(
        mounts_under(&data_dir),
        Vec::<String>::new(),
        "no mount is left under the data dir"
    );
    assert_eq!(
        entries(&cache.join("layers")),
        Vec::<String>::new(),
        "no layer and no temporary build directory in the cache"
    );
    let apt_lists: Vec<String> = entries(&cache.join("apt"))
        .into_iter()
        .filter(|name| name.starts_with("lists-") || name.starts_with(".tmp-"))
        .collect();
    assert_eq!(apt_lists, Vec::<String>::new(), "no apt lists published");
}
