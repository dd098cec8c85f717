//! Talking to one guest of the local host: host ports for its services, its ready
//! criterion, identity, slicing, CPU priority, and what its agent reported when something
//! failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hangar_core::{ReadySpec, Service};
use hangar_vmm::{Agent, PortForward};

use super::LocalHost;
use crate::guest::new_identity;
use crate::{HostError, ready};

impl LocalHost {
    /// One free host port per service port, on the endpoint address: the VM's own port
    /// forwards (its direct endpoints).
    pub(super) fn allocate_ports(
        &self,
        service: &Service,
    ) -> Result<(Vec<PortForward>, BTreeMap<String, SocketAddr>), HostError> {
        let ports: Vec<(String, u16)> = service
            .ports
            .iter()
            .map(|port| (port.name.clone(), port.guest))
            .collect();
        self.allocate_guest_ports(&ports)
    }

    /// One free host port per (name, guest port), on the endpoint address.
    pub(super) fn allocate_guest_ports(
        &self,
        ports: &[(String, u16)],
    ) -> Result<(Vec<PortForward>, BTreeMap<String, SocketAddr>), HostError> {
        // Hold every probe listener until all are chosen, so no port is picked twice.
        let listeners = ports
            .iter()
            .map(|_| std::net::TcpListener::bind((self.config.endpoint_host, 0)))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(HostError::Ports)?;
        let mut forwards = Vec::new();
        let mut endpoints = BTreeMap::new();
        for ((name, guest_port), listener) in ports.iter().zip(&listeners) {
            let addr = listener.local_addr().map_err(HostError::Ports)?;
            forwards.push(PortForward {
                host: addr.ip(),
                host_port: addr.port(),
                guest_port: *guest_port,
            });
            endpoints.insert(name.clone(), addr);
        }
        Ok((forwards, endpoints))
    }

    /// Waits for the service's ready criterion on this VM; the error explains what failed.
    pub(super) async fn wait_ready(
        &self,
        vm_id: &str,
        pid: Option<u32>,
        service: &Service,
        ready: &ReadySpec,
        endpoints: &BTreeMap<String, SocketAddr>,
        agent: &Agent,
    ) -> Result<(), HostError> {
        let console_log = self.hv.console_log(vm_id);
        let target = ready::ProbeTarget {
            endpoints,
            agent,
            console_log: console_log.as_deref(),
            qemu_pid: pid,
        };
        ready::wait_ready(service, ready, &target)
            .await
            .map(drop)
            .map_err(|not_ready| HostError::NotReady(diagnose(vm_id, agent, &not_ready.0)))
    }

