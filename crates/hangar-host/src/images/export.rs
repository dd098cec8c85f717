//! `hangar export`: a self-contained image of a service that boots with plain QEMU (seed
//! 003's export of a VM for use elsewhere).
//!
//! The export is a directory (sent as a tar file) holding:
//!
//! | file | what |
//! |---|---|
//! | `vmlinux` | the guest kernel (PVH boot on QEMU's `microvm`) |
//! | `initramfs.cpio` | hangar-init, busybox and modules, plus `/hangar/standalone.json`: the VM's configuration, which hangar-init applies without a host |
//! | `disk.qcow2` | the root filesystem: every layer flattened into one ext4 disk |
//! | `hangar-export.json` | how to boot it: files, memory, vCPUs, kernel command line, ports, a QEMU command line |
//! | `run.sh` | that command line |

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hangar_image::layers;
use hangar_image::{CpioEntry, GuestAssets, write_newc};

use crate::images::ExportInfo;

/// Everything an export is made of.
pub(crate) struct ExportJob<'a> {
    pub cache_dir: &'a Path,
    pub assets: &'a GuestAssets,
    /// The layer chain, bottom first (empty for a single-disk root).
    pub layer_hashes: &'a [String],
    /// The root disk, for single-disk roots.
    pub single_disk: Option<PathBuf>,
    pub standalone: &'a hangar_proto::GuestConfig,
    pub dir: &'a Path,
    pub service: &'a str,
    pub os: &'a str,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub ports: BTreeMap<String, u16>,
}

/// Host ports of the command line in `hangar-export.json`: guest port + this.
pub const EXPORT_PORT_OFFSET: u16 = 10000;

pub(crate) fn write_export(job: ExportJob<'_>) -> Result<ExportInfo, String> {
    let io = |what: String| move |e: std::io::Error| format!("{what}: {e}");
    std::fs::create_dir_all(job.dir).map_err(io(format!("mkdir {}", job.dir.display())))?;
    std::fs::copy(&job.assets.vmlinux, job.dir.join("vmlinux"))
        .map_err(io("copy the kernel".into()))?;

    // The guest's initramfs, with its configuration appended as a second cpio archive
    // (the kernel unpacks concatenated archives in order).
    let mut initramfs =
        std::fs::read(&job.assets.initramfs).map_err(io("read the initramfs".into()))?;
    let config = serde_json::to_vec_pretty(job.standalone).map_err(|e| e.to_string())?;
    let path = hangar_proto::STANDALONE_CONFIG.trim_start_matches('/');
    let dir = Path::new(path)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let entries = [
        CpioEntry::Dir {
            path: format!("/{dir}"),
            mode: 0o755,
        },
        CpioEntry::File {
            path: hangar_proto::STANDALONE_CONFIG.into(),
            mode: 0o600,
            data: Cow::Owned(config),
        },
    ];
    initramfs = write_newc(&entries, initramfs).map_err(io("append the configuration".into()))?;
    std::fs::write(job.dir.join("initramfs.cpio"), &initramfs)
        .map_err(io("write the initramfs".into()))?;

    let disk = job.dir.join("disk.qcow2");
    if let Some(single) = &job.single_disk {
        let qemu_img = which("qemu-img")?;
        let output = std::process::Command::new(qemu_img)
            .args(["convert", "-O", "qcow2"])
            .arg(single)
            .arg(&disk)
            .output()
            .map_err(io("run qemu-img".into()))?;
        if !output.status.success() {
            return Err(format!(
                "qemu-img convert: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    } else {
        let chain: Vec<layers::Layer> = job
            .layer_hashes
            .iter()
            .map(|hash| {
                layers::cached_layer(job.cache_dir, hash)
                    .ok_or_else(|| format!("layer {hash} is not in the cache"))
            })
            .collect::<Result<_, _>>()?;
        layers::flatten(job.cache_dir, &chain, &disk)
            .map_err(|err| crate::local::error_chain(&err))?;
    }

    let cmdline = hangar_image::kernel_cmdline(hangar_image::host_tsc_khz());
    let hostfwd: String = job
        .ports
        .values()
        .map(|guest| {
            format!(
                ",hostfwd=tcp:127.0.0.1:{}-:{guest}",
                guest.saturating_add(EXPORT_PORT_OFFSET)
            )
        })
        .collect();
    let qemu: Vec<String> = [
        "qemu-system-x86_64",
        "-M",
        "microvm,acpi=on,isa-serial=on,rtc=on",
        "-accel",
        "tcg",
        "-m",
        &job.memory_mib.to_string(),
        "-smp",
        &job.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        "vmlinux",
        "-initrd",
        "initramfs.cpio",
        "-append",
        &cmdline,
        "-drive",
        "id=root,file=disk.qcow2,format=qcow2,if=none",
        "-device",
        &format!(
            "virtio-blk-device,drive=root,serial={}",
            hangar_vmm::ROOT_SERIAL
        ),
        "-netdev",
        &format!("user,id=n0{hostfwd}"),
        "-device",
        "virtio-net-device,netdev=n0",
        "-device",
        "virtio-rng-device",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let info = ExportInfo {
        service: job.service.to_owned(),
        os: job.os.to_owned(),
        kernel: "vmlinux".into(),
        initramfs: "initramfs.cpio".into(),
        disk: "disk.qcow2".into(),
        cmdline,
        vcpus: job.vcpus,
        memory_mib: job.memory_mib,
        ports: job.ports.clone(),
        qemu: qemu.clone(),
    };
    std::fs::write(
        job.dir.join("hangar-export.json"),
        serde_json::to_vec_pretty(&info).map_err(|e| e.to_string())?,
    )
    .map_err(io("write hangar-export.json".into()))?;
    let script = format!(
        "#!/bin/sh\n# Boots {} ({}) with plain QEMU; ports are forwarded to 127.0.0.1:<guest port + {EXPORT_PORT_OFFSET}>.\ncd \"$(dirname \"$0\")\"\nexec {}\n",
        job.service,
        job.os,
        qemu.iter()
            .map(|arg| shell_quote(arg))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let run = job.dir.join("run.sh");
    std::fs::write(&run, script).map_err(io("write run.sh".into()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod run.sh".into()))?;
    Ok(info)
}

fn which(tool: &str) -> Result<PathBuf, String> {
    ["/usr/bin", "/usr/local/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{tool} not found"))
}

/// Single-quotes `arg` for sh unless it is plain.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,.:/@+".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
