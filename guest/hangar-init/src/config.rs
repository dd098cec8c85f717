//! Applying a [`GuestConfig`](hangar_proto::GuestConfig): identity, network, root and
//! files. Services are in [`crate::services`].
//!
//! Errors are returned as strings: they go to the host verbatim in `Failed` / `Reply`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use hangar_proto::{FileWrite, Identity, NetworkConfig, RootConfig};

use crate::sys::check;

/// Where a configured root filesystem is mounted.
pub const SYSROOT: &str = "/sysroot";

/// `_IOW('R', 0x03, int[2])`: add entropy to the input pool, with credit.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// How long to wait for a device (block device, network interface) to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Hostname, wall clock, entropy. Also used by `Reidentify` after a resume or clone.
pub fn apply_identity(identity: &Identity) -> Result<(), String> {
    set_hostname(&identity.hostname)?;
    if identity.unix_time_ms > 0 {
        set_clock(identity.unix_time_ms)?;
    }
    let entropy = crate::hex::decode(&identity.entropy_hex).map_err(|e| format!("entropy: {e}"))?;
    if !entropy.is_empty() {
        add_entropy(&entropy)?;
    }
    Ok(())
}

fn set_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("hostname {name:?} must be 1 to 64 bytes"));
    }
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    check(ret).map_err(|e| format!("sethostname: {e}"))?;
    Ok(())
}

