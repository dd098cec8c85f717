//! Test support: a real `hangar server` in a temporary data dir, the real `hangar` CLI, and
//! cleanup that stops every QEMU process and the forwarder the test started, even when the
//! test fails.
//!
//! With `HANGAR_TEST_STORE=postgres` each server keeps its state in a fresh database on a
//! real PostgreSQL (`--store postgres://…`, see `hangar-test-postgres`) instead of SQLite
//! in its data dir; a restarted server finds the same database.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const HANGAR: &str = env!("CARGO_BIN_EXE_hangar");

/// Guest assets and images are cached across tests (and runs) here.
pub fn shared_cache() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hangar-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct TestServer {
    pub data_dir: tempfile::TempDir,
    pub url: String,
    pub extra_args: Vec<String>,
    /// Environment variables the server process gets (e.g. test hooks).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// The server's PostgreSQL database, when `HANGAR_TEST_STORE=postgres` (dropped after
    /// the server is stopped).
    database: Option<hangar_test_postgres::TestDatabase>,
}

/// Whether servers keep their state in PostgreSQL (`HANGAR_TEST_STORE=postgres`) rather
/// than SQLite. Any other value than `postgres` or `sqlite` (or unset) is refused.
pub fn store_is_postgres() -> bool {
    match std::env::var("HANGAR_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Ok("") | Err(_) => false,
        Ok(other) => panic!("HANGAR_TEST_STORE={other}: expected postgres or sqlite"),
    }
}

impl TestServer {
    /// Starts a server on a free port, with warm pools off (pool memory budget 0), and waits
    /// until it answers.
    pub fn start() -> TestServer {
        TestServer::start_with(&["--pool-memory", "0"])
    }

    /// A server with `extra_args`, booting every VM (templates off: the tests that are not
    /// about templates then see no template builds beside their own VMs).
    pub fn start_with(extra_args: &[&str]) -> TestServer {
        let mut args = extra_args.to_vec();
        args.push("--no-templates");
        TestServer::start_with_templates(&args)
    }

    /// A server with `extra_args`, templates on unless they say `--no-templates`.
    pub fn start_with_templates(extra_args: &[&str]) -> TestServer {
        TestServer::start_in(extra_args, |cache| {
            std::os::unix::fs::symlink(shared_cache(), cache).unwrap()
        })
    }

    /// A server with `extra_args` whose cache is its own, a private copy (`0700`/`0600`,
    /// as a server makes it) of the shared cache's guest assets and busybox images: for
    /// what depends on the cache's owner and modes.
    pub fn start_with_private_cache(extra_args: &[&str]) -> TestServer {
        TestServer::start_in(extra_args, |cache| {
            std::fs::create_dir(cache).unwrap();
            for part in ["assets", "downloads", "kernels", "images", "digests"] {
                let from = shared_cache().join(part);
                if from.exists() {
                    let status = Command::new("cp")
                        .arg("-a")
                        .arg(&from)
                        .arg(cache)
                        .status()
                        .unwrap();
                    assert!(status.success(), "copy {}", from.display());
                }
            }
            let status = Command::new("chmod")
                .args(["-R", "go-rwx"])
                .arg(cache)
                .status()
                .unwrap();
            assert!(status.success());
        })
    }

    /// [`TestServer::start`] with `env` in the server process's environment (test hooks
    /// such as `HANGAR_TEST_PAUSE_AT_STEP`); clear `env` before a later `spawn` to start it
    /// again without them.
    pub fn start_in_env(env: &[(&str, &str)]) -> TestServer {
        TestServer::start_in_with_env(&["--pool-memory", "0", "--no-templates"], env, |cache| {
            std::os::unix::fs::symlink(shared_cache(), cache).unwrap()
        })
    }

