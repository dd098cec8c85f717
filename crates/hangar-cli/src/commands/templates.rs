//! `hangar templates`: service templates, the snapshots new VMs are cloned from.

use crate::client::{Client, ClientError};
use crate::output::{print_json, table, text};

#[derive(clap::Args)]
pub struct TemplatesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: TemplatesArgs) -> Result<(), ClientError> {
    let templates: serde_json::Value = client.get("/v1/templates").await?;
    if args.json {
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
