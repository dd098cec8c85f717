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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("env key {0:?} must be letters, digits and '_', not starting with a digit")]
    BadEnvKey(String),
    #[error("env value of {0:?} must not contain NUL or newline characters")]
    BadEnvValue(String),
    #[error("at most {max} env settings, not {count}")]
    TooManyEnv { count: usize, max: usize },
    #[error("name either a service or a config, not both and not neither")]
    ServiceOrConfig,
    #[error("config: {0}")]
    Config(String),
}

impl ServiceRequest {
    pub const MAX_ENV: usize = 32;

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
            if value.contains(['\0', '\n', '\r']) {
                return Err(RequestError::BadEnvValue(key.clone()));
            }
        }
        Ok(())
    }

    /// The settings passed to service processes: every env entry but `os`, as
    /// `HANGAR_<KEY>` (upper-cased).
    pub fn process_env(&self) -> BTreeMap<String, String> {
        process_env(&self.env)
    }
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
        assert_eq!(
            request(&[("k", "x\ny")]).validate(),
            Err(RequestError::BadEnvValue("k".into()))
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
