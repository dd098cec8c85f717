//! Stacks (issue 18): several catalog services deployed together as one unit, each member
//! its own VM, on a private segment only the stack's members share.
//!
//! A stack file (TOML, or the same shape as JSON for `POST /v1/stacks`) names the members,
//! their services, the ports that get stable endpoints (`public`), and settings that may
//! refer to peers: `{{ peers.NAME.address }}` (the peer's private IPv4 address),
//! `{{ peers.NAME.name }}` (its host name on the segment), `{{ peers.NAME.port }}` (its
//! service's first guest port) and `{{ peers.NAME.ports.PORT }}` (the guest port named
//! `PORT`). Everything a reference names is fixed by the plan (addresses come from the
//! stack's segment and the member's position, ports from the catalog), so settings never
//! depend on other settings and are resolved before any VM exists.
//!
//! **Address plan.** Each stack gets one /24 out of `10.213.0.0/16` ([`segment_cidr`]),
//! unique among live stacks (the store refuses a taken one); its members, in name order,
//! get `.10`, `.11`, … ([`member_address`]). MACs are locally administered:
//! `02:h1:h2:h3:SEG:HOST` with `h` from the stack's name and `SEG`, `HOST` the segment
//! index and the member's host octet, so no two members of a segment share one.
//!
//! **Order.** A member that refers to a peer depends on it: peers are made (and woken)
//! before the members that refer to them; members of the same [`StackPlan::levels`] entry
//! depend on none of each other and are made in parallel. References that form a cycle
//! are refused (there would be no order to wake them in).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::egress::EgressError;
use crate::{Catalog, EgressPolicy};

/// The most members a stack may have.
pub const MAX_MEMBERS: usize = 16;

/// The default egress of a stack's members: its peers on the segment and nothing else.
pub const DEFAULT_EGRESS: EgressPolicy = EgressPolicy::Segment;

/// The first host octet members get (`.10`); member `i` in name order gets `.10 + i`.
pub const FIRST_HOST: u8 = 10;

/// Where a stack is in its life. Its members' VM states say the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StackState {
    /// `up` is making its members (a task).
    Creating,
    /// Every member is handed out and joined to the segment.
    Up,
    /// Its members are asleep (paused) together.
    Sleeping,
    /// Its members are archived together.
    Archived,
    /// `down` is deleting its members.
    Deleting,
}

impl StackState {
    pub const ALL: [StackState; 5] = [
        StackState::Creating,
        StackState::Up,
        StackState::Sleeping,
        StackState::Archived,
        StackState::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StackState::Creating => "creating",
            StackState::Up => "up",
            StackState::Sleeping => "sleeping",
            StackState::Archived => "archived",
            StackState::Deleting => "deleting",
        }
    }

    pub fn parse(text: &str) -> Option<StackState> {
        StackState::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A stack as written in a stack file or `POST /v1/stacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StackSpec {
    /// The stack's name: a DNS label (lowercase letters, digits, `-`; at most 40).
    pub name: String,
    /// The members by name (DNS labels: each is a host name on the segment).
    #[serde(rename = "member", alias = "members")]
    pub members: BTreeMap<String, MemberSpec>,
}

/// One member of a stack: a VM of `service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// A catalog service.
    pub service: String,
    /// The service's ports (by name) that get stable endpoints; the others are reachable
    /// only from the stack's segment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public: Vec<String>,
    /// The service's settings; values may refer to peers (`{{ peers.NAME.address }}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// What the member may reach besides its peers, in the command-line form of
    /// [`EgressPolicy`]: `segment` (the default: nothing else; `none` and `loopback` say the
    /// same for a member), `allow=HOST:PORT,…` or `open`. The segment is the member's own
    /// network: every policy lets it reach its peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
}

