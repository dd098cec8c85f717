//! Quotas per user (a VM's owner), checked atomically with the claim of a VM.
//!
//! A request that will get a VM of its own (a dedicated VM, a pool VM, or a new shared VM
//! when none runs) first *reserves* it against its owner's quota: under the owner's lock,
//! what the store says the owner's VMs take ([`hangar_store::Store::use_by_owner`]) plus
//! what is reserved and not yet in the store, plus the new VM, must stay within the
//! owner's limits; else the answer is 429 naming the limit. The reservation lasts until
//! the VM is in the store (its row inserted, or the pool VM claimed), so that of any number
//! of concurrent requests at most the quota's worth get VMs. Being granted a shared VM that
//! already runs (or is woken) costs nothing and checks nothing.
//!
//! The reservations are this server's memory: one server (or one replica) admits exactly.
//! Several replicas sharing a store each check against the store and their own
//! reservations, so two replicas could each admit the last VM of a quota at the same
//! moment; exactness across replicas needs the check and the insert in one store
//! transaction under a lock on the owner's row (`SELECT … FOR UPDATE` on `quotas`), which
//! the store does not offer yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hangar_core::quota::{Limits, QuotaExceeded, Usage};

use crate::manager::Manager;

pub use hangar_api::{QuotaSource, QuotaView, QuotasView};

