//! Quotas per user (the VM's owner): how many VMs, vCPUs, MiB of memory and bytes of
//! archives a user's VMs may take together, and the pure check of a new VM against them.
//!
//! What counts (the store sums it, [`Usage`]): a user's VMs that are not in a warm pool
//! and are not deleted or failed count as VMs; those that take room on a host (being made,
//! ready, active, sleeping) count with their vCPUs and memory; archived ones with the size
//! of their archive. A shared VM counts for the user it was made for; being granted an
//! existing shared VM costs nothing.

use serde::{Deserialize, Serialize};

/// The most a user may hold; `None`: no limit.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub vms: Option<u64>,
    #[serde(default)]
    pub vcpus: Option<u64>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Bytes of archives (archived VMs' memory snapshots).
    #[serde(default)]
    pub archive_bytes: Option<u64>,
}

/// What a user's VMs take (or what one new VM asks).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct Usage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub archive_bytes: u64,
}

impl Usage {
    /// One VM of this size.
    pub fn vm(vcpus: u32, memory_mib: u32) -> Usage {
        Usage {
            vms: 1,
            vcpus: u64::from(vcpus),
            memory_mib: u64::from(memory_mib),
            archive_bytes: 0,
        }
    }

    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            vms: self.vms.saturating_add(other.vms),
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            archive_bytes: self.archive_bytes.saturating_add(other.archive_bytes),
        }
    }

    pub fn minus(self, other: Usage) -> Usage {
        Usage {
            vms: self.vms.saturating_sub(other.vms),
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            archive_bytes: self.archive_bytes.saturating_sub(other.archive_bytes),
        }
    }
}

/// A new VM that would take a user past one of their limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "quota of {user} exceeded: {what} would be {would_be}, the quota is {limit} ({held} held or being made)"
)]
pub struct QuotaExceeded {
    pub user: String,
    /// `vms`, `vcpus`, `memory_mib` or `archive_bytes`.
    pub what: &'static str,
    pub limit: u64,
    pub held: u64,
    pub would_be: u64,
}

impl Limits {
    /// No limit on anything.
    pub const UNLIMITED: Limits = Limits {
        vms: None,
        vcpus: None,
        memory_mib: None,
        archive_bytes: None,
    };

    /// Whether `held` (what the user's VMs take, those being made included) plus `asked`
    /// stays within every limit; the first limit passed is the error. A limit already
    /// passed (lowered below what is held) refuses anything that adds to it; a user whose
    /// archives take more than their archive limit gets no new VM (a new VM adds no
    /// archive, but would be archived in its turn) until they delete some.
    pub fn check(&self, user: &str, held: Usage, asked: Usage) -> Result<(), QuotaExceeded> {
        let after = held.plus(asked);
        for (what, limit, held, asked, would_be) in [
            ("vms", self.vms, held.vms, asked.vms, after.vms),
            ("vcpus", self.vcpus, held.vcpus, asked.vcpus, after.vcpus),
            (
                "memory_mib",
                self.memory_mib,
                held.memory_mib,
                asked.memory_mib,
                after.memory_mib,
            ),
            (
                "archive_bytes",
                self.archive_bytes,
                held.archive_bytes,
                asked.archive_bytes,
                after.archive_bytes,
            ),
        ] {
            let over_archives = what == "archive_bytes" && asked == 0 && held > 0;
            if let Some(limit) = limit
                && (asked > 0 || over_archives)
                && would_be > limit
            {
                return Err(QuotaExceeded {
                    user: user.to_owned(),
                    what,
                    limit,
                    held,
                    would_be,
                });
            }
        }
        Ok(())
    }

