//! The candidates that could serve a request, ranked.

use std::cmp::Ordering;

use crate::catalog::{Os, OsBase};
use crate::matching::{MatchKind, Offer};

use super::costs::*;
use super::{Ask, Candidate, CandidateKind, Cost, Input, PoolVm, TimeClass, Waste};

/// Every candidate for `input.ask`, best first (see the module's order), blocked ones
/// last. Pool VMs that cannot serve the request at all (too small, another OS, missing
/// applications) are not candidates. Pure; the order does not depend on the order of
/// `input.supply.pool`.
pub fn rank(input: &Input<'_>) -> Vec<Candidate> {
    // A range reaching above the floor is served at the floor or above.
    let floor = super::validate::memory_floor(input);
    let mut raised = input.ask.clone();
    let range = &mut raised.machine.memory_mib;
    if range.min <= range.max && range.min < floor {
        range.min = floor.min(range.max);
    }
    let input = &Input {
        ask: &raised,
        ..*input
    };
    let ask = input.ask;
    let os = input.catalog.os(&ask.machine.os.name);
    let mut out: Vec<Candidate> = Vec::new();
    for vm in &input.supply.pool {
        match &vm.os {
            Some(_) => out.extend(staged(ask, vm)),
            None => {
                if let Some(os) = os {
                    out.extend(shell(input, os, vm));
                }
            }
        }
    }
    if let Some(os) = os {
        out.push(build(input, os));
    }
    out.sort_by(order);
    out
}

/// The ranking: unblocked first, then time class, waste (memory, vCPUs, apps), estimated
/// time, kind and source. A total order: two candidates equal under it are the same
/// candidate.
pub(super) fn order(a: &Candidate, b: &Candidate) -> Ordering {
    a.blocked
        .is_some()
        .cmp(&b.blocked.is_some())
        .then(a.cost.class.cmp(&b.cost.class))
        .then(a.waste.memory_mib.cmp(&b.waste.memory_mib))
        .then(a.waste.vcpus.cmp(&b.waste.vcpus))
        .then(a.waste.apps.len().cmp(&b.waste.apps.len()))
        .then(a.cost.ms.cmp(&b.cost.ms))
        .then(a.kind.cmp(&b.kind))
        .then_with(|| a.source.cmp(&b.source))
        .then_with(|| a.install.cmp(&b.install))
        .then_with(|| a.waste.apps.cmp(&b.waste.apps))
}

fn cost(ms: u64) -> Cost {
    Cost {
        class: TimeClass::of_ms(ms),
        ms,
    }
}

/// The slice a VM of `vcpus` and `memory_mib` needs for `ask` (exact size asked and the
/// VM is larger), and whether it is blocked because it cannot be sliced.
fn slicing(ask: &Ask, vm: &PoolVm) -> (Option<(u32, u32)>, Option<String>) {
    let want = (ask.machine.vcpus, ask.machine.memory_mib.max);
    let larger = vm.vcpus > want.0 || vm.memory_mib > want.1;
    if !ask.exact_size || !larger {
        return (None, None);
    }
    if vm.sliceable {
        (Some(want), None)
    } else {
        (
            None,
            Some(format!(
                "cannot be sliced to {} vCPUs and {} MiB (its memory is a template's, shared with other clones)",
                want.0, want.1
            )),
        )
    }
}

fn waste(ask: &Ask, vm: &PoolVm, slice: Option<(u32, u32)>) -> Waste {
    let (vcpus, memory) = slice.unwrap_or((vm.vcpus, vm.memory_mib));
    Waste {
        vcpus: vcpus.saturating_sub(ask.machine.vcpus),
        memory_mib: memory.saturating_sub(ask.machine.memory_mib.max),
        apps: vm.apps.difference(&ask.machine.apps).cloned().collect(),
    }
}

