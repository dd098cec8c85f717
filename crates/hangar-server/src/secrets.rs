//! Secret settings at rest (issue 13, finding 3).
//!
//! A setting the catalog marks `secret = true` (PostgreSQL's `password`) is delivered to
//! the guest in plaintext (through the guest configuration channel, never written to a
//! host file) but kept in the store only sealed: XChaCha20-Poly1305 under a key in the
//! data dir (`secrets.key`, 32 random bytes, 0600), the setting's name as associated data.
//! The store's copy is what lets the control plane make the VM again with its settings (a
//! shared VM lost with its farm host is provisioned again), so it cannot simply be dropped.
//!
//! Sealing is deterministic: the nonce is a keyed hash of the name and value (a synthetic
//! IV), so one value always seals to the same text. Shared requests match VMs by equal
//! environments, in the store's own queries; with deterministic sealing they compare sealed
//! environments and never need the plaintext. What that reveals to a reader of the
//! database is only whether two VMs have the same password.
//!
//! Answers show a sealed value as [`SHOWN`]; the server never logs settings.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hangar_core::Catalog;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// How answers show a secret setting's value.
pub const SHOWN: &str = "(secret)";

/// What a sealed value starts with (then base64 of nonce and ciphertext).
const SEALED_PREFIX: &str = "sealed:v1:";

const NONCE_LEN: usize = 24;

/// Why secrets could not be sealed, opened or their key read.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets key file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets key file {path} is readable by others (mode {mode:o}); `chmod 600` it")]
    Exposed { path: String, mode: u32 },
    #[error("secrets key file {path} does not hold a 32-byte key (64 hex digits)")]
    Malformed { path: String },
    /// A sealed value that this key does not open (another key, or altered).
    #[error("the sealed value of setting {name} does not open with this server's secrets key")]
    Unopenable { name: String },
}

/// The key secret settings are sealed with, and which settings are secret.
pub struct Secrets {
    cipher: XChaCha20Poly1305,
    /// Keys the nonce derivation (separate from the cipher's key).
    nonce_key: [u8; 32],
    /// Names of the settings any service of the catalog marks secret.
    names: BTreeSet<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Secrets {
    /// Secrets sealed with `key`; the secret settings are those of `catalog`'s services
    /// marked `secret` (by name: a setting of that name is sealed for every service).
    pub fn new(key: &[u8; 32], catalog: &Catalog) -> Secrets {
        let names = catalog
            .services()
            .flat_map(|service| service.settings.iter())
            .filter(|(_, setting)| setting.secret)
            .map(|(name, _)| name.clone())
            .collect();
        Secrets::with_names(key, names)
    }

    fn with_names(key: &[u8; 32], names: BTreeSet<String>) -> Secrets {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut hash = Sha256::new();
            hash.update(b"hangar secrets v1 ");
            hash.update(label);
            hash.update(key);
            hash.finalize().into()
        };
        Secrets {
            cipher: XChaCha20Poly1305::new(&derive(b"cipher").into()),
            nonce_key: derive(b"nonce"),
            names,
        }
    }

