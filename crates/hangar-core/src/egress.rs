//! What a VM's guest may reach out of its user-mode NIC (issue 18): its **egress policy**.
//!
//! The policy is chosen per request and recorded with the VM, so that every later start of
//! it (a wake from an archive, a migration, a template clone) enforces it again on the
//! host side: the guest cannot change it. Enforcement is `hangar_vmm`'s (slirp
//! `restrict=on` plus one guest forward per allowed target); this module is the pure part:
//! the names, parsing, validation and the guest-visible address of each allowed target.
//!
//! - `none` (the default for new VMs): the guest opens no connection out of the VM at all;
//!   connections *to* its endpoints (port forwards) keep working. Its own loopback is all
//!   it reaches, so `loopback` is accepted as another name for it.
//! - `allow`: only the listed `host:port` targets, each reached by the guest at
//!   [`guest_address`]`(i)` on the target's own port ([`EgressPolicy::forwards`]).
//! - `segment`: a stack member's default: `none` on the user-mode NIC (its peers are
//!   reached over the stack's private segment, a second NIC).
//! - `open`: anything the host can reach (the behaviour before policies existed, and what
//!   a VM recorded without a policy keeps).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A VM's egress policy. JSON: `"none"`, `"segment"`, `"open"` or
/// `{"allow": ["HOST:PORT", …]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressPolicy {
    /// No connection out of the VM (the default for new VMs).
    #[default]
    None,
    /// Only these targets, each at its own guest-visible address.
    Allow(Vec<EgressTarget>),
    /// A stack member: `none` on the user-mode NIC.
    Segment,
    /// Anywhere the host can reach.
    Open,
}

/// The most targets one allow list may name.
pub const MAX_ALLOW: usize = 32;

/// The guest-visible address of the `index`-th allowed target: `10.0.2.100` upwards, in
/// slirp's network and outside its DHCP range (`10.0.2.15` …) and its own addresses
/// (`.2` gateway, `.3` DNS).
pub fn guest_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 2, 100 + index as u8)
}

/// One allowed target: where the host connects on the guest's behalf.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressTarget {
    /// An IPv4 address or a DNS name (letters, digits, `-`, `.`), resolved by the host at
    /// each connection.
    pub host: String,
    pub port: u16,
}

/// An allowed target as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestForward {
    /// The address the guest connects to (on the target's port).
    pub guest: Ipv4Addr,
    pub port: u16,
    pub target: EgressTarget,
}

impl EgressTarget {
    /// The target's host when it is a name (not an address): the guest is given it in
    /// `/etc/hosts` for [`GuestForward::guest`].
    pub fn name(&self) -> Option<&str> {
        (self.host.parse::<Ipv4Addr>().is_err()).then_some(self.host.as_str())
    }
}

/// Why a policy or target cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error(
        "egress policy {0:?} is not one of none (or loopback), open, segment, allow=HOST:PORT[,HOST:PORT…]"
    )]
    UnknownPolicy(String),
    #[error("egress target {0:?} is not HOST:PORT (an IPv4 address or a DNS name, a port 1-65535)")]
    BadTarget(String),
    #[error("an allow list names at least one target")]
    EmptyAllow,
    #[error("an allow list names at most {MAX_ALLOW} targets, not {0}")]
    TooManyTargets(usize),
    #[error("egress target {0} is listed twice")]
    Duplicate(String),
}

impl EgressPolicy {
    /// The policy of a VM recorded before policies existed: `open`.
    pub fn legacy() -> EgressPolicy {
        EgressPolicy::Open
    }

    pub fn is_open(&self) -> bool {
        matches!(self, EgressPolicy::Open)
    }

    /// Its name: `none`, `allow`, `segment` or `open`.
    pub fn kind(&self) -> &'static str {
        match self {
            EgressPolicy::None => "none",
            EgressPolicy::Allow(_) => "allow",
            EgressPolicy::Segment => "segment",
            EgressPolicy::Open => "open",
        }
    }

    /// The allowed targets with their guest-visible addresses, in the list's order.
    pub fn forwards(&self) -> Vec<GuestForward> {
        match self {
            EgressPolicy::Allow(targets) => targets
                .iter()
                .enumerate()
                .map(|(i, target)| GuestForward {
                    guest: guest_address(i),
                    port: target.port,
                    target: target.clone(),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Checks an allow list: 1 to [`MAX_ALLOW`] targets, none twice.
    pub fn validate(&self) -> Result<(), EgressError> {
        if let EgressPolicy::Allow(targets) = self {
            if targets.is_empty() {
                return Err(EgressError::EmptyAllow);
            }
            if targets.len() > MAX_ALLOW {
                return Err(EgressError::TooManyTargets(targets.len()));
            }
            for (i, target) in targets.iter().enumerate() {
                if targets[..i].contains(target) {
                    return Err(EgressError::Duplicate(target.to_string()));
                }
            }
        }
        Ok(())
    }
}

/// `none`, `open`, `segment`, `allow 127.0.0.1:8080=10.0.2.100:8080,…` (target = where the
/// guest reaches it).
impl fmt::Display for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())?;
        for (i, forward) in self.forwards().iter().enumerate() {
            let sep = if i == 0 { " " } else { "," };
            write!(
                f,
                "{sep}{}={}:{}",
                forward.target, forward.guest, forward.port
            )?;
        }
        Ok(())
    }
}

