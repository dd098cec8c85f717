//! The typed command layer between HTTP and the domain (Cloud Hypervisor's
//! `RequestHandler`, Firecracker's `VmmAction`): a handler parses and validates its HTTP
//! request into one [`Command`], [`RequestHandler::handle`] executes it against the
//! domain and answers a [`Reply`], and the handler turns that into its HTTP answer. Errors
//! become statuses in one place (`super::error`).
//!
//! When each command is legal:
//! - `Request`, `Check`, `List*`, `Get*`, `BuildImage`, `ExportImage`: always; the domain answers
//!   404/422 for unknown or never-viable services.
//! - `RegisterHost`, `HostHeartbeat`: only from callers with the farm token (checked by
//!   the handler); a heartbeat of a host not registered (or registered again since)
//!   answers 404, and the agent registers again.
//! - `SleepVm`: an active VM (sleeping: no-op); `ArchiveVm`: active or sleeping; `WakeVm`:
//!   sleeping or archived (active: no-op); `DeleteVm`: any state but creating or booting.
//!   Other states answer 409 (`crate::lifecycle::ops::LifecycleError::WrongState`).

use std::path::PathBuf;
use std::sync::Arc;

use hangar_core::{ReadySpec, ServiceRequest};
use hangar_host::ArchiveTier;
use hangar_store::{TaskRecord, VmRecord};

use crate::api::error::ApiError;
use crate::images::policy::{ExportFile, ImagesView};
use crate::lifecycle::policy::{PoliciesView, PolicyChange, PolicyView};
use crate::manager::Manager;
use crate::pools::PoolView;
use crate::requests::{Grant, Stages};
use crate::templates::TemplateView;

/// One operation the API asks of the domain.
#[derive(Debug)]
pub enum Command {
    /// The request path: a VM offering a service (or a configuration), made or claimed
    /// for `owner`.
    Request {
        request: ServiceRequest,
        owner: String,
    },
    /// The heuristics engine's verdict on a request; provisions nothing.
    Check(ServiceRequest),
    /// VMs (with deleted ones when `all`).
    ListVms {
        all: bool,
    },
    GetVm(String),
    DeleteVm(String),
    SleepVm(String),
    ArchiveVm {
        id: String,
        tier: ArchiveTier,
    },
    WakeVm(String),
    ListPools,
    SetPool {
        name: String,
        min: Option<u32>,
        max: Option<u32>,
        /// `Some(None)` goes back to the service's own ready criterion.
        ready: Option<Option<ReadySpec>>,
    },
    ListTemplates,
    ListPolicies,
    SetPolicy {
        service: String,
        change: PolicyChange,
    },
    ResetPolicy(String),
    /// The latest `limit` tasks (of `owner` only, when given).
    ListTasks {
        limit: u32,
        owner: Option<String>,
    },
    /// A task and its steps (404 unless it is `owner`'s, when given).
    GetTask {
        id: String,
        owner: Option<String>,
    },
    /// Cancels a task for `user` (`admin`: anyone's).
    CancelTask {
        id: String,
        user: String,
        admin: bool,
    },
    ListImages,
    BuildImage(ServiceRequest),
    /// An export for `owner` (recorded as their task of kind `export`).
    ExportImage {
        request: ServiceRequest,
        owner: String,
    },
    /// A farm host's agent registers (farm token checked by the handler).
    RegisterHost(hangar_api::HostRegistration),
    /// A farm host's heartbeat (farm token checked by the handler).
    HostHeartbeat {
        name: String,
        heartbeat: hangar_api::Heartbeat,
    },
    ListHosts,
    /// The metrics page (Prometheus text): what this process recorded and what the store
    /// says now.
    Metrics,
    /// Where a VM would be placed now (a dry run: nothing is made).
    PreviewPlacement(hangar_api::PlacementBody),
    /// The default quota and every user's, with what their VMs take.
    ListQuotas,
    /// Sets a user's quota.
    SetQuota {
        user: String,
        limits: hangar_api::Limits,
    },
    /// Usage since `since` (a duration ago, or epoch ms; none: all), summed `by`; only
    /// `owner`'s VMs' time when given.
    Usage {
        since: Option<String>,
        by: hangar_api::UsageBy,
        owner: Option<String>,
    },
    /// Firing alerts; with `all`, pending and resolved ones too.
    ListAlerts {
        all: bool,
    },
}

