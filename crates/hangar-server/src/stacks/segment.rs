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
    #[error("template {path}: {reason}")]
    Template { path: String, reason: String },
    #[error("joining the segment")]
    Host(#[source] hangar_host::HostError),
}

/// What member `member` of `plan`, VM `vm` of `service`, is told at join. Its VM was made
/// with the service's default settings (so pools and templates serve it), unless
/// `made_with_settings`; a member with settings of its own gets its templates rendered
/// with them and its processes restarted.
pub fn member_join(
    plan: &StackPlan,
    member: &MemberPlan,
    service: &Service,
    vm: &str,
    made_with_settings: bool,
) -> Result<SegmentJoin, JoinError> {
    let mut files = Vec::new();
    let mut restart = Vec::new();
    if !member.settings.is_empty() && !made_with_settings && !service.templates.is_empty() {
        let mut values: BTreeMap<String, String> =
            hangar_host::guest::settings(service, &member.settings)?;
        values.insert("hostname".into(), vm.to_owned());
        values.insert("vm".into(), vm.to_owned());
        for (path, template) in &service.templates {
            let contents = hangar_core::components::render_template(&template.content, &values)
                .map_err(|reason| JoinError::Template {
                    path: path.clone(),
                    reason,
                })?;
            files.push(hangar_proto::FileWrite {
                path: path.clone(),
                contents,
                mode: template.mode,
            });
        }
        restart = service.processes.iter().map(|p| p.name.clone()).collect();
    }
    Ok(SegmentJoin {
        segment: plan.name.clone(),
        mac: member.mac.clone(),
        address: member.address_cidr(),
        hosts: plan.hosts(),
        files,
        restart,
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