    /// A server keeping its state in the store at `store` (`--store`; for instance a
    /// multi-host PostgreSQL URL), whatever `HANGAR_TEST_STORE` says, with `extra_args`.
    pub fn start_on_store(store: &str, extra_args: &[&str]) -> TestServer {
        let mut args = vec!["--store", store];
        args.extend_from_slice(extra_args);
        let data_dir = tempfile::Builder::new()
            .prefix("hg")
            .tempdir_in("/tmp")
            .unwrap();
        std::os::unix::fs::symlink(shared_cache(), data_dir.path().join("cache")).unwrap();
        let mut server = TestServer {
            data_dir,
            url: format!("http://127.0.0.1:{}", free_port()),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
            database: None,
        };
        server.spawn();
        server
    }

    /// A server with `extra_args` whose `cache` in the data dir is made by `make_cache`.
    fn start_in(extra_args: &[&str], make_cache: impl FnOnce(&Path)) -> TestServer {
        TestServer::start_in_with_env(extra_args, &[], make_cache)
    }

    fn start_in_with_env(
        extra_args: &[&str],
        env: &[(&str, &str)],
        make_cache: impl FnOnce(&Path),
    ) -> TestServer {
        // Short paths: unix socket addresses hold at most 107 bytes.
        let data_dir = tempfile::Builder::new()
            .prefix("hg")
            .tempdir_in("/tmp")
            .unwrap();
        make_cache(&data_dir.path().join("cache"));
        let port = free_port();
        let mut server = TestServer {
            data_dir,
            url: format!("http://127.0.0.1:{port}"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            database: store_is_postgres().then(hangar_test_postgres::TestDatabase::create),
        };
        server.spawn();
        server
    }

    fn listen(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// Starts the server process (again) on the same data dir and port.
    pub fn spawn(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        // Private like every file the server writes in its data dir.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.data_dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(HANGAR)
            .args([
                "server",
                "--accel",
                "tcg",
                "--listen",
                &self.listen(),
                "--data-dir",
            ])
            .arg(self.data_dir.path())
            .args(self.database.iter().flat_map(|db| ["--store", db.url()]))
            .args(&self.extra_args)
            .env("HANGAR_LOG", "info,hangar_server=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hangar server exited with {status}:\n{}", self.log());
            }
            if http_get(&self.listen().parse().unwrap(), "/healthz")
                .is_ok_and(|(status, _)| status == 200)
            {
                if self.database.is_some() {
                    assert!(
                        self.log().contains("backend=\"postgresql\""),
                        "the server does not say it keeps its state in PostgreSQL:\n{}",
                        self.log()
                    );
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9` of the server process (its VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("server.log")).unwrap_or_default()
    }

    /// Where the server keeps its state: its PostgreSQL URL, or its SQLite file, for a
    /// test that opens the store beside it (`hangar_store::open`).
    pub fn store_location(&self) -> String {
        match &self.database {
            Some(db) => db.url().to_owned(),
            None => self.data_dir.path().join("hangar.db").display().to_string(),
        }
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir.path().join("vms")
    }

    /// Runs the CLI against this server, as its admin: the CLI finds the token the server
    /// wrote in its data dir (`HANGAR_DATA_DIR`), as on a machine that runs a server. No
    /// token of the person running the tests leaks in.
    pub fn hangar(&self, args: &[&str]) -> Output {
        self.hangar_command(args).output().unwrap()
    }

    /// The CLI command [`TestServer::hangar`] runs, to spawn it instead.
    pub fn hangar_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(HANGAR);
        command
            .args(args)
            .env("HANGAR_URL", &self.url)
            .env("HANGAR_DATA_DIR", self.data_dir.path())
            .env_remove("HANGAR_TOKEN")
            .env("XDG_CONFIG_HOME", self.data_dir.path().join("no-config"));
        command
    }

    /// The server process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.hangar(args);
        assert!(
            output.status.success(),
            "hangar {args:?} failed ({}):\n{}\nserver log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// The forwarder holding this data dir's stable endpoints, if one runs.
    pub fn forwarder_pid(&self) -> Option<u32> {
        forwarder_pid_of(self.data_dir.path())
    }

    /// QEMU processes running VMs of this data dir, as (vm id, pid).
    pub fn qemu_processes(&self) -> Vec<(String, u32)> {
        qemu_processes_under(&self.vms_dir())
    }

    /// Waits (up to `secs`) until the server lists a current template of `service`, and
    /// returns it.
    pub fn wait_for_template(&self, service: &str, secs: u64) -> serde_json::Value {
        wait_for(secs, &format!("the {service} template"), || {
            self.json(&["templates"])
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["service"] == service && t["current"] == true)
                .cloned()
        })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        for (_, pid) in self.qemu_processes() {
            kill(pid);
        }
        if let Some(pid) = self.forwarder_pid() {
            kill(pid);
        }
        remove_segment_netns(self.data_dir.path());
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
    }
}

/// Deletes the network namespace a server or agent as root made for `data_dir`'s segments
/// (it outlives them, as their VMs do), if any.
pub fn remove_segment_netns(data_dir: &Path) {
    let netns = hangar_vmm::tap::SegmentNetns::for_data_dir(data_dir);
    if let Err(err) = netns.remove() {
        eprintln!("cannot delete network namespace {}: {err}", netns.name());
    }
}

/// The `hangar forwarder` of `data_dir` (its command line names the data dir), if it runs.
pub fn forwarder_pid_of(data_dir: &Path) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie
            && args.iter().any(|a| a == "forwarder")
            && args
                .windows(2)
                .any(|w| w[0] == "--data-dir" && Path::new(&w[1]) == data_dir)
        {
            return Some(pid);
        }
    }
    None
}

/// Every QEMU whose `-pidfile` lies in a subdirectory of `vms_dir`.
pub fn qemu_processes_under(vms_dir: &Path) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.contains("qemu-system")) {
            continue;
        }
        if let Some(i) = args.iter().position(|a| a == "-pidfile") {
            let pidfile = Path::new(&args[i + 1]);
            if pidfile.parent().and_then(Path::parent) == Some(vms_dir) {
                let id = pidfile
                    .parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                found.push((id, pid));
            }
        }
    }
    found
}

pub fn kill(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid was just read from /proc
    // as a QEMU of this test's own data dir.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET; returns the status and the body.
pub fn http_get(addr: &SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what` after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `key value` lines of the http-static `/cgi-bin/whoami` answer.
pub fn whoami(endpoint: &str) -> std::collections::BTreeMap<String, String> {
    fetch(endpoint, "/cgi-bin/whoami")
        .lines()
        .filter_map(|line| {
            line.split_once(' ')
                .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// GET through a VM endpoint (`HOST:PORT`), expecting 200.
pub fn fetch(endpoint: &str, path: &str) -> String {
    let (status, body) = http_get(&endpoint.parse().unwrap(), path)
        .unwrap_or_else(|err| panic!("GET {endpoint}{path}: {err}"));
    assert_eq!(status, 200, "GET {endpoint}{path}: {body}");
    body
}

/// Does something listen on the unix socket at `path`?
pub fn socket_answers(path: &str) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// `dig` against a server's DNS port (`--dns-listen 127.0.0.1:PORT`); its whole output.
pub fn dig(port: u16, args: &[&str]) -> String {
    let output = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (apt-get install dnsutils)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The status (`NOERROR`, `NXDOMAIN`, ...) of a full `dig` answer.
pub fn dns_status(answer: &str) -> &str {
    answer
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no status in {answer}"))
}

/// The host port forwards on VM process `pid`'s QEMU command line, as `(host port, guest
/// port)`: `hostfwd=tcp:127.0.0.1:40001-:80` is `(40001, 80)`.
pub fn hostfwds(pid: u32) -> Vec<(u16, u16)> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline)
        .split(['\0', ','])
        .filter_map(|part| part.strip_prefix("hostfwd=tcp:"))
        .filter_map(|rule| {
            let (host, guest) = rule.split_once("-:")?;
            let host_port = host.rsplit(':').next()?.parse().ok()?;
            Some((host_port, guest.parse().ok()?))
        })
        .collect()
}
