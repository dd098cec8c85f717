//! Where the VMs of a host being evacuated go, as a pure decision: each VM, one after
//! another, to the best other host by placement's rules ([`crate::placement::choose_host`]:
//! up, labels, isolation groups, room; then host priority, the VM's priority, load, cost,
//! name), counting the VMs already sent there in this evacuation. The caller moves them
//! (a migration per VM) and tells the decision when a move failed ([`Destinations::release`]).
//!
//! The source host is never a destination, whatever its state. A VM no host can take is
//! answered with placement's [`NoHost`] (why each host was ruled out); the evacuation goes
//! on with the others.

use crate::placement::{HostFacts, HostState, NoHost, Placement, VmNeeds, choose_host};

/// The farm as an evacuation sees it while it sends VMs away from its source host.
#[derive(Debug, Clone, PartialEq)]
pub struct Destinations {
    hosts: Vec<HostFacts>,
}

/// Where one VM goes, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The chosen host's name.
    pub host: String,
    /// Placement's answer (its `Display` is the one-line reason).
    pub placement: Placement,
}

impl Destinations {
    /// The decision over `hosts` (each with the use and isolation groups of the VMs it
    /// holds now; the evacuated VMs counted on `source` only), for VMs leaving `source`.
    pub fn new(mut hosts: Vec<HostFacts>, source: &str) -> Destinations {
        for host in hosts.iter_mut().filter(|host| host.name == source) {
            // Whatever the record says, nothing goes back to the host being emptied.
            host.state = HostState::Draining;
        }
        Destinations { hosts }
    }

    /// The best host for `vm` by placement's rules, recorded as holding it from now on
    /// (its vCPUs, memory and isolation group), so that the next choice counts it. `Err`
    /// when no host other than the source can take it, with why each was ruled out.
    pub fn choose(&mut self, vm: &VmNeeds) -> Result<Destination, NoHost> {
        let placement = choose_host(&self.hosts, vm)?;
        let host = &mut self.hosts[placement.index];
        host.place(vm);
        Ok(Destination {
            host: host.name.clone(),
            placement,
        })
    }

    /// A move to `host` chosen for `vm` failed: its vCPUs and memory are free there again.
    /// Its isolation group stays counted on `host` (another VM of the group may have been
    /// sent there too), which may only rule the host out for that group: never a breach.
    pub fn release(&mut self, host: &str, vm: &VmNeeds) {
        if let Some(host) = self.hosts.iter_mut().find(|h| h.name == host) {
            host.used_vcpus = host.used_vcpus.saturating_sub(vm.vcpus);
            host.used_memory_mib = host.used_memory_mib.saturating_sub(vm.memory_mib);
        }
    }

    /// The hosts as the decision counts them now.
    pub fn hosts(&self) -> &[HostFacts] {
        &self.hosts
    }
}

#[cfg(test)]
mod tests;
