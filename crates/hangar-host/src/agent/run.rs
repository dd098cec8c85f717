//! The agent process: a [`LocalHost`] over QEMU served by [`super::router`], registered
//! with the control plane and reporting to it every second.
//!
//! The agent keeps nothing the control plane needs: killed, its VMs keep running (QEMU
//! runs detached from the agent, as it does from the server); started again, it registers
//! with a new incarnation and reports the VMs it finds, which the control plane adopts
//! through [`Host::adopt`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hangar_api::{
    Client, ClientError, Heartbeat, HeartbeatReply, HostFactsView, HostRegistration, HostVmView,
};
use hangar_vmm::Accel;
use hangar_vmm::qemu::{QemuBackend, QemuConfig};
use tokio::sync::watch;

use crate::images::ImageSource;
use crate::local::error_chain;
use crate::{Host, HostFacts, LocalHost, LocalHostConfig, RunState, VmRun};

/// How often the agent reports to the control plane.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// How long one registration or heartbeat may take before the agent tries the next server.
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);

/// What an agent runs with (`hangar agent`).
pub struct AgentConfig {
    /// The host's name in the farm.
    pub name: String,
    /// The control plane's API URLs, in the order to try them.
    pub servers: Vec<String>,
    /// The farm token: presented to the control plane, and asked of it.
    pub token: String,
    /// A token that reads `GET /metrics` and nothing else (besides the farm token), so a
    /// Prometheus need not hold the farm token.
    pub metrics_token: Option<String>,
    /// Where the agent's API listens: a loopback address, unless `insecure_listen`.
    pub listen: SocketAddr,
    /// Allow `listen` to be reachable from other machines (plain HTTP, the farm token in
    /// clear; warned loudly at start). Off: a non-loopback `listen` is refused
    /// ([`hangar_core::exposure`]).
    pub insecure_listen: bool,
    /// The agent's API as the control plane reaches it; none: `http://<listen>`, or
    /// `http://<endpoint_host>:<port>` when `listen` is a wildcard address.
    pub advertise: Option<String>,
    /// VM directories, templates and the lock file.
    pub data_dir: PathBuf,
    pub accel: Accel,
    /// How VMs' segment NICs are switched here ([`hangar_vmm::tap`]).
    pub segment_net: hangar_vmm::tap::SegmentNet,
    /// The TSC frequency guests are told (kHz); `None`: this machine's, measured at start
    /// ([`hangar_image::host_tsc_khz`]).
    pub guest_tsc_khz: Option<u64>,
    /// Where VMs' port forwards listen: the machine's own address as clients reach it,
    /// never a wildcard.
    pub endpoint_host: IpAddr,
    pub labels: BTreeMap<String, String>,
    pub cost: u32,
    pub priority: i32,
    /// Whether services' templates are made and cloned here.
    pub templates: bool,
    /// Where the host's images come from.
    pub images: Arc<dyn ImageSource>,
}

/// How the agent presents itself to the control plane.
#[derive(Debug, Clone)]
pub struct Membership {
    pub name: String,
    /// The agent's API, `http://ADDR:PORT`.
    pub address: String,
    pub servers: Vec<String>,
    pub token: String,
    /// What `GET /metrics` accepts besides the farm token ([`AgentConfig::metrics_token`]).
    pub metrics_token: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub cost: u32,
    pub priority: i32,
    pub heartbeat_every: Duration,
}

