//! QEMU confined (issue 13): a seccomp sandbox always, and an unprivileged user when the
//! host process runs as root.
//!
//! Every QEMU runs with [`SANDBOX`]: no obsolete system calls, no set*uid/set*gid, no
//! fork/exec, no scheduler or affinity changes. QEMU's own `-daemonize` forks and calls
//! `setsid` after the filter is installed, so QEMU is not daemonized: the backend starts it
//! in its own session and waits for its sockets ([`crate::qemu`]). `-runas` is not used for
//! the same reason (it calls `setuid` under the filter); the user is changed in the child
//! before `exec` instead.
//!
//! As root, QEMU runs as a [`VmUser`]: the system user `hangar-vm` (made by
//! `scripts/install-deps.sh`: `useradd --system`), else `nobody`. Its VM directory is its
//! own (`0700`), and the files it must open by name (kernel, initramfs, base images,
//! layers, a template's disk) are made readable to its group, and the directories above
//! them traversable (never listable), from the data dir down. Everything else in the data
//! dir (the database, keys, archives, other VMs' directories) stays the server's alone.
//! Snapshots and archives never need QEMU to open a file: they travel through pipes the
//! server holds.

use std::ffi::CString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// QEMU's `-sandbox` option: the seccomp filter every VM runs under.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The user a confined QEMU runs as when the server is root, in order of preference.
pub const VM_USERS: [&str; 2] = ["hangar-vm", "nobody"];

