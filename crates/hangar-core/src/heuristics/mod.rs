//! The heuristics engine (seed 003): what a configuration request can get, and why.
//!
//! [`check`] is pure. Given a configuration request ([`Ask`]: vCPUs, memory, disk, OS and
//! minimum version, applications, settings, exact size), the [`Catalog`], the sizes of the
//! hosts VMs can run on and what is on hand ([`Supply`]: paused pool VMs and pre-OS shells,
//! service templates, built images), it answers a [`Verdict`]:
//!
//! - **every problem** with the request ([`validate`]), each with a machine-readable
//!   [`ProblemCode`], the field it is about, a message and a concrete suggestion. Hard
//!   problems ([`Severity::Error`]) mean the request can never be served as asked;
//! - **the candidates** that could serve it ([`rank`]), of four kinds ([`CandidateKind`]):
//!   a paused VM of exactly that configuration, a larger one (a superset), a pre-OS shell
//!   given the OS image (partial) or given the apps' layers at deploy (partial + install),
//!   or a new VM (build: cloned from a template, booted from a built image, or built
//!   first). Each has an estimated cost to deliver ([`Cost`]) and what it wastes beyond the
//!   request ([`Waste`]); a candidate that cannot serve the request as asked (it cannot be
//!   sliced to the exact size, its OS cannot go on a shell, ...) is listed with the reason
//!   it is `blocked`, never chosen;
//! - **the chosen** candidate, the first of the ranking, with a one-line reason.
//!
//! The ranking is a total order, independent of the order candidates are given in:
//! unblocked first, then by time class ([`TimeClass`]), then by waste (memory, vCPUs,
//! apps), then by estimated milliseconds, then by kind, then by source name.
//!
//! The server fills [`Supply`] from its store and caches and dispatches on the chosen
//! [`CandidateKind`]; this module does no IO.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Catalog;
use crate::matching::MachineRequest;

pub mod costs;
mod rank;
mod validate;

#[cfg(test)]
mod tests;

pub use rank::rank;
pub use validate::{memory_floor, validate};

/// Least memory any VM may have, in MiB (the catalog's floor for a VM's size).
pub const VM_MIN_MEMORY_MIB: u32 = 64;

/// What a configuration request asks for, as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub machine: MachineRequest,
    /// The request's settings (`--env KEY=VALUE`); `os` is not a setting.
    pub settings: BTreeMap<String, String>,
    /// The VM must have exactly the requested vCPUs and at most the requested memory
    /// (larger VMs are sliced down, or not chosen).
    pub exact_size: bool,
}

/// The size of a host VMs can run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostLimit {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// A paused pool VM: booted to its service's ready state, or a pre-OS shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolVm {
    /// Its id (names the candidate).
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// `None` for a pre-OS shell; else (name, version).
    pub os: Option<(String, String)>,
    /// The services it offers.
    pub apps: BTreeSet<String>,
    /// Whether it can be sliced down (balloon, vCPUs offline). A VM whose memory is a
    /// template's file mapped privately cannot: ballooning it would write the template.
    pub sliceable: bool,
}

/// What is on hand to serve a request; filled by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Supply {
    /// Paused pool VMs and pre-OS shells.
    pub pool: Vec<PoolVm>,
    /// Services with a template (a new VM is cloned, not booted).
    pub templates: BTreeSet<String>,
    /// Services whose image on the requested OS is built (every layer cached).
    pub images: BTreeSet<String>,
    /// Whether this server attaches apps' layers to a pre-OS shell at deploy (partial +
    /// install); without it such candidates are listed but blocked.
    pub install_at_deploy: bool,
    /// Whether this server composes several applications into one VM's service (then a
    /// new VM of several applications can be built); without it a build of several is
    /// blocked.
    pub compose: bool,
}

/// Everything [`check`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub ask: &'a Ask,
    pub catalog: &'a Catalog,
    /// Hosts VMs can run on (none known: no host limit is checked).
    pub hosts: &'a [HostLimit],
    pub supply: &'a Supply,
}

