//! Ready criteria, evaluated from the host: a VM is ready when every check of its service
//! passes in `consecutive` rounds in a row. `tcp` asks hangar-init whether something
//! listens (a user-mode port forward accepts connections even when nothing listens behind
//! it); `http`, `bytes` and `connect` go through the VM's real endpoint, as a client would
//! (a port with no host endpoint, a stack member's private port, is checked as `tcp` is:
//! from inside the guest, which is the only place it is reachable from); `exec` runs
//! a command in the guest through hangar-init; `log` watches the guest's serial console log
//! on the host; `cpu_settled` measures the VM's host process in `/proc`.

use std::collections::BTreeMap;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hangar_core::{ReadyCheck, ReadySpec, Service};
use hangar_vmm::Agent;
use hangar_vmm::agent::Reply;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of an answer a probe reads.
const MAX_ANSWER: usize = 64 * 1024;
/// The most of the console log one `log` probe reads; the rest waits for the next round.
const MAX_LOG_READ: u64 = 8 * 1024 * 1024;
/// The console log is read in pieces this large.
const LOG_CHUNK: usize = 64 * 1024;

/// Why a check did not pass (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub String);

/// What the checks probe: one VM, as its host sees it.
pub struct ProbeTarget<'a> {
    /// Host endpoints by service port name (`http`, `bytes`).
    pub endpoints: &'a BTreeMap<String, SocketAddr>,
    /// The channel to the guest's hangar-init (`tcp`, `exec`).
    pub agent: &'a Agent,
    /// The guest's serial console log, from `Hypervisor::console_log` (`log`); `None`
    /// when the backend keeps none, and then `log` checks fail.
    pub console_log: Option<&'a Path>,
    /// The VM's host process (`cpu_settled`); `None` when the backend has no process
    /// (the fake backend), and then `cpu_settled` checks fail.
    pub qemu_pid: Option<u32>,
}

/// Waits until every check passes in `spec.consecutive` rounds in a row, or `spec.timeout`
/// passes; the error names the check that failed last and why. A round that is under way
/// at the timeout is finished (probes are bounded), so the wait may overrun by one round.
pub async fn wait_ready(
    service: &Service,
    spec: &ReadySpec,
    target: &ProbeTarget<'_>,
) -> Result<Duration, NotReady> {
    let start = tokio::time::Instant::now();
    let deadline = start + spec.timeout;
    let wanted = spec.consecutive.max(1);
    let mut probe = Probe::new(service, spec, target);
    let mut passed = 0u32;
    let mut last_failure: Option<NotReady> = None;
    loop {
        match probe.round().await {
            Ok(()) => {
                passed += 1;
                if passed >= wanted {
                    return Ok(start.elapsed());
                }
            }
            Err(not_ready) => {
                passed = 0;
                last_failure = Some(not_ready);
            }
        }
        if tokio::time::Instant::now() + spec.interval >= deadline {
            let why = match (passed, last_failure) {
                (0, Some(failure)) => failure.0,
                (_, Some(failure)) => format!(
                    "{passed} of {wanted} rounds in a row passed; the last failure: {}",
                    failure.0
                ),
                (_, None) => format!("only {passed} of {wanted} rounds in a row passed"),
            };
            return Err(NotReady(format!(
                "not ready after {}: {why}",
                humantime::format_duration(spec.timeout)
            )));
        }
        tokio::time::sleep(spec.interval).await;
    }
}

/// The checks of one wait, with what they remember between rounds.
struct Probe<'a> {
    service: &'a Service,
    checks: &'a [ReadyCheck],
    target: &'a ProbeTarget<'a>,
    /// One watcher per `log` check, by index in `checks`.
    logs: Vec<Option<LogWatch>>,
}

