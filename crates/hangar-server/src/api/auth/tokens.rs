//! API tokens: `hgr_<id>_<secret>`. The id (16 hex digits) is public and finds the token;
//! the secret (64 hex digits, 256 random bits) is shown once at creation. The store keeps
//! only the SHA-256 of the whole text, compared in constant time, so a copy of the
//! database (or its WAL) gives no usable token.
//!
//! The first start writes an admin user and its token to `DATA_DIR/admin.token` (mode
//! 0600); later starts keep it. A file others may read is refused, as the farm token's.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hangar_core::Role;
use hangar_store::{Conflict, Store, StoreError, TokenRecord, UserRecord, now_ms};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every token starts with (so that it is recognisable in a leak scan).
pub const PREFIX: &str = "hgr_";

/// The name of the user the first start makes.
pub const ADMIN_USER: &str = "admin";

/// The file in the data dir holding the first admin's token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// A token just made: its text (shown once) and its record (stored).
#[derive(Debug, Clone)]
pub struct Minted {
    pub text: String,
    pub record: TokenRecord,
}

/// Makes a token for `user` scoped to `role`, expiring at `expires_at_ms` (never: `None`).
pub fn mint(user: &str, role: Role, expires_at_ms: Option<u64>, now_ms: u64) -> Minted {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let id = hex::encode(id);
    let text = format!("{PREFIX}{id}_{}", hex::encode(secret));
    Minted {
        record: TokenRecord {
            id,
            user: user.to_owned(),
            role,
            hash: hash(&text),
            created_at_ms: now_ms,
            expires_at_ms,
            revoked_at_ms: None,
            last_used_at_ms: None,
        },
        text,
    }
}

/// The id of a token in hangar's format (`hgr_<16 hex>_<64 hex>`); `None` for anything else.
pub fn token_id(text: &str) -> Option<&str> {
    let rest = text.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some(id)
}

/// SHA-256 of a token's text, lowercase hex: what the store keeps.
pub fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Whether two hashes are equal, in time independent of where they differ.
pub fn hashes_match(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Why the admin token could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("admin token file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin token file {path} is readable by others (mode {mode:o}); `chmod 600` it")]
    Exposed { path: String, mode: u32 },
    #[error("admin token file {path} does not hold a hangar token (hgr_...)")]
    Malformed { path: String },
    #[error("cannot record the admin token")]
    Store(#[from] StoreError),
}

/// Makes sure `path` holds a working admin token and returns it. First start: makes the
/// user [`ADMIN_USER`] (if missing) and a token for it, written to `path` (0600). Later
/// starts keep the file; a token the store does not know (a new database under an old data
/// dir) is recorded again for [`ADMIN_USER`], so the file keeps working. A token revoked
/// in the store stays revoked.
pub async fn ensure_admin_token(store: &dyn Store, path: &Path) -> Result<String, AdminTokenError> {
    let io = |source| AdminTokenError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(AdminTokenError::Exposed {
                    path: path.display().to_string(),
                    mode,
                });
            }
            let text = std::fs::read_to_string(path).map_err(io)?.trim().to_owned();
            let id = token_id(&text).ok_or_else(|| AdminTokenError::Malformed {
                path: path.display().to_string(),
            })?;
            if store.token(id).await?.is_none() {
                ensure_admin_user(store).await?;
                let now = now_ms();
                store
                    .insert_token(&TokenRecord {
                        id: id.to_owned(),
                        user: ADMIN_USER.into(),
                        role: Role::Admin,
                        hash: hash(&text),
                        created_at_ms: now,
                        expires_at_ms: None,
                        revoked_at_ms: None,
                        last_used_at_ms: None,
                    })
                    .await?;
                tracing::info!(path = %path.display(), "admin token recorded again in a new store");
            }
            Ok(text)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            ensure_admin_user(store).await?;
            let minted = mint(ADMIN_USER, Role::Admin, None, now_ms());
            store.insert_token(&minted.record).await?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            file.write_all(format!("{}\n", minted.text).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            tracing::info!(path = %path.display(), "admin token written");
            Ok(minted.text)
        }
        Err(err) => Err(io(err)),
    }
}

async fn ensure_admin_user(store: &dyn Store) -> Result<(), StoreError> {
    let admin = UserRecord {
        name: ADMIN_USER.into(),
        role: Role::Admin,
        created_at_ms: now_ms(),
    };
    match store.insert_user(&admin).await {
        Ok(()) | Err(StoreError::Conflict(Conflict::Exists { .. })) => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_parses_hashes_and_never_repeats() {
        let a = mint("ana", Role::Provisioner, None, 1);
        let b = mint("ana", Role::Provisioner, None, 1);
        assert_ne!(a.text, b.text);
        assert_eq!(token_id(&a.text), Some(a.record.id.as_str()));
        assert_eq!(a.text.len(), PREFIX.len() + 16 + 1 + 64);
        assert!(hashes_match(&a.record.hash, &hash(&a.text)));
        assert!(!hashes_match(&a.record.hash, &b.record.hash));
        assert!(!a.record.hash.contains(&a.text[PREFIX.len() + 17..]));
        for bad in [
            "",
            "hgr_",
            "hgr_0123_abcd",
            "xyz_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
            "hgr_0123456789abcdeg_0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(token_id(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn the_admin_token_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let store = hangar_store::SqliteStore::open_in_memory().unwrap();
        let made = ensure_admin_token(&store, &path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let id = token_id(&made).unwrap();
        let record = store.token(id).await.unwrap().unwrap();
        assert_eq!(
            (record.user.as_str(), record.role),
            (ADMIN_USER, Role::Admin)
        );
        assert!(hashes_match(&record.hash, &hash(&made)));
        assert_eq!(ensure_admin_token(&store, &path).await.unwrap(), made);
        assert_eq!(store.tokens(None).await.unwrap().len(), 1);

        // A new store under the old file: the file's token is recorded again.
        let fresh = hangar_store::SqliteStore::open_in_memory().unwrap();
        assert_eq!(ensure_admin_token(&fresh, &path).await.unwrap(), made);
        assert!(fresh.token(id).await.unwrap().is_some());
        assert_eq!(
            fresh.user(ADMIN_USER).await.unwrap().unwrap().role,
            Role::Admin
        );

        // Readable by others: refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = ensure_admin_token(&store, &path).await.unwrap_err();
        assert!(
            matches!(err, AdminTokenError::Exposed { mode: 0o640, .. }),
            "{err}"
        );
    }
}
