//! Live migration on this machine: the [`Host`](crate::Host) migration steps over the
//! hypervisor's (see `hangar_vmm::migrate`).

use std::net::SocketAddr;

use hangar_vmm::MemoryBacking;

use super::{LocalHost, record, spec_of};
use crate::{Adopted, HostError, IncomingVm, LaunchRecord, MigrationProgress, PreparedVm};

fn refused(id: &str, reason: &str) -> HostError {
    HostError::Vmm(hangar_vmm::VmmError::Migration {
        id: id.to_owned(),
        reason: reason.to_owned(),
    })
}

fn parse_addr(id: &str, what: &str, text: &str) -> Result<SocketAddr, HostError> {
    text.parse()
        .map_err(|_| refused(id, &format!("bad {what} address {text:?}")))
}

impl LocalHost {
    pub(super) async fn incoming(
        &self,
        id: &str,
        prepared: &PreparedVm,
        source: &LaunchRecord,
    ) -> Result<IncomingVm, HostError> {
        let source = spec_of(source)?;
        let mut spec = spec_of(&prepared.launch)?;
        if source.pre_os || source.firmware || spec.pre_os || spec.firmware {
            return Err(refused(
                id,
                "only service VMs booted from hangar's kernel can be live-migrated",
            ));
        }
        if let Some(template) = &source.template {
            // A clone: it runs over this host's copy of the same template, its memory file
            // mapped privately (every page then arrives in the stream).
            let here = self.local_template(id, template, &spec)?;
            if (
                here.spec.memory_mib,
                here.spec.ram_tail_kib,
                here.spec.vcpus,
            ) != (source.memory_mib, source.ram_tail_kib, source.vcpus)
            {
                return Err(refused(
                    id,
                    "this host's copy of its template is another machine",
                ));
            }
            spec = hangar_vmm::template::clone_spec(&spec, &here);
            if !matches!(source.memory, MemoryBacking::Mapped { .. }) {
                spec.memory = MemoryBacking::Anonymous;
            }
        } else if !matches!(source.memory, MemoryBacking::Anonymous) {
            return Err(refused(
                id,
                "its memory is a template's (a template being made)",
            ));
        }
        if source.layers.len() != spec.layers.len() || source.base_image.is_none() {
            return Err(refused(
                id,
                "its root here would not be the one it runs on (another stack of layers)",
            ));
        }
        // The machine is the source's (the stream restores its devices); the files are
        // this host's copies of the same content.
        spec.vcpus = source.vcpus;
        spec.memory_mib = source.memory_mib;
        spec.ram_tail_kib = source.ram_tail_kib;
        spec.segment_nic = source.segment_nic;
        spec.layer_slots = source.layer_slots;
        spec.background = false;
        let addrs = self
            .hv
            .migrate_incoming(&spec, self.config.endpoint_host)
            .await?;
        self.note_agentless(id, &spec);
        Ok(IncomingVm {
            launch: record(&spec)?,
            direct_endpoints: prepared.direct_endpoints.clone(),
            migration: addrs.migration.to_string(),
            disk: addrs.disk.map(|addr| addr.to_string()),
            process: None,
        })
    }

    /// This host's template for the VM `prepared` is (the same service, over this host's
    /// copies of the same images: its directory's service prefix and its kernel,
    /// initramfs, base and layers `prepared`'s) as the source's `template` is there. The
    /// control plane checked that its frozen disk is the source template's, byte for byte
    /// (it pulled it from the source, or compared their hashes).
    fn local_template(
        &self,
        id: &str,
        template: &std::path::Path,
        prepared: &hangar_vmm::VmSpec,
    ) -> Result<hangar_vmm::TemplateInfo, HostError> {
        let name = template
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| refused(id, "its template directory has no name"))?;
        let service = name
            .rsplit_once('-')
            .map(|(service, _key)| format!("{service}-"))
            .ok_or_else(|| refused(id, &format!("{name} does not name a template")))?;
        self.template_infos()
            .into_iter()
            .find(|info| {
                info.dir
                    .file_name()
                    .is_some_and(|dir| dir.to_string_lossy().starts_with(&service))
                    && info.spec.kernel == prepared.kernel
                    && info.spec.initramfs == prepared.initramfs
                    && info.spec.layers == prepared.layers
                    && info.spec.base_image == prepared.base_image
            })
            .ok_or_else(|| {
                refused(
                    id,
                    &format!("this host holds no template like {name}: pull it first"),
                )
            })
    }

    pub(super) async fn start_outgoing(&self, id: &str, to: &IncomingVm) -> Result<(), HostError> {
        let migration = parse_addr(id, "migration", &to.migration)?;
        if let Some(disk) = &to.disk {
            let disk = parse_addr(id, "disk export", disk)?;
            self.hv.migrate_disk(id, disk).await?;
        }
        if let Err(err) = self.hv.migrate_ram(id, migration).await {
            let _ = self.hv.migrate_cancel(id).await;
            return Err(err.into());
        }
        Ok(())
    }

    pub(super) async fn outgoing_status(&self, id: &str) -> Result<MigrationProgress, HostError> {
        Ok(self.hv.migration_progress(id).await?)
    }

    pub(super) async fn switchover(
        &self,
        id: &str,
        downtime_ms: u64,
    ) -> Result<MigrationProgress, HostError> {
        Ok(self.hv.migrate_switchover(id, downtime_ms).await?)
    }

    pub(super) async fn abort_outgoing(&self, id: &str) -> Result<(), HostError> {
        Ok(self.hv.migrate_cancel(id).await?)
    }

    pub(super) async fn finish_incoming(&self, id: &str) -> Result<Adopted, HostError> {
        let launched = self.hv.migrate_incoming_finish(id).await?;
        let process = launched.pid;
        self.keep_agent(id, launched);
        Ok(Adopted { process })
    }
}
