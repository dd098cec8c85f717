//! Stable endpoints, the server's side: every VM endpoint a client is given is a listener of
//! hangar's forwarder (see `hangar_forward`), which forwards to the VM's own port forward
//! (its direct endpoint) while the VM runs, and wakes it through the REST API when a
//! connection comes while it sleeps or is archived.
//!
//! The server tells the forwarder what changes: endpoints opened when a VM is made,
//! marked asleep before a VM pauses or is archived and active once it woke, closed when it
//! is deleted or fails. At start-up (and whenever the forwarder had to be started again)
//! the whole desired set, computed from the store by [`desired_endpoints`], replaces what
//! the forwarder holds. Each change is one round trip on a unix socket.
//!
//! Activity: the monitor loop polls the forwarder's per-VM connection activity and hands
//! each VM's latest activity to [`Manager::note_endpoint_use`].
//!
//! In use while connected: before the lifecycle loop puts a VM to sleep, archives or
//! deletes it, [`Manager::quiesce_endpoints`] has the forwarder mark the VM asleep only if
//! no connection to it is open (atomically with connections being admitted); a VM with
//! open connections is left as it is (issue 13, finding 6). Each port wakes its VM on the
//! client's first bytes or on connect, as the catalog says (`wake`, finding 7).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use hangar_core::catalog::Port;
use hangar_core::{Catalog, Service, VmState, WakeOn};
use hangar_forward::{Control, EndpointSpec, ForwardError, Forwarder, Reply, Request};
use hangar_store::VmRecord;

use crate::api::error::error_chain;

/// Why the forwarder did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The forwarder could not be reached or refused.
    #[error("forwarder")]
    Forwarder(#[source] ForwardError),
    /// A stable endpoint could not be opened.
    #[error("stable endpoint")]
    Open(#[source] ForwardError),
    #[error("unexpected forwarder reply {0}")]
    UnexpectedReply(String),
}
use crate::manager::Manager;

/// Where the forwarder runs.
pub enum ForwarderKind {
    /// A process of its own (`command` + `--data-dir` + `--server`), started when none
    /// answers on the data dir's socket: endpoints keep answering while the server is down.
    Process {
        data_dir: PathBuf,
        command: Vec<OsString>,
    },
    /// Inside the server (tests, embedding): endpoints close with the server.
    InProcess(Forwarder),
}

/// The server's handle on the forwarder.
pub struct StableEndpoints {
    kind: ForwarderKind,
    /// The REST API's URL, where the forwarder asks for wakes.
    server_url: String,
    control: tokio::sync::Mutex<Option<std::sync::Arc<Control>>>,
    /// Per VM, the latest activity already handed on.
    seen: Mutex<HashMap<String, u64>>,
}

impl StableEndpoints {
    pub fn new(kind: ForwarderKind, server_url: &str) -> StableEndpoints {
        StableEndpoints {
            kind,
            server_url: server_url.to_owned(),
            control: tokio::sync::Mutex::default(),
            seen: Mutex::default(),
        }
    }

    /// The control connection, starting the forwarder when none answers; `true` when it
    /// was started now (it holds no endpoints yet).
    async fn control(&self) -> Result<(std::sync::Arc<Control>, bool), ForwardError> {
        let mut guard = self.control.lock().await;
        if let Some(control) = guard.as_ref() {
            return Ok((control.clone(), false));
        }
        let ForwarderKind::Process { data_dir, command } = &self.kind else {
            unreachable!("in-process forwarders need no connection");
        };
        let (control, started) =
            hangar_forward::connect_or_start(data_dir, command, &self.server_url).await?;
        let control = std::sync::Arc::new(control);
        *guard = Some(control.clone());
        Ok((control, started))
    }

    /// One request. A forwarder that cannot be reached is started again and given the
    /// whole desired state (`desired`) before the request is retried.
    async fn call<F: Future<Output = Vec<EndpointSpec>>>(
        &self,
        request: &Request,
        desired: impl Fn() -> F,
    ) -> Result<Reply, ForwardError> {
        if let ForwarderKind::InProcess(forwarder) = &self.kind {
            return match forwarder.handle(request.clone()).await {
                Reply::Error { message } => Err(ForwardError::Refused(message)),
                reply => Ok(reply),
            };
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (control, started) = self.control().await?;
            if started {
                tracing::warn!("forwarder started again; giving it every endpoint");
                control.call(&self.sync_request(desired().await)).await?;
            }
            match control.call(request).await {
                Err(ForwardError::Io(err)) if attempt < 2 => {
                    tracing::warn!(error = %err, "forwarder unreachable");
                    *self.control.lock().await = None;
                }
                other => return other,
            }
        }
    }

    fn sync_request(&self, endpoints: Vec<EndpointSpec>) -> Request {
        Request::Sync {
            server_url: self.server_url.clone(),
            endpoints,
        }
    }
}

/// Whether the lifecycle may go on with a VM's endpoints ([`Manager::quiesce_endpoints`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointUse {
    /// No connection is open; the endpoints now wait for a wake.
    Idle,
    /// This many connections are open: the VM is in use.
    Busy { open: u64 },
}

