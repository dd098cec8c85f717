//! The host agent: a [`Host`](crate::Host) served over HTTP, so that a control plane on
//! another machine drives it through [`crate::RemoteHost`].
//!
//! - [`router`]: the agent API (`/agent/v1/...`), one route per `Host` method, behind the
//!   farm token.
//! - [`wire`]: what crosses: request bodies, [`wire::WireError`] (the error kinds a caller
//!   acts on survive the trip) and the NDJSON lines of streamed operations.
//! - [`metrics`]: the agent's `GET /metrics` (this machine's facts and VMs), for the farm
//!   token or the agent's metrics token.
//! - [`files`]: files sent with single-range resumes (template files to peers, and the
//!   server's image blobs).
//! - [`run`]: the agent process: a QEMU [`crate::LocalHost`] served, registered with the
//!   control plane and reported every second ([`run::run_agent`]).

pub mod files;
pub mod metrics;
pub mod run;
mod serve;
pub mod wire;

pub use run::{AgentConfig, AgentError, Membership, run_agent};
pub use serve::router;
pub use wire::{ErrorKind, WireError};

#[cfg(test)]
mod metrics_tests;
#[cfg(test)]
mod tests;
