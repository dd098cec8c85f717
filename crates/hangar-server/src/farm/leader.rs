//! Which replica of the control plane leads. Several `hangar server`s may share one
//! PostgreSQL store; all serve the API, one runs the loops (pools, lifecycle, images,
//! monitoring, host loss). The leader holds a lease row in the store
//! ([`hangar_store::Store::acquire_lease`]) and renews it every [`RENEW_EVERY`]; when it
//! dies its lease expires after [`LEASE_TTL`] and another replica takes it at its next
//! try, so a new leader leads within `LEASE_TTL + RENEW_EVERY` (4 s).
//!
//! A leader that cannot renew (its store is unreachable) steps down before its lease can
//! expire, so that two replicas never both believe they lead for longer than one renewal
//! period. A single server (SQLite) takes the lease at its first try and keeps it.
//!
//! A leader that stepped down because the store went away (PostgreSQL failing over to a
//! standby) takes the lease back at its first renewal on the new primary, if no other
//! replica took it meanwhile: the lease row is replicated, so it still names this replica.
//! Taking back its own lease is not a take-over: its tasks are its own and still run, so
//! they are not failed, and its host is not reconciled again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_store::now_ms;

use crate::api::error::error_chain;
use crate::farm::agents::millis;
use crate::manager::Manager;

/// The lease's name in the store.
pub const LEADER_LEASE: &str = "leader";
/// How long a lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the lease is taken or renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// The name this data dir's server holds the leader lease under: made once (a ulid in
/// `replica.id`) and kept, so that a server started again on its data dir holds the lease
/// it held before instead of waiting for it to expire.
pub fn replica_name(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("replica.id");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => write_replica_name(&path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => write_replica_name(&path),
        Err(err) => Err(err),
    }
}

fn write_replica_name(path: &std::path::Path) -> std::io::Result<String> {
    let name = ulid::Ulid::new().to_string();
    std::fs::write(path, format!("{name}\n"))?;
    Ok(name)
}

impl Manager {
    /// Tries once to take or renew the leader lease for `replica`; records and returns
    /// whether this replica leads. On a store error, keeps leading only while the lease
    /// taken at `last_held` cannot have expired yet.
    pub async fn try_lead(&self, replica: &str, last_held: Option<Instant>) -> bool {
        let leading = match self
            .store
            .acquire_lease(LEADER_LEASE, replica, millis(LEASE_TTL), now_ms())
            .await
        {
            Ok(held) => held,
            Err(err) => {
                let safe = last_held.is_some_and(|at| at.elapsed() + RENEW_EVERY < LEASE_TTL);
                tracing::warn!(error = %error_chain(&err), still_leading = safe, "cannot renew the leader lease");
                safe
            }
        };
        if self.farm.set_leading(leading) {
            if leading {
                tracing::info!(
                    replica,
                    "this server leads: it runs pools, lifecycle, images and host watch"
                );
            } else {
                tracing::warn!(replica, "this server no longer leads; another replica does");
            }
        }
        leading
    }

