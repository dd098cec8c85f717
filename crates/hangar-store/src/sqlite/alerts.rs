//! Alerts in SQLite (see the `Store` trait's "alerts").

use hangar_core::alerts::Alert;
use rusqlite::{Row, params};

use super::SqliteStore;
use crate::StoreError;
use crate::alerts::{ALERT_COLUMNS, AlertColumns, labels_json};
use crate::lease::signed_ms;

fn alert_row(row: &Row<'_>) -> rusqlite::Result<Result<Alert, StoreError>> {
    Ok(AlertColumns {
        key: row.get(0)?,
        kind: row.get(1)?,
        labels: row.get(2)?,
        summary: row.get(3)?,
        phase: row.get(4)?,
        active_since_ms: row.get(5)?,
        firing_since_ms: row.get(6)?,
        clear_since_ms: row.get(7)?,
        resolved_at_ms: row.get(8)?,
    }
    .decode())
}

impl SqliteStore {
    pub(super) fn alerts_now(&self) -> Result<Vec<Alert>, StoreError> {
        self.list(
            &format!("SELECT {ALERT_COLUMNS} FROM alerts ORDER BY key"),
            [],
            alert_row,
        )
    }

    pub(super) fn put_alert_now(&self, alert: &Alert) -> Result<(), StoreError> {
        self.execute(
            &format!(
                "INSERT INTO alerts ({ALERT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (key) DO UPDATE SET kind = excluded.kind,
                     labels = excluded.labels, summary = excluded.summary,
                     phase = excluded.phase, active_since_ms = excluded.active_since_ms,
                     firing_since_ms = excluded.firing_since_ms,
                     clear_since_ms = excluded.clear_since_ms,
                     resolved_at_ms = excluded.resolved_at_ms"
            ),
            params![
                alert.key,
                alert.kind.as_str(),
                labels_json(alert),
                alert.summary,
                alert.phase.as_str(),
                signed_ms(alert.active_since_ms),
                alert.firing_since_ms.map(signed_ms),
                alert.clear_since_ms.map(signed_ms),
                alert.resolved_at_ms.map(signed_ms),
            ],
        )?;
        Ok(())
    }

    pub(super) fn remove_alert_now(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM alerts WHERE key = ?1", [key])? == 1)
    }
}
