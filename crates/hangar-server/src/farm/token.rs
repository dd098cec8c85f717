//! The farm token: a random secret in a file only its owner reads, made on first start.
//! Agents are given it (`hangar agent --token-file`); the server sends it to agents too.
//! The metrics token (`metrics.token`, what a Prometheus scraper sends) is made the same
//! way.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngCore;

/// Why the farm (or metrics) token could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is readable by others (mode {mode:o}); `chmod 600` it")]
    Exposed { path: String, mode: u32 },
    #[error("token file {path} is empty or shorter than 16 characters")]
    TooShort { path: String },
}

/// The token in `path`, made (32 random bytes, hex, mode 0600) when the file does not exist.
/// A file others may read is refused rather than used.
pub fn load_or_create(path: &Path) -> Result<String, TokenError> {
    let io = |source| TokenError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(TokenError::Exposed {
                    path: path.display().to_string(),
                    mode,
                });
            }
            let token = std::fs::read_to_string(path).map_err(io)?.trim().to_owned();
            if token.len() < 16 {
                return Err(TokenError::TooShort {
                    path: path.display().to_string(),
                });
            }
            Ok(token)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let token = hex::encode(bytes);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            file.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            Ok(token)
        }
        Err(err) => Err(io(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("farm.token");
        let made = load_or_create(&path).unwrap();
        assert_eq!(made.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), made);
    }

    #[test]
    fn a_token_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("farm.token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert!(
            matches!(err, TokenError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_or_create(&path).unwrap(), "0123456789abcdef0123");
    }
}