/// Why a stack cannot be made. Each message names the member and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    #[error("stack file: {0}")]
    Parse(String),
    #[error(
        "{what} {name:?} is not a DNS label (lowercase letters, digits and '-', starting with a letter, at most {max} characters)"
    )]
    BadName {
        what: &'static str,
        name: String,
        max: usize,
    },
    #[error("a stack needs at least one member")]
    Empty,
    #[error("a stack has at most {MAX_MEMBERS} members, not {0}")]
    TooMany(usize),
    #[error("member {member}: no service named {service:?}{}", did_you_mean(.alternatives))]
    UnknownService {
        member: String,
        service: String,
        alternatives: Vec<String>,
    },
    #[error("member {member}: service {service} has no port named {port:?} to make public (its ports: {})", .ports.join(", "))]
    UnknownPort {
        member: String,
        service: String,
        port: String,
        ports: Vec<String>,
    },
    #[error("member {member}: service {service} has no setting {key:?}{}", did_you_mean(.alternatives))]
    UnknownSetting {
        member: String,
        service: String,
        key: String,
        alternatives: Vec<String>,
    },
    #[error("member {member}: setting {key}: {reason}")]
    BadSetting {
        member: String,
        key: String,
        reason: String,
    },
    #[error("member {member}: setting {key} refers to peer {peer:?}, which is not a member{}", did_you_mean(.alternatives))]
    UnknownPeer {
        member: String,
        key: String,
        peer: String,
        alternatives: Vec<String>,
    },
    #[error("member {member}: setting {key}: {{{{ peers.{peer}.{field} }}}} names no field of a peer (address, name, port, ports.PORT{})", peer_ports(.ports))]
    UnknownField {
        member: String,
        key: String,
        peer: String,
        field: String,
        ports: Vec<String>,
    },
    #[error("members refer to each other in a cycle ({}): there is no order to make and wake them in", .0.join(" → "))]
    Cycle(Vec<String>),
    #[error("member {member}: {source}")]
    BadEgress {
        member: String,
        #[source]
        source: EgressError,
    },
}

fn did_you_mean(alternatives: &[String]) -> String {
    if alternatives.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", alternatives.join(", "))
    }
}

fn peer_ports(ports: &[String]) -> String {
    if ports.is_empty() {
        String::new()
    } else {
        format!("; its ports: {}", ports.join(", "))
    }
}

/// A lowercase DNS label of at most `max` characters, starting with a letter and not
/// ending with '-'.
pub fn is_label(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The /24 of segment `index` (`10.213.INDEX.0/24`).
pub fn segment_cidr(index: u8) -> String {
    format!("10.213.{index}.0/24")
}

/// The segment index of a /24 written by [`segment_cidr`], if it is one.
pub fn segment_index(cidr: &str) -> Option<u8> {
    let index = cidr.strip_prefix("10.213.")?.strip_suffix(".0/24")?;
    index.parse().ok().filter(|i: &u8| i.to_string() == index)
}

/// The private address of the member at `position` (name order) on segment `index`.
pub fn member_address(index: u8, position: usize) -> String {
    format!("10.213.{index}.{}", usize::from(FIRST_HOST) + position)
}

/// The lowest segment index not in `taken`, if any is left.
pub fn free_segment(taken: &BTreeSet<u8>) -> Option<u8> {
    (0..=u8::MAX).find(|index| !taken.contains(index))
}

/// FNV-1a, 64 bits: a stable hash for MACs (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The MAC of the member at `position` of stack `stack` on segment `index`: locally
/// administered unicast, unique within the segment.
pub fn member_mac(stack: &str, index: u8, position: usize) -> String {
    let hash = fnv1a(stack.as_bytes()).to_be_bytes();
    let host = usize::from(FIRST_HOST) + position;
    format!(
        "02:{:02x}:{:02x}:{:02x}:{index:02x}:{host:02x}",
        hash[0], hash[1], hash[2]
    )
}

/// A validated stack on its segment: what to make, in which order, with which settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackPlan {
    pub name: String,
    /// `10.213.N.0/24`.
    pub segment: String,
    /// In name order.
    pub members: Vec<MemberPlan>,
    /// Members grouped by dependency: every member's peers are in earlier groups. Make
    /// and wake group by group (a group's members in parallel); sleep in reverse.
    pub levels: Vec<Vec<String>>,
}

