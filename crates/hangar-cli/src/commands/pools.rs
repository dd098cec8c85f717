//! The warm pools: `hangar pools` lists them, `hangar pool set` changes one at run time.

use crate::client::{Client, ClientError};
use crate::output::{print_json, table, text};

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
pub async fn list(client: &Client, args: PoolsArgs) -> Result<(), ClientError> {
    let pools: serde_json::Value = client.get("/v1/pools").await?;
    if args.json {
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

/// `hangar pool ...`.
pub async fn run(client: &Client, command: PoolCommand) -> Result<(), ClientError> {
    let PoolCommand::Set {
        name,
        min,
        max,
        ready,
        default_ready,
        json,
    } = command;
    let mut body = serde_json::json!({ "min": min, "max": max });
    if let Some(ready) = ready {
        body["ready"] = serde_json::from_str(&ready)
            .map_err(|err| ClientError::Usage(format!("--ready is not valid JSON: {err}")))?;
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