/// When a connection to port `name` wakes its VM: as the first of `ports` with that name
/// says, else on data.
pub fn wake_on<'a>(ports: impl IntoIterator<Item = &'a Port>, name: &str) -> WakeOn {
    ports
        .into_iter()
        .find(|port| port.name == name)
        .map(|port| port.wake)
        .unwrap_or_default()
}

/// The endpoints the forwarder should hold for these VMs: every endpoint of a VM that is
/// not deleted or failed, forwarding to its direct endpoint, active unless the VM sleeps
/// or is archived, waking it as its service's port says in `catalog`. VMs whose endpoints
/// are their direct endpoints (made before stable endpoints, or without a forwarder) have
/// none.
pub fn desired_endpoints(vms: &[VmRecord], catalog: &Catalog) -> Vec<EndpointSpec> {
    let mut specs = Vec::new();
    for vm in vms {
        let active = match vm.state {
            VmState::Deleted | VmState::Failed | VmState::Lost => continue,
            VmState::Sleeping | VmState::Archived => false,
            VmState::Creating | VmState::Booting | VmState::Ready | VmState::Active => true,
        };
        for (name, stable) in &vm.endpoints {
            let Some(direct) = vm.direct_endpoints.get(name) else {
                continue;
            };
            if stable == direct {
                continue;
            }
            let (Ok(listen), Ok(target)) = (stable.parse(), direct.parse()) else {
                tracing::warn!(vm = %vm.id, name, "unparsable endpoint in the store");
                continue;
            };
            let ports = vm
                .services
                .iter()
                .filter_map(|service| catalog.get(service))
                .flat_map(|service| &service.ports);
            specs.push(EndpointSpec {
                vm: vm.id.clone(),
                name: name.clone(),
                listen,
                target,
                active,
                wake: wake_on(ports, name),
            });
        }
    }
    specs
}