/// One member of a [`StackPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPlan {
    pub name: String,
    pub service: String,
    /// Ports (by name) with stable endpoints.
    pub public: Vec<String>,
    /// The member's settings with every peer reference resolved.
    pub settings: BTreeMap<String, String>,
    /// Private IPv4 address, without prefix.
    pub address: String,
    pub mac: String,
    /// What it may reach besides its peers ([`EgressPolicy::Segment`]: nothing else).
    pub egress: EgressPolicy,
    /// The peers its settings refer to (itself excluded).
    pub peers: BTreeSet<String>,
}

impl MemberPlan {
    /// The address with the segment's prefix (`10.213.0.10/24`).
    pub fn address_cidr(&self) -> String {
        format!("{}/24", self.address)
    }
}

impl StackPlan {
    /// A member by name.
    pub fn member(&self, name: &str) -> Option<&MemberPlan> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Every member's host name and private address (for each member's `/etc/hosts`).
    pub fn hosts(&self) -> Vec<(String, String)> {
        self.members
            .iter()
            .map(|m| (m.name.clone(), m.address.clone()))
            .collect()
    }

    /// Members in the order to make or wake them (peers first, the front last).
    pub fn wake_order(&self) -> Vec<String> {
        self.levels.iter().flatten().cloned().collect()
    }
}

impl StackSpec {
    /// Reads a stack file (TOML).
    pub fn from_toml(text: &str) -> Result<StackSpec, StackError> {
        toml::from_str(text).map_err(|err| StackError::Parse(err.to_string()))
    }

    /// Checks the stack against `catalog` and plans it on segment `index`: names, services,
    /// public ports, settings (peer references resolved, then each value checked against
    /// its setting's format), egress, and the order (no cycles).
    pub fn plan(&self, catalog: &Catalog, index: u8) -> Result<StackPlan, StackError> {
        if !is_label(&self.name, 40) {
            return Err(StackError::BadName {
                what: "stack name",
                name: self.name.clone(),
                max: 40,
            });
        }
        if self.members.is_empty() {
            return Err(StackError::Empty);
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(StackError::TooMany(self.members.len()));
        }
        let mut positions = BTreeMap::new();
        for (position, (name, member)) in self.members.iter().enumerate() {
            if !is_label(name, 63) {
                return Err(StackError::BadName {
                    what: "member name",
                    name: name.clone(),
                    max: 63,
                });
            }
            let service =
                catalog
                    .get(&member.service)
                    .ok_or_else(|| StackError::UnknownService {
                        member: name.clone(),
                        service: member.service.clone(),
                        alternatives: crate::suggest::closest(&member.service, catalog.names(), 3),
                    })?;
            positions.insert(name.as_str(), (position, service));
        }
        let mut members = Vec::with_capacity(self.members.len());
        for (name, member) in &self.members {
            let (position, service) = positions[name.as_str()];
            let port_names: Vec<String> = service.ports.iter().map(|p| p.name.clone()).collect();
            for port in &member.public {
                if !port_names.contains(port) {
                    return Err(StackError::UnknownPort {
                        member: name.clone(),
                        service: service.name.clone(),
                        port: port.clone(),
                        ports: port_names,
                    });
                }
            }
            let egress = match member.egress.as_deref().map(str::parse) {
                None => DEFAULT_EGRESS,
                // A member reaches its peers whatever it says: nothing else is `segment`.
                Some(Ok(EgressPolicy::None)) => EgressPolicy::Segment,
                Some(Ok(policy)) => policy,
                Some(Err(source)) => {
                    return Err(StackError::BadEgress {
                        member: name.clone(),
                        source,
                    });
                }
            };
            let mut settings = BTreeMap::new();
            let mut peers = BTreeSet::new();
            for (key, value) in &member.env {
                let Some(setting) = service.settings.get(key) else {
                    return Err(StackError::UnknownSetting {
                        member: name.clone(),
                        service: service.name.clone(),
                        key: key.clone(),
                        alternatives: crate::suggest::closest(
                            key,
                            service.settings.keys().map(String::as_str),
                            3,
                        ),
                    });
                };
                let resolved = render_peers(value, |peer, field| {
                    let Some((peer_position, peer_service)) = positions.get(peer) else {
                        return Err(StackError::UnknownPeer {
                            member: name.clone(),
                            key: key.clone(),
                            peer: peer.to_owned(),
                            alternatives: crate::suggest::closest(
                                peer,
                                self.members.keys().map(String::as_str),
                                3,
                            ),
                        });
                    };
                    if peer != name {
                        peers.insert(peer.to_owned());
                    }
                    let port = |wanted: Option<&str>| {
                        peer_service
                            .ports
                            .iter()
                            .find(|p| wanted.is_none_or(|w| p.name == w))
                            .map(|p| p.guest.to_string())
                    };
                    let value = match field {
                        "address" => Some(member_address(index, *peer_position)),
                        "name" => Some(peer.to_owned()),
                        "port" => port(None),
                        _ => field.strip_prefix("ports.").and_then(|p| port(Some(p))),
                    };
                    value.ok_or_else(|| StackError::UnknownField {
                        member: name.clone(),
                        key: key.clone(),
                        peer: peer.to_owned(),
                        field: field.to_owned(),
                        ports: peer_service.ports.iter().map(|p| p.name.clone()).collect(),
                    })
                })?;
                setting
                    .check(&resolved)
                    .map_err(|reason| StackError::BadSetting {
                        member: name.clone(),
                        key: key.clone(),
                        reason,
                    })?;
                settings.insert(key.clone(), resolved);
            }
            members.push(MemberPlan {
                name: name.clone(),
                service: service.name.clone(),
                public: member.public.clone(),
                settings,
                address: member_address(index, position),
                mac: member_mac(&self.name, index, position),
                egress,
                peers,
            });
        }
        let levels = levels(&members)?;
        Ok(StackPlan {
            name: self.name.clone(),
            segment: segment_cidr(index),
            members,
            levels,
        })
    }
}

