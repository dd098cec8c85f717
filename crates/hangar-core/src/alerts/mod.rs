//! Alerts: what the control plane warns operators about, and when an alert fires and
//! resolves. Pure: the server observes (hosts, pools, tasks, VM failures) and feeds
//! [`Observation`]s with the clock to [`evaluate`]; it stores the alerts and sends the
//! transitions to its sinks.
//!
//! One alert per `key` (its kind and subject, e.g. `host_down/host1`). Its life:
//!
//! ```text
//! (condition seen) → pending ──(true for `for`)──→ firing ──(false for `hold`)──→ resolved
//!        ╰─ seen false while pending: forgotten      ╰─ seen true again: stays firing
//! ```
//!
//! So an observation that toggles faster than `hold` fires once and stays firing, and one
//! true for less than `for` never fires: nothing flaps. A resolved alert is kept (for
//! `hangar alerts --all`) until `keep_resolved` has passed, unless its condition returns,
//! which starts a new episode under the same key.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod rules;

pub use rules::{AlertConfig, AlertConfigError, Rule, WebhookConfig};

/// What an alert is about: one per rule.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A farm host stopped sending heartbeats (`down` or `lost`).
    HostDown,
    /// A warm pool holds no ready VM while requests ask for it.
    PoolEmpty,
    /// A host's free disk is below a threshold.
    HostDisk,
    /// A host's memory in use is above a share of its memory.
    HostMemory,
    /// The warm pools hold more than a share of the server's pool memory budget.
    PoolMemory,
    /// VMs of a service failed (crashed) N times within a window.
    VmCrashing,
    /// A migration task failed.
    MigrationFailed,
}

impl AlertKind {
    /// Every kind, in the order listings show them.
    pub const ALL: [AlertKind; 7] = [
        AlertKind::HostDown,
        AlertKind::PoolEmpty,
        AlertKind::HostDisk,
        AlertKind::HostMemory,
        AlertKind::PoolMemory,
        AlertKind::VmCrashing,
        AlertKind::MigrationFailed,
    ];

    /// The rule's name in the configuration and the store (`host_down`).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::HostDown => "host_down",
            AlertKind::PoolEmpty => "pool_empty",
            AlertKind::HostDisk => "host_disk",
            AlertKind::HostMemory => "host_memory",
            AlertKind::PoolMemory => "pool_memory",
            AlertKind::VmCrashing => "vm_crashing",
            AlertKind::MigrationFailed => "migration_failed",
        }
    }

    /// The alert's name as webhooks receive it (`alertname`, Alertmanager's CamelCase).
    pub fn alert_name(self) -> &'static str {
        match self {
            AlertKind::HostDown => "HostDown",
            AlertKind::PoolEmpty => "PoolEmpty",
            AlertKind::HostDisk => "HostDiskLow",
            AlertKind::HostMemory => "HostMemoryHigh",
            AlertKind::PoolMemory => "PoolMemoryHigh",
            AlertKind::VmCrashing => "VmCrashing",
            AlertKind::MigrationFailed => "MigrationFailed",
        }
    }

    /// The kind named `name` (as [`AlertKind::as_str`] writes it).
    pub fn parse(name: &str) -> Option<AlertKind> {
        AlertKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }

    /// The key of this kind's alert about `subject`: `kind/subject`.
    pub fn key(self, subject: &str) -> String {
        format!("{}/{subject}", self.as_str())
    }
}

/// A condition seen true in one look at the farm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The alert it is about ([`AlertKind::key`]).
    pub key: String,
    pub kind: AlertKind,
    /// What it is about (`host`, `pool`, `service`, `task`, ...).
    pub labels: BTreeMap<String, String>,
    /// One line for people.
    pub summary: String,
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Its condition holds, not yet for its rule's `for`.
    Pending,
    /// Firing: its condition held for `for` and has not been false for `hold` since.
    Firing,
    /// Its condition was false for `hold` after it fired.
    Resolved,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Firing => "firing",
            Phase::Resolved => "resolved",
        }
    }

    pub fn parse(name: &str) -> Option<Phase> {
        [Phase::Pending, Phase::Firing, Phase::Resolved]
            .into_iter()
            .find(|phase| phase.as_str() == name)
    }
}

/// One alert, as the store keeps it (every replica answers the same, and a restarted
/// leader goes on from it instead of firing again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub key: String,
    pub kind: AlertKind,
    pub labels: BTreeMap<String, String>,
    /// As observed when the alert became pending (kept, so that a summary that counts
    /// seconds does not rewrite the row every look).
    pub summary: String,
    pub phase: Phase,
    /// When its condition was first seen true in this episode (ms since the epoch).
    pub active_since_ms: u64,
    /// When it fired; none while pending.
    pub firing_since_ms: Option<u64>,
    /// While firing: since when its condition has been seen false; none while it holds.
    pub clear_since_ms: Option<u64>,
    /// When it resolved; none unless resolved.
    pub resolved_at_ms: Option<u64>,
}

