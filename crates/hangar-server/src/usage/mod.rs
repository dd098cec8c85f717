//! Usage metering for billing: `GET /v1/usage`.
//!
//! The store records every change of a VM's state, owner, host, services or size in the
//! statement that makes it ([`hangar_store::Store::usage_events`]), so the record survives
//! restarts and misses no change, whoever makes it (the request path, the lifecycle loop,
//! reconciliation, a farm host's loss). [`hangar_core::usage::meter`] turns the records
//! into time per state within a window, summed per user, service, host or VM, priced at
//! the server's prices. An archived VM's record carries its archive's size: the server
//! records the archive ([`hangar_store::Store::put_archive`]) before the VM is marked
//! archived.

use std::time::Duration;

use hangar_core::usage::{UsageBy, meter, total};
use hangar_store::now_ms;

use crate::manager::Manager;

pub use hangar_api::UsageView;

/// Why usage could not be reported.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The window asked for is not valid.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
}

/// The start of a window given as a duration before `now_ms` (`1h`, `7d`) or as
/// milliseconds since the Unix epoch; none: everything recorded.
pub fn window_start(since: Option<&str>, now_ms: u64) -> Result<u64, UsageError> {
    let Some(since) = since.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(0);
    };
    if let Ok(epoch_ms) = since.parse::<u64>() {
        return Ok(epoch_ms);
    }
    let ago: Duration = humantime::parse_duration(since).map_err(|err| {
        UsageError::Invalid(format!(
            "since {since:?} is neither a duration (1h, 7d) nor milliseconds since the epoch: {err}"
        ))
    })?;
    Ok(now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)))
}

impl Manager {
    /// What was used from `since` until now, summed `by` user, service, host or VM.
    /// With `owner`, only the time VMs spent as theirs counts (what a non-admin sees).
    pub async fn usage(
        &self,
        since: Option<&str>,
        by: UsageBy,
        owner: Option<&str>,
    ) -> Result<UsageView, UsageError> {
        let until_ms = now_ms();
        let since_ms = window_start(since, until_ms)?;
        if since_ms > until_ms {
            return Err(UsageError::Invalid(format!(
                "since {since_ms} is in the future"
            )));
        }
        let mut events = self.store.usage_events(since_ms).await?;
        if let Some(owner) = owner {
            events.retain(|event| event.owner == owner);
        }
        let rows = meter(&events, since_ms, until_ms, by, &self.config.prices);
        let total = total(&rows);
        Ok(UsageView {
            since_ms,
            until_ms,
            by,
            prices: self.config.prices,
            rows,
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_starts_a_duration_ago_or_at_an_instant() {
        assert_eq!(window_start(None, 10_000_000).unwrap(), 0);
        assert_eq!(
            window_start(Some("1h"), 10_000_000).unwrap(),
            10_000_000 - 3_600_000
        );
        assert_eq!(window_start(Some("1234"), 10_000_000).unwrap(), 1234);
        assert_eq!(window_start(Some("1000d"), 10).unwrap(), 0);
        let err = window_start(Some("yesterday"), 10).unwrap_err().to_string();
        assert!(err.contains("neither a duration"), "{err}");
    }
}