/// Renders the `{{ peers.PEER.FIELD }}` placeholders of `text` with `resolve(PEER, FIELD)`
/// (spaces inside the braces trimmed); every other `{{ … }}` is left as written.
pub fn render_peers<E>(
    text: &str,
    mut resolve: impl FnMut(&str, &str) -> Result<String, E>,
) -> Result<String, E> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let reference = after.find("}}").and_then(|end| {
            let inner = after[..end].trim();
            let (peer, field) = inner.strip_prefix("peers.")?.split_once('.')?;
            Some((end, peer, field))
        });
        match reference {
            Some((end, peer, field)) => {
                out.push_str(&resolve(peer, field)?);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Members grouped so that every member's peers are in earlier groups (Kahn's algorithm,
/// by name within a group); a cycle is refused with its members in order.
fn levels(members: &[MemberPlan]) -> Result<Vec<Vec<String>>, StackError> {
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut levels = Vec::new();
    while placed.len() < members.len() {
        let level: Vec<String> = members
            .iter()
            .filter(|m| !placed.contains(m.name.as_str()))
            .filter(|m| m.peers.iter().all(|p| placed.contains(p.as_str())))
            .map(|m| m.name.clone())
            .collect();
        if level.is_empty() {
            return Err(StackError::Cycle(cycle(members, &placed)));
        }
        placed.extend(
            members
                .iter()
                .filter(|m| level.contains(&m.name))
                .map(|m| m.name.as_str()),
        );
        levels.push(level);
    }
    Ok(levels)
}

/// A cycle among the members not yet `placed` (each of which has an unplaced peer).
fn cycle(members: &[MemberPlan], placed: &BTreeSet<&str>) -> Vec<String> {
    let by_name: BTreeMap<&str, &MemberPlan> =
        members.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut path: Vec<String> = Vec::new();
    let mut at = members
        .iter()
        .find(|m| !placed.contains(m.name.as_str()))
        .map(|m| m.name.as_str())
        .unwrap_or_default();
    loop {
        if let Some(start) = path.iter().position(|p| p == at) {
            let mut cycle = path.split_off(start);
            cycle.push(at.to_owned());
            return cycle;
        }
        path.push(at.to_owned());
        let Some(next) = by_name
            .get(at)
            .and_then(|m| m.peers.iter().find(|p| !placed.contains(p.as_str())))
        else {
            return path;
        };
        at = next;
    }
}

#[cfg(test)]
mod tests;
