//! The service catalog: what can be requested, and how a VM offering it is made and judged
//! ready. Parsed from TOML (see `catalog/demo.toml`) and validated as a whole, so that a bad
//! catalog is refused at start-up with an error naming the service and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::components::{
    BUILTIN_TEMPLATE_KEYS, Component, ComponentError, ComponentKind, Components, RawPackaged,
    Setting, template_keys,
};
use crate::lifecycle::Policy;
use crate::pool::PoolSpec;

/// The environment of every imported machine: it runs whatever OS its disk holds.
pub const IMPORTED_OS: &str = "imported";

/// The built-in demo catalog.
pub const DEMO_CATALOG: &str = include_str!("../../../catalog/demo.toml");

#[derive(Debug)]
pub struct Catalog {
    services: BTreeMap<String, Service>,
    os: BTreeMap<String, Os>,
    pools: BTreeMap<String, PoolSpec>,
    components: Components,
    /// Services of imported machines, added and removed while the server runs
    /// ([`Catalog::add_imported`]). Each definition is leaked once when added, so lookups
    /// hand out plain references like the catalog's own; a removed one stays allocated
    /// (a few hundred bytes per import) until the process ends.
    imported: std::sync::RwLock<BTreeMap<String, &'static Service>>,
}

impl Clone for Catalog {
    fn clone(&self) -> Catalog {
        Catalog {
            services: self.services.clone(),
            os: self.os.clone(),
            pools: self.pools.clone(),
            components: self.components.clone(),
            imported: std::sync::RwLock::new(self.imported_map().clone()),
        }
    }
}

impl PartialEq for Catalog {
    fn eq(&self, other: &Catalog) -> bool {
        self.services == other.services
            && self.os == other.os
            && self.pools == other.pools
            && self.components == other.components
            && *self.imported_map() == *other.imported_map()
    }
}

impl Eq for Catalog {}

/// An operating system VMs run (`[os.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Os {
    #[serde(skip_deserializing)]
    pub name: String,
    /// Dotted version, compared numerically when requests name a minimum.
    pub version: String,
    /// How the image is built.
    #[serde(default)]
    pub base: OsBase,
    #[serde(default)]
    pub description: String,
    /// Debian suite for `debootstrap` (e.g. `bookworm`).
    #[serde(default)]
    pub suite: Option<String>,
    /// Extra Debian packages in the OS layer (`debootstrap --include`).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Least memory a VM of this OS boots with, in MiB (checked before a request is
    /// served; none declared: no floor of its own).
    #[serde(default)]
    pub min_memory_mib: Option<u32>,
    /// Least root disk this OS needs, in MiB.
    #[serde(default)]
    pub min_disk_mib: Option<u32>,
}

/// How an OS layer is made.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OsBase {
    /// A static busybox and the service's files in one ext4 disk; no packages.
    #[default]
    Busybox,
    /// `debootstrap --variant=minbase SUITE` against the configured Debian mirror; packages
    /// install over it as layers.
    Debootstrap,
}

/// Pool bounds of a service (`[service.NAME.pool]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolBounds {
    #[serde(default)]
    pub min: u32,
    pub max: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    /// The service its VMs offer; none: hardware shells paused before any OS.
    service: Option<String>,
    vcpus: u32,
    memory_mib: u32,
    #[serde(default)]
    min: u32,
    max: u32,
}

/// One requestable service: its applications (its own, inline, and `apps = [...]`) merged
/// into one VM's ports, processes, files and ready criterion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Service {
    pub name: String,
    /// Pool bounds, when the service keeps a warm pool.
    pub pool: Option<PoolBounds>,
    /// Lifecycle policy (`[service.NAME.policy]`); the default has no timers.
    pub policy: Policy,
    pub description: String,
    /// The OS its VMs run when a request names none (the first viable one).
    pub os: String,
    /// Every OS the service can be offered on (the directory's environments).
    pub environments: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub ports: Vec<Port>,
    pub processes: Vec<Process>,
    /// Static files, in the shared application layer.
    #[schema(value_type = BTreeMap<String, Object>)]
    pub files: BTreeMap<String, FileSpec>,
    /// Files rendered per VM at deploy time (`{{setting}}`, `{{hostname}}`, `{{vm}}`).
    #[schema(value_type = BTreeMap<String, Object>)]
    pub templates: BTreeMap<String, FileSpec>,
    /// Per-request settings, with defaults.
    pub settings: BTreeMap<String, Setting>,
    pub ready: ReadySpec,
    /// Every component it is made of, dependencies first (software, patches, apps).
    pub components: Vec<String>,
    /// Least memory its applications need, in MiB: the largest `min_memory_mib` its apps
    /// (and the service itself) declare; none declared: `None`.
    #[serde(default)]
    pub min_memory_mib: Option<u32>,
    /// Least disk its applications add to the OS's, in MiB: the sum of the `min_disk_mib`
    /// its apps (and the service itself) declare; none declared: `None`.
    #[serde(default)]
    pub min_disk_mib: Option<u32>,
    /// An imported machine's service (`hangar import`): its VMs boot the model disk of
    /// the same name with the disk's own bootloader, not an image built from components,
    /// and run no hangar-init (no settings, files, processes or guest agent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imported: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub name: String,
    /// TCP port inside the guest.
    pub guest: u16,
    /// When a connection to this port's stable endpoint wakes a sleeping or archived VM
    /// (`wake = "on-data"`, the default, or `"on-connect"`).
    #[serde(default)]
    pub wake: WakeOn,
}

/// When a connection to a sleeping or archived VM's endpoint wakes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WakeOn {
    /// Once the client sends its first bytes: a bare connect (a port scan, a health probe
    /// that only connects) wakes nothing, and a client that sends nothing for a while is
    /// disconnected. For protocols where the client speaks first (HTTP, Redis, PostgreSQL).
    #[default]
    OnData,
    /// As soon as a client connects. For protocols where the server speaks first (SSH,
    /// SMTP, FTP), whose clients wait for a greeting before they send anything.
    OnConnect,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// The signal (`HUP`, `USR1` or `USR2`) on which the process reads its files again,
    /// keeping its listening sockets: a stack member whose settings change after it was
    /// made is reloaded rather than restarted (see `hangar_proto::ServiceReload` for what
    /// "reloaded" waits for). Absent: restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub reload: Option<hangar_proto::ReloadSignal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub content: String,
    #[serde(default = "default_file_mode")]
    pub mode: u32,
}

fn default_file_mode() -> u32 {
    0o644
}

/// When a VM counts as ready: every check passes in `consecutive` rounds in a row, within
/// `timeout`. Checks of a round run in order; the first failure ends the round and resets
/// the count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadySpec {
    #[serde(with = "humantime_serde_compat", default = "default_ready_timeout")]
    #[schema(value_type = String, example = "60s")]
    pub timeout: Duration,
    /// Pause between rounds of checks.
    #[serde(with = "humantime_serde_compat", default = "default_ready_interval")]
    #[schema(value_type = String, example = "50ms")]
    pub interval: Duration,
    /// How many rounds in a row every check must pass (at least 1).
    #[serde(default = "default_consecutive")]
    pub consecutive: u32,
    pub checks: Vec<ReadyCheck>,
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_ready_interval() -> Duration {
    Duration::from_millis(50)
}

fn default_consecutive() -> u32 {
    1
}

