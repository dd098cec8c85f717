//! `hangar bench` runs the `hangar-bench` binary next to it (else on PATH) with the same
//! arguments, its exit status and output passed through; without one it says how to build
//! it. (The benchmarks themselves are tested in crates/hangar-bench.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of `hangar` alone in a fresh directory (a hard link where possible).
fn lone_hangar() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let hangar = dir.path().join("hangar");
    if std::fs::hard_link(common::HANGAR, &hangar).is_err() {
        std::fs::copy(common::HANGAR, &hangar).unwrap();
    }
    (dir, hangar)
}

fn empty_path(dir: &Path) -> PathBuf {
    let path = dir.join("empty-path");
    std::fs::create_dir_all(&path).unwrap();
    path
}

#[test]
fn without_hangar_bench_it_says_how_to_build_it() {
    let (dir, hangar) = lone_hangar();
    let output = Command::new(&hangar)
        .args(["bench", "--quick"])
        .env("PATH", empty_path(dir.path()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("hangar-bench") && stderr.contains("cargo build --release -p hangar-bench"),
        "{stderr}"
    );
}

#[test]
fn it_runs_the_hangar_bench_beside_it_with_the_same_arguments() {
    let (dir, hangar) = lone_hangar();
    let bench = dir.path().join("hangar-bench");
    std::fs::write(
        &bench,
        "#!/bin/sh\nprintf '%s\\n' \"$@\"\necho \"HANGAR_BIN=$HANGAR_BIN\"\nexit 7\n",
    )
    .unwrap();
    std::fs::set_permissions(&bench, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new(&hangar)
        .args(["bench", "pool", "--hits", "3", "--help", "a b"])
        .env("PATH", empty_path(dir.path()))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(7), "its exit status");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "pool\n--hits\n3\n--help\na b\nHANGAR_BIN={}\n",
            hangar.display()
        )
    );
}
