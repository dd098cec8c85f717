//! The VM commands: `hangar vms` (the state table), `sleep`, `archive`, `wake` and `rm`.

use crate::client::{Client, ClientError};
use crate::output::{ago, print_json, table, text};

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
pub async fn list(client: &Client, args: VmsArgs) -> Result<(), ClientError> {
    let vms: serde_json::Value = client
        .get(if args.all {
            "/v1/vms?all=true"
        } else {
            "/v1/vms"
        })
        .await?;
    if args.json {
        return print_json(&vms);
    }
    let rows = vms.as_array().into_iter().flatten().map(|vm| {
        let services = vm["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect::<Vec<_>>()
            .join(",");
        let endpoints = vm["endpoints"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, addr)| format!("{name}={}", text(addr)))
            .collect::<Vec<_>>()
            .join(" ");
        let mut state = text(&vm["state"]);
        if let Some(pool) = vm["pool"].as_str() {
            state = format!("{state} (pool {pool})");
        }
        if let Some(tier) = vm["archive"]["tier"].as_str() {
            let mb = vm["archive"]["size_bytes"].as_f64().unwrap_or(0.0) / 1e6;
            state = format!("{state} ({tier}, {mb:.1} MB)");
        }
        if let Some(error) = vm["error"].as_str() {
            state = format!("{state}: {error}");
        }
        vec![
            text(&vm["id"]),
            text(&vm["host"]),
            services,
            endpoints,
            format!("{}/{}", vm["vcpus"], vm["memory_mib"]),
            text(&vm["mode"]),
            ago(vm["idle_ms"].as_u64()),
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
            "STATE",
        ],
        rows,
    );
    Ok(())
}

/// `hangar sleep VM`: pauses an active VM in memory.
pub async fn sleep(client: &Client, args: VmArg) -> Result<(), ClientError> {
    let vm: serde_json::Value = client
        .post(
            &format!("/v1/vms/{}/sleep", args.vm),
            &serde_json::json!({}),
        )
        .await?;
    println!("{} {}", text(&vm["id"]), text(&vm["state"]));
    Ok(())
}

/// `hangar archive VM`: writes a VM's memory to disk and ends its process.
pub async fn archive(client: &Client, args: ArchiveArgs) -> Result<(), ClientError> {
    let vm: serde_json::Value = client
        .post(
            &format!("/v1/vms/{}/archive", args.vm),
            &serde_json::json!({ "tier": args.tier }),
        )
        .await?;
    println!(
        "{} {} ({} archive, {:.1} MB)",
        text(&vm["id"]),
        text(&vm["state"]),
        text(&vm["archive"]["tier"]),
        vm["archive"]["size_bytes"].as_f64().unwrap_or(0.0) / 1e6
    );
    Ok(())
}

/// `hangar wake VM`: brings a sleeping or archived VM back.
pub async fn wake(client: &Client, args: VmArg) -> Result<(), ClientError> {
    let vm: serde_json::Value = client
        .post(&format!("/v1/vms/{}/wake", args.vm), &serde_json::json!({}))
        .await?;
    println!("{} {}", text(&vm["id"]), text(&vm["state"]));
    Ok(())
}

/// `hangar rm VM...`: deletes VMs in order; stops at the first that fails.
pub async fn rm(client: &Client, args: RmArgs) -> Result<(), ClientError> {
    for vm in args.vms {
        let _: serde_json::Value = client.delete(&format!("/v1/vms/{vm}")).await?;
        println!("{vm} deleted");
    }
    Ok(())
}
