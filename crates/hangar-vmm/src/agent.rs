//! The host side of the agent channel to `hangar-init` (see `hangar-proto`).
//!
//! [`Agent`] owns one connection: a reader task routes replies to their callers by id, keeps
//! the latest hello, and publishes every guest event on a broadcast channel; recent events
//! are kept for error reports ("service httpd exited with code 1").

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_proto::{GuestConfig, GuestMessage, HostMessage, Identity, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

/// How many recent guest events are kept for diagnostics.
const RECENT_EVENTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent channel closed")]
    Closed,
    #[error("guest agent did not answer {what} within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("guest speaks agent protocol {0}, this host speaks {PROTOCOL_VERSION}")]
    Protocol(u32),
    #[error("guest configuration failed at {stage}: {error}")]
    Configure { stage: String, error: String },
    #[error("guest agent I/O failed")]
    Io(#[from] std::io::Error),
}

/// A reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub error: Option<String>,
}

/// The latest hello: what kernel the guest runs and its uptime when it said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    pub kernel: String,
    pub uptime_ms: u64,
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    recent: Mutex<VecDeque<GuestMessage>>,
    events: broadcast::Sender<GuestMessage>,
    hello: watch::Sender<Option<Hello>>,
    closed: watch::Sender<bool>,
}