/// A booted pool VM as an exact or superset candidate, if it matches at all.
fn staged(ask: &Ask, vm: &PoolVm) -> Option<Candidate> {
    let offer = Offer {
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        os: vm.os.clone(),
        apps: vm.apps.clone(),
    };
    let kind = match ask.machine.classify(&offer)? {
        MatchKind::Exact => CandidateKind::Exact,
        MatchKind::Superset => CandidateKind::Superset,
        MatchKind::Partial => return None,
    };
    let (slice_to, blocked) = slicing(ask, vm);
    let ms = RESUME_MS + if slice_to.is_some() { SLICE_MS } else { 0 };
    Some(Candidate {
        kind,
        source: vm.id.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        slice_to,
        install: Vec::new(),
        cost: cost(ms),
        waste: waste(ask, vm, slice_to),
        blocked,
    })
}

/// A pre-OS shell as a partial candidate (the requested image attached) and, when the
/// request names applications, as a partial + install candidate (their layers attached
/// at deploy).
fn shell(input: &Input<'_>, os: &Os, vm: &PoolVm) -> Vec<Candidate> {
    let ask = input.ask;
    if vm.vcpus < ask.machine.vcpus || vm.memory_mib < ask.machine.memory_mib.min {
        return Vec::new();
    }
    let (slice_to, slice_blocked) = slicing(ask, vm);
    let slice_ms = if slice_to.is_some() { SLICE_MS } else { 0 };
    let boot_ms = match os.base {
        OsBase::Busybox => SHELL_BOOT_MS,
        OsBase::Debootstrap => BOOT_DEBIAN_MS - (BOOT_BUSYBOX_MS - SHELL_BOOT_MS),
    };
    let apps = &ask.machine.apps;
    let built = apps.iter().all(|app| input.supply.images.contains(app))
        && (!apps.is_empty() || input.supply.images.contains(&os.name));
    let build_ms = if built { 0 } else { build_cost(os) };
    let mut out = Vec::new();

    let partial_blocked = slice_blocked.clone().or_else(|| match os.base {
        OsBase::Debootstrap => Some(format!(
            "os {} is layered: a shell takes its layers only by install at deploy",
            os.name
        )),
        OsBase::Busybox if apps.len() > 1 => Some(
            "one image holds one application; several go on a shell only by install at deploy"
                .into(),
        ),
        OsBase::Busybox => None,
    });
    out.push(Candidate {
        kind: CandidateKind::Partial,
        source: vm.id.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        slice_to,
        install: Vec::new(),
        cost: cost(boot_ms + build_ms + slice_ms),
        waste: waste(ask, vm, slice_to),
        blocked: partial_blocked,
    });

    if !apps.is_empty() {
        let install_blocked = slice_blocked.or_else(|| {
            (!input.supply.install_at_deploy)
                .then(|| "this server does not install applications at deploy".to_owned())
        });
        out.push(Candidate {
            kind: CandidateKind::PartialInstall,
            source: vm.id.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            slice_to,
            install: apps.iter().cloned().collect(),
            cost: cost(boot_ms + ATTACH_LAYER_MS * apps.len() as u64 + build_ms + slice_ms),
            waste: waste(ask, vm, slice_to),
            blocked: install_blocked,
        });
    }
    out
}

fn build_cost(os: &Os) -> u64 {
    match os.base {
        OsBase::Busybox => BUILD_BUSYBOX_MS,
        OsBase::Debootstrap => BUILD_DEBIAN_MS,
    }
}

