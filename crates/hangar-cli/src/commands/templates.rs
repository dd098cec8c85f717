//! `hangar templates`: service templates, the snapshots new VMs are cloned from.

use crate::error::CliError;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct TemplatesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: TemplatesArgs) -> Result<(), CliError> {
    let templates = client.templates().await?;
    if args.json {
        return print_json(&templates);
    }
    let rows = templates.iter().map(|t| {
        vec![
            t.service.clone(),
            t.host.clone(),
            t.key.clone(),
            format!("{}x{} MiB", t.vcpus, t.memory_mib),
            format!("{:.1} MB", t.size_bytes as f64 / 1e6),
            format!("{} ms", t.took_ms),
            if t.current {
                "yes".into()
            } else {
                "no (outdated)".into()
            },
            t.created_at.clone(),
        ]
    });
    table::print(
        &[
            "SERVICE", "HOST", "KEY", "SHAPE", "SIZE", "SNAPSHOT", "CURRENT", "CREATED",
        ],
        rows,
    );
    Ok(())
}
