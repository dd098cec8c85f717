//! The forwarder's core: stable listeners per VM, connections spliced to the VM's current
//! address, and connections to a VM that does not run held (their bytes wait unread in the
//! socket) while the server is asked to wake it.
//!
//! Two rules keep VMs from being woken or put to sleep at the wrong time:
//!
//! - **In use while connected.** A connection counts as open from the moment it is
//!   forwarded or waits for a wake until it closes. [`Forwarder::quiesce`] (asked by the
//!   lifecycle before it puts a VM to sleep, archives or deletes it) marks the VM asleep
//!   only when none is open, under the VM's admission gate, which a connection also takes
//!   to count itself open: either the lifecycle sees the connection and leaves the VM
//!   alone, or the connection sees the VM asleep and waits for a wake.
//! - **Woken by data, not by a bare connect** (per port, [`WakeOn`]). A connection to a
//!   VM that does not run, on an `on-data` port, waits for the client's first bytes before
//!   it asks for a wake (and before it counts as open); one that closes or sends nothing
//!   within [`FIRST_BYTES_WAIT`] is closed without waking anything.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hangar_core::WakeOn;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::protocol::{EndpointSpec, Reply, Request, VmActivity};
use crate::wake;

/// How long a connection to a VM that does not run waits for it to wake.
pub const WAKE_WAIT: Duration = Duration::from_secs(300);

/// How long a connection to a VM that does not run may send nothing (on an `on-data`
/// port) before it is closed without waking the VM.
pub const FIRST_BYTES_WAIT: Duration = Duration::from_secs(10);

/// Attempts to reach an active VM's address before the connection is given up (its port
/// forward may be a moment behind, e.g. right after a restore).
const CONNECT_ATTEMPTS: u32 = 20;
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Splice buffer per direction.
const SPLICE_BUFFER: usize = 64 * 1024;

/// Whether a VM's connections are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Active,
    /// Connections wait; the first one asks the server to wake the VM.
    Asleep,
    /// The VM's endpoints were closed: its connections end.
    Closed,
    /// The VM is moving (a live migration's switchover): new connections wait, without
    /// waking anything, until it is active again.
    Held,
}

/// Counters shared by a VM's connections.
#[derive(Default)]
struct Activity {
    last_active_ms: AtomicU64,
    last_byte_ms: AtomicU64,
    /// Changed under the VM's admission gate when it grows (see [`Vm::gate`]).
    open: AtomicU64,
    connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_active_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn touch_bytes(&self) {
        let now = now_ms();
        self.last_active_ms.store(now, Ordering::Relaxed);
        self.last_byte_ms.store(now, Ordering::Relaxed);
    }

