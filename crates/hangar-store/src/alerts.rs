//! Alerts as kept in the store ([`hangar_core::alerts::Alert`]): the leader writes them
//! after each look, every replica reads them for `GET /v1/alerts`, and a new leader goes
//! on from them (an alert already firing is not announced again).

use std::collections::BTreeMap;

use hangar_core::alerts::{Alert, AlertKind, Phase};

use crate::StoreError;

pub(crate) const ALERT_COLUMNS: &str = "key, kind, labels, summary, phase, active_since_ms, \
     firing_since_ms, clear_since_ms, resolved_at_ms";

/// An alert's columns as read, before decoding.
pub(crate) struct AlertColumns {
    pub key: String,
    pub kind: String,
    pub labels: String,
    pub summary: String,
    pub phase: String,
    pub active_since_ms: u64,
    pub firing_since_ms: Option<u64>,
    pub clear_since_ms: Option<u64>,
    pub resolved_at_ms: Option<u64>,
}

impl AlertColumns {
    pub(crate) fn decode(self) -> Result<Alert, StoreError> {
        let labels: BTreeMap<String, String> = serde_json::from_str(&self.labels)?;
        Ok(Alert {
            kind: AlertKind::parse(&self.kind).ok_or_else(|| StoreError::corrupt(&self.kind))?,
            phase: Phase::parse(&self.phase).ok_or_else(|| StoreError::corrupt(&self.phase))?,
            key: self.key,
            labels,
            summary: self.summary,
            active_since_ms: self.active_since_ms,
            firing_since_ms: self.firing_since_ms,
            clear_since_ms: self.clear_since_ms,
            resolved_at_ms: self.resolved_at_ms,
        })
    }
}

/// An alert's labels as stored (a JSON object).
pub(crate) fn labels_json(alert: &Alert) -> String {
    serde_json::to_string(&alert.labels).expect("string maps serialize")
}
