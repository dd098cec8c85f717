//! Clear errors and exit codes for bad input, through the real binary.

mod common;

use std::process::Command;

use common::{HANGAR, TestServer};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn malformed_catalog_is_refused_at_start_with_the_service_named() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        "[service.web]\nos = \"busybox\"\n[[service.web.port]]\nname = \"http\"\nguest = 80\n\
         [[service.web.process]]\nname = \"httpd\"\nargv = [\"httpd\"]\n\
         [service.web.ready]\nchecks = [{ http = { port = \"https\" } }]\n",
    )
    .unwrap();
    let output = Command::new(HANGAR)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--catalog")
        .arg(&catalog)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(r#"service "web": ready check names port "https""#),
        "{err}"
    );

    std::fs::write(&catalog, "[service.web\n").unwrap();
    let output = Command::new(HANGAR)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--catalog")
        .arg(&catalog)
        .output()
        .unwrap();
    assert!(
        stderr(&output).contains("is not valid TOML"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_requests_get_clear_errors_and_distinct_exit_codes() {
    let server = TestServer::start();

    let output = server.hangar(&["request", "http-statik"]);
    assert_eq!(output.status.code(), Some(3));
    let err = stderr(&output);
    assert!(err.contains(r#"no service named "http-statik""#), "{err}");
    assert!(err.contains("try: hangar request http-static"), "{err}");

    let output = server.hangar(&["request", "http-static", "--env", "os=debian-12"]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("http-static on os=debian-12 can never be offered"),
        "{err}"
    );
    assert!(
        err.contains("try: hangar request http-static --env os=busybox"),
        "{err}"
    );

    let output = server.hangar(&["request", "http-static", "--env", "bad key=1"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));

    let output = server.hangar(&["request", "http-static", "--env", "novalue"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("expected KEY=VALUE"));

    let output = server.hangar(&["rm", "vm-doesnotexist"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(stderr(&output).contains("no VM vm-doesnotexist"));

    assert!(
        server.json(&["vms"]).as_array().unwrap().is_empty(),
        "bad requests make no VMs"
    );
    assert!(server.qemu_processes().is_empty());
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused_and_an_absent_one_is_reported() {
    let server = TestServer::start();
    let output = Command::new(HANGAR)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--accel",
            "tcg",
            "--data-dir",
        ])
        .arg(server.data_dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("another hangar server is using data dir"),
        "{}",
        stderr(&output)
    );

    let output = Command::new(HANGAR)
        .args(["vms"])
        .env(
            "HANGAR_URL",
            format!("http://127.0.0.1:{}", common::free_port()),
        )
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(6));
    assert!(
        stderr(&output).contains("cannot reach the hangar server"),
        "{}",
        stderr(&output)
    );
}