impl<'a> Probe<'a> {
    fn new(service: &'a Service, spec: &'a ReadySpec, target: &'a ProbeTarget<'a>) -> Probe<'a> {
        let logs = spec
            .checks
            .iter()
            .map(|check| match check {
                ReadyCheck::Log { contains } => Some(LogWatch::new(contains.as_bytes())),
                _ => None,
            })
            .collect();
        Probe {
            service,
            checks: &spec.checks,
            target,
            logs,
        }
    }

    /// Every check, in order, until one fails.
    async fn round(&mut self) -> Result<(), NotReady> {
        for (index, check) in self.checks.iter().enumerate() {
            self.check(index, check)
                .await
                .map_err(|not_ready| NotReady(format!("{check}: {}", not_ready.0)))?;
        }
        Ok(())
    }

    async fn check(&mut self, index: usize, check: &ReadyCheck) -> Result<(), NotReady> {
        let endpoint = |port_name: &str| self.target.endpoints.get(port_name).copied();
        match check {
            ReadyCheck::Tcp { port } => self.listening(port).await,
            ReadyCheck::Connect { port } => match endpoint(port) {
                Some(addr) => connect_check(addr).await,
                None => self.listening(port).await,
            },
            ReadyCheck::Http {
                port,
                path,
                status,
                body_contains,
            } => match endpoint(port) {
                Some(addr) => http_check(addr, path, *status, body_contains.as_deref()).await,
                None => self.listening(port).await,
            },
            ReadyCheck::Bytes { port, send, expect } => match endpoint(port) {
                Some(addr) => bytes_check(addr, send.as_bytes(), expect.as_bytes()).await,
                None => self.listening(port).await,
            },
            ReadyCheck::Exec { argv, timeout } => {
                exec_check(self.target.agent, argv, *timeout).await
            }
            ReadyCheck::Log { .. } => {
                let path = self.target.console_log.ok_or_else(|| {
                    NotReady("this VM has no console log (the backend keeps none)".into())
                })?;
                let watch = self.logs[index]
                    .as_mut()
                    .expect("a watcher for every log check");
                watch.probe(path).await
            }
            ReadyCheck::CpuSettled {
                below_percent,
                window,
            } => {
                let pid = self.target.qemu_pid.ok_or_else(|| {
                    NotReady(
                        "this VM has no host process to measure (the backend runs no QEMU)".into(),
                    )
                })?;
                let used = cpu_percent(pid, *window).await?;
                if used < below_percent.0 {
                    Ok(())
                } else {
                    Err(NotReady(format!(
                        "process {pid} used {used:.1}% of a host CPU over {}, not below {below_percent}",
                        humantime::format_duration(*window)
                    )))
                }
            }
        }
    }
}

impl Probe<'_> {
    /// Whether something listens on the service's port `port` inside the guest (asked of
    /// hangar-init).
    async fn listening(&self, port: &str) -> Result<(), NotReady> {
        let guest_port = self
            .service
            .port(port)
            .map(|p| p.guest)
            .ok_or_else(|| NotReady(format!("no port {port}")))?;
        match self
            .target
            .agent
            .check_listen(guest_port, PROBE_TIMEOUT)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(NotReady(format!(
                "nothing listens on guest port {guest_port}"
            ))),
            Err(err) => Err(NotReady(format!("guest agent: {err}"))),
        }
    }
}

/// Runs `argv` in the guest through hangar-init: passes when it exits 0.
pub async fn exec_check(agent: &Agent, argv: &[String], timeout: Duration) -> Result<(), NotReady> {
    match agent.exec(argv.to_vec(), timeout).await {
        Ok(reply) if reply.ok => Ok(()),
        Ok(reply) => Err(NotReady(exec_failure(&reply))),
        Err(err) => Err(NotReady(format!("guest agent: {err}"))),
    }
}

fn exec_failure(reply: &Reply) -> String {
    let mut text = match (&reply.error, reply.code) {
        (Some(error), _) => error.clone(),
        (None, Some(code)) => format!("exited with code {code}"),
        (None, None) => "did not exit normally".into(),
    };
    let stderr = reply.stderr.trim();
    if !stderr.is_empty() {
        let mut shown: String = stderr.chars().take(200).collect();
        if shown.len() < stderr.len() {
            shown.push('…');
        }
        text.push_str(&format!("; stderr: {shown:?}"));
    }
    text
}

/// Watches an append-only log for a text, reading only what was added since the last
/// probe. The last `needle.len() - 1` bytes read are kept, so a text split between two
/// reads (or two writes of the guest) still matches. Once seen, it stays seen unless the
/// file shrinks or disappears (a new log).
#[derive(Debug)]
struct LogWatch {
    needle: Vec<u8>,
    /// Bytes of the file read so far.
    offset: u64,
    /// The end of what was read, kept to match across reads.
    tail: Vec<u8>,
    seen: bool,
}

