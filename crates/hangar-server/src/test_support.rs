//! What the manager's tests on the fake backend share: a manager over an in-memory store
//! and a catalog, and requests.

use std::sync::Arc;

use hangar_core::{Catalog, Mode, ServiceRequest};
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
    Manager::new(
        store,
        Arc::new(backend),
        Arc::new(NoImages),
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
