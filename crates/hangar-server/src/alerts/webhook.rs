//! The webhook sink: each transition POSTed as Alertmanager-shaped JSON
//! ([`hangar_api::AlertNotice`]) to the configured URL, from a task of its own so the
//! alert loop never waits on the receiver. Notices go out one at a time in the order
//! they happened (a fire before its resolve); each gets up to `attempts` tries of at most
//! `timeout`, 0.5 s, 1 s, 2 s, ... apart (at most 30 s). A notice still undelivered
//! then is logged and dropped, as is one that finds the queue full: delivery is at most
//! once, and `GET /v1/alerts` stays the record.

use std::collections::BTreeMap;
use std::time::Duration;

use hangar_api::{AlertNotice, NoticeAlert};
use hangar_core::alerts::{Alert, Transition, WebhookConfig};
use tokio::sync::mpsc;

use crate::api::rfc3339;

/// Notices waiting to be sent at most; more are dropped (logged).
const QUEUE: usize = 1024;

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Alertmanager's "no end yet".
const NO_END: &str = "0001-01-01T00:00:00Z";

/// A running webhook sender; dropping it ends its task once the queue is sent.
#[derive(Debug, Clone)]
pub struct WebhookSink {
    queue: mpsc::Sender<AlertNotice>,
}

impl WebhookSink {
    /// Starts the sender. Call inside a Tokio runtime.
    pub fn start(config: WebhookConfig) -> WebhookSink {
        let (queue, mut notices) = mpsc::channel::<AlertNotice>(QUEUE);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while let Some(notice) = notices.recv().await {
                deliver(&client, &config, &notice).await;
            }
        });
        WebhookSink { queue }
    }

    /// Queues `notice`; never waits.
    pub fn send(&self, notice: AlertNotice) {
        if let Err(err) = self.queue.try_send(notice) {
            tracing::warn!(error = %err, "alert webhook queue full: notice dropped");
        }
    }
}

async fn deliver(client: &reqwest::Client, config: &WebhookConfig, notice: &AlertNotice) {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=config.attempts {
        let outcome = client
            .post(&config.url)
            .timeout(config.timeout)
            .json(notice)
            .send()
            .await;
        match outcome {
            Ok(answer) if answer.status().is_success() => {
                tracing::debug!(key = %notice.group_key, status = %notice.status, attempt, "alert webhook delivered");
                return;
            }
            Ok(answer) => {
                tracing::warn!(url = %config.url, key = %notice.group_key, attempt, status = %answer.status(), "alert webhook refused")
            }
            Err(err) => {
                tracing::warn!(url = %config.url, key = %notice.group_key, attempt, error = %crate::api::error::error_chain(&err), "alert webhook unreachable")
            }
        }
        if attempt < config.attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    tracing::warn!(url = %config.url, key = %notice.group_key, status = %notice.status, attempts = config.attempts, "alert webhook notice dropped after its attempts");
}

/// The notice of `alert`'s `transition`, sent by the server at `external_url`.
pub fn notice(transition: Transition, alert: &Alert, external_url: &str) -> AlertNotice {
    let status = match transition {
        Transition::Fired => "firing",
        Transition::Resolved => "resolved",
    };
    let mut labels = alert.labels.clone();
    labels.insert("alertname".into(), alert.kind.alert_name().into());
    labels.insert("rule".into(), alert.kind.as_str().into());
    AlertNotice {
        version: "4".into(),
        group_key: alert.key.clone(),
        status: status.into(),
        receiver: "hangar".into(),
        group_labels: BTreeMap::from([("alertname".into(), alert.kind.alert_name().into())]),
        common_labels: labels.clone(),
        common_annotations: BTreeMap::from([("summary".into(), alert.summary.clone())]),
        external_url: external_url.to_owned(),
        alerts: vec![NoticeAlert {
            status: status.into(),
            labels,
            annotations: BTreeMap::from([("summary".into(), alert.summary.clone())]),
            starts_at: rfc3339(alert.firing_since_ms.unwrap_or(alert.active_since_ms)),
            ends_at: alert
                .resolved_at_ms
                .map_or_else(|| NO_END.to_owned(), rfc3339),
            generator_url: format!("{external_url}/v1/alerts"),
            fingerprint: alert.key.clone(),
        }],
    }
}