/// What a command answers.
pub enum Reply {
    Grant(Box<Grant>),
    Verdict(Box<hangar_core::heuristics::Verdict>),
    Vm(VmRecord),
    /// A woken VM, with where the time went.
    Woken(VmRecord, Stages),
    Vms(Vec<VmRecord>),
    Pool(PoolView),
    Pools(Vec<PoolView>),
    Templates(Vec<TemplateView>),
    Policy(PolicyView),
    Policies(PoliciesView),
    Task(TaskRecord, Vec<hangar_store::TaskStep>),
    Tasks(Vec<TaskRecord>),
    Images(ImagesView),
    /// The id of the task that builds the image.
    Building(String),
    Export(ExportFile),
    /// What a registering or reporting agent is told.
    HostReply(hangar_api::HeartbeatReply),
    Hosts(Vec<hangar_api::HostView>),
    /// A page in Prometheus's text format.
    Metrics(String),
    Placement(hangar_api::PlacementView),
    Quotas(hangar_api::QuotasView),
    Quota(hangar_api::QuotaView),
    Usage(hangar_api::UsageView),
    Alerts(Vec<hangar_api::AlertView>),
}

impl Reply {
    /// The error a handler answers when the dispatcher replied with another kind than
    /// its command's (a defect of the dispatcher).
    pub fn unexpected(self) -> ApiError {
        ApiError::Internal(format!(
            "the command layer answered {:?}",
            std::mem::discriminant(&self)
        ))
    }
}

/// Executes [`Command`]s against the domain. The server implements it with [`Manager`];
/// a stub may implement it to test the HTTP layer alone.
#[async_trait::async_trait]
pub trait RequestHandler: Send + Sync {
    async fn handle(&self, command: Command) -> Result<Reply, ApiError>;
}

