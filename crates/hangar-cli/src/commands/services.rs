//! `hangar services`: the services that can be requested.

use hangar_api::ServiceView;

use crate::client::{Client, ClientError};
use crate::output::{print_json, table, typed};

#[derive(clap::Args)]
pub struct ServicesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: ServicesArgs) -> Result<(), ClientError> {
    let answer: serde_json::Value = client.get("/v1/services").await?;
    if args.json {
        return print_json(&answer);
    }
    let services: Vec<ServiceView> = typed(answer)?;
    let rows = services.iter().map(|s| {
        let ports = s
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.name, p.guest))
            .collect::<Vec<_>>()
            .join(",");
        let settings = s
            .settings
            .iter()
            .map(|(key, setting)| {
                if setting.required {
                    format!("{key}!")
                } else {
                    key.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        vec![
            s.name.clone(),
            s.environments.join(" "),
            s.vcpus.to_string(),
            format!("{} MiB", s.memory_mib),
            ports,
            settings,
            s.description.clone(),
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
