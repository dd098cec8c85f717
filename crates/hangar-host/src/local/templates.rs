//! The local host's templates: directories `<templates dir>/<service>-<key>/` (see
//! [`hangar_vmm::template`]), keyed by everything a template's snapshot depends on (the
//! service's definition, kernel, initramfs, command line, base image, machine size).

use std::path::PathBuf;
use std::sync::Arc;

use hangar_core::Service;
use hangar_vmm::{TemplateInfo, VmSpec};
use sha2::{Digest, Sha256};

use super::{LocalHost, error_chain};
use crate::{Host, HostError, PeerSource, TemplateBundle, TemplateFacts};

impl LocalHost {
    /// Removes what an interrupted template build left (staging directories).
    pub fn clean_template_debris(&self) {
        let Some(root) = &self.config.templates_dir else {
            return;
        };
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "tmp") {
                tracing::info!(dir = %path.display(), "removing an unfinished template");
                if let Err(err) = hangar_image::hostfs::remove_tree(&path) {
                    tracing::warn!(error = %err, "cannot remove an unfinished template");
                }
            }
        }
    }

    /// Checks every mapped template's RAM file against the checksum taken when it was made
    /// and removes a template whose file changed (clones would start from memory no
    /// template VM ever had). Run at start-up, before any VM is cloned. Returns the ids of
    /// the templates removed.
    pub fn verify_templates(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for template in self.template_infos() {
            match hangar_vmm::template::verify_ram(&template) {
                Ok(true) => {}
                outcome => {
                    let reason = match outcome {
                        Err(err) => err.to_string(),
                        _ => "its checksum differs from the one taken when it was made".into(),
                    };
                    tracing::error!(template = %template.dir.display(), %reason, "a template's RAM file changed: removing the template");
                    match hangar_vmm::template::remove(&template.dir) {
                        Ok(()) => removed.push(
                            template
                                .dir
                                .file_name()
                                .map(|name| name.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                        ),
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot remove a changed template")
                        }
                    }
                }
            }
        }
        removed
    }

    /// The key of `service`'s template for VMs launched as `spec` describes.
    pub(super) fn template_key(service: &Service, spec: &VmSpec) -> String {
        let inputs = serde_json::json!({
            "service": service,
            "kernel": spec.kernel,
            "initramfs": spec.initramfs,
            "cmdline": key_cmdline(&spec.cmdline),
            "base_image": spec.base_image,
            "layers": spec.layers,
            "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus,
            // Templates keep their RAM as a file clones map (older ones: in the stream).
            "memory": "mapped",
            // Templates have a segment NIC (older ones have not: they are made again).
            "segment_nic": spec.segment_nic,
        });
        let digest = Sha256::digest(inputs.to_string().as_bytes());
        hex::encode(&digest[..8])
    }

    pub(super) fn template_dir(&self, service: &Service, spec: &VmSpec) -> Option<PathBuf> {
        self.config.templates_dir.as_ref().map(|dir| {
            dir.join(format!(
                "{}-{}",
                service.name,
                Self::template_key(service, spec)
            ))
        })
    }

    /// The current template for VMs of `service` launched as `spec`, if one is built.
    pub(super) fn find_template(&self, service: &Service, spec: &VmSpec) -> Option<TemplateInfo> {
        self.find_template_as(service, spec)
            .map(|(template, _)| template)
    }

    /// [`LocalHost::find_template`], with the spec it was found as: `spec`, or `spec` with
    /// the TSC frequency of the neighbouring key (see [`tsc_variants`]). Content keys of a
    /// found template are computed from that spec.
    pub(super) fn find_template_as(
        &self,
        service: &Service,
        spec: &VmSpec,
    ) -> Option<(TemplateInfo, VmSpec)> {
        tsc_variants(spec).into_iter().find_map(|variant| {
            let template = hangar_vmm::template::read(&self.template_dir(service, &variant)?)?;
            Some((template, variant))
        })
    }

    /// A spec with what a template's key depends on, for looking one up.
    pub(super) async fn template_probe_spec(&self, service: &Service) -> Result<VmSpec, HostError> {
        let assets = self.images.guest_assets().await.map_err(HostError::Image)?;
        let root = self
            .images
            .root_image(service, &service.os, Arc::new(|_, _| {}))
            .await
            .map_err(HostError::Image)?;
        Ok(VmSpec {
            id: String::new(),
            vcpus: service.vcpus,
            memory_mib: service.memory_mib,
            ram_tail_kib: self.hv.ram_tail_kib(),
            kernel: assets.vmlinux,
            initramfs: assets.initramfs,
            cmdline: self.config.guest_cmdline.clone(),
            base_image: root.base,
            layer_slots: root.layers.len(),
            layers: root.layers,
            forwards: Vec::new(),
            pre_os: false,
            background: false,
            template: None,
            firmware: false,
            memory: Default::default(),
            segment_nic: true,
            egress: hangar_core::EgressPolicy::None,
        })
    }

    pub(super) fn template_facts(
        info: &TemplateInfo,
        services: &[Service],
    ) -> Option<TemplateFacts> {
        let id = info.dir.file_name()?.to_string_lossy().into_owned();
        let (service, key) = id.rsplit_once('-')?;
        let current = services
            .iter()
            .find(|s| s.name == service)
            .is_some_and(|s| Self::template_key(s, &info.spec) == key);
        Some(TemplateFacts {
            service: service.to_owned(),
            key: key.to_owned(),
            id: id.clone(),
            location: info.dir.display().to_string(),
            memory_mib: info.spec.memory_mib,
            vcpus: info.spec.vcpus,
            size_bytes: info.size_bytes,
            took_ms: info.took_ms,
            created_unix_ms: info.created_unix_ms,
            current,
        })
    }

    pub(super) fn template_infos(&self) -> Vec<TemplateInfo> {
        let Some(root) = &self.config.templates_dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| hangar_vmm::template::read(&entry.path()))
            .collect()
    }

    /// Ends the making of a template: VM `vm_id`, ready and paused, becomes the template
    /// (its process and directory go, also on error).
    pub(super) async fn finish_template(
        &self,
        vm_id: &str,
        service: &Service,
        spec: &VmSpec,
    ) -> Result<TemplateFacts, HostError> {
        let dir = self
            .template_dir(service, spec)
            .ok_or(HostError::TemplatesOff)?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|source| HostError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let made = self.hv.make_template(vm_id, &dir).await;
        self.drop_agent(vm_id);
        let template = made?;
        tracing::info!(service = %service.name, dir = %dir.display(), size_bytes = template.size_bytes, took_ms = template.took_ms, "template made");
        // Hosts whose images are content-addressed (farm hosts) hash the template's files
        // now, so that the first peer to pull it does not wait for that.
        if self.content_key(service, spec).is_some()
            && let Err(err) = self.bundle_of(service).await
        {
            tracing::warn!(service = %service.name, error = %error_chain(&err), "cannot describe the template for peers");
        }
        Self::template_facts(&template, std::slice::from_ref(service))
            .ok_or_else(|| HostError::Guest(format!("template {} has no name", dir.display())))
    }
}

