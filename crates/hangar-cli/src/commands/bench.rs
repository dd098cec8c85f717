//! `hangar bench`: the benchmarks (they start their own server).

use crate::bench;
use crate::client::ClientError;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    args: bench::FullBench,
}

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Request → endpoint answering: warm-pool hits against cold boots (p50, p99, ratio).
    Pool(bench::PoolBench),
    /// Stable endpoints against direct connections: latency, throughput, wake on connection.
    Endpoints(crate::bench_endpoints::EndpointsBench),
    /// Wake from sleeping and from each archive tier, restore from template, cold boot.
    Lifecycle(crate::bench_lifecycle::LifecycleBench),
}

pub async fn run(args: BenchArgs) -> Result<(), ClientError> {
    match args.command {
        None => bench::run(args.args).await,
        Some(BenchCommand::Pool(args)) => bench::run_pool(args).await,
        Some(BenchCommand::Endpoints(args)) => crate::bench_endpoints::run(args).await,
        Some(BenchCommand::Lifecycle(args)) => crate::bench_lifecycle::run(args).await,
    }
}
