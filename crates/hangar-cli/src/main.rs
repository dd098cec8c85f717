//! `hangar`: the server (`hangar server`) and every client command of its REST API.
//!
//! This file parses the command line and dispatches. Each command lives in its module under
//! [`commands`]; what they print (tables, `--json`, progress, errors as exit codes) in
//! [`output`]; failures and their exit codes in [`error`]. The REST client is
//! `hangar_api::client`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod error;
mod output;

use commands::{
    accounting, agent, alerts, auth, bench as bench_cmd, check, export, host, hosts, images,
    imports, migrate, policies, pools, request, server, services, stacks, tasks, templates, vms,
};
use error::CliError;
use hangar_api::client::Client;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (server error, bad reply)
  2  usage error, or the server refused the request as malformed
  3  not found (no such service, VM or task)
  4  never: the request can never be satisfied (see the alternatives printed)
  5  try again shortly: not ready within the deadline, the work goes on
  6  cannot reach the server (is `hangar server` running? see HANGAR_URL)
  7  over quota: the VM would take its owner past a limit (see `hangar quotas`)";

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

    /// The API token client commands send. Without it: the file `hangar login` wrote, then
    /// the server's admin.token in $HANGAR_DATA_DIR (or the default data dir) if readable.
    #[arg(long, env = "HANGAR_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane and the local host (QEMU runs here).
    Server(Box<server::ServerArgs>),
    /// Run one host of a farm: QEMU VMs here, for the control plane at --server (registers,
    /// reports every second, serves the agent API the server calls).
    #[command(
        after_help = "Example:\n  hangar agent --server http://10.0.0.1:7070 --token-file /etc/hangar/farm-token \\\n    --listen 0.0.0.0:7071 --insecure-listen --endpoint-host 10.0.0.2 --labels zone=a"
    )]
    Agent(agent::AgentArgs),
    /// Hold a data dir's stable VM endpoints (started by `hangar server`, outlives it).
    #[command(hide = true)]
    Forwarder(server::ForwarderArgs),
    /// Relay one guest connection (stdin/stdout) to an allowed egress target: run by
    /// QEMU's user-mode network for each connection a VM with an allow list opens.
    #[command(name = hangar_vmm::egress::RELAY_SUBCOMMAND, hide = true)]
    EgressRelay {
        /// HOST:PORT
        target: String,
    },
    /// List the services that can be requested.
    Services(services::ServicesArgs),
    /// Request a service, or a machine configuration; prints the address of a VM offering it.
    #[command(
        after_help = "Examples:\n  curl http://$(hangar request http-static)/\n  \
        hangar request --vcpus 1 --memory 128 --os busybox --app http-static --exact-size"
    )]
    Request(request::RequestArgs),
    /// Check a request without provisioning: every problem with a suggestion, the
    /// candidates (exact, superset, partial, partial + install, build) ranked by cost to
    /// deliver and waste, and the one a request would get. Exits 4 when it would be refused.
    #[command(
        after_help = "Examples:\n  hangar check --vcpus 1 --memory 128 --os busybox@1.35 --app http-static --exact-size\n  \
        hangar check --memory 256 --os debian-12 --app postgresql --json"
    )]
    Check(request::RequestArgs),
    /// The state table: every VM, its host, services, endpoints and state.
    Vms(vms::VmsArgs),
    /// Hosts VMs run on (this server's own and the farm's agents): state, capacity and
    /// use, VMs, load, cost, labels, last heartbeat.
    Hosts(hosts::HostsArgs),
    /// Drain, resume or evacuate a farm host (admins only).
    #[command(
        after_help = "Examples:\n  hangar host drain host-a\n  hangar host evacuate host-a\n  hangar host resume host-a"
    )]
    Host {
        #[command(subcommand)]
        command: host::HostCommand,
    },
    /// Warm pools: paused VMs ready to hand out, per service or configuration.
    Pools(pools::PoolsArgs),
    /// Service templates: VMs snapshotted at their ready state; new VMs are clones of them.
    Templates(templates::TemplatesArgs),
    /// Change a pool at run time.
    Pool {
        #[command(subcommand)]
        command: pools::PoolCommand,
    },
    /// Lifecycle policies of every service (idle timers, keep-active rate, archive tier)
    /// and the memory and disk budgets with what they hold.
    Policies(policies::PoliciesArgs),
    /// Change a service's lifecycle policy at run time.
    Policy {
        #[command(subcommand)]
        command: policies::PolicyCommand,
    },
    /// Quotas per user: limits and what each user's VMs take.
    Quotas(accounting::QuotasArgs),
    /// Change a user's quota.
    Quota {
        #[command(subcommand)]
        command: accounting::QuotaCommand,
    },
    /// Usage for billing: VM-seconds by state, vCPU- and GiB-hours, archive GB-hours and
    /// their cost, per user, service, host or VM.
    #[command(after_help = "Example: hangar usage --since 1h --by service --csv")]
    Usage(accounting::UsageArgs),
    /// Alerts raised by the server's rules (host down, pool empty while requested, host
    /// disk or memory, pool memory budget, VMs crashing, failed migrations): firing ones,
    /// or with --all pending and resolved ones too.
    #[command(
        after_help = "Rules are set with `hangar server --alerts FILE` (TOML), for example:\n  \
        [webhook]\n  url = \"http://10.0.0.5:9093/hangar\"\n  [rules.host_down]\n  hold = \"10s\"\n  \
        [rules.host_memory]\n  above_percent = 85\n  for = \"2m\"\n\
        Rules: host_down, pool_empty, host_disk (free_below_mib), host_memory and pool_memory\n\
        (above_percent), vm_crashing (failures, window), migration_failed (window); each with\n\
        enabled, for (true this long before firing) and hold (false this long before resolving)."
    )]
    Alerts(alerts::AlertsArgs),
    /// Benchmarks: hangar's performance table side by side with libvirt (`hangar bench
    /// --quick`), or `hangar bench pool`. They start their own server in a temporary data dir.
    #[command(disable_help_flag = true)]
    Bench(bench_cmd::BenchArgs),
    /// Pause an active VM in memory.
    Sleep(vms::VmArg),
    /// Write a VM's memory to disk (compressed) and end its process.
    Archive(vms::ArchiveArgs),
    /// Bring a sleeping or archived VM back.
    Wake(vms::VmArg),
    /// Move a VM to another farm host (admins only), showing progress: an active VM live
    /// (it keeps running and keeps its stable endpoint; clients see a pause of tens of
    /// milliseconds), a sleeping or archived one by its snapshot. Cancel with `hangar task
    /// cancel`: the VM stays where it was.
    #[command(after_help = "Example:\n  hangar migrate vm-3f2a --to host-b")]
    Migrate(migrate::MigrateArgs),
    /// Delete VMs: their processes, disks, sockets and logs.
    Rm(vms::RmArgs),
    /// Recent tasks (VM creation and other long operations).
    Tasks(tasks::TasksArgs),
    /// Build the image of a service (its layers), showing progress.
    #[command(after_help = "Example:\n  hangar build redis --env os=debian-12")]
    Build(images::BuildArgs),
    /// Images of every viable service and environment, and the layers they share: sizes,
    /// users, last use.
    Images(images::ImagesArgs),
    /// Write a self-contained image of a service (tar: kernel, initramfs, flattened disk,
    /// hangar-export.json, run.sh) that boots with plain qemu-system-x86_64.
    #[command(
        after_help = "Example:\n  hangar export nginx nginx.tar && tar -xf nginx.tar && ./run.sh"
    )]
    Export(export::ExportArgs),
    /// Import an existing machine from its disk image (qcow2, raw or vmdk): checked,
    /// its identity stripped, stored as a model that is then requested like a service.
    #[command(
        after_help = "Example:\n  hangar import web.qcow2 --name legacy-web --port http=80 --memory 512\n  curl http://$(hangar request legacy-web)/"
    )]
    Import(imports::ImportArgs),
    /// Imported machines.
    Imports(imports::ImportsArgs),
    /// Remove an imported machine (its model disk and record).
    Unimport(imports::UnimportArgs),
    /// Stacks: several services as one unit, each member its own VM on a private
    /// segment (up, ls, show, down, sleep, archive, wake).
    #[command(
        after_help = "Examples:\n  hangar stack up examples/shop.toml\n  hangar stack ls\n  hangar stack down shop"
    )]
    Stack {
        #[command(subcommand)]
        command: stacks::StackCommand,
    },
    /// One task: show it (with its steps), wait for its end, or cancel it.
    #[command(
        after_help = "Examples:\n  hangar task show 0193...\n  hangar task wait 0193... && echo done\n  hangar task cancel 0193..."
    )]
    Task {
        #[command(subcommand)]
        command: tasks::TaskCommand,
    },
    /// Check an API token with the server and keep it (mode 0600) for later commands;
    /// reads it from standard input.
    #[command(
        after_help = "Example:\n  hangar token create --user ana | ssh ana@host hangar login"
    )]
    Login(auth::LoginArgs),
    /// The user and role your token speaks for.
    Whoami(auth::JsonArgs),
    /// Users and their roles (admin).
    Users(auth::JsonArgs),
    /// Add a user (admin).
    User {
        #[command(subcommand)]
        command: auth::UserCommand,
    },
    /// Your API tokens (an admin's: everyone's), never their secrets.
    Tokens(auth::JsonArgs),
    /// Make or revoke an API token.
    Token {
        #[command(subcommand)]
        command: auth::TokenCommand,
    },
    /// The audit log: every mutating call, who made it, on what, and its outcome (admin).
    Audit(auth::AuditArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::EgressRelay { target } = &cli.command {
        // Its stdout and stderr are the guest's connection: nothing else is written, and
        // no runtime is started for one connection.
        return match hangar_vmm::egress::relay(target) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    run(cli)
}

#[tokio::main]
async fn run(cli: Cli) -> ExitCode {
    let Cli {
        url,
        token,
        command,
    } = cli;
    let result = match command {
        Command::Server(args) => return server::run(*args).await,
        Command::Agent(args) => return agent::run(args).await,
        Command::Forwarder(args) => return server::forwarder(args).await,
        Command::Bench(args) => bench_cmd::run(args),
        command => client_command(&url, auth::resolve_token(token), command).await,
    };
    output::exit_status(result)
}

/// Runs a command of the REST API against the server at `url`, sending `token`.
async fn client_command(
    url: &str,
    token: Option<String>,
    command: Command,
) -> Result<(), CliError> {
    // A client's output piped into `head` ends quietly when the pipe closes, as other
    // command-line tools do, instead of panicking on the failed print. Only client commands:
    // the server and agents must get EPIPE on their sockets, not the signal.
    // SAFETY: resets one signal's disposition to the default before any thread of ours
    // writes to stdout; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let mut client = Client::new(url)?;
    if let Some(token) = &token {
        client = client.with_token(token);
    }
    let client = &client;
    match command {
        Command::Server(_)
        | Command::Agent(_)
        | Command::Forwarder(_)
        | Command::Bench(_)
        | Command::EgressRelay { .. } => {
            unreachable!("run without a client, in main")
        }
        Command::Services(args) => services::run(client, args).await,
        Command::Request(args) => request::run(client, args).await,
        Command::Check(args) => check::run(client, args).await,
        Command::Vms(args) => vms::list(client, args).await,
        Command::Pools(args) => pools::list(client, args).await,
        Command::Hosts(args) => hosts::list(client, args).await,
        Command::Host { command } => host::run(client, command).await,
        Command::Templates(args) => templates::run(client, args).await,
        Command::Pool { command } => pools::run(client, command).await,
        Command::Policies(args) => policies::list(client, args).await,
        Command::Policy { command } => policies::run(client, command).await,
        Command::Quotas(args) => accounting::list(client, args).await,
        Command::Quota { command } => accounting::run(client, command).await,
        Command::Usage(args) => accounting::usage(client, args).await,
        Command::Alerts(args) => alerts::list(client, args).await,
        Command::Sleep(args) => vms::sleep(client, args).await,
        Command::Archive(args) => vms::archive(client, args).await,
        Command::Wake(args) => vms::wake(client, args).await,
        Command::Migrate(args) => migrate::run(client, args).await,
        Command::Rm(args) => vms::rm(client, args).await,
        Command::Tasks(args) => tasks::list(client, args).await,
        Command::Build(args) => images::build(client, args).await,
        Command::Images(args) => images::list(client, args).await,
        Command::Export(args) => export::run(client, args).await,
        Command::Task { command } => tasks::run(client, command).await,
        Command::Stack { command } => stacks::run(client, command).await,
        Command::Import(args) => imports::import(client, args).await,
        Command::Imports(args) => imports::list(client, args).await,
        Command::Unimport(args) => imports::remove(client, args).await,
        Command::Login(args) => auth::login(&Client::new(url)?, args).await,
        Command::Whoami(args) => auth::whoami(client, args).await,
        Command::Users(args) => auth::users(client, args).await,
        Command::User { command } => auth::user(client, command).await,
        Command::Tokens(args) => auth::tokens(client, args).await,
        Command::Token { command } => auth::token(client, command).await,
        Command::Audit(args) => auth::audit(client, args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_bench_passes_its_arguments_through() {
        Cli::command().debug_assert();
        for args in [
            &["hangar", "bench", "--quick", "--json", "--out", "/tmp/x"][..],
            &["hangar", "bench", "pool", "--hits", "3"],
            &["hangar", "bench", "placement", "--rounds", "3", "--json"],
            &["hangar", "bench", "--help"],
            &["hangar", "bench"],
        ] {
            let cli = Cli::parse_from(args);
            let Command::Bench(bench) = cli.command else {
                panic!("{args:?} is not `hangar bench`");
            };
            let given: Vec<std::ffi::OsString> = args[2..].iter().map(Into::into).collect();
            assert_eq!(bench.args, given, "passed through as given");
        }
    }
}
