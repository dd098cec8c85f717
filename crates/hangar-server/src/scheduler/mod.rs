//! Placement in the request path, and the hosts the server knows.
//!
//! Every VM made (a request's, a pool fill's, a template's) goes to the host that
//! [`hangar_core::placement::choose_host`] picks from live facts: the server's own
//! [`hangar_host::LocalHost`] (single-node mode), and the farm's hosts, each run by a
//! `hangar agent` that registered and keeps sending heartbeats (see [`crate::farm`]). The
//! chosen host's name is recorded on the VM; every later operation on the VM goes to that
//! host ([`Manager::host_of`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use hangar_core::VmState;
use hangar_core::placement::{self, NoHost, VmNeeds, VmPriority};
use hangar_host::{Host, HostError, Purpose, VmPlan};
use hangar_store::{HostRecord, HostState, VmRecord};

use crate::farm::HostInfo;
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

/// Makes the [`Host`] that speaks to a farm host's agent at an address (`name`,
/// `address`); a [`hangar_host::remote::RemoteHost`] in the server.
pub type Connector =
    Arc<dyn Fn(&str, &str) -> Result<Arc<dyn Host>, String> + Send + Sync + 'static>;

/// A farm host as the server knows it: its record (state, last heartbeat), what its agent
/// registered and last reported, and the connection to its agent.
#[derive(Clone)]
pub struct FarmHost {
    pub host: Arc<dyn Host>,
    pub record: HostRecord,
    pub info: HostInfo,
}

/// How many vCPUs of guests a farm host takes per CPU it has (guests mostly idle).
pub const VCPU_OVERCOMMIT: u32 = 4;

/// The hosts the server knows, and the choice of one for each VM made.
pub struct Scheduler {
    /// The server's own host (single-node mode); `None` for a control plane that runs no
    /// VMs itself.
    local: Option<Arc<dyn Host>>,
    /// Farm hosts by name, as the store last had them.
    farm: RwLock<BTreeMap<String, FarmHost>>,
    connect: Option<Connector>,
}

impl Scheduler {
    /// A scheduler over the server's own host, if any, and farm hosts reached through
    /// `connect`.
    pub fn new(local: Option<Arc<dyn Host>>, connect: Option<Connector>) -> Scheduler {
        Scheduler {
            local,
            farm: RwLock::new(BTreeMap::new()),
            connect,
        }
    }

    /// The server's own host, if it runs VMs.
    pub fn local(&self) -> Option<&Arc<dyn Host>> {
        self.local.as_ref()
    }

    /// The host named `name`, if known.
    pub fn host(&self, name: &str) -> Option<Arc<dyn Host>> {
        if let Some(local) = &self.local
            && local.name() == name
        {
            return Some(local.clone());
        }
        self.farm
            .read()
            .expect("farm lock")
            .get(name)
            .map(|entry| entry.host.clone())
    }

    /// The farm hosts now.
    pub fn farm_hosts(&self) -> Vec<FarmHost> {
        self.farm
            .read()
            .expect("farm lock")
            .values()
            .cloned()
            .collect()
    }

    /// One farm host.
    pub fn farm_host(&self, name: &str) -> Option<FarmHost> {
        self.farm.read().expect("farm lock").get(name).cloned()
    }

    /// Takes in what the store says of the farm hosts: new hosts are connected, changed
    /// addresses reconnected, records and reports replaced. The server's own host's record
    /// is skipped. Hosts the store no longer has are forgotten.
    pub fn update_farm(&self, records: Vec<HostRecord>) {
        let Some(connect) = &self.connect else {
            return;
        };
        let mut farm = self.farm.write().expect("farm lock");
        let mut seen = std::collections::HashSet::new();
        for record in records {
            if record.address.is_empty()
                || self
                    .local
                    .as_ref()
                    .is_some_and(|local| local.name() == record.name)
            {
                continue;
            }
            seen.insert(record.name.clone());
            let info: HostInfo = serde_json::from_value(record.facts.clone()).unwrap_or_default();
            let host = match farm.get(&record.name) {
                Some(known) if known.record.address == record.address => known.host.clone(),
                _ => match connect(&record.name, &record.address) {
                    Ok(host) => host,
                    Err(err) => {
                        tracing::warn!(host = %record.name, address = %record.address, error = %err, "cannot reach farm host");
                        continue;
                    }
                },
            };
            farm.insert(record.name.clone(), FarmHost { host, record, info });
        }
        farm.retain(|name, _| seen.contains(name));
    }

