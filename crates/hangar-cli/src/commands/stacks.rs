//! `hangar stack up FILE`, `hangar stack ls`, `hangar stack show NAME`, `hangar stack down
//! NAME`, `hangar stack sleep|archive|wake NAME`: several services as one unit, each member
//! its own VM on the stack's private segment (see `examples/shop.toml`).

use hangar_api::{StackSpec, StackView};

use crate::error::CliError;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Subcommand)]
pub enum StackCommand {
    /// Make a stack from a stack file (TOML), showing progress; prints its name, members
    /// and public endpoints. Exits non-zero (and leaves nothing) when a member fails.
    #[command(
        after_help = "Example:\n  hangar stack up examples/shop.toml\n  curl http://$(hangar stack show shop --json | jq -r '.members[] | select(.name==\"front\") | .endpoints.http')/"
    )]
    Up(UpArgs),
    /// Your stacks (an admin's: every stack): state, segment, members.
    Ls(JsonArg),
    /// One stack: each member's VM, state, private address and public endpoints.
    Show(NameArgs),
    /// Delete a stack: every member's VM and the stack.
    Down(NameArgs),
    /// Put every member to sleep (paused in memory), the front first.
    Sleep(NameArgs),
    /// Archive every member (memory to disk), the front first.
    Archive(NameArgs),
    /// Wake every member, peers first and the front last. A connection to a sleeping
    /// stack's public endpoint does the same.
    Wake(NameArgs),
}

#[derive(clap::Args)]
pub struct UpArgs {
    /// The stack file (TOML): `name`, then `[member.NAME]` tables with `service`,
    /// `public`, `env` (may refer to peers: `{{ peers.NAME.address }}`) and `egress`.
    file: std::path::PathBuf,
    /// Start it and print the task id without waiting.
    #[arg(long)]
    no_wait: bool,
    /// Print the stack as JSON once it is up.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct NameArgs {
    /// The stack.
    name: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, command: StackCommand) -> Result<(), CliError> {
    match command {
        StackCommand::Up(args) => up(client, args).await,
        StackCommand::Ls(args) => {
            let stacks = client.stacks().await?;
            if args.json {
                return print_json(&stacks);
            }
            table::print(
                &["STACK", "OWNER", "STATE", "SEGMENT", "MEMBERS", "ENDPOINTS"],
                stacks.iter().map(|s| {
                    vec![
                        s.name.clone(),
                        s.owner.clone(),
                        wire(&s.state),
                        s.segment.clone(),
                        s.members.len().to_string(),
                        endpoints(s).join(" "),
                    ]
                }),
            );
            Ok(())
        }
        StackCommand::Show(args) => print_stack(&client.stack(&args.name).await?, args.json),
        StackCommand::Down(args) => {
            let stack = client.stack_down(&args.name).await?;
            if args.json {
                return print_json(&stack);
            }
            println!(
                "stack {} down: {} members deleted",
                stack.name,
                stack.members.len()
            );
            Ok(())
        }
        StackCommand::Sleep(args) => print_stack(&client.stack_sleep(&args.name).await?, args.json),
        StackCommand::Archive(args) => {
            print_stack(&client.stack_archive(&args.name).await?, args.json)
        }
        StackCommand::Wake(args) => print_stack(&client.stack_wake(&args.name).await?, args.json),
    }
}

/// `hangar stack up FILE`: the file read and sent, the task followed, the stack printed.
async fn up(client: &Client, args: UpArgs) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|err| CliError::Usage(format!("{}: {err}", args.file.display())))?;
    let spec = StackSpec::from_toml(&text)
        .map_err(|err| CliError::Usage(format!("{}: {err}", args.file.display())))?;
    let started = std::time::Instant::now();
    let accepted = client.stack_up(&spec).await?;
    if args.no_wait {
        return super::tasks::print_started(client, &accepted.task, args.json).await;
    }
    let task = super::tasks::follow(client, &accepted.task).await?;
    if task.state != "succeeded" {
        return Err(CliError::Failed(format!(
            "stack {} {}: {} (task {}; nothing is left of it)",
            spec.name,
            task.state,
            task.error.as_deref().unwrap_or("no reason recorded"),
            task.id
        )));
    }
    let stack = client.stack(&spec.name).await?;
    if args.json {
        return print_json(&stack);
    }
    print_stack(&stack, false)?;
    eprintln!(
        "stack {} up in {:.1} s (task {})",
        stack.name,
        started.elapsed().as_secs_f64(),
        task.id
    );
    Ok(())
}

fn wire(value: &impl serde::Serialize) -> String {
    crate::output::wire_name(value)
}

/// `member/port=address` for each public endpoint.
fn endpoints(stack: &StackView) -> Vec<String> {
    stack
        .members
        .iter()
        .flat_map(|m| {
            m.endpoints
                .iter()
                .map(move |(port, addr)| format!("{}/{port}={addr}", m.name))
        })
        .collect()
}

fn print_stack(stack: &StackView, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(stack);
    }
    println!(
        "stack {} ({}, segment {}, owner {})",
        stack.name,
        wire(&stack.state),
        stack.segment,
        stack.owner
    );
    table::print(
        &[
            "MEMBER",
            "SERVICE",
            "VM",
            "STATE",
            "ADDRESS",
            "PEERS",
            "ENDPOINTS",
        ],
        stack.members.iter().map(|m| {
            vec![
                m.name.clone(),
                m.service.clone(),
                m.vm.clone().unwrap_or_default(),
                m.state.clone().unwrap_or_default(),
                m.address.clone(),
                m.peers.join(","),
                m.endpoints
                    .iter()
                    .map(|(port, addr)| format!("{port}={addr}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        }),
    );
    Ok(())
}
