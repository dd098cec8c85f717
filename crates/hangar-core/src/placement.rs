//! Host choice for a new VM, as a pure decision: which host of a farm runs it, by state,
//! label constraints, isolation, capacity, the operator's host priority, load, cost and
//! what the host already holds. The caller applies it (starts the VM there and records the
//! host's new use with [`HostFacts::place`]).
//!
//! The rules, in order:
//! 1. **Eligible** hosts are [`HostState::Up`] (never draining, down or lost), carry every
//!    label the VM asks for ([`VmNeeds::on`]), hold no VM of the VM's isolation group
//!    (anti-affinity: never two VMs of one group on one host; VMs without a group go
//!    anywhere), and have room for its vCPUs and memory. A host failing several rules is
//!    ruled out by the first, in this order.
//! 2. Among eligible hosts, the highest host **priority** wins (operators fill preferred
//!    hosts first, e.g. owned before rented).
//! 3. Then by the VM's priority: a `high` VM goes to the **least loaded** host (then the
//!    cheapest); a `normal` VM to the **cheapest** (then the least loaded); a `low` VM to
//!    the cheapest, then the **most loaded** (packing, which keeps hosts free for others).
//!    Load is the largest of the vCPU and memory shares used once the VM is placed and of
//!    the host's reported one-minute load average per CPU; here it compares in steps of
//!    [`LOAD_STEP_PERMILLE`], so that hosts about as loaded count as equal.
//! 4. Then a host that holds the VM's template (a clone instead of a boot), then one that
//!    holds its image (nothing to copy).
//! 5. Then the exact load (as in rule 3), then the name, so that the choice never depends
//!    on the order hosts are listed in (names are unique).
//!
//! [`choose_host`] says why in a [`Placement`] (one line by its `Display`), or why no host
//! fits in a [`NoHost`]. Both stay short for any number of hosts: ruled-out hosts are
//! counted by reason and only a few are named.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Loads within one step (in thousandths) compare as equal in rule 3 of the module.
pub const LOAD_STEP_PERMILLE: u64 = 50;

/// The label every host has without being given it: its name. `--on hangar.host=NAME`
/// places a VM on that host only (a stack's members all go where its first one went).
pub const HOST_LABEL: &str = "hangar.host";

/// Ruled-out hosts named per reason in a [`RuledOut`], the first by name.
pub const EXAMPLES_PER_REASON: usize = 3;

/// Whether a host takes new VMs: only an `up` one does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    #[default]
    Up,
    /// Keeps what runs there, takes nothing new.
    Draining,
    /// Not answering.
    Down,
    /// Not answering for long enough that its VMs were given up.
    Lost,
}

impl HostState {
    /// The wire name: `up`, `draining`, `down` or `lost`.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Draining => "draining",
            HostState::Down => "down",
            HostState::Lost => "lost",
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the decision knows of one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Unique in the farm.
    pub name: String,
    pub state: HostState,
    /// vCPUs the host may give to VMs (its overcommit included).
    pub vcpus: u32,
    /// Guest memory the host may hold.
    pub memory_mib: u64,
    /// vCPUs of the VMs on the host (free: `vcpus - used_vcpus`).
    pub used_vcpus: u32,
    /// Memory of the VMs on the host (free: `memory_mib - used_memory_mib`).
    pub used_memory_mib: u64,
    /// Logical CPUs of the machine, what `load` is relative to; 0 leaves `load` out.
    pub cpus: u32,
    /// The one-minute load average the host reports (not finite or negative counts as 0).
    pub load: f64,
    /// Relative cost of a VM-hour here (any unit; lower is cheaper).
    pub cost: u32,
    /// Operator preference: higher is filled first.
    pub priority: i32,
    /// What `--on k=v` constraints match (and [`HOST_LABEL`], which every host has).
    pub labels: BTreeMap<String, String>,
    /// The isolation groups of the VMs on the host (anti-affinity).
    pub groups: BTreeSet<String>,
    /// Whether the VM's image is already on the host (set per decision by the caller).
    pub has_image: bool,
    /// Whether the VM's template is already on the host (set per decision by the caller);
    /// preferred over `has_image`.
    pub has_template: bool,
}