/// Why QEMU cannot be confined as asked.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "none of the users {VM_USERS:?} exists to run QEMU as (create one: useradd --system --no-create-home --shell /usr/sbin/nologin hangar-vm)"
    )]
    NoUser,
    #[error(
        "QEMU runs as {user} (uid {uid}), which cannot reach {path} (mode {mode:o}, owner {owner}:{group}): \
         use a data dir every directory above which others may enter (e.g. /var/lib/hangar)"
    )]
    Unreachable {
        user: String,
        uid: u32,
        path: PathBuf,
        mode: u32,
        owner: u32,
        group: u32,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ConfineError + 'a {
    move |source| ConfineError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The unprivileged user QEMU runs as, and the directories the server may open to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUser {
    pub name: String,
    pub uid: u32,
    /// Its group: files QEMU must read are made readable to it.
    pub gid: u32,
    /// Its supplementary groups (`/dev/kvm`'s group, so that KVM still works).
    pub groups: Vec<u32>,
    /// Directories (canonical) below which the server may open files and directories to
    /// [`VmUser::gid`]; anything QEMU needs elsewhere must be readable to it already.
    pub roots: Vec<PathBuf>,
}

impl VmUser {
    /// For a process running as root, the first of [`VM_USERS`] that exists, with `roots`
    /// (canonicalized) as the directories it may be given access below; `None` for any
    /// other process (QEMU then runs as this process's user, still sandboxed).
    pub fn for_this_process(roots: &[PathBuf]) -> Result<Option<VmUser>, ConfineError> {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let (name, uid, gid) = VM_USERS
            .iter()
            .find_map(|name| lookup_user(name).map(|(uid, gid)| (name.to_string(), uid, gid)))
            .ok_or(ConfineError::NoUser)?;
        let groups = std::fs::metadata("/dev/kvm")
            .map(|meta| vec![meta.gid()])
            .unwrap_or_default();
        let roots = roots
            .iter()
            .map(|root| std::fs::canonicalize(root).map_err(io("resolve", root)))
            .collect::<Result<Vec<_>, _>>()?;
        let user = VmUser {
            name,
            uid,
            gid,
            groups,
            roots,
        };
        for root in &user.roots {
            if let Some(parent) = root.parent() {
                user.check_reachable(parent)?;
            }
            user.open_to_group(root, 0o010)?;
        }
        Ok(Some(user))
    }

    /// Fails unless this user may enter `dir` and every directory above it, as the modes
    /// are now.
    pub fn check_reachable(&self, dir: &Path) -> Result<(), ConfineError> {
        for ancestor in dir.ancestors() {
            let meta = std::fs::metadata(ancestor).map_err(io("stat", ancestor))?;
            if !self.may(&meta, 0o1) {
                return Err(ConfineError::Unreachable {
                    user: self.name.clone(),
                    uid: self.uid,
                    path: ancestor.to_owned(),
                    mode: meta.mode() & 0o7777,
                    owner: meta.uid(),
                    group: meta.gid(),
                });
            }
        }
        Ok(())
    }

    /// Whether the mode bits of `meta` give this user all of `bits` (4 read, 2 write,
    /// 1 execute).
    fn may(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        let shift = if meta.uid() == self.uid {
            6
        } else if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            3
        } else {
            0
        };
        mode & (bits << shift) == bits << shift
    }

    /// Makes `file` readable to this user: below one of [`VmUser::roots`], each directory
    /// from the root down is made enterable (`g+x`, group [`VmUser::gid`]) and the file
    /// readable (`g+r`) where they are not already; elsewhere it must be readable as it is.
    /// Nothing is made listable or writable.
    pub fn grant_read(&self, file: &Path) -> Result<(), ConfineError> {
        self.grant(file, 0o4)
    }

    /// Makes `file` readable and writable to this user's group, as [`VmUser::grant_read`]
    /// makes it readable: only for a template's RAM file, which QEMU 7.2 opens read-write
    /// to map it privately (see [`crate::template`] for what keeps it unwritten).
    pub fn grant_read_write(&self, file: &Path) -> Result<(), ConfineError> {
        self.grant(file, 0o6)
    }

    /// [`VmUser::grant_read`] with the permission `bits` (4 read, 2 write).
    fn grant(&self, file: &Path, bits: u32) -> Result<(), ConfineError> {
        let file = std::fs::canonicalize(file).map_err(io("resolve", file))?;
        let Some(root) = self.roots.iter().find(|root| file.starts_with(root)) else {
            // Outside what the server owns (a shared cache): it must be open already.
            if let Some(parent) = file.parent() {
                self.check_reachable(parent)?;
            }
            let meta = std::fs::metadata(&file).map_err(io("stat", &file))?;
            if !self.may(&meta, bits) {
                return Err(ConfineError::Unreachable {
                    user: self.name.clone(),
                    uid: self.uid,
                    path: file,
                    mode: meta.mode() & 0o7777,
                    owner: meta.uid(),
                    group: meta.gid(),
                });
            }
            return Ok(());
        };
        self.open_dirs_above(&file, root)?;
        self.open_to_group(&file, bits << 3)
    }

    /// Makes the qcow2 image `image` and every image behind it (its backing chain, which
    /// QEMU opens by the names the headers hold) readable to this user, as
    /// [`VmUser::grant_read`]; `image` itself only when `include_first`.
    pub fn grant_backing_chain(
        &self,
        image: &Path,
        include_first: bool,
    ) -> Result<(), ConfineError> {
        if include_first {
            self.grant_read(image)?;
        }
        let mut current = image.to_owned();
        for _ in 0..MAX_BACKING_DEPTH {
            match qcow2_backing(&current).map_err(io("read", &current))? {
                Some(backing) => {
                    self.grant_read(&backing)?;
                    current = backing;
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// Makes the directories above `path` enterable to this user (`g+x`), from the root
    /// it is below; `path` itself is left as it is. For a VM's directory, whose sockets
    /// QEMU creates by name.
    pub fn grant_enter_above(&self, path: &Path) -> Result<(), ConfineError> {
        let parent = path.parent().unwrap_or(path);
        let parent = std::fs::canonicalize(parent).map_err(io("resolve", parent))?;
        match self.roots.iter().find(|root| parent.starts_with(root)) {
            Some(root) => {
                self.open_dirs_above(&parent.join("x"), root)?;
                Ok(())
            }
            None => self.check_reachable(&parent),
        }
    }

    fn open_dirs_above(&self, path: &Path, root: &Path) -> Result<(), ConfineError> {
        let mut dirs: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .take_while(|dir| dir.starts_with(root))
            .collect();
        dirs.reverse();
        for dir in dirs {
            self.open_to_group(dir, 0o010)?;
        }
        Ok(())
    }

    /// Gives `path` to this user's group with the group permission `bits`, unless the user
    /// has them already.
    fn open_to_group(&self, path: &Path, bits: u32) -> Result<(), ConfineError> {
        let meta = std::fs::metadata(path).map_err(io("stat", path))?;
        if self.may(&meta, bits >> 3) {
            return Ok(());
        }
        if meta.gid() != self.gid {
            std::os::unix::fs::chown(path, None, Some(self.gid)).map_err(io("chgrp", path))?;
        }
        let mode = meta.mode() & 0o7777;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | bits))
            .map_err(io("chmod", path))
    }

    /// Makes `path` this user's own (a VM's directory, its disk).
    pub fn own(&self, path: &Path) -> Result<(), ConfineError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(io("chown", path))
    }

    /// The credentials the child takes before `exec`, prepared (no allocation after fork).
    pub(crate) fn credentials(&self) -> Credentials {
        let mut groups: Vec<libc::gid_t> = vec![self.gid];
        groups.extend(self.groups.iter().filter(|g| **g != self.gid));
        Credentials {
            uid: self.uid,
            gid: self.gid,
            groups,
        }
    }
}

/// What [`Credentials::apply`] sets in a forked child.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl Credentials {
    /// Drops to the user: supplementary groups, group, then user (the order that leaves
    /// no privilege behind). Async-signal-safe: for `pre_exec`.
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        // SAFETY: setgroups(2), setgid(2) and setuid(2) are async-signal-safe and read
        // only `groups`, allocated before the fork.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// How deep a backing chain is followed (hangar's are at most three: a VM's layer, a
/// template's, a base image).
const MAX_BACKING_DEPTH: usize = 8;

/// The backing file a qcow2 image names in its header (relative names resolved against the
/// image's directory); `None` for an image without one, or a file that is not qcow2.
pub fn qcow2_backing(image: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(image)?;
    let mut header = [0u8; 20];
    if file.read_exact(&mut header).is_err() || header[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    if offset == 0 || size == 0 || size > 4096 {
        return Ok(None);
    }
    let mut name = vec![0u8; size as usize];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut name)?;
    let name = PathBuf::from(<std::ffi::OsString as OsStringExt>::from_vec(name));
    Ok(Some(match image.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// The uid and primary gid of the user `name`, if it exists.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c_name = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data; getpwnam_r writes into it and `buf` (of the given
    // length) and sets `result` to it or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody(roots: Vec<PathBuf>) -> VmUser {
        let (uid, gid) = lookup_user("nobody").expect("user nobody");
        VmUser {
            name: "nobody".into(),
            uid,
            gid,
            groups: Vec::new(),
            roots,
        }
    }

    #[test]
    fn users_are_looked_up() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no-such-user-here"), None);
    }

    #[test]
    fn a_backing_chain_is_read_from_qcow2_headers_and_opened_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        let img = |args: &[&str]| {
            let status = std::process::Command::new("qemu-img")
                .args(args)
                .current_dir(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "qemu-img {args:?}");
        };
        img(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            "mid.qcow2",
        ]);
        let mid = dir.join("mid.qcow2");
        img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]
            .into_iter()
            .chain([mid.to_str().unwrap(), "top.qcow2"])
            .collect::<Vec<_>>());
        assert_eq!(
            qcow2_backing(&dir.join("top.qcow2")).unwrap(),
            Some(mid.clone())
        );
        assert_eq!(qcow2_backing(&mid).unwrap(), Some(dir.join("base.qcow2")));
        assert_eq!(qcow2_backing(&dir.join("base.qcow2")).unwrap(), None);
        std::fs::write(dir.join("raw"), b"not qcow2 at all, just bytes").unwrap();
        assert_eq!(qcow2_backing(&dir.join("raw")).unwrap(), None);

        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED (rest): changing a file's group needs root");
            return;
        }
        for file in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        let user = nobody(vec![dir.clone()]);
        user.grant_backing_chain(&dir.join("top.qcow2"), false)
            .unwrap();
        let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().mode() & 0o777;
        assert_eq!(mode("top.qcow2"), 0o600, "the first is the VM's own");
        assert_eq!(mode("mid.qcow2"), 0o640);
        assert_eq!(mode("base.qcow2"), 0o640);
    }

    #[test]
    fn a_file_below_a_root_is_opened_to_the_group_only_as_far_as_needed() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: changing a file's group needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap().join("data");
        let file = root.join("cache/layers/abc/layer.sqfs");
        let secret = root.join("cache/other");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"layer").unwrap();
        std::fs::write(&secret, b"other").unwrap();
        for dir in [
            &root,
            &root.join("cache"),
            &root.join("cache/layers"),
            &root.join("cache/layers/abc"),
        ] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let user = nobody(vec![root.clone()]);
        user.grant_read(&file).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&root), 0o710, "enterable, not listable");
        assert_eq!(mode(&root.join("cache/layers/abc")), 0o710);
        assert_eq!(mode(&file), 0o640);
        assert_eq!(std::fs::metadata(&file).unwrap().gid(), user.gid);
        assert_eq!(mode(&secret), 0o600, "nothing else opened");
        user.check_reachable(file.parent().unwrap()).unwrap();

        // A file outside the roots is left as it is, and refused when unreadable.
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            user.grant_read(&outside),
            Err(ConfineError::Unreachable { .. })
        ));
        assert_eq!(mode(&outside), 0o600);
    }
}
