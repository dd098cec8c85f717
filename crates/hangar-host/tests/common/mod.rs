//! Shared by the tests that run real QEMU guests: the image cache and the clean-up of
//! QEMU processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hangar_vmm::procs;

/// Guest assets and images: `HANGAR_TEST_CACHE`, or a cache under cargo's test temp dir
/// (the first run fetches Debian's cloud kernel with `apt-get download`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HANGAR_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("hangar-cache"))
}

/// Ends every QEMU process under `vms_dir` when dropped, also when the test panics.
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (id, pid) in procs::qemu_processes_under(&self.0) {
            if procs::is_qemu_with_pidfile(pid, &self.0.join(&id).join("qemu.pid")) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while procs::alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}
