//! A small asynchronous QMP client: typed wrappers for the commands hangar uses, events on a
//! broadcast channel. QMP is line-delimited JSON over a unix socket; every command carries an
//! `id` so answers are matched to callers while events interleave.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

/// How long one command may take before the client gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP greeting missing or malformed: {0}")]
    Greeting(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection closed (QEMU exited?)")]
    Closed,
    #[error("QMP command {0} timed out")]
    Timeout(String),
}

/// An asynchronous event from QEMU (`STOP`, `RESUME`, `SHUTDOWN`, ...).
#[derive(Debug, Clone, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// QEMU's run state as `query-status` reports it (`running`, `paused`, `prelaunch`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QmpStatus {
    pub running: bool,
    pub status: String,
}

/// What `query-migrate` reports: `status` is absent before any migration, then one of
/// `setup`, `active`, `completed`, `failed`, `cancelled`, ...
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capability negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| QmpError::Greeting("no greeting within 30 s".into()))??
            .ok_or(QmpError::Closed)?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|e| QmpError::Greeting(e.to_string()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting(greeting.to_string()));
        }

        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            next_id: AtomicU64::new(1),
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, None).await
    }

    /// Runs one command whose message carries `fd` as `SCM_RIGHTS` ancillary data (QEMU
    /// takes it with `getfd`/`add-fd`). The fd stays open here; QEMU gets its own copy.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, Some(fd)).await
    }

    async fn execute_inner(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("qmp pending lock")
            .insert(id, tx);
        let mut line = message.to_string();
        line.push('\n');
        let written = {
            let mut writer = self.writer.lock().await;
            match fd {
                None => writer.write_all(line.as_bytes()).await,
                Some(fd) => {
                    let stream: &UnixStream = (*writer).as_ref();
                    let bytes = line.as_bytes();
                    match stream
                        .async_io(Interest::WRITABLE, || {
                            sendmsg_with_fd(stream.as_raw_fd(), bytes, fd.as_raw_fd())
                        })
                        .await
                    {
                        // The fd went with the first bytes; the rest is plain data.
                        Ok(sent) => writer.write_all(&bytes[sent..]).await,
                        Err(err) => Err(err),
                    }
                }
            }
        };
        if let Err(err) = written {
            self.pending.lock().expect("qmp pending lock").remove(&id);
            return Err(err.into());
        }
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, rx).await;
        self.pending.lock().expect("qmp pending lock").remove(&id);
        match answer {
            Err(_) => Err(QmpError::Timeout(command.to_owned())),
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(result)) => result.map_err(|err| match err {
                QmpError::Command { class, desc, .. } => QmpError::Command {
                    command: command.to_owned(),
                    class,
                    desc,
                },
                other => other,
            }),
        }
    }

    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Pauses every vCPU.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes every vCPU.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    pub async fn query_status(&self) -> Result<QmpStatus, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value).map_err(|e| QmpError::Command {
            command: "query-status".into(),
            class: "Decode".into(),
            desc: e.to_string(),
        })
    }

    /// Hands QEMU a file descriptor under `name` (QMP `getfd`), for URIs such as
    /// `fd:NAME`. QEMU holds its own copy; the caller may close `fd` afterwards.
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), fd)
            .await
            .map(drop)
    }

    /// Closes a descriptor given with [`Qmp::getfd`] that nothing consumed.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute("closefd", Some(json!({ "fdname": name })))
            .await
            .map(drop)
    }

    /// The state of the current (or last) migration, outgoing or incoming.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        let value = self.execute("query-migrate", None).await?;
        serde_json::from_value(value).map_err(|e| QmpError::Command {
            command: "query-migrate".into(),
            class: "Decode".into(),
            desc: e.to_string(),
        })
    }

    /// QEMU's version as `major.minor.micro`.
    pub async fn version(&self) -> Result<String, QmpError> {
        let value = self.execute("query-version", None).await?;
        let part = |name: &str| value["qemu"][name].as_u64().unwrap_or(0);
        Ok(format!(
            "{}.{}.{}",
            part("major"),
            part("minor"),
            part("micro")
        ))
    }

    /// Asks QEMU to exit. The connection closes as it does, which may end this call with
    /// [`QmpError::Closed`]; both mean QEMU is going away.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// One `sendmsg(2)` of (a prefix of) `bytes` with `fd` attached as `SCM_RIGHTS`. Returns
/// how many bytes went; `WouldBlock` when the socket is full.
fn sendmsg_with_fd(socket: RawFd, bytes: &[u8], fd: RawFd) -> std::io::Result<usize> {
    const FD_SIZE: u32 = std::mem::size_of::<RawFd>() as u32;
    // Room for one cmsghdr carrying one int, aligned for cmsghdr (u64 covers it).
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(FD_SIZE) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which is large enough and suitably aligned for
    // one cmsghdr with an int payload (checked above), so CMSG_FIRSTHDR is non-null and
    // CMSG_DATA points inside `control`; the payload write is unaligned-safe.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_SIZE) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: every pointer in `msg` refers to live locals (`iov`, `bytes`, `control`)
    // that outlive the call; sendmsg(2) only reads them.
    let sent = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        let Ok(value) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line = %line, "unparsable qmp line");
            continue;
        };
        if value.get("event").is_some() {
            if let Ok(event) = serde_json::from_value::<QmpEvent>(value) {
                let _ = events.send(event);
            }
            continue;
        }
        let Some(id) = value.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let result = if let Some(ret) = value.get("return") {
            Ok(ret.clone())
        } else {
            let error = value.get("error").cloned().unwrap_or_default();
            Err(QmpError::Command {
                command: String::new(),
                class: error["class"].as_str().unwrap_or("Unknown").to_owned(),
                desc: error["desc"].as_str().unwrap_or("").to_owned(),
            })
        };
        if let Some(tx) = pending.lock().expect("qmp pending lock").remove(&id) {
            let _ = tx.send(result);
        }
    }
    // Dropping the senders wakes every waiter with `Closed`.
    pending.lock().expect("qmp pending lock").clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP server: greets, then answers each command by name.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(read).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            let request: Value = serde_json::from_str(&line).unwrap();
            let id = request["id"].clone();
            let answer = match request["execute"].as_str().unwrap() {
                "qmp_capabilities" | "cont" => json!({"return": {}, "id": id}),
                "stop" => {
                    write
                        .write_all(b"{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {}}\n")
                        .await
                        .unwrap();
                    json!({"return": {}, "id": id})
                }
                "query-status" => {
                    json!({"return": {"running": false, "status": "paused", "singlestep": false}, "id": id})
                }
                "quit" => return,
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            write
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn commands_events_errors_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(listener));

        let qmp = Qmp::connect(&path).await.unwrap();
        let mut events = qmp.events();
        qmp.stop().await.unwrap();
        assert_eq!(events.recv().await.unwrap().event, "STOP");
        let status = qmp.query_status().await.unwrap();
        assert_eq!(
            status,
            QmpStatus {
                running: false,
                status: "paused".into()
            }
        );
        let err = qmp.execute("frobnicate", None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "QMP command frobnicate failed: CommandNotFound: The command frobnicate has not been found"
        );
        qmp.quit().await.unwrap();
        server.await.unwrap();
        assert!(matches!(
            qmp.cont().await,
            Err(QmpError::Closed | QmpError::Io(_))
        ));
    }
}
