//! Builds `guest/hangar-init` as a static x86_64 binary in its own cargo invocation and
//! leaves it at `$OUT_DIR/hangar-init` for `include_bytes!`.
//!
//! The nested build gets its own target directory (no lock shared with the outer build)
//! and a clean environment: the outer build's flags, wrappers (clippy's
//! `RUSTC_WORKSPACE_WRAPPER`), target dir and build-script variables are removed, so that
//! `cargo build`, `cargo test` and `cargo clippy` all produce the same plain static binary.
//! `--target` is explicit so that `+crt-static` applies to hangar-init only, not to build
//! scripts and proc macros (which cannot be static).

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Environment variables of the outer build that must not reach the nested one.
const REMOVE: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_LINKER",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "MAKEFLAGS",
    "MFLAGS",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

/// Prefixes of variables to remove (build-script inputs and build configuration).
const REMOVE_PREFIXES: &[&str] = &[
    "CARGO_BUILD_",
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_TARGET_",
    "CARGO_PROFILE_",
    "__CARGO",
];

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/hangar-image lives two levels below the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let target_dir = out_dir.join("guest-target");

    for path in [
        "guest/hangar-init",
        "crates/hangar-proto",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let mut cmd = Command::new(env("CARGO"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if REMOVE.contains(&key.as_ref()) || REMOVE_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--release",
            "-p",
            "hangar-init",
            "--target",
            TARGET,
        ])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static",
        )
        // Small binary, small initramfs: no debug info, symbols stripped.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", env("CARGO")));
    if !output.status.success() {
        panic!(
            "building guest/hangar-init failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let built = target_dir.join(TARGET).join("release").join("hangar-init");
    let dest = out_dir.join("hangar-init");
    let binary = std::fs::read(&built).unwrap_or_else(|e| panic!("read {}: {e}", built.display()));
    std::fs::write(&dest, &binary).unwrap_or_else(|e| panic!("write {}: {e}", dest.display()));
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&binary));
    std::fs::write(out_dir.join("hangar-init.sha256"), digest)
        .unwrap_or_else(|e| panic!("write the hangar-init digest: {e}"));
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("cargo sets {key} for build scripts"))
}
