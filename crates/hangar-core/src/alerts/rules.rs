//! The alert rules as configured: `hangar server --alerts FILE` (TOML). Every rule is on
//! with the defaults of [`Rule::default_for`] unless the file says otherwise; a file names
//! only what it changes:
//!
//! ```toml
//! keep_resolved = "24h"          # how long resolved alerts stay listed
//!
//! [webhook]                      # none: alerts go to the log only
//! url = "http://10.0.0.5:9093/hangar"
//! timeout = "5s"                 # each attempt
//! attempts = 5                   # tries per notice, 0.5 s, 1 s, 2 s, ... apart
//!
//! [rules.host_down]
//! for = "0s"                     # true this long before firing
//! hold = "10s"                   # false this long before resolving
//!
//! [rules.host_memory]
//! above_percent = 85
//!
//! [rules.pool_empty]
//! enabled = false
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{AlertKind, Timing};

/// The alerting configuration: rules, sink, retention.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertConfig {
    /// Every kind's rule (disabled ones included).
    pub rules: BTreeMap<AlertKind, Rule>,
    /// Where notices are POSTed; none: the log only.
    pub webhook: Option<WebhookConfig>,
    /// How long a resolved alert stays listed.
    pub keep_resolved: Duration,
}

/// One rule: when its alert fires and resolves, and its threshold where it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub enabled: bool,
    pub timing: Timing,
    /// `host_memory`, `pool_memory`: fires above this share (percent) of the memory.
    pub above_percent: Option<f64>,
    /// `host_disk`: fires when a host's free disk is below this.
    pub free_below_mib: Option<u64>,
    /// `vm_crashing`: fires at this many failures of one service's VMs within `window`.
    pub failures: Option<u32>,
    /// `vm_crashing`: the window failures are counted in; `migration_failed`: how long a
    /// failed migration keeps its alert true.
    pub window: Option<Duration>,
}

/// The webhook sink: Alertmanager-shaped JSON POSTed for each transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// An `http://` URL.
    pub url: String,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Attempts per notice (at least 1).
    pub attempts: u32,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AlertConfigError {
    #[error("not valid TOML for alert rules: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("no alert rule named {name:?} (rules: {known})")]
    UnknownRule { name: String, known: String },
    #[error("rule {rule}: {message}")]
    Rule { rule: &'static str, message: String },
    #[error("webhook: {0}")]
    Webhook(String),
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Rule {
    /// Each kind's rule when the configuration does not change it.
    pub fn default_for(kind: AlertKind) -> Rule {
        let rule = |for_, hold| Rule {
            enabled: true,
            timing: Timing { for_, hold },
            above_percent: None,
            free_below_mib: None,
            failures: None,
            window: None,
        };
        match kind {
            AlertKind::HostDown => rule(secs(0), secs(10)),
            AlertKind::PoolEmpty => rule(secs(30), secs(30)),
            AlertKind::HostDisk => Rule {
                free_below_mib: Some(2048),
                ..rule(secs(60), secs(60))
            },
            AlertKind::HostMemory => Rule {
                above_percent: Some(90.0),
                ..rule(secs(60), secs(60))
            },
            AlertKind::PoolMemory => Rule {
                above_percent: Some(90.0),
                ..rule(secs(60), secs(60))
            },
            AlertKind::VmCrashing => Rule {
                failures: Some(3),
                window: Some(secs(600)),
                ..rule(secs(0), secs(60))
            },
            AlertKind::MigrationFailed => Rule {
                window: Some(secs(900)),
                ..rule(secs(0), secs(0))
            },
        }
    }
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            rules: AlertKind::ALL
                .into_iter()
                .map(|kind| (kind, Rule::default_for(kind)))
                .collect(),
            webhook: None,
            keep_resolved: secs(24 * 3600),
        }
    }
}

