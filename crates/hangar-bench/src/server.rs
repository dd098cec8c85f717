//! The benchmarks' own `hangar server` (a temporary data dir sharing a guest asset cache)
//! and measuring through its public API: requests timed until the endpoint answers HTTP
//! 200, pools, and the processes of its VMs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hangar_api::{GrantView, PoolView, TemplateView, VmView};

use crate::client::{BenchError, Client, wire_name};

/// How the benchmark's server is started.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub accel: String,
    pub catalog: Option<PathBuf>,
    /// Guest asset cache to share [default: the default data dir's cache].
    pub cache: Option<PathBuf>,
    /// Most memory warm pools may hold (`--pool-memory`); 0 fills no pool.
    pub pool_memory_mib: u64,
    /// Clone VMs from service templates; off (`--no-templates`), every new VM is booted,
    /// so that cold boots are measured as boots.
    pub templates: bool,
}

impl ServerOptions {
    /// The demo catalog, no warm pools, templates as `templates` says.
    pub fn without_pools(accel: &str, cache: Option<PathBuf>, templates: bool) -> ServerOptions {
        ServerOptions {
            accel: accel.to_owned(),
            catalog: None,
            cache,
            pool_memory_mib: 0,
            templates,
        }
    }

    /// The cache dir, created if missing, as an absolute path.
    pub fn cache_dir(&self) -> Result<PathBuf, String> {
        let cache = self
            .cache
            .clone()
            .unwrap_or_else(|| crate::hangar::default_data_dir().join("cache"));
        std::fs::create_dir_all(&cache)
            .map_err(|err| format!("cache dir {}: {err}", cache.display()))?;
        cache
            .canonicalize()
            .map_err(|err| format!("cache dir {}: {err}", cache.display()))
    }
}

/// The server a benchmark runs; stopped, with every VM it made, when dropped.
pub struct BenchServer {
    child: Child,
    data_dir: tempfile::TempDir,
    /// Where the server's log is copied when it stops (see [`BenchServer::keep_log_as`]).
    keep_log: Option<PathBuf>,
    pub url: String,
    pub client: Client,
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(kept_as) = &self.keep_log {
            let dir = kept_as.parent().unwrap_or(Path::new("."));
            let kept = std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::copy(self.data_dir().join("server.log"), kept_as));
            if let Err(err) = kept {
                eprintln!("cannot keep the server log as {}: {err}", kept_as.display());
            }
        }
        // The server leaves VMs, its forwarder and its segment namespace by design; this
        // benchmark's are stopped and deleted here.
        let forwarder = hangar_forward::ForwarderPaths::new(self.data_dir.path()).running_pid();
        for pid in hangar_vmm::procs::qemu_processes_under(&self.vms_dir())
            .into_iter()
            .map(|(_, pid)| pid)
            .chain(forwarder)
        {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid belongs to a QEMU
            // whose pid file lies in this benchmark's own data dir, or to its forwarder
            // (checked by its command line).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        remove_segment_netns(self.data_dir.path());
    }
}

/// Deletes the network namespace a server or agent as root made for `data_dir`'s segments,
/// if any (the VMs whose taps it holds are stopped first).
pub fn remove_segment_netns(data_dir: &Path) {
    let netns = hangar_vmm::tap::SegmentNetns::for_data_dir(data_dir);
    if let Err(err) = netns.remove() {
        eprintln!("cannot delete network namespace {}: {err}", netns.name());
    }
}

impl BenchServer {
    /// Keeps the server's log in `dir` when the server stops, whether the benchmark
    /// finished or failed: it explains outliers and failures, and the data dir goes.
    pub fn keep_log_in(&mut self, dir: &Path) {
        self.keep_log_as(&dir.join("server.log"));
    }

    /// Keeps the server's log as the file `path` when the server stops.
    pub fn keep_log_as(&mut self, path: &Path) {
        self.keep_log = Some(path.to_owned());
    }

    /// Starts `hangar server` (see [`crate::hangar::hangar_exe`]) on a free port in a temporary data dir
    /// whose `cache` links to the shared cache, and waits until it answers.
    pub fn start(options: &ServerOptions) -> Result<BenchServer, String> {
        BenchServer::start_with(options, &[])
    }

