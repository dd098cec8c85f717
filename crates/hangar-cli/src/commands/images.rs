//! Images: `hangar build` builds a service's image with progress, `hangar images` lists
//! images and the layers they share.

use std::time::Duration;

use super::parse_env;
use crate::client::{Client, ClientError};
use crate::output::progress::Progress;
use crate::output::{print_json, table, text};

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
pub async fn build(client: &Client, args: BuildArgs) -> Result<(), ClientError> {
    let BuildArgs {
        service,
        env,
        no_wait,
    } = args;
    let body = serde_json::json!({
        "service": service,
        "env": env.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    });
    let answer: serde_json::Value = client.post("/v1/images", &body).await?;
    let task = text(&answer["task"]);
    if no_wait {
        println!("{task}");
        return Ok(());
    }
    let mut progress = Progress::start();
    loop {
        let task: serde_json::Value = client.get(&format!("/v1/tasks/{task}")).await?;
        progress.update(task["percent"].as_u64().unwrap_or(0), &text(&task["stage"]));
        match task["state"].as_str() {
            Some("succeeded") => {
                progress.finish();
                println!(
                    "built {service} in {:.1} s",
                    progress.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Some("failed") => {
                progress.finish();
                return Err(ClientError::Reply(format!(
                    "build of {service} failed: {}",
                    text(&task["error"])
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// `hangar images`: a table of images, one of layers, and the layers' disk use.
pub async fn list(client: &Client, args: ImagesArgs) -> Result<(), ClientError> {
    let images: serde_json::Value = client.get("/v1/images").await?;
    if args.json {
        return print_json(&images);
    }
    let mb = |v: &serde_json::Value| format!("{:.1} MB", v.as_f64().unwrap_or(0.0) / 1e6);
    let when = |v: &serde_json::Value| {
        v.as_u64()
            .map(|ms| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                    .to_string()
            })
            .unwrap_or_else(|| "never".into())
    };
    let short = |v: &serde_json::Value| text(v).chars().take(12).collect::<String>();
    let rows = images["images"].as_array().into_iter().flatten().map(|i| {
        vec![
            text(&i["service"]),
            text(&i["os"]),
            if i["format"] == "disk" {
                "disk".into()
            } else if i["built"].as_bool().unwrap_or(false) {
                "built".into()
            } else {
                "not built".into()
            },
            i["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(short)
                .collect::<Vec<_>>()
                .join(" "),
            mb(&i["size_bytes"]),
            i["users"].as_array().map_or(0, Vec::len).to_string(),
            when(&i["last_used_ms"]),
            if i["promoted"].as_bool().unwrap_or(false) {
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
    let rows = images["layers"].as_array().into_iter().flatten().map(|l| {
        vec![
            short(&l["hash"]),
            text(&l["kind"]),
            text(&l["name"]),
            short(&l["parent"]),
            mb(&l["size_bytes"]),
            format!("{:.1} s", l["build_ms"].as_f64().unwrap_or(0.0) / 1e3),
            l["users"].as_array().map_or(0, Vec::len).to_string(),
            when(&l["last_used_ms"]),
            l["images"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect::<Vec<_>>()
                .join(","),
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
        mb(&images["total_bytes"]),
        mb(&images["budget_bytes"])
    );
    Ok(())
}
