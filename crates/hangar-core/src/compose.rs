//! Several applications on one VM (seed 001: one VM offering several services; seed 003
//! claim 1: applications installed at deploy).
//!
//! [`compose`] makes one [`Service`] out of several catalog applications on the same OS:
//! its processes, ports, files, templates, settings and ready checks are the union of
//! theirs, and whatever two of them would both claim (a guest port, a port or process
//! name, a file with other contents, a setting defined differently, components that
//! conflict) is refused with a [`ComposeError`] that names both sides. Its image is not a
//! chain of its own: it is the OS layer plus each application's own layers (see
//! `hangar_host::images::ImageSource::composed_root`), so nothing is built for the
//! combination that the single applications have not built already.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::catalog::{Catalog, ReadySpec, Service};
use crate::components::Components;

/// The name of a VM offering `apps` together: their names joined with `+`.
pub fn composed_name<'a>(apps: impl IntoIterator<Item = &'a str>) -> String {
    apps.into_iter().collect::<Vec<_>>().join("+")
}

/// Why applications cannot run together on one VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComposeError {
    /// Composing takes at least two applications.
    #[error("composing takes at least two applications, got {0}")]
    TooFew(usize),
    /// No application of that name.
    #[error("no application named {0:?}")]
    NoApp(String),
    /// The application is not offered on the OS.
    #[error("{app} is not offered on os {os} (offered on: {offered})")]
    WrongOs {
        app: String,
        os: String,
        offered: String,
    },
    /// Two applications listen on the same guest port.
    #[error("{first} and {second} both listen on guest port {port}")]
    PortClash {
        port: u16,
        first: String,
        second: String,
    },
    /// Two applications name a port, a process, a file, a template or a setting alike
    /// with different meanings.
    #[error("{first} and {second} both define {what} {name:?} differently")]
    Clash {
        what: &'static str,
        name: String,
        first: String,
        second: String,
    },
    /// Their components conflict (`conflicts = [...]` in the catalog).
    #[error("{0}")]
    Conflict(String),
}

/// One service offering every application of `apps` (at least two, in this order) on
/// `os`: the union of their ports, processes, files, templates, settings, ready checks and
/// components; as many vCPUs and as much memory as the largest of them asks (its memory
/// floor the largest, its disk floor the sum of theirs); the ready timeout of the
/// slowest. Named [`composed_name`]; no pool, the default policy.
pub fn compose(catalog: &Catalog, apps: &[&str], os: &str) -> Result<Service, ComposeError> {
    if apps.len() < 2 {
        return Err(ComposeError::TooFew(apps.len()));
    }
    let mut parts = Vec::with_capacity(apps.len());
    for app in apps {
        let service = catalog
            .get(app)
            .ok_or_else(|| ComposeError::NoApp((*app).to_owned()))?;
        if !service.environments.iter().any(|env| env == os) {
            return Err(ComposeError::WrongOs {
                app: service.name.clone(),
                os: os.to_owned(),
                offered: service.environments.join(", "),
            });
        }
        parts.push(service);
    }
    compose_services(catalog.components(), &parts, os)
}