/// How bad a problem is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The request can never be served as asked (422).
    Error,
    /// Served, but probably not as meant.
    Warning,
}

/// What is wrong, for programs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ProblemCode {
    /// Fewer than one vCPU.
    VcpusZero,
    /// More vCPUs than any VM may have.
    VcpusOverMax,
    /// More vCPUs than the largest host has.
    VcpusOverHost,
    /// A memory range whose minimum is above its maximum, or 0.
    MemoryRangeEmpty,
    /// Less memory than any VM may have.
    MemoryBelowVmMin,
    /// More memory than any VM may have.
    MemoryOverMax,
    /// More memory than the largest host has.
    MemoryOverHost,
    /// The vCPUs and memory fit hosts separately, but no host has both.
    SizeOverHost,
    /// Less memory than the OS needs.
    MemoryBelowOsMin,
    /// Less memory than an application needs.
    MemoryBelowAppMin,
    /// Fewer vCPUs than an application needs.
    VcpusBelowAppMin,
    /// Less disk than the OS and applications need.
    DiskBelowMin,
    /// No OS of that name.
    UnknownOs,
    /// A minimum version that is not dotted numbers.
    BadVersion,
    /// The OS is older than the minimum version asked.
    OsTooOld,
    /// No application of that name.
    UnknownApp,
    /// The application never runs on that OS.
    AppNotOnOs,
    /// Two applications (or what they need) conflict.
    Conflict,
    /// Two applications cannot share one VM: the same guest port, or a port, process,
    /// file or setting of the same name meaning different things.
    Clash,
    /// A setting without a default was not given.
    MissingSetting,
    /// A setting's value is not in its format.
    BadSetting,
    /// A setting no requested application has.
    UnknownSetting,
    /// Nothing on hand or buildable can serve the request as asked.
    NoCandidate,
}

/// One problem with a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    pub code: ProblemCode,
    pub severity: Severity,
    /// The request field it is about: `vcpus`, `memory_mib`, `disk_mib`, `os`,
    /// `os.min_version`, `apps`, `env.KEY`, `exact_size`.
    pub field: String,
    pub message: String,
    /// What to ask instead (never empty).
    pub suggestion: String,
}

/// The kinds of candidates, best first when all else is equal. The server dispatches on it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CandidateKind {
    /// A paused VM of exactly the configuration: resumed and re-identified.
    Exact,
    /// A paused VM with more (vCPUs, memory, a newer OS, more apps): resumed, sliced
    /// down with exact size.
    Superset,
    /// A pre-OS shell given the requested image (OS and apps in one disk) and booted.
    Partial,
    /// A pre-OS shell given the OS layer and the apps' layers at deploy and booted.
    PartialInstall,
    /// A new VM: cloned from a template, booted from a built image, or its image built
    /// first.
    Build,
}

impl CandidateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Exact => "exact",
            CandidateKind::Superset => "superset",
            CandidateKind::Partial => "partial",
            CandidateKind::PartialInstall => "partial_install",
            CandidateKind::Build => "build",
        }
    }
}

/// How long a candidate takes to deliver, in classes a person reads at a glance.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TimeClass {
    /// Under 100 ms: a paused VM resumed.
    Instant,
    /// Under 1 s: a clone, or a resume and a slice.
    Fast,
    /// Under 10 s: a boot.
    Boot,
    /// 10 s or more: an image built first.
    Build,
}

impl TimeClass {
    /// The class of an estimate in milliseconds.
    pub fn of_ms(ms: u64) -> TimeClass {
        match ms {
            0..100 => TimeClass::Instant,
            100..1_000 => TimeClass::Fast,
            1_000..10_000 => TimeClass::Boot,
            _ => TimeClass::Build,
        }
    }
}

/// The estimated cost to deliver a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Cost {
    pub class: TimeClass,
    /// Estimated request → ready, in milliseconds ([`costs`]).
    pub ms: u64,
}

