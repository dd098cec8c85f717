//! Every problem with a configuration request, each with a suggestion.

use crate::catalog::Os;
use crate::components::Components;
use crate::matching::{MAX_MEMORY_MIB, MAX_VCPUS, compare_versions, parse_version};
use crate::{Catalog, Service};

use super::{Input, Problem, ProblemCode, Severity, VM_MIN_MEMORY_MIB};

/// Every problem [`super::check`] finds in `input.ask`, in the order of the request's
/// fields (size, host limits, OS, applications, minimums, disk, conflicts, settings). Each
/// has a non-empty suggestion. Pure.
pub fn validate(input: &Input<'_>) -> Vec<Problem> {
    let mut out = Problems(Vec::new());
    let machine = &input.ask.machine;
    let memory = machine.memory_mib;

    // Size, as any VM may have it.
    if machine.vcpus == 0 {
        out.error(
            ProblemCode::VcpusZero,
            "vcpus",
            "a VM needs at least 1 vCPU".into(),
            "ask for --vcpus 1 or more".into(),
        );
    } else if machine.vcpus > MAX_VCPUS {
        out.error(
            ProblemCode::VcpusOverMax,
            "vcpus",
            format!(
                "{} vCPUs asked; a VM has at most {MAX_VCPUS}",
                machine.vcpus
            ),
            format!("ask for --vcpus {MAX_VCPUS} or fewer"),
        );
    }
    if memory.min == 0 || memory.min > memory.max {
        out.error(
            ProblemCode::MemoryRangeEmpty,
            "memory_mib",
            format!("memory range {}-{} is empty", memory.min, memory.max),
            format!(
                "ask for --memory MIN-MAX with MIN at most MAX, e.g. --memory {}",
                memory.max.max(VM_MIN_MEMORY_MIB)
            ),
        );
    } else if memory.min < VM_MIN_MEMORY_MIB {
        out.error(
            ProblemCode::MemoryBelowVmMin,
            "memory_mib",
            format!(
                "{} MiB asked; a VM has at least {VM_MIN_MEMORY_MIB} MiB",
                memory.min
            ),
            format!("ask for --memory {VM_MIN_MEMORY_MIB} or more"),
        );
    } else if memory.min > MAX_MEMORY_MIB {
        out.error(
            ProblemCode::MemoryOverMax,
            "memory_mib",
            format!(
                "{} MiB asked; a VM has at most {MAX_MEMORY_MIB} MiB",
                memory.min
            ),
            format!("ask for --memory {MAX_MEMORY_MIB} or less"),
        );
    }

    host_limits(input, &mut out);

    // The OS.
    let os = input.catalog.os(&machine.os.name);
    match os {
        None => {
            let names: Vec<&str> = input
                .catalog
                .operating_systems()
                .map(|os| os.name.as_str())
                .collect();
            let mut near = crate::suggest::closest(&machine.os.name, names.iter().copied(), 3);
            if near.is_empty() {
                near = names.iter().map(|n| n.to_string()).collect();
            }
            out.error(
                ProblemCode::UnknownOs,
                "os",
                format!("no os named {:?}", machine.os.name),
                format!(
                    "ask for {}",
                    or_list(near.iter().map(|n| format!("--os {n}")))
                ),
            );
        }
        Some(os) => {
            if let Some(min) = &machine.os.min_version {
                if parse_version(min).is_none() {
                    out.error(
                        ProblemCode::BadVersion,
                        "os.min_version",
                        format!("os version {min:?} is not dotted numbers"),
                        format!("ask for --os {}@{}", os.name, os.version),
                    );
                } else if compare_versions(&os.version, min) == Some(std::cmp::Ordering::Less) {
                    out.error(
                        ProblemCode::OsTooOld,
                        "os.min_version",
                        format!(
                            "os {} is at version {}, never {min} or newer",
                            os.name, os.version
                        ),
                        format!(
                            "ask for --os {}@{} or --os {} (any version)",
                            os.name, os.version, os.name
                        ),
                    );
                }
            }
        }
    }

    // The applications.
    let mut services: Vec<&Service> = Vec::new();
    for app in &machine.apps {
        let Some(service) = input.catalog.get(app) else {
            let near = crate::suggest::closest(app, input.catalog.names(), 3);
            out.error(
                ProblemCode::UnknownApp,
                "apps",
                format!("no application named {app:?}"),
                if near.is_empty() {
                    "see `hangar services` for the applications there are".into()
                } else {
                    format!(
                        "ask for {}",
                        or_list(near.iter().map(|n| format!("--app {n}")))
                    )
                },
            );
            continue;
        };
        services.push(service);
        if let Some(os) = os
            && !service.environments.contains(&os.name)
        {
            out.error(
                ProblemCode::AppNotOnOs,
                "apps",
                format!(
                    "{app} never runs on os {} ({})",
                    os.name,
                    never_reason(input.catalog, service, os)
                ),
                format!(
                    "ask for {} with --app {app}",
                    or_list(service.environments.iter().map(|e| format!("--os {e}")))
                ),
            );
        }
        if machine.vcpus != 0 && machine.vcpus < service.vcpus {
            out.error(
                ProblemCode::VcpusBelowAppMin,
                "vcpus",
                format!(
                    "{app} needs at least {} vCPUs, {} asked",
                    service.vcpus, machine.vcpus
                ),
                format!("ask for --vcpus {}", service.vcpus),
            );
        }
    }

    // Memory minimums (when the range itself is sound): a range that reaches a floor is
    // served at the floor or above (see `memory_floor`); one wholly below it never runs.
    if memory.min >= VM_MIN_MEMORY_MIB && memory.min <= memory.max {
        let asked = if memory.min == memory.max {
            memory.max.to_string()
        } else {
            format!("at most {}", memory.max)
        };
        if let Some(os) = os
            && let Some(floor) = os.min_memory_mib
            && memory.max < floor
        {
            out.error(
                ProblemCode::MemoryBelowOsMin,
                "memory_mib",
                format!("os {} needs at least {floor} MiB, {asked} asked", os.name),
                ask_memory(input, floor),
            );
        }
        for service in &services {
            let floor = app_memory_floor(service);
            if memory.max < floor {
                out.error(
                    ProblemCode::MemoryBelowAppMin,
                    "memory_mib",
                    format!("{} needs at least {floor} MiB, {asked} asked", service.name),
                    ask_memory(input, floor),
                );
            }
        }
    }

    // Disk.
    if let Some(disk) = machine.disk_mib {
        let os_disk = os.and_then(|os| os.min_disk_mib).unwrap_or(0);
        let apps_disk: u32 = services
            .iter()
            .filter_map(|s| s.min_disk_mib)
            .fold(0u32, u32::saturating_add);
        let need = os_disk.saturating_add(apps_disk);
        if disk == 0 || disk < need {
            let need = need.max(1);
            out.error(
                ProblemCode::DiskBelowMin,
                "disk_mib",
                format!(
                    "{disk} MiB of disk asked; {} need at least {need} MiB",
                    what_needs(os, &services)
                ),
                format!("ask for --disk {need} or more"),
            );
        }
    }

    // Conflicts between the applications (each alone is conflict-free: the catalog says so).
    if services.len() > 1 {
        let components = input.catalog.components();
        let closure = components.closure(
            services
                .iter()
                .flat_map(|s| s.components.iter().map(String::as_str)),
        );
        let conflict = Components::conflict_in(&closure);
        let on_os = os.filter(|os| {
            services.len() == machine.apps.len()
                && services.iter().all(|s| s.environments.contains(&os.name))
        });
        if conflict.is_none()
            && let Some(os) = on_os
            && let Err(clash) =
                crate::compose::compose_services(input.catalog.components(), &services, &os.name)
        {
            let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
            out.error(
                ProblemCode::Clash,
                "apps",
                format!("{} cannot share a VM: {clash}", names.join(" and ")),
                format!(
                    "request them on separate VMs: {}",
                    names
                        .iter()
                        .map(|n| format!("--app {n}"))
                        .collect::<Vec<_>>()
                        .join(", then ")
                ),
            );
        }
        if let Some(conflict) = conflict {
            let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
            out.error(
                ProblemCode::Conflict,
                "apps",
                format!("{} cannot share a VM: {conflict}", names.join(" and ")),
                format!(
                    "request them on separate VMs: {}",
                    names
                        .iter()
                        .map(|n| format!("--app {n}"))
                        .collect::<Vec<_>>()
                        .join(", then ")
                ),
            );
        }
    }

    // Settings.
    let mut known = std::collections::BTreeSet::new();
    for service in &services {
        for (key, setting) in &service.settings {
            known.insert(key.as_str());
            let field = format!("env.{key}");
            match input.ask.settings.get(key) {
                Some(value) => {
                    if let Err(why) = setting.check(value) {
                        let shown = if setting.secret {
                            String::new()
                        } else {
                            format!("={value:?}")
                        };
                        out.error(
                            ProblemCode::BadSetting,
                            &field,
                            format!("{}: setting {key}{shown} {why}", service.name),
                            format!(
                                "give --env {key}=VALUE as {} ({})",
                                setting.format.as_str(),
                                example(setting.format)
                            ),
                        );
                    }
                }
                None if setting.default.is_none() => out.error(
                    ProblemCode::MissingSetting,
                    &field,
                    format!(
                        "{} needs setting {key}{}",
                        service.name,
                        if setting.description.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", setting.description)
                        }
                    ),
                    format!("add --env {key}=VALUE ({})", example(setting.format)),
                ),
                None => {}
            }
        }
    }
    if !services.is_empty() {
        for key in input.ask.settings.keys() {
            if key == "os" || known.contains(key.as_str()) {
                continue;
            }
            let near = crate::suggest::closest(key, known.iter().copied(), 2);
            out.warning(
                ProblemCode::UnknownSetting,
                &format!("env.{key}"),
                format!("no requested application has a setting {key:?}; it is passed to processes as HANGAR_{}", key.to_ascii_uppercase()),
                if near.is_empty() {
                    format!("leave out --env {key}, or keep it for your own processes")
                } else {
                    format!("did you mean {}?", or_list(near.iter().map(|n| format!("--env {n}=..."))))
                },
            );
        }
    }
    out.0
}