    fn view(&self) -> VmActivity {
        VmActivity {
            last_active_ms: self.last_active_ms.load(Ordering::Relaxed),
            last_byte_ms: self.last_byte_ms.load(Ordering::Relaxed),
            open: self.open.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

struct Port {
    port: u16,
    target: SocketAddr,
    wake: WakeOn,
    accept: JoinHandle<()>,
}

/// One VM's endpoints.
struct Vm {
    id: String,
    status: watch::Sender<Status>,
    activity: Activity,
    ports: Mutex<BTreeMap<String, Port>>,
    /// One wake request at a time; later connections wait for its outcome.
    wake: tokio::sync::Mutex<()>,
    /// Admission gate: a connection counts itself open, and [`Forwarder::quiesce`] checks
    /// that none is and marks the VM asleep, each under it, so that one always sees the
    /// other.
    gate: Mutex<()>,
}

impl Vm {
    fn target(&self, name: &str) -> Option<SocketAddr> {
        self.ports
            .lock()
            .expect("ports lock")
            .get(name)
            .map(|port| port.target)
    }

    fn wake_on(&self, name: &str) -> WakeOn {
        self.ports
            .lock()
            .expect("ports lock")
            .get(name)
            .map(|port| port.wake)
            .unwrap_or_default()
    }
}

/// All stable endpoints of one data dir. Cheap to clone; every clone is the same state.
#[derive(Clone)]
pub struct Forwarder {
    vms: Arc<Mutex<HashMap<String, Arc<Vm>>>>,
    server_url: Arc<Mutex<ServerAddr>>,
    first_bytes_wait: Duration,
}

/// The server the forwarder asks to wake VMs: its URL and the API token it sends.
#[derive(Debug, Clone, Default)]
struct ServerAddr {
    url: String,
    token: Option<String>,
}

impl Forwarder {
    /// A forwarder with no endpoints, asking the server at `server_url` to wake VMs.
    pub fn new(server_url: &str) -> Forwarder {
        Forwarder {
            vms: Arc::default(),
            server_url: Arc::new(Mutex::new(ServerAddr {
                url: server_url.to_owned(),
                token: None,
            })),
            first_bytes_wait: FIRST_BYTES_WAIT,
        }
    }

    /// Sends `token` (an API token allowed to wake VMs) with every wake request.
    pub fn set_token(&self, token: &str) {
        self.server_url.lock().expect("url lock").token = Some(token.to_owned());
    }

    /// The same forwarder with another wait for a silent client's first bytes than
    /// [`FIRST_BYTES_WAIT`] (for listeners opened from now on).
    pub fn with_first_bytes_wait(mut self, wait: Duration) -> Forwarder {
        self.first_bytes_wait = wait;
        self
    }

    /// Answers one control request. [`Request::Shutdown`] closes everything; the caller
    /// exits.
    pub async fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Ping => Reply::Pong {
                pid: std::process::id(),
                vms: self.vms.lock().expect("vms lock").len(),
            },
            Request::Open(spec) => match self.open(&spec).await {
                Ok(port) => Reply::Port { port },
                Err(err) => Reply::Error {
                    message: format!("cannot listen on {}: {err}", spec.listen),
                },
            },
            Request::SetActive { vm, active } => Reply::Done {
                known: self.set_active(&vm, active),
            },
            Request::Close { vm } => Reply::Done {
                known: self.close(&vm).await,
            },
            Request::Sync {
                server_url,
                endpoints,
            } => {
                self.server_url.lock().expect("url lock").url = server_url;
                Reply::Synced {
                    ports: self.sync(&endpoints).await,
                }
            }
            Request::Activity => Reply::Activity {
                vms: self.activity(),
            },
            Request::Quiesce { vm } => {
                let (asleep, open) = self.quiesce(&vm);
                Reply::Quiesced { asleep, open }
            }
            Request::Hold { vm } => {
                let (known, open) = self.hold(&vm);
                Reply::Held { known, open }
            }
            Request::Shutdown => {
                let ids: Vec<String> = self.vms.lock().expect("vms lock").keys().cloned().collect();
                for id in ids {
                    self.close(&id).await;
                }
                Reply::Done { known: true }
            }
        }
    }

    fn vm(&self, id: &str) -> Option<Arc<Vm>> {
        self.vms.lock().expect("vms lock").get(id).cloned()
    }

    /// Listens for `spec` (or updates the endpoint already there) and returns its port.
    pub async fn open(&self, spec: &EndpointSpec) -> std::io::Result<u16> {
        let status = if spec.active {
            Status::Active
        } else {
            Status::Asleep
        };
        let vm = {
            let mut vms = self.vms.lock().expect("vms lock");
            vms.entry(spec.vm.clone())
                .or_insert_with(|| {
                    Arc::new(Vm {
                        id: spec.vm.clone(),
                        status: watch::Sender::new(status),
                        activity: Activity::default(),
                        ports: Mutex::default(),
                        wake: tokio::sync::Mutex::new(()),
                        gate: Mutex::new(()),
                    })
                })
                .clone()
        };
        vm.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
        let existing = {
            let mut ports = vm.ports.lock().expect("ports lock");
            match ports.get_mut(&spec.name) {
                Some(port) if spec.listen.port() == 0 || spec.listen.port() == port.port => {
                    port.target = spec.target;
                    port.wake = spec.wake;
                    return Ok(port.port);
                }
                Some(_) => ports.remove(&spec.name),
                None => None,
            }
        };
        if let Some(old) = existing {
            old.accept.abort();
            let _ = old.accept.await;
        }
        let listener = TcpListener::bind(spec.listen).await?;
        let port = listener.local_addr()?.port();
        let accept = tokio::spawn(accept_loop(
            listener,
            vm.clone(),
            spec.name.clone(),
            self.server_url.clone(),
            self.first_bytes_wait,
        ));
        vm.ports.lock().expect("ports lock").insert(
            spec.name.clone(),
            Port {
                port,
                target: spec.target,
                wake: spec.wake,
                accept,
            },
        );
        tracing::info!(vm = %spec.vm, name = %spec.name, port, target = %spec.target, active = spec.active, "endpoint open");
        Ok(port)
    }

    /// Marks a VM active or asleep; whether it has endpoints here.
    pub fn set_active(&self, id: &str, active: bool) -> bool {
        let Some(vm) = self.vm(id) else {
            return false;
        };
        let status = if active {
            Status::Active
        } else {
            Status::Asleep
        };
        vm.status.send_replace(status);
        tracing::debug!(vm = %id, active, "endpoint state");
        true
    }

    /// Marks VM `id` asleep unless a connection to it is open (forwarded, or waiting for a
    /// wake): `(true, 0)` when it is now asleep (or has no endpoints here), `(false, open)`
    /// when `open` connections keep it in use and nothing changed. A connection accepted
    /// after a `true` waits for a wake; see the module's rules.
    pub fn quiesce(&self, id: &str) -> (bool, u64) {
        let Some(vm) = self.vm(id) else {
            return (true, 0);
        };
        let _gate = vm.gate.lock().expect("gate lock");
        let open = vm.activity.open.load(Ordering::SeqCst);
        if open > 0 {
            return (false, open);
        }
        vm.status.send_if_modified(|status| {
            let active = *status == Status::Active;
            if active {
                *status = Status::Asleep;
            }
            active
        });
        tracing::debug!(vm = %id, "endpoint quiesced");
        (true, 0)
    }

    /// Holds VM `id`'s new connections until it is marked active again (see
    /// [`Request::Hold`]): whether it has endpoints here, and how many connections are
    /// open (forwarded before the hold; none is admitted after it).
    pub fn hold(&self, id: &str) -> (bool, u64) {
        let Some(vm) = self.vm(id) else {
            return (false, 0);
        };
        let _gate = vm.gate.lock().expect("gate lock");
        vm.status.send_replace(Status::Held);
        tracing::debug!(vm = %id, "endpoint held");
        (true, vm.activity.open.load(Ordering::SeqCst))
    }

    /// Closes a VM's listeners (they are closed when this returns) and ends its
    /// connections; whether it had endpoints here.
    pub async fn close(&self, id: &str) -> bool {
        let Some(vm) = self.vms.lock().expect("vms lock").remove(id) else {
            return false;
        };
        vm.status.send_replace(Status::Closed);
        let ports = std::mem::take(&mut *vm.ports.lock().expect("ports lock"));
        for (_, port) in ports {
            port.accept.abort();
            // The listener is dropped with the task: once the abort is seen, it is closed.
            let _ = port.accept.await;
        }
        tracing::info!(vm = %id, "endpoints closed");
        true
    }

    /// Makes the endpoints exactly `endpoints`; returns each one's port or error.
    pub async fn sync(&self, endpoints: &[EndpointSpec]) -> Vec<Result<u16, String>> {
        let wanted: HashMap<&str, Vec<&str>> =
            endpoints.iter().fold(HashMap::new(), |mut map, spec| {
                map.entry(spec.vm.as_str())
                    .or_default()
                    .push(spec.name.as_str());
                map
            });
        let known: Vec<Arc<Vm>> = self
            .vms
            .lock()
            .expect("vms lock")
            .values()
            .cloned()
            .collect();
        for vm in known {
            match wanted.get(vm.id.as_str()) {
                None => {
                    self.close(&vm.id).await;
                }
                Some(names) => {
                    let unwanted: Vec<Port> = {
                        let mut ports = vm.ports.lock().expect("ports lock");
                        let gone: Vec<String> = ports
                            .keys()
                            .filter(|name| !names.contains(&name.as_str()))
                            .cloned()
                            .collect();
                        gone.iter().filter_map(|name| ports.remove(name)).collect()
                    };
                    for port in unwanted {
                        port.accept.abort();
                        let _ = port.accept.await;
                    }
                }
            }
        }
        let mut results = Vec::with_capacity(endpoints.len());
        for spec in endpoints {
            results.push(self.open(spec).await.map_err(|err| err.to_string()));
        }
        results
    }

    pub fn activity(&self) -> BTreeMap<String, VmActivity> {
        self.vms
            .lock()
            .expect("vms lock")
            .values()
            .map(|vm| (vm.id.clone(), vm.activity.view()))
            .collect()
    }
}

async fn accept_loop(
    listener: TcpListener,
    vm: Arc<Vm>,
    name: String,
    server_url: Arc<Mutex<ServerAddr>>,
    first_bytes_wait: Duration,
) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(serve(
                    client,
                    vm.clone(),
                    name.clone(),
                    server_url.clone(),
                    first_bytes_wait,
                ));
            }
            Err(err) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(vm = %vm.id, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Counts a connection as open while it lives. Made under the VM's admission gate.
struct OpenConnection<'a>(&'a Activity);