/// What a candidate holds beyond the request, once sliced when it is sliced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Waste {
    pub vcpus: u32,
    /// Memory above the request's maximum.
    pub memory_mib: u32,
    /// Applications it offers that were not asked for.
    pub apps: Vec<String>,
}

/// One way to serve the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Candidate {
    pub kind: CandidateKind,
    /// What it is: a pool VM's id, or `template SERVICE`, `image SERVICE`, `new image
    /// SERVICE`, `image OS` for a build.
    pub source: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The size it is sliced to when chosen (exact size on a larger VM), as (vCPUs, MiB).
    pub slice_to: Option<(u32, u32)>,
    /// Applications whose layers are attached at deploy (partial + install).
    pub install: Vec<String>,
    pub cost: Cost,
    pub waste: Waste,
    /// Why it cannot serve the request as asked; a blocked candidate is never chosen.
    pub blocked: Option<String>,
}

/// The candidate chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Chosen {
    pub kind: CandidateKind,
    pub source: String,
    /// One line: why this one.
    pub reason: String,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verdict {
    /// No hard problem: the request can be served (by `chosen`).
    pub ok: bool,
    pub problems: Vec<Problem>,
    /// Every candidate, best first; blocked ones last.
    pub candidates: Vec<Candidate>,
    /// The first unblocked candidate, when the request has no hard problem.
    pub chosen: Option<Chosen>,
}

impl Verdict {
    /// The hard problems.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    /// The chosen candidate itself.
    pub fn chosen_candidate(&self) -> Option<&Candidate> {
        let chosen = self.chosen.as_ref()?;
        self.candidates
            .iter()
            .find(|c| c.kind == chosen.kind && c.source == chosen.source && c.blocked.is_none())
    }

    /// The hard problems in one line each: `message (suggestion)`.
    pub fn summary(&self) -> String {
        self.errors()
            .map(|p| format!("{} ({})", p.message, p.suggestion))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The verdict on a configuration request: every problem, the ranked candidates and the
/// chosen one. Candidates are ranked even when the request has hard problems (for what to
/// ask instead), but none is chosen then. When no hard problem is found and no candidate
/// is unblocked, a [`ProblemCode::NoCandidate`] error says why each was ruled out.
pub fn check(input: &Input<'_>) -> Verdict {
    let mut problems = validate(input);
    let candidates = rank(input);
    let hard = problems.iter().any(|p| p.severity == Severity::Error);
    let chosen = if hard {
        None
    } else {
        candidates
            .iter()
            .position(|c| c.blocked.is_none())
            .map(|i| Chosen {
                kind: candidates[i].kind,
                source: candidates[i].source.clone(),
                reason: rank::reason(&candidates, i, input.ask),
            })
    };
    if !hard && chosen.is_none() {
        let why: Vec<String> = candidates
            .iter()
            .filter_map(|c| {
                c.blocked
                    .as_ref()
                    .map(|b| format!("{} {}: {b}", c.kind.as_str(), c.source))
            })
            .collect();
        problems.push(Problem {
            code: ProblemCode::NoCandidate,
            severity: Severity::Error,
            field: if input.ask.machine.apps.len() > 1 {
                "apps".into()
            } else {
                "exact_size".into()
            },
            message: if why.is_empty() {
                "nothing can serve this configuration".into()
            } else {
                format!(
                    "nothing can serve this configuration as asked ({})",
                    why.join("; ")
                )
            },
            suggestion: if input.ask.exact_size {
                "drop --exact-size, or ask for a size a pool VM has".into()
            } else if input.ask.machine.apps.len() > 1 {
                "request the applications one by one".into()
            } else {
                "ask for another configuration (see `hangar services`)".into()
            },
        });
    }
    let ok = !problems.iter().any(|p| p.severity == Severity::Error);
    Verdict {
        ok,
        problems,
        candidates,
        chosen: chosen.filter(|_| ok),
    }
}