/// The memory `service` needs: its declared minimum, else its own size.
pub(super) fn app_memory_floor(service: &Service) -> u32 {
    service.min_memory_mib.unwrap_or(service.memory_mib)
}

/// The least memory a VM serving `input.ask` needs: the largest of the VM floor, the OS's
/// minimum and each known application's (unknown names count for nothing).
pub fn memory_floor(input: &Input<'_>) -> u32 {
    let machine = &input.ask.machine;
    let os = input
        .catalog
        .os(&machine.os.name)
        .and_then(|os| os.min_memory_mib)
        .unwrap_or(0);
    machine
        .apps
        .iter()
        .filter_map(|app| input.catalog.get(app))
        .map(app_memory_floor)
        .fold(VM_MIN_MEMORY_MIB.max(os), u32::max)
}

/// Every problem the size of hosts shows.
fn host_limits(input: &Input<'_>, out: &mut Problems) {
    let machine = &input.ask.machine;
    let memory = u64::from(machine.memory_mib.min);
    if input.hosts.is_empty() || machine.vcpus == 0 || machine.vcpus > MAX_VCPUS {
        return;
    }
    let most_cpus = input.hosts.iter().map(|h| h.vcpus).max().unwrap_or(0);
    let most_memory = input.hosts.iter().map(|h| h.memory_mib).max().unwrap_or(0);
    let mut separately = true;
    if machine.vcpus > most_cpus {
        separately = false;
        out.error(
            ProblemCode::VcpusOverHost,
            "vcpus",
            format!(
                "{} vCPUs asked; the largest host has {most_cpus}",
                machine.vcpus
            ),
            format!("ask for --vcpus {most_cpus} or fewer"),
        );
    }
    if memory > most_memory && memory <= u64::from(MAX_MEMORY_MIB) {
        separately = false;
        out.error(
            ProblemCode::MemoryOverHost,
            "memory_mib",
            format!("{memory} MiB of memory asked; the largest host has {most_memory} MiB"),
            format!("ask for --memory {most_memory} or less"),
        );
    }
    if separately
        && memory <= u64::from(MAX_MEMORY_MIB)
        && !input
            .hosts
            .iter()
            .any(|h| h.vcpus >= machine.vcpus && h.memory_mib >= memory)
    {
        let best = input
            .hosts
            .iter()
            .filter(|h| h.vcpus >= machine.vcpus)
            .map(|h| h.memory_mib)
            .max()
            .unwrap_or(0);
        out.error(
            ProblemCode::SizeOverHost,
            "memory_mib",
            format!(
                "{} vCPUs and {memory} MiB asked together; no host has both",
                machine.vcpus
            ),
            format!(
                "ask for --memory {best} or less with --vcpus {}, or fewer vCPUs",
                machine.vcpus
            ),
        );
    }
}

