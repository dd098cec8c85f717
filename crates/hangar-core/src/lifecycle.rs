//! Lifecycle policies (seed 000), as pure decisions: given the VMs (state, last use, time in
//! their state, memory, archive size), each service's policy, request rates and the host's
//! budgets, [`decide`] returns what to do. The loop that gathers the inputs and applies the
//! actions lives in the server.
//!
//! # Idle timers
//! Each timer counts from the later of the VM's last use and the moment it entered its
//! current state:
//! - `sleep_after`: an **active** VM idle this long is paused in memory (`sleeping`);
//! - `archive_after`: a **sleeping** VM left this long is archived (memory snapshot on disk,
//!   no process); when `sleep_after` is unset, an active VM idle this long is archived
//!   directly;
//! - `delete_after`: an **archived** VM left this long is deleted with its archive.
//!
//! An unset timer never fires. A service whose request rate is above `keep_active_above`
//! (requests per minute) keeps its active VMs active, however idle. VMs in warm pools
//! (`ready`), and VMs being made or failed, are never touched.
//!
//! # Budgets (LRU eviction)
//! - Memory: the guest memory of `active` and `sleeping` VMs (sleeping VMs still hold theirs;
//!   warm pools have their own budget). Over budget, VMs are archived least recently used
//!   first until it fits; VMs of kept-active services go last.
//! - Disk: archives and unused images. Over budget, they are deleted least recently used
//!   first until it fits.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::VmState;

/// The archive tier a policy asks for.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TierChoice {
    /// QEMU's migration stream as it is: fastest wake, most space.
    Raw,
    /// The stream compressed with zstd.
    #[default]
    Zstd,
    /// Only the memory pages that differ from the service template's snapshot. A host whose
    /// backend lacks it archives with zstd and says so.
    Delta,
}

impl TierChoice {
    pub const ALL: [TierChoice; 3] = [TierChoice::Raw, TierChoice::Zstd, TierChoice::Delta];

    pub fn as_str(self) -> &'static str {
        match self {
            TierChoice::Raw => "raw",
            TierChoice::Zstd => "zstd",
            TierChoice::Delta => "delta",
        }
    }
}

impl std::fmt::Display for TierChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TierChoice {
    type Err = String;
    fn from_str(text: &str) -> Result<TierChoice, String> {
        TierChoice::ALL
            .into_iter()
            .find(|tier| tier.as_str() == text)
            .ok_or_else(|| format!("unknown archive tier {text:?} (known: raw, zstd, delta)"))
    }
}

/// A request rate in requests per minute. Compared by bits, so that a policy can be `Eq`
/// (validation refuses NaN anyway).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PerMinute(pub f64);

impl PartialEq for PerMinute {
    fn eq(&self, other: &PerMinute) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for PerMinute {}

/// The shortest idle timers a policy set at run time may have (issue 13, finding 2: a
/// policy of `1ms` deleted a service's VMs and their data within seconds). A timer shorter
/// than its floor is refused; an unset timer (never) always passes. The catalog's own
/// policies are the operator's and are not held to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyFloors {
    pub sleep_after: Duration,
    pub archive_after: Duration,
    pub delete_after: Duration,
}

impl PolicyFloors {
    /// No floors (any timer longer than zero).
    pub const NONE: PolicyFloors = PolicyFloors {
        sleep_after: Duration::ZERO,
        archive_after: Duration::ZERO,
        delete_after: Duration::ZERO,
    };

    /// The floor of one timer, by its policy field name.
    pub fn of(&self, field: &str) -> Option<Duration> {
        match field {
            "sleep_after" => Some(self.sleep_after),
            "archive_after" => Some(self.archive_after),
            "delete_after" => Some(self.delete_after),
            _ => None,
        }
    }

