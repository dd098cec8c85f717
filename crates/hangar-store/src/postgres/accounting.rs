//! Quotas and usage records in PostgreSQL (see the `Store` trait's "quotas and usage").

use tokio_postgres::Row;

use super::rows::signed;
use super::{PgStore, pg};
use crate::{Limits, QUOTA_ROOM_STATES, StoreError, Usage, UsageEvent, joined_services};

fn limit(row: &Row, idx: usize) -> Result<Option<u64>, StoreError> {
    let value: Option<i64> = row.try_get(idx).map_err(pg)?;
    value
        .map(|v| u64::try_from(v).map_err(|_| StoreError::corrupt(&v.to_string())))
        .transpose()
}

fn stored(value: Option<u64>) -> Option<i64> {
    value.map(signed)
}

fn count(row: &Row, idx: usize) -> Result<u64, StoreError> {
    let value: i64 = row.try_get(idx).map_err(pg)?;
    Ok(u64::try_from(value).unwrap_or(0))
}

impl PgStore {
    pub(super) async fn quotas_now(&self) -> Result<Vec<(String, Limits)>, StoreError> {
        fn row(row: &Row) -> Result<(String, Limits), StoreError> {
            Ok((
                row.try_get(0).map_err(pg)?,
                Limits {
                    vms: limit(row, 1)?,
                    vcpus: limit(row, 2)?,
                    memory_mib: limit(row, 3)?,
                    archive_bytes: limit(row, 4)?,
                },
            ))
        }
        self.query(
            "SELECT owner, vms, vcpus, memory_mib, archive_bytes FROM quotas ORDER BY owner",
            &[],
            row,
        )
        .await
    }

    pub(super) async fn set_quota_now(
        &self,
        owner: &str,
        limits: Option<&Limits>,
    ) -> Result<(), StoreError> {
        match limits {
            Some(limits) => {
                self.execute(
                    "INSERT INTO quotas (owner, vms, vcpus, memory_mib, archive_bytes)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (owner) DO UPDATE SET vms = excluded.vms,
                         vcpus = excluded.vcpus, memory_mib = excluded.memory_mib,
                         archive_bytes = excluded.archive_bytes",
                    &[
                        &owner,
                        &stored(limits.vms),
                        &stored(limits.vcpus),
                        &stored(limits.memory_mib),
                        &stored(limits.archive_bytes),
                    ],
                )
                .await?
            }
            None => {
                self.execute("DELETE FROM quotas WHERE owner = $1", &[&owner])
                    .await?
            }
        };
        Ok(())
    }

    pub(super) async fn use_by_owner_now(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(String, Usage)>, StoreError> {
        fn row(row: &Row) -> Result<(String, Usage), StoreError> {
            Ok((
                row.try_get(0).map_err(pg)?,
                Usage {
                    vms: count(row, 1)?,
                    vcpus: count(row, 2)?,
                    memory_mib: count(row, 3)?,
                    archive_bytes: count(row, 4)?,
                },
            ))
        }
        let sql = format!(
            "SELECT v.owner, COUNT(*)::BIGINT,
                    COALESCE(SUM(CASE WHEN v.state IN ({QUOTA_ROOM_STATES}) THEN v.vcpus END), 0)::BIGINT,
                    COALESCE(SUM(CASE WHEN v.state IN ({QUOTA_ROOM_STATES}) THEN v.memory_mib END), 0)::BIGINT,
                    COALESCE(SUM(CASE WHEN v.state = 'archived' THEN a.size_bytes END), 0)::BIGINT
             FROM vms v LEFT JOIN archives a ON a.vm_id = v.id
             WHERE v.pool IS NULL AND v.state NOT IN ('deleted', 'failed')
               AND ($1::TEXT IS NULL OR v.owner = $1)
             GROUP BY v.owner ORDER BY v.owner"
        );
        self.query(&sql, &[&owner], row).await
    }

    pub(super) async fn usage_events_now(
        &self,
        since_ms: u64,
    ) -> Result<Vec<UsageEvent>, StoreError> {
        fn row(row: &Row) -> Result<UsageEvent, StoreError> {
            let state: String = row.try_get(1).map_err(pg)?;
            let services: String = row.try_get(4).map_err(pg)?;
            Ok(UsageEvent {
                vm_id: row.try_get(0).map_err(pg)?,
                state: state.parse().map_err(|_| StoreError::corrupt(&state))?,
                at_ms: count(row, 2)?,
                owner: row.try_get(3).map_err(pg)?,
                services: joined_services(&services),
                host: row.try_get(5).map_err(pg)?,
                vcpus: u32::try_from(count(row, 6)?).unwrap_or(u32::MAX),
                memory_mib: u32::try_from(count(row, 7)?).unwrap_or(u32::MAX),
                archive_bytes: count(row, 8)?,
            })
        }
        self.query(
            "SELECT vm_id, state, at_ms, owner, services, host, vcpus, memory_mib, archive_bytes
             FROM vm_usage_events
             WHERE vm_id IN (SELECT id FROM vms
                             WHERE state NOT IN ('deleted', 'failed') OR state_since_ms >= $1)
             ORDER BY vm_id, seq",
            &[&signed(since_ms)],
            row,
        )
        .await
    }
}
