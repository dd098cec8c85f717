//! Child processes: service start, `exec` children, and reaping.
//!
//! All reaping goes through [`reap`], which calls `waitpid(-1, WNOHANG)`. To keep it from
//! stealing the exit status of an `exec` child (whose thread waits for it), every spawn
//! and every reap holds [`REGISTRY`]: a child is registered before the reaper can see it,
//! and `exec` statuses are forwarded to the waiting thread.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, Sender};

use hangar_proto::ServiceCommand;

use crate::sys::cstring;

/// PATH given to every service and exec.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where and as whom processes run, from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The configured root (chrooted into), `None` for the initramfs.
    pub root: Option<PathBuf>,
}

/// The kernel's hostname: the one identity (configure or re-identify) last set.
pub fn current_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// Decodes a `waitpid` status.
    pub fn from_wait_status(status: libc::c_int) -> Self {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }

    /// `(code, signal)` as the protocol reports them.
    pub fn code_and_signal(self) -> (Option<i32>, Option<i32>) {
        match self {
            Exit::Code(code) => (Some(code), None),
            Exit::Signal(signal) => (None, Some(signal)),
        }
    }
}

/// A service that exited.
#[derive(Debug)]
pub struct ServiceExit {
    pub name: String,
    pub status: Exit,
}

/// Children init waits for, by pid.
struct Registry {
    services: BTreeMap<i32, String>,
    execs: BTreeMap<i32, Sender<Exit>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    services: BTreeMap::new(),
    execs: BTreeMap::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves the maps consistent (single inserts and
    // removes), so a poisoned lock is still usable.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds a command that runs `argv` chrooted into the context's root (when there is
/// one), in `workdir` (default `/`), in a new session, with `env` plus PATH and HOSTNAME
/// (the given env wins), stdin `/dev/null`.
pub fn command(
    argv: &[String],
    env: &BTreeMap<String, String>,
    workdir: Option<&str>,
    context: &Context,
) -> io::Result<Command> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let root = context
        .root
        .as_ref()
        .map(|r| cstring(&r.to_string_lossy()))
        .transpose()?;
    let dir = cstring(workdir.unwrap_or("/"))?;

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOSTNAME", current_hostname())
        .envs(env)
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (chroot, chdir, setsid) on C strings allocated before
    // the fork. std applies its own `current_dir` before this hook, which is why the
    // directory is changed here, after the chroot.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(root) = &root
                && libc::chroot(root.as_ptr()) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::chdir(dir.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// `/dev/console` for a child's output.
fn console() -> io::Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
}

/// Starts a service with its output on the console; returns its pid.
pub fn spawn_service(service: &ServiceCommand, context: &Context) -> io::Result<u32> {
    let mut cmd = command(
        &service.argv,
        &service.env,
        service.workdir.as_deref(),
        context,
    )?;
    cmd.stdout(console()?).stderr(console()?);
    let mut reg = registry();
    let child = cmd.spawn()?;
    let pid = child.id();
    reg.services.insert(pid as i32, service.name.clone());
    // Dropping a Child neither kills nor waits for it; the reaper collects it.
    drop(child);
    Ok(pid)
}

/// Spawns an `exec` child (stdout and stderr piped) and returns it with a receiver for its
/// exit, which [`reap`] delivers. Never call `wait` on the returned child.
pub fn spawn_exec(mut cmd: Command) -> io::Result<(Child, Receiver<Exit>)> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let (tx, rx) = mpsc::channel();
    let mut reg = registry();
    let child = cmd.spawn()?;
    reg.execs.insert(child.id() as i32, tx);
    Ok((child, rx))
}

/// Reaps every exited child: exec exits go to their threads, service exits are returned,
/// other children (orphans re-parented to PID 1) are just collected.
pub fn reap() -> Vec<ServiceExit> {
    let mut exits = Vec::new();
    let mut reg = registry();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable int for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        let exit = Exit::from_wait_status(status);
        if let Some(tx) = reg.execs.remove(&pid) {
            let _ = tx.send(exit);
        } else if let Some(name) = reg.services.remove(&pid) {
            exits.push(ServiceExit { name, status: exit });
        }
    }
    exits
}

/// The running processes of service `name` (those started for it and not yet reaped).
pub fn service_pids(name: &str) -> Vec<i32> {
    registry()
        .services
        .iter()
        .filter(|(_, n)| n.as_str() == name)
        .map(|(pid, _)| *pid)
        .collect()
}

/// Stops every running process of service `name`: SIGTERM to its process group (each
/// service leads its own session), SIGKILL once `grace` has passed, then waits (at most two
/// more seconds) until they are reaped. Returns every service exit reaped meanwhile, for
/// the caller to report (this service's and any other's). Not running: nothing to stop.
pub fn stop_service(name: &str, grace: std::time::Duration) -> Vec<ServiceExit> {
    let pids = || service_pids(name);
    let signal = |signal: libc::c_int| {
        for pid in pids() {
            // SAFETY: kill(2) on a pid and on its process group; no memory involved.
            unsafe {
                libc::kill(-pid, signal);
                libc::kill(pid, signal);
            }
        }
    };
    signal(libc::SIGTERM);
    let start = std::time::Instant::now();
    let mut killed = false;
    let mut exits = Vec::new();
    while !pids().is_empty() && start.elapsed() < grace + std::time::Duration::from_secs(2) {
        if !killed && start.elapsed() >= grace {
            signal(libc::SIGKILL);
            killed = true;
        }
        exits.extend(reap());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    exits
}

/// Signals a whole process group (exec children lead their own session).
pub fn kill_group(pid: u32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(Exit::from_wait_status(0), Exit::Code(0));
        assert_eq!(Exit::from_wait_status(3 << 8), Exit::Code(3));
        assert_eq!(Exit::from_wait_status(9), Exit::Signal(9));
        assert_eq!(Exit::Code(3).code_and_signal(), (Some(3), None));
        assert_eq!(Exit::Signal(15).code_and_signal(), (None, Some(15)));
    }

    #[test]
    fn empty_argv_is_refused() {
        assert!(command(&[], &BTreeMap::new(), None, &Context::default()).is_err());
    }
}