/// One ready check. Ports are named by the service's `port` entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReadyCheck {
    /// The guest sends something through the port's endpoint: a greeting of its own, or an
    /// answer to `HEAD / HTTP/1.0` (a user-mode port forward accepts and holds connections
    /// whether or not the guest is up, so only the guest's bytes prove it serves). For
    /// guests without hangar-init, such as imported machines.
    Connect { port: String },
    /// Something listens on the port inside the guest (asked of hangar-init, since a
    /// user-mode port forward accepts connections even when nothing listens behind it).
    Tcp { port: String },
    /// An HTTP GET through the endpoint answers `status`, with `body_contains` in the body.
    Http {
        port: String,
        #[serde(default = "default_http_path")]
        path: String,
        #[serde(default = "default_http_status")]
        status: u16,
        body_contains: Option<String>,
    },
    /// After sending `send` through the endpoint, the answer contains `expect`.
    Bytes {
        port: String,
        send: String,
        expect: String,
    },
    /// `argv`, run inside the guest by hangar-init (in the service's root), exits 0 within
    /// `timeout`.
    Exec {
        argv: Vec<String>,
        #[serde(with = "humantime_serde_compat", default = "default_exec_timeout")]
        #[schema(value_type = String, example = "5s")]
        timeout: Duration,
    },
    /// The guest's serial console log (where service output goes) contains `contains`.
    Log { contains: String },
    /// The VM's host process used less than `below_percent` of one host CPU over `window`.
    CpuSettled {
        #[schema(value_type = f64, example = 20.0)]
        below_percent: Percent,
        #[serde(with = "humantime_serde_compat", default = "default_cpu_window")]
        #[schema(value_type = String, example = "500ms")]
        window: Duration,
    },
}

/// A percentage as written in the catalog. Compared by bits, so that it can be `Eq` (the
/// catalog refuses NaN anyway).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Percent(pub f64);

impl PartialEq for Percent {
    fn eq(&self, other: &Percent) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Percent {}

impl std::fmt::Display for Percent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0)
    }
}

fn default_http_path() -> String {
    "/".into()
}

fn default_http_status() -> u16 {
    200
}

fn default_exec_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_cpu_window() -> Duration {
    Duration::from_millis(500)
}

impl ReadyCheck {
    /// The service port the check goes through; `None` for checks that use no port
    /// (`exec`, `log`, `cpu_settled`).
    pub fn port(&self) -> Option<&str> {
        match self {
            ReadyCheck::Tcp { port }
            | ReadyCheck::Connect { port }
            | ReadyCheck::Http { port, .. }
            | ReadyCheck::Bytes { port, .. } => Some(port),
            ReadyCheck::Exec { .. } | ReadyCheck::Log { .. } | ReadyCheck::CpuSettled { .. } => {
                None
            }
        }
    }

    /// Why the check cannot work as written, if it cannot (port names aside, which need the
    /// service).
    fn problem(&self, ready_timeout: Duration) -> Option<String> {
        match self {
            ReadyCheck::Tcp { .. }
            | ReadyCheck::Connect { .. }
            | ReadyCheck::Http { .. }
            | ReadyCheck::Bytes { .. } => None,
            ReadyCheck::Exec { argv, timeout } => {
                if argv.first().is_none_or(String::is_empty) {
                    Some("ready check exec has an empty argv".into())
                } else if timeout.is_zero() {
                    Some("ready check exec: timeout must be longer than 0".into())
                } else {
                    None
                }
            }
            ReadyCheck::Log { contains } => contains
                .is_empty()
                .then(|| "ready check log: contains must not be empty".into()),
            ReadyCheck::CpuSettled {
                below_percent,
                window,
            } => {
                let percent = below_percent.0;
                if !(percent > 0.0 && percent <= 100.0) {
                    Some(format!(
                        "ready check cpu_settled: below_percent must be more than 0 and at most 100, not {percent}"
                    ))
                } else if window.is_zero() {
                    Some("ready check cpu_settled: window must be longer than 0".into())
                } else if *window >= ready_timeout {
                    Some(format!(
                        "ready check cpu_settled: window {} must be shorter than the ready timeout {}",
                        humantime::format_duration(*window),
                        humantime::format_duration(ready_timeout)
                    ))
                } else {
                    None
                }
            }
        }
    }
}

/// How the check reads in messages: `tcp port "http"`, `log contains "started"`.
impl std::fmt::Display for ReadyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyCheck::Tcp { port } => write!(f, "tcp port {port:?}"),
            ReadyCheck::Connect { port } => write!(f, "connect to port {port:?}"),
            ReadyCheck::Http {
                port, path, status, ..
            } => write!(f, "http GET {path} on port {port:?} (status {status})"),
            ReadyCheck::Bytes { port, send, .. } => write!(f, "bytes {send:?} on port {port:?}"),
            ReadyCheck::Exec { argv, .. } => write!(f, "exec {argv:?}"),
            ReadyCheck::Log { contains } => write!(f, "log contains {contains:?}"),
            ReadyCheck::CpuSettled {
                below_percent,
                window,
            } => write!(
                f,
                "cpu_settled below {below_percent} over {}",
                humantime::format_duration(*window)
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("service {service:?}: {message}")]
    Invalid { service: String, message: String },
    #[error("catalog defines no services")]
    Empty,
    #[error("os {os:?}: {message}")]
    InvalidOs { os: String, message: String },
    #[error("pool {pool:?}: {message}")]
    InvalidPool { pool: String, message: String },
    #[error(transparent)]
    Component(#[from] ComponentError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    service: BTreeMap<String, RawService>,
    #[serde(default)]
    os: BTreeMap<String, Os>,
    #[serde(default)]
    pool: BTreeMap<String, RawPool>,
    #[serde(default)]
    software: BTreeMap<String, RawPackaged>,
    #[serde(default)]
    patch: BTreeMap<String, RawPackaged>,
    #[serde(default)]
    app: BTreeMap<String, RawApp>,
}

/// An application (`[app.NAME]`), or the application a service defines inline.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApp {
    #[serde(default)]
    description: String,
    #[serde(default)]
    runs_on: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    conflicts: Vec<String>,
    #[serde(default)]
    port: Vec<Port>,
    #[serde(default)]
    process: Vec<Process>,
    #[serde(default)]
    files: BTreeMap<String, FileSpec>,
    #[serde(default)]
    templates: BTreeMap<String, FileSpec>,
    #[serde(default)]
    settings: BTreeMap<String, Setting>,
    ready: Option<ReadySpec>,
    /// Least memory the app needs to run, in MiB.
    #[serde(default)]
    min_memory_mib: Option<u32>,
    /// Least disk the app adds, in MiB.
    #[serde(default)]
    min_disk_mib: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    description: String,
    /// The one OS it runs on; none: every OS where its components are viable.
    os: Option<String>,
    /// Applications (`[app.NAME]`) this service's VMs run together.
    #[serde(default)]
    apps: Vec<String>,
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    /// Unset: 128 MiB, or the floor its apps and OS declare when that is more.
    #[serde(default)]
    memory_mib: Option<u32>,
    pool: Option<PoolBounds>,
    // The service's own application, inline (as in [`RawApp`]).
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    conflicts: Vec<String>,
    #[serde(default)]
    port: Vec<Port>,
    #[serde(default)]
    process: Vec<Process>,
    #[serde(default)]
    files: BTreeMap<String, FileSpec>,
    #[serde(default)]
    templates: BTreeMap<String, FileSpec>,
    #[serde(default)]
    settings: BTreeMap<String, Setting>,
    ready: Option<ReadySpec>,
    #[serde(default)]
    policy: Policy,
    /// The service's own minimums (of its inline app, or over its apps').
    #[serde(default)]
    min_memory_mib: Option<u32>,
    #[serde(default)]
    min_disk_mib: Option<u32>,
}

