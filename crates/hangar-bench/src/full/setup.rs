//! What the full run needs before it measures: libvirt (installed, its daemons running)
//! and the guest hangar boots, for libvirt to boot the same.

use hangar_server::images::ImageSource;
use hangar_vmm::Accel;

use super::FullBench;
use crate::libvirt;
use crate::report::Report;
use crate::server::ServerOptions;

/// Sets libvirt up (installed, daemons started) unless told not to; `None`, with a note in
/// the report, when it cannot be.
pub(super) async fn libvirt_setup(
    args: &FullBench,
    report: &mut Report,
) -> Option<(libvirt::Daemons, tempfile::TempDir)> {
    if args.no_libvirt {
        report
            .notes
            .push("libvirt: not measured (--no-libvirt)".into());
        return None;
    }
    let setup = tokio::task::spawn_blocking(|| {
        let installed = libvirt::install_if_missing()?;
        let dir = tempfile::Builder::new()
            .prefix("hglvd")
            .tempdir_in("/tmp")
            .map_err(|err| err.to_string())?;
        let daemons = libvirt::Daemons::ensure(dir.path())?;
        Ok::<_, String>((installed, daemons, dir))
    })
    .await
    .map_err(|err| err.to_string())
    .and_then(|done| done);
    match setup {
        Ok((installed, daemons, dir)) => {
            if let Some(installed) = installed {
                report.notes.push(format!("libvirt: {installed}"));
            }
            if daemons.changed_kvm() {
                report.notes.push(
                    "libvirt: /dev/kvm was given to group kvm, read-write, for the run (Debian's udev rule; without it libvirt probes QEMU again at every domain start), and put back after it".into(),
                );
            }
            let started = daemons.started();
            report.notes.push(if started.is_empty() {
                "libvirt: libvirtd and virtlogd were already running".into()
            } else {
                format!(
                    "libvirt: started {} for this run, stopped after it",
                    started.join(" and ")
                )
            });
            Some((daemons, dir))
        }
        Err(err) => {
            eprintln!("libvirt is not available: {err}");
            report
                .notes
                .push(format!("libvirt: not measured, set-up failed: {err}"));
            None
        }
    }
}

/// The guest hangar boots for the service, for libvirt to boot too.
pub(super) async fn libvirt_guest(
    args: &FullBench,
    options: &ServerOptions,
    accel: Accel,
) -> Result<libvirt::Guest, String> {
    let catalog =
        hangar_server::load_catalog(args.catalog.as_deref()).map_err(|e| e.to_string())?;
    let service = catalog
        .get(&args.service)
        .cloned()
        .ok_or_else(|| format!("no service {} in the catalog", args.service))?;
    let images = hangar_server::images::LocalImages::new(
        options.cache_dir()?,
        hangar_image::AssetSources::default(),
        std::sync::Arc::new(catalog.clone()),
        hangar_server::images::DEFAULT_MIRROR.to_owned(),
    );
    let chain =
        |err: hangar_server::images::ImageSourceError| hangar_server::error::error_chain(&err);
    let assets = images.guest_assets().await.map_err(chain)?;
    let root = images
        .root_image(&service, &service.os, std::sync::Arc::new(|_, _| {}))
        .await
        .map_err(chain)?;
    if !root.layers.is_empty() {
        return Err(format!(
            "{} has a layered root; the libvirt comparison boots single-disk guests",
            service.name
        ));
    }
    let base_image = root.base.ok_or("the service has no root image")?;
    Ok(libvirt::Guest {
        service,
        kernel: assets.vmlinux,
        initramfs: assets.initramfs,
        // As the server does: the guest is told the host's TSC rate.
        cmdline: hangar_image::kernel_cmdline(hangar_image::host_tsc_khz()),
        base_image,
        accel,
    })
}
