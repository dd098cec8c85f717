//! `hangar`: the server (`hangar server`) and every client command of its REST API.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hangar_vmm::Accel;

mod bench;
mod bench_endpoints;
mod bench_lifecycle;
mod client;
mod table;

use client::{Client, ClientError};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (server error, bad reply)
  2  usage error, or the server refused the request as malformed
  3  not found (no such service, VM or task)
  4  never: the request can never be satisfied (see the alternatives printed)
  5  try again shortly: not ready within the deadline, the work goes on
  6  cannot reach the server (is `hangar server` running? see HANGAR_URL)";

#[derive(Parser)]
#[command(
    name = "hangar",
    version,
    about = "Virtual machines as services: ask for a service, get the address of a real QEMU VM offering it",
    after_help = EXIT_CODES
)]
struct Cli {
    /// The server's URL, for client commands.
    #[arg(
        long,
        env = "HANGAR_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane and the local host (QEMU runs here).
    Server(ServerArgs),
    /// Hold a data dir's stable VM endpoints (started by `hangar server`, outlives it).
    #[command(hide = true)]
    Forwarder {
        #[arg(long)]
        data_dir: PathBuf,
        /// The server's URL, where wake requests go.
        #[arg(long)]
        server: String,
    },
    /// List the services that can be requested.
    Services {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Request a service, or a machine configuration; prints the address of a VM offering it.
    #[command(
        after_help = "Examples:\n  curl http://$(hangar request http-static)/\n  \
        hangar request --vcpus 1 --memory 128 --os busybox --app http-static --exact-size"
    )]
    Request {
        /// Service name (see `hangar services`); or give a configuration with --vcpus etc.
        #[arg(required_unless_present = "memory")]
        service: Option<String>,
        /// Configuration: at least this many vCPUs.
        #[arg(long, requires = "memory", conflicts_with = "service")]
        vcpus: Option<u32>,
        /// Configuration: memory in MiB, `N` or a range `MIN-MAX`.
        #[arg(long, value_parser = parse_memory, conflicts_with = "service")]
        memory: Option<(u32, u32)>,
        /// Configuration: OS as `NAME` or `NAME@MIN_VERSION`.
        #[arg(long, requires = "memory", default_value = "busybox")]
        os: String,
        /// Configuration: an application the VM must offer (repeatable).
        #[arg(long = "app", requires = "memory")]
        apps: Vec<String>,
        /// Slice a larger VM down to the requested memory and vCPUs.
        #[arg(long)]
        exact_size: bool,
        /// Environment setting KEY=VALUE (repeatable), e.g. --env os=busybox.
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// A VM of your own, never shared with other requests.
        #[arg(long)]
        dedicated: bool,
        /// How long to wait for a VM (e.g. 30s, 2m); past it the answer is "try again shortly".
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The state table: every VM, its host, services, endpoints and state.
    Vms {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Include deleted VMs.
        #[arg(long)]
        all: bool,
    },
    /// Warm pools: paused VMs ready to hand out, per service or configuration.
    Pools {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Service templates: VMs snapshotted at their ready state; new VMs are clones of them.
    Templates {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a pool at run time.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Lifecycle policies of every service (idle timers, keep-active rate, archive tier)
    /// and the memory and disk budgets with what they hold.
    Policies {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a service's lifecycle policy at run time.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Benchmarks: hangar's performance table side by side with libvirt (`hangar bench
    /// --quick`), or `hangar bench pool`. They start their own server in a temporary data dir.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        command: Option<BenchCommand>,
        #[command(flatten)]
        args: bench::FullBench,
    },
    /// Pause an active VM in memory.
    Sleep { vm: String },
    /// Write a VM's memory to disk (compressed) and end its process.
    Archive {
        vm: String,
        /// `zstd` (smaller), `raw` (faster), or `delta` (only the pages that differ from the
        /// template the VM was cloned from: smallest; other VMs get `zstd`).
        #[arg(long, default_value = "zstd", value_parser = ["raw", "zstd", "delta"])]
        tier: String,
    },
    /// Bring a sleeping or archived VM back.
    Wake { vm: String },
    /// Delete VMs: their processes, disks, sockets and logs.
    Rm {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Recent tasks (VM creation and other long operations).
    Tasks {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build the image of a service (its layers), showing progress.
    #[command(after_help = "Example:\n  hangar build redis --env os=debian-12")]
    Build {
        service: String,
        /// Environment: os=NAME.
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Start the build and print its task id without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Images of every viable service and environment, and the layers they share: sizes,
    /// users, last use.
    Images {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Write a self-contained image of a service (tar: kernel, initramfs, flattened disk,
    /// hangar-export.json, run.sh) that boots with plain qemu-system-x86_64.
    #[command(
        after_help = "Example:\n  hangar export nginx nginx.tar && tar -xf nginx.tar && ./run.sh"
    )]
    Export {
        service: String,
        file: PathBuf,
        /// Environment (os=NAME) and the service's settings, baked into the export.
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
    /// One task, with its stage, progress and error.
    Task {
        id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Request → endpoint answering: warm-pool hits against cold boots (p50, p99, ratio).
    Pool(bench::PoolBench),
    /// Stable endpoints against direct connections: latency, throughput, wake on connection.
    Endpoints(bench_endpoints::EndpointsBench),
    /// Wake from sleeping and from each archive tier, restore from template, cold boot.
    Lifecycle(bench_lifecycle::LifecycleBench),
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Set how many paused VMs a pool keeps (kept across restarts).
    Set {
        /// Pool name: a service (any service; one without a pool in the catalog gets one), or a
        /// configuration pool (see `hangar pools`).
        name: String,
        #[arg(long)]
        min: Option<u32>,
        #[arg(long)]
        max: Option<u32>,
        /// Ready criterion for the pool's new VMs, as JSON in the catalog's form, e.g.
        /// '{"checks":[{"exec":{"argv":["test","-f","/run/ready"]}}]}'.
        #[arg(long, value_name = "JSON", conflicts_with = "default_ready")]
        ready: Option<String>,
        /// Go back to the service's ready criterion from the catalog.
        #[arg(long)]
        default_ready: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Set a service's idle timers, keep-active rate or archive tier (kept across restarts);
    /// options left out stay as they are.
    #[command(
        after_help = "Durations: 500ms, 3s, 10m, 1h, 2d; `off` unsets (never).\n\
        Example: hangar policy set http-counter --sleep-after 10m --archive-after 1h --delete-after 7d"
    )]
    Set {
        /// Service name (see `hangar services`).
        service: String,
        /// Idle time of an active VM before it sleeps (paused in memory).
        #[arg(long, value_name = "D|off", value_parser = parse_timer)]
        sleep_after: Option<Timer>,
        /// Time asleep before a VM is archived (without --sleep-after: idle time before an
        /// active VM is archived).
        #[arg(long, value_name = "D|off", value_parser = parse_timer)]
        archive_after: Option<Timer>,
        /// Time archived before a VM is deleted with its archive.
        #[arg(long, value_name = "D|off", value_parser = parse_timer)]
        delete_after: Option<Timer>,
        /// Requests per minute above which the service's VMs stay active even when idle.
        #[arg(long, value_name = "PER_MIN|off", value_parser = parse_rate)]
        keep_active_above: Option<Rate>,
        /// How archives are written: raw (fastest wake), zstd (smaller), delta (pages that
        /// differ from the service template; zstd for VMs not cloned from one).
        #[arg(long, value_parser = ["raw", "zstd", "delta"])]
        archive_tier: Option<String>,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Go back to the catalog's policy for a service.
    Reset { service: String },
}

/// A timer given on the command line: a duration, or `off`.
#[derive(Clone)]
struct Timer(Option<String>);

fn parse_timer(text: &str) -> Result<Timer, String> {
    if matches!(text, "off" | "never") {
        return Ok(Timer(None));
    }
    humantime::parse_duration(text)
        .map(|_| Timer(Some(text.to_owned())))
        .map_err(|err| format!("{text:?} is not a duration like 500ms, 3s, 10m, 1h ({err})"))
}

/// A rate given on the command line: requests per minute, or `off`.
#[derive(Clone)]
struct Rate(Option<f64>);

fn parse_rate(text: &str) -> Result<Rate, String> {
    if matches!(text, "off" | "never") {
        return Ok(Rate(None));
    }
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(Rate(Some(rate))),
        _ => Err(format!("{text:?} is not a number of requests per minute")),
    }
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Where state lives: database, VM disks, cached images [default: $XDG_DATA_HOME/hangar].
    #[arg(long, env = "HANGAR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:7070", env = "HANGAR_LISTEN")]
    listen: SocketAddr,
    /// Service catalog (TOML) [default: the built-in demo catalog].
    #[arg(long, env = "HANGAR_CATALOG")]
    catalog: Option<PathBuf>,
    /// Accelerator: auto picks KVM only on bare metal (nested KVM is slower than TCG).
    #[arg(long, default_value = "auto", env = "HANGAR_ACCEL")]
    accel: Accel,
    /// Host address that VM endpoints listen on.
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
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

fn parse_memory(text: &str) -> Result<(u32, u32), String> {
    let parse = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("expected MiB as N or MIN-MAX, got {text:?}"))
    };
    match text.split_once('-') {
        Some((min, max)) => Ok((parse(min)?, parse(max)?)),
        None => parse(text).map(|n| (n, n)),
    }
}

pub(crate) fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hangar")
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => return server(args).await,
        Command::Forwarder { data_dir, server } => return forwarder(data_dir, server).await,
        command => client_command(Client::new(&cli.url), command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hangar: {err}");
            for alternative in err.alternatives() {
                eprintln!("  try: hangar request {alternative}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANGAR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn forwarder(data_dir: PathBuf, server_url: String) -> ExitCode {
    init_logging();
    match hangar_forward::run(&data_dir, &server_url).await {
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

async fn server(args: ServerArgs) -> ExitCode {
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
        catalog: args.catalog,
        accel: args.accel,
        endpoint_host: args.endpoint_host,
        kernel: args.kernel,
        busybox: args.busybox,
        pool_memory_mib: args.pool_memory,
        dns_domain: args.dns_domain,
        memory_budget_mib: args.memory_budget,
        disk_budget_mib: args.disk_budget,
        templates: !args.no_templates,
        forwarder_command: Some(forwarder_command),
        debian_mirror: args.debian_mirror,
        image_budget_mib: args.image_budget,
        store: args.store,
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

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn client_command(client: Client, command: Command) -> Result<(), ClientError> {
    match command {
        Command::Server(_) | Command::Forwarder { .. } => unreachable!("handled in main"),
        Command::Services { json } => {
            let services: serde_json::Value = client.get("/v1/services").await?;
            if json {
                return print_json(&services);
            }
            let rows = services.as_array().into_iter().flatten().map(|s| {
                let ports = s["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", p["name"].as_str().unwrap_or(""), p["guest"]))
                    .collect::<Vec<_>>()
                    .join(",");
                let environments = s["environments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect::<Vec<_>>()
                    .join(" ");
                let settings = s["settings"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(key, setting)| {
                        if setting["required"].as_bool().unwrap_or(false) {
                            format!("{key}!")
                        } else {
                            key.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                vec![
                    text(&s["name"]),
                    environments,
                    s["vcpus"].to_string(),
                    format!("{} MiB", s["memory_mib"]),
                    ports,
                    settings,
                    text(&s["description"]),
                ]
            });
            table::print(
                &[
                    "SERVICE",
                    "ENVIRONMENTS",
                    "VCPUS",
                    "MEMORY",
                    "PORTS",
                    "SETTINGS",
                    "DESCRIPTION",
                ],
                rows,
            );
            eprintln!(
                "(first environment is the default; SETTINGS ending in ! are required: --env KEY=VALUE)"
            );
            Ok(())
        }
        Command::Request {
            service,
            vcpus,
            memory,
            os,
            apps,
            exact_size,
            env,
            dedicated,
            deadline,
            json,
        } => {
            let config = memory.map(|(min, max)| {
                let (name, min_version) = match os.split_once('@') {
                    Some((name, version)) => (name.to_owned(), Some(version.to_owned())),
                    None => (os.clone(), None),
                };
                serde_json::json!({
                    "vcpus": vcpus.unwrap_or(1),
                    "memory_mib": { "min": min, "max": max },
                    "os": { "name": name, "min_version": min_version },
                    "apps": apps,
                })
            });
            let body = serde_json::json!({
                "service": service,
                "config": config,
                "exact_size": exact_size,
                "env": env.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "mode": if dedicated { "dedicated" } else { "shared" },
                "deadline_ms": deadline.map(|d| d.as_millis() as u64),
            });
            if !json && std::io::stderr().is_terminal() {
                eprintln!(
                    "waiting for a VM offering {}...",
                    service.as_deref().unwrap_or("that configuration")
                );
            }
            let grant: serde_json::Value = client.post("/v1/requests", &body).await?;
            if json {
                return print_json(&grant);
            }
            let endpoint = text(&grant["endpoint"]);
            println!(
                "{}",
                if endpoint.is_empty() {
                    text(&grant["vm"])
                } else {
                    endpoint
                }
            );
            let endpoints = grant["endpoints"].as_object().cloned().unwrap_or_default();
            if endpoints.len() > 1 {
                for (name, addr) in &endpoints {
                    eprintln!("endpoint {name}: {}", text(addr));
                }
            }
            if std::io::stderr().is_terminal() {
                let how = match grant["match"].as_str().unwrap_or_default() {
                    "shared" => "shared, already running".to_owned(),
                    "created" => format!("new, booted in {} ms", grant["boot_ms"]),
                    "woken" => "shared, woken from sleep or archive".to_owned(),
                    kind => format!("{kind} match from a warm pool"),
                };
                eprintln!("vm {} ({how})", text(&grant["vm"]));
            }
            Ok(())
        }
        Command::Vms { json, all } => {
            let vms: serde_json::Value = client
                .get(if all { "/v1/vms?all=true" } else { "/v1/vms" })
                .await?;
            if json {
                return print_json(&vms);
            }
            let rows = vms.as_array().into_iter().flatten().map(|vm| {
                let services = vm["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect::<Vec<_>>()
                    .join(",");
                let endpoints = vm["endpoints"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, addr)| format!("{name}={}", text(addr)))
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut state = text(&vm["state"]);
                if let Some(pool) = vm["pool"].as_str() {
                    state = format!("{state} (pool {pool})");
                }
                if let Some(tier) = vm["archive"]["tier"].as_str() {
                    let mb = vm["archive"]["size_bytes"].as_f64().unwrap_or(0.0) / 1e6;
                    state = format!("{state} ({tier}, {mb:.1} MB)");
                }
                if let Some(error) = vm["error"].as_str() {
                    state = format!("{state}: {error}");
                }
                vec![
                    text(&vm["id"]),
                    text(&vm["host"]),
                    services,
                    endpoints,
                    format!("{}/{}", vm["vcpus"], vm["memory_mib"]),
                    text(&vm["mode"]),
                    ago(vm["idle_ms"].as_u64()),
                    state,
                ]
            });
            table::print(
                &[
                    "VM",
                    "HOST",
                    "SERVICES",
                    "ENDPOINTS",
                    "CPU/MIB",
                    "MODE",
                    "LAST USED",
                    "STATE",
                ],
                rows,
            );
            Ok(())
        }
        Command::Templates { json } => {
            let templates: serde_json::Value = client.get("/v1/templates").await?;
            if json {
                return print_json(&templates);
            }
            let rows = templates.as_array().into_iter().flatten().map(|t| {
                vec![
                    text(&t["service"]),
                    text(&t["key"]),
                    format!("{}x{} MiB", t["vcpus"], t["memory_mib"]),
                    format!("{:.1} MB", t["size_bytes"].as_f64().unwrap_or(0.0) / 1e6),
                    format!("{} ms", t["took_ms"]),
                    if t["current"].as_bool() == Some(true) {
                        "yes".into()
                    } else {
                        "no (outdated)".into()
                    },
                    text(&t["created_at"]),
                ]
            });
            table::print(
                &[
                    "SERVICE", "KEY", "SHAPE", "SIZE", "SNAPSHOT", "CURRENT", "CREATED",
                ],
                rows,
            );
            Ok(())
        }
        Command::Pools { json } => {
            let pools: serde_json::Value = client.get("/v1/pools").await?;
            if json {
                return print_json(&pools);
            }
            let rows = pools.as_array().into_iter().flatten().map(|p| {
                vec![
                    text(&p["name"]),
                    if p["service"].is_null() {
                        "(pre-OS shell)".into()
                    } else {
                        text(&p["service"])
                    },
                    format!("{}x{} MiB", p["vcpus"], p["vm_memory_mib"]),
                    format!("{}-{}", p["min"], p["max"]),
                    text(&p["target"]),
                    text(&p["ready"]),
                    text(&p["booting"]),
                    format!("{} MiB", p["memory_mib"]),
                    format!("{:.1}", p["rate_per_min"].as_f64().unwrap_or(0.0)),
                ]
            });
            table::print(
                &[
                    "POOL", "SERVICE", "SHAPE", "MIN-MAX", "TARGET", "READY", "BOOTING", "MEMORY",
                    "REQ/MIN",
                ],
                rows,
            );
            Ok(())
        }
        Command::Pool {
            command:
                PoolCommand::Set {
                    name,
                    min,
                    max,
                    ready,
                    default_ready,
                    json,
                },
        } => {
            let mut body = serde_json::json!({ "min": min, "max": max });
            if let Some(ready) = ready {
                body["ready"] = serde_json::from_str(&ready).map_err(|err| {
                    ClientError::Usage(format!("--ready is not valid JSON: {err}"))
                })?;
            } else if default_ready {
                body["ready"] = serde_json::Value::Null;
            }
            let pool: serde_json::Value = client.put(&format!("/v1/pools/{name}"), &body).await?;
            if json {
                return print_json(&pool);
            }
            println!(
                "pool {name}: min {} max {} target {}",
                pool["min"], pool["max"], pool["target"]
            );
            Ok(())
        }
        Command::Policies { json } => {
            let policies: serde_json::Value = client.get("/v1/policies").await?;
            if json {
                return print_json(&policies);
            }
            let timer = |p: &serde_json::Value, name: &str| match p[name].as_str() {
                Some(value) => value.to_owned(),
                None => "-".into(),
            };
            let rows = policies["services"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|view| {
                    let p = &view["policy"];
                    let keep = match p["keep_active_above"].as_f64() {
                        Some(rate) => format!(">{rate}/min"),
                        None => "-".into(),
                    };
                    let mut tier = text(&p["archive_tier"]);
                    if view["archive_tier_used"] != p["archive_tier"] {
                        tier = format!("{tier} (as {})", text(&view["archive_tier_used"]));
                    }
                    vec![
                        text(&view["service"]),
                        timer(p, "sleep_after"),
                        timer(p, "archive_after"),
                        timer(p, "delete_after"),
                        keep,
                        format!(
                            "{:.1}{}",
                            view["rate_per_min"].as_f64().unwrap_or(0.0),
                            if view["kept_active"] == true {
                                " (kept active)"
                            } else {
                                ""
                            }
                        ),
                        tier,
                        text(&view["source"]).replace('_', "-"),
                    ]
                });
            table::print(
                &[
                    "SERVICE",
                    "SLEEP AFTER",
                    "ARCHIVE AFTER",
                    "DELETE AFTER",
                    "KEEP ACTIVE",
                    "REQ/MIN",
                    "TIER",
                    "SET IN",
                ],
                rows,
            );
            for (what, key) in [("memory", "memory"), ("disk", "disk")] {
                let budget = &policies[key];
                let limit = match budget["budget_mib"].as_u64() {
                    Some(mib) => format!("{mib} MiB"),
                    None => "unlimited".into(),
                };
                println!(
                    "{what}: {:.1} MiB used of {limit}",
                    budget["used_mib"].as_f64().unwrap_or(0.0)
                );
            }
            for view in policies["services"].as_array().into_iter().flatten() {
                if let Some(note) = view["note"].as_str() {
                    println!("{}: {note}", text(&view["service"]));
                }
            }
            Ok(())
        }
        Command::Policy {
            command:
                PolicyCommand::Set {
                    service,
                    sleep_after,
                    archive_after,
                    delete_after,
                    keep_active_above,
                    archive_tier,
                    json,
                },
        } => {
            let mut body = serde_json::Map::new();
            for (name, timer) in [
                ("sleep_after", sleep_after),
                ("archive_after", archive_after),
                ("delete_after", delete_after),
            ] {
                if let Some(Timer(value)) = timer {
                    body.insert(name.into(), serde_json::json!(value));
                }
            }
            if let Some(Rate(value)) = keep_active_above {
                body.insert("keep_active_above".into(), serde_json::json!(value));
            }
            if let Some(tier) = archive_tier {
                body.insert("archive_tier".into(), serde_json::json!(tier));
            }
            let view: serde_json::Value = client
                .put(
                    &format!("/v1/policies/{service}"),
                    &serde_json::Value::Object(body),
                )
                .await?;
            if json {
                return print_json(&view);
            }
            print_policy(&view);
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Reset { service },
        } => {
            let view: serde_json::Value = client.delete(&format!("/v1/policies/{service}")).await?;
            print_policy(&view);
            Ok(())
        }
        Command::Bench {
            command: Some(BenchCommand::Pool(args)),
            ..
        } => bench::run_pool(args).await,
        Command::Bench {
            command: None,
            args,
        } => bench::run(args).await,
        Command::Bench {
            command: Some(BenchCommand::Endpoints(args)),
            ..
        } => bench_endpoints::run(args).await,
        Command::Bench {
            command: Some(BenchCommand::Lifecycle(args)),
            ..
        } => bench_lifecycle::run(args).await,
        Command::Sleep { vm } => {
            let vm: serde_json::Value = client
                .post(&format!("/v1/vms/{vm}/sleep"), &serde_json::json!({}))
                .await?;
            println!("{} {}", text(&vm["id"]), text(&vm["state"]));
            Ok(())
        }
        Command::Archive { vm, tier } => {
            let vm: serde_json::Value = client
                .post(
                    &format!("/v1/vms/{vm}/archive"),
                    &serde_json::json!({ "tier": tier }),
                )
                .await?;
            println!(
                "{} {} ({} archive, {:.1} MB)",
                text(&vm["id"]),
                text(&vm["state"]),
                text(&vm["archive"]["tier"]),
                vm["archive"]["size_bytes"].as_f64().unwrap_or(0.0) / 1e6
            );
            Ok(())
        }
        Command::Wake { vm } => {
            let vm: serde_json::Value = client
                .post(&format!("/v1/vms/{vm}/wake"), &serde_json::json!({}))
                .await?;
            println!("{} {}", text(&vm["id"]), text(&vm["state"]));
            Ok(())
        }
        Command::Rm { vms } => {
            for vm in vms {
                let _: serde_json::Value = client.delete(&format!("/v1/vms/{vm}")).await?;
                println!("{vm} deleted");
            }
            Ok(())
        }
        Command::Tasks { json } => {
            let tasks: serde_json::Value = client.get("/v1/tasks").await?;
            if json {
                return print_json(&tasks);
            }
            let rows = tasks.as_array().into_iter().flatten().map(task_row);
            table::print(
                &[
                    "TASK", "KIND", "SERVICE", "VM", "STATE", "STAGE", "%", "ERROR",
                ],
                rows,
            );
            Ok(())
        }
        Command::Build {
            service,
            env,
            no_wait,
        } => {
            let body = serde_json::json!({
                "service": service,
                "env": env.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            });
            let answer: serde_json::Value = client.post("/v1/images", &body).await?;
            let task = text(&answer["task"]);
            if no_wait {
                println!("{task}");
                return Ok(());
            }
            let started = std::time::Instant::now();
            let tty = std::io::stderr().is_terminal();
            let mut last = String::new();
            loop {
                let task: serde_json::Value = client.get(&format!("/v1/tasks/{task}")).await?;
                let percent = task["percent"].as_u64().unwrap_or(0);
                let stage = text(&task["stage"]);
                let line = progress_line(percent, &stage, started.elapsed());
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else if stage != last {
                    eprintln!("{line}");
                }
                last = stage;
                match task["state"].as_str() {
                    Some("succeeded") => {
                        if tty {
                            eprintln!();
                        }
                        println!(
                            "built {service} in {:.1} s",
                            started.elapsed().as_secs_f64()
                        );
                        return Ok(());
                    }
                    Some("failed") => {
                        if tty {
                            eprintln!();
                        }
                        return Err(ClientError::Reply(format!(
                            "build of {service} failed: {}",
                            text(&task["error"])
                        )));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        }
        Command::Images { json } => {
            let images: serde_json::Value = client.get("/v1/images").await?;
            if json {
                return print_json(&images);
            }
            let mb = |v: &serde_json::Value| format!("{:.1} MB", v.as_f64().unwrap_or(0.0) / 1e6);
            let when = |v: &serde_json::Value| {
                v.as_u64()
                    .map(|ms| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(ms),
                        )
                        .to_string()
                    })
                    .unwrap_or_else(|| "never".into())
            };
            let short = |v: &serde_json::Value| text(v).chars().take(12).collect::<String>();
            let rows = images["images"].as_array().into_iter().flatten().map(|i| {
                vec![
                    text(&i["service"]),
                    text(&i["os"]),
                    if i["format"] == "disk" {
                        "disk".into()
                    } else if i["built"].as_bool().unwrap_or(false) {
                        "built".into()
                    } else {
                        "not built".into()
                    },
                    i["layers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(short)
                        .collect::<Vec<_>>()
                        .join(" "),
                    mb(&i["size_bytes"]),
                    i["users"].as_array().map_or(0, Vec::len).to_string(),
                    when(&i["last_used_ms"]),
                    if i["promoted"].as_bool().unwrap_or(false) {
                        "yes".into()
                    } else {
                        String::new()
                    },
                ]
            });
            table::print(
                &[
                    "SERVICE",
                    "OS",
                    "STATE",
                    "LAYERS",
                    "SIZE",
                    "USERS",
                    "LAST USED",
                    "PROMOTED",
                ],
                rows,
            );
            println!();
            let rows = images["layers"].as_array().into_iter().flatten().map(|l| {
                vec![
                    short(&l["hash"]),
                    text(&l["kind"]),
                    text(&l["name"]),
                    short(&l["parent"]),
                    mb(&l["size_bytes"]),
                    format!("{:.1} s", l["build_ms"].as_f64().unwrap_or(0.0) / 1e3),
                    l["users"].as_array().map_or(0, Vec::len).to_string(),
                    when(&l["last_used_ms"]),
                    l["images"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(text)
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            });
            table::print(
                &[
                    "LAYER",
                    "KIND",
                    "NAME",
                    "PARENT",
                    "SIZE",
                    "BUILD",
                    "USERS",
                    "LAST USED",
                    "IMAGES",
                ],
                rows,
            );
            println!(
                "layers on disk: {} of a {} budget",
                mb(&images["total_bytes"]),
                mb(&images["budget_bytes"])
            );
            Ok(())
        }
        Command::Export { service, file, env } => {
            let body = serde_json::json!({
                "service": service,
                "env": env.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            });
            if std::io::stderr().is_terminal() {
                eprintln!("exporting {service} (builds the image first if needed)...");
            }
            let written = client.download("/v1/export", &body, &file).await?;
            println!(
                "{}: {:.1} MB (tar: vmlinux, initramfs.cpio, disk.qcow2, hangar-export.json, run.sh)",
                file.display(),
                written as f64 / 1e6
            );
            Ok(())
        }
        Command::Task { id, json } => {
            let task: serde_json::Value = client.get(&format!("/v1/tasks/{id}")).await?;
            if json {
                return print_json(&task);
            }
            table::print(
                &[
                    "TASK", "KIND", "SERVICE", "VM", "STATE", "STAGE", "%", "ERROR",
                ],
                [task_row(&task)],
            );
            Ok(())
        }
    }
}

/// `policy SERVICE: sleep after 3s, archive after 5s, ...` for a policy view.
fn print_policy(view: &serde_json::Value) {
    let p = &view["policy"];
    let mut parts: Vec<String> = ["sleep_after", "archive_after", "delete_after"]
        .into_iter()
        .filter_map(|name| Some(format!("{} {}", name.replace('_', " "), p[name].as_str()?)))
        .collect();
    if let Some(rate) = p["keep_active_above"].as_f64() {
        parts.push(format!("kept active above {rate} requests/min"));
    }
    parts.push(format!("archive tier {}", text(&p["archive_tier"])));
    println!(
        "policy {} ({}): {}",
        text(&view["service"]),
        text(&view["source"]).replace('_', "-"),
        parts.join(", ")
    );
    if let Some(note) = view["note"].as_str() {
        println!("note: {note}");
    }
}

/// `12s ago`, `3m ago`, from milliseconds.
fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return String::new();
    };
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `[#####     ]  42%  stage  (12.3 s)`
fn progress_line(percent: u64, stage: &str, elapsed: Duration) -> String {
    let filled = (percent.min(100) / 5) as usize;
    format!(
        "[{}{}] {percent:>3}%  {stage}  ({:.1} s)",
        "#".repeat(filled),
        " ".repeat(20 - filled),
        elapsed.as_secs_f64()
    )
}

fn task_row(task: &serde_json::Value) -> Vec<String> {
    vec![
        text(&task["id"]),
        text(&task["kind"]),
        text(&task["service"]),
        text(&task["vm"]),
        text(&task["state"]),
        text(&task["stage"]),
        task["percent"].to_string(),
        text(&task["error"]),
    ]
}

/// A JSON value as plain text (strings unquoted, null empty).
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn print_json(value: &serde_json::Value) -> Result<(), ClientError> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_bench_takes_a_subcommand_or_flags() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from(["hangar", "bench", "--quick", "--json", "--out", "/tmp/x"]);
        assert!(matches!(cli.command, Command::Bench { command: None, .. }));
        let cli = Cli::parse_from(["hangar", "bench", "pool", "--hits", "3"]);
        assert!(matches!(
            cli.command,
            Command::Bench {
                command: Some(BenchCommand::Pool(_)),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["hangar", "bench", "--quick", "pool"]).is_err());
    }
}
