//! Stable endpoints: hangar owns the listening socket of every VM endpoint and forwards
//! each connection to the VM's current (internal) address, so that the address a client got
//! stays valid while the VM sleeps, is archived and wakes again. A connection to a VM that
//! does not run is held (its bytes wait unread in the socket), the server is asked to wake
//! the VM, and the connection is forwarded once it runs: no bytes are lost.
//!
//! - [`forwarder`]: the listeners, splicing and waking ([`Forwarder`]).
//! - [`protocol`]: the control messages the server sends it over a unix socket.
//! - [`control`]: the server's end of that socket ([`Control`]).
//! - [`process`]: the forwarder as a long-lived process of its own (`hangar forwarder`), so
//!   that endpoints keep answering while the server is down; one per data dir.
//! - [`wake`]: how the forwarder asks the server to wake a VM (REST, retried).

pub mod control;
pub mod forwarder;
pub mod process;
pub mod protocol;
pub mod wake;

pub use control::Control;
pub use forwarder::Forwarder;
pub use process::{ForwarderPaths, connect_or_start, run};
pub use protocol::{EndpointSpec, Reply, Request, VmActivity};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("forwarder control socket")]
    Io(#[source] std::io::Error),
    #[error("malformed control message")]
    Json(#[source] serde_json::Error),
    #[error("the forwarder refused: {0}")]
    Refused(String),
    #[error("another forwarder runs for data dir {0}")]
    AlreadyRunning(String),
    #[error("cannot start the forwarder: {0}")]
    Start(String),
}

#[cfg(test)]
mod tests;