/// [`compose`] over services already looked up (each offered on `os`).
pub fn compose_services(
    components: &Components,
    parts: &[&Service],
    os: &str,
) -> Result<Service, ComposeError> {
    if parts.len() < 2 {
        return Err(ComposeError::TooFew(parts.len()));
    }
    // An imported machine runs its own disk: nothing is composed onto it.
    if let Some(imported) = parts.iter().find(|s| s.imported) {
        return Err(ComposeError::WrongOs {
            app: imported.name.clone(),
            os: os.to_owned(),
            offered: "its own disk only (an imported machine)".into(),
        });
    }
    let mut port_owner: BTreeMap<u16, &str> = BTreeMap::new();
    let mut port_names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut process_names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut files = Owned::default();
    let mut templates = Owned::default();
    let mut settings = Owned::default();
    let mut composed = Service {
        name: composed_name(parts.iter().map(|s| s.name.as_str())),
        pool: None,
        policy: Default::default(),
        description: parts
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
            + " on one VM",
        os: os.to_owned(),
        environments: vec![os.to_owned()],
        vcpus: 0,
        memory_mib: 0,
        ports: Vec::new(),
        processes: Vec::new(),
        files: BTreeMap::new(),
        templates: BTreeMap::new(),
        settings: BTreeMap::new(),
        ready: ReadySpec {
            timeout: Duration::ZERO,
            interval: Duration::MAX,
            consecutive: 1,
            checks: Vec::new(),
        },
        components: Vec::new(),
        // The largest memory floor, and the disk every application adds.
        min_memory_mib: parts.iter().filter_map(|s| s.min_memory_mib).max(),
        min_disk_mib: parts
            .iter()
            .filter_map(|s| s.min_disk_mib)
            .reduce(|a, b| a.saturating_add(b)),
        imported: false,
    };
    for part in parts {
        let name = part.name.as_str();
        composed.vcpus = composed.vcpus.max(part.vcpus);
        composed.memory_mib = composed.memory_mib.max(part.memory_mib);
        for port in &part.ports {
            if let Some(first) = port_owner.insert(port.guest, name) {
                return Err(ComposeError::PortClash {
                    port: port.guest,
                    first: first.to_owned(),
                    second: name.to_owned(),
                });
            }
            if let Some(first) = port_names.insert(&port.name, name) {
                return Err(clash("port", &port.name, first, name));
            }
            composed.ports.push(port.clone());
        }
        for process in &part.processes {
            if let Some(first) = process_names.insert(&process.name, name) {
                return Err(clash("process", &process.name, first, name));
            }
            composed.processes.push(process.clone());
        }
        files.add("file", name, &part.files, &mut composed.files)?;
        templates.add("template", name, &part.templates, &mut composed.templates)?;
        settings.add("setting", name, &part.settings, &mut composed.settings)?;
        composed.ready.timeout = composed.ready.timeout.max(part.ready.timeout);
        composed.ready.interval = composed.ready.interval.min(part.ready.interval);
        composed.ready.consecutive = composed.ready.consecutive.max(part.ready.consecutive);
        composed
            .ready
            .checks
            .extend(part.ready.checks.iter().cloned());
        for component in &part.components {
            if !composed.components.contains(component) {
                composed.components.push(component.clone());
            }
        }
    }
    // A file of one application must not be a template of another.
    for path in composed.files.keys() {
        if let Some(owner) = templates.owner.get(path) {
            return Err(clash("file and template", path, &files.owner[path], owner));
        }
    }
    let closure = components.closure(composed.components.iter().map(String::as_str));
    if let Some(conflict) = Components::conflict_in(&closure) {
        return Err(ComposeError::Conflict(conflict));
    }
    Ok(composed)
}

fn clash(what: &'static str, name: &str, first: &str, second: &str) -> ComposeError {
    ComposeError::Clash {
        what,
        name: name.to_owned(),
        first: first.to_owned(),
        second: second.to_owned(),
    }
}

/// Entries merged from several applications, with who brought each first: the same
/// entry twice is fine, the same key with other contents is a clash.
#[derive(Default)]
struct Owned {
    owner: BTreeMap<String, String>,
}

impl Owned {
    fn add<T: Clone + PartialEq>(
        &mut self,
        what: &'static str,
        app: &str,
        entries: &BTreeMap<String, T>,
        into: &mut BTreeMap<String, T>,
    ) -> Result<(), ComposeError> {
        for (key, value) in entries {
            match into.get(key) {
                Some(existing) if existing != value => {
                    return Err(clash(what, key, &self.owner[key], app));
                }
                Some(_) => {}
                None => {
                    into.insert(key.clone(), value.clone());
                    self.owner.insert(key.clone(), app.to_owned());
                }
            }
        }
        Ok(())
    }
}