/// Why the agent could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another agent or server")]
    Locked(String),
    /// QEMU cannot run as its unprivileged user.
    #[error("confining QEMU: {0}")]
    Confine(#[from] hangar_vmm::confine::ConfineError),
    /// The data dir could not be made private.
    #[error("data directory: {0}")]
    HostFs(#[from] hangar_image::hostfs::HostFsError),
    #[error("{0}")]
    Qemu(String),
    #[error("no server URL given")]
    NoServers,
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The listen address or endpoint host is refused (see [`hangar_core::exposure`]).
    #[error(transparent)]
    Exposure(#[from] hangar_core::exposure::ExposureError),
    #[error("serving the agent API")]
    Serve(#[source] std::io::Error),
    #[error("private segments: {0}")]
    Segments(String),
}

/// Runs the agent until `shutdown` completes: QEMU under `config.data_dir`, the agent API
/// on `config.listen`, registration and heartbeats to `config.servers`. VMs keep running
/// when it returns.
pub async fn run_agent(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    if config.servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    hangar_core::exposure::check_endpoint_host(config.endpoint_host)?;
    crate::metrics::install();
    if hangar_core::exposure::check_listen("agent API", config.listen, config.insecure_listen)? {
        tracing::warn!(
            "{}",
            hangar_core::exposure::insecure_warning("agent API", config.listen)
        );
    }
    let data_dir = &config.data_dir;
    let data_err = |source| AgentError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    hangar_image::hostfs::secure_dir(data_dir)?;
    let lock = std::fs::File::create(data_dir.join("agent.lock")).map_err(data_err)?;
    lock.try_lock()
        .map_err(|_| AgentError::Locked(data_dir.display().to_string()))?;

    let vms_dir = data_dir.join("vms");
    let mut qemu_config = QemuConfig::new(vms_dir.clone(), config.accel);
    qemu_config.user =
        hangar_vmm::confine::VmUser::for_this_process(std::slice::from_ref(data_dir))?;
    match &qemu_config.user {
        Some(user) => tracing::info!(user = %user.name, uid = user.uid, "qemu runs confined"),
        None => tracing::info!("qemu runs as this user, sandboxed"),
    }
    qemu_config.segment_netns = crate::segment::netns_for(config.segment_net, data_dir)
        .map_err(|err| AgentError::Segments(err.to_string()))?;
    let qemu_version = check_qemu(&qemu_config)?;
    tracing::info!(qemu = %qemu_version, accel = %qemu_config.accel, requested = %config.accel, "hypervisor");

    let host = LocalHost::new(
        Arc::new(QemuBackend::new(qemu_config)),
        config.images.clone(),
        LocalHostConfig {
            name: config.name.clone(),
            endpoint_host: config.endpoint_host,
            // Under TCG on microvm the guest cannot calibrate its TSC; it is told the rate.
            guest_cmdline: hangar_image::kernel_cmdline(
                config.guest_tsc_khz.or_else(hangar_image::host_tsc_khz),
            ),
            templates_dir: config.templates.then(|| data_dir.join("templates")),
            vms_dir: Some(vms_dir),
            models_dir: None,
        },
    );
    host.clean_template_debris();
    host.verify_templates();
    // Guest assets ready before the first VM needs them; a failure is reported here and
    // again by the first VM that needs them.
    let images = config.images.clone();
    tokio::spawn(async move {
        match images.guest_assets().await {
            Ok(assets) => tracing::info!(kernel = %assets.kernel_release, "guest assets ready"),
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "guest assets are not ready")
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(AgentError::Serve)?;
    let address = config.advertise.clone().unwrap_or_else(|| {
        let ip = if bound.ip().is_unspecified() {
            config.endpoint_host
        } else {
            bound.ip()
        };
        format!("http://{}", SocketAddr::new(ip, bound.port()))
    });
    let membership = Membership {
        name: config.name,
        address,
        servers: config.servers,
        token: config.token,
        metrics_token: config.metrics_token,
        labels: config.labels,
        cost: config.cost,
        priority: config.priority,
        heartbeat_every: HEARTBEAT_EVERY,
    };
    let served = serve(Arc::new(host), listener, membership, shutdown).await;
    drop(lock);
    served
}

/// Serves `host` on `listener` and reports it to the control plane as `membership` says,
/// until `shutdown` completes.
pub async fn serve(
    host: Arc<dyn Host>,
    listener: tokio::net::TcpListener,
    membership: Membership,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    if membership.servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    let app = super::router(host.clone(), &membership.token).merge(super::metrics::router(
        host.clone(),
        &membership.token,
        membership.metrics_token.as_deref(),
    ));
    let incarnation = ulid::Ulid::new().to_string();
    tracing::info!(name = %membership.name, address = %membership.address, incarnation = %incarnation, "agent serving");
    let (stop, stopped) = watch::channel(false);
    let reporter = tokio::spawn(report(host, membership, incarnation, stopped));
    let served = tokio::select! {
        served = axum::serve(listener, app) => served.map_err(AgentError::Serve),
        () = shutdown => Ok(()),
    };
    let _ = stop.send(true);
    let _ = reporter.await;
    served
}

/// The facts as the farm API carries them.
pub fn facts_view(facts: &HostFacts) -> HostFactsView {
    HostFactsView {
        hypervisor: facts.hypervisor.clone(),
        vcpus: facts.vcpus,
        memory_mib: facts.memory_mib,
        free_memory_mib: facts.free_memory_mib,
        free_disk_mib: facts.free_disk_mib,
        load: facts.load,
        templates: facts.templates.clone(),
        blobs: facts.blobs.clone(),
        images: facts.images.clone(),
    }
}

/// The VMs as the farm API carries them (`running`, `paused`, `stopped`).
pub fn vms_view(vms: &[VmRun]) -> Vec<HostVmView> {
    vms.iter()
        .map(|vm| HostVmView {
            id: vm.id.clone(),
            state: match vm.state {
                RunState::Running => "running",
                RunState::Paused => "paused",
                RunState::Gone => "stopped",
            }
            .to_owned(),
        })
        .collect()
}

/// The control plane's addresses to try: those a server named (leader first), then those
/// the agent was started with that it did not name (a replica that cannot know its peers
/// still leaves them on the list).
fn known_servers(told: &[String], configured: &[String]) -> Vec<String> {
    let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
    let mut known: Vec<String> = Vec::new();
    for server in told.iter().chain(configured) {
        if !known.iter().any(|k| same(k, server)) {
            known.push(server.clone());
        }
    }
    known
}

/// Registers, then heartbeats every `heartbeat_every` until `stopped` turns true: a 404
/// registers again; an unreachable server passes to the next in the list; a reply's
/// `servers` go first in the list (the agent's own stay after them) and its `destroy` ids
/// are destroyed here.
async fn report(
    host: Arc<dyn Host>,
    membership: Membership,
    incarnation: String,
    mut stopped: watch::Receiver<bool>,
) {
    let http = match reqwest::Client::builder()
        .connect_timeout(crate::remote::CONNECT_TIMEOUT)
        .timeout(SERVER_TIMEOUT)
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            tracing::error!(error = %error_chain(&err), "cannot make an HTTP client; not reporting to the control plane");
            return;
        }
    };
    let mut servers = membership.servers.clone();
    let mut current = 0;
    let mut registered = false;
    let mut reachable = true;
    // Unreachable addresses in a row, to try each once before waiting a beat.
    let mut failures = 0;
    let mut ticker = tokio::time::interval(membership.heartbeat_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => return,
        }
        let (facts, vms) = match (host.facts().await, host.inventory().await) {
            (Ok(facts), Ok(vms)) => (facts_view(&facts), vms_view(&vms)),
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %error_chain(&err), "cannot read the host's facts");
                continue;
            }
        };
        let url = servers[current % servers.len()].clone();
        let client = match Client::with_http(&url, http.clone()) {
            Ok(client) => client.with_token(&membership.token),
            Err(err) => {
                tracing::warn!(server = %url, error = %err, "skipping a bad server URL");
                current = (current + 1) % servers.len();
                continue;
            }
        };
        let reply = if registered {
            client
                .heartbeat(
                    &membership.name,
                    &Heartbeat {
                        incarnation: incarnation.clone(),
                        facts,
                        vms,
                    },
                )
                .await
        } else {
            client
                .register_host(&HostRegistration {
                    name: membership.name.clone(),
                    address: membership.address.clone(),
                    incarnation: incarnation.clone(),
                    labels: membership.labels.clone(),
                    cost: membership.cost,
                    priority: membership.priority,
                    facts,
                    vms,
                })
                .await
        };
        failures = match &reply {
            Err(ClientError::Unreachable { .. }) => failures,
            _ => 0,
        };
        match reply {
            Ok(reply) => {
                if !registered {
                    tracing::info!(server = %url, "registered with the control plane");
                } else if !reachable {
                    tracing::info!(server = %url, "reporting to the control plane again");
                }
                registered = true;
                reachable = true;
                let known = known_servers(&reply.servers, &membership.servers);
                if known != servers {
                    tracing::info!(servers = ?known, "control plane addresses");
                    current = known.iter().position(|server| *server == url).unwrap_or(0);
                    servers = known;
                }
                fence(host.as_ref(), &reply).await;
            }
            Err(err) if err.status() == Some(reqwest::StatusCode::NOT_FOUND) && registered => {
                tracing::info!(server = %url, "the control plane does not know this host; registering again");
                registered = false;
                ticker.reset_immediately();
            }
            Err(err @ ClientError::Unreachable { .. }) => {
                // Each address once, at once; then the next round a beat later.
                failures += 1;
                if reachable {
                    tracing::warn!(server = %url, error = %error_chain(&err), "control plane unreachable; trying the next address");
                } else {
                    tracing::debug!(server = %url, error = %error_chain(&err), "control plane unreachable");
                }
                if failures >= servers.len() {
                    if reachable {
                        tracing::warn!(servers = ?servers, "no control plane address answers; trying again every beat");
                    }
                    reachable = false;
                    failures = 0;
                } else {
                    ticker.reset_immediately();
                }
                current = (current + 1) % servers.len();
            }
            Err(err) => {
                tracing::warn!(server = %url, error = %error_chain(&err), "the control plane refused the report");
            }
        }
    }
}