/// "ask for N MiB", and the smallest paused VM of at least `floor` MiB that serves the
/// rest of the request, when there is one.
fn ask_memory(input: &Input<'_>, floor: u32) -> String {
    let machine = &input.ask.machine;
    let pooled = input
        .supply
        .pool
        .iter()
        .filter(|vm| vm.memory_mib >= floor && vm.vcpus >= machine.vcpus)
        .filter(|vm| match &vm.os {
            None => true,
            Some((name, _)) => *name == machine.os.name && vm.apps.is_superset(&machine.apps),
        })
        .min_by_key(|vm| (vm.memory_mib, vm.vcpus, vm.id.clone()));
    match pooled {
        Some(vm) => format!(
            "ask for --memory {floor}, or take the {} MiB pool VM ({}: --memory {})",
            vm.memory_mib, vm.id, vm.memory_mib
        ),
        None => format!("ask for --memory {floor} or more"),
    }
}

fn what_needs(os: Option<&Os>, services: &[&Service]) -> String {
    let mut names: Vec<String> = os.map(|os| format!("os {}", os.name)).into_iter().collect();
    names.extend(services.iter().map(|s| s.name.clone()));
    if names.is_empty() {
        "they".into()
    } else {
        names.join(" and ")
    }
}

/// Why `service` is not offered on `os`, from the directory.
fn never_reason(catalog: &Catalog, service: &Service, os: &Os) -> String {
    match catalog.viable(&service.name, &os.name) {
        Err(crate::catalog::Never::Combination { reason }) => reason,
        _ => format!("it is offered on {}", service.environments.join(", ")),
    }
}

fn example(format: crate::components::SettingFormat) -> &'static str {
    use crate::components::SettingFormat;
    match format {
        SettingFormat::Text => "printable text",
        SettingFormat::Word => "one word, such as app_1",
        SettingFormat::Int => "a whole number, such as 42",
        SettingFormat::Size => "a size, such as 64mb",
    }
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().collect();
    match items.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn error(&mut self, code: ProblemCode, field: &str, message: String, suggestion: String) {
        self.push(code, Severity::Error, field, message, suggestion);
    }

    fn warning(&mut self, code: ProblemCode, field: &str, message: String, suggestion: String) {
        self.push(code, Severity::Warning, field, message, suggestion);
    }

    fn push(
        &mut self,
        code: ProblemCode,
        severity: Severity,
        field: &str,
        message: String,
        suggestion: String,
    ) {
        debug_assert!(!suggestion.is_empty(), "{code:?} without a suggestion");
        self.0.push(Problem {
            code,
            severity,
            field: field.to_owned(),
            message,
            suggestion,
        });
    }
}
