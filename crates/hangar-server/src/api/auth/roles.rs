//! Who may call what: one table, read in a sitting.
//!
//! | need | who passes |
//! |---|---|
//! | `Open` | anyone, no token (`/healthz`, and signing in: `POST /v1/session`) |
//! | `Role(access)` | every user's token |
//! | `Role(provisioner)` | provisioners and admins |
//! | `Role(admin)` | admins |
//! | `Farm` | the farm token (agents), or an admin |
//! | `Metrics` | the metrics token (a Prometheus scraper), or an admin |
//!
//! Ownership, on top of the table (checked by the handlers, see [`visible`] and
//! [`may_act`]): a VM belongs to the user whose request made or claimed it. A VM serving
//! *shared* requests is visible to every user (anyone may be handed it); a *dedicated* VM
//! only to its owner and admins. Only its owner and admins act on a VM (sleep, archive,
//! wake, delete); a VM a caller may not see answers 404 as if it did not exist. A user
//! lists and revokes their own tokens; an admin anyone's.
//!
//! A route missing from [`RULES`] is admin-only (fail closed); a test checks that every
//! route of the OpenAPI document is listed.

use hangar_core::{Mode, Role};
use hangar_store::VmRecord;

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: no token.
    Open,
    /// A user's token whose role is at least this.
    Role(Role),
    /// The farm token, or an admin's token.
    Farm,
    /// The metrics token (`DATA_DIR/metrics.token`), or an admin's token: `/metrics`
    /// shows the farm's shape (hosts, load, VMs by state), more than a user may list.
    Metrics,
}

use Need::{Farm, Open};
const ACCESS: Need = Need::Role(Role::Access);
const PROVISIONER: Need = Need::Role(Role::Provisioner);
const ADMIN: Need = Need::Role(Role::Admin);

/// Method, route (as the OpenAPI document writes it), need.
pub const RULES: &[(&str, &str, Need)] = &[
    ("GET", "/healthz", Open),
    ("GET", "/v1/openapi.json", ACCESS),
    ("GET", "/v1/whoami", ACCESS),
    // The web console's session: signing in takes a token in the body.
    ("POST", "/v1/session", Open),
    ("GET", "/v1/session", ACCESS),
    ("DELETE", "/v1/session", ACCESS),
    // What changed, live (filtered by what the caller may see).
    ("GET", "/v1/events", ACCESS),
    // Services and VMs (VMs filtered and guarded by ownership).
    ("GET", "/v1/services", ACCESS),
    ("POST", "/v1/requests", PROVISIONER),
    ("POST", "/v1/requests/check", PROVISIONER),
    ("GET", "/v1/vms", ACCESS),
    ("GET", "/v1/vms/{id}", ACCESS),
    ("GET", "/v1/vms/{id}/console", ACCESS),
    ("GET", "/v1/vms/{id}/console/ws", ACCESS),
    ("DELETE", "/v1/vms/{id}", PROVISIONER),
    ("POST", "/v1/vms/{id}/sleep", PROVISIONER),
    // Which host a VM runs on is the operator's business.
    ("POST", "/v1/vms/{id}/migrate", ADMIN),
    ("POST", "/v1/vms/{id}/archive", PROVISIONER),
    ("POST", "/v1/vms/{id}/wake", PROVISIONER),
    // What the server offers and does: read by provisioners, changed by admins.
    ("GET", "/v1/pools", PROVISIONER),
    ("PUT", "/v1/pools/{name}", ADMIN),
    ("GET", "/v1/templates", PROVISIONER),
    ("GET", "/v1/policies", PROVISIONER),
    ("PUT", "/v1/policies/{service}", ADMIN),
    ("DELETE", "/v1/policies/{service}", ADMIN),
    ("GET", "/v1/tasks", PROVISIONER),
    ("GET", "/v1/tasks/{id}", PROVISIONER),
    // A task's owner cancels it; an admin cancels any (checked by the handler).
    ("POST", "/v1/tasks/{id}/cancel", PROVISIONER),
    ("DELETE", "/v1/tasks/{id}", PROVISIONER),
    ("GET", "/v1/images", PROVISIONER),
    // Imported machines: provisioners import and list them, admins remove them.
    ("POST", "/v1/imports", PROVISIONER),
    ("GET", "/v1/imports", PROVISIONER),
    ("DELETE", "/v1/imports/{name}", ADMIN),
    ("POST", "/v1/images", ADMIN),
    ("POST", "/v1/export", ADMIN),
    ("POST", "/v1/placements", ADMIN),
    // Users, tokens (a user's own; an admin's: anyone's) and the audit log.
    ("GET", "/v1/users", ADMIN),
    ("POST", "/v1/users", ADMIN),
    ("GET", "/v1/tokens", ACCESS),
    ("POST", "/v1/tokens", ACCESS),
    ("DELETE", "/v1/tokens/{id}", ACCESS),
    ("GET", "/v1/audit", ADMIN),
    // Quotas: admins. Usage (for billing): an admin everyone's, anyone else their own.
    ("GET", "/v1/quotas", ADMIN),
    ("PUT", "/v1/quotas/{user}", ADMIN),
    ("GET", "/v1/usage", ACCESS),
    // Stacks (guarded by ownership like VMs, checked by the handlers).
    ("POST", "/v1/stacks", PROVISIONER),
    ("GET", "/v1/stacks", ACCESS),
    ("GET", "/v1/stacks/{name}", ACCESS),
    ("DELETE", "/v1/stacks/{name}", PROVISIONER),
    ("POST", "/v1/stacks/{name}/sleep", PROVISIONER),
    ("POST", "/v1/stacks/{name}/archive", PROVISIONER),
    ("POST", "/v1/stacks/{name}/wake", PROVISIONER),
    // Alerts: read by provisioners (operators) and admins.
    ("GET", "/v1/alerts", PROVISIONER),
    // Draining and evacuating hosts: the operator's business.
    ("POST", "/v1/hosts/{name}/drain", ADMIN),
    ("POST", "/v1/hosts/{name}/resume", ADMIN),
    ("POST", "/v1/hosts/{name}/evacuate", ADMIN),
    ("GET", "/v1/hosts/{name}/evacuation", ADMIN),
    // The farm: agents with the farm token.
    ("GET", "/v1/hosts", Farm),
    ("POST", "/v1/hosts", Farm),
    ("POST", "/v1/hosts/{name}/heartbeat", Farm),
    ("GET", "/v1/farm/assets", Farm),
    ("POST", "/v1/farm/roots", Farm),
    ("GET", "/v1/farm/os/{os}", Farm),
    ("GET", "/v1/farm/blobs/{sha256}", Farm),
    // Prometheus: the metrics token.
    ("GET", "/metrics", Need::Metrics),
];

