//! [`UnknownHost`]: what a VM recorded on a host this server does not know is operated
//! through. Every operation fails with [`HostError::Unknown`]; nothing is touched.

use std::collections::HashSet;

use hangar_core::Service;
use hangar_host::{
    Adopted, ArchiveFacts, ArchiveTier, BootedShell, HandOut, HandedOut, Host, HostError,
    HostFacts, LaunchRecord, MadeVm, PreparedVm, ProgressFn, RunState, ShellPlan, TemplateFacts,
    VmPlan, VmRun, WakeFrom, Woken,
};

/// A host known by name only.
#[derive(Debug, Clone)]
pub struct UnknownHost {
    name: String,
}

impl UnknownHost {
    pub fn new(name: &str) -> UnknownHost {
        UnknownHost {
            name: name.to_owned(),
        }
    }

    fn error(&self) -> HostError {
        HostError::Unknown(self.name.clone())
    }
}

#[async_trait::async_trait]
impl Host for UnknownHost {
    fn name(&self) -> &str {
        &self.name
    }

    async fn facts(&self) -> Result<HostFacts, HostError> {
        Err(self.error())
    }

    async fn inventory(&self) -> Result<Vec<VmRun>, HostError> {
        Err(self.error())
    }

    async fn run_state(&self, _id: &str) -> Result<RunState, HostError> {
        Err(self.error())
    }

    async fn prepare_vm(&self, _: &VmPlan, _: ProgressFn) -> Result<PreparedVm, HostError> {
        Err(self.error())
    }

    async fn make_vm(
        &self,
        _: &VmPlan,
        _: &PreparedVm,
        _: ProgressFn,
    ) -> Result<MadeVm, HostError> {
        Err(self.error())
    }

    async fn hand_out(&self, _: &str, _: &HandOut) -> Result<HandedOut, HostError> {
        Err(self.error())
    }

    async fn boot_shell(
        &self,
        _: &str,
        _: &LaunchRecord,
        _: &ShellPlan,
    ) -> Result<BootedShell, HostError> {
        Err(self.error())
    }

    async fn sleep(&self, _: &str) -> Result<(), HostError> {
        Err(self.error())
    }

    async fn archive(&self, _: &str, _: ArchiveTier) -> Result<ArchiveFacts, HostError> {
        Err(self.error())
    }

    async fn console(
        &self,
        _: &str,
        _: Option<u64>,
        _: u32,
    ) -> Result<hangar_host::ConsoleChunk, HostError> {
        Err(self.error())
    }

    async fn archive_facts(&self, _: &str) -> Result<Option<ArchiveFacts>, HostError> {
        Ok(None)
    }

    async fn wake(&self, _: &str, _: &WakeFrom) -> Result<Woken, HostError> {
        Err(self.error())
    }

    async fn adopt(
        &self,
        _: &str,
        _: &LaunchRecord,
        _: bool,
    ) -> Result<Option<Adopted>, HostError> {
        Err(self.error())
    }

    async fn stop(&self, _: &str) -> Result<(), HostError> {
        Err(self.error())
    }

    async fn destroy(&self, _: &str) -> Result<(), HostError> {
        Err(self.error())
    }

    async fn migrate_incoming(
        &self,
        _: &str,
        _: &PreparedVm,
        _: &LaunchRecord,
    ) -> Result<hangar_host::IncomingVm, HostError> {
        Err(self.error())
    }

    async fn migrate_start(&self, _: &str, _: &hangar_host::IncomingVm) -> Result<(), HostError> {
        Err(self.error())
    }

    async fn migrate_status(&self, _: &str) -> Result<hangar_host::MigrationProgress, HostError> {
        Err(self.error())
    }

    async fn migrate_switchover(
        &self,
        _: &str,
        _: u64,
    ) -> Result<hangar_host::MigrationProgress, HostError> {
        Err(self.error())
    }

    async fn migrate_abort(&self, _: &str) -> Result<(), HostError> {
        Err(self.error())
    }

    async fn migrate_finish(&self, _: &str) -> Result<Adopted, HostError> {
        Err(self.error())
    }

    async fn remove_leftovers(&self, _: &HashSet<String>) -> Result<Vec<String>, HostError> {
        Err(self.error())
    }

    async fn templates_apply(&self, _: &Service) -> bool {
        false
    }

    async fn has_template(&self, _: &Service) -> Result<bool, HostError> {
        Err(self.error())
    }

    fn template_of(&self, _: &LaunchRecord) -> Option<String> {
        None
    }

    async fn templates(&self, _: &[Service]) -> Result<Vec<TemplateFacts>, HostError> {
        Ok(Vec::new())
    }

    async fn remove_template(&self, _: &str) -> Result<(), HostError> {
        Err(self.error())
    }

    async fn template_bundle(
        &self,
        _: &Service,
    ) -> Result<Option<hangar_host::TemplateBundle>, HostError> {
        Ok(None)
    }

    async fn pull_template(
        &self,
        _: &Service,
        _: &hangar_host::TemplateBundle,
        _: &hangar_host::PeerSource,
    ) -> Result<TemplateFacts, HostError> {
        Err(self.error())
    }
}
