//! The host's own files, kept private and safe to remove (issue 13, finding 3 and 5).
//!
//! - [`default_data_dir`]: where `hangar server`, `hangar agent` and `hangar bench` keep
//!   their data when not told.
//! - [`restrict_umask`]: `hangar server` and `hangar agent` call it first, so every file
//!   and directory they and their children (QEMU, the forwarder, mkfs, mksquashfs) create
//!   is `0600` / `0700`.
//! - [`secure_dir`]: a data dir is `0700`; one found looser is tightened, with a warning.
//! - [`mounts_under`] and [`unmount_all_under`]: what is mounted below a directory
//!   (`/proc/self/mountinfo`), undone deepest first. The server calls the latter at
//!   start-up, holding the data dir's lock, before anything else: a build of a process that
//!   was killed leaves `proc`, `sysfs`, bind mounts of the host's `/dev` and overlays.
//! - [`remove_tree`]: a recursive delete that refuses to cross a mount point, so removing a
//!   build directory can never walk into the host's `/dev` or a bind-mounted source.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The data dir when none is given: `$XDG_DATA_HOME/hangar`; as root `/var/lib/hangar`
/// (QEMU then runs as the unprivileged `hangar-vm`, which cannot enter `/root`); else
/// `~/.local/share/hangar`.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| root.then(|| PathBuf::from("/var/lib")))
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hangar")
}

/// Why a host file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostFsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A recursive delete found a mount point at or below the directory (listed).
    #[error("refusing to remove {path}: {} mounted below it ({})", mounts.len(), display_list(mounts))]
    MountedBelow { path: PathBuf, mounts: Vec<PathBuf> },
    /// Mounts below the directory could not be undone, even detached (listed).
    #[error("cannot unmount below {path}: {} remain ({})", remaining.len(), display_list(remaining))]
    StillMounted {
        path: PathBuf,
        remaining: Vec<PathBuf>,
    },
}

fn display_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HostFsError + 'a {
    move |source| HostFsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Sets the process's umask to `0077`: files this process and its children create are
/// readable by their owner only. Returns the previous mask.
pub fn restrict_umask() -> u32 {
    // SAFETY: umask(2) only swaps the process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) as u32 }
}

/// Creates `dir` (and its parents) as `0700`, and tightens it to `0700` when it already
/// exists with access for others or group read or write, logging a warning. Returns whether
/// it had to be tightened. Group search alone (`0710`) is kept: it lets a confined QEMU's
/// group enter known paths (its VM directory, its images), never list or change anything.
/// Parents that existed are left as they are.
pub fn secure_dir(dir: &Path) -> Result<bool, HostFsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create", dir))?;
    let mode = std::fs::metadata(dir).map_err(io("stat", dir))?.mode() & 0o7777;
    if mode & 0o067 == 0 {
        return Ok(false);
    }
    tracing::warn!(
        dir = %dir.display(),
        mode = format!("{mode:o}"),
        "the data dir is open to other users; making it 0700"
    );
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod", dir))?;
    Ok(true)
}

/// The mount points at or below `dir` (as the kernel names them: canonical paths), from
/// `/proc/self/mountinfo`, deepest first. `dir` itself is canonicalized; a `dir` that does
/// not exist has none.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, HostFsError> {
    let Ok(root) = std::fs::canonicalize(dir) else {
        return Ok(Vec::new());
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
    Ok(mounts_in(&info, &root))
}

/// The mount points of a mountinfo text at or below `root`, deepest first, each once.
fn mounts_in(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        // mountinfo(5): ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS ...
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|point| point.starts_with(root))
        .collect();
    points.sort_by(|a, b| {
        b.components()
            .count()
            .cmp(&a.components().count())
            .then_with(|| b.cmp(a))
    });
    points.dedup();
    points
}

