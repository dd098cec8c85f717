//! What a client asks for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Shared: any active VM offering the service may answer (the default). Dedicated: the VM
/// is the requester's alone and is never handed to another request.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Shared,
    Dedicated,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Dedicated => "dedicated",
        }
    }
}

/// `POST /v1/requests`: a service by name, or a machine configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    /// A service from the catalog. Exactly one of `service` and `config`.
    #[serde(default)]
    pub service: Option<String>,
    /// A machine configuration (always dedicated): served by the best paused VM, exact,
    /// superset or pre-OS shell.
    #[serde(default)]
    pub config: Option<crate::matching::MachineRequest>,
    /// Slice a superset VM down to the requested memory (balloon) and vCPUs.
    #[serde(default)]
    pub exact_size: bool,
    /// Environment settings (`os=busybox`, or settings passed to the service's processes as
    /// `HANGAR_<KEY>` variables). Shared VMs are only shared between equal environments.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub mode: Mode,
    /// How long the client will wait for a VM, in milliseconds. When a VM cannot be ready
    /// in time the answer is 503 with Retry-After, and the VM is still made.
    pub deadline_ms: Option<u64>,
    /// An isolation group (anti-affinity, `--isolate GROUP`): a VM made for this request
    /// never shares a host with another VM of the group. 1 to 63 characters of `a-z`,
    /// `0-9`, `-`, `_` and `.`.
    #[serde(default)]
    pub isolate: Option<String>,
    /// Label constraints (`--on k=v`): a VM made for this request goes only to a host whose
    /// labels hold every pair. At most [`ServiceRequest::MAX_ON`]; keys and values 1 to 63
    /// characters of letters, digits, `-`, `_` and `.` (keys also `/`).
    #[serde(default)]
    pub on: BTreeMap<String, String>,
    /// What the VM's guest may reach out of it (`none` when absent: no connection out).
    /// A pool VM or a shared VM is handed out only to requests with its own policy.
    #[serde(default)]
    pub egress: crate::EgressPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("env key {0:?} must be letters, digits and '_', not starting with a digit")]
    BadEnvKey(String),
    #[error("env value of {0:?} must not contain control characters (NUL, newlines, tabs)")]
    BadEnvValue(String),
    #[error("env value of {key:?} is {len} bytes long, more than {max}")]
    LongEnvValue { key: String, len: usize, max: usize },
    #[error("at most {max} env settings, not {count}")]
    TooManyEnv { count: usize, max: usize },
    #[error("name either a service or a config, not both and not neither")]
    ServiceOrConfig,
    #[error("config: {0}")]
    Config(String),
    #[error("isolation group {0:?} must be 1 to 63 characters of a-z, 0-9, '-', '_' and '.'")]
    BadIsolate(String),
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
    #[error("label key {0:?} must be 1 to 63 characters of letters, digits, '-', '_', '.' and '/'")]
    BadLabelKey(String),
    #[error("label value of {0:?} must be 1 to 63 characters of letters, digits, '-', '_' and '.'")]
    BadLabelValue(String),
    #[error("at most {max} label constraints, not {count}")]
    TooManyLabels { count: usize, max: usize },
}

impl ServiceRequest {
    pub const MAX_ENV: usize = 32;
    /// Most label constraints (`on`) one request may give.
    pub const MAX_ON: usize = 16;

    /// Checks the shape of the request (not whether the service exists).
    pub fn validate(&self) -> Result<(), RequestError> {
        match (&self.service, &self.config) {
            (Some(_), None) => {}
            (None, Some(config)) => config.validate().map_err(RequestError::Config)?,
            _ => return Err(RequestError::ServiceOrConfig),
        }
        if self.env.len() > Self::MAX_ENV {
            return Err(RequestError::TooManyEnv {
                count: self.env.len(),
                max: Self::MAX_ENV,
            });
        }
        for (key, value) in &self.env {
            let valid_key = !key.is_empty()
                && key.len() <= 64
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_key {
                return Err(RequestError::BadEnvKey(key.clone()));
            }
            if value.chars().any(char::is_control) {
                return Err(RequestError::BadEnvValue(key.clone()));
            }
            if value.len() > crate::components::SettingFormat::MAX_LEN {
                return Err(RequestError::LongEnvValue {
                    key: key.clone(),
                    len: value.len(),
                    max: crate::components::SettingFormat::MAX_LEN,
                });
            }
        }
        if let Some(group) = &self.isolate
            && !valid_group(group)
        {
            return Err(RequestError::BadIsolate(group.clone()));
        }
        if self.on.len() > Self::MAX_ON {
            return Err(RequestError::TooManyLabels {
                count: self.on.len(),
                max: Self::MAX_ON,
            });
        }
        for (key, value) in &self.on {
            if !valid_label(key, true) {
                return Err(RequestError::BadLabelKey(key.clone()));
            }
            if !valid_label(value, false) {
                return Err(RequestError::BadLabelValue(key.clone()));
            }
        }
        self.egress.validate()?;
        Ok(())
    }

    /// The settings passed to service processes: every env entry but `os`, as
    /// `HANGAR_<KEY>` (upper-cased).
    pub fn process_env(&self) -> BTreeMap<String, String> {
        process_env(&self.env)
    }
}

