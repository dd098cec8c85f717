//! The composition root: [`Manager`] holds what every concern of the server shares (the
//! store, the host, the image source, the catalog, the configuration) and each concern's
//! own run-time state; the concerns (`requests`, `pools`, `lifecycle`, `images`,
//! `templates`, `tasks`, `scheduler`, `reconcile`, `endpoints`) add its methods.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::Catalog;
use hangar_host::Host;
use hangar_store::Store;

use crate::images::ImageSource;

/// The host name of the embedded local host in single-node mode.
pub const LOCAL_HOST: &str = "local";

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Address the host's port forwards listen on; endpoints are `endpoint_host:port`.
    pub endpoint_host: IpAddr,
    /// How long a request waits for a VM when it names no deadline.
    pub default_deadline: Duration,
    /// Most memory all warm pools together may hold (ready and booting VMs), in MiB.
    pub pool_memory_mib: u64,
    /// Most disk the cached image layers may take before the least recently used unused
    /// ones are evicted, in MiB.
    pub image_budget_mib: u64,
    /// Where exports are assembled before they are sent.
    pub export_dir: std::path::PathBuf,
    /// When set, answers carry a DNS name `<vm>.<domain>`.
    pub dns_domain: Option<String>,
    /// Most guest memory active and sleeping VMs may hold, in MiB (none: unlimited); over
    /// it, the least recently used are archived.
    pub memory_budget_mib: Option<u64>,
    /// Most disk archives (and evictable images) may take, in MiB (none: unlimited); over
    /// it, the least recently used are deleted.
    pub disk_budget_mib: Option<u64>,
    /// How often the lifecycle loop looks at idle timers and budgets.
    pub lifecycle_interval: Duration,
    /// The secret farm hosts prove themselves with (bearer token), both ways: agents to
    /// the server, the server to agents. Empty: no host is accepted.
    pub farm_token: String,
    /// The secret a Prometheus scraper reads `GET /metrics` with (bearer token); it opens
    /// nothing else. Empty: only admins' tokens read it.
    pub metrics_token: String,
    /// When farm hosts without heartbeats are declared down, then lost.
    pub host_loss: crate::farm::LossTimes,
    /// The control plane's API addresses agents are told (this server's first).
    pub server_urls: Vec<String>,
    /// The shortest idle timers `PUT /v1/policies/{service}` may set.
    pub policy_floors: hangar_core::lifecycle::PolicyFloors,
    /// The key secret settings are sealed with in the store ([`crate::secrets`]); replicas
    /// sharing a store share it. The default is a fresh random key (tests).
    pub secrets_key: [u8; 32],
    /// The quota of every user without one of their own (default: no limits).
    pub default_quota: hangar_core::quota::Limits,
    /// Prices of what usage metering counts (default: free).
    pub prices: hangar_core::usage::Prices,
    /// Where imported machines' model disks are kept (`DATA_DIR/models`); none: imports
    /// are refused.
    pub models_dir: Option<std::path::PathBuf>,
    /// The most an imported image may be, uploaded and virtually.
    pub import_limits: hangar_image::import::ImportLimits,
    /// Alert rules and sinks (default: every rule on, the log only).
    pub alerts: hangar_core::alerts::AlertConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            endpoint_host: IpAddr::from([127, 0, 0, 1]),
            default_deadline: Duration::from_secs(120),
            pool_memory_mib: 1024,
            image_budget_mib: 20 * 1024,
            export_dir: std::env::temp_dir(),
            dns_domain: None,
            memory_budget_mib: None,
            disk_budget_mib: None,
            lifecycle_interval: Duration::from_millis(500),
            farm_token: String::new(),
            metrics_token: String::new(),
            host_loss: crate::farm::LossTimes::default(),
            server_urls: Vec::new(),
            policy_floors: hangar_core::lifecycle::PolicyFloors::default(),
            secrets_key: {
                use rand::RngCore;
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                key
            },
            default_quota: hangar_core::quota::Limits::UNLIMITED,
            prices: hangar_core::usage::Prices::default(),
            models_dir: None,
            import_limits: hangar_image::import::ImportLimits::default(),
            alerts: hangar_core::alerts::AlertConfig::default(),
        }
    }
}

