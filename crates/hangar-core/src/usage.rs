//! Usage metering for billing, as a pure computation: from the record of each VM's state
//! changes ([`UsageEvent`], written by the store in the same statement as the change), the
//! time each VM spent in each state within a window, summed per user, service or host,
//! and priced.
//!
//! Every event starts an interval that lasts until the VM's next event (or the end of the
//! window); `deleted` and `failed` end a VM's life and are not metered. An interval is
//! attributed to the owner, services and host the VM had when it began. Metered:
//! - `active`: VM-seconds, vCPU-hours and GiB-hours of memory;
//! - `sleeping` (paused in memory): VM-seconds and GiB-hours of memory;
//! - `archived`: VM-seconds and GB-hours of archive (its size, in 10^9 bytes);
//! - everything else a VM lives through (being made, booting, paused in a pool, lost):
//!   VM-seconds, as `other`, so that the states of a VM add up to its life.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::VmState;

/// One state change of a VM, with what it was then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub vm_id: String,
    pub state: VmState,
    pub at_ms: u64,
    pub owner: String,
    /// The services the VM offers, joined with `+` (empty for a bare OS or a shell).
    pub services: String,
    pub host: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The size of its archive, when the state is `archived`.
    pub archive_bytes: u64,
}

/// What usage is summed by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageBy {
    #[default]
    User,
    Service,
    Host,
    Vm,
}

impl UsageBy {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageBy::User => "user",
            UsageBy::Service => "service",
            UsageBy::Host => "host",
            UsageBy::Vm => "vm",
        }
    }
}

impl std::str::FromStr for UsageBy {
    type Err = String;
    fn from_str(text: &str) -> Result<UsageBy, String> {
        [UsageBy::User, UsageBy::Service, UsageBy::Host, UsageBy::Vm]
            .into_iter()
            .find(|by| by.as_str() == text)
            .ok_or_else(|| format!("usage is summed by user, service, host or vm, not {text:?}"))
    }
}

/// Prices of what is metered (in any currency; 0: free).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Prices {
    /// Per vCPU-hour of an active VM.
    pub active_vcpu_hour: f64,
    /// Per GiB-hour of an active VM's memory.
    pub active_gib_hour: f64,
    /// Per GiB-hour of a sleeping VM's memory (held on its host).
    pub sleeping_gib_hour: f64,
    /// Per GB-hour (10^9 bytes) of archive.
    pub archive_gb_hour: f64,
}

/// What one user, service, host or VM used within the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// The user, service(s), host or VM.
    pub key: String,
    pub vms: u64,
    pub active_s: f64,
    pub sleeping_s: f64,
    pub archived_s: f64,
    /// Being made, booting, paused in a pool, lost.
    pub other_s: f64,
    pub active_vcpu_hours: f64,
    pub active_gib_hours: f64,
    pub sleeping_gib_hours: f64,
    pub archive_gb_hours: f64,
    /// The above at [`Prices`].
    pub cost: f64,
}

impl UsageRow {
    /// Every second metered, whatever the state.
    pub fn total_s(&self) -> f64 {
        self.active_s + self.sleeping_s + self.archived_s + self.other_s
    }

    fn price(&mut self, prices: &Prices) {
        self.cost = self.active_vcpu_hours * prices.active_vcpu_hour
            + self.active_gib_hours * prices.active_gib_hour
            + self.sleeping_gib_hours * prices.sleeping_gib_hour
            + self.archive_gb_hours * prices.archive_gb_hour;
    }
}