impl RawService {
    /// Splits off the inline application.
    fn split(self) -> (RawService, RawApp) {
        let app = RawApp {
            description: self.description.clone(),
            runs_on: self.os.iter().cloned().collect(),
            requires: self.requires.clone(),
            conflicts: self.conflicts.clone(),
            port: self.port.clone(),
            process: self.process.clone(),
            files: self.files.clone(),
            templates: self.templates.clone(),
            settings: self.settings.clone(),
            ready: self.ready.clone(),
            min_memory_mib: None,
            min_disk_mib: None,
        };
        (self, app)
    }
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> u32 {
    128
}

impl Catalog {
    /// The built-in demo catalog.
    pub fn demo() -> Catalog {
        Catalog::from_toml(DEMO_CATALOG).expect("the demo catalog is valid")
    }

    /// Parses and validates a whole catalog.
    pub fn from_toml(text: &str) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = toml::from_str(text)?;
        if raw.service.is_empty() {
            return Err(CatalogError::Empty);
        }
        let mut os = raw.os;
        if os.is_empty() {
            os.insert(
                "busybox".into(),
                Os {
                    name: String::new(),
                    version: "1.35".into(),
                    base: OsBase::Busybox,
                    description: "busybox-static userland".into(),
                    suite: None,
                    packages: Vec::new(),
                    min_memory_mib: None,
                    min_disk_mib: None,
                },
            );
        }
        for (name, entry) in &mut os {
            entry.name = name.clone();
            let fail = |message: String| CatalogError::InvalidOs {
                os: name.clone(),
                message,
            };
            if !is_name(name) {
                return Err(fail("not a valid name".into()));
            }
            if crate::matching::parse_version(&entry.version).is_none() {
                return Err(fail(format!(
                    "version {:?} is not a dotted version",
                    entry.version
                )));
            }
            match entry.base {
                OsBase::Busybox => {
                    if entry.suite.is_some() || !entry.packages.is_empty() {
                        return Err(fail(
                            "suite and packages need base = \"debootstrap\"".into(),
                        ));
                    }
                }
                OsBase::Debootstrap => {
                    let suite_ok = entry.suite.as_deref().is_some_and(|suite| {
                        !suite.is_empty()
                            && suite.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    });
                    if !suite_ok {
                        return Err(fail(
                            "base = \"debootstrap\" needs a suite, e.g. suite = \"bookworm\""
                                .into(),
                        ));
                    }
                    for package in &entry.packages {
                        crate::components::Package::parse(package).map_err(&fail)?;
                    }
                }
            }
        }

