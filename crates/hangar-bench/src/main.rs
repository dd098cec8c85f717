//! `hangar-bench`: hangar's benchmarks, a binary of their own so that the product binary
//! does not carry them. `hangar bench ARGS` runs this with the same arguments.
//!
//! Each benchmark starts its own `hangar server` (found by [`hangar::hangar_exe`]) in a
//! temporary data dir and measures through its public API: [`full`] is the performance
//! table side by side with libvirt, [`pool`], [`endpoints`] and [`lifecycle`] the narrower
//! ones; [`farm`] measures the farm's control plane on PostgreSQL. [`placement`] needs no
//! server: it times the pure placement decision.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod agent;
mod chart;
mod client;
mod endpoints;
mod farm;
mod full;
mod hangar;
mod install;
mod libvirt;
mod lifecycle;
mod measure;
mod migrate;
mod placement;
mod pool;
mod report;
mod segment;
mod server;
mod stack;
mod stats;

use client::BenchError;

/// Benchmarks: hangar's performance table side by side with libvirt (`hangar bench
/// --quick`), or `hangar bench pool`. They start their own server in a temporary data dir.
#[derive(Parser)]
#[command(name = "hangar-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    args: full::FullBench,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Request → endpoint answering: warm-pool hits against cold boots (p50, p99, ratio).
    Pool(pool::PoolBench),
    /// Stable endpoints against direct connections: latency, throughput, wake on connection.
    Endpoints(endpoints::EndpointsBench),
    /// Wake from sleeping and from each archive tier, restore from template, cold boot.
    Lifecycle(lifecycle::LifecycleBench),
    /// Applications installed at deploy onto a pre-OS shell against a full build and a
    /// ready image (request -> both endpoints answering).
    Install(install::InstallBench),
    /// Placement decisions per second over simulated hosts (pure, no server).
    Placement(placement::PlacementBench),
    /// The farm's control plane on PostgreSQL: placements/s through the API, heartbeat
    /// CPU cost, pure placement over 1,000 hosts.
    Farm(farm::FarmBench),
    /// Two VMs over their private segment against over user-mode networking: throughput
    /// and request latency (no server: VMs on this machine's QEMU).
    Segment(segment::SegmentBench),
    /// A stack (examples/shop.toml): up from templates (and cold with --cold N), wake
    /// from sleep, and its private segment against user-mode networking.
    Stack(stack::StackBench),
    /// Live migration (the longest gap a client polling every ms sees, clients held,
    /// QEMU's downtime) and evacuation, on two agents on this machine.
    Migrate(migrate::MigrateBench),
}

/// Parses the command line; run by `hangar bench` (which sets `HANGAR_BIN`), usage and
/// errors name the command `hangar bench`.
fn parse() -> Cli {
    let mut command = Cli::command();
    if std::env::var_os(hangar::HANGAR_BIN_ENV).is_some() {
        command = command.bin_name("hangar bench");
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = parse();
    let result: Result<(), BenchError> = match cli.command {
        None => full::run(cli.args).await,
        Some(BenchCommand::Pool(args)) => pool::run(args).await,
        Some(BenchCommand::Endpoints(args)) => endpoints::run(args).await,
        Some(BenchCommand::Lifecycle(args)) => lifecycle::run(args).await,
        Some(BenchCommand::Install(args)) => install::run(args).await,
        Some(BenchCommand::Placement(args)) => placement::bench(args).await,
        Some(BenchCommand::Farm(args)) => farm::run(args).await,
        Some(BenchCommand::Segment(args)) => segment::run(args).await,
        Some(BenchCommand::Stack(args)) => stack::run(args).await,
        Some(BenchCommand::Migrate(args)) => migrate::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hangar bench: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_takes_a_subcommand_or_flags() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from(["hangar-bench", "--quick", "--json", "--out", "/tmp/x"]);
        assert!(cli.command.is_none());
        let cli = Cli::parse_from(["hangar-bench", "pool", "--hits", "3"]);
        assert!(matches!(cli.command, Some(BenchCommand::Pool(_))));
        let cli = Cli::parse_from(["hangar-bench", "placement", "--hosts", "50", "--json"]);
        assert!(matches!(cli.command, Some(BenchCommand::Placement(_))));
        let cli = Cli::parse_from(["hangar-bench", "farm", "--clients", "4", "--json"]);
        assert!(matches!(cli.command, Some(BenchCommand::Farm(_))));
        let cli = Cli::parse_from(["hangar-bench", "segment", "--mib", "4", "--json"]);
        assert!(matches!(cli.command, Some(BenchCommand::Segment(_))));
        let cli = Cli::parse_from(["hangar-bench", "stack", "--runs", "3", "--cold", "1"]);
        assert!(matches!(cli.command, Some(BenchCommand::Stack(_))));
        let cli = Cli::parse_from(["hangar-bench", "migrate", "--migrations", "2"]);
        assert!(matches!(cli.command, Some(BenchCommand::Migrate(_))));
        assert!(Cli::try_parse_from(["hangar-bench", "--quick", "pool"]).is_err());
    }
}
