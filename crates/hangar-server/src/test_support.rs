//! What the manager's tests on the fake backend share: a manager over an in-memory store
//! and a catalog, and requests.

use std::sync::Arc;

use hangar_core::{Catalog, Mode, ServiceRequest};
use hangar_host::{LocalHost, LocalHostConfig};
use hangar_store::Store;
use hangar_vmm::fake::FakeBackend;

use crate::images::NoImages;
use crate::manager::{Manager, ManagerConfig};

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