/// A new VM of exactly the request's vCPUs and minimum memory (raised to what its OS and
/// apps need, within the range).
fn build(input: &Input<'_>, os: &Os) -> Candidate {
    let ask = input.ask;
    let apps = &ask.machine.apps;
    let boot_ms = match os.base {
        OsBase::Busybox => BOOT_BUSYBOX_MS,
        OsBase::Debootstrap => BOOT_DEBIAN_MS,
    };
    let only = (apps.len() == 1).then(|| apps.iter().next()).flatten();
    let service = only.and_then(|name| input.catalog.get(name));
    let has_settings =
        service.is_some_and(|s| s.settings.keys().any(|k| ask.settings.contains_key(k)));
    let clonable = service.is_some_and(|s| {
        input.supply.templates.contains(&s.name)
            && !has_settings
            && s.vcpus == ask.machine.vcpus
            && s.memory_mib == ask.machine.memory_mib.min
    });
    let built = apps.iter().all(|app| input.supply.images.contains(app))
        && (!apps.is_empty() || input.supply.images.contains(&os.name));
    let subject = match only {
        Some(app) => app.clone(),
        None if apps.is_empty() => os.name.clone(),
        None => apps.iter().cloned().collect::<Vec<_>>().join("+"),
    };
    let (source, ms) = if clonable {
        (format!("template {subject}"), CLONE_MS)
    } else if built {
        (format!("image {subject}"), boot_ms)
    } else {
        (format!("new image {subject}"), build_cost(os) + boot_ms)
    };
    Candidate {
        kind: CandidateKind::Build,
        source,
        vcpus: ask.machine.vcpus,
        memory_mib: ask.machine.memory_mib.min,
        slice_to: None,
        install: Vec::new(),
        cost: cost(ms),
        waste: Waste::default(),
        blocked: (apps.len() > 1 && !input.supply.compose)
            .then(|| "this server builds no image of several applications together".to_owned()),
    }
}

/// One line: why `candidates[i]` is the one.
pub(super) fn reason(candidates: &[Candidate], i: usize, ask: &Ask) -> String {
    let c = &candidates[i];
    let what = match c.kind {
        CandidateKind::Exact => {
            format!("paused pool VM {} has exactly this configuration", c.source)
        }
        CandidateKind::Superset => format!(
            "paused pool VM {} ({} vCPUs, {} MiB) is the best larger match",
            c.source, c.vcpus, c.memory_mib
        ),
        CandidateKind::Partial => format!(
            "pre-OS shell {} ({} vCPUs, {} MiB) is booted with the {} image",
            c.source, c.vcpus, c.memory_mib, ask.machine.os.name
        ),
        CandidateKind::PartialInstall => format!(
            "pre-OS shell {} is booted with {} attached at deploy",
            c.source,
            c.install.join(", ")
        ),
        CandidateKind::Build => format!("a new VM from {}", c.source),
    };
    let sliced = match c.slice_to {
        Some((vcpus, memory)) => format!(", sliced to {vcpus} vCPUs and {memory} MiB"),
        None => String::new(),
    };
    let waste = if c.waste.vcpus == 0 && c.waste.memory_mib == 0 && c.waste.apps.is_empty() {
        "wastes nothing".to_owned()
    } else {
        let mut parts = Vec::new();
        if c.waste.vcpus > 0 {
            parts.push(format!("{} vCPUs", c.waste.vcpus));
        }
        if c.waste.memory_mib > 0 {
            parts.push(format!("{} MiB", c.waste.memory_mib));
        }
        if !c.waste.apps.is_empty() {
            parts.push(format!("apps {}", c.waste.apps.join(", ")));
        }
        format!("holds {} more than asked", parts.join(", "))
    };
    // Blocked candidates that would have been as quick: why they were passed over.
    let passed: Vec<String> = candidates
        .iter()
        .filter(|other| other.blocked.is_some() && other.cost.class <= c.cost.class)
        .filter_map(|b| {
            b.blocked
                .as_ref()
                .map(|why| format!("{} {}: {why}", b.kind.as_str(), b.source))
        })
        .take(2)
        .collect();
    let mut line = format!(
        "{} {what}{sliced}; ~{} ms ({}), {waste}",
        c.kind.as_str(),
        c.cost.ms,
        match c.cost.class {
            TimeClass::Instant => "instant",
            TimeClass::Fast => "fast",
            TimeClass::Boot => "a boot",
            TimeClass::Build => "an image build",
        }
    );
    let others = candidates.len() - 1;
    if others > 0 {
        line.push_str(&format!("; {others} other candidate(s) rank lower"));
    }
    if !passed.is_empty() {
        line.push_str(&format!(" (ruled out: {})", passed.join("; ")));
    }
    line
}
