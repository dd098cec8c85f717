//! `hangar services`: the services that can be requested.

use crate::client::{Client, ClientError};
use crate::output::{print_json, table, text};

#[derive(clap::Args)]
pub struct ServicesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: ServicesArgs) -> Result<(), ClientError> {
    let services: serde_json::Value = client.get("/v1/services").await?;
    if args.json {
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