impl HostFacts {
    /// An empty, up, unlabelled, idle host of that size with as many CPUs as `vcpus`, cost 1,
    /// priority 0.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_mib: u64) -> HostFacts {
        HostFacts {
            name: name.into(),
            state: HostState::Up,
            vcpus,
            memory_mib,
            used_vcpus: 0,
            used_memory_mib: 0,
            cpus: vcpus,
            load: 0.0,
            cost: 1,
            priority: 0,
            labels: BTreeMap::new(),
            groups: BTreeSet::new(),
            has_image: false,
            has_template: false,
        }
    }

    /// Records `vm` as running here (what the caller does once the VM is started): its
    /// vCPUs, memory and isolation group.
    pub fn place(&mut self, vm: &VmNeeds) {
        self.used_vcpus = self.used_vcpus.saturating_add(vm.vcpus);
        self.used_memory_mib = self.used_memory_mib.saturating_add(vm.memory_mib);
        if let Some(group) = &vm.isolation
            && !self.groups.contains(group)
        {
            self.groups.insert(group.clone());
        }
    }

    /// vCPUs not given to VMs.
    pub fn free_vcpus(&self) -> u32 {
        self.vcpus.saturating_sub(self.used_vcpus)
    }

    /// Memory not given to VMs.
    pub fn free_memory_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.used_memory_mib)
    }

    fn fits(&self, vm: &VmNeeds) -> bool {
        vm.vcpus <= self.free_vcpus() && vm.memory_mib <= self.free_memory_mib()
    }

    /// The value of label `key` here: [`HOST_LABEL`] is the host's name, every other
    /// label is the host's own.
    fn label(&self, key: &str) -> Option<&str> {
        if key == HOST_LABEL {
            Some(&self.name)
        } else {
            self.labels.get(key).map(String::as_str)
        }
    }

    fn has_labels(&self, on: &BTreeMap<String, String>) -> bool {
        on.iter()
            .all(|(key, value)| self.label(key) == Some(value.as_str()))
    }

    /// Whether the host holds a VM of `vm`'s isolation group.
    fn holds_group(&self, vm: &VmNeeds) -> bool {
        vm.isolation
            .as_ref()
            .is_some_and(|group| self.groups.contains(group))
    }

    /// Whether this host may take `vm` (rule 1 of the module: up, labels, isolation, room).
    pub fn admits(&self, vm: &VmNeeds) -> bool {
        self.check(vm).is_ok()
    }

    /// The first rule of the module's rule 1 this host breaks for `vm`, without allocating.
    fn check(&self, vm: &VmNeeds) -> Result<(), Reason> {
        if self.state != HostState::Up {
            Err(Reason::NotUp)
        } else if !self.has_labels(&vm.on) {
            Err(Reason::Labels)
        } else if self.holds_group(vm) {
            Err(Reason::Isolation)
        } else if !self.fits(vm) {
            Err(Reason::Room)
        } else {
            Ok(())
        }
    }

    /// Why this host was ruled out for `vm` (for a host [`HostFacts::check`] refused).
    fn exclusion(&self, vm: &VmNeeds, reason: Reason) -> Exclusion {
        match reason {
            Reason::NotUp => Exclusion::NotUp(self.state),
            Reason::Labels => {
                let (key, wanted) = vm
                    .on
                    .iter()
                    .find(|(key, value)| self.label(key) != Some(value.as_str()))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .unwrap_or_default();
                let found = self.label(&key).map(str::to_owned);
                Exclusion::Label { key, wanted, found }
            }
            Reason::Isolation => Exclusion::Isolation(vm.isolation.clone().unwrap_or_default()),
            Reason::Room => Exclusion::NoRoom {
                free_vcpus: self.free_vcpus(),
                free_memory_mib: self.free_memory_mib(),
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
            },
        }
    }

    /// Load once `vm` is placed, in thousandths: the largest of the vCPU and memory shares
    /// and of the reported load per CPU.
    pub fn load_after(&self, vm: &VmNeeds) -> u64 {
        let share =
            |used: u64, total: u64| used.saturating_mul(1000).checked_div(total).unwrap_or(1000);
        let vcpus = share(
            u64::from(self.used_vcpus).saturating_add(u64::from(vm.vcpus)),
            u64::from(self.vcpus),
        );
        let memory = share(
            self.used_memory_mib.saturating_add(vm.memory_mib),
            self.memory_mib,
        );
        let reported = if self.cpus == 0 {
            0
        } else {
            // `as` saturates: infinity is the largest load, NaN and negatives are 0.
            (self.load * 1000.0 / f64::from(self.cpus)) as u64
        };
        vcpus.max(memory).max(reported)
    }

    fn locality(&self) -> Locality {
        if self.has_template {
            Locality::Template
        } else if self.has_image {
            Locality::Image
        } else {
            Locality::None
        }
    }
}

