//! Matching a requested machine configuration against paused VMs (seed 002, claims 4-7).
//!
//! A request names vCPUs, a memory range, an OS (name and minimum version) and
//! applications. A paused VM is:
//! - an **exact** match when it has exactly the vCPUs, memory within the range, the OS at
//!   exactly the minimum version (or any version when none is asked) and exactly the apps;
//! - a **superset** when it has at least as much of everything (more vCPUs, more memory, a
//!   newer OS version, more apps);
//! - a **partial** match when it is a hardware shell paused before any OS (pre-OS ready
//!   state) with enough vCPUs and memory: the requested OS image is attached on request.
//!
//! Exact beats superset beats partial; among supersets and shells the smallest wins
//! (least memory, then fewest vCPUs, then oldest OS, then fewest extra apps).

use std::cmp::Ordering;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// What a configuration request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineRequest {
    /// At least this many vCPUs (exactly, for an exact match).
    pub vcpus: u32,
    pub memory_mib: MemoryRange,
    pub os: OsRequirement,
    /// Applications (catalog services) the VM must offer.
    #[serde(default)]
    pub apps: BTreeSet<String>,
    /// Least root disk the VM needs, in MiB: checked against the OS's and the
    /// applications' declared minimums (a VM's disk is its image's, grown as it writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsRequirement {
    pub name: String,
    /// Oldest acceptable version (dotted numbers); any version when absent.
    pub min_version: Option<String>,
}

/// Most vCPUs any VM may have (a request or a catalog entry asking more is malformed,
/// whatever the hosts).
pub const MAX_VCPUS: u32 = 64;

/// Most memory any VM may have, in MiB (256 GiB).
pub const MAX_MEMORY_MIB: u32 = 262_144;

/// A paused VM that could serve a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// `None` for a pre-OS hardware shell.
    pub os: Option<(String, String)>,
    pub apps: BTreeSet<String>,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    Exact,
    Superset,
    Partial,
}

impl MatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::Exact => "exact",
            MatchKind::Superset => "superset",
            MatchKind::Partial => "partial",
        }
    }
}

impl MachineRequest {
    /// A problem with the request itself, if any.
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 {
            return Err("vcpus must be at least 1".into());
        }
        if self.vcpus > MAX_VCPUS {
            return Err(format!(
                "vcpus must be at most {MAX_VCPUS}, not {}",
                self.vcpus
            ));
        }
        if self.memory_mib.min == 0 || self.memory_mib.min > self.memory_mib.max {
            return Err(format!(
                "memory_mib range {}..{} is empty",
                self.memory_mib.min, self.memory_mib.max
            ));
        }
        if self.memory_mib.min > MAX_MEMORY_MIB {
            return Err(format!(
                "memory_mib must be at most {MAX_MEMORY_MIB}, not {}",
                self.memory_mib.min
            ));
        }
        if let Some(version) = &self.os.min_version {
            parse_version(version)
                .ok_or_else(|| format!("os min_version {version:?} is not a dotted version"))?;
        }
        Ok(())
    }

    /// How `offer` can serve this request, if at all.
    pub fn classify(&self, offer: &Offer) -> Option<MatchKind> {
        let enough_hardware = offer.vcpus >= self.vcpus && offer.memory_mib >= self.memory_mib.min;
        if !enough_hardware {
            return None;
        }
        let Some((os_name, os_version)) = &offer.os else {
            // A shell can be given any OS image.
            return Some(MatchKind::Partial);
        };
        if *os_name != self.os.name || !offer.apps.is_superset(&self.apps) {
            return None;
        }
        let version_order = match &self.os.min_version {
            None => Ordering::Equal,
            Some(min) => compare_versions(os_version, min)?,
        };
        if version_order == Ordering::Less {
            return None;
        }
        let exact = offer.vcpus == self.vcpus
            && offer.memory_mib <= self.memory_mib.max
            && version_order == Ordering::Equal
            && offer.apps == self.apps;
        Some(if exact {
            MatchKind::Exact
        } else {
            MatchKind::Superset
        })
    }
}