    /// [`BenchServer::start`] with more arguments for `hangar server` (e.g. `--store URL`,
    /// `--no-local-host`).
    pub fn start_with(options: &ServerOptions, extra: &[&str]) -> Result<BenchServer, String> {
        let data_dir = temp_data_dir("hgbench", &options.cache_dir()?)?;
        let port = free_port()?;
        let log = std::fs::File::create(data_dir.path().join("server.log"))
            .map_err(|err| err.to_string())?;
        let exe = crate::hangar::hangar_exe()?;
        let mut command = Command::new(exe);
        command
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--accel",
                &options.accel,
                "--pool-memory",
                &options.pool_memory_mib.to_string(),
            ])
            .arg("--data-dir")
            .arg(data_dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|err| err.to_string())?)
            .stderr(log);
        if let Some(catalog) = &options.catalog {
            command.arg("--catalog").arg(catalog);
        }
        if !options.templates {
            command.arg("--no-templates");
        }
        command.args(extra);
        let child = command
            .spawn()
            .map_err(|err| format!("cannot start the server: {err}"))?;
        let url = format!("http://127.0.0.1:{port}");
        let mut server = BenchServer {
            child,
            data_dir,
            keep_log: None,
            client: Client::new(&url),
            url,
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(300);
        while http_status_blocking(&addr, "/healthz").ok() != Some(200) {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "the benchmark's server exited ({status}):\n{}",
                    server.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err("the benchmark's server did not start within 5 minutes".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The first start wrote the admin's token in the data dir: the benchmark is its admin.
        let token = server.token()?;
        server.client = Client::new(&server.url).with_token(&token);
        Ok(server)
    }

    /// The admin token the server wrote in its data dir.
    pub fn token(&self) -> Result<String, String> {
        std::fs::read_to_string(self.data_dir.path().join("admin.token"))
            .map(|token| token.trim().to_owned())
            .map_err(|err| format!("the server's admin.token: {err}"))
    }

    /// A new client of the server, with its admin token.
    pub fn api_client(&self) -> Client {
        self.client.clone()
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir.path().join("vms")
    }

    /// The last lines of the server's log, for error reports.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.data_dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Sets the service's pool to exactly `size` VMs.
    pub async fn set_pool(&self, pool: &str, size: u32) -> Result<(), BenchError> {
        let _: serde_json::Value = self
            .client
            .put(
                &format!("/v1/pools/{pool}"),
                &serde_json::json!({ "min": size, "max": size }),
            )
            .await?;
        Ok(())
    }

    /// Waits until `pool` holds `size` ready VMs and none booting, then a moment more for
    /// the last boot's tail (page cache, QEMU threads) to quiet down.
    pub async fn wait_pool_full(&self, pool: &str, size: u32) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let pools: Vec<PoolView> = self.client.get("/v1/pools").await?;
            let full = pools
                .iter()
                .any(|p| p.name == pool && p.ready >= size && p.booting == 0);
            if full {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Reply(format!(
                    "pool {pool} did not fill to {size} within 5 minutes"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the service has a current template (new VMs of it are cloned), at most
    /// 5 minutes. A build that fails (a boot that missed its ready deadline on a loaded
    /// machine, say) is said on stderr and started once more by another request of the
    /// service (a build is only ever started by one); a second failure ends the wait with
    /// the build's error and the end of the server's log.
    pub async fn wait_template(&self, service: &str) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut failed_before: Option<String> = None;
        loop {
            let templates: Vec<TemplateView> = self.client.get("/v1/templates").await?;
            if templates.iter().any(|t| t.service == service && t.current) {
                return Ok(());
            }
            let tasks: Vec<hangar_api::TaskView> = self.client.get("/v1/tasks").await?;
            let failed = tasks.iter().find(|task| {
                task.kind == "build_template"
                    && task.service.as_deref() == Some(service)
                    && task.state == "failed"
                    && failed_before.as_ref() != Some(&task.id)
            });
            if let Some(failed) = failed {
                let why = failed.error.as_deref().unwrap_or("no error given");
                if failed_before.is_some() {
                    return Err(BenchError::Reply(format!(
                        "the template of {service} failed to build twice (task {}): {why}\nthe server's log ends with:\n{}",
                        failed.id,
                        self.log_tail()
                    )));
                }
                eprintln!(
                    "  the template of {service} failed to build (task {}): {why}; building it again",
                    failed.id
                );
                failed_before = Some(failed.id.clone());
                let again = self.timed_request(service, true).await?;
                self.delete_vm(&again.vm).await?;
                continue;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Reply(format!(
                    "the template of {service} was not built within 5 minutes; tasks: {}\nthe server's log ends with:\n{}",
                    tasks
                        .iter()
                        .filter(|task| task.service.as_deref() == Some(service))
                        .map(|task| format!(
                            "{} {} {} ({})",
                            task.id, task.kind, task.state, task.stage
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn delete_vm(&self, vm: &str) -> Result<(), BenchError> {
        let _: serde::de::IgnoredAny = self.client.delete(&format!("/v1/vms/{vm}")).await?;
        Ok(())
    }

    /// Requests the service and waits until its endpoint answers 200.
    pub async fn timed_request(
        &self,
        service: &str,
        dedicated: bool,
    ) -> Result<Sample, BenchError> {
        let body = serde_json::json!({
            "service": service,
            "mode": if dedicated { "dedicated" } else { "shared" },
        });
        let started = Instant::now();
        let (grant, timing): (GrantView, String) =
            self.client.post_timed("/v1/requests", &body).await?;
        let api = started.elapsed();
        let endpoint = endpoint_of(&grant)?;
        wait_answering(endpoint, started, Duration::from_secs(120))
            .await
            .map_err(BenchError::Failed)?;
        Ok(Sample {
            total: started.elapsed(),
            api,
            served: wire_name(&grant.served),
            vm: grant.vm,
            endpoint,
            stages: parse_server_timing(&timing),
        })
    }

    /// `POST /v1/vms/{vm}/{action}` with `body`, timed until it answers; then, when
    /// `endpoint` is given, until that endpoint answers 200. Returns the time and the
    /// answer (the VM).
    pub async fn timed_action(
        &self,
        vm: &str,
        action: &str,
        body: &serde_json::Value,
        endpoint: Option<SocketAddr>,
    ) -> Result<(Duration, VmView), BenchError> {
        let started = Instant::now();
        let answer: VmView = self
            .client
            .post(&format!("/v1/vms/{vm}/{action}"), body)
            .await?;
        if let Some(endpoint) = endpoint {
            wait_answering(endpoint, started, Duration::from_secs(120))
                .await
                .map_err(BenchError::Failed)?;
        }
        Ok((started.elapsed(), answer))
    }
}

/// One measured request.
pub struct Sample {
    /// Request sent → endpoint answered 200.
    pub total: Duration,
    /// Request sent → the API answered (VM resumed and configured, or booted).
    pub api: Duration,
    pub vm: String,
    /// The answer's `match`: how the request was served.
    pub served: String,
    pub endpoint: SocketAddr,
    /// The server's stages, from its `Server-Timing` header.
    pub stages: Vec<(String, Duration)>,
}

fn endpoint_of(grant: &GrantView) -> Result<SocketAddr, BenchError> {
    grant
        .endpoint
        .parse()
        .map_err(|_| BenchError::Reply(format!("no endpoint in {grant:?}")))
}

/// `name;dur=MS, ...` → (name, duration) pairs.
pub fn parse_server_timing(header: &str) -> Vec<(String, Duration)> {
    header
        .split(',')
        .filter_map(|metric| {
            let (name, dur) = metric.trim().split_once(";dur=")?;
            let ms: f64 = dur.trim().parse().ok()?;
            Some((name.to_owned(), Duration::from_secs_f64(ms / 1000.0)))
        })
        .collect()
}

/// A temporary data dir in `/tmp` named `prefix...` (short: unix socket addresses hold at
/// most 107 bytes) whose `cache` links to `cache`; removed when dropped.
pub fn temp_data_dir(prefix: &str, cache: &Path) -> Result<tempfile::TempDir, String> {
    let data_dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .map_err(|err| format!("temporary data dir: {err}"))?;
    std::os::unix::fs::symlink(cache, data_dir.path().join("cache"))
        .map_err(|err| err.to_string())?;
    Ok(data_dir)
}

/// A TCP port of 127.0.0.1 free now.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| err.to_string())
}

/// One plain HTTP/1.0 GET; the status code.
pub async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))?
}

/// [`http_status`] for code outside the runtime.
pub fn http_status_blocking(addr: &SocketAddr, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// Polls `GET /` on `endpoint` until it answers 200, at most `timeout` after `started`.
/// Polls every millisecond at first, backing off to every 10 ms, so that a long wait does
/// not load the guest's network with probes.
pub async fn wait_answering(
    endpoint: SocketAddr,
    started: Instant,
    timeout: Duration,
) -> Result<(), String> {
    loop {
        if http_status(endpoint, "/").await.ok() == Some(200) {
            return Ok(());
        }
        let waited = started.elapsed();
        if waited > timeout {
            return Err(format!("{endpoint} did not answer within {timeout:?}"));
        }
        let pause = (waited / 200).clamp(Duration::from_millis(1), Duration::from_millis(10));
        tokio::time::sleep(pause).await;
    }
}

/// Resident and proportional set size of a process, in KiB, from `/proc/PID/smaps_rollup`.
pub fn rss_pss_kib(pid: u32) -> Option<(u64, u64)> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_rollup(&rollup)
}

fn parse_rollup(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    Some((field("Rss")?, field("Pss")?))
}

/// `N cpus, model`, for reports.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown cpu")
        .trim()
        .to_owned();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib.div_ceil(1024 * 1024));
    format!("{cpus} cpus, {model}, {mem_gib} GiB")
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Does `path` exist and is it a unix socket something listens on?
pub fn socket_answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_and_rollup_parse() {
        let stages = parse_server_timing("claim;dur=1.5, resume;dur=0.25,bogus, total;dur=3");
        let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["claim", "resume", "total"]);
        assert_eq!(stages[0].1, Duration::from_micros(1500));
        let rollup = "55d0-7ffd ---p 00000000 00:00 0   [rollup]\nRss:              163840 kB\nPss:              150000 kB\nPss_Anon:  1 kB\n";
        assert_eq!(parse_rollup(rollup), Some((163_840, 150_000)));
        assert_eq!(parse_rollup("Rss: 1 kB\n"), None);
    }
}