impl LogWatch {
    fn new(needle: &[u8]) -> LogWatch {
        LogWatch {
            needle: needle.to_vec(),
            offset: 0,
            tail: Vec::new(),
            seen: false,
        }
    }

    fn restart(&mut self) {
        self.offset = 0;
        self.tail.clear();
        self.seen = false;
    }

    async fn probe(&mut self, path: &Path) -> Result<(), NotReady> {
        let io_error =
            |err: std::io::Error| NotReady(format!("console log {}: {err}", path.display()));
        let mut file = match tokio::fs::File::open(path).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.restart();
                return Err(NotReady(format!(
                    "console log {} does not exist (yet)",
                    path.display()
                )));
            }
            Err(err) => return Err(io_error(err)),
        };
        let len = file.metadata().await.map_err(io_error)?.len();
        if len < self.offset {
            self.restart();
        }
        if self.seen {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.offset))
            .await
            .map_err(io_error)?;
        let mut remaining = (len - self.offset).min(MAX_LOG_READ);
        let mut buf = vec![0u8; LOG_CHUNK];
        while remaining > 0 {
            let want = usize::try_from(remaining)
                .unwrap_or(LOG_CHUNK)
                .min(LOG_CHUNK);
            let n = file.read(&mut buf[..want]).await.map_err(io_error)?;
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            remaining -= n as u64;
            let mut window = std::mem::take(&mut self.tail);
            window.extend_from_slice(&buf[..n]);
            if contains(&window, &self.needle) {
                self.seen = true;
                return Ok(());
            }
            let keep = self.needle.len().saturating_sub(1);
            window.drain(..window.len().saturating_sub(keep));
            self.tail = window;
        }
        Err(NotReady(format!(
            "not in console log {} ({} bytes so far)",
            path.display(),
            self.offset
        )))
    }
}

/// The share of one host CPU (in percent) that process `pid` used over `window`
/// (user + system time, all its threads).
pub async fn cpu_percent(pid: u32, window: Duration) -> Result<f64, NotReady> {
    let ticks_per_second = clock_ticks()?;
    let before = cpu_ticks(pid).await?;
    let started = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let after = cpu_ticks(pid).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let used = after.saturating_sub(before) as f64 / ticks_per_second as f64;
    Ok(used / elapsed * 100.0)
}

fn clock_ticks() -> Result<u64, NotReady> {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&ticks| ticks > 0)
        .ok_or_else(|| NotReady("cannot read the clock tick rate (sysconf)".into()))
}

/// utime + stime of `pid`, in clock ticks.
async fn cpu_ticks(pid: u32) -> Result<u64, NotReady> {
    let path = format!("/proc/{pid}/stat");
    let stat = match tokio::fs::read_to_string(&path).await {
        Ok(stat) => stat,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(NotReady(format!("process {pid} is gone")));
        }
        Err(err) => return Err(NotReady(format!("{path}: {err}"))),
    };
    parse_cpu_ticks(&stat).ok_or_else(|| NotReady(format!("{path} has no utime and stime")))
}

/// utime (field 14) + stime (field 15) of a `/proc/PID/stat` line. The command name (field
/// 2) is in parentheses and may itself contain spaces and parentheses.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// One HTTP/1.0 GET: the answer's status must be `status` and its body contain `body_contains`.
pub async fn http_check(
    addr: SocketAddr,
    path: &str,
    status: u16,
    body_contains: Option<&str>,
) -> Result<(), NotReady> {
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: hangar-ready\r\nConnection: close\r\n\r\n"
    );
    let answer = exchange(addr, request.as_bytes(), None).await?;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    let got: Option<u16> = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok());
    if got != Some(status) {
        return Err(NotReady(format!(
            "GET {path} answered {:?}, expected status {status}",
            status_line.chars().take(80).collect::<String>()
        )));
    }
    if let Some(needle) = body_contains {
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if !body.contains(needle) {
            return Err(NotReady(format!(
                "GET {path} body does not contain {needle:?}"
            )));
        }
    }
    Ok(())
}

/// Sends `send` and reads until the answer contains `expect`.
/// How long a server that speaks first gets to send its greeting.
const GREETING_WAIT: Duration = Duration::from_millis(300);

