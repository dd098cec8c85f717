//! `hangar bench`: runs the `hangar-bench` binary (the benchmarks live in their own crate,
//! so that this binary does not carry them) with the same arguments.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::error::CliError;

/// Everything after `bench`, `--help` included, goes to `hangar-bench` as given.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// The benchmark's arguments: `hangar bench --help` lists them.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// Replaces this process with `hangar-bench ARGS` (so its output, exit status and signals
/// are the benchmark's), found next to this executable, else on `PATH`; it is told this
/// executable in `HANGAR_BIN` to start its servers with. Returns only on failure: when
/// there is no `hangar-bench` (saying how to build it) or it cannot be started.
pub fn run(args: BenchArgs) -> Result<(), CliError> {
    let this = std::env::current_exe()
        .map_err(|err| CliError::Failed(format!("cannot find its own executable: {err}")))?;
    let Some(bench) = find_bench(&this, std::env::var_os("PATH")) else {
        return Err(CliError::Failed(format!(
            "`hangar bench` runs the hangar-bench binary, found neither next to {} nor on \
             PATH; build it with `cargo build --release -p hangar-bench` (`cargo build \
             --release` at the workspace root builds both)",
            this.display()
        )));
    };
    let err = std::process::Command::new(&bench)
        .args(args.args)
        .env("HANGAR_BIN", &this)
        .exec();
    Err(CliError::Failed(format!(
        "cannot run {}: {err}",
        bench.display()
    )))
}

/// `hangar-bench` next to `this` executable, else the first on `path`.
fn find_bench(this: &Path, path: Option<OsString>) -> Option<PathBuf> {
    this.parent()
        .map(|dir| dir.join("hangar-bench"))
        .into_iter()
        .chain(std::env::split_paths(&path.unwrap_or_default()).map(|dir| dir.join("hangar-bench")))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hangar_bench_is_found_next_to_hangar_before_path() {
        let dir = tempfile::tempdir().unwrap();
        let beside = dir.path().join("bin");
        let on_path = dir.path().join("path");
        std::fs::create_dir_all(&beside).unwrap();
        std::fs::create_dir_all(&on_path).unwrap();
        let this = beside.join("hangar");
        let path = Some(on_path.clone().into_os_string());

        assert_eq!(find_bench(&this, path.clone()), None);
        std::fs::write(on_path.join("hangar-bench"), "").unwrap();
        assert_eq!(
            find_bench(&this, path.clone()),
            Some(on_path.join("hangar-bench"))
        );
        std::fs::write(beside.join("hangar-bench"), "").unwrap();
        assert_eq!(find_bench(&this, path), Some(beside.join("hangar-bench")));
    }
}
