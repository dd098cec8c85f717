//! External tools (dpkg-deb, apt-get, mkfs.ext4, qemu-img) and ELF checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    fn detects_dynamic_executables() {
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(
            has_interpreter(&sh),
            "/bin/sh is dynamically linked on Debian"
        );
        assert!(has_interpreter(b"not an elf"));
    }
}
