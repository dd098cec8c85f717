//! Debian's libvirt for the comparison: installed when missing, its daemons started for a
//! run when not running (and stopped after it), `/dev/kvm` made usable by its QEMU.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::server::socket_answers;

const LIBVIRTD_SOCKET: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCKET: &str = "/run/libvirt/virtlogd-sock";

/// Installs Debian's libvirt when `virsh` or `libvirtd` is missing. Returns what it did.
pub fn install_if_missing() -> Result<Option<String>, String> {
    let have = |program: &str| {
        std::process::Command::new("sh")
            .args([
                "-c",
                &format!("command -v {program} || test -x /usr/sbin/{program}"),
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("virsh") && have("libvirtd") && have("virtlogd") {
        return Ok(None);
    }
    let packages = ["libvirt-daemon-system", "libvirt-clients"];
    eprintln!("installing {} ...", packages.join(" "));
    let root = is_root();
    let apt = |args: &[&str]| {
        let mut command = if root {
            std::process::Command::new("apt-get")
        } else {
            let mut sudo = std::process::Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|err| format!("apt-get: {err}"))
            .and_then(|out| {
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "apt-get {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
            })
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(packages);
    apt(&install)?;
    Ok(Some(format!("installed {}", packages.join(" "))))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The libvirt daemons this benchmark started; stopped when dropped. Daemons that were
/// already running are left alone. Also what the set-up changed of `/dev/kvm`, put back
/// when dropped.
pub struct Daemons {
    started: Vec<(&'static str, PathBuf)>,
    kvm: Option<KvmAccess>,
}

/// `/dev/kvm` as it was before the set-up gave it to the `kvm` group.
struct KvmAccess {
    gid: u32,
    mode: u32,
}

const KVM: &str = "/dev/kvm";

/// Gives `/dev/kvm` to the `kvm` group, read-write (Debian's udev rule, which machines
/// without udev lack), when it exists and that group cannot use it. libvirt runs QEMU as
/// `libvirt-qemu` (group `kvm`); when that user cannot open `/dev/kvm`, libvirt judges the
/// QEMU capabilities it probed (with KVM) stale at every look-up and probes QEMU again,
/// several times per domain start: tens of seconds that are no part of what libvirt costs
/// on a machine set up as Debian sets it up. Returns how it was, to put back.
fn give_kvm_to_group() -> Result<Option<KvmAccess>, String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(KVM) else {
        return Ok(None);
    };
    let Some(kvm_gid) = std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|groups| {
            groups
                .lines()
                .find_map(|l| l.strip_prefix("kvm:"))
                .and_then(|rest| rest.split(':').nth(1)?.parse::<u32>().ok())
        })
    else {
        return Ok(None);
    };
    let mode = meta.mode() & 0o7777;
    if meta.gid() == kvm_gid && mode & 0o060 == 0o060 {
        return Ok(None);
    }
    std::os::unix::fs::chown(KVM, None, Some(kvm_gid)).map_err(|err| format!("{KVM}: {err}"))?;
    std::fs::set_permissions(KVM, std::fs::Permissions::from_mode(mode | 0o060))
        .map_err(|err| format!("{KVM}: {err}"))?;
    Ok(Some(KvmAccess {
        gid: meta.gid(),
        mode,
    }))
}

impl Daemons {
    /// Starts `virtlogd` and `libvirtd` as daemons (pid files in `dir`) unless they answer
    /// on their sockets already, and waits until they do.
    pub fn ensure(dir: &Path) -> Result<Daemons, String> {
        let mut daemons = Daemons {
            started: Vec::new(),
            kvm: give_kvm_to_group()?,
        };
        for (name, socket) in [("virtlogd", VIRTLOGD_SOCKET), ("libvirtd", LIBVIRTD_SOCKET)] {
            if socket_answers(Path::new(socket)) {
                continue;
            }
            let pidfile = dir.join(format!("{name}.pid"));
            let program = if Path::new("/usr/sbin").join(name).exists() {
                Path::new("/usr/sbin").join(name)
            } else {
                PathBuf::from(name)
            };
            let status = std::process::Command::new(&program)
                .arg("-d")
                .arg("-p")
                .arg(&pidfile)
                .stdin(std::process::Stdio::null())
                .status()
                .map_err(|err| format!("cannot start {name}: {err}"))?;
            if !status.success() {
                return Err(format!("{name} -d exited with {status}"));
            }
            daemons.started.push((name, pidfile));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !socket_answers(Path::new(socket)) {
                if Instant::now() > deadline {
                    return Err(format!("{name} did not listen on {socket} within 30 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("started {name}");
        }
        Ok(daemons)
    }

    pub fn started(&self) -> Vec<&'static str> {
        self.started.iter().map(|(name, _)| *name).collect()
    }

    /// Whether the set-up gave `/dev/kvm` to the `kvm` group for the run.
    pub fn changed_kvm(&self) -> bool {
        self.kvm.is_some()
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        // libvirtd first: it holds virtlogd's connections.
        for (name, pidfile) in self.started.iter().rev() {
            let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let ours = hangar_vmm::procs::cmdline(pid)
                .and_then(|args| args.first().cloned())
                .is_some_and(|program| program.ends_with(name));
            if !ours {
                continue;
            }
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is a daemon this
            // benchmark started (read from its own pid file and checked by name).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while hangar_vmm::procs::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if hangar_vmm::procs::alive(pid) {
                // SAFETY: as above.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            eprintln!("stopped {name}");
        }
        if let Some(kvm) = &self.kvm {
            let _ = std::os::unix::fs::chown(KVM, None, Some(kvm.gid));
            let _ = std::fs::set_permissions(KVM, std::fs::Permissions::from_mode(kvm.mode));
        }
    }
}
