//! `hangar host drain|resume|evacuate HOST`: an operator empties a farm host (admins only).

use hangar_api::EvacuationView;
use hangar_api::client::Client;

use crate::error::CliError;
use crate::output::{print_json, table};

#[derive(clap::Subcommand)]
pub enum HostCommand {
    /// Take no new VMs on HOST: its paused pool VMs are removed (the pools refill on other
    /// hosts); VMs in use stay. It stays draining, across its agent's heartbeats and
    /// restarts, until `hangar host resume`.
    Drain(HostArgs),
    /// Let a draining HOST take VMs again (refused while it is down or lost: it comes
    /// back up by itself when its agent answers; or while it is being evacuated).
    Resume(HostArgs),
    /// Drain HOST, then move every active, sleeping and archived VM to the best other
    /// host (placement's rules), two at a time, showing progress; pool VMs are made again
    /// elsewhere. VMs that cannot move are named and stay (the host stays draining).
    /// Cancel with `hangar task cancel` (no new moves start).
    #[command(after_help = "Example:\n  hangar host evacuate host-a && hangar hosts")]
    Evacuate(EvacuateArgs),
}

#[derive(clap::Args)]
pub struct HostArgs {
    /// The farm host (`hangar hosts` lists them).
    host: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct EvacuateArgs {
    /// The farm host to empty (`hangar hosts` lists them).
    host: String,
    /// Start the evacuation and print its task id without waiting.
    #[arg(long)]
    no_wait: bool,
    /// Print what the evacuation did, VM by VM, as JSON (with --no-wait: the task).
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, command: HostCommand) -> Result<(), CliError> {
    match command {
        HostCommand::Drain(args) => {
            let view = client.drain_host(&args.host).await?;
            if args.json {
                return print_json(&view);
            }
            println!(
                "{} is draining: no new VMs; {} pool VMs removed (their pools refill elsewhere)",
                view.name, view.pool_vms_removed
            );
            Ok(())
        }
        HostCommand::Resume(args) => {
            let view = client.resume_host(&args.host).await?;
            if args.json {
                return print_json(&view);
            }
            println!("{} is up: it takes new VMs again", view.name);
            Ok(())
        }
        HostCommand::Evacuate(args) => evacuate(client, args).await,
    }
}

/// Starts the evacuation, then (unless `--no-wait`) shows its progress until it ends and
/// what it did; an error unless every VM moved.
async fn evacuate(client: &Client, args: EvacuateArgs) -> Result<(), CliError> {
    let accepted = client.evacuate_host(&args.host).await?;
    if args.no_wait {
        return super::tasks::print_started(client, &accepted.task, args.json).await;
    }
    let task = super::tasks::follow(client, &accepted.task).await?;
    let report = client.evacuation(&args.host).await?;
    if args.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    match task.state.as_str() {
        "succeeded" => Ok(()),
        state => Err(CliError::Failed(format!(
            "evacuation of {} {state}: {} (task {})",
            args.host,
            task.error.as_deref().unwrap_or("no reason recorded"),
            task.id
        ))),
    }
}

fn print_report(report: &EvacuationView) {
    let rows = report.vms.iter().map(|vm| {
        vec![
            vm.vm.clone(),
            vm.state.clone(),
            vm.from.clone(),
            vm.to.clone().unwrap_or_else(|| "-".into()),
            vm.outcome.clone(),
            vm.took_ms
                .map_or_else(|| "-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
            vm.error.clone().unwrap_or_else(|| "-".into()),
        ]
    });
    table::print(
        &["VM", "STATE", "FROM", "TO", "OUTCOME", "TOOK", "ERROR"],
        rows,
    );
    println!(
        "{}: {} of {} VMs moved, {} not, {} pool VMs removed, in {:.1} s (task {})",
        report.host,
        report.moved,
        report.vms.len(),
        report.failed,
        report.pool_vms_removed,
        report.elapsed_ms as f64 / 1000.0,
        report.task
    );
}