/// What [`connect_check`] sends a server that does not speak first: an HTTP request that
/// changes nothing, which HTTP servers answer and most line protocols answer with an
/// error (Redis, memcached).
const CONNECT_PROBE: &[u8] = b"HEAD / HTTP/1.0\r\n\r\n";

/// Connects to `addr` (a VM's port forward) and passes when the guest sends something:
/// a greeting of its own (SSH, SMTP, MySQL), or an answer to [`CONNECT_PROBE`] and the end
/// of the client's side. A user-mode forward accepts every
/// connection on the host whether or not the guest is up, and holds it while the guest
/// does not answer, so neither a connect nor a connection held open proves anything; only
/// bytes from the guest do. This is the check for guests with no agent to ask what
/// listens. A protocol that answers nothing to that line (PostgreSQL) never passes it.
pub async fn connect_check(addr: SocketAddr) -> Result<(), NotReady> {
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|err| NotReady(format!("connect to {addr}: {err}")))?;
        let mut buf = [0u8; 64];
        if let Ok(read) = tokio::time::timeout(GREETING_WAIT, stream.read(&mut buf)).await {
            return match read {
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err(NotReady(format!(
                    "{addr} closed the connection without a word (nothing listens in the guest)"
                ))),
                Err(err) => Err(NotReady(format!("{addr}: {err}"))),
            };
        }
        stream
            .write_all(CONNECT_PROBE)
            .await
            .map_err(|err| NotReady(format!("send to {addr}: {err}")))?;
        let _ = stream.shutdown().await;
        match stream.read(&mut buf).await {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err(NotReady(format!(
                "{addr} closed the connection without answering"
            ))),
            Err(err) => Err(NotReady(format!("{addr}: {err}"))),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .map_err(|_| NotReady(format!("{addr} did not answer within {PROBE_TIMEOUT:?}")))?
}

pub async fn bytes_check(addr: SocketAddr, send: &[u8], expect: &[u8]) -> Result<(), NotReady> {
    let answer = exchange(addr, send, Some(expect)).await?;
    if contains(&answer, expect) {
        Ok(())
    } else {
        Err(NotReady(format!(
            "answer {:?} does not contain {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)]),
            String::from_utf8_lossy(expect)
        )))
    }
}

