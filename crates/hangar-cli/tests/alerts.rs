//! Alerts end to end: a real `hangar server` on a real PostgreSQL with an alert rules file,
//! a real `hangar agent` in its own network namespace, and a webhook receiver this test
//! runs on loopback (the server's namespace). The agent killed (kill -9) fires a
//! `host_down` alert, listed by `hangar alerts --json` and POSTed to the webhook; the
//! agent started again resolves it, and the webhook gets the resolved notice, once.

mod common;
#[path = "common/farm.rs"]
mod farm;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farm::{Agent, FarmServer, host_state, skip_without_namespaces, wait_for};
use hangar_test_farm::FarmNet;
use hangar_test_postgres::TestDatabase;
use serde_json::Value;

/// A webhook receiver on loopback: every POST's JSON body, in the order received.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0usize;
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_ok()
                    && let Ok(json) = serde_json::from_slice(&body)
                {
                    kept.lock().unwrap().push(json);
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Receiver { url, bodies }
    }

    /// The notices about `key`, as (status, the notice).
    fn notices(&self, key: &str) -> Vec<(String, Value)> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|n| n["groupKey"] == key)
            .map(|n| (n["status"].as_str().unwrap_or("").to_owned(), n.clone()))
            .collect()
    }
}

/// `hangar alerts --json` (with `--all` when asked), by key.
fn alert(server: &FarmServer, all: bool, key: &str) -> Option<Value> {
    let args: &[&str] = if all {
        &["alerts", "--all"]
    } else {
        &["alerts"]
    };
    server
        .json(args)
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .cloned()
}

#[test]
fn a_killed_agent_fires_host_down_and_its_return_resolves_it() {
    if skip_without_namespaces() {
        return;
    }
    let receiver = Receiver::start();
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        rules.path(),
        format!(
            r#"
            [webhook]
            url = "{}"
            timeout = "2s"
            attempts = 3

            [rules.host_down]
            for = "0s"
            hold = "2s"

            # What the test machine has is not what this test is about.
            [rules.host_memory]
            enabled = false
            [rules.host_disk]
            enabled = false
            "#,
            receiver.url
        ),
    )
    .unwrap();
    let net = FarmNet::create(1).unwrap();
    let db = TestDatabase::create();
    let server = FarmServer::start(&net, &db, &["--alerts", rules.path().to_str().unwrap()]);
    let mut agent = Agent::start(&net, 0, &[&server], &[]);
    let key = "host_down/host0";
    wait_for(Duration::from_secs(60), "host0 is up", || {
        host_state(&server, "host0").as_deref() == Some("up")
    });
    assert_eq!(
        server.json(&["alerts"]),
        Value::Array(Vec::new()),
        "nothing fires while up"
    );

    // kill -9 of the agent: down, then lost, and the alert fires once.
    assert_eq!(net.kill(0).unwrap(), 1, "the agent was killed");
    agent.reap();
    let killed = Instant::now();
    wait_for(Duration::from_secs(30), "host_down fires", || {
        alert(&server, false, key).is_some_and(|a| a["state"] == "firing")
    });
    let fired_after = killed.elapsed();
    let firing = alert(&server, false, key).unwrap();
    assert_eq!(firing["name"], "HostDown");
    assert_eq!(firing["labels"]["host"], "host0");
    assert!(
        firing["summary"].as_str().unwrap().contains("host0"),
        "{firing}"
    );
    wait_for(
        Duration::from_secs(15),
        "the webhook gets the firing notice",
        || !receiver.notices(key).is_empty(),
    );
    let delivered_after = killed.elapsed();
    let (status, notice) = receiver.notices(key)[0].clone();
    assert_eq!(status, "firing");
    assert_eq!(notice["alerts"][0]["labels"]["alertname"], "HostDown");
    assert_eq!(notice["alerts"][0]["labels"]["host"], "host0");
    assert_eq!(notice["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    // The host goes from down to lost meanwhile: still one alert, one notice.
    wait_for(Duration::from_secs(30), "host0 is lost", || {
        host_state(&server, "host0").as_deref() == Some("lost")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(receiver.notices(key).len(), 1, "fired once");

    // The agent back: up, and after the hold the alert resolves, once.
    agent.spawn(&net, &[&server], &[]);
    let restarted = Instant::now();
    wait_for(Duration::from_secs(60), "host0 is up again", || {
        host_state(&server, "host0").as_deref() == Some("up")
    });
    wait_for(Duration::from_secs(30), "host_down resolves", || {
        alert(&server, true, key).is_some_and(|a| a["state"] == "resolved")
    });
    let resolved_after = restarted.elapsed();
    assert!(
        alert(&server, false, key).is_none(),
        "not listed without --all once resolved"
    );
    let resolved = alert(&server, true, key).unwrap();
    assert!(resolved["resolved_at"].is_string(), "{resolved}");
    wait_for(
        Duration::from_secs(15),
        "the webhook gets the resolved notice",
        || receiver.notices(key).len() >= 2,
    );
    std::thread::sleep(Duration::from_secs(3));
    let notices = receiver.notices(key);
    let statuses: Vec<&str> = notices.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, vec!["firing", "resolved"], "no flapping");
    assert_ne!(notices[1].1["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    // The log has one line per transition.
    let log = server.log();
    let lines = |what: &str| {
        log.lines()
            .filter(|line| line.contains(what) && line.contains(key))
            .count()
    };
    assert_eq!(lines("alert firing"), 1, "{}", farm::tail(&log, 40));
    assert_eq!(lines("alert resolved"), 1);
    eprintln!(
        "host_down: fired {:.1}s after kill -9 (webhook {:.1}s); resolved {:.1}s after the agent restarted",
        fired_after.as_secs_f64(),
        delivered_after.as_secs_f64(),
        resolved_after.as_secs_f64()
    );
}
