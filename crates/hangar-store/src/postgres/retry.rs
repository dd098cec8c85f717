//! Following the primary: how [`PgStore`] connects to whichever server takes writes, and
//! how it retries an operation that failed because that server went away or stopped taking
//! writes (a failover).
//!
//! - **Connecting.** The store's URL may name several servers
//!   (`postgres://h1:5432,h2:5432/hangar?target_session_attrs=read-write`): each new
//!   connection tries them in order and keeps the first that takes writes (a standby
//!   answers `transaction_read_only = on` and is passed over). Each socket connection gets
//!   [`CONNECT_TIMEOUT`] unless the URL says otherwise.
//! - **Dropping.** Connections that closed are never handed out again (the pool checks
//!   each one it recycles). After any failure that may come from a failover, the pool's
//!   idle connections are dropped too, so the next attempt connects afresh and so finds the
//!   new primary: a server that became read-only keeps its connections open, and they
//!   would otherwise keep answering "read-only".
//! - **Retrying.** An operation is run again, with backoff (`50 ms`, doubling, at most
//!   [`RETRY_FOR`] in all), when its attempt failed for a reason a failover explains:
//!   no server that takes writes could be connected to, a server refused the write
//!   (read-only, in recovery, shutting down), the connection broke, or the attempt took
//!   longer than [`ATTEMPT_TIMEOUT`]. Any other error (a conflict, a missing row, bad SQL)
//!   is answered at once. Past [`RETRY_FOR`] the error is [`StoreError::Unavailable`].
//! - **Ambiguous commits.** When a connection breaks while a write is in flight, the write
//!   may have committed (the server wrote it, and its answer was lost) or not. Every
//!   operation is therefore written so that running it again after such an attempt gives
//!   the answer the first run would have: most writes are idempotent (`UPDATE … SET x = v`,
//!   upserts); the others look, on an attempt after a broken one ([`Attempt::after_broken`]),
//!   for the trace their first run would have left (an inserted row with this id, a step
//!   started at the same instant, a claim stamped with this claim's time) and answer from
//!   it. With synchronous replication (see the README's "Highly available store") a commit
//!   the old primary acknowledged is on the promoted standby, and one it did not
//!   acknowledge either is there too or is not: both are handled above.

use std::future::Future;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::PgStore;
use crate::StoreError;

/// How long one socket connection attempt to one server may take (unless the URL sets
/// `connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one attempt of an operation may take before its connection is given up as
/// broken (a server that stopped answering without closing the connection).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an operation is retried in all before it fails as unavailable.
pub const RETRY_FOR: Duration = Duration::from_secs(2);
/// The first pause between attempts; each next one is twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Connections the pool keeps at most.
const POOL_SIZE: usize = 16;

/// What an operation's closure is told about the attempt it runs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attempt {
    /// An earlier attempt's connection broke while it ran: its writes may have committed.
    pub after_broken: bool,
}

/// Why an attempt failed, when a failover can explain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transient {
    /// Nothing reached a server that takes writes: no connection could be made, or the
    /// server refused the statement before running it. Nothing was written.
    NotRun,
    /// The connection broke (or hung) while the attempt ran: what it wrote may or may not
    /// have committed.
    Broken,
}

/// Makes the pool for `url`: several hosts allowed, [`CONNECT_TIMEOUT`] per connection.
pub(super) fn pool(url: &str) -> Result<Pool, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|err| StoreError::backend("postgresql URL is not valid", err))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|err| StoreError::backend("cannot make the postgresql pool", err))
}

/// Whether `err` is one a failover explains, and how far the attempt got.
fn transient(err: &StoreError) -> Option<Transient> {
    let source = match err {
        StoreError::Unavailable { .. } => return Some(Transient::NotRun),
        StoreError::Backend { source, .. } => source,
        _ => return None,
    };
    let err = source.downcast_ref::<tokio_postgres::Error>()?;
    if let Some(code) = err.code() {
        return if *code == SqlState::READ_ONLY_SQL_TRANSACTION
            || *code == SqlState::CANNOT_CONNECT_NOW
            || code.code().starts_with("08")
        {
            Some(Transient::NotRun)
        } else if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN {
            // Sent also while a commit waits for its standby: it may have committed.
            Some(Transient::Broken)
        } else {
            None
        };
    }
    let io = std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>());
    (err.is_closed() || io).then_some(Transient::Broken)
}

impl PgStore {
    /// A connection from the pool, to a server that takes writes; unavailable when none
    /// can be had (nothing was run).
    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|err| StoreError::Unavailable {
                what: "cannot reach a postgresql server that takes writes",
                source: err.into(),
            })
    }

    /// Runs `op` on a pooled connection, again (with backoff, for at most [`RETRY_FOR`])
    /// while it fails for a reason a failover explains; see the module's documentation.
    /// `op` must give, on an attempt whose [`Attempt::after_broken`] is set, the answer its
    /// first run would have given had that one's commit been acknowledged.
    pub(super) async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Object, Attempt) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let started = Instant::now();
        let mut attempt = Attempt::default();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (err, kind) = match self.client().await {
                Err(err) => (err, Some(Transient::NotRun)),
                Ok(client) => {
                    match tokio::time::timeout(ATTEMPT_TIMEOUT, op(client, attempt)).await {
                        Ok(Ok(value)) => return Ok(value),
                        Ok(Err(err)) => {
                            let kind = transient(&err);
                            (err, kind)
                        }
                        Err(_) => (
                            StoreError::backend(
                                "postgresql did not answer in time",
                                format!("no answer within {ATTEMPT_TIMEOUT:?}"),
                            ),
                            Some(Transient::Broken),
                        ),
                    }
                }
            };
            let Some(kind) = kind else {
                return Err(err);
            };
            attempt.after_broken |= kind == Transient::Broken;
            // Whatever the pool holds may lead to the old primary: connect afresh.
            let _ = self.pool.retain(|_, _| false);
            if started.elapsed() + backoff > RETRY_FOR {
                tracing::warn!(error = %chain(&err), "postgresql: no server that takes writes answers");
                return Err(match err {
                    StoreError::Unavailable { .. } => err,
                    other => StoreError::Unavailable {
                        what: "no postgresql server that takes writes answered",
                        source: other.into(),
                    },
                });
            }
            tracing::debug!(error = %chain(&err), ?backoff, "postgresql: retrying");
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}

/// `err` and its sources, for a log line.
fn chain(err: &StoreError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_error_free(err: StoreError) -> Option<Transient> {
        transient(&err)
    }

    #[test]
    fn only_failover_errors_are_retried() {
        let unavailable = StoreError::Unavailable {
            what: "x",
            source: "y".into(),
        };
        assert_eq!(db_error_free(unavailable), Some(Transient::NotRun));
        assert_eq!(
            db_error_free(StoreError::not_found(crate::Entity::Vm, "v")),
            None
        );
        assert_eq!(db_error_free(StoreError::corrupt("z")), None);
    }
}
