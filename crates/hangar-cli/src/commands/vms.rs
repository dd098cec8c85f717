//! The VM commands: `hangar vms` (the state table), `sleep`, `archive`, `wake` and `rm`.

use hangar_api::ArchiveBody;

use crate::error::CliError;
use crate::output::{ago, print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct VmsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Include deleted VMs.
    #[arg(long)]
    all: bool,
}

#[derive(clap::Args)]
pub struct VmArg {
    vm: String,
}

#[derive(clap::Args)]
pub struct ArchiveArgs {
    vm: String,
    /// `zstd` (smaller), `raw` (faster), or `delta` (only the pages that differ from the
    /// template the VM was cloned from: smallest; other VMs get `zstd`).
    #[arg(long, default_value = "zstd", value_parser = ["raw", "zstd", "delta"])]
    tier: String,
}

#[derive(clap::Args)]
pub struct RmArgs {
    #[arg(required = true)]
    vms: Vec<String>,
}

/// `hangar vms`: every VM with its host, services, endpoints and state.
pub async fn list(client: &Client, args: VmsArgs) -> Result<(), CliError> {
    let vms = client.vms(args.all).await?;
    if args.json {
        return print_json(&vms);
    }
    let rows = vms.iter().map(|vm| {
        let endpoints = vm
            .endpoints
            .iter()
            .map(|(name, addr)| format!("{name}={addr}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut state = vm.state.to_string();
        if let Some(pool) = &vm.pool {
            state = format!("{state} (pool {pool})");
        }
        if let Some(archive) = &vm.archive {
            let mb = archive.size_bytes as f64 / 1e6;
            state = format!("{state} ({}, {mb:.1} MB)", archive.tier);
        }
        if let Some(error) = &vm.error {
            state = format!("{state}: {error}");
        }
        let host = match &vm.moving_to {
            Some(to) => format!("{} -> {to}", vm.host),
            None => vm.host.clone(),
        };
        vec![
            vm.id.clone(),
            host,
            vm.services.join(","),
            endpoints,
            format!("{}/{}", vm.vcpus, vm.memory_mib),
            vm.mode.as_str().to_owned(),
            ago(Some(vm.idle_ms)),
            match vm.egress.allow.len() {
                0 => vm.egress.policy.clone(),
                n => format!("{}({n})", vm.egress.policy),
            },
            state,
        ]
    });
    table::print(
        &[
            "VM",
            "HOST",
            "SERVICES",
            "ENDPOINTS",
            "CPU/MIB",
            "MODE",
            "LAST USED",
            "EGRESS",
            "STATE",
        ],
        rows,
    );
    Ok(())
}

/// `hangar sleep VM`: pauses an active VM in memory.
pub async fn sleep(client: &Client, args: VmArg) -> Result<(), CliError> {
    let vm = client.sleep(&args.vm).await?;
    println!("{} {}", vm.id, vm.state);
    Ok(())
}

/// `hangar archive VM`: writes a VM's memory to disk and ends its process.
pub async fn archive(client: &Client, args: ArchiveArgs) -> Result<(), CliError> {
    let body = ArchiveBody {
        tier: args.tier.parse().map_err(CliError::Usage)?,
    };
    let vm = client.archive(&args.vm, &body).await?;
    let (tier, size_bytes) = vm
        .archive
        .as_ref()
        .map_or(("", 0), |a| (a.tier.as_str(), a.size_bytes));
    println!(
        "{} {} ({tier} archive, {:.1} MB)",
        vm.id,
        vm.state,
        size_bytes as f64 / 1e6
    );
    Ok(())
}

/// `hangar wake VM`: brings a sleeping or archived VM back.
pub async fn wake(client: &Client, args: VmArg) -> Result<(), CliError> {
    let vm = client.wake(&args.vm).await?.value;
    println!("{} {}", vm.id, vm.state);
    Ok(())
}

/// `hangar rm VM...`: deletes VMs in order; stops at the first that fails.
pub async fn rm(client: &Client, args: RmArgs) -> Result<(), CliError> {
    for vm in args.vms {
        client.delete_vm(&vm).await?;
        println!("{vm} deleted");
    }
    Ok(())
}
