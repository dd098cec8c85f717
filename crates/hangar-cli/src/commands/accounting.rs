//! Quotas and usage: `hangar quotas`, `hangar quota set`, `hangar usage`.

use hangar_api::client::Client;
use hangar_api::{Limits, UsageBy, UsageRow};

use crate::error::CliError;
use crate::output::{print_json, table, wire_name};

#[derive(clap::Args)]
pub struct QuotasArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum QuotaCommand {
    /// Set a user's quota (kept across restarts): limits left out are no limit.
    #[command(after_help = "Example: hangar quota set local --vms 10 --vcpus 16 --memory 8192")]
    Set {
        /// The user (a VM's owner; `local` before users exist).
        user: String,
        /// Most VMs (not counting shared VMs others made).
        #[arg(long)]
        vms: Option<u64>,
        /// Most vCPUs of VMs that hold room on a host.
        #[arg(long)]
        vcpus: Option<u64>,
        /// Most memory (MiB) of VMs that hold room on a host.
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// Most disk (MiB) of archived VMs' archives.
        #[arg(long, value_name = "MIB")]
        archive: Option<u64>,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct UsageArgs {
    /// The window: a duration before now (1h, 7d) or milliseconds since the epoch;
    /// default: everything recorded.
    #[arg(long)]
    since: Option<String>,
    /// Sum by user, service, host or vm.
    #[arg(long, default_value = "user", value_parser = ["user", "service", "host", "vm"])]
    by: String,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV (a header line, then one line per row and the total).
    #[arg(long)]
    csv: bool,
}

fn limit(value: Option<u64>, unit: &str) -> String {
    match value {
        Some(value) => format!("{value}{unit}"),
        None => "-".into(),
    }
}

/// `hangar quotas`: every user's limits and what their VMs take.
pub async fn list(client: &Client, args: QuotasArgs) -> Result<(), CliError> {
    let quotas = client.quotas().await?;
    if args.json {
        return print_json(&quotas);
    }
    let rows = quotas.users.iter().map(|view| {
        let pair = |used: u64, max: Option<u64>, unit: &str| {
            format!("{used}{unit} of {}", limit(max, unit))
        };
        vec![
            view.user.clone(),
            pair(view.used.vms, view.limits.vms, ""),
            pair(view.used.vcpus, view.limits.vcpus, ""),
            pair(view.used.memory_mib, view.limits.memory_mib, " MiB"),
            pair(
                view.used.archive_bytes >> 20,
                view.limits.archive_bytes.map(|b| b >> 20),
                " MiB",
            ),
            wire_name(&view.source),
        ]
    });
    table::print(
        &["USER", "VMS", "VCPUS", "MEMORY", "ARCHIVES", "QUOTA"],
        rows,
    );
    println!("default quota: {}", quotas.default);
    Ok(())
}

/// `hangar quota set`.
pub async fn run(client: &Client, command: QuotaCommand) -> Result<(), CliError> {
    match command {
        QuotaCommand::Set {
            user,
            vms,
            vcpus,
            memory,
            archive,
            json,
        } => {
            let limits = Limits {
                vms,
                vcpus,
                memory_mib: memory,
                archive_bytes: archive.map(|mib| mib.saturating_mul(1 << 20)),
            };
            let view = client.set_quota(&user, &limits).await?;
            if json {
                return print_json(&view);
            }
            println!("{}: {}", view.user, view.limits);
            Ok(())
        }
    }
}

/// `hangar usage`.
pub async fn usage(client: &Client, args: UsageArgs) -> Result<(), CliError> {
    let by: UsageBy = args.by.parse().map_err(CliError::Usage)?;
    let usage = client.usage(args.since.as_deref(), Some(by)).await?;
    if args.json {
        return print_json(&usage);
    }
    let header = [
        by.as_str(),
        "vms",
        "active_s",
        "sleeping_s",
        "archived_s",
        "other_s",
        "active_vcpu_h",
        "active_gib_h",
        "sleeping_gib_h",
        "archive_gb_h",
        "cost",
    ];
    let cells = |row: &UsageRow| {
        vec![
            row.key.clone(),
            row.vms.to_string(),
            format!("{:.1}", row.active_s),
            format!("{:.1}", row.sleeping_s),
            format!("{:.1}", row.archived_s),
            format!("{:.1}", row.other_s),
            format!("{:.4}", row.active_vcpu_hours),
            format!("{:.4}", row.active_gib_hours),
            format!("{:.4}", row.sleeping_gib_hours),
            format!("{:.6}", row.archive_gb_hours),
            format!("{:.4}", row.cost),
        ]
    };
    let rows = usage.rows.iter().chain([&usage.total]).map(cells);
    if args.csv {
        println!("{}", header.join(","));
        for row in rows {
            let quoted: Vec<String> = row.iter().map(|cell| csv_cell(cell)).collect();
            println!("{}", quoted.join(","));
        }
        return Ok(());
    }
    let upper: Vec<String> = header.iter().map(|h| h.to_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    table::print(&upper, rows);
    Ok(())
}

/// A CSV cell, quoted when it holds a comma, a quote or a line break.
fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}