/// `bundle.json` in a template directory: the [`TemplateBundle`] peers pull it as, written
/// the first time one asks (hashing the files once).
const BUNDLE_FILE: &str = "bundle.json";

impl LocalHost {
    /// The content identity of `service`'s template for VMs launched as `spec`: like
    /// [`LocalHost::template_key`], with the content hashes of the kernel, initramfs and
    /// base disk instead of their paths, so hosts holding the same blobs agree on it.
    /// `None` when the image source cannot name a file's content (it builds its own).
    pub(super) fn content_key(&self, service: &Service, spec: &VmSpec) -> Option<String> {
        let hash = |path: &std::path::Path| self.images.content_hash(path);
        let base = match &spec.base_image {
            Some(path) => Some(hash(path)?),
            None => None,
        };
        let layers = spec
            .layers
            .iter()
            .map(|layer| hash(layer))
            .collect::<Option<Vec<_>>>()?;
        let inputs = serde_json::json!({
            "service": service,
            "kernel": hash(&spec.kernel)?,
            "initramfs": hash(&spec.initramfs)?,
            "cmdline": key_cmdline(&spec.cmdline),
            "base_image": base,
            "layers": layers,
            "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus,
            "memory": "mapped",
            "segment_nic": spec.segment_nic,
        });
        Some(hex::encode(Sha256::digest(inputs.to_string().as_bytes())))
    }