    /// Checks the timers a change sets (`field`, value): the first one under its floor is
    /// the error.
    pub fn check<'a>(
        &self,
        set: impl IntoIterator<Item = (&'a str, Duration)>,
    ) -> Result<(), BelowFloor> {
        for (field, value) in set {
            if let Some(floor) = self.of(field)
                && value < floor
            {
                return Err(BelowFloor {
                    field: field.to_owned(),
                    value,
                    floor,
                });
            }
        }
        Ok(())
    }
}

impl Default for PolicyFloors {
    /// Sleep after at least 1 s, archive after at least 10 s, delete after at least 1 h.
    fn default() -> Self {
        PolicyFloors {
            sleep_after: Duration::from_secs(1),
            archive_after: Duration::from_secs(10),
            delete_after: Duration::from_secs(3600),
        }
    }
}

/// A policy timer under its floor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "policy {field} of {} is shorter than the floor of {} (the server's --policy-min-{})",
    humantime::format_duration(*.value),
    humantime::format_duration(*.floor),
    .field.replace('_', "-")
)]
pub struct BelowFloor {
    pub field: String,
    pub value: Duration,
    pub floor: Duration,
}

/// A service's lifecycle policy (`[service.NAME.policy]`, or set at run time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Idle time of an active VM before it sleeps (paused in memory).
    #[serde(
        default,
        with = "humantime_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "10m")]
    pub sleep_after: Option<Duration>,
    /// Time a VM sleeps before it is archived (or, without `sleep_after`, idle time of an
    /// active VM before it is archived).
    #[serde(
        default,
        with = "humantime_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "1h")]
    pub archive_after: Option<Duration>,
    /// Time a VM stays archived before it is deleted.
    #[serde(
        default,
        with = "humantime_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "7d")]
    pub delete_after: Option<Duration>,
    /// Requests per minute above which the service's active VMs stay active even when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, example = 6.0)]
    pub keep_active_above: Option<PerMinute>,
    /// How archives of this service's VMs are written.
    #[serde(default)]
    pub archive_tier: TierChoice,
}

impl Policy {
    /// Whether any timer is set.
    pub fn has_timers(&self) -> bool {
        self.sleep_after.is_some() || self.archive_after.is_some() || self.delete_after.is_some()
    }

    /// Why the policy cannot work as written, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("sleep_after", self.sleep_after),
            ("archive_after", self.archive_after),
            ("delete_after", self.delete_after),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(format!(
                    "policy {name} must be longer than 0 (leave it out for never)"
                ));
            }
        }
        if let Some(PerMinute(rate)) = self.keep_active_above
            && !(rate.is_finite() && rate >= 0.0)
        {
            return Err(format!(
                "policy keep_active_above must be a number of requests per minute, 0 or more, not {rate}"
            ));
        }
        Ok(())
    }

    /// The policy of a VM offering several services: a timer fires only when every service
    /// has it (the longest wins); kept active when any service is.
    fn merge(policies: &[Policy]) -> Policy {
        let longest = |get: fn(&Policy) -> Option<Duration>| {
            policies
                .iter()
                .map(get)
                .try_fold(Duration::ZERO, |acc, d| d.map(|d| acc.max(d)))
        };
        match policies {
            [] => Policy::default(),
            [one] => *one,
            [first, ..] => Policy {
                sleep_after: longest(|p| p.sleep_after),
                archive_after: longest(|p| p.archive_after),
                delete_after: longest(|p| p.delete_after),
                keep_active_above: None,
                archive_tier: first.archive_tier,
            },
        }
    }
}

/// What the decision needs to know about one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFacts {
    pub id: String,
    pub services: Vec<String>,
    pub state: VmState,
    /// Last time it was granted, woken, or used through its endpoint (ms since the epoch).
    pub last_used_ms: u64,
    /// When it entered its current state.
    pub state_since_ms: u64,
    /// Guest memory it holds while it has a process.
    pub memory_mib: u32,
    /// Size of its archive, when archived.
    pub archive_bytes: Option<u64>,
}

/// An image on disk that could be deleted when unused (disk budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub key: String,
    pub bytes: u64,
    pub last_used_ms: u64,
    /// A VM or template still needs it: never deleted.
    pub in_use: bool,
}

