//! The `hangar` executable the benchmarks run (`hangar server`, `hangar forwarder`), and
//! its default data dir.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Set by `hangar bench` to its own executable when it runs this binary.
pub const HANGAR_BIN_ENV: &str = "HANGAR_BIN";

/// The `hangar` executable: `$HANGAR_BIN` (set by `hangar bench`), else `hangar` next to
/// this executable (as cargo builds them), else `hangar` on `PATH`. Fails, saying how to
/// get one, when there is none.
pub fn hangar_exe() -> Result<PathBuf, String> {
    let this = std::env::current_exe().ok();
    find(
        std::env::var_os(HANGAR_BIN_ENV),
        this.as_deref(),
        std::env::var_os("PATH"),
    )
    .ok_or_else(|| {
        "no `hangar` executable next to hangar-bench or on PATH; build both with \
         `cargo build --release` at the workspace root, or set HANGAR_BIN"
            .to_owned()
    })
}

fn find(
    explicit: Option<OsString>,
    this: Option<&Path>,
    path: Option<OsString>,
) -> Option<PathBuf> {
    if let Some(explicit) = explicit.filter(|e| !e.is_empty()) {
        return Some(PathBuf::from(explicit));
    }
    let beside = this.and_then(Path::parent).map(|dir| dir.join("hangar"));
    beside
        .into_iter()
        .chain(std::env::split_paths(&path.unwrap_or_default()).map(|dir| dir.join("hangar")))
        .find(|candidate| candidate.is_file())
}

/// The data dir `hangar server` uses when given none (the benchmarks share its `cache`).
pub use hangar_image::hostfs::default_data_dir;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hangar_is_the_given_one_else_beside_this_binary_else_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let beside = dir.path().join("bin");
        let on_path = dir.path().join("path");
        std::fs::create_dir_all(&beside).unwrap();
        std::fs::create_dir_all(&on_path).unwrap();
        let this = beside.join("hangar-bench");
        let path = Some(on_path.clone().into_os_string());

        assert_eq!(find(None, Some(&this), path.clone()), None);
        std::fs::write(on_path.join("hangar"), "").unwrap();
        assert_eq!(
            find(None, Some(&this), path.clone()),
            Some(on_path.join("hangar"))
        );
        std::fs::write(beside.join("hangar"), "").unwrap();
        assert_eq!(
            find(None, Some(&this), path.clone()),
            Some(beside.join("hangar"))
        );
        assert_eq!(
            find(Some("/opt/hangar".into()), Some(&this), path),
            Some(PathBuf::from("/opt/hangar"))
        );
    }
}