/// Destroys the VMs the control plane replaced while it could not reach this host.
async fn fence(host: &dyn Host, reply: &HeartbeatReply) {
    for id in &reply.destroy {
        match host.destroy(id).await {
            Ok(()) => tracing::info!(vm = %id, "destroyed a VM the control plane replaced"),
            Err(err) => {
                tracing::warn!(vm = %id, error = %error_chain(&err), "cannot destroy a replaced VM")
            }
        }
    }
}

/// Checks that QEMU is installed and says what to install when it is not; its version.
fn check_qemu(config: &QemuConfig) -> Result<String, AgentError> {
    for (program, package) in [
        (&config.qemu, "qemu-system-x86"),
        (&config.qemu_img, "qemu-utils"),
    ] {
        match std::process::Command::new(program)
            .arg("--version")
            .output()
        {
            Ok(output) if output.status.success() => {}
            _ => {
                return Err(AgentError::Qemu(format!(
                    "{} is not installed or does not run; install it with `apt-get install -y {package}`",
                    program.display()
                )));
            }
        }
    }
    let output = std::process::Command::new(&config.qemu)
        .arg("--version")
        .output()
        .map_err(|err| AgentError::Qemu(err.to_string()))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_a_reply_names_come_first_and_the_configured_ones_stay() {
        let configured = vec!["http://a:1".to_owned(), "http://b:2".to_owned()];
        assert_eq!(
            known_servers(&["http://b:2/".to_owned()], &configured),
            ["http://b:2/", "http://a:1"]
        );
        assert_eq!(known_servers(&[], &configured), configured);
        assert_eq!(
            known_servers(&["http://c:3".to_owned()], &configured),
            ["http://c:3", "http://a:1", "http://b:2"]
        );
    }
}
