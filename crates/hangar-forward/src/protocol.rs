//! The control protocol between the server and the forwarder: one JSON object per line
//! over the unix socket `forwarder.sock`, each request answered by one reply line, in
//! order.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hangar_core::WakeOn;
use serde::{Deserialize, Serialize};

/// One stable endpoint: a port the forwarder listens on for a VM, and where it forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub vm: String,
    /// The service port's name (`http`, ...); a VM has one endpoint per name.
    pub name: String,
    /// Where to listen; port 0 lets the forwarder choose (the reply names it).
    pub listen: SocketAddr,
    /// The VM's current (internal) address for this port.
    pub target: SocketAddr,
    /// Whether the VM runs: connections are forwarded at once. When not, a connection
    /// wakes it through the server first.
    pub active: bool,
    /// When a connection to this endpoint wakes the VM: once the client sends bytes (the
    /// default), or as soon as it connects.
    #[serde(default)]
    pub wake: WakeOn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and identity.
    Ping,
    /// Listens on `listen` (unless this VM's endpoint of that name already does: then only
    /// its target and state change) and forwards to `target`. Answers [`Reply::Port`].
    Open(EndpointSpec),
    /// Marks a VM active (forward at once) or not (wake through the server first).
    /// Answers [`Reply::Done`] with whether the VM was known.
    SetActive { vm: String, active: bool },
    /// Closes a VM's listeners and its open connections. Answers [`Reply::Done`].
    Close { vm: String },
    /// The complete desired state: every endpoint not listed is closed, every listed one
    /// opened (on its given port). Also sets the server URL wake requests go to. Answers
    /// [`Reply::Synced`].
    Sync {
        server_url: String,
        endpoints: Vec<EndpointSpec>,
    },
    /// Connection activity per VM. Answers [`Reply::Activity`].
    Activity,
    /// The lifecycle is about to put a VM to sleep (or archive or delete it): marks it
    /// asleep (a connection from then on waits for a wake) unless a connection to it is
    /// open, atomically with respect to connections being accepted. Answers
    /// [`Reply::Quiesced`]; a VM without endpoints here counts as idle.
    Quiesce { vm: String },
    /// Holds a VM's new connections (a live migration's switchover): they are accepted
    /// and wait, without asking for a wake, until the VM is marked active again
    /// ([`Request::Open`] with its new target, or [`Request::SetActive`]); connections
    /// already forwarded go on. Answers [`Reply::Held`] with how many are open.
    Hold { vm: String },
    /// Closes everything and exits. Answers [`Reply::Done`] first.
    Shutdown,
}

/// Connection activity of one VM's endpoints since the forwarder started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmActivity {
    /// When a connection last opened, closed or moved bytes (ms since the Unix epoch; 0:
    /// never).
    pub last_active_ms: u64,
    /// Connections open now (forwarded, or waiting for the VM to wake).
    pub open: u64,
    /// When bytes last moved either way (ms since the Unix epoch; 0: never).
    #[serde(default)]
    pub last_byte_ms: u64,
    /// Connections accepted in all.
    pub connections: u64,
    /// Bytes from clients to the VM.
    pub bytes_in: u64,
    /// Bytes from the VM to clients.
    pub bytes_out: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        pid: u32,
        /// VMs with endpoints.
        vms: usize,
    },
    Port {
        port: u16,
    },
    Done {
        known: bool,
    },
    /// Per endpoint of a [`Request::Sync`], in order: the port, or why it could not listen.
    Synced {
        ports: Vec<Result<u16, String>>,
    },
    Activity {
        vms: BTreeMap<String, VmActivity>,
    },
    /// Answer to [`Request::Quiesce`]: `asleep` when the VM is now marked asleep (no
    /// connection was open), else `open` connections keep it in use.
    Quiesced {
        asleep: bool,
        open: u64,
    },
    /// Answer to [`Request::Hold`]: whether the VM has endpoints here, and the
    /// connections forwarded to it that are still open.
    Held {
        known: bool,
        open: u64,
    },
    Error {
        message: String,
    },
}
