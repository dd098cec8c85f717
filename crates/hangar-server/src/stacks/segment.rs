//! Connecting a member to its stack's private segment: what the member is told (address,
//! MAC, its peers' names, its service's templates rendered with the member's settings, the
//! processes to restart) and the host call that does it.
//!
//! The host side (the segment's switch, the VM's second NIC, hangar-init applying the
//! settings) is [`Host::join_segment`]; a member leaves its segment when its VM is
//! destroyed (the switch goes with the last member).

use std::collections::BTreeMap;

use hangar_core::Service;
use hangar_core::stack::{MemberPlan, StackPlan};
use hangar_host::{Host, SegmentJoin};

/// Why a member's settings cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Settings(#[from] hangar_host::guest::GuestConfigError),
    #[error("joining the segment")]
    Host(#[source] hangar_host::HostError),
    #[error("not serving again after its processes restarted: {0}")]
    NotServing(String),
}

/// What member `member` of `plan`, VM `vm` of `service`, is told at join. Its VM was made
/// with the service's default settings (so pools and templates serve it), unless
/// `made_with_settings`; a member with settings of its own gets its templates rendered
/// with them and its processes reloaded (those that declare a reload signal) or restarted.
pub fn member_join(
    plan: &StackPlan,
    member: &MemberPlan,
    service: &Service,
    vm: &str,
    made_with_settings: bool,
) -> Result<SegmentJoin, JoinError> {
    let mut files = Vec::new();
    let mut restart = Vec::new();
    let mut reload = Vec::new();
    if !member.settings.is_empty() && !made_with_settings && !service.templates.is_empty() {
        let settings = hangar_host::guest::settings(service, &member.settings)?;
        files = hangar_host::guest::render_files(service, &settings, vm, vm)?;
        for process in &service.processes {
            match process.reload {
                Some(signal) => reload.push(hangar_proto::ServiceReload {
                    name: process.name.clone(),
                    signal,
                }),
                None => restart.push(process.name.clone()),
            }
        }
    }
    Ok(SegmentJoin {
        segment: plan.name.clone(),
        mac: member.mac.clone(),
        address: member.address_cidr(),
        hosts: plan.hosts(),
        files,
        restart,
        reload,
    })
}

/// Whether a member's VM must be made with its settings: its service has a setting without
/// a default (a pool or template VM could not have been made without it), or settings that
/// reach its processes only as environment variables (no template to render them into).
pub fn needs_settings_at_creation(service: &Service, member: &MemberPlan) -> bool {
    service.settings.values().any(|s| s.default.is_none())
        || (!member.settings.is_empty() && service.templates.is_empty())
}

/// Connects VM `vm` on `host` to its segment as `join` says.
pub async fn join(host: &dyn Host, vm: &str, join: &SegmentJoin) -> Result<(), JoinError> {
    host.join_segment(vm, join).await.map_err(JoinError::Host)
}

/// After a join reloaded or restarted a member's processes: waits (at most the service's ready
/// timeout) until every ready check that probes through an endpoint (`http`, `bytes`,
/// `connect`) passes again on the VM's direct endpoints, so that `up` answers once the
/// member serves with its new settings. Checks inside the guest (`tcp`, `exec`) or of the
/// host process passed at hand-out and are not asked again.
pub async fn serving_again(
    service: &Service,
    direct: &BTreeMap<String, String>,
) -> Result<(), JoinError> {
    use hangar_core::ReadyCheck;
    use hangar_host::ready;
    let deadline = tokio::time::Instant::now() + service.ready.timeout;
    let interval = service
        .ready
        .interval
        .max(std::time::Duration::from_millis(20));
    let addr = |port: &str| -> Result<std::net::SocketAddr, JoinError> {
        direct
            .get(port)
            .and_then(|addr| addr.parse().ok())
            .ok_or_else(|| JoinError::NotServing(format!("port {port} has no endpoint")))
    };
    loop {
        let mut failure = None;
        for check in &service.ready.checks {
            let result = match check {
                ReadyCheck::Http {
                    port,
                    path,
                    status,
                    body_contains,
                } => ready::http_check(addr(port)?, path, *status, body_contains.as_deref()).await,
                ReadyCheck::Bytes { port, send, expect } => {
                    ready::bytes_check(addr(port)?, send.as_bytes(), expect.as_bytes()).await
                }
                ReadyCheck::Connect { port } => ready::connect_check(addr(port)?).await,
                _ => Ok(()),
            };
            if let Err(not_ready) = result {
                failure = Some(not_ready.0);
                break;
            }
        }
        match failure {
            None => return Ok(()),
            Some(why) if tokio::time::Instant::now() + interval >= deadline => {
                return Err(JoinError::NotServing(why));
            }
            Some(_) => tokio::time::sleep(interval).await,
        }
    }
}