/// How long a rule's condition must hold before its alert fires, and be false before it
/// resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// True this long (from the first look that saw it) → firing. Zero: at once.
    pub for_: Duration,
    /// False this long while firing → resolved. Zero: at the first look that sees it false.
    pub hold: Duration,
}

/// A change operators are told about (log, webhook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Fired,
    Resolved,
}

/// What one look changes: alerts to write, keys to remove, transitions to announce (each
/// with the alert as written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub changed: Vec<Alert>,
    pub removed: Vec<String>,
    pub transitions: Vec<(Transition, Alert)>,
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// One look: `previous` (the stored alerts), what is true now (`observed`, at most one
/// per key), each kind's [`Timing`], the clock. Alerts whose condition is not observed
/// count as false. Returns only what changed, so a quiet farm writes nothing. Resolved
/// alerts are removed once `keep_resolved` has passed since they resolved.
pub fn evaluate(
    previous: &[Alert],
    observed: &[Observation],
    timing: impl Fn(AlertKind) -> Timing,
    now_ms: u64,
    keep_resolved: Duration,
) -> Step {
    let mut step = Step::default();
    let seen: HashMap<&str, &Observation> = observed.iter().map(|o| (o.key.as_str(), o)).collect();
    let known: HashMap<&str, &Alert> = previous.iter().map(|a| (a.key.as_str(), a)).collect();
    for alert in previous {
        let rule = timing(alert.kind);
        match (alert.phase, seen.get(alert.key.as_str())) {
            (Phase::Pending, Some(_)) => {
                if now_ms.saturating_sub(alert.active_since_ms) >= ms(rule.for_) {
                    step.fire(Alert {
                        phase: Phase::Firing,
                        firing_since_ms: Some(now_ms),
                        ..alert.clone()
                    });
                }
            }
            (Phase::Pending, None) => step.removed.push(alert.key.clone()),
            (Phase::Firing, Some(_)) => {
                if alert.clear_since_ms.is_some() {
                    step.changed.push(Alert {
                        clear_since_ms: None,
                        ..alert.clone()
                    });
                }
            }
            (Phase::Firing, None) => match alert.clear_since_ms {
                Some(since) if now_ms.saturating_sub(since) >= ms(rule.hold) => {
                    step.resolve(alert, now_ms)
                }
                Some(_) => {}
                None if rule.hold.is_zero() => step.resolve(alert, now_ms),
                None => step.changed.push(Alert {
                    clear_since_ms: Some(now_ms),
                    ..alert.clone()
                }),
            },
            (Phase::Resolved, Some(observation)) => step.begin(observation, rule, now_ms),
            (Phase::Resolved, None) => {
                let resolved = alert.resolved_at_ms.unwrap_or(alert.active_since_ms);
                if now_ms.saturating_sub(resolved) >= ms(keep_resolved) {
                    step.removed.push(alert.key.clone());
                }
            }
        }
    }
    for observation in observed {
        if !known.contains_key(observation.key.as_str()) {
            step.begin(observation, timing(observation.kind), now_ms);
        }
    }
    step
}

impl Step {
    /// A new episode of `observation`'s alert: pending, or firing at once when its rule
    /// waits for nothing.
    fn begin(&mut self, observation: &Observation, rule: Timing, now_ms: u64) {
        let alert = Alert {
            key: observation.key.clone(),
            kind: observation.kind,
            labels: observation.labels.clone(),
            summary: observation.summary.clone(),
            phase: Phase::Pending,
            active_since_ms: now_ms,
            firing_since_ms: None,
            clear_since_ms: None,
            resolved_at_ms: None,
        };
        if rule.for_.is_zero() {
            self.fire(Alert {
                phase: Phase::Firing,
                firing_since_ms: Some(now_ms),
                ..alert
            });
        } else {
            self.changed.push(alert);
        }
    }

    fn fire(&mut self, alert: Alert) {
        self.transitions.push((Transition::Fired, alert.clone()));
        self.changed.push(alert);
    }

    fn resolve(&mut self, alert: &Alert, now_ms: u64) {
        let resolved = Alert {
            phase: Phase::Resolved,
            resolved_at_ms: Some(now_ms),
            ..alert.clone()
        };
        self.transitions
            .push((Transition::Resolved, resolved.clone()));
        self.changed.push(resolved);
    }
}

/// `alerts` with `step` applied (as the store holds them after writing it), in key order.
pub fn apply(alerts: &[Alert], step: &Step) -> Vec<Alert> {
    let mut by_key: BTreeMap<String, Alert> = alerts
        .iter()
        .map(|alert| (alert.key.clone(), alert.clone()))
        .collect();
    for key in &step.removed {
        by_key.remove(key);
    }
    for alert in &step.changed {
        by_key.insert(alert.key.clone(), alert.clone());
    }
    by_key.into_values().collect()
}

#[cfg(test)]
mod tests;
