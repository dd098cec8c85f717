//! [`ReplicatedPair`]: a throwaway PostgreSQL primary and a streaming standby made from it
//! with `pg_basebackup -R`, on loopback ports, for tests of failover.
//!
//! Replication is synchronous (`synchronous_standby_names = '*'`, `synchronous_commit =
//! on` on the primary): a commit is acknowledged only once the standby has the WAL, so a
//! write a client saw succeed is on the standby when it is promoted. The standby's own
//! settings name no synchronous standby, so once promoted it commits alone.
//!
//! Each server runs under a small shell keeper, as the single cluster of this crate does:
//! the keeper holds the read end of a pipe from this process, and when the pipe closes (the
//! pair is dropped, or this process ends however it ends) it stops its server and removes
//! its directory. [`ReplicatedPair::kill_primary`] is `kill -9` of the primary's
//! postmaster; its keeper still removes the directory afterwards.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::{bin_dir, command, free_port, psql, run_as, tool};

/// The keeper of one server: `$1` bin dir, `$2` node dir, `$3` port, `$4` extra settings.
const NODE_KEEPER: &str = r#"
"$1/postgres" -D "$2/data" -p "$3" -k "$2" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c full_page_writes=off -c max_connections=200 \
    -c wal_level=replica -c max_wal_senders=5 -c hot_standby=on $4 >"$2/log" 2>&1 &
pg=$!
cat >/dev/null
kill -QUIT "$pg" 2>/dev/null
wait "$pg"
rm -rf "$2"
"#;

/// The database the pair's [`ReplicatedPair::url`] names.
pub const DATABASE: &str = "hangar";

/// One server of the pair.
#[derive(Debug)]
struct Node {
    dir: PathBuf,
    port: u16,
    keeper: Option<Child>,
}

