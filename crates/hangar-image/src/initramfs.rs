//! The initramfs: an uncompressed newc cpio archive (the kernel unpacks it into its
//! initial rootfs) holding `hangar-init` as `/init`, busybox and the kernel modules.

use std::borrow::Cow;
use std::io::{self, Write};

use crate::modules::Module;

/// One archive member. Paths are absolute (`/bin/busybox`); they are stored without the
/// leading slash, as `cpio` and the kernel expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpioEntry<'a> {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Cow<'a, [u8]>,
    },
    Symlink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes the entries (in order, owned by root, mtime 0 for reproducible archives) and
/// the trailer. Parent directories must precede their contents.
pub fn write_newc<W: Write>(entries: &[CpioEntry<'_>], mut out: W) -> io::Result<W> {
    for (i, entry) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (path, mode, data, rdev): (&str, u32, &[u8], (u32, u32)) = match entry {
            CpioEntry::Dir { path, mode } => (path, S_IFDIR | mode, &[], (0, 0)),
            CpioEntry::File { path, mode, data } => (path, S_IFREG | mode, data.as_ref(), (0, 0)),
            CpioEntry::Symlink { path, target } => {
                (path, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
            }
            CpioEntry::CharDevice {
                path,
                mode,
                major,
                minor,
            } => (path, S_IFCHR | mode, &[], (*major, *minor)),
        };
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{path} exceeds 4 GiB"))
        })?;
        let nlink = if matches!(entry, CpioEntry::Dir { .. }) {
            2
        } else {
            1
        };
        let mut writer = cpio::newc::Builder::new(path.trim_start_matches('/'))
            .ino(ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1)
            .write(out, size);
        writer.write_all(data)?;
        out = writer.finish()?;
    }
    cpio::newc::trailer(out)
}

/// The guest initramfs contents.
pub fn guest_entries<'a>(
    init: &'a [u8],
    busybox: &'a [u8],
    release: &str,
    modules: &'a [Module],
) -> Vec<CpioEntry<'a>> {
    let dir = |path: &str, mode: u32| CpioEntry::Dir {
        path: path.to_string(),
        mode,
    };
    let module_dir = format!("/lib/modules/{release}");
    let mut entries = vec![
        dir("/bin", 0o755),
        dir("/dev", 0o755),
        CpioEntry::CharDevice {
            path: "/dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        dir("/etc", 0o755),
        dir("/lib", 0o755),
        dir("/lib/modules", 0o755),
        dir(&module_dir, 0o755),
        dir("/proc", 0o555),
        dir("/run", 0o755),
        dir("/sys", 0o555),
        dir("/sysroot", 0o755),
        dir("/tmp", 0o1777),
        CpioEntry::File {
            path: "/init".into(),
            mode: 0o755,
            data: Cow::Borrowed(init),
        },
        CpioEntry::File {
            path: "/bin/busybox".into(),
            mode: 0o755,
            data: Cow::Borrowed(busybox),
        },
        CpioEntry::Symlink {
            path: "/bin/sh".into(),
            target: "busybox".into(),
        },
    ];
    let mut load_order = String::new();
    for module in modules {
        let path = format!("{module_dir}/{}.ko", module.name);
        load_order.push_str(&path);
        load_order.push('\n');
        entries.push(CpioEntry::File {
            path,
            mode: 0o644,
            data: Cow::Borrowed(&module.bytes),
        });
    }
    entries.push(CpioEntry::File {
        path: "/lib/modules/load.order".into(),
        mode: 0o644,
        data: Cow::Owned(load_order.into_bytes()),
    });
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::PathBuf;

    /// (name, mode, rdev, contents) of an archive member.
    type Member = (String, u32, (u32, u32), Vec<u8>);

    /// Every member, read back with the cpio crate.
    fn read_back(archive: &[u8]) -> Vec<Member> {
        let mut members = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let (name, mode, rdev) = (
                e.name().to_string(),
                e.mode(),
                (e.rdev_major(), e.rdev_minor()),
            );
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            members.push((name, mode, rdev, data));
            rest = reader.finish().unwrap();
        }
        members
    }

    #[test]
    fn guest_archive_has_init_busybox_console_and_modules_in_order() {
        let modules = vec![
            Module {
                name: "virtio_ring".into(),
                path: PathBuf::new(),
                bytes: b"ring".to_vec(),
            },
            Module {
                name: "virtio".into(),
                path: PathBuf::new(),
                bytes: b"virtio".to_vec(),
            },
        ];
        let entries = guest_entries(b"INIT", b"BUSYBOX", "6.1.0-test", &modules);
        let archive = write_newc(&entries, Vec::new()).unwrap();
        assert_eq!(archive.len() % 4, 0);
        let members = read_back(&archive);
        let find = |name: &str| {
            members
                .iter()
                .find(|m| m.0 == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };

        assert_eq!(find("init").1, 0o100755);
        assert_eq!(find("init").3, b"INIT");
        assert_eq!(find("bin/busybox").3, b"BUSYBOX");
        assert_eq!(find("bin/sh").1, 0o120777);
        assert_eq!(find("bin/sh").3, b"busybox");
        assert_eq!(find("dev/console").1, 0o020600);
        assert_eq!(find("dev/console").2, (5, 1));
        assert_eq!(find("tmp").1, 0o041777);
        for dir in ["dev", "proc", "sys", "run", "tmp", "sysroot", "etc"] {
            assert_eq!(find(dir).1 & 0o170000, 0o040000, "{dir} is a directory");
        }
        assert_eq!(find("lib/modules/6.1.0-test/virtio.ko").3, b"virtio");
        assert_eq!(
            String::from_utf8(find("lib/modules/load.order").3.clone()).unwrap(),
            "/lib/modules/6.1.0-test/virtio_ring.ko\n/lib/modules/6.1.0-test/virtio.ko\n"
        );
        // Parents before children.
        let pos = |name: &str| members.iter().position(|m| m.0 == name).unwrap();
        assert!(pos("lib/modules/6.1.0-test") < pos("lib/modules/6.1.0-test/virtio.ko"));
        assert!(pos("bin") < pos("bin/busybox"));
    }

    #[test]
    fn archives_are_reproducible() {
        let entries = guest_entries(b"a", b"b", "r", &[]);
        assert_eq!(
            write_newc(&entries, Vec::new()).unwrap(),
            write_newc(&entries, Vec::new()).unwrap()
        );
    }
}
