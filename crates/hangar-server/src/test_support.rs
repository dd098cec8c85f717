//! What the manager's tests on the fake backend share: a manager over an in-memory store
//! and a catalog, and requests.

use std::sync::Arc;

use hangar_core::{Catalog, Mode, ServiceRequest};
use hangar_host::{LocalHost, LocalHostConfig};
use hangar_store::Store;
use hangar_vmm::fake::FakeBackend;

use crate::images::NoImages;
use crate::manager::{Manager, ManagerConfig};

/// A catalog of one busybox service, `web` (port `http`, ready when its port answers).
pub(crate) const WEB: &str = r#"
[service.web]
os = "busybox"
[[service.web.port]]
name = "http"
guest = 80
[[service.web.process]]
name = "httpd"
argv = ["httpd"]
[service.web.ready]
checks = [{ tcp = { port = "http" } }]
"#;

/// `web` (ready when its port answers and serves the fake backend's page) and
/// `never-ready`, whose ready check never passes (it times out after 600 ms).
pub(crate) const WEB_AND_NEVER_READY: &str = r#"
[service.web]
os = "busybox"
[[service.web.port]]
name = "http"
guest = 80
[[service.web.process]]
name = "httpd"
argv = ["httpd"]
[service.web.ready]
checks = [{ tcp = { port = "http" } }, { http = { port = "http", body_contains = "fake" } }]

[service.never-ready]
os = "busybox"
[[service.never-ready.port]]
name = "p"
guest = 1
[[service.never-ready.process]]
name = "x"
argv = ["x"]
[service.never-ready.ready]
timeout = "600ms"
interval = "20ms"
checks = [{ bytes = { port = "p", send = "hi", expect = "never said" } }]
"#;

/// A manager on `store` and `backend` for `catalog` (TOML), with no image layers.
pub(crate) fn manager_on(
    store: Arc<dyn Store>,
    backend: FakeBackend,
    catalog: &str,
    config: ManagerConfig,
) -> Arc<Manager> {
    manager_on_host(store, backend, catalog, config, LocalHostConfig::default())
}

/// [`manager_on`], with the local host configured as `host`.
pub(crate) fn manager_on_host(
    store: Arc<dyn Store>,
    backend: FakeBackend,
    catalog: &str,
    config: ManagerConfig,
    host: LocalHostConfig,
) -> Arc<Manager> {
    manager_with_images(store, backend, Arc::new(NoImages), catalog, config, host)
}

/// A manager whose local host runs `backend` with `images`.
pub(crate) fn manager_with_images(
    store: Arc<dyn Store>,
    backend: FakeBackend,
    images: Arc<dyn crate::images::ImageSource>,
    catalog: &str,
    config: ManagerConfig,
    host: LocalHostConfig,
) -> Arc<Manager> {
    let host = LocalHost::new(Arc::new(backend), images.clone(), host);
    Manager::new(
        store,
        Arc::new(host),
        images,
        Arc::new(Catalog::from_toml(catalog).expect("test catalog")),
        config,
    )
}

/// A manager on a new fake backend and in-memory store, with both.
pub(crate) fn fake_manager(
    catalog: &str,
    config: ManagerConfig,
) -> (Arc<Manager>, FakeBackend, Arc<dyn Store>) {
    let store = Arc::new(hangar_store::SqliteStore::open_in_memory().expect("in-memory store"));
    let backend = FakeBackend::new();
    let manager = manager_on(store.clone(), backend.clone(), catalog, config);
    (manager, backend, store)
}

/// A request for `service` in `mode`.
pub(crate) fn request(service: &str, mode: Mode) -> ServiceRequest {
    ServiceRequest {
        service: Some(service.into()),
        mode,
        ..ServiceRequest::default()
    }
}
