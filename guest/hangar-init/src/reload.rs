//! Reloading a service with a signal ([`hangar_proto::ServiceReload`]): the main process
//! is signalled and, like nginx's master, starts new workers with the new configuration
//! and tells the ones it had to finish. The reload counts as done once every child the
//! process had before the signal has exited: from then on only the new workers accept.

use std::time::{Duration, Instant};

use hangar_proto::ReloadSignal;

/// How long the old children may take to finish before the reload counts as failed.
pub const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// The signal's number.
pub fn signal_number(signal: ReloadSignal) -> libc::c_int {
    match signal {
        ReloadSignal::Hup => libc::SIGHUP,
        ReloadSignal::Usr1 => libc::SIGUSR1,
        ReloadSignal::Usr2 => libc::SIGUSR2,
    }
}

/// Sends `signal` to each of `pids` (main processes, not their groups: a pre-forking
/// server's workers handle their own signals) and waits up to `wait` until every child
/// they had before has exited. Errors say what is still running.
pub fn reload(pids: &[i32], signal: ReloadSignal, wait: Duration) -> Result<(), String> {
    if pids.is_empty() {
        return Err("it is not running".into());
    }
    let before: Vec<(i32, i32)> = pids
        .iter()
        .flat_map(|&parent| children(parent).into_iter().map(move |c| (parent, c)))
        .collect();
    for &pid in pids {
        // SAFETY: kill(2) takes no pointers.
        if unsafe { libc::kill(pid, signal_number(signal)) } != 0 {
            return Err(format!(
                "signalling process {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let started = Instant::now();
    loop {
        let left: Vec<i32> = before
            .iter()
            .filter(|&&(parent, child)| runs_under(child, parent))
            .map(|&(_, child)| child)
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(format!(
                "its workers {left:?} from before the signal still run after {wait:?} (was the new configuration refused?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `(state, ppid)` from `/proc/PID/stat` (the command name may hold spaces and
/// parentheses: fields are counted after its last `)`).
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` still runs (not a zombie) as a child of `parent`.
fn runs_under(pid: i32, parent: i32) -> bool {
    matches!(stat(pid), Some((state, ppid)) if ppid == parent && state != 'Z' && state != 'X')
}

/// The running children of `parent`.
fn children(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| runs_under(pid, parent))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    /// A pre-forking server in miniature: a shell with one worker (`sleep`) that, on
    /// SIGHUP, starts a new worker and ends the old one after `lag` seconds.
    fn server(lag: &str) -> std::process::Child {
        let script = format!(
            "sleep 600 & w=$!; trap 'sleep 600 & n=$!; (sleep {lag}; kill $w) & w=$n' HUP; \
             while :; do wait; done"
        );
        let mut command = Command::new("sh");
        // A shell may not trap a signal ignored when it started (POSIX), and a test run
        // under `nohup` ignores SIGHUP: the server gets the default disposition back.
        // SAFETY: signal(2) is async-signal-safe; it runs in the child before exec.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_DFL);
                Ok(())
            });
        }
        command
            .args(["-c", &script])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("sh")
    }

    /// Kills the server's whole process group (its workers and their timers too).
    fn stop(mut child: std::process::Child) {
        // SAFETY: kill(2) takes no pointers; the group is the test's own server.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    }

    fn wait_for_children(pid: i32) -> Vec<i32> {
        let started = Instant::now();
        loop {
            let now = children(pid);
            if !now.is_empty() || started.elapsed() > Duration::from_secs(5) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn waits_for_the_old_workers_then_answers() {
        let child = server("0.3");
        let pid = child.id() as i32;
        let old = wait_for_children(pid);
        assert_eq!(old.len(), 1, "{old:?}");
        let started = Instant::now();
        reload(&[pid], ReloadSignal::Hup, RELOAD_WAIT).expect("reload");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "answered before the old worker ended"
        );
        assert!(!runs_under(old[0], pid), "the old worker still runs");
        assert!(!children(pid).is_empty(), "a new worker runs");
        stop(child);
    }

    #[test]
    fn old_workers_that_stay_fail_the_reload() {
        let child = server("60");
        let pid = child.id() as i32;
        assert_eq!(wait_for_children(pid).len(), 1);
        let error = reload(&[pid], ReloadSignal::Hup, Duration::from_millis(300)).unwrap_err();
        assert!(error.contains("still run"), "{error}");
        stop(child);
        assert!(
            reload(&[], ReloadSignal::Hup, RELOAD_WAIT)
                .unwrap_err()
                .contains("not running")
        );
    }
}
