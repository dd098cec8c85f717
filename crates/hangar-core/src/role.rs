//! Who may do what: the three roles a user (and each of their API tokens) has. What each
//! role may do per route is decided in the server (`hangar_server::api::auth::roles`).

use serde::{Deserialize, Serialize};

/// A user's role, and the scope of an API token (never more than its user's role).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees and connects to the VMs shared with it.
    Access,
    /// May request VMs and act on the VMs it owns.
    Provisioner,
    /// Everything: users, tokens, pools, policies, images, every VM.
    Admin,
}

/// A role name that is none of `admin`, `provisioner`, `access`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: one of admin, provisioner, access")]
pub struct UnknownRole(pub String);

impl Role {
    /// Every role, least powerful first.
    pub const ALL: [Role; 3] = [Role::Access, Role::Provisioner, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Provisioner => "provisioner",
            Role::Access => "access",
        }
    }

    /// Whether a holder of `self` may hand out a token scoped to `scope`: never a role
    /// above its own (admin > provisioner > access).
    pub fn covers(self, scope: Role) -> bool {
        scope <= self
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "admin" => Ok(Role::Admin),
            "provisioner" => Ok(Role::Provisioner),
            "access" => Ok(Role::Access),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_order_by_power() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
        assert!(Role::Admin.covers(Role::Provisioner));
        assert!(Role::Provisioner.covers(Role::Access));
        assert!(Role::Provisioner.covers(Role::Provisioner));
        assert!(!Role::Provisioner.covers(Role::Admin));
        assert!(!Role::Access.covers(Role::Provisioner));
    }
}