    /// `service`'s current template as a [`TemplateBundle`] (see [`Host::template_bundle`]).
    pub(super) async fn bundle_of(
        &self,
        service: &Service,
    ) -> Result<Option<TemplateBundle>, HostError> {
        if !self.templates_apply(service).await {
            return Ok(None);
        }
        let spec = self.template_probe_spec(service).await?;
        let Some((template, spec)) = self.find_template_as(service, &spec) else {
            return Ok(None);
        };
        let Some(content_key) = self.content_key(service, &spec) else {
            return Ok(None);
        };
        let path = template.dir.join(BUNDLE_FILE);
        if let Some(bundle) = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<TemplateBundle>(&bytes).ok())
            .filter(|bundle| bundle.content_key == content_key)
        {
            return Ok(Some(bundle));
        }
        let files = template.clone();
        let (memory, disk, ram) = tokio::task::spawn_blocking(move || {
            let memory = blob_of(&files.memory)?;
            let disk = files.disk.as_deref().map(blob_of).transpose()?;
            let ram = files.ram.as_deref().map(blob_of).transpose()?;
            Ok::<_, HostError>((memory, disk, ram))
        })
        .await
        .map_err(|err| HostError::Template(format!("hashing the template's files: {err}")))??;
        let bundle = TemplateBundle {
            service: service.name.clone(),
            content_key,
            memory,
            ram,
            disk,
            qemu_version: template.qemu_version.clone(),
        };
        let json = serde_json::to_vec_pretty(&bundle).map_err(HostError::Record)?;
        write_file(&path, &json)?;
        Ok(Some(bundle))
    }

    /// Installs `service`'s template from a peer's bundle (see [`Host::pull_template`]).
    pub(super) async fn install_bundle(
        &self,
        service: &Service,
        bundle: &TemplateBundle,
        from: &PeerSource,
    ) -> Result<TemplateFacts, HostError> {
        let started = std::time::Instant::now();
        if !self.templates_apply(service).await {
            return Err(HostError::TemplatesOff);
        }
        let probe = self.template_probe_spec(service).await?;
        let mut mine = Vec::new();
        for variant in tsc_variants(&probe) {
            let key = self.content_key(service, &variant).ok_or_else(|| {
                HostError::Template(format!(
                    "this host's images of {} are not content-addressed",
                    service.name
                ))
            })?;
            mine.push((key, variant));
        }
        let found = mine.iter().position(|(key, _)| *key == bundle.content_key);
        let (Some(found), true) = (found, bundle.service == service.name) else {
            let mine = mine[0].0.as_str();
            return Err(HostError::Template(format!(
                "host {}'s template of {} was made from other images or another definition \
                 (content key {}, this host's {mine})",
                from.host, bundle.service, bundle.content_key
            )));
        };
        let spec = mine.swap_remove(found).1;
        if bundle.disk.is_some() != spec.base_image.is_some() {
            return Err(HostError::Template(format!(
                "host {}'s template of {} does not have the disk this host's VMs have",
                from.host, service.name
            )));
        }
        let dir = self
            .template_dir(service, &spec)
            .ok_or(HostError::TemplatesOff)?;
        if let Some(template) = hangar_vmm::template::read(&dir) {
            return Self::template_facts(&template, std::slice::from_ref(service))
                .ok_or_else(|| HostError::Template(format!("{} has no name", dir.display())));
        }
        let progress: crate::ProgressFn = Arc::new(|_: &str, _: u8| {});
        let memory = self
            .images
            .pull_peer_blob(&bundle.memory, from, "template memory", &progress)
            .await?;
        let disk = match (&bundle.disk, &spec.base_image) {
            (Some(blob), Some(base)) => {
                let disk = self
                    .images
                    .pull_peer_blob(blob, from, "template disk", &progress)
                    .await?;
                // The layer names its backing file by the peer's path: point it at this
                // host's copy of the same base (same content: the keys matched).
                hangar_vmm::template::rebase_disk(&disk, base)
                    .await
                    .map_err(|source| HostError::Io {
                        path: disk.display().to_string(),
                        source,
                    })?;
                Some(disk)
            }
            _ => None,
        };
        let ram = match &bundle.ram {
            Some(blob) => Some(
                self.images
                    .pull_peer_blob(blob, from, "template ram", &progress)
                    .await?,
            ),
            None => None,
        };
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|source| HostError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let info = hangar_vmm::TemplateInfo {
            dir: dir.clone(),
            memory: memory.clone(),
            ram: None,
            ram_xxh64: None,
            disk: disk.clone(),
            size_bytes: 0,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            qemu_version: bundle.qemu_version.clone(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                }),
            spec: spec.clone(),
        };
        let template =
            hangar_vmm::template::assemble(&memory, disk.as_deref(), ram.as_deref(), &dir, info)
                .map_err(|source| HostError::Io {
                    path: dir.display().to_string(),
                    source,
                })?;
        // The bundle stays true (same bytes but the disk's backing name, which
        // the next host rewrites again): this host can be a source in turn.
        let mut kept = bundle.clone();
        if let (Some(blob), Some(disk)) = (&mut kept.disk, &template.disk) {
            *blob = tokio::task::spawn_blocking({
                let disk = disk.clone();
                move || blob_of(&disk)
            })
            .await
            .map_err(|err| HostError::Template(format!("hashing the template's disk: {err}")))??;
        }
        let json = serde_json::to_vec_pretty(&kept).map_err(HostError::Record)?;
        write_file(&template.dir.join(BUNDLE_FILE), &json)?;
        tracing::info!(service = %service.name, from = %from.host, dir = %dir.display(), took_ms = template.took_ms, "template pulled from a peer");
        Self::template_facts(&template, std::slice::from_ref(service))
            .ok_or_else(|| HostError::Template(format!("{} has no name", dir.display())))
    }

    /// The file of a template's bundle with this hash, if this host offers one.
    pub(super) fn bundle_file(&self, sha256: &str) -> Option<PathBuf> {
        self.template_infos().into_iter().find_map(|template| {
            let bytes = std::fs::read(template.dir.join(BUNDLE_FILE)).ok()?;
            let bundle: TemplateBundle = serde_json::from_slice(&bytes).ok()?;
            if bundle.memory.sha256 == sha256 {
                Some(template.memory.clone())
            } else if bundle.ram.as_ref().is_some_and(|ram| ram.sha256 == sha256) {
                template.ram.clone()
            } else if bundle
                .disk
                .as_ref()
                .is_some_and(|disk| disk.sha256 == sha256)
            {
                template.disk.clone()
            } else {
                None
            }
        })
    }
}

