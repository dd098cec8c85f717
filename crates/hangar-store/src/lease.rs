//! Leases: a name held by one holder until a time, taken and renewed with one conditional
//! write (see [`crate::Store::acquire_lease`]).

use serde::{Deserialize, Serialize};

/// A named lease: who holds it and until when. The control-plane replicas sharing one store
/// take the `leader` lease to choose which of them runs the background loops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub name: String,
    /// Who holds it (a replica's unique id).
    pub holder: String,
    /// When it runs out (milliseconds since the Unix epoch): at and after this instant
    /// anyone may take it.
    pub expires_ms: u64,
}

/// When a lease taken at `now_ms` for `ttl_ms` runs out, as stored.
pub(crate) fn lease_end(now_ms: u64, ttl_ms: u64) -> i64 {
    signed_ms(now_ms.saturating_add(ttl_ms))
}

/// A time for a signed 64-bit column (clamped: milliseconds since 1970 never get there).
pub(crate) fn signed_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