/// Host budgets; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budgets {
    /// Guest memory of active and sleeping VMs, in MiB.
    pub memory_mib: Option<u64>,
    /// Archives and images, in bytes.
    pub disk_bytes: Option<u64>,
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub now_ms: u64,
    pub vms: Vec<VmFacts>,
    /// Policy per service; services without one have no timers.
    pub policies: BTreeMap<String, Policy>,
    /// Requests per minute per service (for `keep_active_above`).
    pub rates_per_min: BTreeMap<String, f64>,
    pub budgets: Budgets,
    pub images: Vec<ImageFacts>,
}

/// Why an action was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An idle timer of the service's policy.
    Idle,
    /// Over the memory budget (least recently used first).
    Memory,
    /// Over the disk budget (least recently used first).
    Disk,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Idle => "idle",
            Reason::Memory => "memory budget",
            Reason::Disk => "disk budget",
        })
    }
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Active → sleeping.
    Sleep { vm: String, reason: Reason },
    /// Active or sleeping → archived.
    Archive {
        vm: String,
        tier: TierChoice,
        reason: Reason,
    },
    /// Archived → deleted, with its archive.
    Delete { vm: String, reason: Reason },
    /// An unused image leaves the disk.
    RemoveImage { key: String, reason: Reason },
}

impl Action {
    /// The VM acted on, if the action is on a VM.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Action::Sleep { vm, .. } | Action::Archive { vm, .. } | Action::Delete { vm, .. } => {
                Some(vm)
            }
            Action::RemoveImage { .. } => None,
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Action::Sleep { reason, .. }
            | Action::Archive { reason, .. }
            | Action::Delete { reason, .. }
            | Action::RemoveImage { reason, .. } => *reason,
        }
    }
}

/// The policy that applies to a VM offering `services`.
pub fn vm_policy(services: &[String], policies: &BTreeMap<String, Policy>) -> Policy {
    let found: Vec<Policy> = services
        .iter()
        .map(|s| policies.get(s).copied().unwrap_or_default())
        .collect();
    Policy::merge(&found)
}

/// Whether a VM offering `services` is kept active by a request rate above its service's
/// `keep_active_above`.
pub fn kept_active(
    services: &[String],
    policies: &BTreeMap<String, Policy>,
    rates_per_min: &BTreeMap<String, f64>,
) -> bool {
    services.iter().any(|service| {
        let threshold = policies.get(service).and_then(|p| p.keep_active_above);
        let rate = rates_per_min.get(service).copied().unwrap_or(0.0);
        threshold.is_some_and(|PerMinute(above)| rate > above)
    })
}

