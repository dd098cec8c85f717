//! `hangar export`: a self-contained image of a service, as a tar that boots with plain
//! `qemu-system-x86_64`.

use std::io::IsTerminal;
use std::path::PathBuf;

use hangar_api::ImageBody;

use super::parse_env;
use crate::client::{Client, ClientError};

#[derive(clap::Args)]
pub struct ExportArgs {
    service: String,
    file: PathBuf,
    /// Environment (os=NAME) and the service's settings, baked into the export.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
}

/// Writes the export to `file` (through `file.partial`, removed on failure).
pub async fn run(client: &Client, args: ExportArgs) -> Result<(), ClientError> {
    let ExportArgs { service, file, env } = args;
    let body = ImageBody {
        service: service.clone(),
        env: env.into_iter().collect(),
    };
    if std::io::stderr().is_terminal() {
        eprintln!("exporting {service} (builds the image first if needed)...");
    }
    let written = client.download("/v1/export", &body, &file).await?;
    println!(
        "{}: {:.1} MB (tar: vmlinux, initramfs.cpio, disk.qcow2, hangar-export.json, run.sh)",
        file.display(),
        written as f64 / 1e6
    );
    Ok(())
}
