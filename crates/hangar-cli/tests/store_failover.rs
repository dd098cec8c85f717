//! The PostgreSQL primary killed while requests run: a real hangar server on a multi-host
//! connection string to a primary and its synchronous streaming standby
//! (`hangar-test-postgres`'s `ReplicatedPair`), a client making requests without pause, the
//! primary's postmaster killed (`kill -9`), the standby promoted. Requests may fail only as
//! 503 with `Retry-After`, and only for a few seconds; every request answered with success
//! is in the store afterwards and nothing is left half-done; the same server process
//! serves again from the promoted standby, and leads again.
//!
//! This test makes its own pair of PostgreSQL servers, so it skips itself in the
//! PostgreSQL pass (`HANGAR_TEST_STORE=postgres`), where it would run the same again.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, wait_for};
use hangar_test_postgres::{ReplicatedPair, replicated};

/// One API call's answer: its status, its `Retry-After`, its body.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

/// A plain HTTP/1.0 call with the admin's bearer token.
fn call(
    addr: &SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {answer:?}")))?;
    let retry_after = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().to_owned())
    });
    Ok(Answer {
        status,
        retry_after,
        body: body.to_owned(),
    })
}

/// A shared request for http-static (the body the client sends too).
const SHARED: &str = r#"{"service":"http-static"}"#;

fn request_shared(addr: &SocketAddr, token: &str) -> Answer {
    call(addr, token, "POST", "/v1/requests", Some(SHARED)).unwrap()
}

/// What the client saw of one call.
#[derive(Debug)]
struct Outcome {
    started: Instant,
    at: Instant,
    what: String,
    answer: Result<Answer, String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.answer
            .as_ref()
            .is_ok_and(|a| (200..300).contains(&a.status))
    }
}