    /// The host that makes the VM `plan` describes, given the VMs the store knows (their
    /// use of each host counts), and why it was chosen.
    pub async fn place(
        &self,
        vms: &[VmRecord],
        plan: &VmPlan,
        constraints: &Constraints,
    ) -> Result<(Arc<dyn Host>, String), PlacementError> {
        let mut hosts: Vec<Arc<dyn Host>> = Vec::new();
        let mut facts = Vec::new();
        if let Some(local) = &self.local {
            let known = local
                .facts()
                .await
                .map_err(|source| PlacementError::Facts {
                    host: local.name().to_owned(),
                    source,
                })?;
            // The server's own host takes every VM it is given, as before placement: its
            // capacity is not limited here; a farm's hosts state theirs.
            let mut entry = placement::HostFacts::new(local.name(), u32::MAX, u64::MAX);
            entry.cpus = known.vcpus;
            entry.load = known.load;
            entry.has_template = holds_template(&known.templates, plan);
            hosts.push(local.clone());
            facts.push(entry);
        }
        for farm_host in self.farm_hosts() {
            let info = &farm_host.info;
            let mut entry = placement::HostFacts::new(
                farm_host.record.name.clone(),
                info.facts.vcpus.saturating_mul(VCPU_OVERCOMMIT),
                info.facts.memory_mib,
            );
            entry.state = match farm_host.record.state {
                HostState::Up => placement::HostState::Up,
                HostState::Draining => placement::HostState::Draining,
                HostState::Down => placement::HostState::Down,
                HostState::Lost => placement::HostState::Lost,
            };
            entry.cost = info.cost;
            entry.priority = info.priority;
            entry.cpus = info.facts.vcpus;
            entry.load = info.facts.load;
            entry.labels = info.labels.clone();
            entry.has_template = holds_template(&info.facts.templates, plan);
            hosts.push(farm_host.host.clone());
            facts.push(entry);
        }
        for vm in vms.iter().filter(|vm| uses_its_host(vm.state)) {
            if let Some(entry) = facts.iter_mut().find(|entry| entry.name == vm.host) {
                entry.place(&VmNeeds {
                    vcpus: vm.vcpus,
                    memory_mib: u64::from(vm.memory_mib),
                    priority: VmPriority::Normal,
                    isolation: vm.isolation.clone(),
                    on: Default::default(),
                });
            }
        }
        let needs = VmNeeds {
            vcpus: plan.vcpus,
            memory_mib: u64::from(plan.memory_mib),
            // Requests and pool fills go to the least loaded host: a pool is spread over
            // the farm, so that losing a host loses a part of it. Templates pack.
            priority: match plan.purpose {
                Purpose::Request | Purpose::Pool => VmPriority::High,
                Purpose::Template => VmPriority::Low,
            },
            isolation: constraints.isolation.clone(),
            on: constraints.on.clone(),
        };
        let placement = placement::choose_host(&facts, &needs)?;
        let chosen = placement.index;
        let why = placement.to_string();
        tracing::debug!(vm = %plan.id, host = %facts[chosen].name, "placed");
        Ok((hosts[chosen].clone(), why))
    }
}

/// What a request asks of the host beyond room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// No other VM of this isolation group on the host.
    pub isolation: Option<String>,
    /// Labels the host must carry.
    pub on: BTreeMap<String, String>,
}

/// Whether a VM in this state takes room on its host.
fn uses_its_host(state: VmState) -> bool {
    matches!(
        state,
        VmState::Creating | VmState::Booting | VmState::Ready | VmState::Active | VmState::Sleeping
    )
}

/// Whether `templates` (ids `<service>-<key>`) hold one of the plan's service.
fn holds_template(templates: &[String], plan: &VmPlan) -> bool {
    plan.service.as_ref().is_some_and(|service| {
        templates.iter().any(|id| {
            id.rsplit_once('-')
                .is_some_and(|(name, _)| name == service.name)
        })
    })
}

impl Manager {
    /// The host `vm` runs on (the one recorded when it was placed). A VM recorded on a host
    /// this server does not know gets a host whose every operation fails, saying so.
    pub(crate) fn host_of(&self, vm: &VmRecord) -> Arc<dyn Host> {
        self.scheduler.host(&vm.host).unwrap_or_else(|| {
            tracing::warn!(vm = %vm.id, host = %vm.host, "vm on a host this server does not know");
            Arc::new(crate::farm::UnknownHost::new(&vm.host))
        })
    }

    /// The host of the VM with this id ([`Manager::host_of`]); the server's own host when
    /// the store has no such VM.
    pub(crate) async fn host_of_id(&self, id: &str) -> Arc<dyn Host> {
        match self.store.vm(id).await {
            Ok(Some(vm)) => self.host_of(&vm),
            _ => self.default_host(),
        }
    }

    /// The server's own host, or (a control plane without one) a host whose every
    /// operation fails.
    pub(crate) fn default_host(&self) -> Arc<dyn Host> {
        match self.scheduler.local() {
            Some(local) => local.clone(),
            None => Arc::new(crate::farm::UnknownHost::new("")),
        }
    }

    /// The host that makes the VM `plan` describes, and why it was chosen.
    pub(crate) async fn place(
        &self,
        plan: &VmPlan,
        constraints: &Constraints,
    ) -> Result<(Arc<dyn Host>, String), PlacementError> {
        if self.scheduler.local().is_none() && self.scheduler.farm_hosts().is_empty() {
            // A control plane that knows no host yet (just started, or a standby whose
            // cache lags a registration made through another replica) reads them now.
            self.refresh_farm().await;
        }
        let vms = self.store.vms(false).await.map_err(PlacementError::Store)?;
        self.scheduler.place(&vms, plan, constraints).await
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
        let scheduler = Scheduler::new(Some(host("local")), None);
        let (chosen, _) = scheduler
            .place(&[], &plan(Purpose::Request), &Constraints::default())
            .await
            .unwrap();
        assert_eq!(chosen.name(), "local");
        assert!(scheduler.host("local").is_some());
        assert!(scheduler.host("elsewhere").is_none());
    }

    #[tokio::test]
    async fn without_hosts_placement_says_why() {
        let scheduler = Scheduler::new(None, None);
        let err = scheduler
            .place(&[], &plan(Purpose::Pool), &Constraints::default())
            .await
            .err()
            .expect("no host");
        assert!(matches!(err, PlacementError::NoHost(_)), "{err}");
    }
}