/// mountinfo escapes space, tab, newline and backslash as `\` and three octal digits.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything mounted at or below `dir`, deepest first; a busy mount is detached
/// (`MNT_DETACH`, gone from the tree at once). Returns what was unmounted; fails when a
/// mount remains below `dir` afterwards. Needs the privilege to unmount (root); without
/// mounts below `dir` it needs none.
pub fn unmount_all_under(dir: &Path) -> Result<Vec<PathBuf>, HostFsError> {
    let mounts = mounts_under(dir)?;
    for point in &mounts {
        let Ok(c_path) = std::ffi::CString::new(point.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a NUL-terminated path; no memory is shared.
        let done = unsafe { libc::umount2(c_path.as_ptr(), 0) } == 0;
        if done {
            tracing::warn!(mount = %point.display(), "unmounted what a stopped build left");
            continue;
        }
        let err = std::io::Error::last_os_error();
        // SAFETY: as above.
        let detached = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } == 0;
        if detached {
            tracing::warn!(mount = %point.display(), error = %err, "detached a busy mount a stopped build left");
        } else {
            tracing::warn!(mount = %point.display(), error = %err, detach_error = %std::io::Error::last_os_error(), "cannot unmount");
        }
    }
    let remaining = mounts_under(dir)?;
    if remaining.is_empty() {
        Ok(mounts)
    } else {
        Err(HostFsError::StillMounted {
            path: dir.to_owned(),
            remaining,
        })
    }
}

/// Removes `path` and everything below it, never crossing into another mount: it fails
/// with [`HostFsError::MountedBelow`] (removing nothing) when a mount point is at or below
/// `path`, and while walking it leaves alone any directory on another device than `path`
/// (a mount made during the walk). Symbolic links are removed, never followed. A `path`
/// that does not exist is no error.
pub fn remove_tree(path: &Path) -> Result<(), HostFsError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("stat", path)(e)),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path).map_err(io("remove", path));
    }
    let mounts = mounts_under(path)?;
    if !mounts.is_empty() {
        return Err(HostFsError::MountedBelow {
            path: path.to_owned(),
            mounts,
        });
    }
    remove_dir_on(path, meta.dev())
}

