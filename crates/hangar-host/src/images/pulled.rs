//! [`PulledImages`]: the image source of a farm host. The control plane builds every image
//! once; a host pulls the files by content hash from it (`/v1/farm/...`, see
//! `hangar_api::farm_images`) and never builds, so it needs no Debian mirror and no image
//! is built twice in a farm.
//!
//! Files are kept in `CACHE/blobs/<sha256>` (QEMU is told each file's format, so the
//! names need no extension). A download goes to `<sha256>.part`, resumes from the part's
//! length with `Range` when one is there (after a cut connection or a restart), and is
//! renamed into place only after its sha256 matched; a mismatch deletes the part. One
//! download per blob at a time: concurrent callers wait for it and then find the file.
//!
//! Manifests answered by the server are kept in `CACHE/manifests/`, so that while no
//! server answers a host still starts VMs from the images it holds.
//!
//! Not done here: eviction of blobs (every pulled blob is kept; [`ImageSource::disk_images`]
//! lists none), layer metadata ([`ImageSource::layers`] is empty: the server owns the layer
//! cache), exports (the server exports).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hangar_api::{AssetsManifest, Blob, Client, ClientError, RootBody, RootManifest};
use hangar_core::Service;
use hangar_image::GuestAssets;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{ImageSource, ImageSourceError, ProgressFn, RootImage};

