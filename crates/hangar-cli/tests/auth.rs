//! Users, tokens, roles and idempotency keys end to end, through the real `hangar` binary
//! and real QEMU guests (TCG).

mod common;

use std::process::{Command, Output};

use common::{HANGAR, TestServer};

/// `hangar ARGS` as the holder of `token` (none: no token at all), with no login file.
fn as_token(
    server: &TestServer,
    token: Option<&str>,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let mut command = Command::new(HANGAR);
    command
        .args(args)
        .env("HANGAR_URL", &server.url)
        .env(
            "HANGAR_DATA_DIR",
            server.data_dir.path().join("not-the-data-dir"),
        )
        .env("XDG_CONFIG_HOME", server.data_dir.path().join("config"))
        .env_remove("HANGAR_TOKEN");
    if let Some(token) = token {
        command.env("HANGAR_TOKEN", token);
    }
    let Some(input) = stdin else {
        return command.output().unwrap();
    };
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn users_tokens_and_roles_through_the_cli() {
    let server = TestServer::start();
    let admin_token = server.data_dir.path().join("admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&admin_token).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "admin.token is private");

    // Without a token: refused, and told how to get one.
    let refused = as_token(&server, None, &["vms"], None);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("API token"), "{}", text(&refused));

    // The admin (the data dir's token) adds a provisioner and gives them a token.
    assert_eq!(server.json(&["whoami"])["user"], "admin");
    server.ok(&["user", "add", "ana", "--role", "provisioner"]);
    let made = server.json(&["token", "create", "--user", "ana", "--expires", "30d"]);
    let token = made["token"].as_str().unwrap().to_owned();
    assert!(made["info"]["expires_at"].is_string());
    let users = server.json(&["users"]);
    assert_eq!(users.as_array().unwrap().len(), 2, "{users}");

    // ana logs in (the token is checked, then kept 0600) and works without HANGAR_TOKEN.
    let login = as_token(&server, None, &["login"], Some(&format!("{token}\n")));
    assert!(login.status.success(), "{}", text(&login));
    let kept = server.data_dir.path().join("config/hangar/token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&kept).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let who = as_token(&server, None, &["whoami", "--json"], None);
    let who: serde_json::Value = serde_json::from_slice(&who.stdout).unwrap();
    assert_eq!(
        (who["user"].as_str(), who["role"].as_str()),
        (Some("ana"), Some("provisioner"))
    );
    let bad_login = as_token(&server, None, &["login"], Some("hgr_nope\n"));
    assert!(
        !bad_login.status.success(),
        "a token the server refuses is not kept"
    );

    // A provisioner may not change pools or policies.
    let pool = as_token(
        &server,
        Some(&token),
        &["pool", "set", "http-static", "--min", "0"],
        None,
    );
    assert!(!pool.status.success());
    assert!(
        text(&pool).contains("not for a token of role provisioner"),
        "{}",
        text(&pool)
    );

    // Her tokens, never their secrets; revoked, refused.
    let listed = as_token(&server, Some(&token), &["tokens"], None);
    assert!(!text(&listed).contains(&token[21..]));
    let id = made["info"]["id"].as_str().unwrap();
    let revoked = as_token(&server, Some(&token), &["token", "revoke", id], None);
    assert!(revoked.status.success(), "{}", text(&revoked));
    let after = as_token(&server, Some(&token), &["whoami"], None);
    assert!(!after.status.success());

    // The audit log holds each mutating call: who, what, the outcome.
    let audit = server.json(&["audit", "--since", "1h"]);
    let calls: Vec<(String, String, u64)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_owned(),
                format!(
                    "{} {}",
                    e["method"].as_str().unwrap(),
                    e["route"].as_str().unwrap()
                ),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    for expected in [
        ("admin".to_owned(), "POST /v1/users".to_owned(), 201),
        ("admin".into(), "POST /v1/tokens".into(), 201),
        ("ana".into(), "PUT /v1/pools/{name}".into(), 403),
        ("ana".into(), "DELETE /v1/tokens/{id}".into(), 200),
    ] {
        assert!(calls.contains(&expected), "{expected:?} not in {calls:?}");
    }
}

#[test]
fn an_idempotency_key_gives_retries_the_first_vm() {
    let server = TestServer::start();
    server.ok(&["user", "add", "bo", "--role", "provisioner"]);
    let token = server.json(&["token", "create", "--user", "bo"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let request = |key: &str| {
        let output = as_token(
            &server,
            Some(&token),
            &[
                "request",
                "http-static",
                "--dedicated",
                "--idempotency-key",
                key,
                "--json",
            ],
            None,
        );
        assert!(
            output.status.success(),
            "{}\n{}",
            text(&output),
            server.log()
        );
        let grant: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        grant["vm"].as_str().unwrap().to_owned()
    };
    // Four concurrent retries of one key: one VM, the first's.
    let vms: Vec<String> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| request("order-17")))
            .collect();
        calls.into_iter().map(|call| call.join().unwrap()).collect()
    });
    assert!(vms.iter().all(|vm| *vm == vms[0]), "{vms:?}");
    assert_eq!(request("order-17"), vms[0], "a later retry too");
    let other = request("order-18");
    assert_ne!(other, vms[0], "another key, another VM");

    let listed = server.json(&["vms"]);
    let bos: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| vm["owner"] == "bo")
        .map(|vm| vm["id"].as_str().unwrap())
        .collect();
    assert_eq!(bos.len(), 2, "{listed}");
    assert!(bos.contains(&vms[0].as_str()) && bos.contains(&other.as_str()));

    // The same key with another request is refused.
    let reused = as_token(
        &server,
        Some(&token),
        &[
            "request",
            "http-counter",
            "--dedicated",
            "--idempotency-key",
            "order-17",
        ],
        None,
    );
    assert_eq!(reused.status.code(), Some(4), "{}", text(&reused));
    for vm in [&vms[0], &other] {
        server.ok(&["rm", vm]);
    }
}