/// Whether `host` may take `vm`, moved there from another host (a migration or an
/// evacuation): the eligibility rules of the module's rule 1 (up, not draining; the labels;
/// no VM of its isolation group; room), without ranking. The VM's own use must not be
/// counted in `host` (it is on another host until it moves). `Err` says the first rule
/// the host breaks.
pub fn check_destination(host: &HostFacts, vm: &VmNeeds) -> Result<(), Exclusion> {
    host.check(vm).map_err(|reason| host.exclusion(vm, reason))
}

/// How much a VM matters, for where it goes (rule 3 of the module).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum VmPriority {
    Low,
    #[default]
    Normal,
    High,
}

/// What the VM to place needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNeeds {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub priority: VmPriority,
    /// Its isolation group (`--isolate GROUP`), if any: it never shares a host with
    /// another VM of the group.
    pub isolation: Option<String>,
    /// Labels the host must carry (`--on k=v`), every pair.
    #[serde(default)]
    pub on: BTreeMap<String, String>,
}

impl VmNeeds {
    /// A `normal` VM of that size, without isolation group or label constraints.
    pub fn new(vcpus: u32, memory_mib: u64) -> VmNeeds {
        VmNeeds {
            vcpus,
            memory_mib,
            ..VmNeeds::default()
        }
    }
}

/// Why a host was ruled out, as counted (the index into [`RuledOut`]'s counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    NotUp = 0,
    Labels = 1,
    Isolation = 2,
    Room = 3,
}

const REASONS: [Reason; 4] = [
    Reason::NotUp,
    Reason::Labels,
    Reason::Isolation,
    Reason::Room,
];

impl Reason {
    /// How a count of hosts ruled out for this reason reads: `3 {phrase}`.
    fn phrase(self) -> &'static str {
        match self {
            Reason::NotUp => "not up",
            Reason::Labels => "without the labels",
            Reason::Isolation => "holding the isolation group",
            Reason::Room => "without room",
        }
    }
}

/// Why one host was ruled out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclusion {
    /// Draining, down or lost.
    NotUp(HostState),
    /// The host lacks the label `key=wanted` (it has `key=found`, or no `key`).
    Label {
        key: String,
        wanted: String,
        found: Option<String>,
    },
    /// The host holds a VM of this isolation group.
    Isolation(String),
    /// Too few vCPUs or too little memory free for the VM's `vcpus` and `memory_mib`.
    NoRoom {
        free_vcpus: u32,
        free_memory_mib: u64,
        vcpus: u32,
        memory_mib: u64,
    },
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::NotUp(state) => write!(f, "{state}"),
            Exclusion::Label { key, wanted, found } => match found {
                Some(found) => write!(f, "label {key}={found}, not {wanted}"),
                None => write!(f, "no label {key}"),
            },
            Exclusion::Isolation(group) => write!(f, "isolation group {group}"),
            Exclusion::NoRoom {
                free_vcpus,
                free_memory_mib,
                vcpus,
                memory_mib,
            } => {
                let short_of_vcpus = vcpus > free_vcpus;
                let short_of_memory = memory_mib > free_memory_mib;
                f.write_str("no room: ")?;
                if short_of_vcpus {
                    write!(f, "{}", Vcpus(*free_vcpus))?;
                }
                if short_of_vcpus && short_of_memory {
                    f.write_str(" and ")?;
                }
                if short_of_memory || !short_of_vcpus {
                    write!(f, "{free_memory_mib} MiB")?;
                }
                f.write_str(" free")
            }
        }
    }
}