/// How long a server may take to accept a connection before the next one is tried.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why an image could not be pulled.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// [`PulledImages::new`] was given no server.
    #[error("no image server is configured")]
    NoServers,
    /// The HTTP client could not be made (TLS backend, resolver).
    #[error("cannot make the HTTP client")]
    Http(#[source] reqwest::Error),
    /// A server URL is not `http://HOST:PORT`.
    #[error(transparent)]
    BadServer(#[from] hangar_api::BadUrl),
    /// Every server was tried; this is the last one's error.
    #[error("no image server could give {what} (tried {tried})")]
    Servers {
        what: String,
        tried: usize,
        #[source]
        source: Box<ClientError>,
    },
    /// A manifest named a blob by something that is not a sha256.
    #[error("the server named a blob {0:?}, which is not a sha256")]
    BadHash(String),
    /// The bytes received do not hash to the blob's sha256: refused and deleted.
    #[error("{what}: the bytes received hash to {got}, not {want}; the download was deleted")]
    Corrupt {
        what: String,
        want: String,
        got: String,
    },
    /// More bytes came than the manifest said the blob has: deleted.
    #[error("{what}: the server sent more than the {size} bytes the manifest gives")]
    TooLong { what: String, size: u64 },
    /// The server resumed from another offset than asked for.
    #[error("{what}: asked to resume at byte {asked}, the server sent from byte {sent}")]
    BadResume { what: String, asked: u64, sent: u64 },
    /// The download ended before the blob's last byte (the part is kept to resume).
    #[error("{what}: the download ended after {have} of {size} bytes")]
    Short { what: String, have: u64, size: u64 },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
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

impl PullError {
    /// Whether no server could be reached at all (rather than one answering an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, PullError::Servers { source, .. } if matches!(**source, ClientError::Unreachable { .. }))
    }
}

impl From<PullError> for ImageSourceError {
    fn from(source: PullError) -> ImageSourceError {
        ImageSourceError::Pull(Box::new(source))
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PullError + 'a {
    move |source| PullError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Images pulled from the control plane (see the module documentation).
pub struct PulledImages {
    blobs_dir: PathBuf,
    manifests_dir: PathBuf,
    servers: Vec<Client>,
    /// Where files pulled from peers (templates' files) land, apart from the image blobs
    /// (which heartbeats list): the caller moves them away at once.
    peer_dir: PathBuf,
    /// The HTTP client every server's and peer's [`Client`] shares.
    http: reqwest::Client,
    /// The server that answered last: tried first.
    preferred: AtomicUsize,
    /// One lock per blob being pulled.
    downloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for PulledImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PulledImages")
            .field("blobs_dir", &self.blobs_dir)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl PulledImages {
    /// Images kept in `cache_dir`, pulled from `servers` (base URLs, `http://IP:PORT`,
    /// tried in order: on a connection error, the next) with the farm `token`. Creates the
    /// cache's directories.
    pub fn new(
        cache_dir: PathBuf,
        servers: Vec<String>,
        token: String,
    ) -> Result<PulledImages, PullError> {
        if servers.is_empty() {
            return Err(PullError::NoServers);
        }
        // A server that does not accept the connection soon is skipped for the next; no
        // read timeout: a root's manifest waits for its build, which can take minutes.
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(PullError::Http)?;
        let servers = servers
            .iter()
            .map(|base| {
                Client::with_http(base, http.clone()).map(|client| client.with_token(&token))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let blobs_dir = cache_dir.join("blobs");
        let manifests_dir = cache_dir.join("manifests");
        let peer_dir = cache_dir.join("peer");
        for dir in [&blobs_dir, &manifests_dir, &peer_dir] {
            std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        }
        Ok(PulledImages {
            blobs_dir,
            manifests_dir,
            peer_dir,
            servers,
            http,
            preferred: AtomicUsize::new(0),
            downloads: Mutex::default(),
        })
    }

    /// The blobs held (pulled completely and verified), by sha256, sorted: for the
    /// heartbeat's `HostFactsView.blobs`.
    pub fn held(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.blobs_dir) else {
            return Vec::new();
        };
        let mut held: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| Blob::is_hash(name))
            .collect();
        held.sort();
        held
    }

    /// Where the blob `sha256` is kept once pulled.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs_dir.join(sha256)
    }

    /// Asks the servers in turn, starting with the one that answered last, until one
    /// answers; a server that cannot be reached is skipped. An error answer ends the
    /// round (every server has the same catalog).
    async fn ask<T, F, Fut>(&self, what: &str, call: F) -> Result<T, PullError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..self.servers.len() {
            let index = (start + i) % self.servers.len();
            match call(self.servers[index].clone()).await {
                Ok(value) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(err @ ClientError::Unreachable { .. }) => {
                    tracing::warn!(server = %self.servers[index].base(), error = %err, "image server unreachable; trying the next");
                    last = Some(err);
                }
                Err(err) => {
                    return Err(PullError::Servers {
                        what: what.to_owned(),
                        tried: i + 1,
                        source: Box::new(err),
                    });
                }
            }
        }
        Err(PullError::Servers {
            what: what.to_owned(),
            tried: self.servers.len(),
            source: Box::new(last.expect("at least one server")),
        })
    }

    /// A manifest from the servers, kept on disk under `key`; when no server can be
    /// reached, the copy kept last time, if there is one.
    async fn manifest<T, F, Fut>(&self, key: &str, what: &str, call: F) -> Result<T, PullError>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let path = self.manifest_path(key);
        match self.ask(what, call).await {
            Ok(manifest) => {
                if let Err(err) = write_json(&path, &manifest).await {
                    tracing::warn!(error = %err, "cannot keep a manifest; pulling works on");
                }
                Ok(manifest)
            }
            Err(err @ PullError::Servers { .. }) if err.is_unreachable() => {
                match self.kept_manifest(key) {
                    Some(manifest) => {
                        tracing::warn!(error = %err, "using the manifest kept last time");
                        Ok(manifest)
                    }
                    None => Err(err),
                }
            }
            Err(err) => Err(err),
        }
    }

    fn manifest_path(&self, key: &str) -> PathBuf {
        self.manifests_dir
            .join(format!("{}.json", hex::encode(key.as_bytes())))
    }

    fn kept_manifest<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let text = std::fs::read(self.manifest_path(key)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn root_key(service: &str, os: &str) -> String {
        format!("root/{service}@{os}")
    }

    /// Whether the blob is held at its manifest size.
    fn holds(&self, blob: &Blob) -> bool {
        Blob::is_hash(&blob.sha256)
            && std::fs::metadata(self.blob_path(&blob.sha256))
                .is_ok_and(|meta| meta.is_file() && meta.len() == blob.size)
    }

    /// The local path of `blob`, pulled first when it is not held. `what` names it in
    /// progress (`pulling layer 1a2b3c4d5e6f`) and errors.
    pub async fn pull(
        &self,
        blob: &Blob,
        what: &str,
        progress: &ProgressFn,
    ) -> Result<PathBuf, PullError> {
        let start = self.preferred.load(Ordering::Relaxed);
        self.pull_via(&self.servers, start, &self.blobs_dir, blob, what, progress)
            .await
    }

    /// [`PulledImages::pull`] from a peer host (a template's files) instead of the
    /// servers: `url` is the peer agent's, `token` the farm token it accepts. The file lands
    /// in `CACHE/peer/<sha256>`, not among the image blobs; the caller moves it away.
    pub async fn pull_from_peer(
        &self,
        url: &str,
        token: &str,
        blob: &Blob,
        what: &str,
        progress: &ProgressFn,
    ) -> Result<PathBuf, PullError> {
        let peer = Client::with_http(url, self.http.clone())?.with_token(token);
        self.pull_via(
            std::slice::from_ref(&peer),
            0,
            &self.peer_dir,
            blob,
            what,
            progress,
        )
        .await
    }

    /// Pulls `blob` into `dir` (as `dir/<sha256>`) from the first of `sources` (tried in
    /// turn from `start`) that gives it whole, verified; one download per blob at a time.
    async fn pull_via(
        &self,
        sources: &[Client],
        start: usize,
        dir: &Path,
        blob: &Blob,
        what: &str,
        progress: &ProgressFn,
    ) -> Result<PathBuf, PullError> {
        if sources.is_empty() {
            return Err(PullError::NoServers);
        }
        if !Blob::is_hash(&blob.sha256) {
            return Err(PullError::BadHash(blob.sha256.clone()));
        }
        let path = dir.join(&blob.sha256);
        let what = format!("{what} {}", &blob.sha256[..12]);
        let lock = {
            let mut downloads = self
                .downloads
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            downloads.entry(blob.sha256.clone()).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        if std::fs::metadata(&path).is_ok_and(|meta| meta.is_file() && meta.len() == blob.size) {
            return Ok(path);
        }
        let part = dir.join(format!("{}.part", blob.sha256));
        let mut last = None;
        for i in 0..sources.len() {
            let index = (start + i) % sources.len();
            let client = &sources[index];
            match self.download(client, blob, &part, &what, progress).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                // The server cannot be reached, does not know the blob, or the transfer
                // broke off: the next server may do better (the part is kept).
                Err(DownloadError::Client(err)) => {
                    tracing::warn!(server = %client.base(), blob = %blob.sha256, error = %err, "pulling a blob failed; trying the next server");
                    last = Some(PullError::Servers {
                        what: what.clone(),
                        tried: i + 1,
                        source: Box::new(err),
                    });
                }
                Err(DownloadError::Short(err)) => {
                    tracing::warn!(server = %client.base(), error = %err, "a download ended early; trying the next server");
                    last = Some(err);
                }
                Err(DownloadError::Fatal(err)) => return Err(err),
            }
        }
        if let Some(err) = last {
            return Err(err);
        }
        let hashed = part.clone();
        let got = tokio::task::spawn_blocking(move || sha256_of(&hashed))
            .await
            .map_err(|source| PullError::Interrupted {
                path: part.clone(),
                source,
            })??;
        if got != blob.sha256 {
            tokio::fs::remove_file(&part)
                .await
                .map_err(io("cannot delete", &part))?;
            return Err(PullError::Corrupt {
                what,
                want: blob.sha256.clone(),
                got,
            });
        }
        tokio::fs::rename(&part, &path)
            .await
            .map_err(io("cannot rename into place", &part))?;
        progress(&format!("pulled {what}"), 100);
        Ok(path)
    }

    /// Receives the rest of `blob` from `client` into `part`.
    async fn download(
        &self,
        client: &Client,
        blob: &Blob,
        part: &Path,
        what: &str,
        progress: &ProgressFn,
    ) -> Result<(), DownloadError> {
        let mut have = match tokio::fs::metadata(part).await {
            Ok(meta) => meta.len(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(DownloadError::Fatal(PullError::Io {
                    what: "cannot read",
                    path: part.to_owned(),
                    source,
                }));
            }
        };
        if have > blob.size {
            have = 0;
        }
        if have == blob.size && have > 0 {
            return Ok(());
        }
        let mut download = client
            .farm_blob(&blob.sha256, have)
            .await
            .map_err(DownloadError::Client)?;
        let offset = download.offset();
        if offset != have && offset != 0 {
            return Err(DownloadError::Fatal(PullError::BadResume {
                what: what.to_owned(),
                asked: have,
                sent: offset,
            }));
        }
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).write(true);
        if offset == 0 {
            options.truncate(true);
        } else {
            options.append(true);
        }
        let mut file = options
            .open(part)
            .await
            .map_err(|e| DownloadError::Fatal(io("cannot write", part)(e)))?;
        have = offset;
        if offset > 0 {
            tracing::info!(blob = %blob.sha256, from = offset, "resuming a download");
        }
        let percent =
            |have: u64| -> u8 { (have.saturating_mul(100) / blob.size.max(1)).min(100) as u8 };
        let mut reported = percent(have);
        progress(&format!("pulling {what}"), reported);
        let received = loop {
            match download.chunk().await {
                Ok(Some(chunk)) => {
                    have += chunk.len() as u64;
                    if have > blob.size {
                        drop(file);
                        let _ = tokio::fs::remove_file(part).await;
                        return Err(DownloadError::Fatal(PullError::TooLong {
                            what: what.to_owned(),
                            size: blob.size,
                        }));
                    }
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| DownloadError::Fatal(io("cannot write", part)(e)))?;
                    let now = percent(have);
                    if now != reported {
                        reported = now;
                        progress(&format!("pulling {what}"), now);
                    }
                }
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        file.flush()
            .await
            .map_err(|e| DownloadError::Fatal(io("cannot write", part)(e)))?;
        file.sync_all()
            .await
            .map_err(|e| DownloadError::Fatal(io("cannot write", part)(e)))?;
        received.map_err(DownloadError::Client)?;
        if have < blob.size {
            return Err(DownloadError::Short(PullError::Short {
                what: what.to_owned(),
                have,
                size: blob.size,
            }));
        }
        Ok(())
    }

    /// The root manifest of `service` on `os` kept on disk, if one was pulled.
    fn kept_root(&self, service: &Service, os: &str) -> Option<RootManifest> {
        self.kept_manifest(&Self::root_key(&service.name, os))
    }
}

/// How one server's download ended badly.
enum DownloadError {
    /// No answer, an error answer, or a transfer cut: another server may do better.
    Client(ClientError),
    /// The answer ended early.
    Short(PullError),
    /// Trying elsewhere will not help (local I/O, a corrupt or overlong answer).
    Fatal(PullError),
}

async fn write_json(path: &Path, value: &impl Serialize) -> Result<(), PullError> {
    let text = serde_json::to_vec_pretty(value).map_err(|err| PullError::Io {
        what: "cannot encode",
        path: path.to_owned(),
        source: std::io::Error::other(err),
    })?;
    // One temporary name per writer: concurrent pulls keep the same manifest.
    let tmp = path.with_extension(format!("json.tmp-{}", ulid::Ulid::new()));
    tokio::fs::write(&tmp, text)
        .await
        .map_err(io("cannot write", &tmp))?;
    let renamed = tokio::fs::rename(&tmp, path).await;
    if renamed.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    renamed.map_err(io("cannot rename into place", &tmp))
}

/// The lowercase hex sha256 of the file at `path`.
pub(crate) fn sha256_of(path: &Path) -> Result<String, PullError> {
    let mut file = std::fs::File::open(path).map_err(io("cannot read", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn no_progress() -> ProgressFn {
    Arc::new(|_: &str, _: u8| {})
}

#[async_trait::async_trait]
impl ImageSource for PulledImages {
    fn held_blobs(&self) -> Vec<String> {
        self.held()
    }

    /// Roots whose manifest was pulled and whose every blob is held.
    fn held_roots(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.manifests_dir) else {
            return Vec::new();
        };
        let mut roots: Vec<String> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let key = hex::decode(name.to_str()?.strip_suffix(".json")?).ok()?;
                let root = String::from_utf8(key)
                    .ok()?
                    .strip_prefix("root/")?
                    .to_owned();
                let manifest: RootManifest = self.kept_manifest(&format!("root/{root}"))?;
                manifest
                    .blobs()
                    .all(|blob| self.holds(blob))
                    .then_some(root)
            })
            .collect();
        roots.sort();
        roots
    }

    /// A pulled file is named by its hash: the hash of a path in the blob store is its
    /// name (no file is read).
    fn content_hash(&self, path: &Path) -> Option<String> {
        let name = path.file_name()?.to_str()?;
        (path.parent() == Some(self.blobs_dir.as_path()) && Blob::is_hash(name))
            .then(|| name.to_owned())
    }

    async fn pull_peer_blob(
        &self,
        blob: &Blob,
        from: &crate::PeerSource,
        what: &str,
        progress: &ProgressFn,
    ) -> Result<PathBuf, ImageSourceError> {
        Ok(self
            .pull_from_peer(&from.url, &from.token, blob, what, progress)
            .await?)
    }

    async fn guest_assets(&self) -> Result<GuestAssets, ImageSourceError> {
        let manifest: AssetsManifest = self
            .manifest(
                "assets",
                "the guest assets' manifest",
                |client| async move { client.farm_assets().await },
            )
            .await?;
        let progress = no_progress();
        let vmlinux = self.pull(&manifest.vmlinux, "kernel", &progress).await?;
        let initramfs = self
            .pull(&manifest.initramfs, "initramfs", &progress)
            .await?;
        Ok(GuestAssets {
            vmlinux,
            initramfs,
            kernel_release: manifest.kernel_release,
            hash: manifest.hash,
        })
    }

    /// Asks the server for the root (it builds it if needed: the answer can take minutes),
    /// then pulls its missing blobs, reporting each to `progress`.
    async fn root_image(
        &self,
        service: &Service,
        os: &str,
        progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        let body = RootBody {
            service: service.name.clone(),
            os: os.to_owned(),
        };
        let what = format!("the root of {} on {os}", service.name);
        let manifest: RootManifest = self
            .manifest(&Self::root_key(&service.name, os), &what, |client| {
                let body = body.clone();
                async move { client.farm_root(&body).await }
            })
            .await?;
        let base = match &manifest.base {
            Some(blob) => Some(self.pull(blob, "base disk", &progress).await?),
            None => None,
        };
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for blob in &manifest.layers {
            layers.push(self.pull(blob, "layer", &progress).await?);
        }
        Ok(RootImage {
            base,
            layers,
            layer_hashes: manifest.layer_hashes,
        })
    }

    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, ImageSourceError> {
        let what = format!("the disk of os {os}");
        let blob: Option<Blob> = match self
            .manifest(&format!("os/{os}"), &what, |client| {
                let os = os.to_owned();
                async move { client.farm_os(&os).await }
            })
            .await
        {
            Ok(blob) => blob,
            Err(PullError::Servers { source, .. })
                if source.status().map(|status| status.as_u16()) == Some(404) =>
            {
                return Err(ImageSourceError::NoOs(os.to_owned()));
            }
            Err(err) => return Err(err.into()),
        };
        match blob {
            Some(blob) => Ok(Some(self.pull(&blob, "os disk", &no_progress()).await?)),
            None => Ok(None),
        }
    }

    /// Whether the root of `service` on `os` was pulled before and every blob of it is
    /// still held (a request will then download nothing).
    fn is_built(&self, service: &Service, os: &str) -> bool {
        self.kept_root(service, os)
            .is_some_and(|root| root.blobs().all(|blob| self.holds(blob)))
    }

    /// The layer hashes of the root as last pulled; empty when it was never pulled here
    /// (the agent cannot ask the server from this synchronous call).
    fn chain(&self, service: &Service, os: &str) -> Vec<String> {
        self.kept_root(service, os)
            .map(|root| root.layer_hashes)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_server_or_a_bad_url_is_refused_and_held_lists_whole_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            PulledImages::new(dir.path().into(), Vec::new(), "t".into()),
            Err(PullError::NoServers)
        ));
        assert!(matches!(
            PulledImages::new(dir.path().into(), vec!["not a url".into()], "t".into()),
            Err(PullError::BadServer(_))
        ));
        let images = PulledImages::new(
            dir.path().into(),
            vec!["http://127.0.0.1:9".into()],
            "t".into(),
        )
        .unwrap();
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        std::fs::write(images.blob_path(&b), b"x").unwrap();
        std::fs::write(images.blob_path(&a), b"x").unwrap();
        std::fs::write(
            dir.path()
                .join("blobs")
                .join(format!("{}.part", "c".repeat(64))),
            b"x",
        )
        .unwrap();
        assert_eq!(images.held(), vec![a, b]);
    }
}
