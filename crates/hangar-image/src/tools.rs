//! External tools (dpkg-deb, apt-get, mkfs.ext4, qemu-img) and ELF checks.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::AssetError;

/// Directories searched besides `$PATH` (sbin is often missing from a user's PATH).
const EXTRA_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Finds an executable, or says which Debian package provides it.
pub fn find(tool: &'static str, package: &'static str) -> Result<PathBuf, AssetError> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .ok_or(AssetError::ToolMissing { tool, package })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
/// Makes `cmd` create files with the conventional umask 0022: for the tools that build a
/// guest's tree (debootstrap, apt and dpkg in a chroot), whose files are the guest's, not the
/// server's, and must keep the modes a Debian system has whatever the server's own umask.
pub fn guest_tree_umask(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask(2) is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        })
    }
}

pub fn run(cmd: &mut Command) -> Result<Output, AssetError> {
    let rendered = render(cmd);
    tracing::debug!(command = %rendered, "running");
    let output = cmd
        .output()
        .map_err(|e| AssetError::io(format!("run `{rendered}`"), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(AssetError::ToolFailed {
            command: rendered,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// A build's cancellation: cloned into the build, set once by whoever cancels it. A build
/// checks it between its stages, and [`run_cancellable`] kills a running tool's whole
/// process group when it is set.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A cancellation not set yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Cancels the build (idempotent).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the build was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// [`AssetError::Cancelled`] once cancelled: call it between a build's stages.
    pub fn check(&self) -> Result<(), AssetError> {
        if self.is_cancelled() {
            Err(AssetError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// How often [`run_cancellable`] looks at its child and at the cancellation.
const POLL: Duration = Duration::from_millis(50);

/// How long [`run_cancellable`] waits, after killing a cancelled tool's process group, for
/// every process of the group to be gone.
const GROUP_GONE: Duration = Duration::from_secs(5);

/// [`run`] for a long tool (debootstrap, apt-get in a chroot, mksquashfs) that `cancel`
/// interrupts: the tool runs in a process group of its own, and when `cancel` is set the
/// whole group (the tool and everything it started and did not move out of the group) is
/// killed with `SIGKILL`, the tool reaped, and [`AssetError::Cancelled`] returned once no
/// process of the group is left (or after a few seconds). Its output goes through
/// unnamed temporary files, so a chatty tool never blocks on a full pipe.
pub fn run_cancellable(cmd: &mut Command, cancel: &Cancel) -> Result<Output, AssetError> {
    use std::os::unix::process::CommandExt;
    let rendered = render(cmd);
    cancel.check()?;
    tracing::debug!(command = %rendered, "running (cancellable)");
    let io_err = |what: &str, e| AssetError::io(format!("{what} `{rendered}`"), e);
    let mut stdout = tempfile::tempfile().map_err(|e| io_err("capture the output of", e))?;
    let mut stderr = tempfile::tempfile().map_err(|e| io_err("capture the errors of", e))?;
    let out_handle = stdout
        .try_clone()
        .map_err(|e| io_err("capture the output of", e))?;
    let err_handle = stderr
        .try_clone()
        .map_err(|e| io_err("capture the errors of", e))?;
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out_handle)
        .stderr(err_handle)
        .spawn()
        .map_err(|e| io_err("run", e))?;
    let pgid = child.id() as libc::pid_t;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| io_err("wait for", e))? {
            break status;
        }
        if cancel.is_cancelled() {
            kill_group(pgid);
            let _ = child.wait();
            wait_group_gone(pgid);
            tracing::info!(command = %rendered, "cancelled: process group killed");
            return Err(AssetError::Cancelled);
        }
        std::thread::sleep(POLL);
    };
    let read_all = |file: &mut std::fs::File| {
        let mut bytes = Vec::new();
        file.rewind()
            .and_then(|()| file.read_to_end(&mut bytes))
            .map(|_| bytes)
    };
    let output = Output {
        status,
        stdout: read_all(&mut stdout).map_err(|e| io_err("read the output of", e))?,
        stderr: read_all(&mut stderr).map_err(|e| io_err("read the errors of", e))?,
    };
    if output.status.success() {
        Ok(output)
    } else {
        Err(AssetError::ToolFailed {
            command: rendered,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Sends `SIGKILL` to every process of group `pgid`.
fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is shared.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Waits until no live process of group `pgid` is left (killing again what appears), for
/// at most [`GROUP_GONE`]. Zombies do not count: they run nothing, and the orphans among
/// them are init's to reap.
fn wait_group_gone(pgid: libc::pid_t) {
    let deadline = Instant::now() + GROUP_GONE;
    while Instant::now() < deadline {
        if group_members(pgid).is_empty() {
            return;
        }
        kill_group(pgid);
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(pgid, "processes of a cancelled tool remain");
}

/// The live (not zombie) processes of process group `pgid`, from /proc.
fn group_members(pgid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // proc_pid_stat(5): after the command in parentheses: state, ppid, pgrp.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|p| p.parse::<libc::pid_t>().ok());
            state != Some("Z") && pgrp == Some(pgid)
        })
        .collect()
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// True when an ELF64 little-endian file has a `PT_INTERP` program header (it is
/// dynamically linked). Anything that is not such an ELF file counts as having one (it
/// cannot serve as a static guest binary).
pub fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read_u16 = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let read_u32 = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let read_u64 = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if elf.get(0..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return true;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (read_u64(0x20), read_u16(0x36), read_u16(0x38))
    else {
        return true;
    };
    (0..phnum as usize).any(|i| {
        let at = phoff as usize + i * phentsize as usize;
        read_u32(at).is_none_or(|p_type| p_type == PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tools_or_names_the_package() {
        assert!(find("sh", "dash").is_ok());
        let err = find("hangar-no-such-tool", "hangar-pkg").unwrap_err();
        assert_eq!(
            err.to_string(),
            "hangar-no-such-tool not found: install it with `apt-get install hangar-pkg`"
        );
    }

    #[test]
    fn failures_carry_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo nope >&2; exit 2"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nope") && text.contains("sh -c"), "{text}");
    }

    #[test]
    fn cancellable_runs_return_output_and_failures() {
        let cancel = Cancel::new();
        let output = run_cancellable(Command::new("sh").args(["-c", "echo out"]), &cancel).unwrap();
        assert_eq!(output.stdout, b"out\n");
        let err = run_cancellable(
            Command::new("sh").args(["-c", "echo nope >&2; exit 3"]),
            &cancel,
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        cancel.cancel();
        assert!(matches!(
            run_cancellable(&mut Command::new("true"), &cancel),
            Err(AssetError::Cancelled)
        ));
    }

    #[test]
    fn a_cancel_kills_the_whole_process_group_within_a_second() {
        let cancel = Cancel::new();
        let pid_file = tempfile::NamedTempFile::new().unwrap();
        let script = format!(
            "echo $$ > {}; sleep 30 & sleep 30; wait",
            pid_file.path().display()
        );
        let runner = {
            let cancel = cancel.clone();
            std::thread::spawn(move || {
                run_cancellable(Command::new("sh").args(["-c", &script]), &cancel)
            })
        };
        // Wait for the shell and both sleeps to run.
        let started = Instant::now();
        let pgid = loop {
            assert!(started.elapsed() < Duration::from_secs(10), "never started");
            let pgid = std::fs::read_to_string(pid_file.path())
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pgid) = pgid
                && group_members(pgid).len() >= 3
            {
                break pgid;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let cancelled_at = Instant::now();
        cancel.cancel();
        let result = runner.join().unwrap();
        let took = cancelled_at.elapsed();
        assert!(matches!(result, Err(AssetError::Cancelled)), "{result:?}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert_eq!(group_members(pgid), Vec::<i32>::new(), "the group is gone");
    }

    #[test]
    fn detects_dynamic_executables() {
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(
            has_interpreter(&sh),
            "/bin/sh is dynamically linked on Debian"
        );
        assert!(has_interpreter(b"not an elf"));
    }
}