pub struct Agent {
    writer: tokio::sync::Mutex<Writer>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Agent {
    /// Starts speaking the protocol over `stream`.
    pub fn spawn<S>(stream: S) -> Arc<Agent>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            recent: Mutex::default(),
            events: broadcast::channel(64).0,
            hello: watch::channel(None).0,
            closed: watch::channel(false).0,
        });
        let reader = tokio::spawn(read_loop(BufReader::new(read), shared.clone()));
        Arc::new(Agent {
            writer: tokio::sync::Mutex::new(Box::new(write)),
            shared,
            next_id: AtomicU64::new(1),
            reader,
        })
    }

    /// Guest events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<GuestMessage> {
        self.shared.events.subscribe()
    }

    /// The most recent guest events, oldest first.
    pub fn recent_events(&self) -> Vec<GuestMessage> {
        self.shared
            .recent
            .lock()
            .expect("agent recent lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Waits for the guest's hello (returns at once if one already came).
    pub async fn wait_hello(&self, timeout: Duration) -> Result<Hello, AgentError> {
        let mut hello = self.shared.hello.subscribe();
        let mut closed = self.shared.closed.subscribe();
        let wait = async {
            loop {
                if let Some(hello) = hello.borrow_and_update().clone() {
                    return Ok(hello);
                }
                if *closed.borrow_and_update() {
                    return Err(AgentError::Closed);
                }
                tokio::select! {
                    changed = hello.changed() => changed.map_err(|_| AgentError::Closed)?,
                    changed = closed.changed() => changed.map_err(|_| AgentError::Closed)?,
                }
            }
        };
        let hello =
            tokio::time::timeout(timeout, wait)
                .await
                .map_err(|_| AgentError::Timeout {
                    what: "hello",
                    timeout,
                })??;
        if hello.protocol != PROTOCOL_VERSION {
            return Err(AgentError::Protocol(hello.protocol));
        }
        Ok(hello)
    }

    /// Waits for hello, sends the configuration and waits until the guest reports its
    /// services started. Returns the guest's uptime at that moment.
    pub async fn configure(
        &self,
        config: GuestConfig,
        timeout: Duration,
    ) -> Result<u64, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_hello(timeout).await?;
        let mut events = self.subscribe();
        self.send(&HostMessage::Configure(Box::new(config))).await?;
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(GuestMessage::Configured { uptime_ms }) => return Ok(uptime_ms),
                    Ok(GuestMessage::Failed { stage, error }) => {
                        return Err(AgentError::Configure { stage, error });
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(AgentError::Closed),
                }
            }
        };
        tokio::time::timeout_at(deadline, wait)
            .await
            .map_err(|_| AgentError::Timeout {
                what: "configure",
                timeout,
            })?
    }

    /// Is something listening on `port` inside the guest?
    pub async fn check_listen(&self, port: u16, timeout: Duration) -> Result<bool, AgentError> {
        let reply = self
            .request("check_listen", timeout, |id| HostMessage::CheckListen {
                id,
                port,
            })
            .await?;
        Ok(reply.ok)
    }

    /// Runs `argv` in the guest's root.
    pub async fn exec(&self, argv: Vec<String>, timeout: Duration) -> Result<Reply, AgentError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // The guest enforces the command's timeout; allow it a moment to report.
        self.request("exec", timeout + Duration::from_secs(2), |id| {
            HostMessage::Exec {
                id,
                argv,
                timeout_ms,
            }
        })
        .await
    }

    /// New hostname, clock and entropy.
    pub async fn reidentify(
        &self,
        identity: Identity,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        self.request("reidentify", timeout, |id| HostMessage::Reidentify {
            id,
            identity,
        })
        .await
    }

    /// Puts the guest on its private segment ([`hangar_proto::PrivateNetwork`]); the
    /// reply says whether every step applied.
    pub async fn private_network(
        &self,
        network: hangar_proto::PrivateNetwork,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        self.request("network", timeout, |id| HostMessage::Network {
            id,
            network,
        })
        .await
    }

    pub async fn ping(&self, timeout: Duration) -> Result<(), AgentError> {
        self.request("ping", timeout, |id| HostMessage::Ping { id })
            .await
            .map(drop)
    }

    async fn request(
        &self,
        what: &'static str,
        timeout: Duration,
        make: impl FnOnce(u64) -> HostMessage,
    ) -> Result<Reply, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .expect("agent pending lock")
            .insert(id, tx);
        let sent = self.send(&make(id)).await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(timeout, rx).await,
            Err(err) => {
                self.shared
                    .pending
                    .lock()
                    .expect("agent pending lock")
                    .remove(&id);
                return Err(err);
            }
        };
        self.shared
            .pending
            .lock()
            .expect("agent pending lock")
            .remove(&id);
        match answer {
            Err(_) => Err(AgentError::Timeout { what, timeout }),
            Ok(Err(_)) => Err(AgentError::Closed),
            Ok(Ok(reply)) => Ok(reply),
        }
    }

    async fn send(&self, message: &HostMessage) -> Result<(), AgentError> {
        if *self.shared.closed.borrow() {
            return Err(AgentError::Closed);
        }
        let line = hangar_proto::encode(message);
        let mut writer = self.writer.lock().await;
        writer.write_all(line.as_bytes()).await?;
        writer.flush().await?;
        Ok(())
    }
}