impl Manager {
    async fn desired_from_store(&self) -> Vec<EndpointSpec> {
        match self.store.vms(false).await {
            Ok(vms) => desired_endpoints(&vms, &self.catalog),
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "cannot read vms for the forwarder");
                Vec::new()
            }
        }
    }

    async fn endpoints_call(
        &self,
        endpoints: &StableEndpoints,
        request: &Request,
    ) -> Result<Reply, ForwardError> {
        endpoints.call(request, || self.desired_from_store()).await
    }

    /// Stable endpoints for a VM's direct endpoints (one listener each, chosen by the
    /// forwarder, forwarding to the direct endpoint, waking the VM as `service`'s port
    /// says). Without a forwarder, the direct endpoints themselves.
    pub(crate) async fn open_endpoints(
        &self,
        vm_id: &str,
        service: Option<&Service>,
        direct: &BTreeMap<String, SocketAddr>,
    ) -> Result<BTreeMap<String, SocketAddr>, EndpointError> {
        let Some(endpoints) = self.endpoints.get() else {
            return Ok(direct.clone());
        };
        let mut stable = BTreeMap::new();
        for (name, target) in direct {
            let request = Request::Open(EndpointSpec {
                vm: vm_id.to_owned(),
                name: name.clone(),
                listen: SocketAddr::new(self.config.endpoint_host, 0),
                target: *target,
                active: true,
                wake: wake_on(service.iter().flat_map(|s| &s.ports), name),
            });
            match self.endpoints_call(endpoints, &request).await {
                Ok(Reply::Port { port }) => {
                    stable.insert(
                        name.clone(),
                        SocketAddr::new(self.config.endpoint_host, port),
                    );
                }
                Ok(other) => {
                    self.close_endpoints(vm_id).await;
                    return Err(EndpointError::UnexpectedReply(format!("{other:?}")));
                }
                Err(err) => {
                    self.close_endpoints(vm_id).await;
                    return Err(EndpointError::Open(err));
                }
            }
        }
        Ok(stable)
    }

    /// Points VM `vm`'s stable endpoints at its direct endpoints as recorded now (after it
    /// moved to another host), each listening where it did, `active` or waking the VM on
    /// a connection. Best effort, logged: a forwarder that missed it gets the store's
    /// state at its next sync.
    pub(crate) async fn repoint_endpoints(&self, vm: &VmRecord, active: bool) {
        let Some(endpoints) = self.endpoints.get() else {
            return;
        };
        let ports = vm
            .services
            .iter()
            .filter_map(|service| self.catalog.get(service))
            .flat_map(|service| &service.ports)
            .collect::<Vec<_>>();
        for (name, stable) in &vm.endpoints {
            let Some(direct) = vm.direct_endpoints.get(name) else {
                continue;
            };
            let (Ok(listen), Ok(target)) = (stable.parse(), direct.parse()) else {
                tracing::warn!(vm = %vm.id, name, "unparsable endpoint in the store");
                continue;
            };
            if listen == target {
                continue;
            }
            let request = Request::Open(EndpointSpec {
                vm: vm.id.clone(),
                name: name.clone(),
                listen,
                target,
                active,
                wake: wake_on(ports.iter().copied(), name),
            });
            if let Err(err) = self.endpoints_call(endpoints, &request).await {
                tracing::warn!(vm = %vm.id, name, error = %error_chain(&err), "cannot re-point a stable endpoint");
            }
        }
    }

    /// Tells the forwarder whether a VM runs (connections go straight through) or not
    /// (a connection wakes it first). Best effort: a forwarder that missed it learns the
    /// state at its next sync, and a wake of an active VM is harmless.
    pub(crate) async fn set_endpoints_active(&self, vm_id: &str, active: bool) {
        let Some(endpoints) = self.endpoints.get() else {
            return;
        };
        let request = Request::SetActive {
            vm: vm_id.to_owned(),
            active,
        };
        if let Err(err) = self.endpoints_call(endpoints, &request).await {
            tracing::warn!(vm = %vm_id, active, error = %error_chain(&err), "cannot update stable endpoints");
        }
    }

    /// Before the lifecycle puts VM `vm_id` to sleep, archives or deletes it: marks its
    /// endpoints asleep unless a connection to it is open (then [`EndpointUse::Busy`] and
    /// nothing changed). A connection made after [`EndpointUse::Idle`] waits for a wake,
    /// which waits for the caller's operation (it holds the VM's operation lock). Without
    /// a forwarder, or when it cannot be reached (then no connection flows through it),
    /// `Idle`.
    pub(crate) async fn quiesce_endpoints(&self, vm_id: &str) -> EndpointUse {
        let Some(endpoints) = self.endpoints.get() else {
            return EndpointUse::Idle;
        };
        let request = Request::Quiesce {
            vm: vm_id.to_owned(),
        };
        match self.endpoints_call(endpoints, &request).await {
            Ok(Reply::Quiesced {
                asleep: false,
                open,
            }) => EndpointUse::Busy { open },
            Ok(Reply::Quiesced { asleep: true, .. }) => EndpointUse::Idle,
            Ok(other) => {
                tracing::warn!(vm = %vm_id, reply = ?other, "unexpected forwarder reply to quiesce");
                EndpointUse::Idle
            }
            Err(err) => {
                tracing::warn!(vm = %vm_id, error = %error_chain(&err), "cannot ask the forwarder whether the vm is in use");
                EndpointUse::Idle
            }
        }
    }

    /// A live migration's switchover: the forwarder holds VM `vm_id`'s new connections
    /// (they wait until its endpoints are re-pointed or marked active); answers how many
    /// connections forwarded before are still open. Without a forwarder, or one that
    /// cannot be reached, [`EndpointUse::Idle`] (nothing flows through it).
    pub(crate) async fn hold_endpoints(&self, vm_id: &str) -> EndpointUse {
        let Some(endpoints) = self.endpoints.get() else {
            return EndpointUse::Idle;
        };
        let request = Request::Hold {
            vm: vm_id.to_owned(),
        };
        match self.endpoints_call(endpoints, &request).await {
            Ok(Reply::Held { open: 0, .. }) => EndpointUse::Idle,
            Ok(Reply::Held { open, .. }) => EndpointUse::Busy { open },
            Ok(other) => {
                tracing::warn!(vm = %vm_id, reply = ?other, "unexpected forwarder reply to hold");
                EndpointUse::Idle
            }
            Err(err) => {
                tracing::warn!(vm = %vm_id, error = %error_chain(&err), "cannot hold the vm's endpoints");
                EndpointUse::Idle
            }
        }
    }

    /// Waits up to `wait` until no connection to VM `vm_id` is open through the forwarder;
    /// whether none is.
    pub(crate) async fn wait_endpoints_idle(&self, vm_id: &str, wait: std::time::Duration) -> bool {
        let Some(endpoints) = self.endpoints.get() else {
            return true;
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            let open = match self.endpoints_call(endpoints, &Request::Activity).await {
                Ok(Reply::Activity { vms }) => vms.get(vm_id).map_or(0, |a| a.open),
                _ => return false,
            };
            if open == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Closes a VM's stable endpoints: no listener is left when this returns (best effort).
    pub(crate) async fn close_endpoints(&self, vm_id: &str) {
        let Some(endpoints) = self.endpoints.get() else {
            return;
        };
        let request = Request::Close {
            vm: vm_id.to_owned(),
        };
        if let Err(err) = self.endpoints_call(endpoints, &request).await {
            tracing::warn!(vm = %vm_id, error = %error_chain(&err), "cannot close stable endpoints");
        }
        endpoints.seen.lock().expect("seen lock").remove(vm_id);
    }

    /// Gives the forwarder the whole desired set from the store (starting it if needed):
    /// endpoints of VMs that are gone are closed, every other one is listening.
    pub async fn sync_endpoints(&self) -> Result<(), EndpointError> {
        let Some(endpoints) = self.endpoints.get() else {
            return Ok(());
        };
        let desired = self.desired_from_store().await;
        let request = endpoints.sync_request(desired.clone());
        let reply = self
            .endpoints_call(endpoints, &request)
            .await
            .map_err(EndpointError::Forwarder)?;
        if let Reply::Synced { ports } = reply {
            for (spec, result) in desired.iter().zip(ports) {
                if let Err(err) = result {
                    tracing::warn!(vm = %spec.vm, endpoint = %spec.listen, error = %err, "cannot listen on a stable endpoint");
                }
            }
        }
        tracing::info!(endpoints = desired.len(), "stable endpoints synced");
        Ok(())
    }

    /// Hands on connection activity the forwarder saw since the last poll: each VM's
    /// latest activity goes to [`Manager::note_endpoint_use`].
    pub async fn poll_endpoint_activity(&self) {
        let Some(endpoints) = self.endpoints.get() else {
            return;
        };
        let vms = match self.endpoints_call(endpoints, &Request::Activity).await {
            Ok(Reply::Activity { vms }) => vms,
            Ok(_) => return,
            Err(err) => {
                tracing::debug!(error = %error_chain(&err), "cannot poll endpoint activity");
                return;
            }
        };
        let mut fresh = Vec::new();
        {
            let mut seen = endpoints.seen.lock().expect("seen lock");
            for (id, activity) in vms {
                let last = seen.entry(id.clone()).or_default();
                if activity.last_active_ms > *last {
                    *last = activity.last_active_ms;
                    fresh.push((id, activity.last_active_ms));
                }
            }
        }
        for (id, at_ms) in fresh {
            self.note_endpoint_use(&id, at_ms).await;
        }
    }

    /// A client used VM `vm_id` through its endpoint at `at_ms` (a connection opened,
    /// closed or moved bytes): the one place endpoint activity enters the VM's record.
    pub async fn note_endpoint_use(&self, vm_id: &str, at_ms: u64) {
        if let Err(err) = self.store.set_last_used(vm_id, at_ms).await {
            tracing::debug!(vm = %vm_id, error = %error_chain(&err), "cannot record endpoint use");
        }
    }
}
