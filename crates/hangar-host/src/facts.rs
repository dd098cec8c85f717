//! What the machine has, read from the OS: CPUs, memory (`/proc/meminfo`), load
//! (`/proc/loadavg`) and free disk (`statvfs`). Values that cannot be read are 0.

use std::path::Path;

/// Total and available memory in MiB, from `/proc/meminfo`.
pub fn memory_mib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// The one-minute load average, from `/proc/loadavg`.
pub fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPUs this process may run on.
pub fn vcpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Free disk space (MiB) for unprivileged users on the filesystem holding `path`.
pub fn free_disk_mib(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a NUL-terminated string and stat points to writable memory of the
    // right size; statvfs writes it fully when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    stat.f_bavail.saturating_mul(stat.f_frsize) >> 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields() {
        let text = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(parse_meminfo(text), (16000, 8000));
        assert_eq!(parse_meminfo(""), (0, 0));
    }

    #[test]
    fn this_machine_has_something() {
        assert!(vcpus() >= 1);
        assert!(memory_mib().0 > 0);
        assert!(free_disk_mib(Path::new("/")) > 0);
        assert!(free_disk_mib(Path::new("/nonexistent/hangar")) == 0);
    }
}