fn set_clock(unix_time_ms: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (unix_time_ms / 1000) as libc::time_t,
        tv_nsec: ((unix_time_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    let ret = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    check(ret).map_err(|e| format!("clock_settime: {e}"))?;
    Ok(())
}

/// Builds the `struct rand_pool_info` that RNDADDENTROPY takes: entropy bits, buffer
/// size in bytes, then the bytes (native endian ints).
pub fn rand_pool_info(bytes: &[u8]) -> Vec<u8> {
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // The kernel declares the buffer as __u32[]; pad to a whole number of words.
    while !info.len().is_multiple_of(4) {
        info.push(0);
    }
    info
}

fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    let info = rand_pool_info(bytes);
    // SAFETY: `info` is a complete rand_pool_info (header + buf_size bytes) that lives
    // for the call; the kernel only reads it.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    check(ret).map_err(|e| format!("RNDADDENTROPY: {e}"))?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    check(ret).map_err(|e| format!("RNDRESEEDCRNG: {e}"))?;
    Ok(())
}

/// The guest kernel keeps no TIME_WAIT sockets (`net.ipv4.tcp_max_tw_buckets` = 0): a
/// connection the guest closes first is gone at once.
///
/// TIME_WAIT guards a new connection against delayed segments of an old one with the same
/// addresses and ports. The guest's TCP peers are QEMU's user-mode network (an in-memory
/// link that delays nothing) and its segment's switch, and every connection from the host
/// reaches the guest from the one address of whoever connected (hangar's forwarder), so
/// the host reuses port pairs the guest still remembers. That is harmless while one
/// user-mode network instance numbers its connections upwards, but each new QEMU process
/// (a wake from an archive, a clone, a live migration's destination) starts its sequence
/// numbers low again: the guest then answers such a SYN with an ACK for the old connection,
/// and the user-mode network sends its SYN again only after its initial 6 s timeout. That
/// was the 6 s stall seen now and then after live migrations.
pub fn forget_closed_connections() -> Result<(), String> {
    let path = "/proc/sys/net/ipv4/tcp_max_tw_buckets";
    std::fs::write(path, "0").map_err(|e| format!("{path}: {e}"))
}

/// Address, link and default route. Waits for the interface to appear.
pub fn configure_network(network: &NetworkConfig) -> Result<(), String> {
    let sys = Path::new("/sys/class/net").join(&network.interface);
    wait_for(&sys).map_err(|()| format!("no network interface {}", network.interface))?;
    let (address, prefix) = crate::netdev::parse_cidr(&network.address)?;
    crate::netdev::set_up(&network.interface, true)?;
    crate::netdev::set_ipv4(&network.interface, address, prefix)?;
    if let Some(gateway) = &network.gateway {
        let gateway = gateway
            .parse()
            .map_err(|_| format!("not an IPv4 gateway: {gateway:?}"))?;
        crate::netdev::add_default_route(&network.interface, gateway)?;
    }
    Ok(())
}

/// The contents of `/etc/resolv.conf` for these name servers.
pub fn resolv_conf(dns: &[String]) -> String {
    dns.iter()
        .map(|server| format!("nameserver {server}\n"))
        .collect()
}

/// Writes `/etc/resolv.conf` into `root` when name servers are given.
pub fn write_resolv_conf(root: &Path, dns: &[String]) -> Result<(), String> {
    if dns.is_empty() {
        return Ok(());
    }
    write_file(
        root,
        &FileWrite {
            path: "/etc/resolv.conf".into(),
            contents: resolv_conf(dns),
            mode: 0o644,
        },
    )
}

/// Where the layers of a layered root are mounted.
const LAYERS_DIR: &str = "/layers";

/// Mounts the root at `at`, then the API filesystems inside it. A plain root is its
/// device, read-write. A layered root is an overlayfs of the read-only layers (top first)
/// with the device, read-write, as its upper layer (`data/`, `work/`).
pub fn mount_root(root: &RootConfig, at: &Path) -> Result<(), String> {
    let device = wait_for_device(&root.device)?;
    std::fs::create_dir_all(at).map_err(|e| format!("mkdir {}: {e}", at.display()))?;
    if root.layers.is_empty() {
        crate::mounts::mount(&device, at, Some(&root.fstype), 0, None)
            .map_err(|e| format!("mount {device} ({}) at {}: {e}", root.fstype, at.display()))?;
    } else {
        let upper = Path::new(LAYERS_DIR).join("upper");
        std::fs::create_dir_all(&upper).map_err(|e| format!("mkdir {}: {e}", upper.display()))?;
        crate::mounts::mount(&device, &upper, Some(&root.fstype), 0, None)
            .map_err(|e| format!("mount upper layer {device} ({}): {e}", root.fstype))?;
        for dir in ["data", "work"] {
            std::fs::create_dir_all(upper.join(dir))
                .map_err(|e| format!("mkdir upper {dir}: {e}"))?;
        }
        let mut lowers = Vec::new();
        for (i, layer) in root.layers.iter().enumerate() {
            let device = wait_for_device(&layer.device)?;
            let point = Path::new(LAYERS_DIR).join(i.to_string());
            std::fs::create_dir_all(&point)
                .map_err(|e| format!("mkdir {}: {e}", point.display()))?;
            crate::mounts::mount(&device, &point, Some(&layer.fstype), libc::MS_RDONLY, None)
                .map_err(|e| format!("mount layer {i} {device} ({}): {e}", layer.fstype))?;
            lowers.push(point.display().to_string());
        }
        let options = overlay_options(&lowers, &upper);
        crate::mounts::mount("overlay", at, Some("overlay"), 0, Some(&options))
            .map_err(|e| format!("mount overlay root ({options}): {e}"))?;
        if lowers.len() > 1 {
            // Layers built side by side (a composed root) each carry their own user
            // databases and dpkg status: the root gets their union.
            let points: Vec<&Path> = lowers.iter().map(Path::new).collect();
            let written = crate::merge::merge_databases(&points, &upper.join("data"), at)
                .map_err(|e| format!("merging the layers' databases: {e}"))?;
            if !written.is_empty() {
                console!(
                    "hangar-init: merged {} from {} layers",
                    written.join(", "),
                    lowers.len()
                );
            }
        }
    }
    crate::mounts::mount_api_filesystems(at).map_err(|e| format!("api filesystems: {e}"))?;
    Ok(())
}

/// overlayfs mount options: `lowers` top first, `upper` holding `data/` and `work/`.
pub fn overlay_options(lowers: &[String], upper: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.join("data").display(),
        upper.join("work").display()
    )
}