/// The width of a TSC key step (see [`key_cmdline`]).
const TSC_STEP_KHZ: u64 = 10_000;

/// How close to the edge of its step a measured TSC frequency must lie for the neighbouring
/// step's templates to be used too. A measurement over 50 ms jitters by some hundred kHz
/// (±150 kHz measured on a 2.4 GHz host); 2 MHz leaves room for more.
const TSC_EDGE_KHZ: u64 = 2_000;

/// The kernel command line as a template's key sees it: `tsc_early_khz` (the host's TSC
/// frequency, measured at each start with a jitter) rounded to the nearest 10 MHz step, so
/// that a restart or another host of the same CPU keeps the key, while hosts whose TSC runs
/// at another rate (a clone keeps its template's calibration) get their own template. A
/// frequency near the edge of a step may be measured on either side of it: see
/// [`tsc_variants`].
fn key_cmdline(cmdline: &str) -> String {
    with_tsc(cmdline, |khz| format!("tsc_early_khz~{}", tsc_step(khz)))
}

/// `cmdline` with its `tsc_early_khz=` word replaced by what `word` makes of its value.
fn with_tsc(cmdline: &str, word: impl Fn(u64) -> String) -> String {
    cmdline
        .split_whitespace()
        .map(|w| tsc_khz(w).map_or_else(|| w.to_owned(), &word))
        .collect::<Vec<_>>()
        .join(" ")
}

