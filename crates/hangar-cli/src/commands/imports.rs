//! Imported machines: `hangar import FILE --name NAME`, `hangar imports`,
//! `hangar unimport NAME`.

use std::path::PathBuf;

use hangar_api::client::Client;
use hangar_api::{ImportQuery, ImportView};

use crate::error::CliError;
use crate::output::{print_json, table};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The disk image: a full disk with its own bootloader, or a bare root filesystem.
    file: PathBuf,
    /// The model's name (its service's): lowercase letters, digits and '-'.
    #[arg(long)]
    name: String,
    /// The image's format; it is never guessed from the file.
    #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw", "vmdk"])]
    format: String,
    /// A guest port it serves, NAME=PORT (repeat for more): forwarded to an endpoint, and
    /// its VMs are ready when every port answers.
    #[arg(long = "port", value_name = "NAME=PORT")]
    ports: Vec<String>,
    /// vCPUs of its VMs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// MiB of memory of its VMs.
    #[arg(long)]
    memory: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ImportsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct UnimportArgs {
    /// The imported machine to remove (its model disk and record).
    name: String,
}

const HEADER: [&str; 8] = [
    "NAME", "LAYOUT", "FORMAT", "PORTS", "VCPUS", "MEMORY", "DISK", "OWNER",
];

/// `hangar import FILE --name NAME`: uploads the image; prints the model once it is
/// checked, staged and stored, with the time each step took.
pub async fn import(client: &Client, args: ImportArgs) -> Result<(), CliError> {
    let file = tokio::fs::File::open(&args.file)
        .await
        .map_err(|err| CliError::Usage(format!("cannot open {}: {err}", args.file.display())))?;
    let query = ImportQuery {
        name: args.name,
        format: args.format,
        ports: (!args.ports.is_empty()).then(|| args.ports.join(",")),
        vcpus: args.vcpus,
        memory_mib: args.memory,
    };
    let view = client.import_machine(&query, file).await?;
    if args.json {
        return print_json(&view);
    }
    table::print(&HEADER, [row(&view)]);
    let steps: Vec<String> = view
        .timings_ms
        .iter()
        .map(|(step, ms)| format!("{step} {ms} ms"))
        .collect();
    println!("{}", steps.join(", "));
    Ok(())
}

/// `hangar imports`: the imported machines.
pub async fn list(client: &Client, args: ImportsArgs) -> Result<(), CliError> {
    let imports = client.imports().await?;
    if args.json {
        return print_json(&imports);
    }
    table::print(&HEADER, imports.iter().map(row));
    Ok(())
}

/// `hangar unimport NAME`: removes an imported machine.
pub async fn remove(client: &Client, args: UnimportArgs) -> Result<(), CliError> {
    let view = client.delete_import(&args.name).await?;
    println!("removed {}", view.name);
    Ok(())
}

fn row(view: &ImportView) -> Vec<String> {
    let layout = match view.root_partition {
        Some(part) => format!("{} (root {part})", view.layout),
        None => view.layout.clone(),
    };
    vec![
        view.name.clone(),
        layout,
        view.format.clone(),
        view.ports
            .iter()
            .map(|(name, port)| format!("{name}={port}"))
            .collect::<Vec<_>>()
            .join(","),
        view.vcpus.to_string(),
        format!("{} MiB", view.memory_mib),
        format!("{} MiB", view.disk_bytes >> 20),
        view.owner.clone(),
    ]
}