    /// Keeps trying to lead (every [`RENEW_EVERY`]) for the life of the process. When this
    /// replica takes the lead from another, the tasks the old leader left running are
    /// failed and the pools are refilled; when it takes back the lease it held itself
    /// (after losing the store for a while), the pools are refilled only.
    pub fn spawn_leader_loop(self: &Arc<Self>, replica: String) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut last_held = manager.farm.leading().then(Instant::now);
            let mut tick = tokio::time::interval(RENEW_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                last_held = manager.renew_lead(&replica, last_held).await;
            }
        })
    }

    /// One turn of the leader loop: tries to lead, and does what starting to lead takes
    /// (see [`Manager::spawn_leader_loop`]). Answers when the lease was last held. A
    /// replica that does not lead first reads who holds the lease, and tries to take it
    /// only once it knows: taking its own lease back is not a take-over.
    async fn renew_lead(&self, replica: &str, last_held: Option<Instant>) -> Option<Instant> {
        let was = self.farm.leading();
        let held_by_us = match was {
            true => false,
            false => match self.store.lease(LEADER_LEASE).await {
                Ok(lease) => lease.is_some_and(|lease| lease.holder == replica),
                Err(err) => {
                    tracing::debug!(error = %error_chain(&err), "cannot read the leader lease");
                    return None;
                }
            },
        };
        let tried = Instant::now();
        if !self.try_lead(replica, last_held).await {
            return None;
        }
        if held_by_us {
            tracing::info!(replica, "took back this server's own leader lease");
            self.refresh_farm().await;
            self.pools.refill();
        } else if !was {
            self.take_over().await;
        }
        Some(tried)
    }

    /// What a replica does when it starts to lead after another: the old leader's
    /// running tasks cannot finish; its own host (if it runs VMs) is reconciled; pools
    /// are filled.
    async fn take_over(&self) {
        match self
            .store
            .fail_running_tasks("the server that ran the task stopped leading")
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(tasks = n, "marked the old leader's tasks failed"),
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "cannot fail the old leader's tasks")
            }
        }
        if let Some(local) = self.scheduler.local().cloned() {
            match self.reconcile_host(local).await {
                Ok(report) => tracing::info!(
                    adopted = report.adopted.len(),
                    failed = report.failed.len(),
                    "reconciled this server's own host on taking the lead"
                ),
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), "cannot reconcile this server's own host")
                }
            }
        }
        self.refresh_farm().await;
        self.pools.refill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{WEB, manager_on};
    use hangar_vmm::fake::FakeBackend;

    #[test]
    fn a_data_dir_keeps_its_replica_name() {
        let dir = tempfile::tempdir().unwrap();
        let first = replica_name(dir.path()).unwrap();
        assert_eq!(first.len(), 26, "a ulid: {first}");
        assert_eq!(
            replica_name(dir.path()).unwrap(),
            first,
            "the same after a restart"
        );
        let other = tempfile::tempdir().unwrap();
        assert_ne!(replica_name(other.path()).unwrap(), first);
    }

    #[tokio::test]
    async fn one_of_two_servers_on_a_store_leads_and_the_other_takes_over_when_it_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        let open = || async {
            hangar_store::open(path.to_str().unwrap())
                .await
                .expect("store")
        };
        let first = manager_on(open().await, FakeBackend::new(), WEB, Default::default());
        let second = manager_on(open().await, FakeBackend::new(), WEB, Default::default());
        assert!(first.try_lead("one", None).await);
        assert!(!second.try_lead("two", None).await);
        assert!(first.farm.leading() && !second.farm.leading());
        assert!(first.try_lead("one", Some(Instant::now())).await, "renewed");
        first
            .store
            .release_lease(LEADER_LEASE, "one")
            .await
            .unwrap();
        assert!(second.try_lead("two", None).await, "free: taken");
        assert!(
            !first.try_lead("one", None).await,
            "and refused to the other"
        );
        assert!(!first.farm.leading());
    }

    #[tokio::test]
    async fn a_leader_that_lost_the_store_takes_its_own_lease_back_without_failing_its_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        let store = hangar_store::open(path.to_str().unwrap()).await.unwrap();
        let one = manager_on(store.clone(), FakeBackend::new(), WEB, Default::default());
        assert!(one.renew_lead("one", None).await.is_some());
        let (task, _outcome) = one.tasks.begin("create", Some("web".into())).await.unwrap();
        // The store went away for longer than a renewal: it stepped down.
        one.farm.set_leading(false);
        assert!(one.renew_lead("one", None).await.is_some(), "took it back");
        assert!(one.farm.leading());
        let record = store.task(&task).await.unwrap().unwrap();
        assert_eq!(
            record.state,
            hangar_store::TaskState::Running,
            "its own task still runs"
        );
        // Another replica that takes over an expired lease fails the old leader's tasks.
        let two = manager_on(store.clone(), FakeBackend::new(), WEB, Default::default());
        let later = now_ms() + millis(LEASE_TTL) + 1;
        assert!(
            store
                .acquire_lease(LEADER_LEASE, "two", millis(LEASE_TTL), later)
                .await
                .unwrap()
        );
        two.farm.set_leading(false);
        two.take_over().await;
        let record = store.task(&task).await.unwrap().unwrap();
        assert_eq!(record.state, hangar_store::TaskState::Failed);
    }
}
