//! The farm: hosts beyond the server's own, each run by a `hangar agent`.
//!
//! An agent registers (`POST /v1/hosts`), then sends a heartbeat every second with its
//! facts and the VMs it runs. The server keeps what it learns in the store's host records
//! (so that every replica of the control plane sees the same farm) and in the
//! [`crate::scheduler::Scheduler`]'s cache of them, which placement reads.
//!
//! - [`token`]: the farm token hosts prove themselves with.
//! - [`agents`]: registration, heartbeats, fencing, and the hosts as listed.
//! - [`loss`]: hosts that stop answering: `down`, then `lost`; their VMs marked lost and
//!   shared services with demand made again elsewhere.
//! - [`leader`]: which replica of the control plane runs the loops.
//! - [`unknown`]: the host of a VM whose host this server does not know.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hangar_api::{HostFactsView, HostVmView};
use serde::{Deserialize, Serialize};

pub mod agents;
pub mod leader;
pub mod loss;
pub mod token;
pub mod unknown;

pub use agents::FarmError;
pub use unknown::UnknownHost;

/// What the server keeps of a farm host beyond its name, address, state and last
/// heartbeat: what its agent registered and last reported. Stored as the host record's
/// facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The agent process it came from (changes when the agent starts again).
    pub incarnation: String,
    pub labels: BTreeMap<String, String>,
    pub cost: u32,
    pub priority: i32,
    pub facts: HostFactsView,
    /// The VMs it runs, as last reported.
    pub vms: Vec<HostVmView>,
}

/// When hosts that stop sending heartbeats are declared down, then lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossTimes {
    /// No heartbeat for this long: `down` (nothing new is placed there).
    pub down_after: Duration,
    /// No heartbeat for this long: `lost` (its VMs are marked lost and replaced).
    pub lost_after: Duration,
}

impl Default for LossTimes {
    fn default() -> Self {
        LossTimes {
            down_after: Duration::from_secs(3),
            lost_after: Duration::from_secs(6),
        }
    }
}

/// This server's farm state.
#[derive(Debug)]
pub struct FarmRuntime {
    /// Whether this replica runs the loops (pools, lifecycle, images, host loss). A single
    /// server always does.
    leading: AtomicBool,
    /// Why each VM made by this replica went to its host (most recent first out when
    /// full).
    placements: Mutex<lru_map::Recent>,
}

impl Default for FarmRuntime {
    fn default() -> Self {
        FarmRuntime {
            leading: AtomicBool::new(true),
            placements: Mutex::new(lru_map::Recent::new(PLACEMENTS_KEPT)),
        }
    }
}

/// How many placement explanations are kept.
const PLACEMENTS_KEPT: usize = 4096;

impl FarmRuntime {
    /// Records why VM `vm` was placed where it is.
    pub fn placed(&self, vm: &str, why: &str) {
        self.placements
            .lock()
            .expect("placements lock")
            .insert(vm.to_owned(), why.to_owned());
    }

    /// Why VM `vm` was placed where it is, if this replica placed it recently.
    pub fn placement(&self, vm: &str) -> Option<String> {
        self.placements.lock().expect("placements lock").get(vm)
    }

    /// Whether this replica leads now.
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// Records whether this replica leads; returns whether that changed.
    pub fn set_leading(&self, leading: bool) -> bool {
        self.leading.swap(leading, Ordering::SeqCst) != leading
    }
}

/// Whether `name` may name a host: 1 to 63 of letters, digits, `-`, `_` and `.`, not
/// starting with a dot.
pub fn valid_host_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A bounded map that forgets its oldest entries.
mod lru_map {
    use std::collections::{HashMap, VecDeque};

    #[derive(Debug)]
    pub struct Recent {
        capacity: usize,
        order: VecDeque<String>,
        values: HashMap<String, String>,
    }

    impl Recent {
        pub fn new(capacity: usize) -> Recent {
            Recent {
                capacity,
                order: VecDeque::new(),
                values: HashMap::new(),
            }
        }

        pub fn insert(&mut self, key: String, value: String) {
            if self.values.insert(key.clone(), value).is_none() {
                self.order.push_back(key);
            }
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.values.remove(&old);
                }
            }
        }

        pub fn get(&self, key: &str) -> Option<String> {
            self.values.get(key).cloned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_plain_words() {
        assert!(valid_host_name("agent-1.rack_2"));
        assert!(!valid_host_name(""));
        assert!(!valid_host_name(".hidden"));
        assert!(!valid_host_name("a/b"));
        assert!(!valid_host_name("a b"));
        assert!(!valid_host_name(&"x".repeat(64)));
    }

    #[test]
    fn placements_are_remembered_up_to_a_bound() {
        let farm = FarmRuntime::default();
        for i in 0..PLACEMENTS_KEPT + 10 {
            farm.placed(&format!("vm-{i}"), &format!("why {i}"));
        }
        assert_eq!(farm.placement("vm-0"), None, "the oldest are forgotten");
        let last = PLACEMENTS_KEPT + 9;
        assert_eq!(
            farm.placement(&format!("vm-{last}")),
            Some(format!("why {last}"))
        );
    }
}

#[cfg(test)]
pub(crate) mod farm_tests;