/// Sums the intervals of `events` that fall in `[since_ms, until_ms)` by `by`, priced at
/// `prices`; rows in key order. Each VM's events must come in the order they were
/// recorded (VMs may interleave); an event stamped earlier than the one before it (two
/// clocks a millisecond apart) counts as starting when that one did.
pub fn meter(
    events: &[UsageEvent],
    since_ms: u64,
    until_ms: u64,
    by: UsageBy,
    prices: &Prices,
) -> Vec<UsageRow> {
    let mut per_vm: BTreeMap<&str, Vec<&UsageEvent>> = BTreeMap::new();
    for event in events {
        per_vm.entry(&event.vm_id).or_default().push(event);
    }
    let mut rows: BTreeMap<String, (UsageRow, std::collections::BTreeSet<&str>)> = BTreeMap::new();
    for (vm, events) in per_vm {
        let mut began = 0;
        for (i, event) in events.iter().enumerate() {
            began = began.max(event.at_ms);
            if matches!(event.state, VmState::Deleted | VmState::Failed) {
                continue;
            }
            let end = events
                .get(i + 1)
                .map_or(until_ms, |next| next.at_ms.max(began));
            let (start, end) = (began.max(since_ms), end.min(until_ms));
            if end <= start {
                continue;
            }
            let seconds = (end - start) as f64 / 1000.0;
            let hours = seconds / 3600.0;
            let key = match by {
                UsageBy::User => event.owner.clone(),
                UsageBy::Service => event.services.clone(),
                UsageBy::Host => event.host.clone(),
                UsageBy::Vm => vm.to_owned(),
            };
            let (row, vms) = rows.entry(key.clone()).or_insert_with(|| {
                (
                    UsageRow {
                        key,
                        ..UsageRow::default()
                    },
                    Default::default(),
                )
            });
            vms.insert(vm);
            let gib = f64::from(event.memory_mib) / 1024.0;
            match event.state {
                VmState::Active => {
                    row.active_s += seconds;
                    row.active_vcpu_hours += f64::from(event.vcpus) * hours;
                    row.active_gib_hours += gib * hours;
                }
                VmState::Sleeping => {
                    row.sleeping_s += seconds;
                    row.sleeping_gib_hours += gib * hours;
                }
                VmState::Archived => {
                    row.archived_s += seconds;
                    row.archive_gb_hours += event.archive_bytes as f64 / 1e9 * hours;
                }
                _ => row.other_s += seconds,
            }
        }
    }
    rows.into_values()
        .map(|(mut row, vms)| {
            row.vms = vms.len() as u64;
            row.price(prices);
            row
        })
        .collect()
}

/// The sum of `rows` (key `total`).
pub fn total(rows: &[UsageRow]) -> UsageRow {
    let mut sum = UsageRow {
        key: "total".into(),
        ..UsageRow::default()
    };
    for row in rows {
        sum.vms += row.vms;
        sum.active_s += row.active_s;
        sum.sleeping_s += row.sleeping_s;
        sum.archived_s += row.archived_s;
        sum.other_s += row.other_s;
        sum.active_vcpu_hours += row.active_vcpu_hours;
        sum.active_gib_hours += row.active_gib_hours;
        sum.sleeping_gib_hours += row.sleeping_gib_hours;
        sum.archive_gb_hours += row.archive_gb_hours;
        sum.cost += row.cost;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(vm: &str, state: VmState, at_s: u64, owner: &str) -> UsageEvent {
        UsageEvent {
            vm_id: vm.into(),
            state,
            at_ms: at_s * 1000,
            owner: owner.into(),
            services: "web".into(),
            host: "local".into(),
            vcpus: 2,
            memory_mib: 512,
            archive_bytes: if state == VmState::Archived {
                2_000_000_000
            } else {
                0
            },
        }
    }

    #[test]
    fn a_vms_states_add_up_to_its_life_and_are_priced() {
        use VmState::*;
        let events = [
            event("a", Creating, 0, "ann"),
            event("a", Booting, 1, "ann"),
            event("a", Active, 3, "ann"),
            event("a", Sleeping, 3603, "ann"),
            event("a", Archived, 5403, "ann"),
            event("a", Deleted, 9003, "ann"),
            event("b", Active, 0, "bob"),
        ];
        let prices = Prices {
            active_vcpu_hour: 1.0,
            active_gib_hour: 0.5,
            sleeping_gib_hour: 0.1,
            archive_gb_hour: 0.01,
        };
        let rows = meter(&events, 0, 10_000_000, UsageBy::User, &prices);
        assert_eq!(rows.len(), 2);
        let ann = &rows[0];
        assert_eq!((ann.key.as_str(), ann.vms), ("ann", 1));
        assert_eq!(
            (ann.other_s, ann.active_s, ann.sleeping_s, ann.archived_s),
            (3.0, 3600.0, 1800.0, 3600.0)
        );
        assert_eq!(ann.total_s(), 9003.0, "its life, creation to deletion");
        assert_eq!(ann.active_vcpu_hours, 2.0);
        assert_eq!(ann.active_gib_hours, 0.5);
        assert_eq!(ann.sleeping_gib_hours, 0.25);
        assert_eq!(ann.archive_gb_hours, 2.0);
        let cost = 2.0 + 0.25 + 0.025 + 0.02;
        assert!((ann.cost - cost).abs() < 1e-9, "{}", ann.cost);
        assert_eq!(
            rows[1].active_s, 10_000.0,
            "still active: metered to the end"
        );

        // A window cuts intervals; by host, both VMs in one row.
        let rows = meter(&events, 3000 * 1000, 4000 * 1000, UsageBy::Host, &prices);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].vms, rows[0].active_s, rows[0].sleeping_s),
            (2, 1603.0, 397.0)
        );
        assert_eq!(total(&rows).total_s(), 2000.0);
    }

    #[test]
    fn by_parses() {
        assert_eq!("service".parse::<UsageBy>(), Ok(UsageBy::Service));
        assert!("owner".parse::<UsageBy>().is_err());
    }
}