fn tsc_khz(word: &str) -> Option<u64> {
    word.strip_prefix("tsc_early_khz=")?.parse().ok()
}

fn tsc_step(khz: u64) -> u64 {
    (khz + TSC_STEP_KHZ / 2) / TSC_STEP_KHZ * TSC_STEP_KHZ
}

/// The specs a template for `spec` may be keyed by: `spec` itself and, when its TSC
/// frequency lies within [`TSC_EDGE_KHZ`] of the edge of its step, `spec` with a frequency
/// just across that edge. Hosts of one CPU whose measurements straddle an edge (or one host
/// before and after a restart) so still find and pull each other's templates.
fn tsc_variants(spec: &VmSpec) -> Vec<VmSpec> {
    cmdline_variants(&spec.cmdline)
        .into_iter()
        .map(|cmdline| VmSpec {
            cmdline,
            ..spec.clone()
        })
        .collect()
}

/// The command lines of [`tsc_variants`]: `cmdline` first.
fn cmdline_variants(cmdline: &str) -> Vec<String> {
    let mut variants = vec![cmdline.to_owned()];
    let Some(khz) = cmdline.split_whitespace().find_map(tsc_khz) else {
        return variants;
    };
    let step = tsc_step(khz);
    let (lower_edge, upper_edge) = (step - TSC_STEP_KHZ / 2, step + TSC_STEP_KHZ / 2);
    let across = if khz - lower_edge < TSC_EDGE_KHZ {
        lower_edge.checked_sub(1)
    } else if upper_edge - khz <= TSC_EDGE_KHZ {
        Some(upper_edge)
    } else {
        None
    };
    if let Some(across) = across {
        variants.push(with_tsc(cmdline, |_| format!("tsc_early_khz={across}")));
    }
    variants
}

/// The blob of a file: its sha256 (hashed as pulled blobs are) and size.
pub(super) fn blob_of(path: &std::path::Path) -> Result<hangar_api::Blob, HostError> {
    let sha256 =
        crate::images::pulled::sha256_of(path).map_err(|err| HostError::Image(err.into()))?;
    let size = std::fs::metadata(path)
        .map_err(|source| HostError::Io {
            path: path.display().to_string(),
            source,
        })?
        .len();
    Ok(hangar_api::Blob { sha256, size })
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
pub(super) fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), HostError> {
    let tmp = path.with_extension("json.part");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| HostError::Io {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::{cmdline_variants, key_cmdline};

    /// Two measurements of one host's TSC (2 445 1xx kHz) that straddle the edge between the
    /// 2 440 and 2 450 MHz steps: each one's key variants hold the other's key.
    #[test]
    fn measurements_across_a_step_edge_share_a_key() {
        let low = "console=ttyS0 tsc_early_khz=2444948 tsc=reliable";
        let high = "console=ttyS0 tsc_early_khz=2445185 tsc=reliable";
        assert_ne!(key_cmdline(low), key_cmdline(high));
        let keys = |cmdline| {
            cmdline_variants(cmdline)
                .iter()
                .map(|v| key_cmdline(v))
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(low), [key_cmdline(low), key_cmdline(high)]);
        assert_eq!(keys(high), [key_cmdline(high), key_cmdline(low)]);
        // Far from an edge, or without a TSC frequency, there is one key.
        assert_eq!(
            cmdline_variants("tsc_early_khz=2599955 tsc=reliable").len(),
            1
        );
        assert_eq!(cmdline_variants("quiet panic=-1").len(), 1);
    }

    #[test]
    fn the_key_absorbs_tsc_jitter_but_not_another_rate() {
        let a = key_cmdline("console=ttyS0 tsc_early_khz=2595955 tsc=reliable");
        let b = key_cmdline("console=ttyS0 tsc_early_khz=2595941 tsc=reliable");
        let c = key_cmdline("console=ttyS0 tsc_early_khz=2999990 tsc=reliable");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, "console=ttyS0 tsc_early_khz~2600000 tsc=reliable");
        assert_eq!(key_cmdline("quiet panic=-1"), "quiet panic=-1");
    }
}