/// The actions that bring the VMs in line with their policies and the budgets. Each VM gets
/// at most one action, always along an edge of the state machine; deletions come first,
/// then archives, then sleeps.
pub fn decide(inputs: &Inputs) -> Vec<Action> {
    let now = inputs.now_ms;
    let mut planned: BTreeMap<&str, Action> = BTreeMap::new();
    let kept = |vm: &VmFacts| kept_active(&vm.services, &inputs.policies, &inputs.rates_per_min);

    // Idle timers.
    for vm in &inputs.vms {
        let policy = vm_policy(&vm.services, &inputs.policies);
        let idle =
            Duration::from_millis(now.saturating_sub(vm.last_used_ms.max(vm.state_since_ms)));
        let due = |timer: Option<Duration>| timer.is_some_and(|t| idle >= t);
        let action = match vm.state {
            VmState::Active if kept(vm) => None,
            VmState::Active if policy.sleep_after.is_some() => {
                due(policy.sleep_after).then(|| Action::Sleep {
                    vm: vm.id.clone(),
                    reason: Reason::Idle,
                })
            }
            VmState::Active | VmState::Sleeping => {
                due(policy.archive_after).then(|| Action::Archive {
                    vm: vm.id.clone(),
                    tier: policy.archive_tier,
                    reason: Reason::Idle,
                })
            }
            VmState::Archived => due(policy.delete_after).then(|| Action::Delete {
                vm: vm.id.clone(),
                reason: Reason::Idle,
            }),
            VmState::Creating
            | VmState::Booting
            | VmState::Ready
            | VmState::Deleted
            | VmState::Failed
            // A lost VM's host is out of reach: no timer acts on it.
            | VmState::Lost => None,
        };
        if let Some(action) = action {
            planned.insert(&vm.id, action);
        }
    }

    // Memory budget: archive least recently used first; sleeping does not free memory.
    if let Some(budget) = inputs.budgets.memory_mib {
        let holds = |vm: &VmFacts| {
            matches!(vm.state, VmState::Active | VmState::Sleeping)
                && !matches!(planned.get(vm.id.as_str()), Some(Action::Archive { .. }))
        };
        let mut used: u64 = inputs
            .vms
            .iter()
            .filter(|vm| holds(vm))
            .map(|vm| u64::from(vm.memory_mib))
            .sum();
        if used > budget {
            let mut candidates: Vec<&VmFacts> = inputs.vms.iter().filter(|vm| holds(vm)).collect();
            candidates.sort_by_key(|vm| {
                (
                    kept(vm),
                    vm.last_used_ms,
                    vm.state != VmState::Sleeping,
                    vm.id.as_str(),
                )
            });
            for vm in candidates {
                if used <= budget {
                    break;
                }
                let policy = vm_policy(&vm.services, &inputs.policies);
                planned.insert(
                    &vm.id,
                    Action::Archive {
                        vm: vm.id.clone(),
                        tier: policy.archive_tier,
                        reason: Reason::Memory,
                    },
                );
                used -= u64::from(vm.memory_mib);
            }
        }
    }

    // Disk budget: delete archives and unused images, least recently used first.
    let mut images = Vec::new();
    if let Some(budget) = inputs.budgets.disk_bytes {
        let archive_kept = |vm: &VmFacts| {
            vm.state == VmState::Archived
                && !matches!(planned.get(vm.id.as_str()), Some(Action::Delete { .. }))
        };
        let mut used: u64 = inputs
            .vms
            .iter()
            .filter(|vm| archive_kept(vm))
            .filter_map(|vm| vm.archive_bytes)
            .sum::<u64>()
            + inputs.images.iter().map(|image| image.bytes).sum::<u64>();
        if used > budget {
            // (last use, is an image, key): archives before images used at the same time.
            let mut candidates: Vec<(u64, bool, &str, u64)> = inputs
                .vms
                .iter()
                .filter(|vm| archive_kept(vm))
                .map(|vm| {
                    (
                        vm.last_used_ms,
                        false,
                        vm.id.as_str(),
                        vm.archive_bytes.unwrap_or(0),
                    )
                })
                .chain(
                    inputs
                        .images
                        .iter()
                        .filter(|image| !image.in_use)
                        .map(|image| (image.last_used_ms, true, image.key.as_str(), image.bytes)),
                )
                .collect();
            candidates.sort();
            for (_, is_image, key, bytes) in candidates {
                if used <= budget {
                    break;
                }
                if is_image {
                    images.push(Action::RemoveImage {
                        key: key.to_owned(),
                        reason: Reason::Disk,
                    });
                } else {
                    planned.insert(
                        key,
                        Action::Delete {
                            vm: key.to_owned(),
                            reason: Reason::Disk,
                        },
                    );
                }
                used -= bytes;
            }
        }
    }

    let rank = |action: &Action| match action {
        Action::Delete { .. } | Action::RemoveImage { .. } => 0,
        Action::Archive { .. } => 1,
        Action::Sleep { .. } => 2,
    };
    let mut actions: Vec<Action> = planned.into_values().chain(images).collect();
    actions.sort_by_key(rank);
    actions
}

/// `Option<Duration>` as a human string (`"3s"`, `"10m"`) in TOML and JSON; absent is none.
pub mod humantime_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_str(&humantime::format_duration(*d).to_string()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?;
        text.map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests;