/// `1 vCPU`, `2 vCPUs`.
struct Vcpus(u32);

impl fmt::Display for Vcpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.0 == 1 { "" } else { "s" };
        write!(f, "{} vCPU{plural}", self.0)
    }
}

/// The hosts a decision ruled out: how many for each reason, and a few of them by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuledOut {
    /// Draining, down or lost.
    pub not_up: usize,
    /// Lacking a label the VM asks for.
    pub labels: usize,
    /// Holding a VM of the VM's isolation group.
    pub isolation: usize,
    /// Without room for the VM.
    pub room: usize,
    /// For each reason in the order above, the first [`EXAMPLES_PER_REASON`] hosts by name,
    /// and why.
    pub examples: Vec<(String, Exclusion)>,
}

impl RuledOut {
    /// Hosts ruled out, for any reason.
    pub fn total(&self) -> usize {
        self.not_up + self.labels + self.isolation + self.room
    }

    fn count(&self, reason: Reason) -> usize {
        match reason {
            Reason::NotUp => self.not_up,
            Reason::Labels => self.labels,
            Reason::Isolation => self.isolation,
            Reason::Room => self.room,
        }
    }
}

/// `N ruled out: a (down), b (no room: 256 MiB free)` when every ruled-out host is named;
/// otherwise counts by reason with a few names, `N ruled out: 12 not up (e.g. a, b), ...`.
impl fmt::Display for RuledOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ruled out", self.total())?;
        if self.total() == 0 {
            return Ok(());
        }
        f.write_str(": ")?;
        if self.examples.len() == self.total() {
            for (n, (name, why)) in self.examples.iter().enumerate() {
                let sep = if n == 0 { "" } else { ", " };
                write!(f, "{sep}{name} ({why})")?;
            }
            return Ok(());
        }
        let mut examples = self.examples.iter();
        let mut first = true;
        for reason in REASONS {
            let count = self.count(reason);
            if count == 0 {
                continue;
            }
            let sep = if first { "" } else { ", " };
            first = false;
            write!(f, "{sep}{count} {}", reason.phrase())?;
            if reason == Reason::Isolation
                && let Some((_, Exclusion::Isolation(group))) = self
                    .examples
                    .iter()
                    .find(|(_, why)| matches!(why, Exclusion::Isolation(_)))
            {
                write!(f, " {group}")?;
            }
            let names: Vec<&str> = examples
                .by_ref()
                .take(count.min(EXAMPLES_PER_REASON))
                .map(|(name, _)| name.as_str())
                .collect();
            if !names.is_empty() {
                write!(f, " (e.g. {})", names.join(", "))?;
            }
        }
        Ok(())
    }
}

/// What a host holds of the VM to place.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    #[default]
    None,
    /// The VM's image: nothing to copy.
    Image,
    /// The VM's template: a clone instead of a boot.
    Template,
}

/// The rule that set the chosen host apart from the next best (the module's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// No other host was eligible.
    Only,
    HostPriority,
    LeastLoaded,
    Cheapest,
    /// A `low` VM packed onto the busiest host.
    MostLoaded,
    /// It holds the template or image, the next best does not (or holds less).
    Locality,
    /// Equal on every other rule, first by name.
    Name,
}

