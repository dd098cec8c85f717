//! The heuristics engine through the real server and CLI: `hangar check` and the
//! validation in front of the request path (422 with every problem and a suggestion, no
//! QEMU started), and exact size on a pre-OS shell with a real guest.

mod common;

use common::{TestServer, wait_for, whoami};

/// The demo catalog, plus a service made of nginx-full, which conflicts with the nginx
/// service's nginx-light.
fn catalog_with_a_conflict(dir: &std::path::Path) -> std::path::PathBuf {
    let demo = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../catalog/demo.toml"
    ))
    .unwrap();
    let path = dir.join("catalog.toml");
    std::fs::write(
        &path,
        format!(
            "{demo}\n[app.full-page]\nrequires = [\"nginx-full\"]\n[[app.full-page.port]]\nname = \"http\"\nguest = 80\n\
             [[app.full-page.process]]\nname = \"nginx\"\nargv = [\"nginx\", \"-g\", \"daemon off;\"]\n\
             [app.full-page.ready]\nchecks = [{{ tcp = {{ port = \"http\" }} }}]\n\
             [service.nginx-full]\napps = [\"full-page\"]\nmemory_mib = 256\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn every_invalid_request_is_refused_with_422_and_a_suggestion_and_starts_no_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_a_conflict(dir.path());
    let server =
        TestServer::start_with(&["--pool-memory", "0", "--catalog", catalog.to_str().unwrap()]);
    let cases: &[(&[&str], &str)] = &[
        (&["--memory", "200000"], "memory_over_host"),
        (&["--vcpus", "65", "--memory", "128"], "vcpus_over_max"),
        (&["--vcpus", "0", "--memory", "128"], "vcpus_zero"),
        (&["--memory", "256-128"], "memory_range_empty"),
        (&["--memory", "32"], "memory_below_vm_min"),
        (
            &["--memory", "96", "--os", "debian-12"],
            "memory_below_os_min",
        ),
        (
            &[
                "--memory",
                "256",
                "--os",
                "debian-12",
                "--app",
                "postgresql",
                "--env",
                "password=pw",
            ],
            "memory_below_app_min",
        ),
        (&["--memory", "128", "--os", "plan9"], "unknown_os"),
        (&["--memory", "128", "--app", "http-statik"], "unknown_app"),
        (
            &["--memory", "256", "--os", "busybox", "--app", "redis"],
            "app_not_on_os",
        ),
        (
            &[
                "--memory",
                "256",
                "--os",
                "debian-12",
                "--app",
                "nginx",
                "--app",
                "nginx-full",
            ],
            "conflict",
        ),
        (
            &[
                "--memory",
                "256",
                "--app",
                "http-static",
                "--app",
                "http-counter",
            ],
            "clash",
        ),
        (
            &[
                "--memory",
                "384",
                "--os",
                "debian-12",
                "--app",
                "postgresql",
            ],
            "missing_setting",
        ),
        (
            &[
                "--memory",
                "384",
                "--os",
                "debian-12",
                "--app",
                "postgresql",
                "--env",
                "password=pw",
                "--env",
                "user=two words",
            ],
            "bad_setting",
        ),
        (&["--memory", "128", "--os", "busybox@1.36"], "os_too_old"),
        (&["--memory", "128", "--os", "busybox@1.x"], "bad_version"),
        (
            &["--memory", "128", "--app", "http-static", "--disk", "1"],
            "disk_below_min",
        ),
    ];
    for (flags, code) in cases {
        // The request: 422 (exit 4), the problem named with its suggestion.
        let mut args = vec!["request"];
        args.extend_from_slice(flags);
        let output = server.hangar(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("[{code}]")), "{args:?}: {stderr}");
        assert!(stderr.contains("try: "), "{args:?}: {stderr}");

        // The check: the same problem, as JSON, with a suggestion; exit 4 as well.
        let mut args = vec!["check", "--json"];
        args.extend_from_slice(flags);
        let output = server.hangar(&args);
        assert_eq!(output.status.code(), Some(4), "{args:?}");
        let verdict: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(verdict["ok"], false, "{verdict}");
        assert_eq!(verdict["chosen"], serde_json::Value::Null);
        let problem = verdict["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["code"] == *code)
            .unwrap_or_else(|| panic!("{code} missing: {verdict}"));
        assert!(
            !problem["suggestion"].as_str().unwrap().is_empty(),
            "{problem}"
        );
        assert!(server.qemu_processes().is_empty(), "{args:?} started QEMU");
    }

    // The suggestion of the example, word for word.
    let output = server.hangar(&[
        "request",
        "--memory",
        "256",
        "--os",
        "debian-12",
        "--app",
        "postgresql",
        "--env",
        "password=pw",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "postgresql needs at least 384 MiB, 256 asked\n      try: ask for --memory 384"
        ),
        "{stderr}"
    );

    assert!(
        server.qemu_processes().is_empty(),
        "no QEMU process ever started"
    );
    assert_eq!(
        server.json(&["vms", "--all"]),
        serde_json::json!([]),
        "no VM row"
    );
    assert!(
        !server.log().contains("request failed"),
        "no 500: {}",
        server.log()
    );
}

#[test]
fn check_shows_the_ranking_and_exact_size_slices_a_real_shell() {
    let server = TestServer::start_with(&[]);
    server.ok(&["pool", "set", "http-static", "--min", "0", "--max", "0"]);
    server.ok(&["pool", "set", "shell-1x256", "--min", "1", "--max", "1"]);
    wait_for(120, "a paused shell", || {
        let pools = server.json(&["pools"]);
        let shell = pools
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "shell-1x256")
            .cloned()?;
        (shell["ready"].as_u64() == Some(1) && shell["booting"].as_u64() == Some(0)).then_some(())
    });
    let shell = server
        .json(&["vms"])
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["pool"] == "shell-1x256")
        .cloned()
        .unwrap();
    let flags = [
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--os",
        "busybox@1.35",
        "--app",
        "http-static",
        "--exact-size",
    ];
    // Only the shell runs (a pool VM made at start-up, before its pool was emptied, is
    // gone): what runs after the check is what ran before.
    let qemu_before = wait_for(120, "only the shell to run", || {
        let running = server.qemu_processes();
        (running.len() == 1 && server.json(&["vms"]).as_array().unwrap().len() == 1)
            .then_some(running)
    });

    // `hangar check`: the shell, sliced, first; a new VM next; nothing started.
    let mut args = vec!["check"];
    args.extend_from_slice(&flags);
    let text = server.ok(&args);
    assert!(
        text.starts_with(&format!(
            "ok: partial pre-OS shell {} (1 vCPUs, 256 MiB) is booted with the busybox image, sliced to 1 vCPUs and 128 MiB",
            shell["id"].as_str().unwrap()
        )),
        "{text}"
    );
    assert!(text.contains("candidates (best first):"), "{text}");
    assert!(text.contains("#  KIND"), "{text}");
    let partial_row = text
        .lines()
        .find(|line| line.starts_with("1  partial "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        partial_row.contains("1x256") && partial_row.contains("1x128"),
        "{partial_row}"
    );
    assert!(text.lines().any(|line| line.contains(" build ")), "{text}");
    let mut args = vec!["check"];
    args.extend_from_slice(&flags);
    let verdict = server.json(&args);
    assert_eq!(verdict["ok"], true);
    assert_eq!(verdict["chosen"]["kind"], "partial");
    assert_eq!(
        verdict["candidates"][0]["slice_to"],
        serde_json::json!([1, 128])
    );
    assert_eq!(
        server.qemu_processes(),
        qemu_before,
        "a check starts nothing"
    );

    // The request: served from the shell, sliced to exactly the size asked.
    let mut args = vec!["request"];
    args.extend_from_slice(&flags);
    let grant = server.json(&args);
    assert_eq!(grant["match"], "partial", "{grant}");
    assert_eq!(grant["vm"], shell["id"]);
    assert_eq!(
        grant["sliced_to"],
        serde_json::json!({"vcpus": 1, "memory_mib": 128}),
        "{grant}"
    );
    assert_eq!(grant["chosen"]["kind"], "partial");
    assert!(
        grant["chosen"]["reason"]
            .as_str()
            .unwrap()
            .contains("sliced to 1 vCPUs and 128 MiB"),
        "{grant}"
    );
    let endpoint = grant["endpoint"].as_str().unwrap();
    // The balloon inflates asynchronously; the guest then sees the requested memory.
    let memtotal = wait_for(30, "the balloon to inflate", || {
        let kib: u64 = whoami(endpoint)["memtotal_kib"].parse().unwrap();
        (kib <= 128 * 1024).then_some(kib)
    });
    assert!(memtotal > 64 * 1024, "{memtotal} KiB");
    assert_eq!(whoami(endpoint)["cpus_online"], "0");
}