        // Components: software, patches, applications, and the services' inline apps.
        let mut components = Vec::new();
        for (name, raw) in raw.software {
            components.push(raw.into_component(&name, ComponentKind::Software).map_err(
                |message| ComponentError::Invalid {
                    component: name.clone(),
                    message,
                },
            )?);
        }
        for (name, raw) in raw.patch {
            components.push(raw.into_component(&name, ComponentKind::Patch).map_err(
                |message| ComponentError::Invalid {
                    component: name.clone(),
                    message,
                },
            )?);
        }
        let mut apps: BTreeMap<String, RawApp> = raw.app;
        let mut services_raw = BTreeMap::new();
        for (name, raw) in raw.service {
            if !is_name(&name) {
                return Err(CatalogError::Invalid {
                    service: name.clone(),
                    message: "names use lowercase letters, digits and '-', start with a letter, at most 40 characters".into(),
                });
            }
            if let Some(wanted) = &raw.os
                && !os.contains_key(wanted)
            {
                return Err(CatalogError::Invalid {
                    service: name.clone(),
                    message: format!(
                        "unknown os {:?} (known: {})",
                        wanted,
                        os.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            let (raw, inline) = raw.split();
            if inline.has_content() {
                if apps.contains_key(&name) {
                    return Err(CatalogError::Invalid {
                        service: name.clone(),
                        message: format!(
                            "defines its own ports, processes or files, and an [app.{name}] exists too; move them into the app"
                        ),
                    });
                }
                apps.insert(name.clone(), inline);
                services_raw.insert(name, (raw, true));
            } else {
                services_raw.insert(name, (raw, false));
            }
        }
        for (name, app) in &apps {
            components.push(Component {
                name: name.clone(),
                kind: ComponentKind::App,
                description: app.description.clone(),
                packages: Vec::new(),
                runs_on: app.runs_on.clone(),
                requires: app.requires.clone(),
                conflicts: app.conflicts.clone(),
            });
        }
        let components = Components::new(components, &os)?;

        let mut services = BTreeMap::new();
        for (name, (raw, inline)) in services_raw {
            let service = validate(name.clone(), raw, inline, &apps, &components, &os)?;
            services.insert(name, service);
        }
        let mut pools = BTreeMap::new();
        for service in services.values() {
            if let Some(bounds) = service.pool {
                pools.insert(
                    service.name.clone(),
                    PoolSpec {
                        name: service.name.clone(),
                        service: Some(service.name.clone()),
                        vcpus: service.vcpus,
                        memory_mib: service.memory_mib,
                        min: bounds.min,
                        max: bounds.max,
                    },
                );
            }
        }
        for (name, raw) in raw.pool {
            let fail = |message: String| CatalogError::InvalidPool {
                pool: name.clone(),
                message,
            };
            if !is_name(&name) {
                return Err(fail("not a valid name".into()));
            }
            if pools.contains_key(&name) || services.contains_key(&name) {
                return Err(fail(
                    "has the name of a service; pools of a service are set in [service.NAME.pool]"
                        .into(),
                ));
            }
            if let Some(service) = &raw.service {
                let Some(offered) = services.get(service) else {
                    return Err(fail(format!(
                        "names service {service:?}, which the catalog does not define"
                    )));
                };
                if raw.vcpus < offered.vcpus || raw.memory_mib < offered.memory_mib {
                    return Err(fail(format!(
                        "is smaller than service {service:?} needs ({} vCPUs, {} MiB)",
                        offered.vcpus, offered.memory_mib
                    )));
                }
            }
            check_shape(raw.vcpus, raw.memory_mib).map_err(fail)?;
            check_bounds(raw.min, raw.max).map_err(fail)?;
            pools.insert(
                name.clone(),
                PoolSpec {
                    name,
                    service: raw.service,
                    vcpus: raw.vcpus,
                    memory_mib: raw.memory_mib,
                    min: raw.min,
                    max: raw.max,
                },
            );
        }
        Ok(Catalog {
            services,
            os,
            pools,
            components,
            imported: std::sync::RwLock::default(),
        })
    }

    pub fn os(&self, name: &str) -> Option<&Os> {
        self.os.get(name)
    }

    pub fn operating_systems(&self) -> impl Iterator<Item = &Os> {
        self.os.values()
    }

    /// Every pool: service pools (named after their service) and configuration pools.
    pub fn pools(&self) -> impl Iterator<Item = &PoolSpec> {
        self.pools.values()
    }

    /// A service by name: the catalog's own, or an imported machine's.
    pub fn get(&self, name: &str) -> Option<&Service> {
        self.services
            .get(name)
            .or_else(|| self.imported_map().get(name).copied())
    }

    fn imported_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, &'static Service>> {
        self.imported.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the service of an imported machine (replacing one of its name); refused when
    /// the catalog has a service of that name or `service` is not marked imported.
    pub fn add_imported(&self, service: Service) -> Result<(), String> {
        if !service.imported {
            return Err(format!("{} is not an imported machine", service.name));
        }
        if self.services.contains_key(&service.name) {
            return Err(format!("the catalog has a service named {}", service.name));
        }
        let leaked: &'static Service = Box::leak(Box::new(service));
        self.imported
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(leaked.name.clone(), leaked);
        Ok(())
    }

    /// Forgets an imported machine's service; returns whether it was there.
    pub fn remove_imported(&self, name: &str) -> bool {
        self.imported
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some()
    }

    /// The services of imported machines, by name.
    pub fn imported_services(&self) -> Vec<&Service> {
        self.imported_map()
            .values()
            .map(|s| *s as &Service)
            .collect()
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Software, patches and applications.
    pub fn components(&self) -> &Components {
        &self.components
    }

    /// The directory: can `service` be offered on `os`? `Ok` with the service, or the
    /// reason it never can (no such OS, or a component that does not run there).
    pub fn viable(&self, service: &str, os: &str) -> Result<&Service, Never> {
        let Some(entry) = self.services.get(service) else {
            let imported = self.imported_map().get(service).copied();
            return match imported {
                None => Err(Never::NoService),
                Some(entry) if entry.environments.iter().any(|env| env == os) => Ok(entry),
                Some(entry) => Err(Never::Combination {
                    reason: format!(
                        "{service} is an imported machine: it runs its own OS ({})",
                        entry.os
                    ),
                }),
            };
        };
        if entry.environments.iter().any(|env| env == os) {
            return Ok(entry);
        }
        let reason = match self.os.get(os) {
            None => format!("there is no os {os:?}"),
            Some(target) => {
                let closure = self
                    .components
                    .closure(entry.components.iter().map(String::as_str));
                match Components::viable_on(&closure, target) {
                    Err(why) => why,
                    // Viable by components, but the service names one OS only.
                    Ok(()) => format!("{service} is offered on {} only", entry.os),
                }
            }
        };
        Err(Never::Combination { reason })
    }

    /// Viable combinations closest to `service` on `os`, best first, as request arguments
    /// (`redis --env os=debian-12`): the same service elsewhere, then services with close
    /// names on the same OS.
    pub fn alternatives(&self, service: &str, os: Option<&str>, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(entry) = self.services.get(service) {
            out.extend(
                entry
                    .environments
                    .iter()
                    .filter(|env| Some(env.as_str()) != os)
                    .map(|env| format!("{service} --env os={env}")),
            );
        }
        let on_os: Vec<&str> = self
            .services
            .values()
            .filter(|s| s.name != service)
            .filter(|s| os.is_none_or(|os| s.environments.iter().any(|e| e == os)))
            .map(|s| s.name.as_str())
            .collect();
        let mut near = crate::suggest::closest(service, on_os.iter().copied(), limit);
        if near.is_empty() {
            near = on_os.iter().map(|s| s.to_string()).collect();
        }
        for name in near {
            out.push(match os {
                Some(os) => format!("{name} --env os={os}"),
                None => name,
            });
        }
        out.truncate(limit);
        out
    }
}

/// Why a combination is not in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Never {
    /// No service of that name (a 404: see the closest names).
    NoService,
    /// The service exists but never on that environment.
    Combination { reason: String },
}

impl Service {
    /// The service of an imported machine `name`: its `ports` (name → guest port), ready
    /// when the guest answers on every port ([`ReadyCheck::Connect`]; no hangar-init runs
    /// in it to ask), within `ready_timeout` (a firmware boot under emulation takes tens of
    /// seconds). Its one environment is [`IMPORTED_OS`].
    pub fn imported_machine(
        name: &str,
        ports: &BTreeMap<String, u16>,
        vcpus: u32,
        memory_mib: u32,
        ready_timeout: Duration,
    ) -> Service {
        Service {
            name: name.to_string(),
            pool: None,
            policy: Policy::default(),
            description: format!("imported machine {name}"),
            os: IMPORTED_OS.to_string(),
            environments: vec![IMPORTED_OS.to_string()],
            vcpus,
            memory_mib,
            ports: ports
                .iter()
                .map(|(name, guest)| Port {
                    name: name.clone(),
                    guest: *guest,
                    wake: WakeOn::default(),
                })
                .collect(),
            processes: Vec::new(),
            files: BTreeMap::new(),
            templates: BTreeMap::new(),
            settings: BTreeMap::new(),
            ready: ReadySpec {
                timeout: ready_timeout,
                interval: Duration::from_millis(500),
                consecutive: 1,
                checks: ports
                    .keys()
                    .map(|port| ReadyCheck::Connect { port: port.clone() })
                    .collect(),
            },
            components: Vec::new(),
            min_memory_mib: None,
            min_disk_mib: None,
            imported: true,
        }
    }

    /// Checks a ready criterion for this service (e.g. one set at run time).
    pub fn check_ready(&self, ready: &ReadySpec) -> Result<(), String> {
        check_ready(ready, &self.ports.iter().map(|p| p.name.as_str()).collect())
    }

    pub fn port(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|port| port.name == name)
    }
}

/// Checks a ready criterion against the ports it may name.
pub fn check_ready(ready: &ReadySpec, port_names: &BTreeSet<&str>) -> Result<(), String> {
    if ready.checks.is_empty() {
        return Err("ready needs at least one check".into());
    }
    if ready.timeout.is_zero() {
        return Err("ready timeout must be longer than 0".into());
    }
    if ready.consecutive == 0 {
        return Err("ready consecutive must be at least 1".into());
    }
    for check in &ready.checks {
        if let Some(port) = check.port()
            && !port_names.contains(port)
        {
            return Err(format!(
                "ready check names port {port:?}, which the service does not define"
            ));
        }
        if let Some(problem) = check.problem(ready.timeout) {
            return Err(problem);
        }
    }
    Ok(())
}

fn check_shape(vcpus: u32, memory_mib: u32) -> Result<(), String> {
    use crate::matching::{MAX_MEMORY_MIB, MAX_VCPUS};
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(format!("vcpus must be 1 to {MAX_VCPUS}, not {vcpus}"));
    }
    if !(64..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(format!(
            "memory_mib must be 64 to {MAX_MEMORY_MIB}, not {memory_mib}"
        ));
    }
    Ok(())
}

fn check_bounds(min: u32, max: u32) -> Result<(), String> {
    if min > max {
        return Err(format!("pool min {min} is larger than max {max}"));
    }
    if max > 64 {
        return Err(format!("pool max {max} is larger than 64"));
    }
    Ok(())
}

impl RawApp {
    /// Whether an inline app has anything of its own (a service with only `apps` has not).
    fn has_content(&self) -> bool {
        !(self.port.is_empty()
            && self.process.is_empty()
            && self.files.is_empty()
            && self.templates.is_empty()
            && self.settings.is_empty()
            && self.requires.is_empty()
            && self.conflicts.is_empty())
    }
}

fn validate(
    name: String,
    raw: RawService,
    inline: bool,
    apps: &BTreeMap<String, RawApp>,
    components: &Components,
    os: &BTreeMap<String, Os>,
) -> Result<Service, CatalogError> {
    let fail = |message: String| CatalogError::Invalid {
        service: name.clone(),
        message,
    };
    if !is_name(&name) {
        return Err(fail(
            "names use lowercase letters, digits and '-', start with a letter, at most 40 characters".into(),
        ));
    }
    if let Some(wanted) = &raw.os
        && !os.contains_key(wanted)
    {
        return Err(fail(format!(
            "unknown os {:?} (known: {})",
            wanted,
            os.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    check_shape(raw.vcpus, raw.memory_mib.unwrap_or_else(default_memory)).map_err(&fail)?;
    if let Some(bounds) = raw.pool {
        check_bounds(bounds.min, bounds.max).map_err(&fail)?;
    }

    // The applications this service runs, and everything they need.
    let mut roots: Vec<&str> = Vec::new();
    for app in &raw.apps {
        match components.get(app) {
            Some(component) if component.kind == ComponentKind::App => roots.push(app),
            Some(component) => {
                return Err(fail(format!(
                    "apps names {app:?}, which is {}, not an app",
                    component.kind.as_str()
                )));
            }
            None => return Err(fail(format!("apps names unknown app {app:?}"))),
        }
    }
    if inline {
        roots.push(&name);
    }
    if roots.is_empty() {
        return Err(fail(
            "needs at least one [[port]] and [[process]], or apps = [...]".into(),
        ));
    }
    let closure = components.closure(roots.iter().copied());
    if let Some(conflict) = Components::conflict_in(&closure) {
        return Err(fail(format!("can never be built: {conflict}")));
    }
    let environments: Vec<String> = match &raw.os {
        Some(wanted) => {
            Components::viable_on(&closure, &os[wanted])
                .map_err(|why| fail(format!("cannot run on os {wanted}: {why}")))?;
            vec![wanted.clone()]
        }
        None => {
            let mut viable = Vec::new();
            let mut reasons = Vec::new();
            for candidate in os.values() {
                match Components::viable_on(&closure, candidate) {
                    Ok(()) => viable.push(candidate.name.clone()),
                    Err(why) => reasons.push(format!("{}: {why}", candidate.name)),
                }
            }
            if viable.is_empty() {
                return Err(fail(format!("can run on no os ({})", reasons.join("; "))));
            }
            viable
        }
    };

    // Merge the apps (dependencies first) into one VM's ports, processes and files.
    let mut ports: Vec<Port> = Vec::new();
    let mut processes: Vec<Process> = Vec::new();
    let mut files = BTreeMap::new();
    let mut templates = BTreeMap::new();
    let mut settings: BTreeMap<String, Setting> = BTreeMap::new();
    let mut readies = Vec::new();
    for component in closure.iter().filter(|c| c.kind == ComponentKind::App) {
        let app = &apps[&component.name];
        ports.extend(app.port.iter().cloned());
        processes.extend(app.process.iter().cloned());
        for (path, file) in app.files.iter().chain(&app.templates) {
            if files.contains_key(path) || templates.contains_key(path) {
                return Err(fail(format!(
                    "file {path:?} comes from two apps (the second is {})",
                    component.name
                )));
            }
            if app.files.contains_key(path) {
                files.insert(path.clone(), file.clone());
            } else {
                templates.insert(path.clone(), file.clone());
            }
        }
        for (key, setting) in &app.settings {
            if settings.insert(key.clone(), setting.clone()).is_some() {
                return Err(fail(format!(
                    "setting {key:?} is declared by two apps (the second is {})",
                    component.name
                )));
            }
        }
        // The inline app's criterion is the service's own (`raw.ready`).
        if !(inline && component.name == name)
            && let Some(ready) = &app.ready
        {
            readies.push(ready.clone());
        }
    }
    // Minimums: the most memory any of its apps needs (they share the VM's memory, each
    // figure counting the OS it was measured on), the disk they all add.
    let declared = closure
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
        .map(|c| &apps[&c.name])
        .map(|app| (app.min_memory_mib, app.min_disk_mib))
        .chain([(raw.min_memory_mib, raw.min_disk_mib)]);
    let (mut min_memory_mib, mut min_disk_mib) = (None::<u32>, None::<u32>);
    for (memory, disk) in declared {
        if let Some(memory) = memory {
            min_memory_mib = Some(min_memory_mib.unwrap_or(0).max(memory));
        }
        if let Some(disk) = disk {
            min_disk_mib = Some(min_disk_mib.unwrap_or(0).saturating_add(disk));
        }
    }
    // A service that states its memory must reach the floor on every OS it runs on; one
    // that does not gets the default, raised to the highest floor.
    let mut memory_mib = raw.memory_mib.unwrap_or_else(default_memory);
    for env in &environments {
        let floor = os[env]
            .min_memory_mib
            .unwrap_or(0)
            .max(min_memory_mib.unwrap_or(0));
        if memory_mib < floor {
            if raw.memory_mib.is_some() {
                return Err(fail(format!(
                    "memory_mib = {memory_mib} is below the {floor} MiB it needs on os {env} (min_memory_mib of its apps and OS)"
                )));
            }
            memory_mib = floor;
        }
    }
    let ready = match raw.ready {
        Some(ready) => ready,
        None => merge_ready(readies).ok_or_else(|| {
            fail("needs a [ready] criterion (its own, or one of its apps')".into())
        })?,
    };

    if ports.is_empty() {
        return Err(fail("needs at least one [[port]]".into()));
    }
    let mut port_names = BTreeSet::new();
    let mut guest_ports = BTreeSet::new();
    for port in &ports {
        if !is_name(&port.name) {
            return Err(fail(format!(
                "port name {:?} is not a valid name",
                port.name
            )));
        }
        if port.guest == 0 {
            return Err(fail(format!(
                "port {:?}: guest port 0 is not a port",
                port.name
            )));
        }
        if !port_names.insert(port.name.as_str()) {
            return Err(fail(format!("port {:?} is defined twice", port.name)));
        }
        if !guest_ports.insert(port.guest) {
            return Err(fail(format!("guest port {} is used twice", port.guest)));
        }
    }
    if processes.is_empty() {
        return Err(fail("needs at least one [[process]]".into()));
    }
    let mut process_names = BTreeSet::new();
    for process in &processes {
        if process.argv.is_empty() || process.argv[0].is_empty() {
            return Err(fail(format!(
                "process {:?} has an empty argv",
                process.name
            )));
        }
        if !process_names.insert(process.name.as_str()) {
            return Err(fail(format!("process {:?} is defined twice", process.name)));
        }
    }
    for (path, file) in files.iter().chain(&templates) {
        if !path.starts_with('/') || path.split('/').any(|part| part == "..") || path.ends_with('/')
        {
            return Err(fail(format!(
                "file path {path:?} must be absolute, name a file, and not contain '..'"
            )));
        }
        if file.mode > 0o7777 {
            return Err(fail(format!(
                "file {path:?}: mode {:o} is not a file mode",
                file.mode
            )));
        }
    }
    for (key, setting) in &settings {
        if let Some(default) = &setting.default
            && let Err(why) = setting.check(default)
        {
            return Err(fail(format!(
                "setting {key:?}: its default {why} (format {})",
                setting.format.as_str()
            )));
        }
    }
    for key in settings.keys() {
        let valid = !key.is_empty()
            && key.len() <= 64
            && key != "os"
            && key.starts_with(|c: char| c.is_ascii_alphabetic())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(fail(format!(
                "setting {key:?}: names use letters, digits and '_', start with a letter, and are not \"os\""
            )));
        }
    }
    if raw.pool.is_some()
        && let Some((key, _)) = settings.iter().find(|(_, s)| s.default.is_none())
    {
        return Err(fail(format!(
            "keeps a warm pool, so its setting {key:?} needs a default (pool VMs are made before any request)"
        )));
    }
    for (path, template) in &templates {
        for key in template_keys(&template.content) {
            if !settings.contains_key(&key) && !BUILTIN_TEMPLATE_KEYS.contains(&key.as_str()) {
                return Err(fail(format!(
                    "template {path:?} uses {{{{{key}}}}}, which is neither a setting nor one of {}",
                    BUILTIN_TEMPLATE_KEYS.join(", ")
                )));
            }
        }
    }
    check_ready(&ready, &port_names).map_err(&fail)?;
    raw.policy.check().map_err(&fail)?;
    Ok(Service {
        name: name.clone(),
        pool: raw.pool,
        policy: raw.policy,
        description: raw.description,
        os: environments[0].clone(),
        environments,
        vcpus: raw.vcpus,
        memory_mib,
        ports,
        processes,
        files,
        templates,
        settings,
        ready,
        components: closure.iter().map(|c| c.name.clone()).collect(),
        min_memory_mib,
        min_disk_mib,
        imported: false,
    })
}

/// The ready criteria of several apps as one: every check of each, within the longest
/// timeout, the shortest interval, and the most consecutive rounds.
fn merge_ready(readies: Vec<ReadySpec>) -> Option<ReadySpec> {
    let mut iter = readies.into_iter();
    let mut merged = iter.next()?;
    for ready in iter {
        merged.timeout = merged.timeout.max(ready.timeout);
        merged.interval = merged.interval.min(ready.interval);
        merged.consecutive = merged.consecutive.max(ready.consecutive);
        merged.checks.extend(ready.checks);
    }
    Some(merged)
}

/// Lowercase letters, digits and '-', starting with a letter, at most 40 characters.
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `Duration` as a human string (`"500ms"`, `"60s"`) in TOML and JSON.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [service.web]
        os = "busybox"
        [[service.web.port]]
        name = "http"
        guest = 80
        [[service.web.process]]
        name = "httpd"
        argv = ["httpd", "-f"]
        [service.web.ready]
        checks = [{ tcp = { port = "http" } }]
    "#;

    #[test]
    fn a_service_without_memory_gets_its_floor_and_one_below_it_is_refused() {
        let needing = |extra: &str| {
            MINIMAL.replace(
                "os = \"busybox\"",
                &format!("os = \"busybox\"\nmin_memory_mib = 192\n{extra}"),
            )
        };
        let catalog = Catalog::from_toml(&needing("")).unwrap();
        assert_eq!(catalog.get("web").unwrap().memory_mib, 192);
        let catalog = Catalog::from_toml(&needing("memory_mib = 256")).unwrap();
        assert_eq!(catalog.get("web").unwrap().memory_mib, 256);
        let err = Catalog::from_toml(&needing("memory_mib = 128"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("memory_mib = 128 is below the 192 MiB"),
            "{err}"
        );
        // Without a floor the default stays.
        assert_eq!(
            Catalog::from_toml(MINIMAL)
                .unwrap()
                .get("web")
                .unwrap()
                .memory_mib,
            128
        );
    }

    #[test]
    fn demo_catalog_has_the_demo_services() {
        let catalog = Catalog::demo();
        let names: Vec<_> = catalog.names().collect();
        assert_eq!(
            names,
            [
                "http-counter",
                "http-static",
                "nginx",
                "postgresql",
                "redis",
                "web-cache",
                "web-proxy"
            ]
        );
        let counter = catalog.get("http-counter").unwrap();
        assert_eq!(counter.memory_mib, 256);
        assert_eq!(counter.files["/www/cgi-bin/index.cgi"].mode, 0o755);
        assert!(
            counter.files["/www/cgi-bin/index.cgi"]
                .content
                .contains("\\r\\n")
        );
        let web = catalog.get("http-static").unwrap();
        assert_eq!(web.ready.timeout, Duration::from_secs(60));
        assert_eq!(web.ready.checks.len(), 2);
    }

    #[test]
    fn the_directory_knows_where_each_service_can_run() {
        let catalog = Catalog::demo();
        let redis = catalog.get("redis").unwrap();
        assert_eq!(redis.environments, ["debian-12"]);
        assert_eq!(redis.os, "debian-12");
        assert_eq!(redis.components, ["redis-server", "redis"]);
        assert_eq!(
            catalog.get("http-static").unwrap().environments,
            ["busybox"]
        );
        assert!(catalog.viable("redis", "debian-12").is_ok());
        let Err(Never::Combination { reason }) = catalog.viable("redis", "busybox") else {
            panic!("redis on busybox is never viable");
        };
        assert_eq!(
            reason,
            "software redis-server runs on debian-12, not on busybox"
        );
        let Err(Never::Combination { reason }) = catalog.viable("http-static", "debian-12") else {
            panic!("http-static is busybox only");
        };
        assert!(reason.contains("runs on busybox"), "{reason}");
        assert_eq!(catalog.viable("nope", "busybox"), Err(Never::NoService));
        let Err(Never::Combination { reason }) = catalog.viable("redis", "plan9") else {
            panic!("no such os");
        };
        assert_eq!(reason, r#"there is no os "plan9""#);
        // Closest viable alternatives: the same service elsewhere first, then services
        // with close names on the OS asked for.
        let alternatives = catalog.alternatives("redis", Some("busybox"), 4);
        assert_eq!(alternatives[0], "redis --env os=debian-12");
        assert!(
            alternatives[1..]
                .iter()
                .all(|a| a.ends_with("--env os=busybox")),
            "{alternatives:?}"
        );

        // Two apps on one VM: both ports, both processes, every ready check, the patch.
        let both = catalog.get("web-cache").unwrap();
        let ports: Vec<_> = both
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.guest))
            .collect();
        assert_eq!(ports, [("http", 80), ("redis", 6379)]);
        assert_eq!(both.processes.len(), 2);
        assert_eq!(both.ready.checks.len(), 4);
        assert_eq!(
            both.components,
            [
                "nginx-light",
                "web-page",
                "redis-server",
                "redis",
                "ps-tools",
                "web-cache"
            ]
        );
        assert!(both.templates.contains_key("/var/www/html/hello.txt"));
        assert!(both.files.contains_key("/var/www/html/index.html"));
        let postgres = catalog.get("postgresql").unwrap();
        assert_eq!(postgres.settings["password"].default, None);
        assert!(postgres.settings["password"].secret);
    }

    const COMPONENTS: &str = r#"
        [os.debian-12]
        version = "12"
        base = "debootstrap"
        suite = "bookworm"
        [software.web]
        packages = ["nginx-light"]
        [app.page]
        requires = ["web"]
        [[app.page.port]]
        name = "http"
        guest = 80
        [[app.page.process]]
        name = "nginx"
        argv = ["nginx"]
        [app.page.ready]
        checks = [{ tcp = { port = "http" } }]
        [service.site]
        apps = ["page"]
    "#;

    #[test]
    fn bad_components_name_the_component() {
        assert!(Catalog::from_toml(COMPONENTS).is_ok());
        let cycle = COMPONENTS.replace(
            r#"packages = ["nginx-light"]"#,
            "packages = [\"nginx-light\"]\nrequires = [\"page\"]",
        );
        assert_eq!(
            invalid(&cycle),
            "components require each other in a cycle: page -> web -> page"
        );
        let unknown = COMPONENTS.replace(r#"requires = ["web"]"#, r#"requires = ["wbe"]"#);
        assert_eq!(
            invalid(&unknown),
            r#"component "page" requires unknown component "wbe""#
        );
        let bad_package = COMPONENTS.replace(r#"["nginx-light"]"#, r#"["nginx; reboot"]"#);
        let err = invalid(&bad_package);
        assert!(
            err.starts_with(r#"component "web": "nginx; reboot" is not a Debian package name"#),
            "{err}"
        );
        let conflicting = format!(
            "{COMPONENTS}\n[software.other]\npackages = [\"apache2\"]\nconflicts = [\"web\"]\n"
        )
        .replace(r#"requires = ["web"]"#, r#"requires = ["web", "other"]"#);
        assert_eq!(
            invalid(&conflicting),
            r#"service "site": can never be built: software web and software other conflict"#
        );
        let nowhere = COMPONENTS
            .replace(
                r#"packages = ["nginx-light"]"#,
                "packages = [\"nginx-light\"]\nruns_on = [\"busybox\"]",
            )
            .replace(
                "[os.debian-12]",
                "[os.busybox]\nversion = \"1.35\"\n[os.debian-12]",
            );
        let err = invalid(&nowhere);
        assert!(
            err.starts_with(r#"service "site": can run on no os"#),
            "{err}"
        );
        let template =
            format!("{COMPONENTS}\n[app.page.templates.\"/etc/x\"]\ncontent = \"{{{{nope}}}}\"\n");
        let err = invalid(&template);
        assert!(err.contains(r#"template "/etc/x" uses {{nope}}"#), "{err}");
        let no_suite = COMPONENTS.replace("suite = \"bookworm\"\n", "");
        let err = invalid(&no_suite);
        assert!(err.contains("needs a suite"), "{err}");
    }

    #[test]
    fn setting_formats_are_read_and_defaults_must_fit_them() {
        let catalog = Catalog::demo();
        let redis = catalog.get("redis").unwrap();
        assert_eq!(
            redis.settings["maxmemory"].format,
            crate::components::SettingFormat::Size
        );
        assert!(
            redis.settings["maxmemory"]
                .check("64mb requirepass")
                .is_err()
        );
        let postgres = catalog.get("postgresql").unwrap();
        assert_eq!(
            postgres.settings["password"].format,
            crate::components::SettingFormat::Text
        );
        let with_setting = |format: &str, default: &str| {
            format!(
                "{MINIMAL}\n[service.web.settings.limit]\nformat = \"{format}\"\ndefault = \"{default}\"\n"
            )
        };
        assert!(Catalog::from_toml(&with_setting("size", "1gb")).is_ok());
        let err = Catalog::from_toml(&with_setting("size", "1 gb"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"setting "limit": its default must be a size"#),
            "{err}"
        );
        let err = Catalog::from_toml(&with_setting("colour", "x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn minimal_service_gets_defaults() {
        let catalog = Catalog::from_toml(MINIMAL).unwrap();
        let web = catalog.get("web").unwrap();
        assert_eq!((web.vcpus, web.memory_mib), (1, 128));
        assert_eq!(web.ready.interval, Duration::from_millis(50));
        assert_eq!(web.port("http").unwrap().guest, 80);
    }

    fn invalid(text: &str) -> String {
        Catalog::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn malformed_catalogs_name_the_problem() {
        assert!(invalid("[service.web").starts_with("catalog is not valid TOML"));
        assert_eq!(invalid(""), "catalog defines no services");
        let err = invalid(&MINIMAL.replace(r#"os = "busybox""#, r#"os = "plan9""#));
        assert_eq!(err, r#"service "web": unknown os "plan9" (known: busybox)"#);
        let err = invalid(&MINIMAL.replace(r#"{ port = "http" }"#, r#"{ port = "https" }"#));
        assert!(err.contains(r#"names port "https""#), "{err}");
        let err = invalid(
            &MINIMAL
                .replace("[service.web]", "[service.Web_1]")
                .replace("service.web.", "service.Web_1."),
        );
        assert!(err.starts_with(r#"service "Web_1": names use"#), "{err}");
        let err = invalid(&MINIMAL.replace(r#"argv = ["httpd", "-f"]"#, "argv = []"));
        assert!(err.contains("empty argv"), "{err}");
        let err = invalid(&MINIMAL.replace("guest = 80", "guest = 80\ncolour = 1"));
        assert!(err.contains("unknown field `colour`"), "{err}");
        let err = invalid(&MINIMAL.replace("checks =", "timeout = \"soon\"\nchecks ="));
        assert!(err.starts_with("catalog is not valid TOML"), "{err}");
        let with_file = format!("{MINIMAL}\n[service.web.files.\"www/x\"]\ncontent = \"\"\n");
        assert!(invalid(&with_file).contains("must be absolute"));
    }

    #[test]
    fn pools_and_operating_systems() {
        let catalog = Catalog::demo();
        assert_eq!(catalog.os("busybox").unwrap().version, "1.35");
        let pools: Vec<_> = catalog
            .pools()
            .map(|p| (p.name.as_str(), p.service.as_deref(), p.memory_mib))
            .collect();
        assert!(
            pools.contains(&("http-static", Some("http-static"), 128)),
            "{pools:?}"
        );
        assert!(pools.contains(&("shell-1x256", None, 256)), "{pools:?}");

        let with_pool = |pool: &str| format!("{MINIMAL}\n{pool}\n");
        let err = invalid(&with_pool(
            "[pool.web]\nvcpus = 1\nmemory_mib = 128\nmax = 1",
        ));
        assert!(err.contains("has the name of a service"), "{err}");
        let err = invalid(&with_pool(
            "[pool.big]\nservice = \"db\"\nvcpus = 1\nmemory_mib = 128\nmax = 1",
        ));
        assert!(err.contains(r#"names service "db""#), "{err}");
        let err = invalid(&with_pool(
            "[pool.big]\nvcpus = 1\nmemory_mib = 128\nmin = 3\nmax = 1",
        ));
        assert_eq!(err, r#"pool "big": pool min 3 is larger than max 1"#);
        let err = invalid(&with_pool(
            "[pool.tiny]\nservice = \"web\"\nvcpus = 1\nmemory_mib = 64\nmax = 1",
        ));
        assert!(err.contains("smaller than service"), "{err}");
        let err = invalid(&with_pool("[os.busybox]\nversion = \"one\""));
        assert!(err.contains("is not a dotted version"), "{err}");
        let ok = Catalog::from_toml(&with_pool(
            "[pool.big]\nservice = \"web\"\nvcpus = 2\nmemory_mib = 512\nmax = 2",
        ))
        .unwrap();
        assert_eq!(ok.pools().count(), 1);
    }

    #[test]
    fn a_process_may_name_its_reload_signal_from_a_short_list() {
        let with_reload = |signal: &str| {
            MINIMAL.replace(
                r#"argv = ["httpd", "-f"]"#,
                &format!("argv = [\"httpd\", \"-f\"]\nreload = \"{signal}\""),
            )
        };
        let catalog = Catalog::from_toml(&with_reload("HUP")).unwrap();
        assert_eq!(
            catalog.get("web").unwrap().processes[0].reload,
            Some(hangar_proto::ReloadSignal::Hup)
        );
        let minimal = Catalog::from_toml(MINIMAL).unwrap();
        assert_eq!(minimal.get("web").unwrap().processes[0].reload, None);
        for refused in ["TERM", "KILL", "hup", ""] {
            assert!(
                Catalog::from_toml(&with_reload(refused)).is_err(),
                "{refused}"
            );
        }
        let demo = Catalog::demo();
        let proxy = demo.get("web-proxy").unwrap();
        assert_eq!(
            proxy.processes[0].reload,
            Some(hangar_proto::ReloadSignal::Hup),
            "nginx reloads on SIGHUP"
        );
    }

    #[test]
    fn duplicate_ports_are_refused() {
        let text = MINIMAL.replace(
            "guest = 80",
            "guest = 80\n[[service.web.port]]\nname = \"http\"\nguest = 81",
        );
        assert!(invalid(&text).contains(r#"port "http" is defined twice"#));
    }

    fn with_checks(checks: &str) -> String {
        MINIMAL.replace(
            r#"checks = [{ tcp = { port = "http" } }]"#,
            &format!("checks = [{checks}]"),
        )
    }

    #[test]
    fn exec_log_and_cpu_checks_parse_with_defaults() {
        let text = with_checks(
            r#"
            { exec = { argv = ["sh", "-c", "test -f /run/ready"], timeout = "2s" } },
            { exec = { argv = ["true"] } },
            { log = { contains = "server started" } },
            { cpu_settled = { below_percent = 20.0, window = "300ms" } },
            { cpu_settled = { below_percent = 5 } },
            { tcp = { port = "http" } },
            "#,
        )
        .replace("checks =", "consecutive = 3\nchecks =");
        let catalog = Catalog::from_toml(&text).unwrap();
        let ready = &catalog.get("web").unwrap().ready;
        assert_eq!(ready.consecutive, 3);
        assert_eq!(
            ready.checks,
            [
                ReadyCheck::Exec {
                    argv: vec!["sh".into(), "-c".into(), "test -f /run/ready".into()],
                    timeout: Duration::from_secs(2),
                },
                ReadyCheck::Exec {
                    argv: vec!["true".into()],
                    timeout: Duration::from_secs(5),
                },
                ReadyCheck::Log {
                    contains: "server started".into(),
                },
                ReadyCheck::CpuSettled {
                    below_percent: Percent(20.0),
                    window: Duration::from_millis(300),
                },
                ReadyCheck::CpuSettled {
                    below_percent: Percent(5.0),
                    window: Duration::from_millis(500),
                },
                ReadyCheck::Tcp {
                    port: "http".into()
                },
            ]
        );
        let ports: Vec<_> = ready.checks.iter().map(ReadyCheck::port).collect();
        assert_eq!(ports, [None, None, None, None, None, Some("http")]);
        assert_eq!(
            ready.checks[3].to_string(),
            "cpu_settled below 20% over 300ms"
        );
        assert_eq!(
            ready.checks[2].to_string(),
            r#"log contains "server started""#
        );

        // Defaults, and the JSON the API shows round-trips.
        let minimal = Catalog::from_toml(MINIMAL).unwrap();
        assert_eq!(minimal.get("web").unwrap().ready.consecutive, 1);
        let json = serde_json::to_value(ready).unwrap();
        assert_eq!(json["consecutive"], 3);
        assert_eq!(json["checks"][0]["exec"]["timeout"], "2s");
        assert_eq!(json["checks"][3]["cpu_settled"]["below_percent"], 20.0);
        assert_eq!(json["checks"][3]["cpu_settled"]["window"], "300ms");
        let back: ReadySpec = serde_json::from_value(json).unwrap();
        assert_eq!(&back, ready);
    }

    #[test]
    fn bad_ready_criteria_name_the_problem() {
        let cases = [
            (
                with_checks(r#"{ tcp = { port = "http" } }"#)
                    .replace("checks =", "consecutive = 0\nchecks ="),
                r#"service "web": ready consecutive must be at least 1"#,
            ),
            (
                with_checks(r#"{ exec = { argv = [] } }"#),
                r#"service "web": ready check exec has an empty argv"#,
            ),
            (
                with_checks(r#"{ exec = { argv = [""] } }"#),
                r#"service "web": ready check exec has an empty argv"#,
            ),
            (
                with_checks(r#"{ exec = { argv = ["true"], timeout = "0s" } }"#),
                r#"service "web": ready check exec: timeout must be longer than 0"#,
            ),
            (
                with_checks(r#"{ log = { contains = "" } }"#),
                r#"service "web": ready check log: contains must not be empty"#,
            ),
            (
                with_checks(r#"{ cpu_settled = { below_percent = 0.0 } }"#),
                r#"service "web": ready check cpu_settled: below_percent must be more than 0 and at most 100, not 0"#,
            ),
            (
                with_checks(r#"{ cpu_settled = { below_percent = 100.5 } }"#),
                r#"service "web": ready check cpu_settled: below_percent must be more than 0 and at most 100, not 100.5"#,
            ),
            (
                with_checks(r#"{ cpu_settled = { below_percent = nan } }"#),
                r#"service "web": ready check cpu_settled: below_percent must be more than 0 and at most 100, not NaN"#,
            ),
            (
                with_checks(r#"{ cpu_settled = { below_percent = 10.0, window = "0ms" } }"#),
                r#"service "web": ready check cpu_settled: window must be longer than 0"#,
            ),
            (
                with_checks(r#"{ cpu_settled = { below_percent = 10.0, window = "2m" } }"#),
                r#"service "web": ready check cpu_settled: window 2m must be shorter than the ready timeout 1m"#,
            ),
            (
                with_checks(r#"{ exec = { argv = ["true"] } }, { http = { port = "admin" } }"#),
                r#"service "web": ready check names port "admin", which the service does not define"#,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(invalid(&text), expected);
        }
        // A port on a check that has none, or a missing field, is a parse error.
        let err = invalid(&with_checks(
            r#"{ log = { contains = "x", port = "http" } }"#,
        ));
        assert!(err.contains("unexpected keys in table: port"), "{err}");
        let err = invalid(&with_checks(r#"{ cpu_settled = { window = "1s" } }"#));
        assert!(err.contains("missing field `below_percent`"), "{err}");
        let err = invalid(&with_checks(
            r#"{ exec = { argv = ["true"], timeout = "soon" } }"#,
        ));
        assert!(err.starts_with("catalog is not valid TOML"), "{err}");
        // 100 is allowed; so is 100 written as an integer.
        assert!(
            Catalog::from_toml(&with_checks(r#"{ cpu_settled = { below_percent = 100 } }"#))
                .is_ok()
        );
    }

    #[test]
    fn policies_are_read_and_checked() {
        let text = format!(
            "{MINIMAL}\n[service.web.policy]\nsleep_after = \"3s\"\narchive_after = \"1m\"\narchive_tier = \"raw\"\n"
        );
        let catalog = Catalog::from_toml(&text).unwrap();
        let policy = catalog.get("web").unwrap().policy;
        assert_eq!(policy.sleep_after, Some(Duration::from_secs(3)));
        assert_eq!(policy.archive_after, Some(Duration::from_secs(60)));
        assert_eq!(policy.delete_after, None);
        assert_eq!(policy.archive_tier, crate::TierChoice::Raw);
        assert!(
            !Catalog::from_toml(MINIMAL)
                .unwrap()
                .get("web")
                .unwrap()
                .policy
                .has_timers()
        );
        let err = invalid(&text.replace("\"3s\"", "\"0s\""));
        assert_eq!(
            err,
            r#"service "web": policy sleep_after must be longer than 0 (leave it out for never)"#
        );
        let err = invalid(&text.replace("raw", "lz4"));
        assert!(err.contains("unknown variant `lz4`"), "{err}");
    }

    #[test]
    fn names() {
        assert!(is_name("http-static"));
        assert!(!is_name("1abc"));
        assert!(!is_name("a b"));
        assert!(!is_name(&"a".repeat(41)));
    }
}