/// The client: until `stop`, in turn, a shared request for http-static, the VM listing,
/// and a new user (`u-N`), each recorded; counts the calls that failed in `failed`.
fn client(
    addr: SocketAddr,
    token: String,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let user = format!("u-{n}");
        let user_body = format!(r#"{{"name":"{user}","role":"access"}}"#);
        let calls: [(String, &str, &str, Option<&str>); 3] = [
            ("request".into(), "POST", "/v1/requests", Some(SHARED)),
            ("vms".into(), "GET", "/v1/vms", None),
            (
                format!("user {user}"),
                "POST",
                "/v1/users",
                Some(&user_body),
            ),
        ];
        for (what, method, path, body) in calls {
            let started = Instant::now();
            let answer = call(&addr, &token, method, path, body).map_err(|err| err.to_string());
            let outcome = Outcome {
                started,
                at: Instant::now(),
                what,
                answer,
            };
            if !outcome.ok() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            outcomes.push(outcome);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    outcomes
}

#[test]
fn the_primary_killed_mid_load_and_hangar_serves_again_from_the_promoted_standby() {
    if common::store_is_postgres() {
        eprintln!("skipped in the PostgreSQL pass: this test always runs on its own PostgreSQL");
        return;
    }
    let pair = ReplicatedPair::start();
    let mut server =
        TestServer::start_on_store(&pair.url(), &["--pool-memory", "0", "--no-templates"]);
    let addr: SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let token = std::fs::read_to_string(server.data_dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let pid = server.pid().expect("the server runs");

    // The shared VM exists before the load starts (its boot is not what is measured).
    let first = request_shared(&addr, &token);
    assert_eq!(first.status, 200, "{}", first.body);
    let grant: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    let vm = grant["vm"].as_str().unwrap().to_owned();
    let replica = std::fs::read_to_string(server.data_dir.path().join("replica.id")).unwrap();
    let replica = replica.trim();
    let lease_holder = |url: &str| {
        replicated::query(url, "SELECT holder FROM leases WHERE name = 'leader'").unwrap()
    };
    wait_for(20, "the server leads", || {
        (lease_holder(&pair.primary_url()) == replica).then_some(())
    });

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, token, failures) = (stop.clone(), token.clone(), failures.clone());
        std::thread::spawn(move || client(addr, token, stop, failures))
    };
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    pair.kill_primary().unwrap();
    // A failover manager promotes once it is sure the primary is gone, which takes it
    // seconds; here: once the leader has stepped down (a leader that loses its store must)
    // and the client was answered 503 (the store retries for 2 s before it says so).
    wait_for(20, "the leader steps down", || {
        server
            .log()
            .contains("this server no longer leads")
            .then_some(())
    });
    wait_for(20, "a call fails while no server takes writes", || {
        (failures.load(Ordering::Relaxed) > 0).then_some(())
    });
    let promoting = Instant::now();
    pair.promote_standby()
        .unwrap_or_else(|why| panic!("{why}\n{}", pair.logs()));
    let promoted = Instant::now();
    wait_for(20, "the server leads again", || {
        server
            .log()
            .contains("took back this server's own leader lease")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let outcomes = load.join().unwrap();

    // Failures only as 503 + Retry-After, only around the failover.
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    for outcome in &failed {
        match &outcome.answer {
            Ok(answer) => assert!(
                answer.status == 503 && answer.retry_after.is_some(),
                "{} failed otherwise than 503 + Retry-After: {answer:?}",
                outcome.what
            ),
            Err(err) => panic!("{} got no HTTP answer: {err}", outcome.what),
        }
    }
    let first_failure = failed.first().unwrap().at;
    let last_failure = failed.last().unwrap().at;
    let window = last_failure.duration_since(first_failure);
    let after_promotion = last_failure.saturating_duration_since(promoted);
    let slowest = outcomes
        .iter()
        .map(|o| o.at.duration_since(o.started))
        .max()
        .unwrap_or_default();
    // The longest time without a successful answer: what a client saw of the failover.
    let successes: Vec<Instant> = outcomes.iter().filter(|o| o.ok()).map(|o| o.at).collect();
    let gap = successes
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default();
    eprintln!(
        "longest time without a successful answer: {:.2} s",
        gap.as_secs_f64()
    );
    eprintln!(
        "calls: {} ({} failed, all 503 + Retry-After; the slowest took {:.2} s); primary \
         killed at 0 s, promotion asked at {:.2} s and done at {:.2} s; failures from \
         {:.2} s to {:.2} s (window {:.2} s, the last {:.2} s after the promotion)",
        outcomes.len(),
        failed.len(),
        slowest.as_secs_f64(),
        promoting.duration_since(killed).as_secs_f64(),
        promoted.duration_since(killed).as_secs_f64(),
        first_failure
            .saturating_duration_since(killed)
            .as_secs_f64(),
        last_failure.saturating_duration_since(killed).as_secs_f64(),
        window.as_secs_f64(),
        after_promotion.as_secs_f64(),
    );
    assert!(
        first_failure >= killed,
        "a call failed before the primary was killed"
    );
    assert!(
        after_promotion < Duration::from_secs(3),
        "calls still failed {after_promotion:?} after the promotion"
    );

    // Service resumed on the promoted standby, by the same server process.
    let tail = &outcomes[outcomes.len().saturating_sub(9)..];
    assert!(tail.iter().all(Outcome::ok), "the last calls: {tail:#?}");
    assert_eq!(server.pid(), Some(pid), "the server was not restarted");
    assert!(!pair.standby_in_recovery().unwrap(), "promoted");

    // Every call answered with success is in the store; nothing half-done.
    let users: serde_json::Value =
        serde_json::from_str(&call(&addr, &token, "GET", "/v1/users", None).unwrap().body).unwrap();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    for outcome in outcomes.iter().filter(|o| o.ok()) {
        if let Some(user) = outcome.what.strip_prefix("user ") {
            assert!(
                names.contains(&user),
                "{user} was added, and is not in the store"
            );
        }
        if outcome.what == "request" {
            let body = &outcome.answer.as_ref().unwrap().body;
            let grant: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(grant["vm"], vm.as_str(), "shared: the same VM every time");
        }
    }
    let vms: serde_json::Value =
        serde_json::from_str(&call(&addr, &token, "GET", "/v1/vms", None).unwrap().body).unwrap();
    let live: Vec<(&str, &str)> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["id"].as_str().unwrap(), v["state"].as_str().unwrap()))
        .filter(|(_, state)| *state != "deleted")
        .collect();
    assert_eq!(
        live,
        [(vm.as_str(), "active")],
        "one VM, the shared one: {vms}"
    );
    assert_eq!(
        server.qemu_processes().len(),
        1,
        "one QEMU process, the shared VM's"
    );
    let tasks: serde_json::Value =
        serde_json::from_str(&call(&addr, &token, "GET", "/v1/tasks", None).unwrap().body).unwrap();
    let unfinished: Vec<&serde_json::Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| matches!(t["state"].as_str(), Some("running" | "rolling_back")))
        .collect();
    assert!(
        unfinished.is_empty(),
        "tasks left unfinished: {unfinished:?}"
    );

    // The lease is held again, on the new primary, by this server.
    assert_eq!(lease_holder(&pair.standby_url()), replica);
    let new_request = request_shared(&addr, &token);
    assert_eq!(new_request.status, 200, "{}", new_request.body);
    server.kill9();
}