/// The applications of a composed name, in order (a single name gives itself).
pub fn composed_apps(name: &str) -> BTreeSet<&str> {
    name.split('+').filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Catalog {
        Catalog::demo()
    }

    #[test]
    fn redis_and_web_page_are_the_union_of_both() {
        let catalog = demo();
        let composed = compose(&catalog, &["redis", "nginx"], "debian-12").expect("composes");
        assert_eq!(composed.name, "redis+nginx");
        assert_eq!(composed.os, "debian-12");
        let ports: Vec<(&str, u16)> = composed
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.guest))
            .collect();
        assert_eq!(ports, [("redis", 6379), ("http", 80)]);
        let processes: Vec<&str> = composed.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(processes, ["redis-server", "nginx"]);
        assert!(composed.settings.contains_key("maxmemory"));
        assert!(composed.settings.contains_key("greeting"));
        assert!(composed.files.contains_key("/var/www/html/index.html"));
        assert!(composed.templates.contains_key("/etc/hangar/redis.conf"));
        assert!(composed.templates.contains_key("/var/www/html/hello.txt"));
        let redis = catalog.get("redis").expect("redis");
        let web = catalog.get("nginx").expect("nginx");
        assert_eq!(
            composed.ready.checks.len(),
            redis.ready.checks.len() + web.ready.checks.len()
        );
        assert_eq!(
            composed.ready.timeout,
            redis.ready.timeout.max(web.ready.timeout)
        );
        assert_eq!(composed.memory_mib, redis.memory_mib.max(web.memory_mib));
        for component in redis.components.iter().chain(&web.components) {
            assert!(composed.components.contains(component), "{component}");
        }
        // Each component once.
        let unique: BTreeSet<&String> = composed.components.iter().collect();
        assert_eq!(unique.len(), composed.components.len());
        // The composed service's ready checks only name its own ports.
        let names: BTreeSet<&str> = composed.ports.iter().map(|p| p.name.as_str()).collect();
        crate::catalog::check_ready(&composed.ready, &names).expect("ready checks valid");
    }

    #[test]
    fn one_app_or_an_unknown_one_is_refused() {
        let catalog = demo();
        assert_eq!(
            compose(&catalog, &["redis"], "debian-12"),
            Err(ComposeError::TooFew(1))
        );
        assert_eq!(
            compose(&catalog, &["redis", "nope"], "debian-12"),
            Err(ComposeError::NoApp("nope".into()))
        );
        assert!(matches!(
            compose(&catalog, &["redis", "nginx"], "busybox"),
            Err(ComposeError::WrongOs { .. })
        ));
    }

    #[test]
    fn clashing_guest_ports_are_refused() {
        let catalog = demo();
        let redis = catalog.get("redis").expect("redis").clone();
        let mut other = redis.clone();
        other.name = "redis-copy".into();
        other.ports[0].name = "other".into();
        other.processes[0].name = "other".into();
        let err = compose_services(catalog.components(), &[&redis, &other], "debian-12")
            .expect_err("same guest port");
        assert_eq!(
            err,
            ComposeError::PortClash {
                port: 6379,
                first: "redis".into(),
                second: "redis-copy".into()
            }
        );
        assert!(err.to_string().contains("6379"));
    }

    #[test]
    fn differing_files_settings_and_processes_clash_identical_ones_do_not() {
        let catalog = demo();
        let web = catalog.get("nginx").expect("nginx").clone();
        let mut other = catalog.get("redis").expect("redis").clone();
        other.name = "other".into();
        // The same setting, defined alike: shared.
        other
            .settings
            .insert("greeting".into(), web.settings["greeting"].clone());
        compose_services(catalog.components(), &[&web, &other], "debian-12")
            .expect("identical setting is shared");
        // Defined differently: a clash naming both.
        let mut changed = web.settings["greeting"].clone();
        changed.default = Some("Bye".into());
        other.settings.insert("greeting".into(), changed);
        let err = compose_services(catalog.components(), &[&web, &other], "debian-12")
            .expect_err("setting clash");
        assert_eq!(err, clash("setting", "greeting", "nginx", "other"));

        let mut other = catalog.get("redis").expect("redis").clone();
        other.name = "other".into();
        let mut file = web.files["/var/www/html/index.html"].clone();
        file.content.push('!');
        other
            .files
            .insert("/var/www/html/index.html".into(), file.clone());
        assert_eq!(
            compose_services(catalog.components(), &[&web, &other], "debian-12"),
            Err(clash("file", "/var/www/html/index.html", "nginx", "other"))
        );

        let mut other = catalog.get("redis").expect("redis").clone();
        other.name = "other".into();
        other.processes[0].name = "nginx".into();
        assert_eq!(
            compose_services(catalog.components(), &[&web, &other], "debian-12"),
            Err(clash("process", "nginx", "nginx", "other"))
        );
    }

    #[test]
    fn conflicting_components_are_refused() {
        let catalog = demo();
        let web = catalog.get("nginx").expect("nginx").clone();
        let mut full = catalog.get("redis").expect("redis").clone();
        full.name = "full".into();
        full.components = vec!["nginx-full".into()];
        let err = compose_services(catalog.components(), &[&web, &full], "debian-12")
            .expect_err("nginx-light conflicts with nginx-full");
        assert!(matches!(err, ComposeError::Conflict(_)), "{err}");
    }

    #[test]
    fn composed_names_split_back() {
        assert_eq!(composed_name(["redis", "nginx"]), "redis+nginx");
        assert_eq!(
            composed_apps("redis+nginx"),
            BTreeSet::from(["redis", "nginx"])
        );
    }
}