/// What `method route` needs; admin-only for a route the table does not list.
pub fn need(method: &str, route: &str) -> Need {
    RULES
        .iter()
        .find(|(m, r, _)| *m == method && *r == route)
        .map_or(ADMIN, |(_, _, need)| *need)
}

/// Whether a user of `role` passes `need` (the farm token is checked apart).
pub fn role_passes(role: Role, need: Need) -> bool {
    match need {
        Need::Open => true,
        Need::Role(least) => role >= least,
        Need::Farm | Need::Metrics => role == Role::Admin,
    }
}

/// Whether `user` (of `role`) may see `vm`: admins every VM, others their own and those
/// serving shared requests.
pub fn visible(user: &str, role: Role, vm: &VmRecord) -> bool {
    role == Role::Admin || vm.owner == user || vm.mode == Mode::Shared
}

/// Whether `user` (of `role`) may act on `vm` (sleep, archive, wake, delete): admins any,
/// provisioners their own.
pub fn may_act(user: &str, role: Role, vm: &VmRecord) -> bool {
    role == Role::Admin || (role >= Role::Provisioner && vm.owner == user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_one_entry_per_route_and_unknown_routes_are_admin_only() {
        let mut seen = std::collections::BTreeSet::new();
        for (method, route, _) in RULES {
            assert!(seen.insert((method, route)), "{method} {route} twice");
        }
        assert_eq!(need("GET", "/v1/nothing"), ADMIN);
        assert_eq!(need("GET", "/healthz"), Open);
        assert!(role_passes(Role::Admin, Farm));
        assert!(!role_passes(Role::Provisioner, Farm));
        assert!(role_passes(Role::Provisioner, ACCESS));
        assert!(!role_passes(Role::Access, PROVISIONER));
        assert!(!role_passes(Role::Provisioner, ADMIN));
    }
}
