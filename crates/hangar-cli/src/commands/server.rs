//! `hangar server` (the control plane and the local host) and the hidden
//! `hangar forwarder` it starts to hold the stable VM endpoints.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use hangar_vmm::Accel;

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Where state lives: database, VM disks, cached images [default: $XDG_DATA_HOME/hangar].
    #[arg(long, env = "HANGAR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the REST API: a loopback address, unless --insecure-listen.
    #[arg(long, default_value = "127.0.0.1:7070", env = "HANGAR_LISTEN")]
    listen: SocketAddr,
    /// Allow a --listen address other machines can reach. hangar speaks plain HTTP: tokens
    /// cross the network in clear (use a private network or a TLS proxy in front).
    #[arg(long, env = "HANGAR_INSECURE_LISTEN")]
    insecure_listen: bool,
    /// Service catalog (TOML) [default: the built-in demo catalog].
    #[arg(long, env = "HANGAR_CATALOG")]
    catalog: Option<PathBuf>,
    /// Accelerator: auto picks KVM only on bare metal (nested KVM is slower than TCG).
    #[arg(long, default_value = "auto", env = "HANGAR_ACCEL")]
    accel: Accel,
    /// Private segments' switching: bridge (a tap per VM on a kernel bridge per segment,
    /// in a network namespace of the data dir's; needs root), switch (hangar's own switch,
    /// any user), or auto (bridge when running as root).
    #[arg(long, default_value = "auto", env = "HANGAR_SEGMENT_NET")]
    segment_net: hangar_vmm::tap::SegmentNet,
    /// The TSC frequency guests are told, in kHz [default: this machine's, measured at
    /// start]. Pin one value on a farm of identical hosts to keep templates' keys equal
    /// whatever each host measures.
    #[arg(long, value_name = "KHZ", env = "HANGAR_GUEST_TSC_KHZ",
          value_parser = clap::value_parser!(u64).range(100_000..20_000_000))]
    guest_tsc_khz: Option<u64>,
    /// Host address that VM endpoints listen on and are advertised at: an address clients
    /// connect to, not a wildcard (0.0.0.0, ::).
    #[arg(long, default_value = "127.0.0.1", env = "HANGAR_ENDPOINT_HOST")]
    endpoint_host: IpAddr,
    /// Guest kernel: a Debian linux-image .deb or an extracted one [default: fetched with apt-get download].
    #[arg(long, env = "HANGAR_KERNEL")]
    kernel: Option<PathBuf>,
    /// A statically linked busybox [default: /bin/busybox].
    #[arg(long, env = "HANGAR_BUSYBOX")]
    busybox: Option<PathBuf>,
    /// Most memory (MiB) all warm pools may hold together (ready and booting VMs).
    #[arg(long, default_value_t = 1024, env = "HANGAR_POOL_MEMORY")]
    pool_memory: u64,
    /// DNS domain: answers carry the name `<vm>.<domain>`.
    #[arg(long, env = "HANGAR_DNS_DOMAIN")]
    dns_domain: Option<String>,
    /// Answer DNS for --dns-domain on ADDR (UDP and TCP; off by default): `<vm>.<domain>`
    /// and `<service>.<domain>` (shared services) resolve to their stable endpoints'
    /// addresses, `_<port>._tcp.<name>` SRV records give the port. E.g. `dig @127.0.0.1
    /// -p 5353 vm-….<domain>`.
    #[arg(
        long,
        value_name = "ADDR",
        requires = "dns_domain",
        env = "HANGAR_DNS_LISTEN"
    )]
    dns_listen: Option<std::net::SocketAddr>,
    /// Most guest memory (MiB) active and sleeping VMs may hold; over it, the least
    /// recently used are archived [default: unlimited].
    #[arg(long, value_name = "MIB", env = "HANGAR_MEMORY_BUDGET")]
    memory_budget: Option<u64>,
    /// Most disk (MiB) VM archives may take; over it, the least recently used archived VMs
    /// are deleted [default: unlimited].
    #[arg(long, value_name = "MIB", env = "HANGAR_DISK_BUDGET")]
    disk_budget: Option<u64>,
    /// Boot every VM instead of cloning it from its service's template (a VM booted to
    /// its ready state once and snapshotted).
    #[arg(long, env = "HANGAR_NO_TEMPLATES")]
    no_templates: bool,
    /// Debian mirror that OS layers (debootstrap) and packages come from.
    #[arg(long, default_value = hangar_server::images::DEFAULT_MIRROR, env = "HANGAR_DEBIAN_MIRROR")]
    debian_mirror: String,
    /// Most disk (MiB) cached image layers may take; beyond it the least recently used
    /// layers no VM uses are evicted.
    #[arg(long, default_value_t = 20480, env = "HANGAR_IMAGE_BUDGET")]
    image_budget: u64,
    /// Where the server keeps its state: a PostgreSQL URL (`postgres://user@host/db`) or
    /// a SQLite file [default: hangar.db in the data directory].
    #[arg(long, value_name = "URL|PATH", env = "HANGAR_STORE")]
    store: Option<String>,
    /// The secret farm hosts prove themselves with; made on first start (mode 0600) when
    /// missing. Give it to `hangar agent --token-file` [default: farm.token in the data
    /// directory].
    #[arg(long, value_name = "PATH", env = "HANGAR_FARM_TOKEN_FILE")]
    farm_token_file: Option<PathBuf>,
    /// The secret a Prometheus scraper reads `GET /metrics` with (its scrape config's
    /// `authorization: credentials_file`); it opens nothing else. Made on first start
    /// (mode 0600) when missing [default: metrics.token in the data directory].
    #[arg(long, value_name = "PATH", env = "HANGAR_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// The key secret settings (such as passwords) are sealed with in the store; made on
    /// first start (mode 0600) when missing. Replicas sharing a store need the same one
    /// [default: secrets.key in the data directory].
    #[arg(long, value_name = "PATH", env = "HANGAR_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Run no VMs on this machine: a control plane for farm hosts (`hangar agent`) only.
    #[arg(long, env = "HANGAR_NO_LOCAL_HOST")]
    no_local_host: bool,
    /// Farm hosts without a heartbeat for this long are `down` (nothing new goes there).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, env = "HANGAR_HOST_DOWN_AFTER")]
    host_down_after: std::time::Duration,
    /// Farm hosts without a heartbeat for this long are `lost`: their VMs are marked lost,
    /// shared services in use are made again elsewhere, and the host destroys the replaced
    /// VMs when it comes back.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration, env = "HANGAR_HOST_LOST_AFTER")]
    host_lost_after: std::time::Duration,
    /// Move running and sleeping VMs between farm hosts so that their loads even out (off
    /// by default): every --rebalance-interval the leader moves up to
    /// --rebalance-max-moves VMs, each from a host over the farm's overall use to one
    /// that stays at or under it, and only when the spread of the hosts' loads falls by
    /// more than --rebalance-margin; a VM that moved (or failed to) stays for
    /// --rebalance-cooldown.
    #[arg(long, env = "HANGAR_REBALANCE")]
    rebalance: bool,
    /// How long between two rebalancing rounds (a round's moves end first).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration, env = "HANGAR_REBALANCE_INTERVAL")]
    rebalance_interval: std::time::Duration,
    /// Most VMs moved in one rebalancing round.
    #[arg(long, value_name = "N", default_value_t = hangar_server::rebalance::DEFAULT_MAX_MOVES, env = "HANGAR_REBALANCE_MAX_MOVES")]
    rebalance_max_moves: usize,
    /// Least fall of the spread (standard deviation of the up hosts' loads) a move must
    /// bring, in thousandths: smaller gains are not worth a migration.
    #[arg(long, value_name = "PERMILLE", default_value_t = hangar_server::rebalance::DEFAULT_MARGIN_PERMILLE, value_parser = clap::value_parser!(u32).range(0..=1000), env = "HANGAR_REBALANCE_MARGIN")]
    rebalance_margin: u32,
    /// How long a VM that was moved, or failed to move, stays where it is.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration, env = "HANGAR_REBALANCE_COOLDOWN")]
    rebalance_cooldown: std::time::Duration,
    /// Answer with the VMs' own port forwards on their hosts instead of stable endpoints
    /// held on this machine (needed when several servers share one store).
    #[arg(long, env = "HANGAR_DIRECT_ENDPOINTS")]
    direct_endpoints: bool,
    /// Shortest `sleep_after` a policy set at run time may have.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration, env = "HANGAR_POLICY_MIN_SLEEP_AFTER")]
    policy_min_sleep_after: std::time::Duration,
    /// Shortest `archive_after` a policy set at run time may have.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration, env = "HANGAR_POLICY_MIN_ARCHIVE_AFTER")]
    policy_min_archive_after: std::time::Duration,
    /// Shortest `delete_after` a policy set at run time may have: no policy change deletes
    /// a service's VMs and their data sooner.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration, env = "HANGAR_POLICY_MIN_DELETE_AFTER")]
    policy_min_delete_after: std::time::Duration,
    /// The quota of every user without one of their own: `vms=N,vcpus=N,memory=MIB,
    /// archive=MIB` (keys left out: no limit), or `none` (no limits, the default).
    #[arg(long, value_name = "LIMITS", default_value = "none", value_parser = hangar_server::Limits::parse, env = "HANGAR_DEFAULT_QUOTA")]
    default_quota: hangar_server::Limits,
    /// Price of a vCPU-hour of an active VM (usage's cost column; any currency).
    #[arg(
        long,
        value_name = "PRICE",
        default_value_t = 0.0,
        value_parser = parse_price,
        env = "HANGAR_PRICE_ACTIVE_VCPU_HOUR"
    )]
    price_active_vcpu_hour: f64,
    /// Price of a GiB-hour of an active VM's memory.
    #[arg(
        long,
        value_name = "PRICE",
        default_value_t = 0.0,
        value_parser = parse_price,
        env = "HANGAR_PRICE_ACTIVE_GIB_HOUR"
    )]
    price_active_gib_hour: f64,
    /// Price of a GiB-hour of a sleeping VM's memory (held on its host).
    #[arg(
        long,
        value_name = "PRICE",
        default_value_t = 0.0,
        value_parser = parse_price,
        env = "HANGAR_PRICE_SLEEPING_GIB_HOUR"
    )]
    price_sleeping_gib_hour: f64,
    /// Price of a GB-hour of archive.
    #[arg(
        long,
        value_name = "PRICE",
        default_value_t = 0.0,
        value_parser = parse_price,
        env = "HANGAR_PRICE_ARCHIVE_GB_HOUR"
    )]
    price_archive_gb_hour: f64,
    /// Alert rules (TOML): thresholds, `for` and `hold` times, and a webhook to POST
    /// firing and resolved alerts to (see `hangar alerts --help`) [default: every rule
    /// with its defaults; alerts go to the log and `hangar alerts`].
    #[arg(long, value_name = "FILE", env = "HANGAR_ALERTS")]
    alerts: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ForwarderArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// The server's URL, where wake requests go.
    #[arg(long)]
    server: String,
}