    /// Parses `vms=10,vcpus=16,memory=32768,archive=10240` (memory and archive in MiB;
    /// `none` or an empty text: no limits). Keys left out have no limit.
    pub fn parse(text: &str) -> Result<Limits, String> {
        let mut limits = Limits::UNLIMITED;
        let text = text.trim();
        if text.is_empty() || text == "none" {
            return Ok(limits);
        }
        for part in text.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not KEY=NUMBER"))?;
            let value: u64 = value.trim().parse().map_err(|_| {
                format!("{key}={value}: the limit must be a whole number of 0 or more")
            })?;
            match key.trim() {
                "vms" => limits.vms = Some(value),
                "vcpus" => limits.vcpus = Some(value),
                "memory" | "memory_mib" => limits.memory_mib = Some(value),
                "archive" | "archive_mib" => {
                    limits.archive_bytes = Some(value.saturating_mul(1 << 20));
                }
                other => {
                    return Err(format!(
                        "unknown quota {other:?} (known: vms, vcpus, memory, archive)"
                    ));
                }
            }
        }
        Ok(limits)
    }
}

impl std::fmt::Display for Limits {
    /// `vms=3, vcpus=4, memory=1024 MiB, archive=unlimited`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |limit: Option<u64>, unit: &str| match limit {
            Some(limit) => format!("{limit}{unit}"),
            None => "unlimited".into(),
        };
        write!(
            f,
            "vms={}, vcpus={}, memory={}, archive={}",
            show(self.vms, ""),
            show(self.vcpus, ""),
            show(self.memory_mib, " MiB"),
            show(self.archive_bytes.map(|b| b >> 20), " MiB"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_limit_passed_is_named() {
        let limits = Limits {
            vms: Some(3),
            vcpus: Some(4),
            memory_mib: Some(1024),
            archive_bytes: None,
        };
        let held = Usage {
            vms: 2,
            vcpus: 2,
            memory_mib: 512,
            archive_bytes: 1 << 40,
        };
        assert_eq!(limits.check("ann", held, Usage::vm(1, 256)), Ok(()));
        let err = limits
            .check("ann", held.plus(Usage::vm(1, 256)), Usage::vm(1, 256))
            .unwrap_err();
        assert_eq!((err.what, err.limit, err.would_be), ("vms", 3, 4));
        assert_eq!(
            err.to_string(),
            "quota of ann exceeded: vms would be 4, the quota is 3 (3 held or being made)"
        );
        let err = limits.check("ann", held, Usage::vm(3, 256)).unwrap_err();
        assert_eq!(err.what, "vcpus");
        let err = limits.check("ann", held, Usage::vm(1, 1024)).unwrap_err();
        assert_eq!(err.what, "memory_mib");
        assert_eq!(
            Limits::UNLIMITED.check("ann", held, Usage::vm(64, 1 << 18)),
            Ok(())
        );
        // Over the archive limit already: no new VM until archives are deleted.
        let tight = Limits {
            archive_bytes: Some(1 << 30),
            ..Limits::UNLIMITED
        };
        let err = tight.check("ann", held, Usage::vm(1, 128)).unwrap_err();
        assert_eq!((err.what, err.would_be), ("archive_bytes", 1 << 40));
        let roomy = Limits {
            archive_bytes: Some(1 << 41),
            ..Limits::UNLIMITED
        };
        assert_eq!(roomy.check("ann", held, Usage::vm(1, 128)), Ok(()));
    }

    #[test]
    fn limits_parse_from_a_flag() {
        assert_eq!(Limits::parse("none"), Ok(Limits::UNLIMITED));
        assert_eq!(Limits::parse(""), Ok(Limits::UNLIMITED));
        assert_eq!(
            Limits::parse("vms=10, vcpus=16,memory=32768,archive=2"),
            Ok(Limits {
                vms: Some(10),
                vcpus: Some(16),
                memory_mib: Some(32768),
                archive_bytes: Some(2 << 20),
            })
        );
        assert!(
            Limits::parse("vms=-1")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(
            Limits::parse("disks=1")
                .unwrap_err()
                .contains("unknown quota")
        );
        assert!(Limits::parse("vms").unwrap_err().contains("KEY=NUMBER"));
        assert_eq!(
            Limits::parse("vms=3,memory=1024").unwrap().to_string(),
            "vms=3, vcpus=unlimited, memory=1024 MiB, archive=unlimited"
        );
    }
}
