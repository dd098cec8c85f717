//! Images for farm hosts: the server builds every image once and hosts pull its files by
//! content hash (`/v1/farm/...`, farm token only).
//!
//! A manifest names files as [`Blob`]s (sha256 and size); `GET /v1/farm/blobs/{sha256}`
//! sends one, from an offset with `Range: bytes=N-` (206) so a host resumes a cut
//! download. The server sends only files it listed in a manifest.

use serde::{Deserialize, Serialize};

/// One file, by content.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Blob {
    /// Lowercase hex sha256 of the file's bytes.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

impl Blob {
    /// Whether `text` can be a blob's hash: 64 lowercase hex digits (so it is also a safe
    /// file name).
    pub fn is_hash(text: &str) -> bool {
        text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// `GET /v1/farm/assets`: the kernel and initramfs every guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AssetsManifest {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// Content hash of every input of the assets (as the server's cache names them).
    pub hash: String,
    pub vmlinux: Blob,
    pub initramfs: Blob,
}

/// `POST /v1/farm/roots`: the root of a service on an operating system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RootBody {
    pub service: String,
    pub os: String,
}

/// The root disks of a service on an operating system, as files to pull.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RootManifest {
    /// The qcow2 a VM's copy-on-write disk is made over (the whole root of a busybox
    /// service; the empty upper layer of a layered one).
    pub base: Option<Blob>,
    /// Read-only layers, top first.
    #[serde(default)]
    pub layers: Vec<Blob>,
    /// The layers' cache hashes, bottom first (the image cache's names, not sha256).
    #[serde(default)]
    pub layer_hashes: Vec<String>,
}

impl RootManifest {
    /// Every blob of the root: the base first, then the layers top first.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.base.iter().chain(self.layers.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lowercase_sha256_hex_is_a_hash() {
        let hash = "a".repeat(64);
        assert!(Blob::is_hash(&hash));
        assert!(Blob::is_hash(&"0123456789abcdef".repeat(4)));
        assert!(!Blob::is_hash(&"A".repeat(64)));
        assert!(!Blob::is_hash(&"a".repeat(63)));
        assert!(!Blob::is_hash(&format!("../{}", "a".repeat(61))));
        assert!(!Blob::is_hash(""));
    }

    #[test]
    fn a_root_body_refuses_unknown_fields() {
        assert!(
            serde_json::from_value::<RootBody>(
                serde_json::json!({"service": "web", "os": "busybox", "env": {}})
            )
            .is_err()
        );
    }
}
