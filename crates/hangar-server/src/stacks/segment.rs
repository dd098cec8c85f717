//! Connecting a member to its stack's private segment: what the member is told (address,
//! MAC, its peers' names, its service's templates rendered with the member's settings, the
//! processes to restart) and the host call that does it.
//!
//! The host side (the segment's switch, the VM's second NIC, hangar-init applying the
//! settings) is `Host::join_segment` of the private-segments work; [`join`] is the one
//! place this concern calls it.

use std::collections::BTreeMap;

use hangar_core::Service;
use hangar_core::stack::{MemberPlan, StackPlan};
use hangar_host::Host;

/// What a member's VM is told when it joins its stack's segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberJoin {
    /// The segment's name (the stack's).
    pub segment: String,
    pub mac: String,
    /// With prefix: `10.213.0.10/24`.
    pub address: String,
    /// Every member's host name and private address, its own included.
    pub hosts: Vec<(String, String)>,
    /// The member service's templates rendered with its settings.
    pub files: Vec<hangar_proto::FileWrite>,
    /// The service's processes to restart once the files are written.
    pub restart: Vec<String>,
}

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
) -> Result<MemberJoin, JoinError> {
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
    Ok(MemberJoin {
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
pub async fn join(host: &dyn Host, vm: &str, join: &MemberJoin) -> Result<(), JoinError> {
    let _ = (host, vm, join);
    // Until `Host::join_segment` lands (private segments), a member is not connected: its
    // peers are not reachable and its settings are the ones it was made with.
    tracing::warn!(vm, segment = %join.segment, "private segments are not available on this build; member not joined");
    Ok(())
}