/// Why a quota could not be read, changed or met.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// The new VM would take its owner past a limit (429).
    #[error(transparent)]
    Exceeded(#[from] QuotaExceeded),
    /// The user name is not one a quota can be set for.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

/// VMs reserved against their owners' quotas and not yet in the store, per owner; and one
/// lock per owner, under which a reservation is checked and taken.
#[derive(Default)]
pub struct QuotaRuntime {
    pending: Arc<Mutex<HashMap<String, Usage>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl QuotaRuntime {
    fn lock(&self, owner: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("quota locks")
            .entry(owner.to_owned())
            .or_default()
            .clone()
    }

    fn pending(&self, owner: &str) -> Usage {
        self.pending
            .lock()
            .expect("quota reservations")
            .get(owner)
            .copied()
            .unwrap_or_default()
    }

    fn reserve(&self, owner: &str, usage: Usage, lock: Arc<tokio::sync::Mutex<()>>) -> Reservation {
        let mut pending = self.pending.lock().expect("quota reservations");
        let entry = pending.entry(owner.to_owned()).or_default();
        *entry = entry.plus(usage);
        Reservation(Some(Arc::new(Held {
            pending: self.pending.clone(),
            owner: owner.to_owned(),
            usage,
            released: std::sync::atomic::AtomicBool::new(false),
            lock,
        })))
    }
}

/// A VM reserved against its owner's quota until it is in the store. Released once, by
/// [`Reservation::release`] or when the last clone is dropped (a creation that fails
/// before its VM is recorded).
#[derive(Clone, Default)]
pub struct Reservation(Option<Arc<Held>>);

struct Held {
    pending: Arc<Mutex<HashMap<String, Usage>>>,
    owner: String,
    usage: Usage,
    released: std::sync::atomic::AtomicBool,
    /// The owner's quota lock, under which checks are made.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Held {
    fn release(&self) {
        if self
            .released
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let mut pending = self.pending.lock().expect("quota reservations");
        if let Some(entry) = pending.get_mut(&self.owner) {
            *entry = entry.minus(self.usage);
            if *entry == Usage::default() {
                pending.remove(&self.owner);
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}

impl Reservation {
    /// Nothing reserved (no limits apply).
    pub fn none() -> Reservation {
        Reservation(None)
    }

    /// Ends the reservation: the VM is in the store now (and counted there), or was never
    /// made. Call it only after the VM's row is written.
    pub fn release(&self) {
        if let Some(held) = &self.0 {
            held.release();
        }
    }

    /// Runs `write` (the statement that records the VM) under its owner's quota lock and
    /// ends the reservation after it, whatever its outcome: a check made meanwhile sees
    /// the VM either reserved or recorded, never both (which would refuse a request the
    /// quota allows) and never neither.
    pub async fn settle<T>(&self, write: impl std::future::Future<Output = T>) -> T {
        match &self.0 {
            None => write.await,
            Some(held) => {
                let _checks_wait = held.lock.lock().await;
                let written = write.await;
                held.release();
                written
            }
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(held) => write!(f, "Reservation({}, {:?})", held.owner, held.usage),
            None => f.write_str("Reservation(none)"),
        }
    }
}

/// A user name a quota may be set for: 1 to 64 letters, digits, `_`, `-`, `.`, `@`.
pub fn valid_user(user: &str) -> bool {
    (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b))
}

impl Manager {
    /// The limits that apply to `owner`: their own, else the server's default.
    pub(crate) async fn quota_of(&self, owner: &str) -> Result<(Limits, QuotaSource), QuotaError> {
        let set = self.store.quotas().await?;
        Ok(match set.into_iter().find(|(user, _)| user == owner) {
            Some((_, limits)) => (limits, QuotaSource::User),
            None => (self.config.default_quota, QuotaSource::Default),
        })
    }

    /// Reserves one VM of `vcpus` and `memory_mib` for `owner` if it stays within their
    /// quota (see the module's documentation); [`QuotaError::Exceeded`] names the limit
    /// it would pass. Keep the reservation until the VM's row is in the store.
    pub(crate) async fn reserve_quota(
        &self,
        owner: &str,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Reservation, QuotaError> {
        let (limits, _) = self.quota_of(owner).await?;
        if limits == Limits::UNLIMITED {
            return Ok(Reservation::none());
        }
        let asked = Usage::vm(vcpus, memory_mib);
        let lock = self.quotas.lock(owner);
        let _one_at_a_time = lock.lock().await;
        // Under the lock no VM of this owner is recorded ([`Reservation::settle`]), so the
        // reservations and the store agree. (A pool VM's reservation ends only when its
        // grant returns, after its claim: it may count twice meanwhile, never not at all.)
        let pending = self.quotas.pending(owner);
        let held = self
            .store
            .use_by_owner(Some(owner))
            .await?
            .into_iter()
            .next()
            .map(|(_, usage)| usage)
            .unwrap_or_default();
        limits.check(owner, held.plus(pending), asked)?;
        Ok(self.quotas.reserve(owner, asked, lock.clone()))
    }

    /// `GET /v1/quotas`: the default, and every user with a quota or with VMs.
    pub async fn quota_views(&self) -> Result<QuotasView, QuotaError> {
        let set = self.store.quotas().await?;
        let used = self.store.use_by_owner(None).await?;
        let mut users: std::collections::BTreeMap<String, QuotaView> = Default::default();
        for (user, limits) in set {
            users.insert(
                user.clone(),
                QuotaView {
                    user,
                    limits,
                    source: QuotaSource::User,
                    used: Usage::default(),
                },
            );
        }
        for (user, usage) in used {
            users
                .entry(user.clone())
                .or_insert_with(|| QuotaView {
                    user,
                    limits: self.config.default_quota,
                    source: QuotaSource::Default,
                    used: Usage::default(),
                })
                .used = usage;
        }
        let pending = self
            .quotas
            .pending
            .lock()
            .expect("quota reservations")
            .clone();
        for (user, reserved) in pending {
            if let Some(view) = users.get_mut(&user) {
                view.used = view.used.plus(reserved);
            }
        }
        Ok(QuotasView {
            default: self.config.default_quota,
            users: users.into_values().collect(),
        })
    }

    /// `PUT /v1/quotas/{user}`: sets a user's limits (kept in the store). Lowering a limit
    /// below what the user holds takes nothing away; it refuses their next VMs.
    pub async fn set_quota(&self, user: &str, limits: &Limits) -> Result<QuotaView, QuotaError> {
        if !valid_user(user) {
            return Err(QuotaError::Invalid(format!(
                "user {user:?} must be 1 to 64 letters, digits, '_', '-', '.' and '@'"
            )));
        }
        self.store.set_quota(user, Some(limits)).await?;
        tracing::info!(user, limits = %limits, "quota set");
        let used = self
            .store
            .use_by_owner(Some(user))
            .await?
            .into_iter()
            .next()
            .map(|(_, usage)| usage)
            .unwrap_or_default();
        Ok(QuotaView {
            user: user.to_owned(),
            limits: *limits,
            source: QuotaSource::User,
            used: used.plus(self.quotas.pending(user)),
        })
    }
}

#[cfg(test)]
mod tests;
