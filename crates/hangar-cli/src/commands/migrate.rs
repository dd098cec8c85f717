//! `hangar migrate VM --to HOST`: moves a VM to another farm host (admins only).

use crate::error::CliError;
use crate::output::print_json;
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The VM to move.
    vm: String,
    /// The farm host to move it to (`hangar hosts` lists them).
    #[arg(long, value_name = "HOST")]
    to: String,
    /// Start the migration and print its task id without waiting.
    #[arg(long)]
    no_wait: bool,
    /// Print the task as JSON (as it ended, or as started with --no-wait).
    #[arg(long)]
    json: bool,
}

/// Starts the migration, then (unless `--no-wait`) shows its progress until it ends; an
/// error unless it succeeded (a cancelled or failed migration leaves the VM where it was).
pub async fn run(client: &Client, args: MigrateArgs) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    let accepted = client.migrate(&args.vm, &args.to).await?;
    if args.no_wait {
        return super::tasks::print_started(client, &accepted.task, args.json).await;
    }
    let task = super::tasks::follow(client, &accepted.task).await?;
    if args.json {
        print_json(&task)?;
    }
    match task.state.as_str() {
        "succeeded" => {
            if !args.json {
                println!(
                    "{} moved to {} in {:.1} s (task {})",
                    args.vm,
                    args.to,
                    started.elapsed().as_secs_f64(),
                    task.id
                );
            }
            Ok(())
        }
        state => Err(CliError::Failed(format!(
            "migration of {} to {} {state}: {} (task {}; the VM stays where it was)",
            args.vm,
            args.to,
            task.error.as_deref().unwrap_or("no reason recorded"),
            task.id
        ))),
    }
}