fn remove_dir_on(dir: &Path, dev: u64) -> Result<(), HostFsError> {
    for entry in std::fs::read_dir(dir).map_err(io("read", dir))? {
        let entry = entry.map_err(io("read", dir))?;
        let child = entry.path();
        let meta = std::fs::symlink_metadata(&child).map_err(io("stat", &child))?;
        if meta.is_dir() {
            if meta.dev() != dev {
                return Err(HostFsError::MountedBelow {
                    path: dir.to_owned(),
                    mounts: vec![child],
                });
            }
            remove_dir_on(&child, dev)?;
        } else {
            std::fs::remove_file(&child).map_err(io("remove", &child))?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", dir)(e)),
    }
}

/// Whether this process runs as root (and may mount, unmount and change owners).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:5 / /data/build/.tmp-1/proc rw - proc proc rw
31 22 0:6 / /data/build/.tmp-1/sys rw - sysfs sysfs rw
32 22 0:7 / /data/build/.tmp-1/dev rw - devtmpfs udev rw
33 22 8:1 /src /data/build/.tmp-1/a\\040b rw - ext4 /dev/vda rw
34 22 0:8 / /data/build/.tmp-1 rw - overlay overlay rw
35 22 0:9 / /database rw - ext4 /dev/vdb rw
";

    #[test]
    fn mounts_below_a_dir_come_deepest_first_unescaped_and_no_sibling_prefix() {
        let mounts = mounts_in(MOUNTINFO, Path::new("/data"));
        assert_eq!(
            mounts,
            vec![
                PathBuf::from("/data/build/.tmp-1/sys"),
                PathBuf::from("/data/build/.tmp-1/proc"),
                PathBuf::from("/data/build/.tmp-1/dev"),
                PathBuf::from("/data/build/.tmp-1/a b"),
                PathBuf::from("/data/build/.tmp-1"),
            ],
            "/database shares the prefix /data but is not below it"
        );
        assert!(mounts_in(MOUNTINFO, Path::new("/elsewhere")).is_empty());
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b/c\134d\011e"), "/a b/c\\d\te");
        assert_eq!(unescape(r"/plain\"), "/plain\\");
    }

    #[test]
    fn a_loose_dir_is_tightened_and_a_new_one_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b");
        assert!(!secure_dir(&fresh).unwrap());
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(secure_dir(&fresh).unwrap(), "reported as tightened");
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o710)).unwrap();
        assert!(!secure_dir(&fresh).unwrap(), "group search alone is kept");
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o710);
    }

    #[test]
    fn remove_tree_removes_files_dirs_and_links_without_following_them() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists(), "the link was not followed");
        remove_tree(&tree).unwrap(); // gone: no error
    }

    fn mount(args: &[&str], source: &Path, target: &Path) {
        std::fs::create_dir_all(target).unwrap();
        let status = Command::new("mount")
            .args(args)
            .arg(source)
            .arg(target)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?} {}", target.display());
    }

    /// Unmounts whatever a failed test left, so that the temporary dir can go.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = unmount_all_under(&self.0);
        }
    }

    #[test]
    fn remove_tree_refuses_to_cross_a_mount_and_removes_nothing() {
        if !is_root() {
            eprintln!("SKIPPED: mounting needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("source");
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("precious"), b"x").unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("dir")).unwrap();
        std::fs::write(tree.join("file"), b"x").unwrap();
        let _guard = Unmount(tree.clone());
        mount(&["--bind"], &source, &tree.join("dir/bound"));
        let err = remove_tree(&tree).unwrap_err();
        assert!(
            matches!(&err, HostFsError::MountedBelow { mounts, .. } if mounts.len() == 1),
            "{err}"
        );
        assert!(
            source.join("precious").exists(),
            "the bind source is intact"
        );
        assert!(tree.join("file").exists(), "nothing was removed");
        // While walking, a dir on another device (a mount made after the check) is not
        // entered either.
        let walked = tmp.path().join("walked");
        let _guard2 = Unmount(walked.clone());
        mount(
            &["-t", "tmpfs"],
            Path::new("tmpfs"),
            &walked.join("sub/tmp"),
        );
        std::fs::write(walked.join("sub/tmp/inside"), b"x").unwrap();
        let dev = std::fs::metadata(&walked).unwrap().dev();
        let err = remove_dir_on(&walked, dev).unwrap_err();
        assert!(matches!(err, HostFsError::MountedBelow { .. }), "{err}");
        assert!(walked.join("sub/tmp/inside").exists());
    }

    #[test]
    fn the_mounts_of_a_build_are_undone_deepest_first_and_the_bind_source_kept() {
        if !is_root() {
            eprintln!("SKIPPED: mounting needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("source");
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("precious"), b"x").unwrap();
        let data = tmp.path().join("data");
        let build = data.join("cache/layers/.tmp-build");
        let _guard = Unmount(data.clone());
        for dir in ["lower", "upper", "work"] {
            std::fs::create_dir_all(build.join(dir)).unwrap();
        }
        std::fs::write(build.join("lower/base"), b"x").unwrap();
        let merged = build.join("merged");
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            build.join("lower").display(),
            build.join("upper").display(),
            build.join("work").display()
        );
        mount(
            &["-t", "overlay", "-o", &options],
            Path::new("overlay"),
            &merged,
        );
        mount(&["-t", "proc"], Path::new("proc"), &merged.join("proc"));
        mount(&["-t", "sysfs"], Path::new("sysfs"), &merged.join("sys"));
        mount(&["--bind"], &source, &merged.join("var/cache/apt/archives"));
        assert_eq!(mounts_under(&data).unwrap().len(), 4);

        let undone = unmount_all_under(&data).unwrap();
        assert_eq!(undone.len(), 4);
        assert_eq!(
            undone.last().unwrap(),
            &std::fs::canonicalize(&merged).unwrap()
        );
        assert!(mounts_under(&data).unwrap().is_empty());
        assert!(
            source.join("precious").exists(),
            "the bind source is intact"
        );
        remove_tree(&data).unwrap();
        assert!(source.join("precious").exists());
    }
}
