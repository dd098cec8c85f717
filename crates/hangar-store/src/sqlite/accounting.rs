//! Quotas and usage records in SQLite (see the `Store` trait's "quotas and usage").

use rusqlite::params;

use super::{SqliteStore, db};
use crate::{Limits, QUOTA_ROOM_STATES, StoreError, Usage, UsageEvent, joined_services};

/// A stored limit (NULL: none) as a number.
fn limit(value: Option<i64>) -> Result<Option<u64>, StoreError> {
    value
        .map(|v| u64::try_from(v).map_err(|_| StoreError::corrupt(&v.to_string())))
        .transpose()
}

fn stored(value: Option<u64>) -> Option<i64> {
    value.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SqliteStore {
    pub(super) fn quotas_now(&self) -> Result<Vec<(String, Limits)>, StoreError> {
        fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<(String, Limits), StoreError>> {
            let owner: String = row.get(0)?;
            let values: [Option<i64>; 4] = [row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?];
            Ok((|| {
                Ok((
                    owner,
                    Limits {
                        vms: limit(values[0])?,
                        vcpus: limit(values[1])?,
                        memory_mib: limit(values[2])?,
                        archive_bytes: limit(values[3])?,
                    },
                ))
            })())
        }
        self.list(
            "SELECT owner, vms, vcpus, memory_mib, archive_bytes FROM quotas ORDER BY owner",
            [],
            row,
        )
    }

    pub(super) fn set_quota_now(
        &self,
        owner: &str,
        limits: Option<&Limits>,
    ) -> Result<(), StoreError> {
        match limits {
            Some(limits) => self.execute(
                "INSERT INTO quotas (owner, vms, vcpus, memory_mib, archive_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (owner) DO UPDATE SET vms = excluded.vms, vcpus = excluded.vcpus,
                     memory_mib = excluded.memory_mib, archive_bytes = excluded.archive_bytes",
                params![
                    owner,
                    stored(limits.vms),
                    stored(limits.vcpus),
                    stored(limits.memory_mib),
                    stored(limits.archive_bytes)
                ],
            )?,
            None => self.execute("DELETE FROM quotas WHERE owner = ?1", [owner])?,
        };
        Ok(())
    }

    pub(super) fn use_by_owner_now(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(String, Usage)>, StoreError> {
        fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<(String, Usage), StoreError>> {
            Ok(Ok((
                row.get(0)?,
                Usage {
                    vms: count(row.get(1)?),
                    vcpus: count(row.get(2)?),
                    memory_mib: count(row.get(3)?),
                    archive_bytes: count(row.get(4)?),
                },
            )))
        }
        let sql = format!(
            "SELECT v.owner, COUNT(*),
                    COALESCE(SUM(CASE WHEN v.state IN ({QUOTA_ROOM_STATES}) THEN v.vcpus END), 0),
                    COALESCE(SUM(CASE WHEN v.state IN ({QUOTA_ROOM_STATES}) THEN v.memory_mib END), 0),
                    COALESCE(SUM(CASE WHEN v.state = 'archived' THEN a.size_bytes END), 0)
             FROM vms v LEFT JOIN archives a ON a.vm_id = v.id
             WHERE v.pool IS NULL AND v.state NOT IN ('deleted', 'failed')
               AND (?1 IS NULL OR v.owner = ?1)
             GROUP BY v.owner ORDER BY v.owner"
        );
        self.list(&sql, [owner], row)
    }

    pub(super) fn usage_events_now(&self, since_ms: u64) -> Result<Vec<UsageEvent>, StoreError> {
        fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<UsageEvent, StoreError>> {
            let state: String = row.get(1)?;
            let services: String = row.get(4)?;
            let numbers: [i64; 4] = [row.get(2)?, row.get(6)?, row.get(7)?, row.get(8)?];
            Ok((|| {
                Ok(UsageEvent {
                    vm_id: row.get(0).map_err(db)?,
                    state: state.parse().map_err(|_| StoreError::corrupt(&state))?,
                    at_ms: count(numbers[0]),
                    owner: row.get(3).map_err(db)?,
                    services: joined_services(&services),
                    host: row.get(5).map_err(db)?,
                    vcpus: u32::try_from(numbers[1]).unwrap_or(u32::MAX),
                    memory_mib: u32::try_from(numbers[2]).unwrap_or(u32::MAX),
                    archive_bytes: count(numbers[3]),
                })
            })())
        }
        self.list(
            "SELECT vm_id, state, at_ms, owner, services, host, vcpus, memory_mib, archive_bytes
             FROM vm_usage_events
             WHERE vm_id IN (SELECT id FROM vms
                             WHERE state NOT IN ('deleted', 'failed') OR state_since_ms >= ?1)
             ORDER BY vm_id, seq",
            [i64::try_from(since_ms).unwrap_or(i64::MAX)],
            row,
        )
    }
}
