//! `hangar hosts`: the hosts VMs run on (the server's own and the farm's).

use crate::error::CliError;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct HostsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Each host's state, address, vCPUs and memory used of total, VMs by state, load, cost,
/// labels and the age of its last heartbeat.
pub async fn list(client: &Client, args: HostsArgs) -> Result<(), CliError> {
    let hosts = client.hosts().await?;
    if args.json {
        return print_json(&hosts);
    }
    let rows = hosts.iter().map(|h| {
        let vms = if h.vms.is_empty() {
            "-".to_owned()
        } else {
            h.vms
                .iter()
                .map(|(state, n)| format!("{n} {state}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let labels = if h.labels.is_empty() {
            "-".to_owned()
        } else {
            h.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![
            h.name.clone(),
            if h.address.is_empty() {
                "(this server)".into()
            } else {
                h.address.clone()
            },
            h.state.clone(),
            format!("{}/{}", h.vcpus_used, h.vcpus),
            format!("{}/{} MiB", h.memory_used_mib, h.memory_mib),
            vms,
            format!("{:.2}", h.load),
            h.cost.to_string(),
            labels,
            format!("{:.1}s ago", h.heartbeat_age_s),
        ]
    });
    table::print(
        &[
            "HOST",
            "ADDRESS",
            "STATE",
            "VCPUS",
            "MEMORY",
            "VMS",
            "LOAD",
            "COST",
            "LABELS",
            "HEARTBEAT",
        ],
        rows,
    );
    Ok(())
}