async fn read_loop<R: AsyncRead + Unpin>(reader: BufReader<R>, shared: Arc<Shared>) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let message: GuestMessage = match hangar_proto::decode(&line) {
            Ok(message) => message,
            Err(err) => {
                tracing::debug!(%err, line = %line.chars().take(200).collect::<String>(), "unparsable agent line");
                continue;
            }
        };
        match &message {
            GuestMessage::Hello {
                protocol,
                kernel,
                uptime_ms,
            } => {
                shared.hello.send_replace(Some(Hello {
                    protocol: *protocol,
                    kernel: kernel.clone(),
                    uptime_ms: *uptime_ms,
                }));
                continue; // repeated until configured: not worth keeping
            }
            GuestMessage::Reply {
                id,
                ok,
                code,
                stdout,
                stderr,
                error,
            } => {
                let waiter = shared
                    .pending
                    .lock()
                    .expect("agent pending lock")
                    .remove(id);
                if let Some(tx) = waiter {
                    let _ = tx.send(Reply {
                        ok: *ok,
                        code: *code,
                        stdout: stdout.clone(),
                        stderr: stderr.clone(),
                        error: error.clone(),
                    });
                }
                continue;
            }
            _ => {}
        }
        {
            let mut recent = shared.recent.lock().expect("agent recent lock");
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(message.clone());
        }
        let _ = shared.events.send(message);
    }
    shared.closed.send_replace(true);
    shared.pending.lock().expect("agent pending lock").clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_proto::GuestMessage as G;

    fn config() -> GuestConfig {
        GuestConfig {
            identity: Identity {
                hostname: "h".into(),
                unix_time_ms: 0,
                entropy_hex: "00".into(),
            },
            network: None,
            root: None,
            files: vec![],
            services: vec![],
        }
    }

    /// Plays a guest on the other end of a duplex pipe.
    async fn guest(stream: tokio::io::DuplexStream, protocol: u32) {
        let (read, mut write) = tokio::io::split(stream);
        let mut lines = BufReader::new(read).lines();
        let hello = hangar_proto::encode(&G::Hello {
            protocol,
            kernel: "6.1".into(),
            uptime_ms: 5,
        });
        write
            .write_all(b"garbage that is not json\n")
            .await
            .unwrap();
        write.write_all(hello.as_bytes()).await.unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let answer = match hangar_proto::decode::<HostMessage>(&line).unwrap() {
                HostMessage::Configure(_) => vec![
                    G::ServiceStarted {
                        name: "web".into(),
                        pid: 7,
                    },
                    G::Configured { uptime_ms: 9 },
                ],
                HostMessage::CheckListen { id, port } => vec![G::Reply {
                    id,
                    ok: port == 80,
                    code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: None,
                }],
                HostMessage::Exec { id, argv, .. } => vec![G::Reply {
                    id,
                    ok: true,
                    code: Some(0),
                    stdout: argv.join(" "),
                    stderr: String::new(),
                    error: None,
                }],
                HostMessage::Network { id, network } => vec![G::Reply {
                    id,
                    ok: network.interface == "eth1",
                    code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: None,
                }],
                HostMessage::Ping { .. } | HostMessage::Reidentify { .. } => vec![],
            };
            for message in answer {
                write
                    .write_all(hangar_proto::encode(&message).as_bytes())
                    .await
                    .unwrap();
            }
        }
    }

    #[tokio::test]
    async fn configure_then_requests() {
        let (host, guest_end) = tokio::io::duplex(4096);
        tokio::spawn(guest(guest_end, PROTOCOL_VERSION));
        let agent = Agent::spawn(host);
        assert_eq!(
            agent
                .configure(config(), Duration::from_secs(5))
                .await
                .unwrap(),
            9
        );
        assert!(
            agent
                .check_listen(80, Duration::from_secs(5))
                .await
                .unwrap()
        );
        assert!(
            !agent
                .check_listen(81, Duration::from_secs(5))
                .await
                .unwrap()
        );
        let reply = agent
            .exec(vec!["echo".into(), "hi".into()], Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!((reply.code, reply.stdout.as_str()), (Some(0), "echo hi"));
        assert!(matches!(
            agent.recent_events()[0],
            G::ServiceStarted { pid: 7, .. }
        ));
        // This guest never answers pings.
        let err = agent.ping(Duration::from_millis(50)).await.unwrap_err();
        assert!(
            matches!(err, AgentError::Timeout { what: "ping", .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wrong_protocol_and_closed_channel_are_errors() {
        let (host, guest_end) = tokio::io::duplex(4096);
        tokio::spawn(guest(guest_end, PROTOCOL_VERSION + 1));
        let agent = Agent::spawn(host);
        let err = agent.wait_hello(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, AgentError::Protocol(_)), "{err}");

        let (host, guest_end) = tokio::io::duplex(4096);
        drop(guest_end);
        let agent = Agent::spawn(host);
        let err = agent.wait_hello(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, AgentError::Closed), "{err}");
    }
}