/// The command-line form: `none` (or `loopback`), `open`, `segment`,
/// `allow=HOST:PORT[,HOST:PORT…]`.
impl FromStr for EgressPolicy {
    type Err = EgressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let policy = match text {
            "none" | "loopback" => EgressPolicy::None,
            "open" => EgressPolicy::Open,
            "segment" => EgressPolicy::Segment,
            _ => match text.strip_prefix("allow=") {
                Some(list) => EgressPolicy::Allow(
                    list.split(',')
                        .filter(|item| !item.is_empty())
                        .map(str::parse)
                        .collect::<Result<_, _>>()?,
                ),
                None => return Err(EgressError::UnknownPolicy(text.to_owned())),
            },
        };
        policy.validate()?;
        Ok(policy)
    }
}

impl fmt::Display for EgressTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for EgressTarget {
    type Err = EgressError;

    /// `HOST:PORT`. The host is an IPv4 address or a DNS name; nothing else is accepted, so
    /// that it can travel on QEMU's command line (no `,`, spaces or quotes).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || EgressError::BadTarget(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && !host.starts_with(['-', '.'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if port == 0 || !name_ok {
            return Err(bad());
        }
        Ok(EgressTarget {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// On the wire: the string `HOST:PORT`.
impl utoipa::PartialSchema for EgressTarget {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "HOST:PORT (an IPv4 address or a DNS name, a port 1-65535)",
            ))
            .examples(["db.internal:5432"])
            .into()
    }
}

impl utoipa::ToSchema for EgressTarget {}

impl Serialize for EgressTarget {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressTarget {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for text in ["none", "open", "segment"] {
            let policy: EgressPolicy = text.parse().unwrap();
            assert_eq!(policy.to_string(), text);
            assert_eq!(policy.kind(), text);
        }
        assert_eq!("loopback".parse(), Ok(EgressPolicy::None));
        let allow: EgressPolicy = "allow=127.0.0.1:8080,DB.internal:5432".parse().unwrap();
        assert_eq!(
            allow.to_string(),
            "allow 127.0.0.1:8080=10.0.2.100:8080,db.internal:5432=10.0.2.101:5432"
        );
        let forwards = allow.forwards();
        assert_eq!(forwards[1].target.name(), Some("db.internal"));
        assert_eq!(forwards[0].target.name(), None);
    }

    #[test]
    fn bad_policies_and_targets_are_refused() {
        for bad in [
            "closed",
            "allow=",
            "allow=host",
            "allow=host:0",
            "allow=host:70000",
            "allow=a,b:1",
            "allow=-x:1",
            "allow=x y:1",
            "allow=[::1]:80",
            "allow=h:1,h:1",
        ] {
            assert!(bad.parse::<EgressPolicy>().is_err(), "{bad} was accepted");
        }
        let many = (0..=MAX_ALLOW)
            .map(|i| format!("h{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            format!("allow={many}").parse::<EgressPolicy>(),
            Err(EgressError::TooManyTargets(MAX_ALLOW + 1))
        );
    }

    #[test]
    fn json_is_a_name_or_an_allow_list_and_the_default_is_none() {
        assert_eq!(EgressPolicy::default(), EgressPolicy::None);
        assert_eq!(
            serde_json::to_string(&EgressPolicy::Open).unwrap(),
            "\"open\""
        );
        let allow: EgressPolicy = serde_json::from_str(r#"{"allow": ["10.1.2.3:80"]}"#).unwrap();
        assert_eq!(
            serde_json::to_value(&allow).unwrap(),
            serde_json::json!({"allow": ["10.1.2.3:80"]})
        );
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"allow": ["x"]}"#).is_err());
        assert!(serde_json::from_str::<EgressPolicy>(r#""closed""#).is_err());
    }

    #[test]
    fn guest_addresses_stay_in_slirps_network_above_its_dhcp_range() {
        assert_eq!(guest_address(0), Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(guest_address(MAX_ALLOW - 1), Ipv4Addr::new(10, 0, 2, 131));
    }
}
