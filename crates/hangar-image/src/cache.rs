//! Content-addressed cache helpers: input hashing and atomic publication.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::AssetError;

/// Temporary build directories older than this are leftovers of a crash.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Prefix of temporary entries; never a valid hash.
const TMP_PREFIX: &str = ".tmp-";

/// SHA-256 over labelled, length-prefixed inputs (so that moving bytes from one input to
/// the next changes the hash).
pub struct InputHasher(Sha256);

impl InputHasher {
    /// Starts a hash for a kind of entry at a format version.
    pub fn new(kind: &str, format: u32) -> Self {
        let mut hasher = InputHasher(Sha256::new());
        hasher.field("kind", kind.as_bytes());
        hasher.field("format", &format.to_le_bytes());
        hasher
    }

    /// Adds one named input.
    pub fn field(&mut self, label: &str, bytes: &[u8]) {
        self.0.update((label.len() as u64).to_le_bytes());
        self.0.update(label.as_bytes());
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// Lowercase hex digest.
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// SHA-256 of a file's contents, streamed.
pub fn hash_file(path: &Path) -> Result<String, AssetError> {
    let context = || format!("read {}", path.display());
    let mut file = File::open(path).map_err(|e| AssetError::io(context(), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| AssetError::io(context(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-256 of a file, memoised under `<cache>/digests/` by path, size, mtime, inode and
/// device, so that unchanged large inputs (a kernel .deb, vmlinuz, busybox) are read once.
pub fn file_digest(cache_dir: &Path, path: &Path) -> Result<String, AssetError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| AssetError::io(format!("stat {}", path.display()), e))?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let key = format!(
        "{}\0{}\0{}.{}\0{}\0{}",
        absolute.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino(),
        meta.dev()
    );
    let memo = cache_dir
        .join("digests")
        .join(hex::encode(Sha256::digest(key.as_bytes())));
    if let Ok(digest) = std::fs::read_to_string(&memo)
        && digest.len() == 64
        && digest.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(digest);
    }
    let digest = hash_file(path)?;
    let parent = cache_dir.join("digests");
    create_dir(&parent)?;
    let tmp = tempfile::NamedTempFile::with_prefix_in(TMP_PREFIX, &parent).map_err(|e| {
        AssetError::io(
            format!("create a temporary file in {}", parent.display()),
            e,
        )
    })?;
    std::fs::write(tmp.path(), &digest)
        .map_err(|e| AssetError::io(format!("write {}", tmp.path().display()), e))?;
    tmp.persist(&memo)
        .map_err(|e| AssetError::io(format!("write {}", memo.display()), e.error))?;
    Ok(digest)
}

pub fn create_dir(path: &Path) -> Result<(), AssetError> {
    std::fs::create_dir_all(path)
        .map_err(|e| AssetError::io(format!("mkdir {}", path.display()), e))
}

/// Creates `path` and its missing parents as directories of a guest's tree: mode 0755
/// whatever the process's umask (the server's 0077 is for its own files; a guest's `/usr`
/// or `/etc` must be searchable by the guest's service users).
pub fn create_tree_dir(path: &Path) -> Result<(), AssetError> {
    use std::os::unix::fs::PermissionsExt;
    let missing: Vec<&Path> = path.ancestors().take_while(|dir| !dir.exists()).collect();
    create_dir(path)?;
    for dir in missing {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| AssetError::io(format!("chmod {}", dir.display()), e))?;
    }
    Ok(())
}

/// Writes a file and flushes it to disk (it is about to be published by a rename).
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
    let context = || format!("write {}", path.display());
    let mut file = File::create(path).map_err(|e| AssetError::io(context(), e))?;
    file.write_all(bytes)
        .map_err(|e| AssetError::io(context(), e))?;
    file.sync_all().map_err(|e| AssetError::io(context(), e))
}

/// A fresh temporary directory inside `parent` (same filesystem, so renames are atomic).
/// Also removes temporary directories that crashed builds left behind.
pub fn temp_dir_in(parent: &Path) -> Result<tempfile::TempDir, AssetError> {
    create_dir(parent)?;
    clean_stale(parent);
    tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempdir_in(parent)
        .map_err(|e| {
            AssetError::io(
                format!("create a temporary directory in {}", parent.display()),
                e,
            )
        })
}

/// Builds the directory `parent/name` atomically: `build` fills a temporary directory,
/// which is then renamed into place. If another process published the same entry in the
/// meantime, its copy is kept and ours discarded (same inputs, same contents).
pub fn publish_dir(
    parent: &Path,
    name: &str,
    build: impl FnOnce(&Path) -> Result<(), AssetError>,
) -> Result<PathBuf, AssetError> {
    let tmp = temp_dir_in(parent)?;
    if let Err(err) = build(tmp.path()) {
        // A failed or cancelled build may leave mounts in the tree (debootstrap's proc and
        // sys): unmount them first, and remove the tree without crossing a mount point.
        let tmp_path = tmp.keep();
        match crate::hostfs::unmount_all_under(&tmp_path) {
            Ok(_) => {
                if let Err(remove) = crate::hostfs::remove_tree(&tmp_path) {
                    tracing::warn!(dir = %tmp_path.display(), error = %remove, "cannot remove a failed build's directory");
                }
            }
            Err(unmount) => {
                tracing::warn!(dir = %tmp_path.display(), error = %unmount, "a failed build's mounts remain; its directory is kept until the next build")
            }
        }
        return Err(err);
    }
    let dest = parent.join(name);
    let tmp_path = tmp.keep();
    match std::fs::rename(&tmp_path, &dest) {
        Ok(()) => Ok(dest),
        Err(e) => {
            let _ = crate::hostfs::remove_tree(&tmp_path);
            if dest.is_dir() {
                tracing::debug!(entry = %dest.display(), "entry published concurrently; keeping it");
                Ok(dest)
            } else {
                Err(AssetError::io(format!("rename into {}", dest.display()), e))
            }
        }
    }
}

/// Moves `file` to `dest` atomically (both on the same filesystem). The first writer
/// wins: if `dest` exists (another build published the same entry), it is kept and `file`
/// removed. Builds are not bit-for-bit reproducible (mkfs.ext4 stamps UUIDs and times), and
/// whatever was published first may already be hashed, served to peers or booted, so it
/// must never be replaced under its name.
pub fn publish_file(file: &Path, dest: &Path) -> Result<(), AssetError> {
    let linked = std::fs::hard_link(file, dest);
    if let Err(err) = std::fs::remove_file(file) {
        tracing::warn!(file = %file.display(), error = %err, "cannot remove a published build's temporary file");
    }
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            tracing::debug!(entry = %dest.display(), "entry published concurrently; keeping it");
            Ok(())
        }
        Err(e) => Err(AssetError::io(format!("publish {}", dest.display()), e)),
    }
}