/// The chosen host and why: `Display` says it in one line, e.g. `least loaded among 3
/// eligible hosts (load 12%, cost 1); holds the template; 2 ruled out: b (no room: 256 MiB
/// free), c (isolation group db)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The chosen host, as an index into the hosts given to [`choose_host`].
    pub index: usize,
    /// Hosts that could have run the VM, the chosen one included.
    pub eligible: usize,
    pub decided_by: Decision,
    /// The chosen host's priority.
    pub priority: i32,
    /// The chosen host's load once the VM is placed, in thousandths (see
    /// [`HostFacts::load_after`]).
    pub load_permille: u64,
    /// The chosen host's cost.
    pub cost: u32,
    /// What the chosen host holds of the VM.
    pub locality: Locality,
    pub ruled_out: RuledOut,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phrase = match self.decided_by {
            Decision::Only => "only eligible host",
            Decision::HostPriority => "highest host priority",
            Decision::LeastLoaded => "least loaded",
            Decision::Cheapest => "cheapest",
            Decision::MostLoaded => "most loaded (packing a low-priority VM)",
            Decision::Locality => match self.locality {
                Locality::Template => "holds the template",
                Locality::Image | Locality::None => "holds the image",
            },
            Decision::Name => "first by name of equals",
        };
        f.write_str(phrase)?;
        if self.decided_by == Decision::HostPriority {
            write!(f, " ({})", self.priority)?;
        }
        if self.decided_by != Decision::Only {
            write!(f, " among {} eligible hosts", self.eligible)?;
        }
        write!(
            f,
            " (load {}%, cost {})",
            self.load_permille.saturating_add(5) / 10,
            self.cost
        )?;
        if self.decided_by != Decision::Locality {
            match self.locality {
                Locality::Template => f.write_str("; holds the template")?,
                Locality::Image => f.write_str("; holds the image")?,
                Locality::None => {}
            }
        }
        if self.ruled_out.total() > 0 {
            write!(f, "; {}", self.ruled_out)?;
        }
        Ok(())
    }
}

/// Why no host was chosen: every host was ruled out (or none is known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NoHost {
    /// The VM that found no host (boxed: errors stay small).
    pub vm: Box<VmNeeds>,
    /// Hosts considered (all ruled out).
    pub hosts: usize,
    pub ruled_out: RuledOut,
}

impl fmt::Display for NoHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no host can run a VM of {} and {} MiB",
            Vcpus(self.vm.vcpus),
            self.vm.memory_mib
        )?;
        if let Some(group) = &self.vm.isolation {
            write!(f, " in isolation group {group}")?;
        }
        for (n, (key, value)) in self.vm.on.iter().enumerate() {
            let sep = if n == 0 { " on " } else { "," };
            write!(f, "{sep}{key}={value}")?;
        }
        if self.hosts == 0 {
            f.write_str(": no hosts are known")
        } else {
            write!(f, ": {}", self.ruled_out)
        }
    }
}

/// Ruled-out hosts as the decision loop sees them: counts, and the indices of the first
/// few by name for each reason (no allocation per host).
struct Tally {
    counts: [usize; 4],
    examples: [[Option<usize>; EXAMPLES_PER_REASON]; 4],
}

impl Tally {
    fn new() -> Tally {
        Tally {
            counts: [0; 4],
            examples: [[None; EXAMPLES_PER_REASON]; 4],
        }
    }

    fn note(&mut self, hosts: &[HostFacts], i: usize, reason: Reason) {
        let r = reason as usize;
        self.counts[r] += 1;
        let slots = &mut self.examples[r];
        let name = hosts[i].name.as_str();
        let Some(at) = slots
            .iter()
            .position(|slot| slot.is_none_or(|j| name < hosts[j].name.as_str()))
        else {
            return;
        };
        slots[at..].rotate_right(1);
        slots[at] = Some(i);
    }

