//! What the manager's tests on the fake backend share: a manager over an in-memory store
//! and a catalog, and requests.

use std::sync::Arc;

use hangar_core::{Catalog, Mode, Role, ServiceRequest};
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
    // The in-memory store answers in place: no runtime is needed to wait for it.
    futures::executor::block_on(install_token(
        store.as_ref(),
        "admin",
        Role::Admin,
        ADMIN_TOKEN,
    ));
    let backend = FakeBackend::new();
    let manager = manager_on(store.clone(), backend.clone(), catalog, config);
    (manager, backend, store)
}

/// The admin token of every [`fake_manager`]'s store.
pub(crate) const ADMIN_TOKEN: &str =
    "hgr_00000000000000ad_00000000000000000000000000000000000000000000000000000000000000ad";

/// Records user `user` (if new) with `role` and the token `text` (in hangar's format) for
/// it, scoped to `role`.
pub(crate) async fn install_token(store: &dyn Store, user: &str, role: Role, text: &str) {
    if store.user(user).await.expect("store").is_none() {
        store
            .insert_user(&hangar_store::UserRecord {
                name: user.into(),
                role,
                created_at_ms: 1,
            })
            .await
            .expect("user");
    }
    let id = crate::api::auth::tokens::token_id(text).expect("a token in hangar's format");
    store
        .insert_token(&hangar_store::TokenRecord {
            id: id.into(),
            user: user.into(),
            role,
            hash: crate::api::auth::tokens::hash(text),
            created_at_ms: 1,
            expires_at_ms: None,
            revoked_at_ms: None,
            last_used_at_ms: None,
        })
        .await
        .expect("token");
}

/// Gives `manager`'s store the admin token [`ADMIN_TOKEN`] when it lacks it (managers made
/// by [`manager_on`] over a store of their own).
pub(crate) async fn ensure_admin(manager: &Manager) {
    let id = crate::api::auth::tokens::token_id(ADMIN_TOKEN).expect("hangar's format");
    if manager.store().token(id).await.expect("store").is_none() {
        install_token(manager.store(), "admin", Role::Admin, ADMIN_TOKEN).await;
    }
}

/// A token in hangar's format whose id and secret are made of `n`.
pub(crate) fn test_token(n: u8) -> String {
    format!(
        "hgr_{}_{}",
        format!("{n:02x}").repeat(8),
        format!("{n:02x}").repeat(32)
    )
}

/// A request for `service` in `mode`.
pub(crate) fn request(service: &str, mode: Mode) -> ServiceRequest {
    ServiceRequest {
        service: Some(service.into()),
        mode,
        ..ServiceRequest::default()
    }
}

/// A store record of a 1-vCPU, 128 MiB dedicated VM `id` of service `web` on host `local`,
/// owned by `test`, in `state`, with no endpoints: tests change the fields they are about.
pub(crate) fn vm_record(id: &str, state: hangar_core::VmState) -> hangar_store::VmRecord {
    hangar_store::VmRecord {
        id: id.into(),
        host: "local".into(),
        services: vec!["web".into()],
        env: Default::default(),
        mode: Mode::Dedicated,
        owner: "test".into(),
        state,
        endpoints: Default::default(),
        direct_endpoints: Default::default(),
        spec: serde_json::Value::Null,
        pid: None,
        error: None,
        created_at_ms: 0,
        updated_at_ms: 0,
        last_used_at_ms: 0,
        state_since_ms: 0,
        boot_ms: None,
        memory_mib: 128,
        vcpus: 1,
        pool: None,
        os: None,
        isolation: None,
    }
}