/// Connects, sends, and reads until EOF, `until` appears, or the probe times out.
async fn exchange(
    addr: SocketAddr,
    send: &[u8],
    until: Option<&[u8]>,
) -> Result<Vec<u8>, NotReady> {
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|err| NotReady(format!("connect to {addr}: {err}")))?;
        stream
            .write_all(send)
            .await
            .map_err(|err| NotReady(format!("send to {addr}: {err}")))?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|err| NotReady(format!("read from {addr}: {err}")))?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.len() >= MAX_ANSWER || until.is_some_and(|needle| contains(&answer, needle)) {
                break;
            }
        }
        if answer.is_empty() {
            return Err(NotReady(format!(
                "{addr} closed the connection without answering"
            )));
        }
        Ok(answer)
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .map_err(|_| NotReady(format!("{addr} did not answer within {PROBE_TIMEOUT:?}")))?
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(answer).await;
            }
        });
        addr
    }

    /// A service of the catalog whose `[ready]` table is `ready`.
    fn service(ready: &str) -> Service {
        let text = format!(
            r#"
            [service.web]
            os = "busybox"
            [[service.web.port]]
            name = "http"
            guest = 80
            [[service.web.process]]
            name = "httpd"
            argv = ["httpd", "-f"]
            [service.web.ready]
            {ready}
            "#
        );
        hangar_core::Catalog::from_toml(&text)
            .unwrap()
            .get("web")
            .unwrap()
            .clone()
    }

    /// A guest that answers `exec` requests by its script: the nth request (from 1) exits 0
    /// when `exits_zero(n)`, else 1 with "not yet" on stderr. Returns the agent and the
    /// number of requests so far.
    fn scripted_guest(
        exits_zero: impl Fn(usize) -> bool + Send + 'static,
    ) -> (
        std::sync::Arc<Agent>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncBufReadExt;

        let (host_end, guest_end) = tokio::io::duplex(64 * 1024);
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(guest_end);
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let message = hangar_proto::decode::<hangar_proto::HostMessage>(&line).unwrap();
                let hangar_proto::HostMessage::Exec { id, argv, .. } = message else {
                    continue;
                };
                assert_eq!(argv, ["sh", "-c", "test -f /run/ready"]);
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let ok = exits_zero(n);
                let reply = hangar_proto::GuestMessage::Reply {
                    id,
                    ok,
                    code: Some(if ok { 0 } else { 1 }),
                    stdout: String::new(),
                    stderr: if ok {
                        String::new()
                    } else {
                        "not yet\n".into()
                    },
                    error: None,
                };
                let line = hangar_proto::encode(&reply);
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        (Agent::spawn(host_end), calls)
    }

    const EXEC_READY: &str =
        r#"{ exec = { argv = ["sh", "-c", "test -f /run/ready"], timeout = "1s" } }"#;

    fn target<'a>(
        endpoints: &'a BTreeMap<String, SocketAddr>,
        agent: &'a Agent,
    ) -> ProbeTarget<'a> {
        ProbeTarget {
            endpoints,
            agent,
            console_log: None,
            qemu_pid: None,
        }
    }

    #[tokio::test]
    async fn exec_check_passes_only_on_exit_zero() {
        let (agent, calls) = scripted_guest(|n| n >= 3);
        let argv: Vec<String> = ["sh", "-c", "test -f /run/ready"].map(String::from).into();
        let err = exec_check(&agent, &argv, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.0, r#"exited with code 1; stderr: "not yet""#);

        let endpoints = BTreeMap::new();
        let web = service(&format!("interval = \"10ms\"\nchecks = [{EXEC_READY}]"));
        wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);

        // A guest that never answers: the agent's timeout is the reason.
        let (host_end, _guest_end) = tokio::io::duplex(1024);
        let silent = Agent::spawn(host_end);
        let err = exec_check(&silent, &argv, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(
            err.0
                .starts_with("guest agent: guest agent did not answer exec"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn consecutive_rounds_reset_on_a_failure() {
        let endpoints = BTreeMap::new();
        let web = service(&format!(
            "interval = \"1ms\"\nconsecutive = 3\nchecks = [{EXEC_READY}]"
        ));
        // Rounds: pass, pass, fail (count back to 0), pass, pass, pass.
        let (agent, calls) = scripted_guest(|n| n != 3);
        wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 6);

        // Every third round fails: three in a row never happens.
        let (agent, calls) = scripted_guest(|n| n % 3 != 0);
        let web = service(&format!(
            "timeout = \"300ms\"\ninterval = \"1ms\"\nconsecutive = 3\nchecks = [{EXEC_READY}]"
        ));
        let err = wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap_err();
        assert!(err.0.starts_with("not ready after 300ms: "), "{err:?}");
        assert!(
            err.0
                .contains(r#"exec ["sh", "-c", "test -f /run/ready"]: exited with code 1"#),
            "{err:?}"
        );
        assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 6);

        // consecutive = 1 takes the first passing round.
        let (agent, calls) = scripted_guest(|_| true);
        let web = service(&format!("checks = [{EXEC_READY}]"));
        wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn log_watch_reads_only_appends_and_matches_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut watch = LogWatch::new(b"server started");
        let err = watch.probe(&path).await.unwrap_err();
        assert!(err.0.contains("does not exist (yet)"), "{err:?}");

        let append = |text: &str| {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            file.write_all(text.as_bytes()).unwrap();
        };
        append("[    0.1] booting\nhttpd: serv");
        let err = watch.probe(&path).await.unwrap_err();
        assert!(err.0.starts_with("not in console log"), "{err:?}");
        assert_eq!(watch.offset, 29);
        assert_eq!(watch.tail, b"booting\nhttpd: serv"[6..]);
        append("er st");
        assert!(watch.probe(&path).await.is_err());
        assert_eq!(watch.offset, 34);
        assert!(watch.tail.len() < b"server started".len());
        append("arted on port 80\n");
        watch.probe(&path).await.unwrap();
        // Seen stays seen while the log grows...
        append("more output\n");
        watch.probe(&path).await.unwrap();
        // ...but a shorter file is a new log.
        std::fs::write(&path, "reboot\n").unwrap();
        assert!(watch.probe(&path).await.is_err());
        assert_eq!(watch.offset, 7);
        std::fs::remove_file(&path).unwrap();
        assert!(watch.probe(&path).await.is_err());

        // A large log is read in pieces, and a text across two pieces is found.
        let mut big = "x".repeat(LOG_CHUNK - 5);
        big.push_str("server started\n");
        std::fs::write(&path, &big).unwrap();
        let mut watch = LogWatch::new(b"server started");
        watch.probe(&path).await.unwrap();
    }

    #[tokio::test]
    async fn log_check_waits_for_a_console_log_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let writer_path = path.clone();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&writer_path)
                .await
                .unwrap();
            // The text arrives in two writes, with probes in between.
            for piece in ["[ 0.2] init: starting httpd\nhttpd: server st", "arted\n"] {
                file.write_all(piece.as_bytes()).await.unwrap();
                file.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let (agent, _) = scripted_guest(|_| true);
        let endpoints = BTreeMap::new();
        let web = service(
            r#"interval = "10ms"
            checks = [{ log = { contains = "server started" } }]"#,
        );
        let probe_target = ProbeTarget {
            console_log: Some(&path),
            ..target(&endpoints, &agent)
        };
        let took = wait_ready(&web, &web.ready, &probe_target).await.unwrap();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        writer.await.unwrap();

        // Without a console log the check says so.
        let web = service(
            r#"timeout = "50ms"
            checks = [{ log = { contains = "server started" } }]"#,
        );
        let err = wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap_err();
        assert_eq!(
            err.0,
            r#"not ready after 50ms: log contains "server started": this VM has no console log (the backend keeps none)"#
        );
    }

    #[test]
    fn proc_stat_fields() {
        let stat = "4242 (qemu (x) y) S 1 2 3 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 5 0 99 0";
        assert_eq!(parse_cpu_ticks(stat), Some(287));
        assert_eq!(parse_cpu_ticks("4242 (qemu) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[tokio::test]
    async fn cpu_settled_passes_when_idle_and_fails_while_spinning() {
        use std::sync::atomic::{AtomicBool, Ordering};

        let (agent, _) = scripted_guest(|_| true);
        let endpoints = BTreeMap::new();
        let pid = std::process::id();
        let measured = ProbeTarget {
            qemu_pid: Some(pid),
            ..target(&endpoints, &agent)
        };
        // Idle: some window within the timeout is quiet (other tests share this process).
        let web = service(
            r#"timeout = "20s"
            checks = [{ cpu_settled = { below_percent = 50.0, window = "200ms" } }]"#,
        );
        wait_ready(&web, &web.ready, &measured).await.unwrap();

        // Spinning threads: on a busy host (this one may run other VMs and builds), each
        // gets only a share of a CPU, so the bar is set low.
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                })
            })
            .collect();
        let used = cpu_percent(pid, Duration::from_millis(300)).await.unwrap();
        let web = service(
            r#"timeout = "1s"
            checks = [{ cpu_settled = { below_percent = 20.0, window = "300ms" } }]"#,
        );
        let result = wait_ready(&web, &web.ready, &measured).await;
        stop.store(true, Ordering::Relaxed);
        for spinner in spinners {
            spinner.join().unwrap();
        }
        assert!(used > 20.0, "spinning used only {used}%");
        let err = result.unwrap_err();
        assert!(
            err.0.starts_with(&format!(
                "not ready after 1s: cpu_settled below 20% over 300ms: process {pid} used "
            )),
            "{err:?}"
        );
        assert!(
            err.0.ends_with("% of a host CPU over 300ms, not below 20%"),
            "{err:?}"
        );

        // No process (fake backend), or one that is gone.
        let web = service(
            r#"timeout = "1s"
            checks = [{ cpu_settled = { below_percent = 50.0, window = "10ms" } }]"#,
        );
        let err = wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap_err();
        assert!(
            err.0
                .ends_with("this VM has no host process to measure (the backend runs no QEMU)"),
            "{err:?}"
        );
        let err = cpu_percent(u32::MAX, Duration::from_millis(1))
            .await
            .unwrap_err();
        assert_eq!(err.0, format!("process {} is gone", u32::MAX));
    }

    #[tokio::test]
    async fn http_check_reads_status_and_body() {
        let addr =
            server(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello hangar\n").await;
        http_check(addr, "/", 200, Some("hangar")).await.unwrap();
        let err = http_check(addr, "/", 200, Some("nope")).await.unwrap_err();
        assert!(err.0.contains("does not contain \"nope\""), "{err:?}");
        let err = http_check(addr, "/x", 404, None).await.unwrap_err();
        assert!(err.0.contains("expected status 404"), "{err:?}");
    }

    #[tokio::test]
    async fn bytes_check_and_silent_peers() {
        let addr = server(b"+PONG\r\n").await;
        bytes_check(addr, b"PING\r\n", b"+PONG").await.unwrap();
        assert!(bytes_check(addr, b"PING\r\n", b"+OK").await.is_err());
        let silent = server(b"").await;
        let err = http_check(silent, "/", 200, None).await.unwrap_err();
        assert!(err.0.contains("without answering"), "{err:?}");
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = http_check(closed, "/", 200, None).await.unwrap_err();
        assert!(err.0.starts_with("connect to"), "{err:?}");
    }

    #[tokio::test]
    async fn connect_check_passes_only_when_the_guest_sends_something() {
        // Answers a request (an HTTP server).
        connect_check(server(b"HTTP/1.0 400 Bad Request\r\n\r\n").await)
            .await
            .unwrap();
        // Speaks first (SSH).
        let greeting = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let greeting_addr = greeting.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = greeting.accept().await {
                let _ = stream.write_all(b"SSH-2.0-x\r\n").await;
            }
        });
        connect_check(greeting_addr).await.unwrap();
        // Holds the connection without a word, as a user-mode forward does while the
        // guest is not up yet.
        let holding = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hold_addr = holding.local_addr().unwrap();
        tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((stream, _)) = holding.accept().await {
                kept.push(stream);
            }
        });
        let err = connect_check(hold_addr).await.unwrap_err();
        assert!(err.0.contains("did not answer"), "{}", err.0);
        // Closes at once, as a user-mode forward does when nothing listens in the guest.
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let close_addr = closing.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = closing.accept().await {
                drop(stream);
            }
        });
        let err = connect_check(close_addr).await.unwrap_err();
        assert!(err.0.contains("without a word"), "{}", err.0);
    }

    /// A guest whose hangar-init says something listens on `listening` only; returns the
    /// ports it was asked about.
    fn listening_guest(
        listening: u16,
    ) -> (
        std::sync::Arc<Agent>,
        std::sync::Arc<std::sync::Mutex<Vec<u16>>>,
    ) {
        use tokio::io::AsyncBufReadExt;

        let (host_end, guest_end) = tokio::io::duplex(64 * 1024);
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = asked.clone();
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(guest_end);
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let message = hangar_proto::decode::<hangar_proto::HostMessage>(&line).unwrap();
                let hangar_proto::HostMessage::CheckListen { id, port } = message else {
                    continue;
                };
                record.lock().unwrap().push(port);
                let reply = hangar_proto::GuestMessage::Reply {
                    id,
                    ok: port == listening,
                    code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: None,
                };
                let line = hangar_proto::encode(&reply);
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        (Agent::spawn(host_end), asked)
    }

    #[tokio::test]
    async fn a_port_without_an_endpoint_is_checked_inside_the_guest() {
        let web = service(
            r#"interval = "10ms"
            timeout = "200ms"
            checks = [{ http = { port = "http", path = "/" } }]"#,
        );
        let endpoints = BTreeMap::new();
        let (agent, asked) = listening_guest(80);
        wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap();
        assert_eq!(*asked.lock().unwrap(), [80]);

        // Nothing listens: not ready, and the reason says where it looked.
        let (agent, _) = listening_guest(81);
        let err = wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap_err();
        assert!(
            err.0.contains("nothing listens on guest port 80"),
            "{}",
            err.0
        );

        // With an endpoint the check goes through it, not to the guest.
        let addr = server(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let endpoints = BTreeMap::from([("http".to_owned(), addr)]);
        let (agent, asked) = listening_guest(80);
        wait_ready(&web, &web.ready, &target(&endpoints, &agent))
            .await
            .unwrap();
        assert!(asked.lock().unwrap().is_empty());
    }
}
