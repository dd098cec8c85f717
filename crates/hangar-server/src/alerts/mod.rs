//! Alerts: the leader looks at the farm every [`LOOK_EVERY`] ([`observe`]), decides
//! what fires and resolves with the pure [`hangar_core::alerts::evaluate`], writes the
//! alerts to the store (so every replica answers `GET /v1/alerts` alike and a new leader
//! goes on from them without announcing again), and then tells its sinks: the log (one
//! line per transition) and, when configured, a webhook ([`webhook`]).
//!
//! Rules come from `hangar server --alerts FILE`
//! ([`hangar_core::alerts::AlertConfig::from_toml`]), every rule on with its defaults
//! when no file is given.

use std::sync::Arc;
use std::time::Duration;

use hangar_api::AlertView;
use hangar_core::alerts::{Alert, Phase, Step, Transition, evaluate};
use hangar_store::{StoreError, now_ms};

use crate::api::error::error_chain;
use crate::api::rfc3339;
use crate::manager::Manager;

pub mod observe;
pub mod webhook;

pub use webhook::WebhookSink;

/// How often the leader looks.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

impl Manager {
    /// One look: observes, evaluates against the stored alerts, writes what changed, then
    /// logs each transition and queues it for `sink`. Returns what changed (nothing when
    /// a source could not be read). Transitions are told only once their alert is
    /// written, so a write that fails is tried again at the next look and not told twice.
    pub async fn look_for_alerts(&self, sink: Option<&WebhookSink>) -> Result<Step, StoreError> {
        let now = now_ms();
        let Some(observed) = self.observe_alerts(now).await else {
            return Ok(Step::default());
        };
        let config = &self.config.alerts;
        let previous = self.store.alerts().await?;
        let step = evaluate(
            &previous,
            &observed,
            |kind| config.timing(kind),
            now,
            config.keep_resolved,
        );
        for key in &step.removed {
            self.store.remove_alert(key).await?;
        }
        for alert in &step.changed {
            self.store.put_alert(alert).await?;
        }
        let server = self.config.server_urls.first().map_or("", String::as_str);
        for (transition, alert) in &step.transitions {
            match transition {
                Transition::Fired => tracing::warn!(
                    alert = %alert.key,
                    name = alert.kind.alert_name(),
                    labels = ?alert.labels,
                    "alert firing: {}",
                    alert.summary
                ),
                Transition::Resolved => tracing::info!(
                    alert = %alert.key,
                    name = alert.kind.alert_name(),
                    labels = ?alert.labels,
                    firing_for_s = alert
                        .resolved_at_ms
                        .unwrap_or(now)
                        .saturating_sub(alert.firing_since_ms.unwrap_or(now))
                        / 1000,
                    "alert resolved: {}",
                    alert.summary
                ),
            }
            if let Some(sink) = sink {
                sink.send(webhook::notice(*transition, alert, server));
            }
        }
        Ok(step)
    }

    /// Looks every [`LOOK_EVERY`] while this replica leads, for the life of the process.
    /// Starts the webhook sink when one is configured.
    pub fn spawn_alert_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            let sink = manager
                .config
                .alerts
                .webhook
                .clone()
                .map(WebhookSink::start);
            let mut tick = tokio::time::interval(LOOK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !manager.farm.leading() {
                    continue;
                }
                if let Err(err) = manager.look_for_alerts(sink.as_ref()).await {
                    tracing::warn!(error = %error_chain(&err), "alerts: cannot record alerts");
                }
            }
        })
    }

    /// The alerts as stored: firing ones, or with `all` pending and resolved ones too;
    /// firing first, then by key.
    pub async fn alert_views(&self, all: bool) -> Result<Vec<AlertView>, StoreError> {
        let mut alerts: Vec<Alert> = self
            .store
            .alerts()
            .await?
            .into_iter()
            .filter(|a| all || a.phase == Phase::Firing)
            .collect();
        alerts.sort_by_key(|a| (a.phase != Phase::Firing, a.key.clone()));
        Ok(alerts.iter().map(view).collect())
    }
}

fn view(alert: &Alert) -> AlertView {
    AlertView {
        key: alert.key.clone(),
        rule: alert.kind.as_str().into(),
        name: alert.kind.alert_name().into(),
        state: alert.phase.as_str().into(),
        labels: alert.labels.clone(),
        summary: alert.summary.clone(),
        active_since: rfc3339(alert.active_since_ms),
        firing_since: alert.firing_since_ms.map(rfc3339),
        resolved_at: alert.resolved_at_ms.map(rfc3339),
    }
}

#[cfg(test)]
mod tests;
