//! Tasks (VM creation, image builds and other long operations): `hangar tasks` and
//! `hangar task ID`.

use hangar_api::TaskView;

use crate::error::CliError;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct TasksArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct TaskArgs {
    id: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

const HEADER: [&str; 8] = [
    "TASK", "KIND", "SERVICE", "VM", "STATE", "STAGE", "%", "ERROR",
];

/// `hangar tasks`: recent tasks.
pub async fn list(client: &Client, args: TasksArgs) -> Result<(), CliError> {
    let tasks = client.tasks().await?;
    if args.json {
        return print_json(&tasks);
    }
    let rows = tasks.iter().map(task_row);
    table::print(&HEADER, rows);
    Ok(())
}

/// `hangar task ID`: one task, with its stage, progress and error.
pub async fn show(client: &Client, args: TaskArgs) -> Result<(), CliError> {
    let task = client.task(&args.id).await?;
    if args.json {
        return print_json(&task);
    }
    table::print(&HEADER, [task_row(&task)]);
    Ok(())
}

fn task_row(task: &TaskView) -> Vec<String> {
    vec![
        task.id.clone(),
        task.kind.clone(),
        task.service.clone().unwrap_or_default(),
        task.vm.clone().unwrap_or_default(),
        task.state.clone(),
        task.stage.clone(),
        task.percent.to_string(),
        task.error.clone().unwrap_or_default(),
    ]
}