    fn ruled_out(&self, hosts: &[HostFacts], vm: &VmNeeds) -> RuledOut {
        let examples = REASONS
            .iter()
            .flat_map(|&reason| {
                self.examples[reason as usize]
                    .iter()
                    .flatten()
                    .map(move |&i| (hosts[i].name.clone(), hosts[i].exclusion(vm, reason)))
            })
            .collect();
        RuledOut {
            not_up: self.counts[Reason::NotUp as usize],
            labels: self.counts[Reason::Labels as usize],
            isolation: self.counts[Reason::Isolation as usize],
            room: self.counts[Reason::Room as usize],
            examples,
        }
    }
}

/// The eligible host to run `vm` on, by the rules of this module, and why. The same hosts
/// in another order give the same host and the same explanation (names are unique).
/// Allocates only for the answer, never per host.
pub fn choose_host(hosts: &[HostFacts], vm: &VmNeeds) -> Result<Placement, NoHost> {
    let mut best: Option<(usize, Key<'_>)> = None;
    let mut next: Option<Key<'_>> = None;
    let mut eligible = 0;
    let mut tally = Tally::new();
    for (i, host) in hosts.iter().enumerate() {
        if let Err(reason) = host.check(vm) {
            tally.note(hosts, i, reason);
            continue;
        }
        eligible += 1;
        let key = key(host, vm);
        match &best {
            Some((_, known)) if key >= *known => {
                if next.as_ref().is_none_or(|next| key < *next) {
                    next = Some(key);
                }
            }
            _ => next = best.replace((i, key)).map(|(_, known)| known),
        }
    }
    let ruled_out = tally.ruled_out(hosts, vm);
    let Some((index, winner)) = best else {
        return Err(NoHost {
            vm: Box::new(vm.clone()),
            hosts: hosts.len(),
            ruled_out,
        });
    };
    let host = &hosts[index];
    Ok(Placement {
        index,
        eligible,
        decided_by: decided_by(&winner, next.as_ref(), vm.priority),
        priority: host.priority,
        load_permille: host.load_after(vm),
        cost: host.cost,
        locality: host.locality(),
        ruled_out,
    })
}

/// Ordering key of an eligible host: smaller is better. Host priority (negated), the two
/// criteria of the VM's priority, locality (0 template, 1 image, 2 neither), the exact load
/// (inverted for `low`), the name.
type Key<'a> = (i64, u64, u64, u8, u64, &'a str);

fn key<'a>(host: &'a HostFacts, vm: &VmNeeds) -> Key<'a> {
    let load = host.load_after(vm);
    let step = load / LOAD_STEP_PERMILLE;
    let cost = u64::from(host.cost);
    let (first, second, exact) = match vm.priority {
        VmPriority::High => (step, cost, load),
        VmPriority::Normal => (cost, step, load),
        VmPriority::Low => (cost, u64::MAX - step, u64::MAX - load),
    };
    let locality = match host.locality() {
        Locality::Template => 0,
        Locality::Image => 1,
        Locality::None => 2,
    };
    (
        -i64::from(host.priority),
        first,
        second,
        locality,
        exact,
        host.name.as_str(),
    )
}

/// The rule on which `winner` beat `next`, the best of the others.
fn decided_by(winner: &Key<'_>, next: Option<&Key<'_>>, priority: VmPriority) -> Decision {
    let Some(next) = next else {
        return Decision::Only;
    };
    let by_load = if priority == VmPriority::Low {
        Decision::MostLoaded
    } else {
        Decision::LeastLoaded
    };
    if winner.0 != next.0 {
        Decision::HostPriority
    } else if winner.1 != next.1 {
        match priority {
            VmPriority::High => Decision::LeastLoaded,
            VmPriority::Normal | VmPriority::Low => Decision::Cheapest,
        }
    } else if winner.2 != next.2 {
        match priority {
            VmPriority::High => Decision::Cheapest,
            VmPriority::Normal | VmPriority::Low => by_load,
        }
    } else if winner.3 != next.3 {
        Decision::Locality
    } else if winner.4 != next.4 {
        by_load
    } else {
        Decision::Name
    }
}

#[cfg(test)]
mod tests;
