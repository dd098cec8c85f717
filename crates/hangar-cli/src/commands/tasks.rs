//! Tasks (VM creation, image builds and other long operations): `hangar tasks` and
//! `hangar task ID`.

use crate::client::{Client, ClientError};
use crate::output::{print_json, table, text};

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
pub async fn list(client: &Client, args: TasksArgs) -> Result<(), ClientError> {
    let tasks: serde_json::Value = client.get("/v1/tasks").await?;
    if args.json {
        return print_json(&tasks);
    }
    let rows = tasks.as_array().into_iter().flatten().map(task_row);
    table::print(&HEADER, rows);
    Ok(())
}

/// `hangar task ID`: one task, with its stage, progress and error.
pub async fn show(client: &Client, args: TaskArgs) -> Result<(), ClientError> {
    let task: serde_json::Value = client.get(&format!("/v1/tasks/{}", args.id)).await?;
    if args.json {
        return print_json(&task);
    }
    table::print(&HEADER, [task_row(&task)]);
    Ok(())
}

fn task_row(task: &serde_json::Value) -> Vec<String> {
    vec![
        text(&task["id"]),
        text(&task["kind"]),
        text(&task["service"]),
        text(&task["vm"]),
        text(&task["state"]),
        text(&task["stage"]),
        task["percent"].to_string(),
        text(&task["error"]),
    ]
}
