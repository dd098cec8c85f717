//! `/metrics` scraped by a real Prometheus (Debian's `prometheus`): a real server (with
//! its own host, a real guest) and a real agent on loopback, a scrape configuration as the
//! README shows it (bearer credentials from files), then Prometheus's HTTP API asked
//! whether both targets are up and what the hangar series say.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{HANGAR, TestServer, free_port, http_get, wait_for};
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus process on loopback with its own configuration and data dir; killed and
/// its files removed when dropped.
struct Prometheus {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Prometheus {
    fn start(config: &str) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("hgprom")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut prometheus = Prometheus {
            dir,
            addr,
            child: Some(child),
        };
        wait_for(60, "prometheus answers", || {
            if let Some(status) = prometheus.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("prometheus exited with {status}:\n{}", prometheus.log());
            }
            http_get(&addr, "/-/ready")
                .ok()
                .filter(|(status, _)| *status == 200)
        });
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`'s `data`, which must be a success.
    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.addr, &format!("/api/v1/{path}")).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "success", "{path}: {body}");
        answer["data"].clone()
    }

    /// The instant query `promql`'s samples, as (labels, value).
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let escaped: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.api(&format!("query?query={escaped}"))["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sample| {
                let value = sample["value"][1].as_str().unwrap().parse().unwrap();
                (sample["metric"].clone(), value)
            })
            .collect()
    }

    /// The one value `promql` gives now, once it gives exactly one.
    fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).as_slice() {
            [(_, value)] => Some(*value),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

/// A `hangar agent` on loopback, joined to `server`; killed (with its VMs) when dropped.
struct LoopbackAgent {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
}

impl LoopbackAgent {
    fn start(server: &TestServer, name: &str, metrics_token_file: &Path) -> LoopbackAgent {
        let dir = tempfile::Builder::new()
            .prefix("hgagent")
            .tempdir_in("/tmp")
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new(HANGAR)
            .args(["agent", "--accel", "tcg", "--name", name, "--server"])
            .arg(&server.url)
            .arg("--token-file")
            .arg(server.data_dir.path().join("farm.token"))
            .arg("--metrics-token-file")
            .arg(metrics_token_file)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("HANGAR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        LoopbackAgent {
            dir,
            addr,
            child: Some(child),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for LoopbackAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (_, pid) in common::qemu_processes_under(&self.dir.path().join("data").join("vms")) {
            common::kill(pid);
        }
        common::remove_segment_netns(&self.dir.path().join("data"));
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// A secret in a file only its owner reads, as Prometheus's `credentials_file` wants it.
fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn prometheus_scrapes_the_server_and_an_agent() {
    if !Path::new(PROMETHEUS).exists() {
        panic!("{PROMETHEUS} is missing: run scripts/install-deps.sh (Debian's prometheus)");
    }
    let server = TestServer::start();
    let server_addr = server.url.trim_start_matches("http://").to_owned();
    // The server made its metrics token on first start, private.
    let metrics_token = server.data_dir.path().join("metrics.token");
    let mode = std::fs::metadata(&metrics_token)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "metrics.token is mode {mode:o}");

    // Without a token, or with the farm's, the server's page is refused.
    let (status, _) = http_get(&server_addr.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 401);

    // One real guest on the server's own host.
    let grant = server.json(&["request", "http-static", "--dedicated"]);
    assert_eq!(grant["state"], "active");

    let secrets = tempfile::tempdir().unwrap();
    let agent_token = secret_file(
        secrets.path(),
        "agent-metrics.token",
        "agent-metrics-token-of-the-scrape-test",
    );
    let agent = LoopbackAgent::start(&server, "metrics-agent", &agent_token);
    wait_for(120, "the agent is up in the farm", || {
        let hosts = server.json(&["hosts"]);
        hosts
            .as_array()?
            .iter()
            .any(|host| host["name"] == "metrics-agent" && host["state"] == "up")
            .then_some(())
    });

    // The scrape configuration the README shows, with these addresses and files.
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: hangar-server
    authorization:
      credentials_file: {server_token}
    static_configs:
      - targets: ["{server_addr}"]
  - job_name: hangar-agent
    authorization:
      credentials_file: {agent_token}
    static_configs:
      - targets: ["{agent_addr}"]
"#,
        server_token = metrics_token.display(),
        agent_token = agent_token.display(),
        agent_addr = agent.addr,
    );
    let prometheus = Prometheus::start(&config);

    // Both targets up (scraped with their tokens), as Prometheus's targets API says.
    wait_for(60, "both targets are up", || {
        let targets = prometheus.api("targets");
        let active = targets["activeTargets"].as_array()?.clone();
        let up = active.iter().filter(|t| t["health"] == "up").count();
        (active.len() == 2 && up == 2).then_some(())
    });
    assert_eq!(prometheus.value(r#"up{job="hangar-server"}"#), Some(1.0));
    assert_eq!(prometheus.value(r#"up{job="hangar-agent"}"#), Some(1.0));

    // The server's series: the one active VM on its own host, the agent's host up.
    let active = wait_for(30, "hangar_vms is scraped", || {
        prometheus.value(r#"hangar_vms{host="local",state="active"}"#)
    });
    assert_eq!(active, 1.0);
    assert_eq!(
        prometheus.value(r#"hangar_host_up{host="metrics-agent"}"#),
        Some(1.0)
    );
    assert_eq!(
        prometheus.value(r#"sum(hangar_grants_total{served=~"created|cloned"})"#),
        Some(1.0)
    );
    // The agent's own facts: its memory as /proc/meminfo says (MiB, rounded down).
    let memory = prometheus
        .value(r#"hangar_agent_memory_bytes{job="hangar-agent"}"#)
        .expect("the agent's memory");
    let meminfo_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert_eq!(memory, (meminfo_kib / 1024.0).floor() * 1_048_576.0);
    eprintln!(
        "prometheus scraped {} and {}: hangar_vms{{local,active}} = {active}, agent memory = {memory} bytes",
        server_addr, agent.addr
    );
    drop(prometheus);
    drop(agent);
}
