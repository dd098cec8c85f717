//! `hangar export`: a self-contained image of a service, as a tar that boots with plain
//! `qemu-system-x86_64`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use hangar_api::ImageBody;

use super::parse_env;
use crate::error::CliError;
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct ExportArgs {
    service: String,
    file: PathBuf,
    /// Environment (os=NAME) and the service's settings, baked into the export.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
}

/// Writes the export to `file` (through `file.partial`, removed on failure).
pub async fn run(client: &Client, args: ExportArgs) -> Result<(), CliError> {
    let ExportArgs { service, file, env } = args;
    let body = ImageBody {
        service: service.clone(),
        env: env.into_iter().collect(),
    };
    if std::io::stderr().is_terminal() {
        eprintln!("exporting {service} (builds the image first if needed)...");
    }
    let written = download(client, &body, &file).await?;
    println!(
        "{}: {:.1} MB (tar: vmlinux, initramfs.cpio, disk.qcow2, hangar-export.json, run.sh)",
        file.display(),
        written as f64 / 1e6
    );
    Ok(())
}

/// Receives the export into `dest` (through `dest.partial`, removed on failure); returns
/// how many bytes were written.
async fn download(client: &Client, body: &ImageBody, dest: &Path) -> Result<u64, CliError> {
    let mut download = client.export(body).await?;
    let partial = dest.with_extension("partial");
    let cannot_write = |path: &Path, err: std::io::Error| {
        CliError::Usage(format!("cannot write {}: {err}", path.display()))
    };
    let mut file = std::fs::File::create(&partial).map_err(|err| cannot_write(&partial, err))?;
    let mut written = 0u64;
    let result = async {
        while let Some(chunk) = download.chunk().await? {
            file.write_all(&chunk)
                .map_err(|err| cannot_write(&partial, err))?;
            written += chunk.len() as u64;
        }
        file.sync_all().map_err(|err| cannot_write(&partial, err))?;
        std::fs::rename(&partial, dest).map_err(|err| cannot_write(dest, err))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map(|()| written)
}
