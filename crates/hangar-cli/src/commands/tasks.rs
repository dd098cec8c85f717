//! Tasks (VM creation, pool fills, image builds and other long operations): `hangar tasks`,
//! `hangar task show ID`, `hangar task wait ID` and `hangar task cancel ID`.

use std::time::Duration;

use hangar_api::TaskView;

use crate::error::CliError;
use crate::output::progress::Progress;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct TasksArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum TaskCommand {
    /// One task: its owner, stage, progress, error and steps.
    Show(TaskArgs),
    /// Wait for a task to end, showing its progress (a bar on a terminal, a line per stage
    /// otherwise); exits non-zero when it failed or was cancelled.
    Wait(TaskIdArg),
    /// Cancel a running task: its work stops and what it did is undone.
    Cancel(TaskIdArg),
}

#[derive(clap::Args)]
pub struct TaskArgs {
    id: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct TaskIdArg {
    id: String,
}

const HEADER: [&str; 9] = [
    "TASK", "KIND", "OWNER", "SERVICE", "VM", "STATE", "STAGE", "%", "ERROR",
];

/// How often `hangar task wait` asks.
const POLL: Duration = Duration::from_millis(250);

/// How often a task is asked about in its first [`QUICK_FOR`]: a task that ends in a few
/// seconds (a stack from templates, a clone) is seen ending within 50 ms, not 250.
const QUICK_POLL: Duration = Duration::from_millis(50);
const QUICK_FOR: Duration = Duration::from_secs(10);

/// `hangar tasks`: recent tasks (an admin's: everyone's; others: their own).
pub async fn list(client: &Client, args: TasksArgs) -> Result<(), CliError> {
    let tasks = client.tasks().await?;
    if args.json {
        return print_json(&tasks);
    }
    let rows = tasks.iter().map(task_row);
    table::print(&HEADER, rows);
    Ok(())
}

/// `hangar task ...`.
pub async fn run(client: &Client, command: TaskCommand) -> Result<(), CliError> {
    match command {
        TaskCommand::Show(args) => show(client, args).await,
        TaskCommand::Wait(arg) => wait(client, &arg.id).await,
        TaskCommand::Cancel(arg) => cancel(client, &arg.id).await,
    }
}

/// `hangar task show ID`: one task and its steps.
async fn show(client: &Client, args: TaskArgs) -> Result<(), CliError> {
    let task = client.task(&args.id).await?;
    if args.json {
        return print_json(&task);
    }
    table::print(&HEADER, [task_row(&task)]);
    if !task.steps.is_empty() {
        println!();
        let rows = task.steps.iter().map(|step| {
            vec![
                step.step.to_string(),
                step.stage.clone(),
                step.percent.to_string(),
                step.started_at.clone(),
                step.ended_at.clone().unwrap_or_default(),
                step.outcome.clone().unwrap_or_else(|| "running".into()),
                step.error.clone().unwrap_or_default(),
            ]
        });
        table::print(
            &["STEP", "STAGE", "%", "STARTED", "ENDED", "OUTCOME", "ERROR"],
            rows,
        );
    }
    Ok(())
}

/// `hangar task wait ID`: progress until the task ends; an error unless it succeeded.
async fn wait(client: &Client, id: &str) -> Result<(), CliError> {
    ended(&follow(client, id).await?)
}

/// A task started with `--no-wait`: its id, or with `json` the task as it is now.
pub async fn print_started(client: &Client, id: &str, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(&client.task(id).await?);
    }
    println!("{id}");
    Ok(())
}

/// Shows task `id`'s progress on stderr (a bar on a terminal, a line per stage otherwise)
/// until it ends; returns it as it ended.
pub async fn follow(client: &Client, id: &str) -> Result<TaskView, CliError> {
    let mut progress = Progress::start();
    let started = std::time::Instant::now();
    loop {
        let task = client.task(id).await?;
        progress.update(
            u64::from(task.percent),
            &format!("{} {}", task.state, task.stage),
        );
        if task.ended() {
            progress.finish();
            return Ok(task);
        }
        let poll = if started.elapsed() < QUICK_FOR {
            QUICK_POLL
        } else {
            POLL
        };
        tokio::time::sleep(poll).await;
    }
}

/// A task's end as the command's outcome.
fn ended(task: &TaskView) -> Result<(), CliError> {
    match task.state.as_str() {
        "succeeded" => {
            println!("task {} succeeded{}", task.id, vm_note(task));
            Ok(())
        }
        state => Err(CliError::Failed(format!(
            "task {} {state}: {}",
            task.id,
            task.error.as_deref().unwrap_or("no reason recorded")
        ))),
    }
}

fn vm_note(task: &TaskView) -> String {
    task.vm
        .as_ref()
        .map(|vm| format!(" (VM {vm})"))
        .unwrap_or_default()
}

/// `hangar task cancel ID`: asks for the cancel and waits until the task's steps are
/// undone.
async fn cancel(client: &Client, id: &str) -> Result<(), CliError> {
    client.cancel_task(id).await?;
    loop {
        let task = client.task(id).await?;
        if task.ended() {
            println!("task {id} {}", task.state);
            return match task.state.as_str() {
                "cancelled" => Ok(()),
                // It ended on its own before the cancel reached it.
                _ => ended(&task),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

fn task_row(task: &TaskView) -> Vec<String> {
    vec![
        task.id.clone(),
        task.kind.clone(),
        task.owner.clone(),
        task.service.clone().unwrap_or_default(),
        task.vm.clone().unwrap_or_default(),
        task.state.clone(),
        task.stage.clone(),
        task.percent.to_string(),
        task.error.clone().unwrap_or_default(),
    ]
}
