//! Idempotency keys on `POST /v1/requests`: a retry under the same `Idempotency-Key` by
//! the same user gets the first call's answer (the same VM) instead of a second VM.
//!
//! The key is claimed in the store with one conditional write (so replicas sharing a
//! store agree on who runs the call); callers in this process that find it running wait on
//! its lock here, others poll the store. A successful answer is kept with the key; a failed
//! call releases it, so that a retry runs again. A key used again with another body is
//! refused (422).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One lock per (user, key) being answered in this process.
#[derive(Default)]
pub struct KeyLocks(Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>);

impl KeyLocks {
    /// The lock of `user`'s `key`, made on first use.
    pub(crate) fn lock_of(&self, user: &str, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().expect("idempotency locks");
        // Forget locks nobody holds or waits for, so the map stays small.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks
            .entry((user.to_owned(), key.to_owned()))
            .or_default()
            .clone()
    }
}