    /// The key in `path`, made (32 random bytes, hex, mode 0600) when the file does not
    /// exist. A file others may read is refused rather than used.
    pub fn load_or_create_key(path: &Path) -> Result<[u8; 32], SecretsError> {
        let io = |source| SecretsError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(SecretsError::Exposed {
                        path: path.display().to_string(),
                        mode,
                    });
                }
                let text = std::fs::read_to_string(path).map_err(io)?;
                let mut key = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
                    SecretsError::Malformed {
                        path: path.display().to_string(),
                    }
                })?;
                Ok(key)
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(format!("{}\n", hex::encode(key)).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io)?;
                Ok(key)
            }
            Err(err) => Err(io(err)),
        }
    }

    /// Whether `name` is a secret setting.
    pub fn is_secret(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// `env` as the store keeps it: each secret setting's value sealed (a value sealed
    /// already is kept as it is). Deterministic: equal environments seal equal.
    pub fn seal_env(&self, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        env.iter()
            .map(|(name, value)| {
                let kept = if self.is_secret(name) && !is_sealed(value) {
                    self.seal(name, value)
                } else {
                    value.clone()
                };
                (name.clone(), kept)
            })
            .collect()
    }

    /// `env` as the store kept it, with every sealed value opened.
    pub fn open_env(
        &self,
        env: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, SecretsError> {
        env.iter()
            .map(|(name, value)| {
                let value = match value.strip_prefix(SEALED_PREFIX) {
                    Some(sealed) => self.open(name, sealed)?,
                    None => value.clone(),
                };
                Ok((name.clone(), value))
            })
            .collect()
    }

    fn seal(&self, name: &str, value: &str) -> String {
        let mut hash = Sha256::new();
        hash.update(self.nonce_key);
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update(value.as_bytes());
        let digest = hash.finalize();
        let nonce = XNonce::from_slice(&digest[..NONCE_LEN]);
        let sealed = self
            .cipher
            .encrypt(
                nonce,
                Payload {
                    msg: value.as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            // Encryption fails only for messages over 256 GiB.
            .expect("a setting's value seals");
        let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
        bytes.extend_from_slice(nonce);
        bytes.extend_from_slice(&sealed);
        format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
        )
    }

    fn open(&self, name: &str, sealed: &str) -> Result<String, SecretsError> {
        let unopenable = || SecretsError::Unopenable {
            name: name.to_owned(),
        };
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(sealed)
            .map_err(|_| unopenable())?;
        if bytes.len() < NONCE_LEN {
            return Err(unopenable());
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| unopenable())?;
        String::from_utf8(plain).map_err(|_| unopenable())
    }
}

/// Whether a stored setting value is sealed.
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

/// `env` as answers show it: sealed values as [`SHOWN`].
pub fn shown(env: BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.into_iter()
        .map(|(name, value)| {
            if is_sealed(&value) {
                (name, SHOWN.to_owned())
            } else {
                (name, value)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(key: u8) -> Secrets {
        Secrets::with_names(&[key; 32], ["password".to_owned()].into())
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secret_settings_seal_deterministically_and_open_again() {
        let s = secrets(1);
        let plain = env(&[("password", "s3cret 'quoted'"), ("user", "alice")]);
        let sealed = s.seal_env(&plain);
        assert_eq!(sealed["user"], "alice", "not secret: kept");
        assert!(is_sealed(&sealed["password"]));
        assert!(!sealed["password"].contains("s3cret"));
        assert_eq!(s.seal_env(&plain), sealed, "equal environments seal equal");
        assert_eq!(s.seal_env(&sealed), sealed, "sealing twice changes nothing");
        assert_ne!(
            s.seal_env(&env(&[("password", "other")]))["password"],
            sealed["password"]
        );
        assert_eq!(s.open_env(&sealed).unwrap(), plain);
        let shown = shown(sealed);
        assert_eq!(shown["password"], SHOWN);
        assert_eq!(shown["user"], "alice");
    }

    #[test]
    fn another_key_or_another_name_does_not_open_a_sealed_value() {
        let sealed = secrets(1).seal_env(&env(&[("password", "pw")]));
        let err = secrets(2).open_env(&sealed).unwrap_err();
        assert!(matches!(err, SecretsError::Unopenable { .. }), "{err}");
        // Moved to another setting's name, it does not open either (name is bound).
        let moved = env(&[("user", &sealed["password"])]);
        assert!(secrets(1).open_env(&moved).is_err());
        let mut tampered = sealed["password"].clone();
        tampered.push('A');
        assert!(
            secrets(1)
                .open_env(&env(&[("password", &tampered)]))
                .is_err()
        );
    }

    #[test]
    fn the_key_file_is_made_private_once_and_an_exposed_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let key = Secrets::load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Secrets::load_or_create_key(&path).unwrap(), key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Secrets::load_or_create_key(&path),
            Err(SecretsError::Exposed { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            Secrets::load_or_create_key(&path),
            Err(SecretsError::Malformed { .. })
        ));
    }
}