pub struct Manager {
    pub(crate) store: Arc<dyn Store>,
    /// The hosts: the server's own (single-node mode) and the farm's. New VMs are placed
    /// on one; operations on a VM go to the host it was placed on ([`Manager::host_of`]).
    pub(crate) scheduler: crate::scheduler::Scheduler,
    /// Farm state of this server: whether it leads, what it knows of hosts' losses.
    pub(crate) farm: crate::farm::FarmRuntime,
    pub(crate) images: Arc<dyn ImageSource>,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) config: ManagerConfig,
    /// One lifecycle operation (sleep, archive, wake) at a time per VM.
    pub(crate) vm_ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Warm pool bookkeeping: request rates, fills in flight, the refill signal.
    pub(crate) pools: crate::pools::PoolRuntime,
    /// Lifecycle bookkeeping: request rates per service, failed actions, the loop's signal.
    pub(crate) lifecycle: crate::lifecycle::policy::LifecycleRuntime,
    /// One lock per (service, environment): shared requests that find no VM wait for the
    /// one being made instead of making their own.
    pub(crate) shared_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Task records and the outcomes of creation tasks, for the requests waiting on them.
    pub(crate) tasks: crate::tasks::Tasks,
    /// Services whose template is being built.
    pub(crate) templates_building: Mutex<std::collections::HashSet<String>>,
    /// One lock per `service@host`: that farm host pulling the service's template from a
    /// peer.
    pub(crate) template_pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The forwarder holding stable endpoints; without one, endpoints are the VMs' direct
    /// port forwards.
    pub(crate) endpoints: std::sync::OnceLock<crate::endpoints::StableEndpoints>,
    /// Image builds, promotion and eviction.
    pub(crate) image_runtime: crate::images::policy::ImageRuntime,
    /// Seals and opens secret settings kept in the store.
    pub(crate) secrets: crate::secrets::Secrets,
    /// VMs reserved against their owners' quotas and not yet recorded.
    pub(crate) quotas: crate::quotas::QuotaRuntime,
    /// API tokens recently checked, and idempotency keys being answered.
    pub(crate) auth: crate::api::auth::AuthRuntime,
    /// The live events' poller (`GET /v1/events`).
    pub(crate) events: crate::web::events::Hub,
    /// Migrations in flight (`crate::migration`).
    pub(crate) migrations: crate::migration::MigrationRuntime,
    /// Evacuations this server ran, by host (`crate::evacuation`).
    pub(crate) evacuations: crate::evacuation::EvacuationRuntime,
    /// Stacks' tasks and locks (`crate::stacks`).
    pub(crate) stacks_runtime: crate::stacks::StacksRuntime,
}

/// What start-up reconciliation found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub adopted: Vec<String>,
    pub failed: Vec<String>,
    pub stopped_unknown: Vec<String>,
    pub removed_dirs: Vec<String>,
}

impl Manager {
    /// A manager of one host, the server's own (single-node mode).
    pub fn new(
        store: Arc<dyn Store>,
        host: Arc<dyn Host>,
        images: Arc<dyn ImageSource>,
        catalog: Arc<Catalog>,
        config: ManagerConfig,
    ) -> Arc<Manager> {
        Manager::with_hosts(
            store,
            crate::scheduler::Scheduler::new(Some(host), None),
            images,
            catalog,
            config,
        )
    }

    /// A manager of the hosts `scheduler` knows (the server's own, if any, and a farm's).
    pub fn with_hosts(
        store: Arc<dyn Store>,
        scheduler: crate::scheduler::Scheduler,
        images: Arc<dyn ImageSource>,
        catalog: Arc<Catalog>,
        config: ManagerConfig,
    ) -> Arc<Manager> {
        Arc::new(Manager {
            secrets: crate::secrets::Secrets::new(&config.secrets_key, &catalog),
            tasks: crate::tasks::Tasks::new(store.clone()),
            store,
            scheduler,
            farm: crate::farm::FarmRuntime::default(),
            images,
            catalog,
            config,
            vm_ops: Mutex::default(),
            pools: crate::pools::PoolRuntime::default(),
            lifecycle: crate::lifecycle::policy::LifecycleRuntime::default(),
            shared_locks: Mutex::default(),
            templates_building: Mutex::default(),
            template_pulls: Mutex::default(),
            endpoints: std::sync::OnceLock::new(),
            image_runtime: crate::images::policy::ImageRuntime::default(),
            quotas: crate::quotas::QuotaRuntime::default(),
            auth: crate::api::auth::AuthRuntime::default(),
            events: crate::web::events::Hub::default(),
            migrations: crate::migration::MigrationRuntime::default(),
            evacuations: crate::evacuation::EvacuationRuntime::default(),
            stacks_runtime: crate::stacks::StacksRuntime::default(),
        })
    }

    /// Gives VMs stable endpoints held by this forwarder (once, before the first request).
    pub fn use_stable_endpoints(&self, endpoints: crate::endpoints::StableEndpoints) {
        if self.endpoints.set(endpoints).is_err() {
            tracing::warn!("stable endpoints were set already");
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }
}
