//! The files the server hands to farm hosts, by content hash: guest assets, root disks and
//! image layers that its image source built. Hosts pull them instead of building them
//! again (`/v1/farm/...`).
//!
//! [`BlobIndex`] sends only files the server itself listed in a manifest: a hash never
//! listed names nothing, so no caller can read an arbitrary path. A file's sha256 is
//! computed once per (path, size, mtime); a file that changed since it was listed is not
//! sent under its old hash.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use hangar_api::Blob;
use sha2::{Digest, Sha256};

/// Why a file could not be listed or opened.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking hash ended abnormally.
    #[error("hashing {} was interrupted", path.display())]
    Interrupted {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A file listed under its hash, as it was when it was hashed.
#[derive(Debug, Clone)]
struct Stamped {
    path: PathBuf,
    size: u64,
    modified: Option<SystemTime>,
}

#[derive(Default)]
struct Inner {
    /// What each listed hash sends.
    listed: HashMap<String, Stamped>,
    /// Hashes computed, by path, with the size and mtime they were computed at.
    hashed: HashMap<PathBuf, (u64, Option<SystemTime>, String)>,
    /// How many times each blob was opened to be sent.
    sent: HashMap<String, u64>,
}

/// The blobs listed in manifests, by sha256 (see the module documentation).
#[derive(Default)]
pub struct BlobIndex {
    inner: Mutex<Inner>,
}

/// An open listed file, ready to send.
#[derive(Debug)]
pub struct OpenBlob {
    pub file: tokio::fs::File,
    pub size: u64,
}

impl BlobIndex {
    /// The blob of the file at `path`, which from now on may be sent by its hash. Hashes
    /// the file unless it was hashed at its current size and mtime.
    pub async fn list(&self, path: &Path) -> Result<Blob, BlobError> {
        let path = std::path::absolute(path).map_err(|source| BlobError::Io {
            path: path.to_owned(),
            source,
        })?;
        let stamp = stamp(&path).await?;
        let known = self
            .lock()
            .hashed
            .get(&path)
            .filter(|(size, modified, _)| *size == stamp.size && *modified == stamp.modified)
            .map(|(_, _, sha256)| sha256.clone());
        let sha256 = match known {
            Some(sha256) => sha256,
            None => {
                let to_hash = path.clone();
                let sha256 = tokio::task::spawn_blocking(move || sha256_of(&to_hash))
                    .await
                    .map_err(|source| BlobError::Interrupted {
                        path: path.clone(),
                        source,
                    })??;
                self.lock()
                    .hashed
                    .insert(path.clone(), (stamp.size, stamp.modified, sha256.clone()));
                sha256
            }
        };
        let blob = Blob {
            sha256: sha256.clone(),
            size: stamp.size,
        };
        self.lock().listed.insert(sha256, stamp);
        Ok(blob)
    }

    /// The listed file of `sha256`, open; `None` when the hash was never listed or its file
    /// changed or went away since (a host then asks for the manifest again). Counts the
    /// blob as sent.
    pub async fn open(&self, sha256: &str) -> Result<Option<OpenBlob>, BlobError> {
        let Some(listed) = self.lock().listed.get(sha256).cloned() else {
            return Ok(None);
        };
        let file = match tokio::fs::File::open(&listed.path).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.forget(sha256, &listed);
                return Ok(None);
            }
            Err(source) => {
                return Err(BlobError::Io {
                    path: listed.path,
                    source,
                });
            }
        };
        let metadata = file.metadata().await.map_err(|source| BlobError::Io {
            path: listed.path.clone(),
            source,
        })?;
        if metadata.len() != listed.size || metadata.modified().ok() != listed.modified {
            tracing::warn!(blob = %sha256, path = %listed.path.display(), "a listed blob changed on disk; not sending it");
            self.forget(sha256, &listed);
            return Ok(None);
        }
        *self.lock().sent.entry(sha256.to_owned()).or_default() += 1;
        Ok(Some(OpenBlob {
            file,
            size: listed.size,
        }))
    }

    /// How many times the blob was opened to be sent.
    pub fn sent(&self, sha256: &str) -> u64 {
        self.lock().sent.get(sha256).copied().unwrap_or(0)
    }

    fn forget(&self, sha256: &str, listed: &Stamped) {
        let mut inner = self.lock();
        if inner
            .listed
            .get(sha256)
            .is_some_and(|now| now.path == listed.path && now.modified == listed.modified)
        {
            inner.listed.remove(sha256);
        }
        inner.hashed.remove(&listed.path);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

async fn stamp(path: &Path) -> Result<Stamped, BlobError> {
    let metadata = tokio::fs::metadata(path)
        .await
        .map_err(|source| BlobError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(Stamped {
        path: path.to_owned(),
        size: metadata.len(),
        modified: metadata.modified().ok(),
    })
}

/// The lowercase hex sha256 of the file at `path`.
fn sha256_of(path: &Path) -> Result<String, BlobError> {
    let io = |source| BlobError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listed_files_open_by_hash_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        std::fs::write(&path, b"hello").unwrap();
        let index = BlobIndex::default();
        assert!(index.open(&"0".repeat(64)).await.unwrap().is_none());

        let blob = index.list(&path).await.unwrap();
        assert_eq!(
            blob.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(blob.size, 5);
        let open = index.open(&blob.sha256).await.unwrap().unwrap();
        assert_eq!(open.size, 5);
        assert_eq!(index.sent(&blob.sha256), 1);
    }

    #[tokio::test]
    async fn a_file_changed_since_it_was_listed_is_not_sent_and_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.sqfs");
        std::fs::write(&path, b"one").unwrap();
        let index = BlobIndex::default();
        let old = index.list(&path).await.unwrap();
        std::fs::write(&path, b"other").unwrap();
        assert!(index.open(&old.sha256).await.unwrap().is_none());
        let new = index.list(&path).await.unwrap();
        assert_ne!(new.sha256, old.sha256);
        assert_eq!(new.size, 5);
        assert!(index.open(&new.sha256).await.unwrap().is_some());
        assert!(index.open(&old.sha256).await.unwrap().is_none());
    }
}
