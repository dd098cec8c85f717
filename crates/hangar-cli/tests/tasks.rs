//! Tasks with real guests: a creation cancelled at each of its steps leaves nothing behind
//! (no QEMU process, no files under the VMs dir, no mounts, no listening endpoint, no live
//! VM row), and a server killed (-9) during a creation finishes or undoes it at restart.
//! The server is held at a step with the test-only `HANGAR_TEST_PAUSE_AT_STEP`.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::Instant;

use common::*;

/// The steps of a creation, in order (`crates/hangar-server/src/requests/create.rs`).
const STEPS: [&str; 5] = ["place", "prepare", "endpoints", "record", "boot"];

/// A server that holds every creation at `stage`.
fn server_pausing_at(stage: &str) -> TestServer {
    let mut server = TestServer::start_in_env(&[("HANGAR_TEST_PAUSE_AT_STEP", stage)]);
    server.env.clear();
    server
}

/// Starts `hangar request http-static --dedicated` in the background (it waits on the held
/// creation).
fn spawn_request(server: &TestServer) -> Child {
    server
        .hangar_command(&["request", "http-static", "--dedicated"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The creation task, once it is held at `stage`.
fn held_task(server: &TestServer, stage: &str) -> String {
    wait_for(120, &format!("a creation held at {stage}"), || {
        let tasks = server.json(&["tasks"]);
        let task = tasks
            .as_array()?
            .iter()
            .find(|t| t["kind"] == "create_vm" && t["state"] == "running")?;
        let id = task["id"].as_str()?.to_owned();
        let shown = server.json(&["task", "show", &id]);
        let last = shown["steps"].as_array()?.last()?.clone();
        (last["stage"] == stage).then_some(id)
    })
}

/// Listening TCP ports held by `pids` (matched through their socket inodes).
fn listening_ports(pids: &[u32]) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A = LISTEN), inode
            if fields.len() > 9
                && fields[3] == "0A"
                && inodes.contains(fields[9])
                && let Some(port) = fields[1].rsplit(':').next()
            {
                ports.insert(u16::from_str_radix(port, 16).unwrap_or(0));
            }
        }
    }
    ports
}

/// Mount points under `dir`, from this machine's mount table.
fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4).map(str::to_owned))
        .filter(|point| point.starts_with(&prefix))
        .collect()
}

/// What a server has that a creation could leave: QEMU processes, entries of its VMs dir,
/// mounts under its data dir, listening ports of the server and its forwarder, VM rows not
/// deleted.
fn leftovers(server: &TestServer) -> (usize, Vec<String>, Vec<String>, BTreeSet<u16>, usize) {
    let entries = std::fs::read_dir(server.vms_dir())
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let pids: Vec<u32> = server
        .pid()
        .into_iter()
        .chain(server.forwarder_pid())
        .collect();
    let vms = server.json(&["vms", "--all"]);
    let live = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| vm["state"] != "deleted")
        .count();
    (
        server.qemu_processes().len(),
        entries,
        mounts_under(server.data_dir.path()),
        listening_ports(&pids),
        live,
    )
}

#[test]
fn a_creation_cancelled_at_any_step_leaves_nothing() {
    for stage in STEPS {
        let server = server_pausing_at(stage);
        let before = leftovers(&server);
        let mut waiting = spawn_request(&server);
        let task = held_task(&server, stage);

        let asked = Instant::now();
        server.ok(&["task", "cancel", &task]);
        let took = asked.elapsed();
        eprintln!("cancel at {stage}: nothing left after {took:?}");

        let shown = server.json(&["task", "show", &task]);
        assert_eq!(shown["state"], "cancelled", "{shown}");
        assert!(shown["ended_at"].is_string(), "{shown}");
        assert_eq!(leftovers(&server), before, "after a cancel at {stage}");
        // The request waiting on it is answered with the failure.
        let status = waiting.wait().unwrap();
        assert!(
            !status.success(),
            "the request of a cancelled creation fails"
        );
        // Waiting on an ended, cancelled task exits non-zero; a second cancel is refused.
        assert!(!server.hangar(&["task", "wait", &task]).status.success());
        let again = server.hangar(&["task", "cancel", &task]);
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("already ended"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
    }
}

#[test]
fn a_server_killed_during_a_creation_undoes_it_at_restart() {
    let mut server = server_pausing_at("boot");
    let before = leftovers(&server);
    let mut waiting = spawn_request(&server);
    let task = held_task(&server, "boot");
    server.kill9();
    let _ = waiting.kill();
    let _ = waiting.wait();

    // Started again without the hold: the task is undone from its journal.
    server.spawn();
    let shown = server.json(&["task", "show", &task]);
    assert_eq!(shown["state"], "failed", "{shown}");
    assert!(
        shown["error"]
            .as_str()
            .unwrap()
            .contains("the server stopped before the task finished"),
        "{shown}"
    );
    let (qemu, entries, mounts, _, _) = leftovers(&server);
    assert_eq!((qemu, entries, mounts), (before.0, before.1, before.2));
    // The VM's row stays as the record of why (failed, like any failed creation).
    let vms = server.json(&["vms", "--all"]);
    let states: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed"]);
    // The server works on: a new request is served.
    server.ok(&["request", "http-static", "--dedicated"]);
}

#[test]
fn a_creation_cancelled_while_its_guest_boots_stops_qemu_and_leaves_nothing() {
    let server = TestServer::start();
    let before = leftovers(&server);
    let mut waiting = spawn_request(&server);
    // No hold: cancelled as soon as its QEMU runs (the guest still booting under TCG).
    wait_for(120, "the guest's QEMU", || {
        (!server.qemu_processes().is_empty()).then_some(())
    });
    let tasks = server.json(&["tasks"]);
    let task = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "create_vm")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let asked = Instant::now();
    let cancelled = server.hangar(&["task", "cancel", &task]);
    let took = asked.elapsed();
    let shown = server.json(&["task", "show", &task]);
    if shown["state"] == "succeeded" {
        // The guest got ready first: nothing to measure on this machine this time.
        eprintln!("the creation ended before its cancel");
        let _ = waiting.wait();
        return;
    }
    assert!(cancelled.status.success(), "{shown}");
    eprintln!("cancel while booting: nothing left after {took:?}");
    assert_eq!(shown["state"], "cancelled", "{shown}");
    assert_eq!(leftovers(&server), before);
    assert!(!waiting.wait().unwrap().success());
}
