//! The warm pools: `hangar pools` lists them, `hangar pool set` changes one at run time.

use hangar_api::PoolBoundsBody;

use crate::error::CliError;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct PoolsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum PoolCommand {
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

/// `hangar pools`: each pool's shape, bounds, target, ready and booting VMs and demand.
pub async fn list(client: &Client, args: PoolsArgs) -> Result<(), CliError> {
    let pools = client.pools().await?;
    if args.json {
        return print_json(&pools);
    }
    let rows = pools.iter().map(|p| {
        vec![
            p.name.clone(),
            p.service.clone().unwrap_or_else(|| "(pre-OS shell)".into()),
            format!("{}x{} MiB", p.vcpus, p.vm_memory_mib),
            format!("{}-{}", p.min, p.max),
            p.target.to_string(),
            p.ready.to_string(),
            p.booting.to_string(),
            format!("{} MiB", p.memory_mib),
            format!("{:.1}", p.rate_per_min),
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

/// `hangar pool ...`.
pub async fn run(client: &Client, command: PoolCommand) -> Result<(), CliError> {
    let PoolCommand::Set {
        name,
        min,
        max,
        ready,
        default_ready,
        json,
    } = command;
    let ready = match ready {
        Some(ready) => {
            let ready: serde_json::Value = serde_json::from_str(&ready)
                .map_err(|err| CliError::Usage(format!("--ready is not valid JSON: {err}")))?;
            let ready = serde_json::from_value(ready).map_err(|err| {
                CliError::Usage(format!("--ready is not a ready criterion: {err}"))
            })?;
            Some(Some(ready))
        }
        None if default_ready => Some(None),
        None => None,
    };
    let body = PoolBoundsBody { min, max, ready };
    let pool = client.set_pool(&name, &body).await?;
    if json {
        return print_json(&pool);
    }
    println!(
        "pool {name}: min {} max {} target {}",
        pool.min, pool.max, pool.target
    );
    Ok(())
}
