//! A farm for end-to-end tests: `hangar server`s without a host of their own on a real
//! PostgreSQL, listening on the bridge of a [`FarmNet`], and `hangar agent`s, each in its own
//! network namespace. Included by the farm tests with `#[path]`; dropping a server or an
//! agent kills its process (and the agent's QEMU processes) and prints its log's tail when
//! the test failed.

#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{HANGAR, http_get, kill, qemu_processes_under, shared_cache};
use hangar_test_farm::FarmNet;
use hangar_test_postgres::TestDatabase;
use serde_json::Value;

/// Whether a farm test should skip itself (says why): in the PostgreSQL pass (farm tests
/// always run on PostgreSQL, in the first pass), or where network namespaces cannot be made.
pub fn skip_without_namespaces() -> bool {
    if crate::common::store_is_postgres() {
        eprintln!("skipping: the farm tests run on PostgreSQL in the first pass already");
        return true;
    }
    if let Err(err) = FarmNet::available() {
        eprintln!("skipping: {err}");
        return true;
    }
    false
}

/// A `hangar server` without a host of its own, listening on the farm's bridge.
pub struct FarmServer {
    pub data_dir: tempfile::TempDir,
    pub url: String,
    pub args: Vec<String>,
    child: Option<Child>,
}

impl FarmServer {
    pub fn start(net: &FarmNet, db: &TestDatabase, extra: &[&str]) -> FarmServer {
        FarmServer::start_as(net, db, true, extra)
    }

    /// [`FarmServer::start`] holding stable endpoints (its forwarder, listening on
    /// `--endpoint-host`) in front of the VMs' own endpoints, instead of answering with
    /// those.
    pub fn start_with_stable_endpoints(
        net: &FarmNet,
        db: &TestDatabase,
        extra: &[&str],
    ) -> FarmServer {
        FarmServer::start_as(net, db, false, extra)
    }

    fn start_as(net: &FarmNet, db: &TestDatabase, direct: bool, extra: &[&str]) -> FarmServer {
        let data_dir = tempfile::Builder::new()
            .prefix("hgf")
            .tempdir_in("/tmp")
            .unwrap();
        std::os::unix::fs::symlink(shared_cache(), data_dir.path().join("cache")).unwrap();
        let port = crate::common::free_port();
        let mut args: Vec<String> = [
            "server",
            "--no-local-host",
            "--no-templates",
            "--direct-endpoints",
            "--pool-memory",
            "0",
            "--host-down-after",
            "2s",
            "--host-lost-after",
            "4s",
            "--store",
            db.url(),
            "--insecure-listen",
            "--listen",
        ]
        .iter()
        .map(|s| s.to_string())
        .filter(|arg| direct || arg != "--direct-endpoints")
        .collect();
        args.push(format!("{}:{port}", net.bridge_ip()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = FarmServer {
            url: format!("http://{}:{port}", net.bridge_ip()),
            data_dir,
            args,
            child: None,
        };
        server.spawn();
        server
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(HANGAR)
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .env("HANGAR_LOG", "info,hangar_server=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(Duration::from_secs(300), "the server answers", || {
            self.health().is_some()
        });
    }

    pub fn health(&self) -> Option<Value> {
        let addr: SocketAddr = self.url.trim_start_matches("http://").parse().unwrap();
        let (status, body) = http_get(&addr, "/healthz").ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    pub fn role(&self) -> Option<String> {
        Some(self.health()?["role"].as_str()?.to_owned())
    }

    pub fn token_file(&self) -> PathBuf {
        self.data_dir.path().join("farm.token")
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs the CLI against this server; returns its status, stdout and stderr.
    pub fn hangar(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(HANGAR)
            .args(args)
            .env("HANGAR_URL", &self.url)
            .env("HANGAR_DATA_DIR", self.data_dir.path())
            .env_remove("HANGAR_TOKEN")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The CLI's `--json` answer, which must succeed.
    /// VM `id` as `hangar vms --all --json` lists it.
    pub fn vm(&self, id: &str) -> Value {
        self.json(&["vms", "--all"])
            .as_array()
            .expect("a list of VMs")
            .iter()
            .find(|vm| vm["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no VM {id} listed"))
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let (ok, out, err) = self.hangar(&args);
        assert!(
            ok,
            "hangar {args:?} failed: {err}\nserver log:\n{}",
            self.log()
        );
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for FarmServer {
    fn drop(&mut self) {
        self.kill9();
        crate::common::remove_segment_netns(self.data_dir.path());
        if std::thread::panicking() {
            eprintln!(
                "--- server log {} ---\n{}",
                self.url,
                tail(&self.log(), 200)
            );
        }
    }
}

/// A `hangar agent` in host `index` of the farm network.
pub struct Agent {
    pub index: usize,
    pub name: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl Agent {
    pub fn start(net: &FarmNet, index: usize, servers: &[&FarmServer], extra: &[&str]) -> Agent {
        let data_dir = PathBuf::from(format!("/tmp/{}-agent{index}", net.prefix()));
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut agent = Agent {
            index,
            name: format!("host{index}"),
            data_dir,
            child: None,
        };
        agent.spawn(net, servers, extra);
        agent
    }

    pub fn spawn(&mut self, net: &FarmNet, servers: &[&FarmServer], extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("agent.log"))
            .unwrap();
        let urls: Vec<&str> = servers.iter().map(|s| s.url.as_str()).collect();
        let mut command = Command::new(HANGAR);
        command
            .args(["agent", "--accel", "tcg", "--name", &self.name, "--server"])
            .arg(urls.join(","))
            .arg("--token-file")
            .arg(servers[0].token_file())
            .arg("--listen")
            .arg(format!("{}:7800", net.ip(self.index)))
            .arg("--insecure-listen")
            .arg("--endpoint-host")
            .arg(net.ip(self.index).to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(extra)
            .env("HANGAR_LOG", "info,hangar_host=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(net.spawn(self.index, command).unwrap());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("agent.log")).unwrap_or_default()
    }

    /// QEMU processes of this agent's VMs, as (vm id, pid).
    pub fn qemus(&self) -> Vec<(String, u32)> {
        qemu_processes_under(&self.data_dir.join("vms"))
    }

    /// Reaps the agent's process after the farm killed it.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (_, pid) in self.qemus() {
            kill(pid);
        }
        crate::common::remove_segment_netns(&self.data_dir);
        if std::thread::panicking() {
            eprintln!(
                "--- agent {} log ---\n{}",
                self.name,
                tail(&self.log(), 120)
            );
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// The hosts as `hangar hosts --json` lists them, by name: (state, the whole entry).
pub fn hosts(server: &FarmServer) -> Vec<Value> {
    server.json(&["hosts"]).as_array().unwrap().clone()
}

pub fn host_state(server: &FarmServer, name: &str) -> Option<String> {
    hosts(server)
        .iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["state"].as_str().map(str::to_owned))
}

/// The page the grant's endpoint serves.
pub fn page(grant: &Value) -> Option<String> {
    let addr: SocketAddr = grant["direct_endpoint"].as_str()?.parse().ok()?;
    let (status, body) = http_get(&addr, "/").ok()?;
    (status == 200).then_some(body)
}
