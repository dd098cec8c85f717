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
use hangar_store::{HostRecord, HostState, HostUse, VmRecord};

pub mod capacity;
pub mod preview;

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

impl FarmHost {
    /// What placement knows of this host before its VMs' use is added: its state, size
    /// (vCPUs × [`VCPU_OVERCOMMIT`], memory), cost, priority, load and labels.
    pub fn placement_facts(&self) -> placement::HostFacts {
        let info = &self.info;
        let mut entry = placement::HostFacts::new(
            self.record.name.clone(),
            info.facts.vcpus.saturating_mul(VCPU_OVERCOMMIT),
            info.facts.memory_mib,
        );
        entry.state = match self.record.state {
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
        entry
    }
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
    /// What the VMs take of each host, as last read from the store (see
    /// [`Scheduler::host_use`]).
    used: tokio::sync::Mutex<UseCache>,
    connect: Option<Connector>,
    /// The server's own host's CPUs and memory, read once ([`capacity`]).
    pub(crate) local_size: std::sync::OnceLock<capacity::HostSize>,
}

impl Scheduler {
    /// A scheduler over the server's own host, if any, and farm hosts reached through
    /// `connect`.
    pub fn new(local: Option<Arc<dyn Host>>, connect: Option<Connector>) -> Scheduler {
        Scheduler {
            local,
            farm: RwLock::new(BTreeMap::new()),
            used: tokio::sync::Mutex::new(UseCache::default()),
            connect,
            local_size: std::sync::OnceLock::new(),
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

    /// Whether any farm host is known (without copying them).
    pub fn knows_farm_hosts(&self) -> bool {
        !self.farm.read().expect("farm lock").is_empty()
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
        let mut used: BTreeMap<&str, HostUse> = BTreeMap::new();
        for vm in vms.iter().filter(|vm| uses_its_host(vm.state)) {
            let entry = used.entry(vm.host.as_str()).or_insert_with(|| HostUse {
                host: vm.host.clone(),
                ..HostUse::default()
            });
            entry.vms = entry.vms.saturating_add(1);
            entry.vcpus = entry.vcpus.saturating_add(u64::from(vm.vcpus));
            entry.memory_mib = entry.memory_mib.saturating_add(u64::from(vm.memory_mib));
            if let Some(group) = &vm.isolation
                && !entry.groups.contains(group)
            {
                entry.groups.push(group.clone());
            }
        }
        let used: Vec<HostUse> = used.into_values().collect();
        self.place_with_use(&used, plan, constraints).await
    }

    /// [`Scheduler::place`] given what the VMs that take room ([`USES_ITS_HOST`]) take of
    /// each host, summed ([`hangar_store::Store::vm_use_by_host`]): no VM record is read,
    /// so a placement costs the same however many VMs the farm runs.
    pub async fn place_with_use(
        &self,
        used: &[HostUse],
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
        // An imported machine's disk is in this server's model store, which agents do not
        // pull: only the server's own host can boot it.
        let own_host_only = plan.service.as_ref().is_some_and(|s| s.imported);
        // Read under the lock: a clone of every host's last report (its VMs included) per
        // placement costs more than the decision.
        let farm = self.farm.read().expect("farm lock");
        for farm_host in farm.values().filter(|_| !own_host_only) {
            let info = &farm_host.info;
            let mut entry = farm_host.placement_facts();
            entry.has_template = holds_template(&info.facts.templates, plan);
            entry.has_image = holds_image(&info.facts.images, plan);
            hosts.push(farm_host.host.clone());
            facts.push(entry);
        }
        drop(farm);
        let by_name: std::collections::HashMap<&str, usize> = facts
            .iter()
            .enumerate()
            .map(|(i, entry)| (entry.name.as_str(), i))
            .collect();
        let mut adds: Vec<(usize, &HostUse)> = Vec::with_capacity(used.len());
        for host_use in used {
            if let Some(&i) = by_name.get(host_use.host.as_str()) {
                adds.push((i, host_use));
            }
        }
        drop(by_name);
        for (i, host_use) in adds {
            let entry = &mut facts[i];
            entry.used_vcpus = entry
                .used_vcpus
                .saturating_add(u32::try_from(host_use.vcpus).unwrap_or(u32::MAX));
            entry.used_memory_mib = entry.used_memory_mib.saturating_add(host_use.memory_mib);
            entry.groups.extend(host_use.groups.iter().cloned());
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

/// How long the hosts' use, read from the store, serves placements before it is read
/// again: VMs recorded by another replica of the control plane count within this time;
/// VMs this replica places count at once ([`Scheduler::placed`]).
pub const USE_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// The hosts' use as last read, and when.
#[derive(Default)]
struct UseCache {
    read_at: Option<std::time::Instant>,
    used: Arc<Vec<HostUse>>,
}

impl Scheduler {
    /// What the VMs that take room ([`USES_ITS_HOST`]) take of each host: summed by the
    /// store at most [`USE_REFRESH`] ago, plus the VMs this scheduler placed since. One
    /// caller reads the store at a time; the others wait for its answer.
    pub async fn host_use(
        &self,
        store: &dyn hangar_store::Store,
    ) -> Result<Arc<Vec<HostUse>>, hangar_store::StoreError> {
        let mut cache = self.used.lock().await;
        if cache.read_at.is_none_or(|at| at.elapsed() >= USE_REFRESH) {
            cache.used = Arc::new(store.vm_use_by_host(&USES_ITS_HOST).await?);
            cache.read_at = Some(std::time::Instant::now());
        }
        Ok(cache.used.clone())
    }

    /// Counts the VM of `plan` (in `constraints`' isolation group) just placed on `host` in
    /// the hosts' use until the store is read again (by then its record is there, or it is
    /// being prepared, as before this view).
    pub async fn placed(&self, host: &str, plan: &VmPlan, constraints: &Constraints) {
        let mut cache = self.used.lock().await;
        let used = Arc::make_mut(&mut cache.used);
        let index = match used.iter().position(|entry| entry.host == host) {
            Some(index) => index,
            None => {
                used.push(HostUse {
                    host: host.to_owned(),
                    ..HostUse::default()
                });
                used.len() - 1
            }
        };
        let entry = &mut used[index];
        entry.vms = entry.vms.saturating_add(1);
        entry.vcpus = entry.vcpus.saturating_add(u64::from(plan.vcpus));
        entry.memory_mib = entry.memory_mib.saturating_add(u64::from(plan.memory_mib));
        if let Some(group) = &constraints.isolation
            && !entry.groups.contains(group)
        {
            entry.groups.push(group.clone());
        }
    }
}

/// The states in which a VM takes room on its host.
pub const USES_ITS_HOST: [VmState; 5] = [
    VmState::Creating,
    VmState::Booting,
    VmState::Ready,
    VmState::Active,
    VmState::Sleeping,
];

/// Whether a VM in this state takes room on its host.
fn uses_its_host(state: VmState) -> bool {
    USES_ITS_HOST.contains(&state)
}

/// Whether `templates` (ids `<service>-<key>`) hold one of the plan's service.
fn holds_template(templates: &[String], plan: &VmPlan) -> bool {
    plan.service
        .as_ref()
        .is_some_and(|service| holds_service_template(templates, &service.name))
}

/// Whether `images` (roots held whole, `service@os`, as a host reports them) hold the
/// plan's root.
fn holds_image(images: &[String], plan: &VmPlan) -> bool {
    let (Some(service), Some(os)) = (&plan.service, &plan.os) else {
        return false;
    };
    images
        .iter()
        .any(|held| held.split_once('@') == Some((service.name.as_str(), os.as_str())))
}

/// Whether `templates` (ids `<service>-<key>`, as a host reports them) hold one of
/// `service`.
pub(crate) fn holds_service_template(templates: &[String], service: &str) -> bool {
    templates
        .iter()
        .any(|id| id.rsplit_once('-').is_some_and(|(name, _)| name == service))
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
        let placed = self.choose_host(plan, constraints).await?;
        self.scheduler
            .placed(placed.0.name(), plan, constraints)
            .await;
        Ok(placed)
    }

    /// The host [`Manager::place`] would choose for `plan` now, and why, without counting
    /// the VM on it.
    pub(crate) async fn choose_host(
        &self,
        plan: &VmPlan,
        constraints: &Constraints,
    ) -> Result<(Arc<dyn Host>, String), PlacementError> {
        if self.scheduler.local().is_none() && !self.scheduler.knows_farm_hosts() {
            // A control plane that knows no host yet (just started, or a standby whose
            // cache lags a registration made through another replica) reads them now.
            self.refresh_farm().await;
        }
        let used = self
            .scheduler
            .host_use(self.store.as_ref())
            .await
            .map_err(PlacementError::Store)?;
        self.scheduler
            .place_with_use(&used, plan, constraints)
            .await
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
            egress: Default::default(),
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
    async fn host_use_is_read_at_most_every_refresh_and_counts_placements_at_once() {
        let store = hangar_store::SqliteStore::open_in_memory().unwrap();
        let scheduler = Scheduler::new(None, None);
        assert!(scheduler.host_use(&store).await.unwrap().is_empty());
        let mut placed = plan(Purpose::Request);
        (placed.vcpus, placed.memory_mib) = (2, 512);
        let isolated = Constraints {
            isolation: Some("db".into()),
            ..Constraints::default()
        };
        scheduler.placed("a", &placed, &isolated).await;
        let expected = HostUse {
            host: "a".into(),
            vms: 1,
            vcpus: 2,
            memory_mib: 512,
            groups: vec!["db".into()],
        };
        assert_eq!(scheduler.host_use(&store).await.unwrap()[..], [expected]);

        // A VM recorded by someone else counts once the store is read again.
        let now = hangar_store::now_ms();
        hangar_store::Store::insert_vm(
            &store,
            &VmRecord {
                id: "vm-b".into(),
                host: "b".into(),
                services: Vec::new(),
                env: Default::default(),
                mode: hangar_core::Mode::Dedicated,
                owner: "test".into(),
                state: VmState::Active,
                endpoints: Default::default(),
                direct_endpoints: Default::default(),
                spec: serde_json::Value::Null,
                pid: None,
                error: None,
                created_at_ms: now,
                updated_at_ms: now,
                last_used_at_ms: now,
                state_since_ms: now,
                boot_ms: None,
                memory_mib: 256,
                vcpus: 1,
                pool: None,
                os: None,
                isolation: None,
            },
        )
        .await
        .unwrap();
        let hosts = |used: &[HostUse]| used.iter().map(|u| u.host.clone()).collect::<Vec<_>>();
        assert_eq!(hosts(&scheduler.host_use(&store).await.unwrap()), ["a"]);
        tokio::time::sleep(USE_REFRESH).await;
        assert_eq!(
            hosts(&scheduler.host_use(&store).await.unwrap()),
            ["b"],
            "read again: the store's records, and nothing placed since"
        );
    }

    /// A scheduler with no host of its own and one farm host, `agent`, with room.
    fn farm_only() -> Scheduler {
        let connect: Connector = Arc::new(|name: &str, _: &str| Ok(host(name)));
        let scheduler = Scheduler::new(None, Some(connect));
        let mut info = crate::farm::HostInfo::default();
        info.facts.vcpus = 8;
        info.facts.memory_mib = 16_384;
        scheduler.update_farm(vec![HostRecord {
            name: "agent".into(),
            address: "127.0.0.1:1".into(),
            state: HostState::Up,
            facts: serde_json::to_value(&info).unwrap(),
            last_heartbeat_ms: hangar_store::now_ms(),
        }]);
        scheduler
    }

    #[tokio::test]
    async fn an_imported_machine_is_placed_only_on_the_servers_own_host() {
        let scheduler = farm_only();
        let mut plan = plan(Purpose::Request);
        let (chosen, _) = scheduler
            .place(&[], &plan, &Constraints::default())
            .await
            .expect("a service of the catalog goes to the farm");
        assert_eq!(chosen.name(), "agent");

        let ports = BTreeMap::from([("http".to_string(), 80)]);
        plan.service = Some(hangar_core::catalog::Service::imported_machine(
            "brought",
            &ports,
            1,
            256,
            std::time::Duration::from_secs(60),
        ));
        let err = scheduler
            .place(&[], &plan, &Constraints::default())
            .await
            .err()
            .expect("no agent holds an imported machine's disk");
        assert!(matches!(err, PlacementError::NoHost(_)), "{err}");
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