/// Waits for a device (`/dev/vdX`, or `serial:NAME`: the virtio disk with that serial) and
/// returns its path.
fn wait_for_device(device: &str) -> Result<String, String> {
    let started = Instant::now();
    loop {
        let found = match device.strip_prefix("serial:") {
            Some(serial) => disk_by_serial(Path::new("/sys/block"), serial)
                .map(|name| format!("/dev/{name}"))
                .filter(|path| Path::new(path).exists()),
            None => Path::new(device).exists().then(|| device.to_owned()),
        };
        if let Some(path) = found {
            return Ok(path);
        }
        if started.elapsed() > DEVICE_WAIT {
            return Err(format!(
                "device {device} did not appear within {DEVICE_WAIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The block device (e.g. `vdb`) under a `/sys/block`-like directory whose `serial` is
/// `serial`.
pub fn disk_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let text = std::fs::read_to_string(entry.path().join("serial")).ok()?;
            (text.trim_end_matches(['\n', '\0']).trim() == serial)
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

/// Writes every file into `root`.
pub fn write_files(root: &Path, files: &[FileWrite]) -> Result<(), String> {
    files.iter().try_for_each(|file| write_file(root, file))
}

fn write_file(root: &Path, file: &FileWrite) -> Result<(), String> {
    let path = path_in_root(root, &file.path)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    std::fs::write(&path, &file.contents).map_err(|e| format!("write {}: {e}", file.path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode))
        .map_err(|e| format!("chmod {:o} {}: {e}", file.mode, file.path))?;
    Ok(())
}

/// Maps an absolute path inside the root to a path for init. Rejects relative paths and
/// `..` components, which could escape the root.
pub fn path_in_root(root: &Path, path: &str) -> Result<PathBuf, String> {
    let inner = Path::new(path);
    if !inner.is_absolute() {
        return Err(format!("file path {path:?} is not absolute"));
    }
    let mut out = root.to_path_buf();
    for component in inner.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("file path {path:?} must not contain '..'"));
            }
        }
    }
    if out == root {
        return Err(format!("file path {path:?} names the root itself"));
    }
    Ok(out)
}

/// Waits up to [`DEVICE_WAIT`] for a path to exist.
pub fn wait_for(path: &Path) -> Result<(), ()> {
    let started = Instant::now();
    while !path.exists() {
        if started.elapsed() > DEVICE_WAIT {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a network namespace of its own (a thread's `unshare`; needs root, as the guest's
    /// PID 1 has): the setting is written and read back there, the host's is untouched.
    #[test]
    fn closed_connections_are_forgotten_in_the_guest_namespace() {
        // SAFETY: geteuid takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to make a network namespace");
            return;
        }
        let path = "/proc/sys/net/ipv4/tcp_max_tw_buckets";
        let host = std::fs::read_to_string(path).unwrap();
        std::thread::spawn(move || {
            // SAFETY: unshare(2) takes no pointers; it moves this thread alone into a new
            // network namespace, which goes with the thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            forget_closed_connections().unwrap();
            assert_eq!(std::fs::read_to_string(path).unwrap().trim(), "0");
        })
        .join()
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            host,
            "the host's own is kept"
        );
    }

    #[test]
    fn paths_stay_inside_the_root() {
        let root = Path::new("/sysroot");
        assert_eq!(
            path_in_root(root, "/etc/motd").unwrap(),
            PathBuf::from("/sysroot/etc/motd")
        );
        assert_eq!(
            path_in_root(root, "/www/./index.html").unwrap(),
            PathBuf::from("/sysroot/www/index.html")
        );
        assert!(path_in_root(root, "etc/motd").is_err());
        assert!(path_in_root(root, "/etc/../../x").is_err());
        assert!(path_in_root(root, "/").is_err());
    }

    #[test]
    fn finds_disks_by_serial_and_builds_overlay_options() {
        let sys = std::env::temp_dir().join(format!("hangar-init-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        for (disk, serial) in [("vda", "hangar-root\n"), ("vdb", "hangar-layer-0")] {
            std::fs::create_dir_all(sys.join(disk)).unwrap();
            std::fs::write(sys.join(disk).join("serial"), serial).unwrap();
        }
        std::fs::create_dir_all(sys.join("loop0")).unwrap();
        assert_eq!(disk_by_serial(&sys, "hangar-root").as_deref(), Some("vda"));
        assert_eq!(
            disk_by_serial(&sys, "hangar-layer-0").as_deref(),
            Some("vdb")
        );
        assert_eq!(disk_by_serial(&sys, "nope"), None);
        std::fs::remove_dir_all(&sys).unwrap();
        assert_eq!(
            overlay_options(
                &["/layers/0".into(), "/layers/1".into()],
                Path::new("/layers/upper")
            ),
            "lowerdir=/layers/0:/layers/1,upperdir=/layers/upper/data,workdir=/layers/upper/work"
        );
    }

    #[test]
    fn resolv_conf_lists_servers() {
        assert_eq!(
            resolv_conf(&["10.0.2.3".into(), "1.1.1.1".into()]),
            "nameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
        assert_eq!(resolv_conf(&[]), "");
    }

    #[test]
    fn rand_pool_info_layout() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(&info[0..4], &40i32.to_ne_bytes());
        assert_eq!(&info[4..8], &5i32.to_ne_bytes());
        assert_eq!(&info[8..13], &[1, 2, 3, 4, 5]);
        assert_eq!(info.len(), 16);
    }

    #[test]
    fn writes_files_with_modes() {
        let root = std::env::temp_dir().join(format!("hangar-init-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        write_files(
            &root,
            &[FileWrite {
                path: "/srv/app/run.sh".into(),
                contents: "#!/bin/sh\n".into(),
                mode: 0o750,
            }],
        )
        .unwrap();
        let written = root.join("srv/app/run.sh");
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "#!/bin/sh\n");
        let mode = std::fs::metadata(&written).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
