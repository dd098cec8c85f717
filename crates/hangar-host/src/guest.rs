//! What a guest is told: its identity (hostname, machine-id, clock, entropy), network,
//! root disks, and its service's files and processes, as hangar-init's [`GuestConfig`].

use std::collections::BTreeMap;

use hangar_core::Service;
use hangar_proto::{GuestConfig, Identity, NetworkConfig, RootConfig, ServiceCommand};
use hangar_vmm::usernet;
use rand::RngCore;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A fresh identity: hostname, the current time, and new entropy.
pub fn new_identity(hostname: &str) -> Identity {
    let mut entropy = [0u8; 32];
    rand::rng().fill_bytes(&mut entropy);
    Identity {
        hostname: hostname.to_owned(),
        unix_time_ms: now_ms(),
        entropy_hex: hex::encode(entropy),
    }
}

/// Why a VM's guest configuration cannot be made from a request.
#[derive(Debug, thiserror::Error)]
pub enum GuestConfigError {
    /// The service needs a setting that the request does not give and that has no default.
    #[error("{service} needs the setting {key} (--env {key}=VALUE){}", described(.description))]
    MissingSetting {
        service: String,
        key: String,
        description: String,
    },
    /// A value the request gives for a setting is outside the setting's format.
    /// `message` names the service, the setting, the value (unless the setting is secret:
    /// never repeated back) and what is wrong with it.
    #[error("{message}")]
    BadSetting { key: String, message: String },
    /// One of the service's file templates does not render with these settings.
    #[error("template {path}: {reason}")]
    Template { path: String, reason: String },
}

fn described(description: &str) -> String {
    if description.is_empty() {
        String::new()
    } else {
        format!(": {description}")
    }
}

/// What hangar-init needs to become this VM: its identity (hostname, machine-id, clock,
/// entropy), network, root (with `layers` read-only layers under a writable one), the
/// service's templates rendered with the request's settings, and its processes.
pub fn guest_config(
    vm_id: &str,
    hostname: &str,
    service: Option<&Service>,
    env: &BTreeMap<String, String>,
    layers: usize,
) -> Result<GuestConfig, GuestConfigError> {
    let settings = match service {
        Some(service) => settings(service, env)?,
        None => BTreeMap::new(),
    };
    let mut process_env = hangar_core::request::process_env(env);
    process_env.extend(settings.iter().map(|(key, value)| {
        (
            format!("HANGAR_{}", key.to_ascii_uppercase()),
            value.clone(),
        )
    }));
    let mut files = identity_files(vm_id, hostname);
    if let Some(service) = service {
        files.extend(render_files(service, &settings, vm_id, hostname)?);
    }
    let root = if layers == 0 {
        // By serial, not by order: a pre-OS shell also has (empty) layer disks.
        RootConfig {
            device: format!("serial:{}", hangar_vmm::ROOT_SERIAL),
            fstype: "ext4".into(),
            layers: Vec::new(),
        }
    } else {
        RootConfig {
            device: format!("serial:{}", hangar_vmm::ROOT_SERIAL),
            fstype: "ext4".into(),
            layers: (0..layers)
                .map(|i| hangar_proto::LayerMount {
                    device: format!("serial:{}", hangar_vmm::layer_serial(i)),
                    fstype: "squashfs".into(),
                })
                .collect(),
        }
    };
    Ok(GuestConfig {
        identity: new_identity(hostname),
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: usernet::GUEST_ADDRESS.into(),
            gateway: Some(usernet::GATEWAY.into()),
            dns: vec![usernet::DNS.into()],
        }),
        root: Some(root),
        files,
        services: service
            .map(|service| {
                service
                    .processes
                    .iter()
                    .map(|process| {
                        let mut env = process.env.clone();
                        env.extend(process_env.clone());
                        ServiceCommand {
                            name: process.name.clone(),
                            argv: process.argv.clone(),
                            env,
                            workdir: process.workdir.clone(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The service's templates rendered with `settings` (as [`settings`] answers them), the
/// VM's id as `{{vm}}` and its hostname as `{{hostname}}`: the files a guest is given.
pub fn render_files(
    service: &Service,
    settings: &BTreeMap<String, String>,
    vm_id: &str,
    hostname: &str,
) -> Result<Vec<hangar_proto::FileWrite>, GuestConfigError> {
    let mut values = settings.clone();
    values.insert("hostname".into(), hostname.to_owned());
    values.insert("vm".into(), vm_id.to_owned());
    service
        .templates
        .iter()
        .map(|(path, template)| {
            Ok(hangar_proto::FileWrite {
                path: path.clone(),
                contents: hangar_core::components::render_template(&template.content, &values)
                    .map_err(|reason| GuestConfigError::Template {
                        path: path.clone(),
                        reason,
                    })?,
                mode: template.mode,
            })
        })
        .collect()
}

/// The service's settings for this request: the request's values, else the defaults.
/// A setting without a default that the request does not give is an error.
pub fn settings(
    service: &Service,
    env: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, GuestConfigError> {
    let mut values = BTreeMap::new();
    for (key, setting) in &service.settings {
        if let Some(value) = env.get(key)
            && let Err(reason) = setting.check(value)
        {
            let shown = if setting.secret {
                String::new()
            } else {
                format!("={value:?}")
            };
            return Err(GuestConfigError::BadSetting {
                key: key.clone(),
                message: format!("{}: setting {key}{shown} {reason}", service.name),
            });
        }
        match env.get(key).or(setting.default.as_ref()) {
            Some(value) => {
                values.insert(key.clone(), value.clone());
            }
            None => {
                return Err(GuestConfigError::MissingSetting {
                    service: service.name.clone(),
                    key: key.clone(),
                    description: setting.description.clone(),
                });
            }
        }
    }
    Ok(values)
}

/// Files that make a VM itself (seed 003's staging: the shared layers carry none of them).
fn identity_files(vm_id: &str, hostname: &str) -> Vec<hangar_proto::FileWrite> {
    let mut machine_id = [0u8; 16];
    rand::rng().fill_bytes(&mut machine_id);
    let file = |path: &str, contents: String| hangar_proto::FileWrite {
        path: path.into(),
        contents,
        mode: 0o644,
    };
    vec![
        file("/etc/hangar-vm-id", format!("{vm_id}\n")),
        file("/etc/hostname", format!("{hostname}\n")),
        file("/etc/machine-id", format!("{}\n", hex::encode(machine_id))),
        file(
            "/etc/hosts",
            format!("127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost\n"),
        ),
    ]
}
