//! Test support: a real PostgreSQL, with a fresh database for each test.
//!
//! [`TestDatabase::create`] makes an empty database and drops it again when the value is
//! dropped. The server it lives on is, in order:
//! - the one `HANGAR_TEST_POSTGRES` names (`postgres://user@host:port/db`; the user may
//!   create databases), or
//! - a throwaway cluster this process starts on first use: `initdb` and `postgres` from
//!   Debian's `postgresql-NN` (`/usr/lib/postgresql/*/bin`, or `HANGAR_TEST_PG_BIN`), in a
//!   temporary directory, listening on 127.0.0.1 and a free port, run as the `postgres`
//!   user when this process is root (PostgreSQL refuses to run as root). A small shell
//!   keeper holds the read end of a pipe from this process: when the process ends, however
//!   it ends, the keeper stops PostgreSQL and removes the directory.
//!
//! Nothing is skipped: when no PostgreSQL can be had, `create` panics saying why.
//!
//! [`ReplicatedPair`] is a primary and a streaming standby of its own (for tests of
//! failover), not shared with [`TestDatabase`].

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod replicated;
pub use replicated::ReplicatedPair;

/// The variable naming an existing PostgreSQL server to use instead of a throwaway one.
pub const ENV_URL: &str = "HANGAR_TEST_POSTGRES";

/// An empty database on a real PostgreSQL, dropped when this value is.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database.
    ///
    /// # Panics
    /// When no PostgreSQL can be started or reached, or the database cannot be created,
    /// with the reason.
    pub fn create() -> TestDatabase {
        let admin_url = match server() {
            Ok(url) => url.clone(),
            Err(why) => panic!("no PostgreSQL for this test: {why}"),
        };
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!(
            "hangar_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(why) = psql(&admin_url, &format!("CREATE DATABASE \"{name}\"")) {
            panic!("cannot create test database {name}: {why}");
        }
        TestDatabase {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
    }

    /// `postgres://…` URL of the database.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(why) = psql(&self.admin_url, &sql) {
            eprintln!("warning: cannot drop test database {}: {why}", self.name);
        }
    }
}

/// The admin URL of this process's server, started on first use.
fn server() -> &'static Result<String, String> {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var(ENV_URL) {
        Ok(url) if !url.is_empty() => {
            psql(&url, "SELECT 1").map_err(|why| format!("{ENV_URL}={url}: {why}"))?;
            Ok(url)
        }
        _ => start_cluster(),
    })
}

/// `base` with its database name replaced by `name`.
fn with_database(base: &str, name: &str) -> String {
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let (head, rest) = base.split_at(scheme_end);
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    format!("{head}{authority}/{name}{query}")
}

/// Runs one SQL statement through `psql` against `url`.
pub(crate) fn psql(url: &str, sql: &str) -> Result<(), String> {
    let output = Command::new(tool("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run psql (install postgresql-client): {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// The directory with Debian's PostgreSQL server programs, the newest version first.
pub(crate) fn bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("HANGAR_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, dir)| dir)
}

/// A PostgreSQL program: from the server's directory when there is one, else from PATH.
pub(crate) fn tool(name: &str) -> PathBuf {
    bin_dir()
        .map(|dir| dir.join(name))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The uid and gid of `user`, from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&user) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// Who the server runs as: the `postgres` user when we are root, else ourselves.
pub(crate) fn run_as() -> Result<Option<(u32, u32)>, String> {
    let euid = std::fs::metadata("/proc/self")
        .map_err(|err| format!("cannot read /proc/self: {err}"))?
        .uid();
    if euid != 0 {
        return Ok(None);
    }
    user_ids("postgres")
        .map(Some)
        .ok_or_else(|| "running as root and there is no postgres user to run PostgreSQL as (install postgresql-15)".to_owned())
}

pub(crate) fn command(program: impl AsRef<std::ffi::OsStr>, ids: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// The keeper process; its stdin is the pipe whose closing stops the cluster.
static KEEPER: Mutex<Option<Child>> = Mutex::new(None);

const KEEPER_SCRIPT: &str = r#"
"$1/postgres" -D "$2/data" -p "$3" -k "$2" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c max_connections=400 >"$2/log" 2>&1 &
pg=$!
cat >/dev/null
kill -QUIT "$pg" 2>/dev/null
wait "$pg"
rm -rf "$2"
"#;

fn start_cluster() -> Result<String, String> {
    let bin = bin_dir().ok_or(
        "no PostgreSQL server programs in /usr/lib/postgresql/*/bin \
         (install postgresql-15 or set HANGAR_TEST_POSTGRES)",
    )?;
    let ids = run_as()?;
    let dir = tempfile::Builder::new()
        .prefix("hangar-test-pg-")
        .tempdir()
        .map_err(|err| format!("cannot make a temporary directory: {err}"))?
        .keep();
    let fail = |why: String| {
        let _ = std::fs::remove_dir_all(&dir);
        why
    };
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|err| fail(format!("cannot give {} to postgres: {err}", dir.display())))?;
    }
    let initdb = command(bin.join("initdb"), ids)
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        .args(["--no-instructions", "--locale=C"])
        .stdin(Stdio::null())
        .output()
        .map_err(|err| fail(format!("cannot run initdb: {err}")))?;
    if !initdb.status.success() {
        let why = String::from_utf8_lossy(&initdb.stderr).trim().to_owned();
        return Err(fail(format!("initdb failed: {why}")));
    }
    let port = free_port().map_err(&fail)?;
    let keeper = command("sh", ids)
        .arg("-c")
        .arg(KEEPER_SCRIPT)
        .arg("hangar-test-pg")
        .arg(&bin)
        .arg(&dir)
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| fail(format!("cannot start postgres: {err}")))?;
    *KEEPER.lock().unwrap_or_else(|p| p.into_inner()) = Some(keeper);
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    wait_ready(&url, &dir)?;
    Ok(url)
}

/// Waits until the server answers, or says why it did not (its log's tail).
fn wait_ready(url: &str, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match psql(url, "SELECT 1") {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        let exited = KEEPER
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .is_none_or(|child| !matches!(child.try_wait(), Ok(None)));
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        // Our own probe, too early, is refused with a FATAL that is not the server's.
        let log_says_fatal = log
            .lines()
            .any(|line| line.contains("FATAL") && !line.contains("is starting up"));
        if exited || log_says_fatal || Instant::now() > deadline {
            stop_cluster();
            let tail: String = log.lines().rev().take(10).collect::<Vec<_>>().join("\n");
            return Err(format!("postgres did not start: {last}\n{tail}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Closes the keeper's pipe: it stops the server and removes its directory.
fn stop_cluster() {
    if let Some(mut keeper) = KEEPER.lock().unwrap_or_else(|p| p.into_inner()).take() {
        if let Some(mut stdin) = keeper.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = keeper.wait();
    }
}

pub(crate) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| format!("cannot find a free port: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gets_another_database() {
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t1"), "postgres://h/t1");
    }

    #[test]
    fn databases_are_fresh_and_dropped() {
        let (a, b) = (TestDatabase::create(), TestDatabase::create());
        assert_ne!(a.url(), b.url());
        psql(a.url(), "CREATE TABLE t (x INT)").unwrap();
        psql(b.url(), "CREATE TABLE t (x INT)").expect("b is a different, empty database");
        let url = a.url().to_owned();
        drop(a);
        assert!(psql(&url, "SELECT 1").is_err(), "dropped");
    }
}
