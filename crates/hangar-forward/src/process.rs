//! The forwarder as a process of its own (`hangar forwarder`): at most one per data dir, in
//! its own session so that it outlives the server, found again by the next server through
//! its socket.
//!
//! Files in the data dir:
//!
//! | file             | what                                                        |
//! |------------------|-------------------------------------------------------------|
//! | `forwarder.sock` | control socket (see [`crate::protocol`])                     |
//! | `forwarder.pid`  | its pid; the forwarder exits when this file stops naming it  |
//! | `forwarder.lock` | held (flock) while it runs: one forwarder per data dir       |
//! | `forwarder.log`  | its log                                                      |

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::protocol::{Reply, Request};
use crate::{Control, ForwardError, Forwarder};

/// How often the forwarder checks that its data dir still names it.
const WATCHDOG: Duration = Duration::from_secs(2);

/// How long a new forwarder may take to open its socket.
const START_WAIT: Duration = Duration::from_secs(10);

/// Where a data dir's forwarder keeps its files.
#[derive(Debug, Clone)]
pub struct ForwarderPaths {
    pub dir: PathBuf,
}

impl ForwarderPaths {
    pub fn new(data_dir: &Path) -> ForwarderPaths {
        ForwarderPaths {
            dir: data_dir.to_owned(),
        }
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("forwarder.sock")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("forwarder.pid")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("forwarder.lock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("forwarder.log")
    }

    /// The pid of the forwarder running for this data dir, if one does.
    pub fn running_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        is_forwarder_of(pid, &self.dir).then_some(pid)
    }
}

/// Whether `pid` is a `hangar forwarder` of `data_dir` (its command line says so).
pub fn is_forwarder_of(pid: u32, data_dir: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let dir = data_dir.as_os_str().as_encoded_bytes();
    args.contains(&&b"forwarder"[..])
        && args
            .windows(2)
            .any(|pair| pair[0] == b"--data-dir" && pair[1] == dir)
}

/// Runs the forwarder of `data_dir` until it is told to shut down, or its pid file stops
/// naming it (the data dir was removed, or another forwarder took over).
/// [`ForwardError::AlreadyRunning`] when another forwarder holds the data dir.
pub async fn run(data_dir: &Path, server_url: &str) -> Result<(), ForwardError> {
    let paths = ForwarderPaths::new(data_dir);
    std::fs::create_dir_all(data_dir).map_err(ForwardError::Io)?;
    let lock = std::fs::File::create(paths.lock()).map_err(ForwardError::Io)?;
    if lock.try_lock().is_err() {
        return Err(ForwardError::AlreadyRunning(data_dir.display().to_string()));
    }
    let _ = std::fs::remove_file(paths.socket());
    let listener = UnixListener::bind(paths.socket()).map_err(ForwardError::Io)?;
    let pid = std::process::id();
    let tmp = paths.dir.join("forwarder.pid.tmp");
    std::fs::write(&tmp, format!("{pid}\n")).map_err(ForwardError::Io)?;
    std::fs::rename(&tmp, paths.pidfile()).map_err(ForwardError::Io)?;
    tracing::info!(pid, socket = %paths.socket().display(), server = server_url, "forwarder listening");

    let forwarder = Forwarder::new(server_url);
    // The server's API wants a token for wakes: the data dir's admin token.
    match std::fs::read_to_string(data_dir.join("admin.token")) {
        Ok(token) => forwarder.set_token(token.trim()),
        Err(err) => {
            tracing::warn!(error = %err, "no admin.token in the data dir: wakes go without a token")
        }
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut watchdog = tokio::time::interval(WATCHDOG);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(control_connection(stream, forwarder.clone(), stop_tx.clone()));
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "control accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            _ = stop_rx.changed() => {
                tracing::info!("forwarder shutting down on request");
                break;
            }
            _ = watchdog.tick() => {
                let named = std::fs::read_to_string(paths.pidfile())
                    .is_ok_and(|text| text.trim() == pid.to_string());
                if !named {
                    tracing::warn!("the pid file no longer names this forwarder; exiting");
                    break;
                }
            }
        }
    }
    if std::fs::read_to_string(paths.pidfile()).is_ok_and(|text| text.trim() == pid.to_string()) {
        let _ = std::fs::remove_file(paths.pidfile());
        let _ = std::fs::remove_file(paths.socket());
    }
    drop(lock);
    Ok(())
}

async fn control_connection(
    stream: UnixStream,
    forwarder: Forwarder,
    stop: tokio::sync::watch::Sender<bool>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let request: Result<Request, _> = serde_json::from_str(&line);
        let shutdown = matches!(request, Ok(Request::Shutdown));
        let reply = match request {
            Ok(request) => forwarder.handle(request).await,
            Err(err) => Reply::Error {
                message: format!("malformed request: {err}"),
            },
        };
        let mut text = serde_json::to_string(&reply).expect("replies serialize");
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            break;
        }
        if shutdown {
            let _ = stop.send(true);
            break;
        }
    }
}

/// Connects to the data dir's forwarder, starting one when none answers: `command` (e.g.
/// `hangar forwarder`) with `--data-dir` and `--server`, in a session of its own so that
/// signals to the server's process group do not reach it. Returns the connection and
/// whether a forwarder was started.
pub async fn connect_or_start(
    data_dir: &Path,
    command: &[OsString],
    server_url: &str,
) -> Result<(Control, bool), ForwardError> {
    let paths = ForwarderPaths::new(data_dir);
    if let Ok(control) = Control::connect(&paths.socket()).await
        && matches!(control.call(&Request::Ping).await, Ok(Reply::Pong { .. }))
    {
        return Ok((control, false));
    }
    let (program, args) = command
        .split_first()
        .ok_or_else(|| ForwardError::Start("no forwarder command".into()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())
        .map_err(ForwardError::Io)?;
    let mut child = std::process::Command::new(program);
    child
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--server")
        .arg(server_url)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(ForwardError::Io)?)
        .stderr(log);
    // SAFETY: runs in the forked child before exec; setsid(2) is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = child
        .spawn()
        .map_err(|err| ForwardError::Start(format!("cannot run {program:?}: {err}")))?;
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + START_WAIT;
    loop {
        if let Ok(control) = Control::connect(&paths.socket()).await
            && matches!(control.call(&Request::Ping).await, Ok(Reply::Pong { .. }))
        {
            // Reap it whenever it exits, so that no zombie stays behind this process.
            std::thread::spawn(move || child.wait());
            tracing::info!(pid, "forwarder started");
            return Ok((control, true));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(paths.log()).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(ForwardError::Start(format!(
                "the forwarder exited ({status}): {tail}"
            )));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ForwardError::Start(
                "the forwarder did not open its socket in time".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