/// The index of the best offer and how it matches: exact beats superset beats partial, and
/// within a kind the smallest offer wins. Ties go to the earliest offer.
pub fn best_match(request: &MachineRequest, offers: &[Offer]) -> Option<(usize, MatchKind)> {
    offers
        .iter()
        .enumerate()
        .filter_map(|(i, offer)| request.classify(offer).map(|kind| (i, kind, offer)))
        .min_by(|(ia, ka, a), (ib, kb, b)| {
            ka.cmp(kb)
                .then(a.memory_mib.cmp(&b.memory_mib))
                .then(a.vcpus.cmp(&b.vcpus))
                .then_with(|| match (&a.os, &b.os) {
                    (Some((_, va)), Some((_, vb))) => {
                        compare_versions(va, vb).unwrap_or(Ordering::Equal)
                    }
                    _ => Ordering::Equal,
                })
                .then(a.apps.len().cmp(&b.apps.len()))
                .then(ia.cmp(ib))
        })
        .map(|(i, kind, _)| (i, kind))
}

/// Parses `1.35.0` into its numbers.
pub fn parse_version(text: &str) -> Option<Vec<u64>> {
    text.split('.').map(|part| part.parse().ok()).collect()
}

/// Compares dotted versions numerically (`1.10 > 1.9`; `1.2 == 1.2.0`).
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (parse_version(a)?, parse_version(b)?);
    let len = a.len().max(b.len());
    let pad = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    Some(
        (0..len)
            .map(|i| pad(&a, i).cmp(&pad(&b, i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(
        vcpus: u32,
        min: u32,
        max: u32,
        version: Option<&str>,
        apps: &[&str],
    ) -> MachineRequest {
        MachineRequest {
            vcpus,
            memory_mib: MemoryRange { min, max },
            os: OsRequirement {
                name: "busybox".into(),
                min_version: version.map(String::from),
            },
            apps: apps.iter().map(|a| a.to_string()).collect(),
            disk_mib: None,
        }
    }

    fn offer(vcpus: u32, memory_mib: u32, version: Option<&str>, apps: &[&str]) -> Offer {
        Offer {
            vcpus,
            memory_mib,
            os: version.map(|v| ("busybox".to_string(), v.to_string())),
            apps: apps.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn absurd_sizes_are_malformed() {
        assert!(request(64, 128, 256, None, &[]).validate().is_ok());
        let err = request(1_000_000_000, 128, 256, None, &[])
            .validate()
            .unwrap_err();
        assert_eq!(err, "vcpus must be at most 64, not 1000000000");
        let err = request(1, 4_000_000_000, 4_000_000_000, None, &[])
            .validate()
            .unwrap_err();
        assert_eq!(err, "memory_mib must be at most 262144, not 4000000000");
        assert!(
            request(1, 128, u32::MAX, None, &[]).validate().is_ok(),
            "a large maximum is fine: the minimum is what a VM gets"
        );
    }

    #[test]
    fn classification() {
        let want = request(1, 128, 256, Some("1.35"), &["web"]);
        assert_eq!(
            want.classify(&offer(1, 256, Some("1.35.0"), &["web"])),
            Some(MatchKind::Exact)
        );
        assert_eq!(
            want.classify(&offer(2, 256, Some("1.35"), &["web"])),
            Some(MatchKind::Superset)
        );
        assert_eq!(
            want.classify(&offer(1, 512, Some("1.35"), &["web"])),
            Some(MatchKind::Superset)
        );
        assert_eq!(
            want.classify(&offer(1, 128, Some("1.36"), &["web"])),
            Some(MatchKind::Superset)
        );
        assert_eq!(
            want.classify(&offer(1, 128, Some("1.35"), &["web", "db"])),
            Some(MatchKind::Superset)
        );
        assert_eq!(
            want.classify(&offer(1, 128, None, &[])),
            Some(MatchKind::Partial)
        );
        assert_eq!(
            want.classify(&offer(1, 64, None, &[])),
            None,
            "shell too small"
        );
        assert_eq!(
            want.classify(&offer(1, 128, Some("1.34"), &["web"])),
            None,
            "OS too old"
        );
        assert_eq!(
            want.classify(&offer(1, 128, Some("1.35"), &["db"])),
            None,
            "app missing"
        );
        let mut other_os = offer(1, 128, Some("1.35"), &["web"]);
        other_os.os = Some(("debian".into(), "12".into()));
        assert_eq!(want.classify(&other_os), None);
    }

    #[test]
    fn best_match_prefers_exact_then_smallest_superset_then_partial() {
        let want = request(1, 128, 128, None, &["web"]);
        let offers = [
            offer(1, 128, None, &[]),
            offer(2, 512, Some("1.35"), &["web"]),
            offer(1, 256, Some("1.35"), &["web"]),
            offer(1, 128, Some("1.35"), &["web"]),
        ];
        assert_eq!(best_match(&want, &offers), Some((3, MatchKind::Exact)));
        assert_eq!(
            best_match(&want, &offers[..3]),
            Some((2, MatchKind::Superset))
        );
        assert_eq!(
            best_match(&want, &offers[..1]),
            Some((0, MatchKind::Partial))
        );
        assert_eq!(best_match(&want, &[]), None);
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("1.10", "1.9"), Some(Ordering::Greater));
        assert_eq!(compare_versions("1.2", "1.2.0"), Some(Ordering::Equal));
        assert_eq!(compare_versions("12", "11.9"), Some(Ordering::Greater));
        assert_eq!(compare_versions("x", "1"), None);
        assert!(request(1, 1, 1, Some("1.x"), &[]).validate().is_err());
        assert!(request(1, 256, 128, None, &[]).validate().is_err());
        assert!(request(0, 128, 128, None, &[]).validate().is_err());
    }

    fn arb_offer() -> impl Strategy<Value = Offer> {
        (
            1u32..5,
            prop::sample::select(vec![64u32, 128, 256, 512, 1024]),
            prop::option::of(prop::sample::select(vec!["1.34", "1.35", "1.36"])),
            prop::collection::btree_set(prop::sample::select(vec!["web", "db", "cache"]), 0..3),
        )
            .prop_map(|(vcpus, memory_mib, version, apps)| Offer {
                vcpus,
                memory_mib,
                os: version.map(|v| ("busybox".to_string(), v.to_string())),
                apps: apps.into_iter().map(String::from).collect(),
            })
    }

    fn arb_request() -> impl Strategy<Value = MachineRequest> {
        (
            1u32..4,
            prop::sample::select(vec![64u32, 128, 256, 512]),
            0u32..2,
            prop::option::of(prop::sample::select(vec!["1.34", "1.35", "1.36"])),
            prop::collection::btree_set(prop::sample::select(vec!["web", "db", "cache"]), 0..2),
        )
            .prop_map(|(vcpus, min, extra, version, apps)| MachineRequest {
                vcpus,
                memory_mib: MemoryRange {
                    min,
                    max: min * (1 + extra),
                },
                os: OsRequirement {
                    name: "busybox".into(),
                    min_version: version.map(String::from),
                },
                apps: apps.into_iter().map(String::from).collect(),
                disk_mib: None,
            })
    }

    proptest! {
        /// The chosen offer always satisfies the request, and no other offer of a better
        /// kind, or smaller of the same kind, was passed over.
        #[test]
        fn best_match_is_valid_and_optimal(request in arb_request(), offers in prop::collection::vec(arb_offer(), 0..12)) {
            let best = best_match(&request, &offers);
            let kinds: Vec<Option<MatchKind>> = offers.iter().map(|o| request.classify(o)).collect();
            match best {
                None => prop_assert!(kinds.iter().all(Option::is_none)),
                Some((i, kind)) => {
                    prop_assert_eq!(kinds[i], Some(kind));
                    let chosen = &offers[i];
                    prop_assert!(chosen.vcpus >= request.vcpus && chosen.memory_mib >= request.memory_mib.min);
                    if chosen.os.is_some() {
                        prop_assert!(chosen.apps.is_superset(&request.apps));
                    }
                    for (other, other_kind) in offers.iter().zip(&kinds) {
                        let Some(other_kind) = other_kind else { continue };
                        prop_assert!(kind <= *other_kind, "a better kind was passed over");
                        if *other_kind == kind {
                            prop_assert!(chosen.memory_mib <= other.memory_mib, "a smaller {:?} was passed over", kind);
                        }
                    }
                }
            }
        }

        /// An exact offer is always classified exact, and adding hardware makes it a superset.
        #[test]
        fn growing_an_exact_offer_makes_a_superset(request in arb_request()) {
            let exact = Offer {
                vcpus: request.vcpus,
                memory_mib: request.memory_mib.min,
                os: Some(("busybox".into(), request.os.min_version.clone().unwrap_or_else(|| "1.35".into()))),
                apps: request.apps.clone(),
            };
            prop_assert_eq!(request.classify(&exact), Some(MatchKind::Exact));
            let bigger = Offer { vcpus: exact.vcpus + 1, ..exact.clone() };
            prop_assert_eq!(request.classify(&bigger), Some(MatchKind::Superset));
            let shell = Offer { os: None, apps: BTreeSet::new(), ..exact };
            prop_assert_eq!(request.classify(&shell), Some(MatchKind::Partial));
        }
    }
}