    /// Resumes a VM that was paused and sends it a fresh identity.
    pub(super) async fn reidentify(
        &self,
        id: &str,
        agent: &Agent,
        hostname: &str,
        timeout: Duration,
    ) -> Result<(), HostError> {
        let reply = agent.reidentify(new_identity(hostname), timeout).await?;
        tracing::debug!(vm = %id, guest = %reply.stdout, "identity applied");
        if !reply.ok {
            return Err(HostError::Guest(format!(
                "re-identification failed: {}",
                reply.error.unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Slices a superset VM down: the balloon takes the memory above `memory`, and vCPUs
    /// beyond `vcpus` go offline in the guest.
    pub(super) async fn slice(
        &self,
        id: &str,
        agent: &Agent,
        size: (u32, u32),
        to: (u32, u32),
    ) -> Result<(u32, u32), HostError> {
        let memory = size.1.min(to.1);
        if memory < size.1 {
            self.hv.set_memory(id, memory).await?;
        }
        if to.0 < size.0 {
            let script = format!(
                "for c in $(seq {} {}); do echo 0 > /sys/devices/system/cpu/cpu$c/online; done",
                to.0,
                size.0 - 1
            );
            let reply = agent
                .exec(
                    vec!["sh".into(), "-c".into(), script],
                    Duration::from_secs(10),
                )
                .await?;
            if !reply.ok {
                return Err(HostError::Guest(format!(
                    "taking vCPUs offline failed: {}",
                    reply.stderr.trim()
                )));
            }
        }
        Ok((to.0.min(size.0), memory))
    }

    /// A pool VM being handed out runs at normal CPU priority again (best effort).
    pub(super) async fn to_foreground(&self, id: &str) {
        if let Err(err) = self.hv.set_foreground(id).await {
            tracing::debug!(vm = %id, error = %err, "cannot raise vm priority");
        }
    }
}

/// `reason`, with what the guest reported that explains it (service exits, failures).
pub(super) fn diagnose(vm_id: &str, agent: &Agent, reason: &str) -> String {
    let mut text = reason.to_owned();
    for event in agent.recent_events() {
        match event {
            hangar_proto::GuestMessage::ServiceExited { name, code, signal } => {
                text.push_str(&format!(
                    "; service process {name} exited ({})",
                    match (code, signal) {
                        (Some(code), _) => format!("code {code}"),
                        (_, Some(signal)) => format!("signal {signal}"),
                        _ => "unknown status".into(),
                    }
                ));
            }
            hangar_proto::GuestMessage::Failed { stage, error } => {
                text.push_str(&format!("; guest failed at {stage}: {error}"));
            }
            _ => {}
        }
    }
    tracing::debug!(vm = %vm_id, reason = %text, "vm not ready");
    text
}
/// How long [`settle`] samples the VM's CPU use at a time, and waits at most.
pub(super) struct Settle {
    window: Duration,
    at_most: Duration,
}

impl Settle {
    /// A booted VM: its boot leaves deferred work that can take seconds to quiet down.
    pub(super) const BOOTED: Settle = Settle {
        window: Duration::from_millis(250),
        at_most: Duration::from_secs(3),
    };
    /// A clone of a template: the template settled before its snapshot, so the clone
    /// resumes with no boot tail; what is left is the work of its new identity and ready
    /// check, which a short window sees end.
    pub(super) const CLONED: Settle = Settle {
        window: Duration::from_millis(50),
        at_most: Duration::from_secs(1),
    };
}

/// Before a pool VM is paused, lets the guest finish the work its boot left behind
/// (deferred kernel work, journal commits, service start-up tails): otherwise that work runs
/// right after the resume that hands it out, in the grant's critical path. Waits until the
/// VM's process uses under [`SETTLED_PERCENT`] of a host CPU over one window of `how`, for
/// at most `how.at_most`; a guest that never settles is paused anyway.
pub(super) async fn settle(vm_id: &str, pid: u32, how: &Settle) {
    let started = std::time::Instant::now();
    while started.elapsed() < how.at_most {
        match ready::cpu_percent(pid, how.window).await {
            Ok(used) if used < SETTLED_PERCENT => {
                tracing::debug!(vm = %vm_id, ms = started.elapsed().as_millis() as u64, used, "pool vm settled");
                return;
            }
            Ok(_) => {}
            Err(_) => return, // the process is gone; the pause reports it
        }
    }
    tracing::debug!(vm = %vm_id, "pool vm did not settle; pausing it anyway");
}

const SETTLED_PERCENT: f64 = 10.0;

/// Gives the guest the names of its allowed egress targets that have one (`10.0.2.101
/// db.internal` appended to its `/etc/hosts`): the guest reaches each at its own address
/// (`hangar_core::egress::guest_address`), not where the host does. Nothing to do for a
/// policy without named targets.
pub(super) async fn name_egress_targets(
    agent: &Agent,
    policy: &hangar_core::EgressPolicy,
) -> Result<(), String> {
    let lines: Vec<String> = policy
        .forwards()
        .iter()
        .filter_map(|forward| Some(format!("{} {}", forward.guest, forward.target.name()?)))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    // Names and addresses are letters, digits, '-' and '.' (checked when the policy was
    // parsed): nothing in them needs quoting.
    let script = format!(
        "printf '%s\\n' {} >> /etc/hosts",
        lines
            .iter()
            .map(|line| format!("'{line}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let argv = vec!["sh".to_owned(), "-c".to_owned(), script];
    ready::exec_check(agent, &argv, Duration::from_secs(10))
        .await
        .map_err(|err| format!("writing the egress targets' names to /etc/hosts: {}", err.0))
}
