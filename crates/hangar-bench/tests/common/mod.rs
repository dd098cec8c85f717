//! Test support: the `hangar` and `hangar-bench` binaries of this build, and the guest
//! asset cache the workspace's tests share.

use std::path::{Path, PathBuf};

/// The `hangar` executable built beside `hangar-bench` (`cargo test` of the workspace
/// builds both); a test that runs `hangar bench` needs both.
pub fn hangar() -> PathBuf {
    let hangar = Path::new(env!("CARGO_BIN_EXE_hangar-bench")).with_file_name("hangar");
    assert!(
        hangar.is_file(),
        "{} is missing: build it first (`cargo build -p hangar-cli`, or test the whole \
         workspace)",
        hangar.display()
    );
    hangar
}

/// Guest assets and images are cached across tests (and runs) here, shared with the
/// CLI's tests.
pub fn shared_cache() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hangar-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Does something listen on the unix socket at `path`?
pub fn socket_answers(path: &str) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Processes whose command line mentions `text`.
pub fn processes_mentioning(text: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&raw).contains(text)
        {
            found.push(pid);
        }
    }
    found
}

/// Runs `command` (a `hangar bench ...` with `--json`), which must succeed (else the test
/// fails with its stderr, naming `what`), and parses its standard output.
pub fn json_of(command: &mut std::process::Command, what: &str) -> serde_json::Value {
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what} failed:\n{stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&output.stdout)))
}
