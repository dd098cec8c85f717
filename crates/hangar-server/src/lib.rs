//! hangar's control plane: `hangar server`. One folder per concern; [`manager::Manager`]
//! composes them.
//!
//! - [`alerts`]: alert rules watched by the leader; the log and webhook sinks.
//! - [`api`]: the REST API under `/v1` (+ `/healthz`, `/v1/openapi.json`) and the one
//!   mapping from errors to HTTP answers ([`api::error`]).
//! - [`requests`]: the request path, top-down (shared VM, woken VM, pool grant, new VM),
//!   pool grants and the making of one VM.
//! - [`tasks`]: long operations recorded with stage and percent, and their outcomes.
//! - [`pools`]: warm pools kept at their targets.
//! - [`lifecycle`]: sleep, archive, wake and delete of one VM ([`lifecycle::ops`]) and the
//!   policy loop that applies idle timers and budgets ([`lifecycle::policy`]).
//! - [`images`]: where kernels, initramfs and disks come from, image builds, promotion,
//!   eviction and export.
//! - [`templates`]: when a service's template is built and removed.
//! - [`scheduler`]: placement: which host makes each VM.
//! - [`reconcile`]: the store against what runs on the host, at start-up and while running.
//! - [`metrics`]: the names recorded with the `metrics` facade, served at `/metrics`.
//! - [`endpoints`]: stable endpoints, held by the forwarder process the server starts or
//!   re-adopts (see `hangar_forward`).
//!
//! The server speaks to the machine that runs VMs through [`hangar_host::Host`]; in
//! single-node mode that is one [`hangar_host::LocalHost`], which runs QEMU itself.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hangar_core::Catalog;
use hangar_vmm::Accel;
use hangar_vmm::qemu::{QemuBackend, QemuConfig};

pub mod alerts;
pub mod api;
pub mod dns;
pub mod endpoints;
pub mod evacuation;
pub mod farm;
pub mod images;
pub mod imports;
pub mod lifecycle;
pub mod manager;
pub mod metrics;
pub mod migration;
pub mod pools;
pub mod quotas;
pub mod rebalance;
pub mod reconcile;
pub mod requests;
pub mod scheduler;
pub mod secrets;
pub mod stacks;
pub mod tasks;
pub mod templates;
pub mod usage;
pub mod web;

pub use api::error;
pub use hangar_core::lifecycle::PolicyFloors;
pub use hangar_core::quota::Limits;
pub use hangar_core::usage::Prices;
/// The host agent (`hangar agent`) and the image sources it may use, for the CLI.
pub use hangar_host::guest::guest_config;
pub use manager::{Manager, ManagerConfig};

/// The metrics token's file in the data directory, unless `--metrics-token-file` names
/// another.
pub const METRICS_TOKEN_FILE: &str = "metrics.token";

