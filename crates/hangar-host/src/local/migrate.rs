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
        if source.template.is_some() || !matches!(source.memory, MemoryBacking::Anonymous) {
            return Err(refused(
                id,
                "a template clone maps its template's memory and disk, which the destination \
                 does not hold as the same files",
            ));
        }
        if source.pre_os || source.firmware || spec.pre_os || spec.firmware {
            return Err(refused(
                id,
                "only service VMs booted from hangar's kernel can be live-migrated",
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
