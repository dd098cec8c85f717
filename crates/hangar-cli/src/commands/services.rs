//! `hangar services`: the services that can be requested.

use crate::error::CliError;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct ServicesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: ServicesArgs) -> Result<(), CliError> {
    let services = client.services().await?;
    if args.json {
        return print_json(&services);
    }
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
