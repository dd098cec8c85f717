//! What crosses between the agent ([`super::router`]) and [`crate::RemoteHost`]: request
//! bodies, the error body, and the NDJSON lines of streamed operations.

use std::collections::HashSet;

use hangar_core::Service;
use serde::{Deserialize, Serialize};

use crate::local::error_chain;
use crate::{ArchiveTier, HostError, LaunchRecord, PreparedVm, ShellPlan, VmPlan};

/// What went wrong, as far as the caller acts on it. Unknown kinds (a newer agent) read as
/// [`ErrorKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// [`HostError::NotReady`]: the VM runs but its ready criterion did not pass.
    NotReady,
    /// [`HostError::TemplatesOff`].
    TemplatesOff,
    /// The VM has no process on the host (`VmmError::NotRunning`); `vm` names it.
    NotRunning,
    /// [`HostError::NoAgent`]: no control channel to the VM's guest.
    NoAgent,
    /// [`HostError::Guest`]: the guest refused or failed a configuration step.
    Guest,
    /// The request carried no token or the wrong one.
    Unauthorized,
    /// The request could not be read (not JSON, wrong shape).
    BadRequest,
    /// The reply could not be read (not JSON, wrong shape, a stream cut short).
    Protocol,
    /// Anything else; the message says what.
    #[serde(other)]
    Other,
}

/// An error as the agent answers it (any non-2xx status, or the `err` line of a stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    /// The error with its sources, `: `-separated.
    pub message: String,
    /// The VM an [`ErrorKind::NotRunning`] is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> WireError {
        WireError {
            kind,
            message: message.into(),
            vm: None,
        }
    }

    /// The error as a caller of `host` sees it: the variants a caller acts on are rebuilt
    /// ([`HostError::NotReady`], [`HostError::TemplatesOff`], [`HostError::NoAgent`],
    /// [`HostError::Guest`], not-running VMs as `HostError::Vmm(VmmError::NotRunning)`),
    /// anything else is [`HostError::Remote`] with the agent's message chain.
    pub fn into_host_error(self, host: &str) -> HostError {
        match (self.kind, self.vm) {
            (ErrorKind::NotReady, _) => HostError::NotReady(self.message),
            (ErrorKind::TemplatesOff, _) => HostError::TemplatesOff,
            (ErrorKind::NoAgent, _) => HostError::NoAgent,
            (ErrorKind::Guest, _) => HostError::Guest(self.message),
            (ErrorKind::NotRunning, Some(vm)) => {
                HostError::Vmm(hangar_vmm::VmmError::NotRunning(vm))
            }
            (kind, _) => HostError::Remote {
                host: host.to_owned(),
                kind,
                message: self.message,
            },
        }
    }
}

impl From<&HostError> for WireError {
    fn from(err: &HostError) -> WireError {
        let message = error_chain(err);
        let (kind, vm) = match err {
            HostError::NotReady(_) => (ErrorKind::NotReady, None),
            HostError::TemplatesOff => (ErrorKind::TemplatesOff, None),
            HostError::NoAgent => (ErrorKind::NoAgent, None),
            HostError::Guest(_) => (ErrorKind::Guest, None),
            HostError::Vmm(hangar_vmm::VmmError::NotRunning(vm)) => {
                (ErrorKind::NotRunning, Some(vm.clone()))
            }
            HostError::Remote { kind, .. } => (*kind, None),
            _ => (ErrorKind::Other, None),
        };
        WireError { kind, message, vm }
    }
}

/// One line of a streamed operation's reply (`application/x-ndjson`): any number of
/// `{"progress":{"stage":..,"percent":..}}`, then one `{"ok":..}` or `{"err":..}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line<T> {
    Progress { stage: String, percent: u8 },
    Ok(T),
    Err(WireError),
}

/// `POST /agent/v1/vms/{id}/make`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MakeBody {
    pub plan: VmPlan,
    pub prepared: PreparedVm,
}

/// `POST /agent/v1/vms/{id}/boot-shell`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BootShellBody {
    pub launch: LaunchRecord,
    pub plan: ShellPlan,
}

/// `POST /agent/v1/vms/{id}/archive`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ArchiveBody {
    pub tier: ArchiveTier,
}

/// `POST /agent/v1/vms/{id}/adopt`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdoptBody {
    pub launch: LaunchRecord,
    pub running: bool,
}

/// `POST /agent/v1/vms/{id}/forwards/close`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CloseForwardsBody {
    pub launch: LaunchRecord,
    pub guest_ports: Vec<u16>,
}

/// `POST /agent/v1/vms/{id}/migrate/incoming`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MigrateIncomingBody {
    pub prepared: PreparedVm,
    pub source: LaunchRecord,
}

/// `POST /agent/v1/vms/{id}/migrate/switchover`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SwitchoverBody {
    pub downtime_ms: u64,
}

/// `POST /agent/v1/leftovers/remove`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LeftoversBody {
    pub keep: HashSet<String>,
}

/// `POST /agent/v1/templates/list`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TemplatesBody {
    pub services: Vec<Service>,
}

/// `GET /agent/v1/healthz`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub name: String,
}

/// `POST /agent/v1/templates/pull`: install `service`'s template from a peer's bundle.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullTemplateBody {
    pub service: Service,
    pub bundle: crate::TemplateBundle,
    pub from: crate::PeerSource,
}

/// The console route's header: where the body's bytes start in the console's output.
pub const CONSOLE_OFFSET: &str = "x-console-offset";

/// The console route's header: how much output the console holds.
pub const CONSOLE_SIZE: &str = "x-console-size";

/// The most console bytes one call answers.
pub const CONSOLE_MAX: u32 = 1 << 20;

/// `GET /agent/v1/vms/{id}/migrate/window`: how long until a switchover asked for would
/// start ([`crate::Host::migrate_window`]), in microseconds; `null`: not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationWindow {
    pub next_us: Option<u64>,
}
