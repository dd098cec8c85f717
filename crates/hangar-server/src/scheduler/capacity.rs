//! Whether a VM of a size can run on any host at all: a request larger than every host the
//! scheduler knows is refused before anything is made (issue 13, finding 4), with the
//! limit it passed.
//!
//! A host's size is what it has, not what is free: a VM larger than any host can never
//! run, whereas one that does not fit now waits for room (placement answers that, 503).
//! The server's own host counts with its CPUs and memory (read once: they do not change
//! while the server runs); farm hosts with what their agents last reported, unless they
//! are lost. A VM may have at most as many vCPUs as a host has CPUs, and at most its
//! memory.

use hangar_store::HostState;

use crate::manager::Manager;

/// The size of one host, as the size check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSize {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// A VM larger than every host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    #[error("{asked} vCPUs asked; the largest host has {largest}")]
    Vcpus { asked: u32, largest: u32 },
    #[error("{asked} MiB of memory asked; the largest host has {largest} MiB")]
    Memory { asked: u64, largest: u64 },
    #[error(
        "{vcpus} vCPUs and {memory_mib} MiB asked together; no host has both (the largest: {hosts})"
    )]
    Both {
        vcpus: u32,
        memory_mib: u64,
        hosts: String,
    },
}

/// Whether a VM of `vcpus` and `memory_mib` fits on one of `hosts`. No hosts at all: it
/// fits (nothing is known to refuse it; placement says there is no host).
pub fn check_size(hosts: &[HostSize], vcpus: u32, memory_mib: u64) -> Result<(), TooLarge> {
    if hosts.is_empty()
        || hosts
            .iter()
            .any(|host| host.cpus >= vcpus && host.memory_mib >= memory_mib)
    {
        return Ok(());
    }
    let most_cpus = hosts.iter().map(|host| host.cpus).max().unwrap_or(0);
    let most_memory = hosts.iter().map(|host| host.memory_mib).max().unwrap_or(0);
    if vcpus > most_cpus {
        return Err(TooLarge::Vcpus {
            asked: vcpus,
            largest: most_cpus,
        });
    }
    if memory_mib > most_memory {
        return Err(TooLarge::Memory {
            asked: memory_mib,
            largest: most_memory,
        });
    }
    let mut largest: Vec<&HostSize> = hosts.iter().collect();
    largest.sort_by_key(|host| std::cmp::Reverse((host.cpus, host.memory_mib)));
    Err(TooLarge::Both {
        vcpus,
        memory_mib,
        hosts: largest
            .iter()
            .take(3)
            .map(|host| {
                format!(
                    "{} with {} vCPUs and {} MiB",
                    host.name, host.cpus, host.memory_mib
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    })
}

impl Manager {
    /// The sizes of the hosts a VM could ever be placed on: the server's own, and the
    /// farm's hosts that are not lost.
    pub(crate) async fn host_sizes(&self) -> Vec<HostSize> {
        let mut sizes = Vec::new();
        if let Some(local) = self.scheduler.local() {
            if let Some(size) = self.scheduler.local_size.get() {
                sizes.push(size.clone());
            } else {
                match local.facts().await {
                    Ok(facts) => {
                        let size = HostSize {
                            name: local.name().to_owned(),
                            cpus: facts.vcpus,
                            memory_mib: facts.memory_mib,
                        };
                        let _ = self.scheduler.local_size.set(size.clone());
                        sizes.push(size);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot read the facts of the server's own host");
                    }
                }
            }
        }
        // Read under the lock: a copy of every host's report is more than this needs.
        let farm = self.scheduler.farm.read().expect("farm lock");
        for farm_host in farm.values() {
            if farm_host.record.state == HostState::Lost {
                continue;
            }
            sizes.push(HostSize {
                name: farm_host.record.name.clone(),
                cpus: farm_host.info.facts.vcpus,
                memory_mib: farm_host.info.facts.memory_mib,
            });
        }
        sizes
    }

    /// Refuses a VM larger than every host ([`check_size`]).
    pub(crate) async fn check_vm_size(&self, vcpus: u32, memory_mib: u32) -> Result<(), TooLarge> {
        check_size(&self.host_sizes().await, vcpus, u64::from(memory_mib))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cpus: u32, memory_mib: u64) -> HostSize {
        HostSize {
            name: name.into(),
            cpus,
            memory_mib,
        }
    }

    #[test]
    fn the_limit_passed_is_named() {
        let two_cores = [host("local", 2, 24_000)];
        assert_eq!(check_size(&two_cores, 2, 24_000), Ok(()));
        assert_eq!(
            check_size(&two_cores, 16, 12_288).unwrap_err().to_string(),
            "16 vCPUs asked; the largest host has 2"
        );
        assert_eq!(
            check_size(&two_cores, 1, 30_000).unwrap_err().to_string(),
            "30000 MiB of memory asked; the largest host has 24000 MiB"
        );
        let farm = [host("a", 8, 4096), host("b", 2, 65_536)];
        assert_eq!(check_size(&farm, 8, 4096), Ok(()));
        assert_eq!(check_size(&farm, 2, 65_536), Ok(()));
        let err = check_size(&farm, 8, 65_536).unwrap_err().to_string();
        assert_eq!(
            err,
            "8 vCPUs and 65536 MiB asked together; no host has both (the largest: a with 8 vCPUs and 4096 MiB, b with 2 vCPUs and 65536 MiB)"
        );
        assert_eq!(check_size(&[], 64, 1 << 20), Ok(()), "no host known");
    }
}