impl Node {
    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts `postgres` on this node's data directory under a keeper.
    fn start(&mut self, ids: Option<(u32, u32)>, bin: &Path, extra: &str) -> Result<(), String> {
        let keeper = command("sh", ids)
            .arg("-c")
            .arg(NODE_KEEPER)
            .arg("hangar-test-pg-node")
            .arg(bin)
            .arg(&self.dir)
            .arg(self.port.to_string())
            .arg(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot start postgres: {err}"))?;
        self.keeper = Some(keeper);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = match psql(&self.admin_url(), "SELECT 1") {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            let exited = self
                .keeper
                .as_mut()
                .is_none_or(|child| !matches!(child.try_wait(), Ok(None)));
            if exited || Instant::now() > deadline {
                return Err(format!(
                    "postgres on port {} did not start: {last}\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let mut tail: Vec<&str> = log.lines().rev().take(15).collect();
        tail.reverse();
        tail.join("\n")
    }

    /// The postmaster's pid, from `postmaster.pid`.
    fn postmaster_pid(&self) -> Result<u32, String> {
        let path = self.dir.join("data/postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .ok_or_else(|| format!("no pid in {}", path.display()))
    }

    /// Closes the keeper's pipe and waits for it: the server stops, its directory goes.
    fn stop(&mut self) {
        if let Some(mut keeper) = self.keeper.take() {
            if let Some(mut stdin) = keeper.stdin.take() {
                let _ = stdin.flush();
            }
            let _ = keeper.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary and a synchronous streaming standby on loopback, both stopped and removed
/// when dropped (also after [`ReplicatedPair::kill_primary`], and when a test panics).
#[derive(Debug)]
pub struct ReplicatedPair {
    primary: Node,
    standby: Node,
}

impl ReplicatedPair {
    /// Starts a primary (`initdb`), makes the database [`DATABASE`] on it, then a standby
    /// from a base backup of it (`pg_basebackup -R`, streaming), waits until the standby
    /// streams, and makes replication synchronous.
    ///
    /// # Panics
    /// When PostgreSQL's server programs are missing or a step fails, with the reason
    /// (and the servers' log tails).
    pub fn start() -> ReplicatedPair {
        ReplicatedPair::try_start().unwrap_or_else(|why| panic!("no replicated PostgreSQL: {why}"))
    }

    fn try_start() -> Result<ReplicatedPair, String> {
        let bin = bin_dir().ok_or(
            "no PostgreSQL server programs in /usr/lib/postgresql/*/bin (install postgresql-15)",
        )?;
        let ids = run_as()?;
        let node = || -> Result<Node, String> {
            let dir = tempfile::Builder::new()
                .prefix("hangar-test-pg-ha-")
                .tempdir()
                .map_err(|err| format!("cannot make a temporary directory: {err}"))?
                .keep();
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                    .map_err(|err| format!("cannot give {} to postgres: {err}", dir.display()))?;
            }
            Ok(Node {
                dir,
                port: free_port()?,
                keeper: None,
            })
        };
        // From here on, dropping `pair` stops whatever was started and removes both dirs.
        let mut pair = ReplicatedPair {
            primary: node()?,
            standby: node()?,
        };
        let initdb = command(bin.join("initdb"), ids)
            .arg("-D")
            .arg(pair.primary.dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .args(["--no-instructions", "--locale=C"])
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("cannot run initdb: {err}"))?;
        if !initdb.status.success() {
            let why = String::from_utf8_lossy(&initdb.stderr).trim().to_owned();
            return Err(format!("initdb failed: {why}"));
        }
        pair.primary.start(ids, &bin, "")?;
        psql(
            &pair.primary.admin_url(),
            &format!("CREATE DATABASE \"{DATABASE}\""),
        )?;
        let backup = command(bin.join("pg_basebackup"), ids)
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R"])
            .args(["--no-sync", "-c", "fast", "-p"])
            .arg(pair.primary.port.to_string())
            .arg("-D")
            .arg(pair.standby.dir.join("data"))
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("cannot run pg_basebackup: {err}"))?;
        if !backup.status.success() {
            let why = String::from_utf8_lossy(&backup.stderr).trim().to_owned();
            return Err(format!("pg_basebackup failed: {why}"));
        }
        pair.standby.start(ids, &bin, "-c cluster_name=standby")?;
        pair.wait_streaming()?;
        psql(
            &pair.primary.admin_url(),
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        )?;
        psql(&pair.primary.admin_url(), "SELECT pg_reload_conf()")?;
        Ok(pair)
    }

    /// Waits until the primary lists a standby that streams.
    fn wait_streaming(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let streaming = query(
                &self.primary.admin_url(),
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )?;
            if streaming == "1" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the standby does not stream:\n{}",
                    self.standby.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The connection string hangar is given: both servers, primary first, asking for the
    /// one that takes writes (`target_session_attrs=read-write`).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DATABASE}?target_session_attrs=read-write",
            self.primary.port, self.standby.port
        )
    }

    /// The database [`DATABASE`] on the primary alone.
    pub fn primary_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{DATABASE}",
            self.primary.port
        )
    }

    /// The database [`DATABASE`] on the standby alone.
    pub fn standby_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{DATABASE}",
            self.standby.port
        )
    }

    /// `kill -9` of the primary's postmaster (its backends end when they notice).
    pub fn kill_primary(&self) -> Result<(), String> {
        let pid = self.primary.postmaster_pid()?;
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .map_err(|err| format!("cannot run kill: {err}"))?;
        if !status.success() {
            return Err(format!("kill -9 {pid} failed"));
        }
        Ok(())
    }

    /// Promotes the standby (`pg_promote()`, which waits until it is done): from then on it
    /// takes writes.
    pub fn promote_standby(&self) -> Result<(), String> {
        let promoted = query(&self.standby.admin_url(), "SELECT pg_promote(true, 60)")?;
        if promoted != "t" {
            return Err(format!("pg_promote answered {promoted:?}"));
        }
        Ok(())
    }

    /// Whether the standby is (still) in recovery, i.e. not promoted.
    pub fn standby_in_recovery(&self) -> Result<bool, String> {
        Ok(query(&self.standby.admin_url(), "SELECT pg_is_in_recovery()")? == "t")
    }

    /// The last lines of both servers' logs, for a failing test's message.
    pub fn logs(&self) -> String {
        format!(
            "--- primary (port {}):\n{}\n--- standby (port {}):\n{}",
            self.primary.port,
            self.primary.log_tail(),
            self.standby.port,
            self.standby.log_tail()
        )
    }
}

impl Drop for ReplicatedPair {
    fn drop(&mut self) {
        self.standby.stop();
        self.primary.stop();
    }
}

/// Runs one query through `psql` and answers its single value (unaligned, tuples only).
pub fn query(url: &str, sql: &str) -> Result<String, String> {
    let output = std::process::Command::new(tool("psql"))
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run psql (install postgresql-client): {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_on_the_primary_survives_its_death_on_the_promoted_standby() {
        let pair = ReplicatedPair::start();
        assert!(pair.url().contains("target_session_attrs=read-write"));
        psql(&pair.primary_url(), "CREATE TABLE t (x INT)").unwrap();
        psql(&pair.primary_url(), "INSERT INTO t VALUES (42)").unwrap();
        assert!(pair.standby_in_recovery().unwrap());
        assert!(
            psql(&pair.standby_url(), "INSERT INTO t VALUES (1)").is_err(),
            "a standby refuses writes"
        );
        pair.kill_primary().unwrap();
        let gone = Instant::now() + Duration::from_secs(10);
        while psql(&pair.primary_url(), "SELECT 1").is_ok() {
            assert!(Instant::now() < gone, "the killed primary still answers");
            std::thread::sleep(Duration::from_millis(50));
        }
        pair.promote_standby().unwrap();
        assert!(!pair.standby_in_recovery().unwrap());
        assert_eq!(
            query(&pair.standby_url(), "SELECT x FROM t").unwrap(),
            "42",
            "the acknowledged write is on the promoted standby"
        );
        psql(&pair.standby_url(), "INSERT INTO t VALUES (2)").expect("it takes writes now");
        let dirs = [pair.primary.dir.clone(), pair.standby.dir.clone()];
        drop(pair);
        for dir in dirs {
            assert!(!dir.exists(), "{} removed", dir.display());
        }
    }
}
