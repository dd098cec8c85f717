//! Kernel module loading from the initramfs' `load.order` (dependency order, one absolute
//! path per line), with `finit_module(2)`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// What happened when loading.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<PathBuf>,
    pub failed: Vec<(PathBuf, io::Error)>,
}

/// Parses `load.order`: one absolute path per line; blank lines and `#` comments are
/// skipped, surrounding whitespace trimmed. Relative paths are ignored (they would depend
/// on the current directory).
pub fn parse_load_order(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter(|line| line.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Loads every module in order. A module that is already loaded (EEXIST) counts as
/// loaded; any other failure is recorded and loading goes on with the next one.
pub fn load_all(paths: &[PathBuf]) -> LoadReport {
    let mut report = LoadReport::default();
    for path in paths {
        match load(path) {
            Ok(()) => report.loaded.push(path.clone()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => report.loaded.push(path.clone()),
            Err(e) => report.failed.push((path.clone(), e)),
        }
    }
    report
}

/// `finit_module(fd, "", 0)` on an uncompressed `.ko`.
fn load(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let params = c"";
    // SAFETY: the fd is open for the duration of the call and `params` is a valid,
    // NUL-terminated string; finit_module reads only those.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_in_order() {
        let text = "# generated\n/lib/modules/r/virtio_ring.ko\n\n  /lib/modules/r/virtio.ko  \nrelative.ko\n/lib/modules/r/virtio_mmio.ko";
        assert_eq!(
            parse_load_order(text),
            vec![
                PathBuf::from("/lib/modules/r/virtio_ring.ko"),
                PathBuf::from("/lib/modules/r/virtio.ko"),
                PathBuf::from("/lib/modules/r/virtio_mmio.ko"),
            ]
        );
    }

    #[test]
    fn missing_modules_are_reported_not_fatal() {
        let report = load_all(&[PathBuf::from("/nonexistent/hangar-test.ko")]);
        assert!(report.loaded.is_empty());
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].1.kind(), io::ErrorKind::NotFound);
    }
}