/// How often running VMs are checked for crashed processes.
const MONITOR_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Where the REST API listens: a loopback address, unless `insecure_listen`.
    pub listen: SocketAddr,
    /// Allow `listen` to be reachable from other machines (plain HTTP; warned loudly at
    /// start). Off: a non-loopback `listen` is refused ([`hangar_core::exposure`]).
    pub insecure_listen: bool,
    /// A catalog file; `None` uses the built-in demo catalog.
    pub catalog: Option<PathBuf>,
    pub accel: Accel,
    /// How the local host's VMs' segment NICs are switched ([`hangar_vmm::tap`]).
    pub segment_net: hangar_vmm::tap::SegmentNet,
    /// The TSC frequency guests are told (kHz); `None`: this machine's, measured at start
    /// ([`hangar_image::host_tsc_khz`]).
    pub guest_tsc_khz: Option<u64>,
    /// Address port forwards listen on, and endpoints name: a concrete address clients
    /// connect to, never a wildcard ([`hangar_core::exposure::check_endpoint_host`]).
    pub endpoint_host: IpAddr,
    pub kernel: Option<PathBuf>,
    pub busybox: Option<PathBuf>,
    /// Most memory all warm pools may hold together, in MiB.
    pub pool_memory_mib: u64,
    /// Answers carry `<vm>.<domain>` when set.
    pub dns_domain: Option<String>,
    /// Answer DNS for `dns_domain` on this address (UDP and TCP; [`dns`]). Off when `None`.
    pub dns_listen: Option<SocketAddr>,
    /// Most guest memory (MiB) active and sleeping VMs may hold; none: unlimited.
    pub memory_budget_mib: Option<u64>,
    /// Most disk (MiB) archives and evictable images may take; none: unlimited.
    pub disk_budget_mib: Option<u64>,
    /// Clone new VMs from service templates (snapshots at the ready state) instead of
    /// booting them.
    pub templates: bool,
    /// The command that runs the forwarder holding stable endpoints (`hangar forwarder`;
    /// `--data-dir` and `--server` are added). `None` runs it inside the server, so that
    /// endpoints close when the server stops.
    pub forwarder_command: Option<Vec<std::ffi::OsString>>,
    /// Debian mirror for OS layers and packages.
    pub debian_mirror: String,
    /// Most disk cached image layers may take, in MiB.
    pub image_budget_mib: u64,
    /// Where the state lives: a `postgres://` URL or a SQLite file; `None`: `hangar.db`
    /// in the data directory.
    pub store: Option<String>,
    /// The farm token file (made on first start, mode 0600); `None`: `farm.token` in the
    /// data directory. Agents given its token may join the farm.
    pub farm_token_file: Option<PathBuf>,
    /// The metrics token file (made on first start, mode 0600): the bearer token a
    /// Prometheus scraper reads `GET /metrics` with; `None`: `metrics.token` in the data
    /// directory.
    pub metrics_token_file: Option<PathBuf>,
    /// The key secret settings are sealed with in the store (made on first start, mode
    /// 0600); `None`: `secrets.key` in the data directory. Replicas sharing a store need
    /// the same key.
    pub secrets_key_file: Option<PathBuf>,
    /// Run VMs on this machine too (the server's own host). Off: a control plane whose
    /// VMs all run on farm hosts (agents).
    pub local_host: bool,
    /// When farm hosts without heartbeats are declared down, then lost.
    pub host_loss: farm::LossTimes,
    /// Give VMs stable endpoints (held by a forwarder on this machine) that survive sleep
    /// and archive and wake VMs on connection. Off: endpoints are the VMs' own port
    /// forwards on their hosts (for replicated control planes).
    pub stable_endpoints: bool,
    /// Rebalancing's settings when it is on (`--rebalance`); `None`: VMs stay where they
    /// were placed.
    pub rebalance: Option<rebalance::RebalanceConfig>,
    /// The shortest idle timers a policy set at run time may have.
    pub policy_floors: hangar_core::lifecycle::PolicyFloors,
    /// The quota of every user without one of their own.
    pub default_quota: hangar_core::quota::Limits,
    /// Prices of what usage metering counts.
    pub prices: hangar_core::usage::Prices,
    /// An alert rules file (TOML, [`hangar_core::alerts::AlertConfig::from_toml`]);
    /// `None`: every rule with its defaults, the log as the only sink.
    pub alerts: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data dir {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("private segments: {0}")]
    Segments(String),
    #[error("another hangar server is using data dir {0}")]
    Locked(String),
    /// QEMU cannot run as its unprivileged user.
    #[error("confining QEMU: {0}")]
    Confine(#[from] hangar_vmm::confine::ConfineError),
    /// The data dir could not be made private, or a build's mounts under it not undone.
    #[error("data dir: {0}")]
    HostFs(#[from] hangar_image::hostfs::HostFsError),
    #[error("cannot read catalog {path}: {source}")]
    CatalogRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog {path}: {source}")]
    Catalog {
        path: String,
        #[source]
        source: hangar_core::CatalogError,
    },
    #[error("cannot read alert rules {path}: {source}")]
    AlertsRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("alert rules {path}: {source}")]
    Alerts {
        path: String,
        #[source]
        source: hangar_core::alerts::AlertConfigError,
    },
    #[error(transparent)]
    FarmToken(#[from] farm::token::TokenError),
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    #[error("--dns-listen needs --dns-domain: the domain to answer for")]
    DnsWithoutDomain,
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error(transparent)]
    AdminToken(#[from] api::auth::tokens::AdminTokenError),
    #[error("cannot open the database: {0}")]
    Store(String),
    #[error("{0}")]
    Qemu(String),
    #[error("cannot prepare guest assets")]
    Assets(#[source] images::ImageSourceError),
    #[error("start-up reconciliation failed: {0}")]
    Reconcile(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The listen address or endpoint host is refused (see [`hangar_core::exposure`]).
    #[error(transparent)]
    Exposure(#[from] hangar_core::exposure::ExposureError),
    #[error("cannot start the forwarder of stable endpoints: {0}")]
    Forwarder(String),
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Loads the catalog named by the config, or the built-in demo catalog.
pub fn load_catalog(path: Option<&Path>) -> Result<Catalog, ServerError> {
    let Some(path) = path else {
        return Ok(Catalog::demo());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::CatalogRead {
        path: path.display().to_string(),
        source,
    })?;
    Catalog::from_toml(&text).map_err(|source| ServerError::Catalog {
        path: path.display().to_string(),
        source,
    })
}

/// Loads the alert rules named by the config, or the defaults.
pub fn load_alerts(path: Option<&Path>) -> Result<hangar_core::alerts::AlertConfig, ServerError> {
    let Some(path) = path else {
        return Ok(hangar_core::alerts::AlertConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::AlertsRead {
        path: path.display().to_string(),
        source,
    })?;
    hangar_core::alerts::AlertConfig::from_toml(&text).map_err(|source| ServerError::Alerts {
        path: path.display().to_string(),
        source,
    })
}

/// Checks that QEMU is installed and says what to install when it is not.
fn check_qemu(config: &QemuConfig) -> Result<String, ServerError> {
    for (program, package) in [
        (&config.qemu, "qemu-system-x86"),
        (&config.qemu_img, "qemu-utils"),
    ] {
        let output = std::process::Command::new(program)
            .arg("--version")
            .output();
        match output {
            Ok(output) if output.status.success() => {}
            _ => {
                return Err(ServerError::Qemu(format!(
                    "{} is not installed or does not run; install it with `apt-get install -y {package}`",
                    program.display()
                )));
            }
        }
    }
    let output = std::process::Command::new(&config.qemu)
        .arg("--version")
        .output()
        .map_err(|err| ServerError::Qemu(err.to_string()))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Unmounts everything mounted below `data_dir` (deepest first, detached when busy): what
/// an image build of a server that was killed left (`proc`, `sysfs`, a bind of the host's
/// `/dev`, overlays, loop-mounted layers). Fails when a mount remains. Call it holding the
/// data dir's lock, before anything else uses the data dir.
pub fn undo_stale_mounts(data_dir: &std::path::Path) -> Result<(), ServerError> {
    let undone = hangar_image::hostfs::unmount_all_under(data_dir)?;
    if !undone.is_empty() {
        tracing::warn!(
            count = undone.len(),
            "unmounted what an interrupted image build left under the data dir"
        );
    }
    Ok(())
}

/// The user QEMU runs as when this process is root (`hangar-vm`, else `nobody`), opened
/// to `roots` as far as QEMU needs; `None` otherwise (QEMU runs as this user, sandboxed).
pub fn confined_user(
    roots: &[std::path::PathBuf],
) -> Result<Option<hangar_vmm::confine::VmUser>, hangar_vmm::confine::ConfineError> {
    let user = hangar_vmm::confine::VmUser::for_this_process(roots)?;
    match &user {
        Some(user) => {
            tracing::info!(user = %user.name, uid = user.uid, sandbox = hangar_vmm::confine::SANDBOX, "qemu runs confined")
        }
        None => {
            tracing::info!(
                sandbox = hangar_vmm::confine::SANDBOX,
                "qemu runs as this user, sandboxed"
            )
        }
    }
    Ok(user)
}

/// Runs the server until `shutdown` completes. VMs keep running when the server stops;
/// the next start adopts them.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    hangar_core::exposure::check_endpoint_host(config.endpoint_host)?;
    hangar_host::metrics::install();
    metrics::describe();
    if hangar_core::exposure::check_listen("API", config.listen, config.insecure_listen)? {
        tracing::warn!(
            "{}",
            hangar_core::exposure::insecure_warning("API", config.listen)
        );
    }
    let data_dir = &config.data_dir;
    let data_err = |source| ServerError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    hangar_image::hostfs::secure_dir(data_dir)?;
    let lock = std::fs::File::create(data_dir.join("server.lock")).map_err(data_err)?;
    lock.try_lock()
        .map_err(|_| ServerError::Locked(data_dir.display().to_string()))?;
    // Holding the lock, no build of a live server has mounts here: whatever is mounted
    // below the data dir was left by a server killed during an image build.
    undo_stale_mounts(data_dir)?;

    let farm_token = farm::token::load_or_create(
        &config
            .farm_token_file
            .clone()
            .unwrap_or_else(|| data_dir.join("farm.token")),
    )?;
    let metrics_token = farm::token::load_or_create(
        &config
            .metrics_token_file
            .clone()
            .unwrap_or_else(|| data_dir.join(METRICS_TOKEN_FILE)),
    )?;
    let secrets_key = secrets::Secrets::load_or_create_key(
        &config
            .secrets_key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("secrets.key")),
    )?;
    let catalog = Arc::new(load_catalog(config.catalog.as_deref())?);
    let alerts = load_alerts(config.alerts.as_deref())?;
    let store_location = match &config.store {
        Some(location) => location.clone(),
        None => data_dir.join("hangar.db").display().to_string(),
    };
    let store = hangar_store::open(&store_location)
        .await
        .map_err(|err| ServerError::Store(error::error_chain(&err)))?;
    // The first admin's token (made on first start): the CLI and the forwarder use it.
    let admin_token = api::auth::tokens::ensure_admin_token(
        store.as_ref(),
        &data_dir.join(api::auth::tokens::ADMIN_TOKEN_FILE),
    )
    .await?;

    let vms_dir = data_dir.join("vms");
    let mut qemu_config = QemuConfig::new(vms_dir.clone(), config.accel);
    if config.local_host {
        let cache = data_dir.join("cache");
        std::fs::create_dir_all(&cache).map_err(data_err)?;
        qemu_config.user = confined_user(&[data_dir.clone(), cache])?;
        qemu_config.segment_netns = hangar_host::segment::netns_for(config.segment_net, data_dir)
            .map_err(|err| ServerError::Segments(err.to_string()))?;
    }
    let qemu_version = if config.local_host {
        let version = check_qemu(&qemu_config)?;
        tracing::info!(qemu = %version, accel = %qemu_config.accel, requested = %config.accel, "hypervisor");
        version
    } else {
        tracing::info!("no local host: VMs run on farm hosts only");
        String::new()
    };
    tracing::info!(
        backend = if hangar_store::is_postgres_url(&store_location) {
            "postgresql"
        } else {
            "sqlite"
        },
        "store"
    );
    if config.local_host {
        store
            .upsert_host(&hangar_store::HostRecord {
                name: manager::LOCAL_HOST.to_owned(),
                // In-process: the control plane does not call it over the network.
                address: String::new(),
                state: hangar_store::HostState::Up,
                facts: serde_json::json!({
                    "qemu": qemu_version.to_string(),
                    "accel": qemu_config.accel.to_string(),
                }),
                last_heartbeat_ms: hangar_store::now_ms(),
            })
            .await
            .map_err(|err| ServerError::Store(error::error_chain(&err)))?;
    }

    let images = Arc::new(images::LocalImages::new(
        data_dir.join("cache"),
        hangar_image::AssetSources {
            kernel: config.kernel.clone(),
            busybox: config.busybox.clone(),
        },
        catalog.clone(),
        config.debian_mirror.clone(),
    ));
    tracing::info!(
        "preparing guest assets (the first start fetches and unpacks the Debian cloud kernel)"
    );
    let assets = images::ImageSource::guest_assets(images.as_ref())
        .await
        .map_err(ServerError::Assets)?;
    tracing::info!(kernel = %assets.kernel_release, hash = %&assets.hash[..12.min(assets.hash.len())], "guest assets ready");

    let host = hangar_host::LocalHost::new(
        Arc::new(QemuBackend::new(qemu_config)),
        images.clone(),
        hangar_host::LocalHostConfig {
            name: manager::LOCAL_HOST.into(),
            endpoint_host: config.endpoint_host,
            // Under TCG on microvm the guest cannot calibrate its TSC; it is told the rate.
            guest_cmdline: hangar_image::kernel_cmdline(
                config.guest_tsc_khz.or_else(hangar_image::host_tsc_khz),
            ),
            templates_dir: config.templates.then(|| config.data_dir.join("templates")),
            vms_dir: Some(vms_dir.clone()),
            models_dir: Some(config.data_dir.join("models")),
        },
    );
    // Listen before reconciling: the forwarder is told this address for wake requests,
    // which wait in the backlog until the API serves.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    let server_url = format!(
        "http://{}",
        if addr.ip().is_unspecified() {
            SocketAddr::new(IpAddr::from([127, 0, 0, 1]), addr.port())
        } else {
            addr
        }
    );
    let local: Option<Arc<dyn hangar_host::Host>> = if config.local_host {
        host.clean_template_debris();
        host.verify_templates();
        Some(Arc::new(host))
    } else {
        None
    };
    let manager = Manager::with_hosts(
        store,
        scheduler::Scheduler::new(local, Some(farm_connector(farm_token.clone()))),
        images,
        catalog,
        ManagerConfig {
            endpoint_host: config.endpoint_host,
            pool_memory_mib: config.pool_memory_mib,
            image_budget_mib: config.image_budget_mib,
            export_dir: data_dir.join("exports"),
            models_dir: Some(data_dir.join("models")),
            dns_domain: config.dns_domain.clone(),
            memory_budget_mib: config.memory_budget_mib,
            disk_budget_mib: config.disk_budget_mib,
            farm_token,
            metrics_token,
            host_loss: config.host_loss,
            server_urls: vec![server_url.clone()],
            policy_floors: config.policy_floors,
            secrets_key,
            default_quota: config.default_quota,
            prices: config.prices,
            alerts,
            ..ManagerConfig::default()
        },
    );
    if config.stable_endpoints {
        let kind = match &config.forwarder_command {
            Some(command) => endpoints::ForwarderKind::Process {
                data_dir: data_dir.clone(),
                command: command.clone(),
            },
            None => {
                let forwarder = hangar_forward::Forwarder::new(&server_url);
                forwarder.set_token(&admin_token);
                endpoints::ForwarderKind::InProcess(forwarder)
            }
        };
        manager.use_stable_endpoints(endpoints::StableEndpoints::new(kind, &server_url));
    }

    // Imported machines are services from the start: reconciliation and requests see them.
    match manager.load_imports().await {
        Ok(0) => {}
        Ok(count) => tracing::info!(count, "imported machines offered"),
        Err(err) => tracing::warn!(error = %err, "cannot read the imported machines"),
    }

    // One replica of the control plane leads (runs the loops); a single server always
    // does. A replica that starts while another leads reconciles nothing: the leader's
    // tasks and VMs are in flight. The replica's name is its data dir's (one server per
    // data dir), so a server started again after kill -9 leads at once, as it did.
    let replica = farm::leader::replica_name(data_dir).map_err(data_err)?;
    if manager.try_lead(&replica, None).await {
        let report = manager
            .reconcile()
            .await
            .map_err(|err| ServerError::Reconcile(err.to_string()))?;
        tracing::info!(
            adopted = report.adopted.len(),
            failed = report.failed.len(),
            stopped_unknown = report.stopped_unknown.len(),
            removed_dirs = report.removed_dirs.len(),
            "reconciled state with running vms"
        );
    } else {
        tracing::info!(%replica, "another server leads on this store: this one serves the API as a standby");
    }
    let leader_loop = manager.spawn_leader_loop(replica.clone());
    manager
        .sync_endpoints()
        .await
        .map_err(|err| ServerError::Forwarder(crate::api::error::error_chain(&err)))?;

    let monitor = {
        let manager = manager.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MONITOR_INTERVAL);
            loop {
                tick.tick().await;
                if !manager.farm.leading() {
                    continue;
                }
                manager.monitor_once().await;
                manager.poll_endpoint_activity().await;
            }
        })
    };

    let dns = match (config.dns_listen, &config.dns_domain) {
        (Some(addr), Some(domain)) => Some(dns::serve(addr, domain, manager.clone()).await?.1),
        (Some(_), None) => return Err(ServerError::DnsWithoutDomain),
        (None, _) => None,
    };

    let farm_loop = manager.spawn_farm_loop();
    let pool_loop = manager.spawn_pool_loop();
    let lifecycle_loop = manager.spawn_lifecycle_loop();
    let image_loop = manager.spawn_image_loop();
    let alert_loop = manager.spawn_alert_loop();
    let rebalance_loop = config.rebalance.map(|settings| {
        let mover = Arc::new(rebalance::MigrationMover(manager.clone()));
        manager.spawn_rebalance_loop(settings, mover)
    });

    tracing::info!(%addr, data_dir = %data_dir.display(), "hangar server listening");
    let manager_for_shutdown = manager.clone();
    let served = axum::serve(listener, web::app(manager))
        .with_graceful_shutdown(shutdown)
        .await;
    monitor.abort();
    leader_loop.abort();
    if manager_for_shutdown.farm.leading()
        && let Err(err) = manager_for_shutdown
            .store()
            .release_lease(farm::leader::LEADER_LEASE, &replica)
            .await
    {
        tracing::warn!(error = %error::error_chain(&err), "cannot hand the lead back");
    }
    farm_loop.abort();
    pool_loop.abort();
    lifecycle_loop.abort();
    image_loop.abort();
    alert_loop.abort();
    if let Some(rebalance_loop) = rebalance_loop {
        rebalance_loop.abort();
    }
    if let Some(dns) = dns {
        dns.abort();
    }
    drop(lock);
    served.map_err(ServerError::Serve)
}

/// Connects to farm hosts' agents with the farm token.
fn farm_connector(token: String) -> scheduler::Connector {
    Arc::new(move |name: &str, address: &str| {
        hangar_host::remote::RemoteHost::new(name, address, &token)
            .map(|host| Arc::new(host) as Arc<dyn hangar_host::Host>)
            .map_err(|err| error::error_chain(&err))
    })
}

#[cfg(test)]
mod test_support;