/// Removes `.tmp-*` entries older than [`STALE_AFTER`] (best effort).
fn clean_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing a stale temporary cache entry");
            if let Err(err) = crate::hostfs::remove_tree(&path) {
                tracing::warn!(error = %err, "cannot remove a stale temporary cache entry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_field_boundaries_and_labels() {
        let hash = |fields: &[(&str, &[u8])]| {
            let mut h = InputHasher::new("t", 1);
            for (label, bytes) in fields {
                h.field(label, bytes);
            }
            h.finish()
        };
        let base = hash(&[("a", b"xy"), ("b", b"z")]);
        assert_eq!(base, hash(&[("a", b"xy"), ("b", b"z")]));
        assert_ne!(base, hash(&[("a", b"x"), ("b", b"yz")]));
        assert_ne!(base, hash(&[("a", b"xy"), ("c", b"z")]));
        assert_eq!(base.len(), 64);
        assert_ne!(
            InputHasher::new("t", 1).finish(),
            InputHasher::new("t", 2).finish()
        );
    }

    #[test]
    fn file_digests_are_memoised_and_follow_changes() {
        let cache = tempfile::tempdir().unwrap();
        let file = cache.path().join("input");
        std::fs::write(&file, b"one").unwrap();
        let first = file_digest(cache.path(), &file).unwrap();
        assert_eq!(first, hash_file(&file).unwrap());
        assert_eq!(file_digest(cache.path(), &file).unwrap(), first);
        assert_eq!(
            std::fs::read_dir(cache.path().join("digests"))
                .unwrap()
                .count(),
            1
        );
        std::fs::write(&file, b"two!").unwrap();
        assert_ne!(file_digest(cache.path(), &file).unwrap(), first);
    }

    #[test]
    fn publish_is_atomic_and_idempotent() {
        let parent = tempfile::tempdir().unwrap();
        let failed = publish_dir(parent.path(), "entry", |dir| {
            write(&dir.join("half"), b"x")?;
            Err(AssetError::io("build", std::io::Error::other("boom")))
        });
        assert!(failed.is_err());
        assert_eq!(
            std::fs::read_dir(parent.path()).unwrap().count(),
            0,
            "nothing left"
        );

        let dest = publish_dir(parent.path(), "entry", |dir| write(&dir.join("f"), b"1")).unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"1");
        // A second publisher of the same entry keeps the first copy.
        publish_dir(parent.path(), "entry", |dir| write(&dir.join("f"), b"2")).unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"1");
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_published_file_is_never_replaced() {
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("image.qcow2");
        let first = parent.path().join("first");
        write(&first, b"first build").unwrap();
        publish_file(&first, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"first build");
        assert!(!first.exists(), "the temporary file is gone");

        // A concurrent build of the same entry (different bytes: builds stamp UUIDs)
        // publishes after it: the first copy stays, the second is discarded.
        let second = parent.path().join("second");
        write(&second, b"second build").unwrap();
        publish_file(&second, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"first build");
        assert!(!second.exists(), "the losing build's file is removed");
    }
}