/// A price: a finite number, 0 or more.
fn parse_price(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(price) if price.is_finite() && price >= 0.0 => Ok(price),
        _ => Err(format!("{text:?} is not a price (a number, 0 or more)")),
    }
}

pub use hangar_image::hostfs::default_data_dir;

/// Runs the server until SIGINT or SIGTERM; fails when it cannot start.
pub async fn run(args: ServerArgs) -> ExitCode {
    // Every file the server and its children (QEMU, the forwarder) write is private.
    hangar_image::hostfs::restrict_umask();
    init_logging();
    let forwarder_command = match std::env::current_exe() {
        Ok(exe) => vec![exe.into_os_string(), "forwarder".into()],
        Err(err) => {
            eprintln!("hangar server: cannot find its own executable: {err}");
            return ExitCode::FAILURE;
        }
    };
    let config = hangar_server::ServerConfig {
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        listen: args.listen,
        insecure_listen: args.insecure_listen,
        catalog: args.catalog,
        accel: args.accel,
        segment_net: args.segment_net,
        guest_tsc_khz: args.guest_tsc_khz,
        endpoint_host: args.endpoint_host,
        kernel: args.kernel,
        busybox: args.busybox,
        pool_memory_mib: args.pool_memory,
        dns_domain: args.dns_domain,
        dns_listen: args.dns_listen,
        memory_budget_mib: args.memory_budget,
        disk_budget_mib: args.disk_budget,
        templates: !args.no_templates,
        forwarder_command: Some(forwarder_command),
        debian_mirror: args.debian_mirror,
        image_budget_mib: args.image_budget,
        store: args.store,
        farm_token_file: args.farm_token_file,
        metrics_token_file: args.metrics_token_file,
        secrets_key_file: args.secrets_key_file,
        local_host: !args.no_local_host,
        host_loss: hangar_server::farm::LossTimes {
            down_after: args.host_down_after,
            lost_after: args.host_lost_after.max(args.host_down_after),
        },
        stable_endpoints: !args.direct_endpoints,
        rebalance: args
            .rebalance
            .then_some(hangar_server::rebalance::RebalanceConfig {
                interval: args.rebalance_interval,
                max_moves: args.rebalance_max_moves,
                margin_permille: args.rebalance_margin,
                cooldown: args.rebalance_cooldown,
            }),
        policy_floors: hangar_server::PolicyFloors {
            sleep_after: args.policy_min_sleep_after,
            archive_after: args.policy_min_archive_after,
            delete_after: args.policy_min_delete_after,
        },
        default_quota: args.default_quota,
        prices: hangar_server::Prices {
            active_vcpu_hour: args.price_active_vcpu_hour,
            active_gib_hour: args.price_active_gib_hour,
            sleeping_gib_hour: args.price_sleeping_gib_hour,
            archive_gb_hour: args.price_archive_gb_hour,
        },
        alerts: args.alerts,
    };
    match hangar_server::run(config, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("server stopped; VMs keep running and are adopted at the next start");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("hangar server: {}", hangar_server::error::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// Runs a data dir's forwarder until it is told to stop.
pub async fn forwarder(args: ForwarderArgs) -> ExitCode {
    init_logging();
    match hangar_forward::run(&args.data_dir, &args.server).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "hangar forwarder: {}",
                hangar_server::error::error_chain(&err)
            );
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANGAR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
