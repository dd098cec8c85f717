//! Alerts in PostgreSQL (see the `Store` trait's "alerts").

use hangar_core::alerts::Alert;
use tokio_postgres::Row;

use super::rows::signed;
use super::{PgStore, pg};
use crate::StoreError;
use crate::alerts::{ALERT_COLUMNS, AlertColumns, labels_json};

fn ms(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::corrupt(&value.to_string()))
}

fn alert_row(row: &Row) -> Result<Alert, StoreError> {
    let at = |idx: usize| -> Result<Option<u64>, StoreError> {
        row.try_get::<_, Option<i64>>(idx)
            .map_err(pg)?
            .map(ms)
            .transpose()
    };
    AlertColumns {
        key: row.try_get(0).map_err(pg)?,
        kind: row.try_get(1).map_err(pg)?,
        labels: row.try_get(2).map_err(pg)?,
        summary: row.try_get(3).map_err(pg)?,
        phase: row.try_get(4).map_err(pg)?,
        active_since_ms: ms(row.try_get(5).map_err(pg)?)?,
        firing_since_ms: at(6)?,
        clear_since_ms: at(7)?,
        resolved_at_ms: at(8)?,
    }
    .decode()
}

impl PgStore {
    pub(super) async fn alerts_now(&self) -> Result<Vec<Alert>, StoreError> {
        self.query(
            &format!("SELECT {ALERT_COLUMNS} FROM alerts ORDER BY key"),
            &[],
            alert_row,
        )
        .await
    }

    pub(super) async fn put_alert_now(&self, alert: &Alert) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT INTO alerts ({ALERT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (key) DO UPDATE SET kind = excluded.kind,
                     labels = excluded.labels, summary = excluded.summary,
                     phase = excluded.phase, active_since_ms = excluded.active_since_ms,
                     firing_since_ms = excluded.firing_since_ms,
                     clear_since_ms = excluded.clear_since_ms,
                     resolved_at_ms = excluded.resolved_at_ms"
            ),
            &[
                &alert.key,
                &alert.kind.as_str(),
                &labels_json(alert),
                &alert.summary,
                &alert.phase.as_str(),
                &signed(alert.active_since_ms),
                &alert.firing_since_ms.map(signed),
                &alert.clear_since_ms.map(signed),
                &alert.resolved_at_ms.map(signed),
            ],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn remove_alert_now(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self
            .execute("DELETE FROM alerts WHERE key = $1", &[&key])
            .await?
            == 1)
    }
}