impl<'a> OpenConnection<'a> {
    fn new(activity: &'a Activity) -> Self {
        activity.open.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        OpenConnection(activity)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

/// What became of a silent client of a VM that does not run.
enum FirstBytes {
    /// It sent bytes (they wait unread in the socket).
    Arrived,
    /// The VM's state changed (woken by another connection, or closed): look again.
    StateChanged,
    /// It closed, failed, or sent nothing in time.
    Gone,
}

/// Waits until `client` sends its first bytes (without reading them), the VM's state
/// changes, or `deadline` passes.
async fn first_bytes(
    client: &TcpStream,
    status: &mut watch::Receiver<Status>,
    deadline: tokio::time::Instant,
) -> FirstBytes {
    let mut byte = [0u8; 1];
    tokio::select! {
        peeked = client.peek(&mut byte) => match peeked {
            Ok(n) if n > 0 => FirstBytes::Arrived,
            _ => FirstBytes::Gone,
        },
        changed = status.changed() => match changed {
            Ok(()) => FirstBytes::StateChanged,
            Err(_) => FirstBytes::Gone,
        },
        _ = tokio::time::sleep_until(deadline) => FirstBytes::Gone,
    }
}

/// Counts `client`'s connection as open, once it may ask for a wake: at once on an
/// `on-connect` port or while the VM runs; on an `on-data` port of a VM that does not run,
/// once the client sent bytes. `None`: the client went away (or sent nothing in time, or
/// the VM's endpoints closed) and the VM was not woken.
async fn admit<'a>(
    client: &TcpStream,
    vm: &'a Vm,
    name: &str,
    status: &mut watch::Receiver<Status>,
    first_bytes_wait: Duration,
) -> Option<OpenConnection<'a>> {
    let mut data_seen = vm.wake_on(name) == WakeOn::OnConnect;
    let deadline = tokio::time::Instant::now() + first_bytes_wait;
    loop {
        let current = *status.borrow_and_update();
        match current {
            Status::Closed => return None,
            Status::Held => {
                if status.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            Status::Asleep if !data_seen => match first_bytes(client, status, deadline).await {
                FirstBytes::Arrived => data_seen = true,
                FirstBytes::StateChanged => continue,
                FirstBytes::Gone => {
                    tracing::debug!(vm = %vm.id, name, "closed without data: vm not woken");
                    return None;
                }
            },
            Status::Asleep | Status::Active => {}
        }
        let _gate = vm.gate.lock().expect("gate lock");
        // Put to sleep meanwhile: a silent client waits for its bytes again.
        if !data_seen && *vm.status.borrow() == Status::Asleep {
            continue;
        }
        // Held meanwhile: wait for the release.
        if *vm.status.borrow() == Status::Held {
            continue;
        }
        return Some(OpenConnection::new(&vm.activity));
    }
}

/// One client connection: wait until the VM runs (waking it), then splice.
async fn serve(
    client: TcpStream,
    vm: Arc<Vm>,
    name: String,
    server_url: Arc<Mutex<ServerAddr>>,
    first_bytes_wait: Duration,
) {
    // Counted, but not as a use of the VM until it is admitted: a bare connect to a VM
    // that does not run restarts none of its timers.
    vm.activity.connections.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let mut status = vm.status.subscribe();
    let Some(_open) = admit(&client, &vm, &name, &mut status, first_bytes_wait).await else {
        return;
    };
    let Some(upstream) = reach(&vm, &name, &mut status, &server_url).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let mut client = Counted {
        stream: client,
        activity: &vm.activity,
    };
    let mut upstream = upstream;
    tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, SPLICE_BUFFER, SPLICE_BUFFER) => {
            if let Err(err) = result {
                tracing::debug!(vm = %vm.id, error = %err, "connection ended");
            }
        }
        _ = status.wait_for(|s| *s == Status::Closed) => {}
    }
}

