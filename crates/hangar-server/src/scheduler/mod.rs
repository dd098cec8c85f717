//! Placement in the request path: every VM made (a request's, a pool fill's, a template's)
//! goes to the host that [`hangar_core::placement::choose_host`] picks from the facts of
//! the hosts the server knows: one [`hangar_host::LocalHost`] in single-node mode. The
//! chosen host's name is recorded on the VM.

use std::sync::Arc;

use hangar_core::VmState;
use hangar_core::placement::{self, NoHost, VmNeeds, VmPriority};
use hangar_host::{Host, HostError, Purpose, VmPlan};
use hangar_store::VmRecord;

use crate::manager::Manager;

/// Why no host was chosen.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read the facts of host {host}")]
    Facts {
        host: String,
        #[source]
        source: HostError,
    },
    #[error("cannot count the VMs on the hosts")]
    Store(#[source] hangar_store::StoreError),
    #[error(transparent)]
    NoHost(#[from] NoHost),
}

/// The hosts the server knows, and the choice of one for each VM made.
pub struct Scheduler {
    hosts: Vec<Arc<dyn Host>>,
}

impl Scheduler {
    /// A scheduler over `hosts` (names unique).
    pub fn new(hosts: Vec<Arc<dyn Host>>) -> Scheduler {
        Scheduler { hosts }
    }

    /// The host named `name`, if known.
    pub fn host(&self, name: &str) -> Option<Arc<dyn Host>> {
        self.hosts.iter().find(|host| host.name() == name).cloned()
    }

    /// The host that makes the VM `plan` describes, given the VMs the store knows (their
    /// use of each host counts).
    pub async fn place(
        &self,
        vms: &[VmRecord],
        plan: &VmPlan,
    ) -> Result<Arc<dyn Host>, PlacementError> {
        let hosts = &self.hosts;
        let mut facts = Vec::with_capacity(hosts.len());
        for host in hosts {
            let known = host.facts().await.map_err(|source| PlacementError::Facts {
                host: host.name().to_owned(),
                source,
            })?;
            let mut entry = placement::HostFacts::new(
                host.name(),
                // The local host takes every VM it is given, as before placement: its
                // capacity is not limited here; a farm's hosts state theirs.
                u32::MAX,
                u64::MAX,
            );
            for vm in vms.iter().filter(|vm| {
                vm.host == host.name()
                    && matches!(
                        vm.state,
                        VmState::Creating
                            | VmState::Booting
                            | VmState::Ready
                            | VmState::Active
                            | VmState::Sleeping
                    )
            }) {
                entry.place(&VmNeeds {
                    vcpus: vm.vcpus,
                    memory_mib: u64::from(vm.memory_mib),
                    priority: VmPriority::Normal,
                    isolation: None,
                    on: Default::default(),
                });
            }
            entry.has_image = plan.service.as_ref().is_some_and(|service| {
                known.templates.iter().any(|id| {
                    id.rsplit_once('-')
                        .is_some_and(|(name, _)| name == service.name)
                })
            });
            facts.push(entry);
        }
        let needs = VmNeeds {
            vcpus: plan.vcpus,
            memory_mib: u64::from(plan.memory_mib),
            priority: match plan.purpose {
                Purpose::Request => VmPriority::High,
                Purpose::Pool | Purpose::Template => VmPriority::Low,
            },
            isolation: None,
            on: Default::default(),
        };
        let chosen = placement::choose_host(&facts, &needs)?.index;
        tracing::debug!(vm = %plan.id, host = %facts[chosen].name, "placed");
        Ok(hosts[chosen].clone())
    }
}

impl Manager {
    /// The host `vm` runs on (the one recorded when it was placed); the default host for a
    /// VM recorded on a host this server does not know.
    pub(crate) fn host_of(&self, vm: &VmRecord) -> Arc<dyn Host> {
        self.scheduler.host(&vm.host).unwrap_or_else(|| {
            tracing::warn!(vm = %vm.id, host = %vm.host, "vm on an unknown host; using the default");
            self.host.clone()
        })
    }

    /// The host that makes the VM `plan` describes.
    pub(crate) async fn place(&self, plan: &VmPlan) -> Result<Arc<dyn Host>, PlacementError> {
        let vms = self.store.vms(false).await.map_err(PlacementError::Store)?;
        self.scheduler.place(&vms, plan).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_host::{LocalHost, LocalHostConfig};
    use hangar_vmm::fake::FakeBackend;

    fn host(name: &str) -> Arc<dyn Host> {
        Arc::new(LocalHost::new(
            Arc::new(FakeBackend::new()),
            Arc::new(crate::images::NoImages),
            LocalHostConfig {
                name: name.into(),
                ..LocalHostConfig::default()
            },
        ))
    }

    fn plan(purpose: Purpose) -> VmPlan {
        VmPlan {
            id: "vm-new".into(),
            service: None,
            os: None,
            vcpus: 1,
            memory_mib: 256,
            env: Default::default(),
            hostname: "vm-new".into(),
            purpose,
            ready: None,
        }
    }

    #[tokio::test]
    async fn the_one_host_is_chosen_and_found_by_name() {
        let scheduler = Scheduler::new(vec![host("local")]);
        let chosen = scheduler.place(&[], &plan(Purpose::Request)).await.unwrap();
        assert_eq!(chosen.name(), "local");
        assert!(scheduler.host("local").is_some());
        assert!(scheduler.host("elsewhere").is_none());
    }

    #[tokio::test]
    async fn without_hosts_placement_says_why() {
        let scheduler = Scheduler::new(Vec::new());
        let err = scheduler
            .place(&[], &plan(Purpose::Pool))
            .await
            .err()
            .expect("no host");
        assert!(matches!(err, PlacementError::NoHost(_)), "{err}");
    }
}