#[async_trait::async_trait]
impl RequestHandler for Arc<Manager> {
    async fn handle(&self, command: Command) -> Result<Reply, ApiError> {
        let manager = self;
        Ok(match command {
            Command::Request { request, owner } => {
                Reply::Grant(Box::new(manager.request_as(&owner, request).await?))
            }
            Command::Check(request) => {
                Reply::Verdict(Box::new(manager.check_request(&request).await?))
            }
            Command::RegisterHost(registration) => {
                Reply::HostReply(manager.register_host(registration).await?)
            }
            Command::HostHeartbeat { name, heartbeat } => {
                Reply::HostReply(manager.host_heartbeat(&name, heartbeat).await?)
            }
            Command::ListHosts => Reply::Hosts(manager.host_views().await?),
            Command::Metrics => Reply::Metrics(manager.render_metrics().await?),
            Command::ListQuotas => Reply::Quotas(manager.quota_views().await?),
            Command::ListAlerts { all } => Reply::Alerts(manager.alert_views(all).await?),
            Command::SetQuota { user, limits } => {
                Reply::Quota(manager.set_quota(&user, &limits).await?)
            }
            Command::Usage { since, by, owner } => Reply::Usage(
                manager
                    .usage(since.as_deref(), by, owner.as_deref())
                    .await?,
            ),
            Command::PreviewPlacement(body) => {
                Reply::Placement(manager.preview_placement(&body).await?)
            }
            Command::ListVms { all } => Reply::Vms(manager.store().vms(all).await?),
            Command::GetVm(id) => {
                Reply::Vm(
                    manager
                        .store()
                        .vm(&id)
                        .await?
                        .ok_or_else(|| ApiError::NotFound {
                            message: format!("no VM {id}"),
                            alternatives: Vec::new(),
                        })?,
                )
            }
            Command::DeleteVm(id) => Reply::Vm(manager.delete(&id).await?),
            Command::SleepVm(id) => Reply::Vm(manager.sleep(&id).await?),
            Command::ArchiveVm { id, tier } => Reply::Vm(manager.archive(&id, tier).await?.0),
            Command::WakeVm(id) => {
                let (vm, stages) = manager.wake_timed(&id).await?;
                Reply::Woken(vm, stages)
            }
            Command::ListPools => Reply::Pools(manager.pool_views().await?),
            Command::SetPool {
                name,
                min,
                max,
                ready,
            } => Reply::Pool(manager.set_pool(&name, min, max, ready).await?),
            Command::ListTemplates => Reply::Templates(manager.templates().await),
            Command::ListPolicies => Reply::Policies(manager.policy_views().await?),
            Command::SetPolicy { service, change } => {
                Reply::Policy(manager.set_policy(&service, &change).await?)
            }
            Command::ResetPolicy(service) => Reply::Policy(manager.reset_policy(&service).await?),
            Command::ListTasks { limit, owner } => Reply::Tasks(match owner {
                None => manager.store().tasks(limit).await?,
                // Read past the limit, so that others' tasks do not crowd one's own out.
                Some(owner) => manager
                    .store()
                    .tasks(limit.saturating_mul(10))
                    .await?
                    .into_iter()
                    .filter(|task| task.owner == owner)
                    .take(limit as usize)
                    .collect(),
            }),
            Command::GetTask { id, owner } => {
                let task = manager
                    .store()
                    .task(&id)
                    .await?
                    .filter(|task| owner.as_ref().is_none_or(|owner| &task.owner == owner))
                    .ok_or_else(|| ApiError::NotFound {
                        message: format!("no task {id}"),
                        alternatives: Vec::new(),
                    })?;
                let steps = manager.store().task_steps(&id).await?;
                Reply::Task(task, steps)
            }
            Command::CancelTask { id, user, admin } => {
                let task = manager.tasks.cancel(&id, &user, admin).await?;
                let steps = manager.store().task_steps(&id).await?;
                Reply::Task(task, steps)
            }
            Command::ListImages => Reply::Images(manager.images().await?),
            Command::BuildImage(request) => Reply::Building(manager.build_image(&request).await?),
            Command::ExportImage { request, owner } => {
                let dir: PathBuf = manager.config.export_dir.clone();
                let export = manager.export(&request, &dir);
                let service = request.service.clone();
                Reply::Export(
                    manager
                        .recorded_as("export", &owner, service, None, export)
                        .await?,
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::ManagerConfig;
    use crate::test_support::{fake_manager, request};
    use hangar_core::{Mode, VmState};

    const CATALOG: &str = crate::test_support::WEB;

    fn vm(reply: Reply) -> VmRecord {
        match reply {
            Reply::Vm(vm) => vm,
            other => panic!("not a VM: {:?}", std::mem::discriminant(&other)),
        }
    }

    #[tokio::test]
    async fn commands_run_a_vm_through_its_life_and_wrong_phases_are_refused() {
        let (manager, _backend, _store) = fake_manager(CATALOG, ManagerConfig::default());
        let grant = match manager
            .handle(Command::Request {
                request: request("web", Mode::Dedicated),
                owner: "ana".into(),
            })
            .await
            .unwrap()
        {
            Reply::Grant(grant) => grant,
            other => panic!("not a grant: {:?}", std::mem::discriminant(&other)),
        };
        let id = grant.vm.id.clone();
        assert_eq!(grant.vm.owner, "ana");

        // Waking an active VM does nothing; sleeping twice is a no-op the second time.
        assert!(matches!(
            manager.handle(Command::WakeVm(id.clone())).await.unwrap(),
            Reply::Woken(vm, stages) if vm.state == VmState::Active && stages.0.is_empty()
        ));
        let slept = vm(manager.handle(Command::SleepVm(id.clone())).await.unwrap());
        assert_eq!(slept.state, VmState::Sleeping);
        let again = vm(manager.handle(Command::SleepVm(id.clone())).await.unwrap());
        assert_eq!(again.state, VmState::Sleeping);

        let Reply::Woken(woken, stages) =
            manager.handle(Command::WakeVm(id.clone())).await.unwrap()
        else {
            panic!("not woken");
        };
        assert_eq!(woken.state, VmState::Active);
        let names: Vec<&str> = stages.0.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["resume", "identity"]);

        let archived = vm(manager
            .handle(Command::ArchiveVm {
                id: id.clone(),
                tier: ArchiveTier::Zstd,
            })
            .await
            .unwrap());
        assert_eq!(archived.state, VmState::Archived);
        // An archived VM cannot sleep: a typed conflict, mapped to 409.
        let refused = manager
            .handle(Command::SleepVm(id.clone()))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(&refused, ApiError::Conflict(message) if message.contains("only an active VM can sleep")),
            "{refused}"
        );

        let deleted = vm(manager.handle(Command::DeleteVm(id.clone())).await.unwrap());
        assert_eq!(deleted.state, VmState::Deleted);
        assert!(matches!(
            manager.handle(Command::GetVm("vm-nope".into())).await,
            Err(ApiError::NotFound { .. })
        ));
        assert!(matches!(
            manager.handle(Command::ListVms { all: true }).await.unwrap(),
            Reply::Vms(vms) if vms.len() == 1
        ));
    }
}