/// The file as written: everything optional, merged over the defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default, with = "optional_duration")]
    keep_resolved: Option<Duration>,
    webhook: Option<WebhookToml>,
    #[serde(default)]
    rules: BTreeMap<String, RuleToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookToml {
    url: String,
    #[serde(default, with = "optional_duration")]
    timeout: Option<Duration>,
    attempts: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    enabled: Option<bool>,
    #[serde(rename = "for", default, with = "optional_duration")]
    for_: Option<Duration>,
    #[serde(default, with = "optional_duration")]
    hold: Option<Duration>,
    above_percent: Option<f64>,
    free_below_mib: Option<u64>,
    failures: Option<u32>,
    #[serde(default, with = "optional_duration")]
    window: Option<Duration>,
}

impl AlertConfig {
    /// Reads a configuration file's text (see the module documentation). Refuses unknown
    /// rules and keys, thresholds a rule does not take, percentages outside 0–100, zero
    /// failures, and webhook URLs that are not `http://`.
    pub fn from_toml(text: &str) -> Result<AlertConfig, AlertConfigError> {
        let file: FileToml = toml::from_str(text)?;
        let mut config = AlertConfig::default();
        if let Some(keep) = file.keep_resolved {
            config.keep_resolved = keep;
        }
        for (name, given) in file.rules {
            let kind = AlertKind::parse(&name).ok_or_else(|| AlertConfigError::UnknownRule {
                name: name.clone(),
                known: AlertKind::ALL.map(AlertKind::as_str).join(", "),
            })?;
            let rule = config.rules.get_mut(&kind).expect("every kind has a rule");
            merge(kind, rule, given)?;
        }
        if let Some(hook) = file.webhook {
            let Some(rest) = hook.url.strip_prefix("http://") else {
                return Err(AlertConfigError::Webhook(format!(
                    "{:?} is not an http:// URL (hangar sends plain HTTP; put a relay in front for https)",
                    hook.url
                )));
            };
            if rest.is_empty() || rest.starts_with('/') {
                return Err(AlertConfigError::Webhook(format!(
                    "{:?} names no host",
                    hook.url
                )));
            }
            let attempts = hook.attempts.unwrap_or(5);
            if attempts == 0 {
                return Err(AlertConfigError::Webhook(
                    "attempts must be 1 or more".into(),
                ));
            }
            config.webhook = Some(WebhookConfig {
                url: hook.url,
                timeout: hook.timeout.unwrap_or(secs(5)),
                attempts,
            });
        }
        Ok(config)
    }

    /// The rule of `kind`.
    pub fn rule(&self, kind: AlertKind) -> &Rule {
        &self.rules[&kind]
    }

    /// The timing of `kind`'s rule.
    pub fn timing(&self, kind: AlertKind) -> Timing {
        self.rule(kind).timing
    }
}

/// `given` over `rule`, refusing what `kind` does not take.
fn merge(kind: AlertKind, rule: &mut Rule, given: RuleToml) -> Result<(), AlertConfigError> {
    let name = kind.as_str();
    let refuse = |what: &str| AlertConfigError::Rule {
        rule: name,
        message: format!("takes no {what}"),
    };
    if let Some(enabled) = given.enabled {
        rule.enabled = enabled;
    }
    if let Some(for_) = given.for_ {
        rule.timing.for_ = for_;
    }
    if let Some(hold) = given.hold {
        rule.timing.hold = hold;
    }
    if let Some(percent) = given.above_percent {
        if rule.above_percent.is_none() {
            return Err(refuse("above_percent"));
        }
        if !(0.0..=100.0).contains(&percent) {
            return Err(AlertConfigError::Rule {
                rule: name,
                message: format!("above_percent {percent} is not between 0 and 100"),
            });
        }
        rule.above_percent = Some(percent);
    }
    if let Some(mib) = given.free_below_mib {
        if rule.free_below_mib.is_none() {
            return Err(refuse("free_below_mib"));
        }
        rule.free_below_mib = Some(mib);
    }
    if let Some(failures) = given.failures {
        if rule.failures.is_none() {
            return Err(refuse("failures"));
        }
        if failures == 0 {
            return Err(AlertConfigError::Rule {
                rule: name,
                message: "failures must be 1 or more".into(),
            });
        }
        rule.failures = Some(failures);
    }
    if let Some(window) = given.window {
        if rule.window.is_none() {
            return Err(refuse("window"));
        }
        rule.window = Some(window);
    }
    Ok(())
}

/// An optional duration written as a human string (`"90s"`, `"10m"`).
mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}
