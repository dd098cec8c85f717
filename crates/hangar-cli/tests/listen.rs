//! Where the APIs listen and which address endpoints are advertised at (issue 13, finding
//! 9), through the real binary: an API reachable from other machines needs
//! `--insecure-listen` (and then says so loudly), and a wildcard is never an endpoint host.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{HANGAR, free_port, http_get};

/// Runs `hangar ARGS` and waits at most `secs` for it to exit; a process still running then
/// is killed and `None` is answered.
fn run_for(args: &[&str], secs: u64) -> Option<Output> {
    let mut child = Command::new(HANGAR)
        .args(args)
        .env("HANGAR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(&mut child);
    None
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_server_reachable_from_other_machines_needs_insecure_listen() {
    let dir = tempfile::Builder::new()
        .prefix("hg")
        .tempdir_in("/tmp")
        .unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let port = free_port();
    for listen in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let output = run_for(&["server", "--listen", &listen, "--data-dir", data], 30)
            .unwrap_or_else(|| panic!("a server on {listen} without --insecure-listen started"));
        assert!(!output.status.success());
        let err = stderr(&output);
        assert!(err.contains("--insecure-listen"), "{err}");
        assert!(err.contains(&listen), "{err}");
    }
    let output = run_for(
        &[
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--endpoint-host",
            "0.0.0.0",
            "--data-dir",
            data,
        ],
        30,
    )
    .expect("a server advertising endpoints at 0.0.0.0 started");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("endpoint host 0.0.0.0 is a wildcard"), "{err}");

    // With the flag it starts, and its log says loudly what that means.
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = Command::new(HANGAR)
        .args([
            "server",
            "--accel",
            "tcg",
            "--no-templates",
            "--pool-memory",
            "0",
        ])
        .args(["--listen", &format!("0.0.0.0:{port}"), "--insecure-listen"])
        .args(["--data-dir", data])
        .env("HANGAR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let answered = common::wait_for(300, "the server to answer", || {
        if server.try_wait().unwrap().is_some() {
            return Some(false);
        }
        http_get(&format!("127.0.0.1:{port}").parse().unwrap(), "/healthz")
            .ok()
            .map(|(status, _)| status == 200)
    });
    stop(&mut server);
    if let Some(pid) = common::forwarder_pid_of(std::path::Path::new(data)) {
        common::kill(pid);
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(answered, "{log}");
    assert!(
        log.contains("INSECURE: the API listens on 0.0.0.0"),
        "no warning:\n{log}"
    );
}

#[test]
fn an_agent_reachable_from_other_machines_needs_insecure_listen() {
    let dir = tempfile::Builder::new()
        .prefix("hg")
        .tempdir_in("/tmp")
        .unwrap();
    let data = dir.path().join("agent");
    let data = data.to_str().unwrap();
    // No server answers at this URL: the checks come before the agent tries one.
    let server = format!("http://127.0.0.1:{}", free_port());
    let agent = |extra: &[&str]| {
        let mut args = vec![
            "agent",
            "--server",
            &server,
            "--token",
            "t",
            "--name",
            "h1",
            "--data-dir",
            data,
        ];
        args.extend_from_slice(extra);
        run_for(&args, 20)
    };
    let output = agent(&["--listen", "0.0.0.0:0"]).expect("the agent started on 0.0.0.0");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("agent API address 0.0.0.0:0") && err.contains("--insecure-listen"),
        "{err}"
    );
    let output = agent(&["--endpoint-host", "::"]).expect("the agent started advertising ::");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("endpoint host :: is a wildcard"));
}
