//! Host processes: finding QEMU processes by their command line, checking liveness, and
//! ending them. Every kill is preceded by a check that the pid still belongs to the process
//! we mean (its command line names the VM's own files), so a recycled pid is never hit.

use std::path::Path;
use std::time::Duration;

/// The command line of `pid`, split into arguments; `None` if no such process.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None; // a zombie or kernel thread
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
}

/// The value following `flag` in `args`.
pub fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|arg| arg == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Whether `pid` runs QEMU with `-pidfile <pidfile>`.
pub fn is_qemu_with_pidfile(pid: u32, pidfile: &Path) -> bool {
    cmdline(pid).is_some_and(|args| {
        is_qemu(&args) && arg_after(&args, "-pidfile") == Some(&*pidfile.to_string_lossy())
    })
}

fn is_qemu(args: &[String]) -> bool {
    args.first()
        .and_then(|arg0| Path::new(arg0).file_name())
        .is_some_and(|name| name.to_string_lossy().starts_with("qemu-system"))
}

/// Every QEMU process whose `-pidfile` lies directly in a subdirectory of `vms_dir`, as
/// (subdirectory name, pid).
pub fn qemu_processes_under(vms_dir: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let args = cmdline(pid)?;
            if !is_qemu(&args) {
                return None;
            }
            let pidfile = Path::new(arg_after(&args, "-pidfile")?);
            let vm_dir = pidfile.parent()?;
            (vm_dir.parent()? == vms_dir)
                .then(|| Some((vm_dir.file_name()?.to_string_lossy().into_owned(), pid)))
                .flatten()
        })
        .collect()
}

/// Whether a process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends SIGKILL to `pid` and waits up to `wait` for it to disappear.
pub async fn kill_and_wait(pid: u32, wait: Duration) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; callers have checked that `pid`
    // is the process they mean.
    unsafe {
        libc::kill(raw, libc::SIGKILL);
    }
    wait_gone(pid, wait).await
}

/// Polls until `pid` is gone or `wait` passes.
pub async fn wait_gone(pid: u32, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    while alive(pid) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_has_a_cmdline() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(!cmdline(me).unwrap().is_empty());
        assert!(!alive(u32::MAX - 1));
        assert!(qemu_processes_under(Path::new("/nonexistent/vms")).is_empty());
    }

    #[test]
    fn arg_after_finds_values() {
        let args: Vec<String> = ["qemu", "-pidfile", "/x/vms/a/qemu.pid"]
            .map(String::from)
            .into();
        assert_eq!(arg_after(&args, "-pidfile"), Some("/x/vms/a/qemu.pid"));
        assert_eq!(arg_after(&args, "-name"), None);
        assert!(is_qemu(&["/usr/bin/qemu-system-x86_64".to_string()]));
        assert!(!is_qemu(&["bash".to_string()]));
    }
}
