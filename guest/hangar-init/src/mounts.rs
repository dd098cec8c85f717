//! Filesystem mounts: the kernel API filesystems for init itself and inside the root.

use std::io;
use std::path::Path;

use crate::sys::{check, cstring};

/// One mount to make.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: Option<&'static str>,
}

/// The filesystems init needs before anything else, in order.
const EARLY: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some("mode=1777"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some("mode=1777"),
    },
];

/// Mounts proc, sysfs, devtmpfs, devpts and the tmpfs directories. Returns the errors
/// (already-mounted targets are not errors); boot continues regardless.
pub fn early_mounts() -> Vec<String> {
    EARLY
        .iter()
        .filter_map(|m| {
            mount_at(m, Path::new(m.target))
                .err()
                .map(|e| format!("{}: {e}", m.target))
        })
        .collect()
}

/// Mounts fresh proc, sysfs, tmpfs `/run` and `/tmp`, and a recursive bind of `/dev`
/// inside `root`, creating the mount points when the image lacks them.
pub fn mount_api_filesystems(root: &Path) -> io::Result<()> {
    for m in EARLY.iter().filter(|m| !m.target.starts_with("/dev/")) {
        let target = root.join(m.target.trim_start_matches('/'));
        std::fs::create_dir_all(&target)?;
        if m.target == "/dev" {
            mount("/dev", &target, None, libc::MS_BIND | libc::MS_REC, None)
        } else {
            mount_at(m, &target)
        }
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", target.display())))?;
    }
    Ok(())
}

fn mount_at(m: &Mount, target: &Path) -> io::Result<()> {
    if let Err(e) = std::fs::create_dir_all(target) {
        return Err(io::Error::new(e.kind(), format!("mkdir: {e}")));
    }
    match mount(m.source, target, Some(m.fstype), m.flags, m.data) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(&target.to_string_lossy())?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.map(cstring).transpose()?;
    // SAFETY: every pointer is either null (allowed for fstype and data) or points to a
    // NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    };
    check(ret).map(|_| ())
}
