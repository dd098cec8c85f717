//! Images: `hangar build` builds a service's image with progress, `hangar images` lists
//! images and the layers they share.

use std::time::Duration;

use hangar_api::{BuildView, ImageBody};

use super::parse_env;
use crate::error::CliError;
use crate::output::progress::Progress;
use crate::output::{print_json, table};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct BuildArgs {
    service: String,
    /// Environment: os=NAME.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Start the build and print its task id without waiting.
    #[arg(long)]
    no_wait: bool,
}

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// `hangar build`: starts the build, then (unless `--no-wait`) follows its task until it
/// succeeds or fails.
pub async fn build(client: &Client, args: BuildArgs) -> Result<(), CliError> {
    let BuildArgs {
        service,
        env,
        no_wait,
    } = args;
    let body = ImageBody {
        service: service.clone(),
        env: env.into_iter().collect(),
    };
    let BuildView { task } = client.build_image(&body).await?;
    if no_wait {
        println!("{task}");
        return Ok(());
    }
    let mut progress = Progress::start();
    loop {
        let task = client.task(&task).await?;
        progress.update(u64::from(task.percent), &task.stage);
        match task.state.as_str() {
            "succeeded" => {
                progress.finish();
                println!(
                    "built {service} in {:.1} s",
                    progress.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            "failed" => {
                progress.finish();
                return Err(CliError::Reply(format!(
                    "build of {service} failed: {}",
                    task.error.unwrap_or_default()
                )));
            }
            "cancelled" => {
                progress.finish();
                return Err(CliError::Reply(format!(
                    "build of {service} was cancelled: {}",
                    task.error.unwrap_or_default()
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// `hangar images`: a table of images, one of layers, and the layers' disk use.
pub async fn list(client: &Client, args: ImagesArgs) -> Result<(), CliError> {
    let images = client.images().await?;
    if args.json {
        return print_json(&images);
    }
    let mb = |bytes: u64| format!("{:.1} MB", bytes as f64 / 1e6);
    let when = |ms: Option<u64>| {
        ms.map(|ms| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        })
        .unwrap_or_else(|| "never".into())
    };
    let short = |hash: &str| hash.chars().take(12).collect::<String>();
    let rows = images.images.iter().map(|i| {
        vec![
            i.service.clone(),
            i.os.clone(),
            if i.format == "disk" {
                "disk".into()
            } else if i.built {
                "built".into()
            } else {
                "not built".into()
            },
            i.layers
                .iter()
                .map(|hash| short(hash))
                .collect::<Vec<_>>()
                .join(" "),
            mb(i.size_bytes),
            i.users.len().to_string(),
            when(i.last_used_ms),
            if i.promoted {
                "yes".into()
            } else {
                String::new()
            },
        ]
    });
    table::print(
        &[
            "SERVICE",
            "OS",
            "STATE",
            "LAYERS",
            "SIZE",
            "USERS",
            "LAST USED",
            "PROMOTED",
        ],
        rows,
    );
    println!();
    let rows = images.layers.iter().map(|l| {
        vec![
            short(&l.hash),
            l.kind.clone(),
            l.name.clone(),
            short(l.parent.as_deref().unwrap_or_default()),
            mb(l.size_bytes),
            format!("{:.1} s", l.build_ms as f64 / 1e3),
            l.users.len().to_string(),
            when(l.last_used_ms),
            l.images.join(","),
        ]
    });
    table::print(
        &[
            "LAYER",
            "KIND",
            "NAME",
            "PARENT",
            "SIZE",
            "BUILD",
            "USERS",
            "LAST USED",
            "IMAGES",
        ],
        rows,
    );
    println!(
        "layers on disk: {} of a {} budget",
        mb(images.total_bytes),
        mb(images.budget_bytes)
    );
    Ok(())
}