/// An isolation group name: 1 to 63 characters of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn valid_group(group: &str) -> bool {
    (1..=63).contains(&group.len())
        && group
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// A label key (`slash` allowed) or value: 1 to 63 characters of letters, digits, `-`,
/// `_`, `.`.
fn valid_label(text: &str, slash: bool) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b) || (slash && b == b'/'))
}

/// Request settings as service process environment: every entry but `os`, as
/// `HANGAR_<KEY>` (upper-cased).
pub fn process_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(key, _)| key.as_str() != "os")
        .map(|(key, value)| {
            (
                format!("HANGAR_{}", key.to_ascii_uppercase()),
                value.clone(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(env: &[(&str, &str)]) -> ServiceRequest {
        ServiceRequest {
            service: Some("web".into()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ServiceRequest::default()
        }
    }

    #[test]
    fn env_keys_and_values_are_checked() {
        assert!(
            request(&[("os", "busybox"), ("greeting", "hi there")])
                .validate()
                .is_ok()
        );
        assert_eq!(
            request(&[("9lives", "x")]).validate(),
            Err(RequestError::BadEnvKey("9lives".into()))
        );
        assert_eq!(
            request(&[("a-b", "x")]).validate(),
            Err(RequestError::BadEnvKey("a-b".into()))
        );
        for bad in ["x\ny", "x\ry", "x\0y", "x\ty", "x\u{1b}[2J"] {
            assert_eq!(
                request(&[("k", bad)]).validate(),
                Err(RequestError::BadEnvValue("k".into()))
            );
        }
        let long = "x".repeat(4097);
        assert_eq!(
            request(&[("k", &long)]).validate(),
            Err(RequestError::LongEnvValue {
                key: "k".into(),
                len: 4097,
                max: 4096
            })
        );
    }

    #[test]
    fn service_or_config() {
        let neither = ServiceRequest::default();
        assert_eq!(neither.validate(), Err(RequestError::ServiceOrConfig));
        let config: ServiceRequest = serde_json::from_str(
            r#"{"config":{"vcpus":1,"memory_mib":{"min":256,"max":128},"os":{"name":"busybox"}}}"#,
        )
        .unwrap();
        assert_eq!(
            config.validate(),
            Err(RequestError::Config(
                "memory_mib range 256..128 is empty".into()
            ))
        );
    }

    #[test]
    fn isolation_groups_and_label_constraints_are_checked() {
        let with = |isolate: Option<&str>, on: &[(&str, &str)]| ServiceRequest {
            isolate: isolate.map(str::to_owned),
            on: on
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..request(&[])
        };
        assert!(
            with(
                Some("db-1_a.b"),
                &[("zone", "eu-1"), ("hangar.io/disk", "SSD")]
            )
            .validate()
            .is_ok()
        );
        for bad in ["", "DB", "db group", "db/1", &"x".repeat(64)] {
            assert_eq!(
                with(Some(bad), &[]).validate(),
                Err(RequestError::BadIsolate(bad.into()))
            );
        }
        assert!(with(Some(&"x".repeat(63)), &[]).validate().is_ok());
        for bad in ["", "a=b", "a b", "ü"] {
            assert_eq!(
                with(None, &[(bad, "v")]).validate(),
                Err(RequestError::BadLabelKey(bad.into()))
            );
            assert_eq!(
                with(None, &[("k", bad)]).validate(),
                Err(RequestError::BadLabelValue("k".into()))
            );
        }
        assert_eq!(
            with(None, &[("k", "a/b")]).validate(),
            Err(RequestError::BadLabelValue("k".into()))
        );
        let many: Vec<(String, String)> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            with(None, &many).validate(),
            Err(RequestError::TooManyLabels { count: 17, max: 16 })
        );
        assert!(with(None, &many[..16]).validate().is_ok());
        let parsed: ServiceRequest =
            serde_json::from_str(r#"{"service":"web","isolate":"db","on":{"zone":"eu"}}"#).unwrap();
        assert_eq!(parsed.isolate.as_deref(), Some("db"));
        assert_eq!(parsed.on.get("zone").map(String::as_str), Some("eu"));
        let plain: ServiceRequest = serde_json::from_str(r#"{"service":"web"}"#).unwrap();
        assert_eq!((plain.isolate, plain.on.len()), (None, 0));
    }

    #[test]
    fn process_env_leaves_out_os() {
        let env = request(&[("os", "busybox"), ("greeting", "hi")]).process_env();
        assert_eq!(
            env.into_iter().collect::<Vec<_>>(),
            [("HANGAR_GREETING".to_string(), "hi".to_string())]
        );
    }

    #[test]
    fn mode_defaults_to_shared_and_unknown_fields_are_refused() {
        let parsed: ServiceRequest = serde_json::from_str(r#"{"service":"web"}"#).unwrap();
        assert_eq!(parsed.mode, Mode::Shared);
        assert!(
            serde_json::from_str::<ServiceRequest>(r#"{"service":"web","mdoe":"shared"}"#).is_err()
        );
    }
}