/// A connection to the VM's current address, once it runs; `None` when the VM is closed,
/// cannot be woken, or does not answer.
async fn reach(
    vm: &Vm,
    name: &str,
    status: &mut watch::Receiver<Status>,
    server_url: &Mutex<ServerAddr>,
) -> Option<TcpStream> {
    let deadline = tokio::time::Instant::now() + WAKE_WAIT;
    let mut attempts = 0;
    loop {
        let current = *status.borrow_and_update();
        match current {
            Status::Closed => return None,
            Status::Held => {
                if status.changed().await.is_err() {
                    return None;
                }
            }
            Status::Asleep => {
                let woken = {
                    let _one_at_a_time = vm.wake.lock().await;
                    if *vm.status.borrow() != Status::Asleep {
                        continue; // another connection woke it meanwhile
                    }
                    let server = server_url.lock().expect("url lock").clone();
                    wake::wake(&server.url, server.token.as_deref(), &vm.id, deadline).await
                };
                match woken {
                    Ok(()) => {
                        vm.status.send_if_modified(|s| {
                            let asleep = *s == Status::Asleep;
                            if asleep {
                                *s = Status::Active;
                            }
                            asleep
                        });
                    }
                    Err(err) => {
                        tracing::warn!(vm = %vm.id, error = %err, "cannot wake vm for a connection");
                        return None;
                    }
                }
            }
            Status::Active => {
                let target = vm.target(name)?;
                match TcpStream::connect(target).await {
                    Ok(stream) => return Some(stream),
                    Err(err) => {
                        attempts += 1;
                        if attempts >= CONNECT_ATTEMPTS {
                            tracing::warn!(vm = %vm.id, %target, error = %err, "cannot reach vm");
                            return None;
                        }
                        // Wait a moment, or less if the VM's state changes.
                        let _ = tokio::time::timeout(CONNECT_RETRY, status.changed()).await;
                    }
                }
            }
        }
    }
}

/// The client side of a connection, counting bytes and activity.
struct Counted<'a> {
    stream: TcpStream,
    activity: &'a Activity,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity
                .bytes_in
                .fetch_add(read as u64, Ordering::Relaxed);
            self.activity.touch_bytes();
        }
        polled
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled
            && written > 0
        {
            self.activity
                .bytes_out
                .fetch_add(written as u64, Ordering::Relaxed);
            self.activity.touch_bytes();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
